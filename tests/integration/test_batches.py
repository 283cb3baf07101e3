"""Batches on a real database (SQLite, then Postgres): submitting through the CLI with
valid and invalid rows, idempotent resubmission, a duplicate nightly firing, and
completion that fires exactly once and writes the report.

No broker here: what is queued stays on an in-memory dispatcher, which the CLI is
handed through click's `obj` (routing to the bulk queues is exercised with real
workers in test_priority.py)."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from farm import batches, jobs, nightly, pipeline, queries, states
from farm.cli import main
from farm.context import Context
from farm.db import Batch, Job, WebhookDelivery
from farm.dispatch import BATCH_COMPLETED_TASK, NOTIFY_TASK, InMemoryDispatcher
from farm.manifest import Defaults
from workers import stages

SECRET = "whsec_" + base64.b64encode(b"farm-batch-tests-secret-32bytes!").decode()
NIGHT = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


@pytest.fixture
def ctx(db_ctx: Context) -> Iterator[Context]:
    settings = db_ctx.settings.with_(webhook_secret=SECRET, webhook_allowlist="127.0.0.1")
    c = Context(settings, InMemoryDispatcher())
    yield c
    c.engine.dispose()


class Queued:
    """The jobs whose first stage is queued on the bulk lane of an in-memory
    dispatcher, by id, in order: compares like a list of ids."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def ids(self) -> list[str]:
        return [
            m.args[0]
            for m in self.dispatcher.messages
            if m.task == pipeline.PREPARE.task and m.bulk
        ]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self.ids())

    def __eq__(self, other: object) -> bool:
        return self.ids() == other


