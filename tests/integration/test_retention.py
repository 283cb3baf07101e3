"""Retention and deletion (farm/retention.py): `farm jobs delete`, `farm avatar delete`,
FARM_RETENTION_DAYS and FARM_KEEP_INTERMEDIATES, on SQLite and real Postgres, with the
local store and with S3 on a real moto server (also through a proxy that refuses every
connection: a store outage). Jobs run through the real stages in process (tests/
pipeline.py) with espeak and the null renderer at 64 px: this is about rows and store
objects, not pixels."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from farm import cli, jobs, pipeline, queries, retention, states, sweep
from farm.context import Context
from farm.db import Deletion, Job, PendingDeletion, utcnow
from farm.dispatch import InMemoryDispatcher
from farm.errors import InvalidInput, NotFound
from farm.stores import job_key
from tests.faultproxy import FaultProxy
from tests.pipeline import rendered_job, run_stages
from tests.services import aws_test_env, moto_s3

# Every table that holds rows of a job, and the column naming the job.
JOB_TABLES = {
    "jobs": "id",
    "segments": "job_id",
    "chunks": "job_id",
    "webhook_deliveries": "job_id",
}


def request(script: str = "Hello there.", **changes: object) -> jobs.JobRequest:
    values: dict = dict(
        script=script, avatar="demo", voice="espeak", fps=10, size=(64, 64), chunk_frames=8
    )
    return jobs.JobRequest(seed=1, renderer="null", **{**values, **changes})


def with_settings(ctx: Context, **changes: object) -> Context:
    return Context(dataclasses.replace(ctx.settings, **changes), ctx.dispatch)


def rendered(ctx: Context, script: str = "Hello there.") -> str:
    return rendered_job(ctx, request(script)).id


def add_delivery(ctx: Context, job_id: str) -> str:
    """A webhook delivery and one attempt of it, as a job with a webhook has."""
    with ctx.session() as s:
        delivery = queries.insert_delivery(
            s,
            id=f"msg_{uuid.uuid4().hex}",
            job_id=job_id,
            event_type="job.succeeded",
            url="http://127.0.0.1:9/hook",
            payload="{}",
        )
        queries.insert_attempt(s, delivery.id, 1)
        return delivery.id


def rows_of(ctx: Context, job_id: str) -> dict[str, int]:
    with ctx.engine.connect() as conn:
        counts = {
            table: conn.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE {column} = :j"), {"j": job_id}
            ).scalar()
            for table, column in JOB_TABLES.items()
        }
        counts["webhook_attempts"] = conn.execute(
            sa.text(
                "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d"
                " ON d.id = a.delivery_id WHERE d.job_id = :j"
            ),
            {"j": job_id},
        ).scalar()
        counts["orphan_attempts"] = conn.execute(
            sa.text(
                "SELECT count(*) FROM webhook_attempts WHERE delivery_id NOT IN"
                " (SELECT id FROM webhook_deliveries)"
            )
        ).scalar()
    return counts


def audit(ctx: Context, subject: str, kind: str) -> list[Deletion]:
    query = sa.select(Deletion).where(Deletion.subject == subject, Deletion.kind == kind)
    with ctx.session() as s:
        return list(s.scalars(query))


def pending(ctx: Context) -> list[str]:
    with ctx.session() as s:
        return list(s.scalars(sa.select(PendingDeletion.prefix)))


def check_deleted(ctx: Context, job_id: str, keep: str) -> None:
    """No row of the job, nothing of it in the store, the neighbour untouched, audited."""
    assert set(rows_of(ctx, job_id).values()) == {0}
    assert ctx.store.list(job_key(job_id)) == []
    assert ctx.store.list(job_key(keep)) != []
    (record,) = audit(ctx, job_id, "job")
    assert (record.kind, record.command, record.pending) == ("job", "farm jobs delete", 0)
    assert record.rows >= 4 and record.objects > 0 and record.bytes > 0
    assert record.finished_at is not None and pending(ctx) == []


def test_delete_leaves_nothing_in_the_database_or_the_local_store(db_ctx: Context):
    ctx = with_settings(db_ctx, keep_intermediates=True)
    victim, other = rendered(ctx), rendered(ctx, "Another one.")
    add_delivery(ctx, victim)
    add_delivery(ctx, other)
    before = sum(ctx.store.size(k) for k in ctx.store.list(job_key(victim)))
    counts = rows_of(ctx, victim)
    assert counts["webhook_attempts"] == 1 and counts["chunks"] > 1
    expected_rows = sum(counts.values()) - counts["orphan_attempts"]

    (done,) = retention.delete_jobs(ctx, [victim[:10]])
    assert (done.subject, done.already, done.bytes) == (victim, None, before)
    assert done.rows == expected_rows
    check_deleted(ctx, victim, keep=other)
    assert rows_of(ctx, other)["webhook_attempts"] == 1

    # Deleting again is fine and says so; an id that never was is an error.
    (again,) = retention.delete_jobs(ctx, [victim])
    assert again.already is not None and len(audit(ctx, victim, "job")) == 1
    with pytest.raises(NotFound, match="no job"):
        retention.delete_jobs(ctx, ["0123456789abcdef"])


# The store is what these two are about: SQLite only (Postgres runs every test above).
@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_delete_leaves_nothing_in_s3_on_moto(db_ctx: Context, monkeypatch):
    for key, value in aws_test_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"farm-ret-{uuid.uuid4().hex[:8]}"
    with moto_s3(bucket) as endpoint:
        ctx = with_settings(db_ctx, store_url=f"s3://{bucket}/farm", s3_endpoint_url=endpoint)
        victim, other = rendered(ctx), rendered(ctx, "Another one.")
        (done,) = retention.delete_jobs(ctx, [victim])
        assert done.objects > 0 and done.pending == 0
        check_deleted(ctx, victim, keep=other)


def test_a_running_job_is_refused_without_cancel_and_deleted_with_it(db_ctx: Context):
    ended = rendered(db_ctx)
    running = jobs.submit(db_ctx, request())
    run_stages(db_ctx, until=pipeline.RENDER)
    assert jobs.find(db_ctx, running).state == states.RENDERING
    # Refused before anything is deleted: the ended job named first stays too.
    with pytest.raises(InvalidInput, match="--cancel"):
        retention.delete_jobs(db_ctx, [ended, running])
    assert rows_of(db_ctx, ended)["jobs"] == 1 and rows_of(db_ctx, running)["jobs"] == 1

    deleted = retention.delete_jobs(db_ctx, [ended, running], cancel=True)
    assert [d.subject for d in deleted] == [ended, running]
    assert f"{running}-render-0" in db_ctx.dispatch.revoked
    for job_id in (ended, running):
        assert set(rows_of(db_ctx, job_id).values()) == {0}
        assert db_ctx.store.list(job_key(job_id)) == []
    # A chunk that was uploading meanwhile finds its job gone and removes what it wrote.
    db_ctx.store.put_bytes(job_key(running, "chunks", "00000.mp4"), b"late")
    assert jobs.clean_if_cancelled(db_ctx, running)
    assert db_ctx.store.list(job_key(running)) == []


def _age(ctx: Context, job_id: str, days: float, state: str | None = None) -> None:
    then = utcnow() - timedelta(days=days)
    values: dict = {"created_at": then, "finished_at": then}
    if state is not None:
        values["state"] = state
    with ctx.session() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(**values))


def test_retention_sweeps_only_what_is_old(db_ctx: Context):
    ctx = with_settings(db_ctx, retention_days=30)
    old, young, old_failed = rendered(ctx), rendered(ctx), rendered(ctx)
    _age(ctx, old, 31)
    _age(ctx, young, 29)
    _age(ctx, old_failed, 40, states.FAILED)
    active = jobs.submit(ctx, request())
    _age(ctx, active, 90, states.RENDERING)
    ctx.store.put_bytes(job_key(active, "plan.npz"), b"plan")

    sweep.run(ctx)  # beat's sweep: the retention pass runs in it
    for job_id in (old, old_failed):
        job = jobs.find(ctx, job_id)  # the row stays, marked
        assert job.expired_at is not None and job.bytes_stored == 0 and job.output_key is None
        assert ctx.store.list(job_key(job_id)) == []
        (record,) = audit(ctx, job_id, "outputs")
        assert (record.kind, record.command, record.pending) == (
            "outputs",
            "retention (30 days)",
            0,
        )
        assert record.objects > 0
    for job_id in (young, active):
        assert jobs.find(ctx, job_id).expired_at is None
        assert ctx.store.list(job_key(job_id)) != []
    assert jobs.find(ctx, young).output_key is not None

    # FARM_RETENTION_DAYS=0 (the default) keeps everything.
    kept = rendered(db_ctx)
    _age(db_ctx, kept, 3650)
    assert retention.expire(db_ctx) == 0 and jobs.find(db_ctx, kept).expired_at is None


def test_intermediates_go_after_publish_unless_kept(db_ctx: Context):
    gone = rendered(db_ctx)
    keys = db_ctx.store.list(job_key(gone))
    assert job_key(gone, "final.mp4") in keys and job_key(gone, "plan.npz") in keys
    assert not [k for k in keys if k.startswith((job_key(gone, "chunks"), job_key(gone, "audio/")))]
    measured = sum(db_ctx.store.size(k) for k in keys)
    assert jobs.find(db_ctx, gone).bytes_stored == measured
    (record,) = audit(db_ctx, gone, "intermediates")
    assert (record.kind, record.command) == ("intermediates", "publish") and record.objects > 0

    kept_ctx = with_settings(db_ctx, keep_intermediates=True)
    kept = rendered(kept_ctx)
    kept_keys = kept_ctx.store.list(job_key(kept))
    chunks = jobs.find(kept_ctx, kept).chunks_total
    assert len([k for k in kept_keys if k.startswith(job_key(kept, "chunks/"))]) == chunks > 1
    assert [k for k in kept_keys if k.startswith(job_key(kept, "audio/"))]
    assert jobs.find(kept_ctx, kept).bytes_stored == sum(kept_ctx.store.size(k) for k in kept_keys)

    # One that publish could not tidy (its worker died): the sweep does it.
    with db_ctx.session() as s:
        s.execute(sa.update(Job).where(Job.id == kept).values(bytes_stored=None))
    retention.sweep(db_ctx)
    left = db_ctx.store.list(job_key(kept))
    assert not [k for k in left if "/chunks/" in k or "/audio/" in k]
    assert jobs.find(db_ctx, kept).bytes_stored == sum(db_ctx.store.size(k) for k in left)


@pytest.fixture
def refusing_s3(db_ctx: Context, monkeypatch) -> Iterator[tuple[Context, FaultProxy]]:
    for key, value in aws_test_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"farm-out-{uuid.uuid4().hex[:8]}"
    with moto_s3(bucket) as endpoint, FaultProxy(endpoint) as proxy:
        settings = dataclasses.replace(
            db_ctx.settings, store_url=f"s3://{bucket}", s3_endpoint_url=proxy.url
        )
        yield Context(settings, db_ctx.dispatch), proxy


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_store_outage_leaves_pending_deletions_that_the_sweep_completes(refusing_s3):
    ctx, proxy = refusing_s3
    victim, other = rendered(ctx), rendered(ctx, "Another one.")
    stored = sum(ctx.store.size(k) for k in ctx.store.list(job_key(victim)))
    proxy.set_mode("refuse")
    (done,) = retention.delete_jobs(ctx, [victim])
    # The rows are gone at once; what is left to delete is recorded, not forgotten.
    assert done.pending == 1 and done.objects == 0
    assert set(rows_of(ctx, victim).values()) == {0}
    assert pending(ctx) == [job_key(victim)]
    retention.sweep(ctx)  # still down: still pending, the error noted
    with ctx.session() as s:
        (row,) = s.scalars(sa.select(PendingDeletion))
        assert row.attempts == 2 and "unreachable" in (row.last_error or "")

    proxy.set_mode("pass")
    retention.sweep(ctx)
    assert pending(ctx) == []
    check_deleted(ctx, victim, keep=other)
    (record,) = audit(ctx, victim, "job")
    assert record.bytes == stored


def test_avatar_delete_refuses_while_used_and_removes_row_store_and_engines(
    db_ctx: Context, tmp_path: Path
):
    ctx = with_settings(db_ctx, model_dir=tmp_path / "models")
    rendered(ctx)  # registers the built-in demo avatar
    assert ctx.store.list("avatars/demo") != []
    engines = ctx.settings.model_dir / "engines"
    engines.mkdir(parents=True)
    mine, theirs = engines / "portrait-aa-sm90.engine", engines / "portrait-bb-sm90.engine"
    from models.engines import note_owner  # what a worker does beside a built engine

    for path, owner in ((mine, "demo"), (theirs, "roman")):
        path.write_bytes(b"engine")
        note_owner(path, owner)
    waiting = jobs.submit(ctx, request())
    with pytest.raises(InvalidInput, match=f"used by 1 job.*{waiting}"):
        retention.delete_avatar(ctx, "demo")
    jobs.cancel(ctx, waiting)

    done = retention.delete_avatar(ctx, "demo")
    assert (done.rows, done.engines, done.pending) == (1, 1, 0) and done.objects >= 2
    with ctx.session() as s:
        assert queries.get_avatar(s, "demo") is None
    assert ctx.store.list("avatars/demo") == []
    assert not mine.exists() and theirs.exists()
    assert sorted(p.name for p in engines.iterdir()) == [theirs.name, f"{theirs.name}.owner"]
    assert retention.delete_avatar(ctx, "demo").already is not None
    with pytest.raises(NotFound, match="unknown avatar"):
        retention.delete_avatar(ctx, "nobody")
    # The built-in demo registers again on its next job.
    rendered(ctx)
    assert ctx.store.list("avatars/demo") != []


def test_cli_jobs_group_lists_and_deletes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_MODEL_DIR", str(tmp_path / "models"))
    for name in ("FARM_DATABASE_URL", "FARM_STORE_URL", "FARM_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    dispatcher = InMemoryDispatcher()
    runner = CliRunner()
    listing = runner.invoke(cli.main, ["jobs"], obj=dispatcher)  # makes the schema
    assert listing.exit_code == 0 and listing.output.startswith("JOB")
    from farm.config import Settings

    ctx = Context(Settings.from_env(), dispatcher)
    done, waiting = rendered(ctx), jobs.submit(ctx, request())

    out = runner.invoke(cli.main, ["jobs", "--limit", "5", "--state", "succeeded"], obj=dispatcher)
    assert out.exit_code == 0 and done[:12] in out.output and waiting[:12] not in out.output

    refused = runner.invoke(cli.main, ["jobs", "delete", waiting], obj=dispatcher)
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        f"farm: error: job {waiting} is queued: cancel it first, or delete with --cancel"
    ]
    ok = runner.invoke(cli.main, ["jobs", "delete", done[:8], waiting, "--cancel"], obj=dispatcher)
    assert ok.exit_code == 0, ok.output
    lines = ok.output.strip().splitlines()
    assert lines[0].startswith(f"deleted job {done}: ") and lines[1].startswith("deleted job")
    again = runner.invoke(cli.main, ["jobs", "delete", done], obj=dispatcher)
    assert again.exit_code == 0 and "already deleted" in again.output
    unknown = runner.invoke(cli.main, ["jobs", "delete", "abcdef"], obj=dispatcher)
    assert unknown.exit_code == 1 and unknown.output.strip() == "farm: error: no job 'abcdef'"
    bad = runner.invoke(cli.main, ["jobs", "delete", "zz%"], obj=dispatcher)
    assert bad.exit_code == 2

    # An expired job says so, and shows no links to what retention deleted.
    old = rendered(ctx)
    _age(ctx, old, 10)
    assert retention.expire(with_settings(ctx, retention_days=7)) == 1
    shown = runner.invoke(cli.main, ["status", old], obj=dispatcher).output
    assert "expired" in shown and "output " not in shown and "poster" not in shown

    # Erasing a person: every job of the avatar, then the avatar.
    mine = rendered(ctx)
    erase = runner.invoke(cli.main, ["jobs", "delete", "--avatar", "demo"], obj=dispatcher)
    assert erase.exit_code == 0 and f"deleted job {mine}" in erase.output
    gone = runner.invoke(cli.main, ["avatar", "delete", "demo"], obj=dispatcher)
    assert gone.exit_code == 0 and gone.output.startswith("deleted avatar demo: 1 row(s)")
    none = runner.invoke(cli.main, ["jobs", "delete", "--avatar", "demo"], obj=dispatcher)
    assert none.output == "avatar demo has no jobs: nothing to delete\n"
    again = runner.invoke(cli.main, ["avatar", "delete", "demo"], obj=dispatcher)
    assert again.exit_code == 0 and "avatar demo was already deleted" in again.output


def test_two_deletes_of_one_job_at_once_record_it_once(db_ctx: Context):
    from concurrent.futures import ThreadPoolExecutor

    victim = rendered(db_ctx)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: retention.delete_job(db_ctx, victim), range(2)))
    assert sorted(r.already is None for r in results) == [False, True]
    assert len(audit(db_ctx, victim, "job")) == 1 and pending(db_ctx) == []
    assert set(rows_of(db_ctx, victim).values()) == {0}
    with db_ctx.session() as s:
        assert queries.delete_job_rows(s, victim) == 0