class Runner(CliRunner):
    """`farm` in this process, handed a dispatcher through click's `obj`."""

    def __init__(self, dispatcher: Any) -> None:
        super().__init__()
        self.dispatcher = dispatcher

    def invoke(self, cli: Any, args: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().invoke(cli, args, obj=self.dispatcher, **kwargs)


@pytest.fixture
def cli(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> tuple[CliRunner, Queued]:
    """`farm` in this process on ctx's database; the broker is never reached."""
    dispatcher = InMemoryDispatcher()
    queued = Queued(dispatcher)
    env = {
        "FARM_HOME": str(ctx.settings.home),
        "FARM_DATABASE_URL": ctx.settings.effective_database_url,
        "FARM_BROKER_URL": "redis://127.0.0.1:1/0",  # not embedded; never used
        "FARM_WEBHOOK_SECRET": SECRET,
        "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Runner(dispatcher), queued


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def batch_jobs(ctx: Context, name: str) -> list[Job]:
    with ctx.session() as s:
        batch = queries.get_batch_by_name(s, name)
        return [] if batch is None else list(queries.batch_jobs(s, batch.id))


def options(**changes: object) -> batches.Options:
    values: dict[str, object] = dict(fps=25, size=(64, 64), chunk_frames=10)
    values.update(changes)
    return batches.Options(**values)  # type: ignore[arg-type]


MANIFEST = (
    "script,text,avatar,voice,output\n"
    "scripts/a.txt,,,espeak,a.mp4\n"  # line 2
    "scripts/missing.txt,,,,m.mp4\n"  # line 3: no such file
    ",Inline text.,demo,joe,b.mp4\n"  # line 4
    ",Bad key.,,,../escape.mp4\n"  # line 5: output key with ..
    "scripts/c.txt,,nobody,,c.mp4\n"  # line 6: unknown avatar
    "scripts/c.txt,,,,c.mp4\n"  # line 7
)


def test_invalid_rows_refuse_the_batch_unless_skipped_and_resubmission_is_idempotent(
    ctx: Context, cli: tuple[CliRunner, Queued], tmp_path: Path
) -> None:
    runner, queued = cli
    write(tmp_path / "in" / "scripts" / "a.txt", "Hello from a.")
    write(tmp_path / "in" / "scripts" / "c.txt", "Hello from c.")
    manifest = write(tmp_path / "in" / "m.csv", MANIFEST)

    refused = runner.invoke(main, ["batch", "submit", str(manifest), "--name", "b1"])
    assert refused.exit_code == 1, refused.output
    lines = refused.stderr.splitlines()
    assert [ln.split(": ", 2)[1] for ln in lines[:-1]] == ["line 3", "line 5", "line 6"]
    assert "no such script file" in lines[0] and "'..'" in lines[1] and "nobody" in lines[2]
    assert lines[-1].startswith("farm: error: 3 invalid row(s)")
    assert "nothing submitted" in lines[-1]
    assert batch_jobs(ctx, "b1") == [] and queued == []
    with ctx.session() as s:
        assert queries.get_batch_by_name(s, "b1") is None  # no batch row either

    args = ["batch", "submit", str(manifest), "--name", "b1", "--skip-invalid"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "batch b1: 3 job(s) submitted, 0 already submitted, 3 invalid row(s) skipped" in (
        first.stdout
    )
    made = batch_jobs(ctx, "b1")
    assert sorted(j.batch_row for j in made) == ["line 2", "line 4", "line 7"]
    assert sorted(queued) == sorted(j.id for j in made)
    assert all(j.priority == batches.BULK_PRIORITY and j.state == states.QUEUED for j in made)
    by_row = {j.batch_row: j for j in made}
    assert by_row["line 2"].script == "Hello from a." and by_row["line 2"].voice == "espeak"
    assert by_row["line 4"].script == "Inline text."
    assert by_row["line 7"].target_key == "batches/b1/outputs/c.mp4"
    with ctx.session() as s:
        batch = queries.find_batch(s, "b1")
        assert [(r["row"], r["line"]) for r in batch.invalid] == [
            ("line 3", 3),
            ("line 5", 5),
            ("line 6", 6),
        ]

    # The same manifest again: every row is already a job; nothing new, nothing queued.
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "0 job(s) submitted, 3 already submitted" in again.stdout
    assert len(batch_jobs(ctx, "b1")) == 3 and len(queued) == 3

    # A fixed row and a new one: only those two become jobs.
    fixed = (
        MANIFEST.replace("scripts/missing.txt", "scripts/a.txt")
        .replace("nobody", "demo")
        .replace("scripts/c.txt,,demo,,c.mp4", "scripts/c.txt,,demo,,c2.mp4")
    )
    write(manifest, fixed + ",Brand new.,,,new.mp4\n")
    more = runner.invoke(main, args)
    assert more.exit_code == 0, more.output
    assert "3 job(s) submitted, 3 already submitted, 1 invalid row(s) skipped" in more.stdout
    assert len(batch_jobs(ctx, "b1")) == 6 and len(queued) == 6
    with ctx.session() as s:
        assert [r["row"] for r in queries.find_batch(s, "b1").invalid] == ["line 5"]


def test_an_output_key_taken_by_an_earlier_submission_is_an_invalid_row(
    ctx: Context, tmp_path: Path
) -> None:
    write(tmp_path / "m.jsonl", '{"text": "First version.", "output": "x.mp4"}\n')
    checked = batches.load(ctx, "b2", tmp_path / "m.jsonl", options())
    batches.submit(ctx, "b2", checked, options())
    write(tmp_path / "m.jsonl", '{"text": "Second version.", "output": "x.mp4"}\n')
    checked = batches.load(ctx, "b2", tmp_path / "m.jsonl", options())
    assert checked.rows == []
    (problem,) = checked.problems
    assert problem.where == "line 1" and "already belongs to a different row" in problem.reason


def test_directory_and_jsonl_resubmissions_create_no_duplicates(
    ctx: Context, tmp_path: Path
) -> None:
    queued = Queued(ctx.dispatch)
    for i in range(5):
        write(tmp_path / "dir" / f"s{i}.txt", f"Script number {i}.")
    for _ in range(3):
        checked = batches.load(ctx, "dir-batch", tmp_path / "dir", options())
        batches.submit(ctx, "dir-batch", checked, options())
    assert len(queued) == 5 and len(batch_jobs(ctx, "dir-batch")) == 5
    # The same rows under another batch name are other jobs.
    checked = batches.load(ctx, "dir-batch-2", tmp_path / "dir", options())
    assert len(batches.submit(ctx, "dir-batch-2", checked, options()).created) == 5
    # A different size renders something else: new jobs, a new key.
    other = options(size=(128, 128))
    checked = batches.load(ctx, "dir-batch", tmp_path / "dir", other)
    assert checked.problems and "already belongs" in checked.problems[0].reason


def test_a_duplicate_nightly_firing_submits_nothing_new(ctx: Context, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    write(inbox / "intro.txt", "Good evening.")
    write(inbox / "scripts" / "deep.txt", "From a manifest.")
    write(inbox / "batch.jsonl", '{"script": "scripts/deep.txt", "voice": "espeak"}\n')
    write(inbox / "broken.csv", "nonsense,columns\n1,2\n")
    ctx = Context(ctx.settings.with_(nightly_inbox=str(inbox)), InMemoryDispatcher())
    queued = Queued(ctx.dispatch)

    first = nightly.run(ctx, now=NIGHT)
    assert first.name == "nightly-2026-11-22"
    assert len(first.created) == 2 and first.existing == 0
    assert [p.where for p in first.problems] == ["broken.csv"]
    second = nightly.run(ctx, now=NIGHT + timedelta(minutes=5))  # beat fired twice
    assert second.created == [] and second.existing == 2
    assert len(queued) == 2 and len(batch_jobs(ctx, "nightly-2026-11-22")) == 2

    # The next night the same inbox holds nothing new: no batch is made for it.
    next_night = nightly.run(ctx, now=NIGHT + timedelta(days=1))
    assert next_night.created == []
    with ctx.session() as s:
        assert queries.get_batch_by_name(s, "nightly-2026-11-23") is None
        assert s.scalar(select(Batch.source).where(Batch.name == first.name)) == str(inbox)
    # A script dropped in later that night joins that night's batch, once.
    write(inbox / "late.txt", "Sorry I am late.")
    late = nightly.run(ctx, now=NIGHT + timedelta(hours=1))
    assert len(late.created) == 1 and late.existing == 2
    assert nightly.run(ctx, now=NIGHT + timedelta(hours=2)).created == []
    rows = sorted(j.batch_row or "" for j in batch_jobs(ctx, "nightly-2026-11-22"))
    assert rows == ["batch.jsonl line 1", "intro.txt", "late.txt"]
    assert len(queued) == 3


# --- completion -------------------------------------------------------------


def _submit(ctx: Context, name: str, texts: list[str], webhook: str | None = None) -> list[str]:
    rows = "".join(
        json.dumps({"text": t, "output": f"{i}.mp4"}) + "\n" for i, t in enumerate(texts)
    )
    path = ctx.settings.home.parent / f"{name}.jsonl"
    write(path, rows)
    opts = options(defaults=Defaults())
    checked = batches.load(ctx, name, path, opts)
    done = batches.submit(ctx, name, checked, opts, webhook=webhook)
    return done.created


def _succeed(ctx: Context, job_id: str) -> None:
    """The end of a job's pipeline: its video in the store, then publish."""
    key = stages.final_key(ctx, job_id)
    ctx.store.put_bytes(key, b"not really an mp4")
    with ctx.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(state=states.PUBLISHING))
    assert stages.publish(ctx, job_id)


def _reports_queued(ctx: Context) -> list[str]:
    """The batch ids whose report was queued on ctx's dispatcher; the queue is emptied."""
    ids = [m.args[0] for m in ctx.dispatch.messages if m.task == BATCH_COMPLETED_TASK]
    ctx.dispatch.messages.clear()
    return ids


def test_completion_fires_exactly_once_and_writes_the_report(ctx: Context) -> None:
    hook = "http://127.0.0.1:9/batch-hook"
    ok, bad, gone = _submit(ctx, "b3", ["One.", "Two.", "Three."], webhook=hook)
    _succeed(ctx, ok)
    assert batches.job_finished(ctx, ok) is None  # two jobs still active
    jobs.fail(ctx, bad, "render: chunk 0: out of memory")
    assert batches.job_finished(ctx, bad) is None
    with ctx.session() as s:
        assert queries.transition(s, gone, states.CANCELLED)
    batch_id = batches.job_finished(ctx, gone)
    assert batch_id is not None
    # Redelivered tasks and late callers: the batch completed once.
    assert [batches.job_finished(ctx, j) for j in (ok, bad, gone)] == [None, None, None]

    ctx.dispatch.messages.clear()
    done = batches.complete(ctx, batch_id)
    assert done is not None and done.report_key == "batches/b3/report.json"
    assert batches.complete(ctx, batch_id) is None  # a second report task
    report = json.loads(ctx.store.get_bytes("batches/b3/report.json"))
    assert report["name"] == "b3" and report["state"] == "completed" and report["total"] == 3
    assert report["counts"] == {"succeeded": 1, "failed": 1, "cancelled": 1}
    by_id = {e["job_id"]: e for e in report["jobs"]}
    assert by_id[ok]["output"] == "0.mp4" and by_id[ok]["state"] == "succeeded"
    assert by_id[ok]["output_url"] == ctx.store.url("batches/b3/outputs/0.mp4")
    assert by_id[ok]["duration"] is not None and by_id[ok]["error"] is None
    assert by_id[bad]["error"] == "render: chunk 0: out of memory"
    assert by_id[bad]["output_url"] is None and by_id[gone]["state"] == "cancelled"

    with ctx.session() as s:
        events = s.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id))
        (event,) = events.all()
    assert event.event_type == "batch.completed" and event.url == hook
    assert [(m.task, m.args) for m in ctx.dispatch.messages] == [(NOTIFY_TASK, (event.id, 1))]
    data = json.loads(event.payload)["data"]
    assert data["name"] == "b3" and data["counts"]["failed"] == 1
    assert data["report_url"] == ctx.store.url("batches/b3/report.json")


def test_concurrent_last_finishers_complete_the_batch_once(ctx: Context) -> None:
    ids = _submit(ctx, "b4", [f"Line {i}." for i in range(8)])
    for job_id in ids:
        jobs.fail(ctx, job_id, "boom")
    results: list[str | None] = []
    barrier = threading.Barrier(len(ids))

    def finish(job_id: str) -> None:
        barrier.wait()
        results.append(batches.job_finished(ctx, job_id))

    threads = [threading.Thread(target=finish, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and results.count(None) == 7


def test_new_rows_reopen_a_completed_batch_and_it_completes_again(ctx: Context) -> None:
    (first,) = _submit(ctx, "b5", ["First."])
    _succeed(ctx, first)  # publish saw the batch's last job: it queued the report
    (batch_id,) = _reports_queued(ctx)
    assert batches.complete(ctx, batch_id) is not None
    first_report = json.loads(ctx.store.get_bytes("batches/b5/report.json"))
    assert first_report["total"] == 1

    created = _submit(ctx, "b5", ["First.", "Second."])  # one new row
    assert len(created) == 1
    assert batches.status(ctx, "b5").state == "running"
    _succeed(ctx, created[0])
    assert _reports_queued(ctx) == [batch_id]
    assert batches.complete(ctx, batch_id) is not None
    assert json.loads(ctx.store.get_bytes("batches/b5/report.json"))["total"] == 2


def test_status_and_report_commands(ctx: Context, cli: tuple[CliRunner, Queued]) -> None:
    runner, _ = cli
    ok, bad = _submit(ctx, "b6", ["Fine.", "Doomed."])
    _succeed(ctx, ok)
    jobs.fail(ctx, bad, "tts: the voice broke")

    status = runner.invoke(main, ["batch", "status", "b6"])
    assert status.exit_code == 0, status.output
    assert "succeeded 1  failed 1" in status.stdout
    assert f"failed    line 2  job {bad}: tts: the voice broke" in status.stdout
    waited = runner.invoke(main, ["batch", "status", "b6", "--wait"])
    assert waited.exit_code == 1 and "1 of 2 job(s) did not succeed" in waited.stderr
    assert "[##############################] 2/2 jobs ended, 1 failed" in waited.stderr

    csv_out = runner.invoke(main, ["batch", "report", "b6"])
    assert csv_out.exit_code == 0, csv_out.output
    header, *lines = csv_out.stdout.splitlines()
    assert header == (
        "row,output,job_id,state,output_url,captions_srt_url,captions_vtt_url,poster_url,"
        "preview_url,duration,error"
    )
    url = ctx.store.url("batches/b6/outputs/0.mp4")
    assert lines[0].startswith(f"line 1,0.mp4,{ok},succeeded,{url},")
    assert lines[1].startswith(f"line 2,1.mp4,{bad},failed,,") and lines[1].endswith(
        "tts: the voice broke"
    )
    out = ctx.settings.home / "report.json"
    as_json = runner.invoke(main, ["batch", "report", "b6", "--format", "json", "-o", str(out)])
    assert as_json.exit_code == 0, as_json.output
    assert [j["state"] for j in json.loads(out.read_text())["jobs"]] == ["succeeded", "failed"]
    missing = runner.invoke(main, ["batch", "status", "nope"])
    assert missing.exit_code == 1 and missing.stderr == "farm: error: no batch named 'nope'\n"


def test_report_cells_from_file_names_are_not_formulas(
    ctx: Context, cli: tuple[CliRunner, Queued], tmp_path: Path
) -> None:
    """The hostile-input run's repro: a script named '=1+1.txt' in a directory batch."""
    runner, _ = cli
    for name in ("=1+1.txt", "@SUM(A1).txt", "plain.txt"):
        write(tmp_path / "d" / name, "Hi.")
    submitted = runner.invoke(main, ["batch", "submit", str(tmp_path / "d"), "--name", "b9"])
    assert submitted.exit_code == 0, submitted.output
    report = runner.invoke(main, ["batch", "report", "b9", "--format", "csv"])
    assert report.exit_code == 0, report.output
    cells = [cell for row in csv.reader(io.StringIO(report.stdout)) for cell in row]
    assert "'=1+1.txt" in cells and "'=1+1.mp4" in cells and "'@SUM(A1).txt" in cells
    assert "plain.txt" in cells
    assert not any(c.startswith(("=", "+", "@")) for c in cells)

    full = runner.invoke(main, ["batch", "report", "b9", "--output", "/dev/full"])
    assert full.exit_code == 1 and full.stdout == ""
    assert full.stderr == "farm: error: cannot write /dev/full: No space left on device\n"
    nested = tmp_path / "reports" / "new" / "b9.csv"
    made = runner.invoke(main, ["batch", "report", "b9", "--output", str(nested)])
    assert made.exit_code == 0 and nested.read_text() == report.stdout


def test_an_output_that_is_a_folder_of_an_earlier_submission_is_refused(
    ctx: Context, cli: tuple[CliRunner, Queued], tmp_path: Path
) -> None:
    runner, queued = cli
    first = write(tmp_path / "m1.csv", "text,output\nHello.,x\n")
    assert runner.invoke(main, ["batch", "submit", str(first), "--name", "b10"]).exit_code == 0
    second = write(tmp_path / "m2.csv", "text,output\nBye.,x/y.mp4\nFine.,z.mp4\n")
    refused = runner.invoke(main, ["batch", "submit", str(second), "--name", "b10"])
    assert refused.exit_code == 1
    assert (
        "line 2: output key 'x/y.mp4' needs 'x' as a folder, but that is the output of "
        "a row submitted earlier" in refused.stderr
    )
    assert len(batch_jobs(ctx, "b10")) == 1 and len(queued) == 1


# --- through real workers ----------------------------------------------------


def test_nightly_firings_on_real_workers_end_in_one_report_and_one_event(
    postgres_url: str, tmp_path: Path
) -> None:
    """What beat does each night, twice over: send `farm.nightly`. The cpu and render
    `farm worker` processes (Redis, Postgres, the null renderer) take it from there:
    the inbox's scripts become bulk jobs, the last one to end completes the batch,
    and the report lands in the store with one signed batch.completed webhook."""
    import os

    from farm import migrate
    from farm.config import Settings
    from tests.conftest import need_service
    from tests.services import Workers, fresh_redis_db, redis_up
    from tests.webhook_receiver import Receiver
    from workers.app import make_app

    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    inbox = tmp_path / "inbox"
    for name in ("alpha", "beta", "gamma"):
        write(inbox / f"{name}.txt", f"Tonight's script called {name}.")
    with Receiver(SECRET) as receiver:
        env = {
            **os.environ,
            "FARM_HOME": str(tmp_path / "home"),
            "FARM_BROKER_URL": fresh_redis_db(12),
            "FARM_DATABASE_URL": postgres_url,
            "FARM_RENDERER": "null",
            "FARM_NIGHTLY_INBOX": str(inbox),
            "FARM_NIGHTLY_VOICE": "espeak",
            "FARM_WEBHOOK_URL": receiver.url,
            "FARM_WEBHOOK_SECRET": SECRET,
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
            "FARM_SIZE": "64",
            "FARM_CHUNK_FRAMES": "20",
        }
        env.pop("FARM_STORE_URL", None)
        migrate.upgrade(postgres_url)
        settings = Settings.from_env(env)
        ctx = Context(settings)
        workers = Workers(env, tmp_path)
        workers.start("cpu", "cpu", concurrency=2)
        workers.start("render", "render")
        app = make_app(settings)
        try:
            workers.wait_ready()
            app.send_task("farm.nightly")
            app.send_task("farm.nightly")  # a second beat, or a second firing
            events = receiver.wait_for(4, timeout=120)  # 3 x job.succeeded, 1 x batch
            time.sleep(2)  # anything more would arrive now
        finally:
            workers.stop()
            app.close()
            fresh_redis_db(12)
        assert all(r.payload is not None for r in receiver.received)  # all verified
        types = sorted(r.payload["type"] for r in receiver.received if r.payload)
        assert types == ["batch.completed"] + ["job.succeeded"] * 3
    with ctx.session() as s:
        (batch,) = s.scalars(select(Batch)).all()
        assert batch.name.startswith("nightly-") and batch.state == "completed"
        made = list(queries.batch_jobs(s, batch.id))
    assert sorted(j.batch_row or "" for j in made) == ["alpha.txt", "beta.txt", "gamma.txt"]
    assert all(j.state == states.SUCCEEDED and j.voice == "espeak" for j in made)
    report = json.loads(ctx.store.get_bytes(f"batches/{batch.name}/report.json"))
    assert sorted(e["output"] for e in report["jobs"]) == ["alpha.mp4", "beta.mp4", "gamma.mp4"]
    for entry in report["jobs"]:
        assert ctx.store.exists(f"batches/{batch.name}/outputs/{entry['output']}")
    (event,) = [r.payload for r in events if r.payload and r.payload["type"] == "batch.completed"]
    assert event["data"]["name"] == batch.name and event["data"]["counts"] == {"succeeded": 3}
    ctx.engine.dispose()
