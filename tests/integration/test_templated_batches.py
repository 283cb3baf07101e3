"""Templated batches on a real database (SQLite, then Postgres), through the CLI in
this process: every bad row refused by line before anything is submitted, the
filled-in scripts become jobs, resubmitting creates nothing new, and the prepare stage
speaks a value that holds markup as text.

No broker: what the CLI queues stays on the context's in-memory dispatcher, and the
prepare stage runs in this process (tests/pipeline.py); nothing is rendered."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from farm import batches, markup, pipeline, queries, states
from farm.cli import main
from farm.context import Context
from farm.db import Job, Segment
from farm.dispatch import InMemoryDispatcher
from tests.pipeline import run_stages

SECRET = "whsec_" + base64.b64encode(b"farm-template-tests-secret-32by!").decode()


@pytest.fixture
def ctx(db_ctx: Context) -> Iterator[Context]:
    c = Context(db_ctx.settings.with_(webhook_secret=SECRET), InMemoryDispatcher())
    yield c
    c.engine.dispose()


@pytest.fixture
def farm(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`farm ARGS...` in this process on ctx's database and dispatcher."""
    env = {
        "FARM_HOME": str(ctx.settings.home),
        "FARM_DATABASE_URL": ctx.settings.effective_database_url,
        "FARM_BROKER_URL": "redis://127.0.0.1:1/0",  # not embedded; never used
        "FARM_WEBHOOK_SECRET": SECRET,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), obj=ctx.dispatch)

    return run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def batch_jobs(ctx: Context, name: str) -> list[Job]:
    with ctx.session() as s:
        batch = queries.get_batch_by_name(s, name)
        return [] if batch is None else list(queries.batch_jobs(s, batch.id))


def queued(ctx: Context) -> list[str]:
    messages = ctx.dispatch.messages  # type: ignore[attr-defined]
    return [m.args[0] for m in messages if m.task == pipeline.PREPARE.task and m.bulk]


GREETING = "Hello {first_name}! Your order {order} ships to {city} today."
SPOKEN = (
    '<speak>A word for <emphasis>{first_name}</emphasis>.<break time="400ms"/> From {city}.</speak>'
)
BAD = (
    "template,first_name,order,city,output\n"
    "greet.txt,Ann,1042,Paris,ann.mp4\n"  # line 2: fine
    "greet.txt,Bob,,Rome,bob.mp4\n"  # line 3: order missing
    "greet.txt,Cy,7,,cy.mp4\n"  # line 4: city missing
    "spoken.xml,Dee,9,Oslo,dee.mp4\n"  # line 5: order unused by this template
    "greet.txt,Eve,8,Nice,eve.mp4\n"  # line 6: fine
)
GOOD = (
    "template,first_name,order,city,output\n"
    "greet.txt,Ann,1042,Paris,ann.mp4\n"
    "greet.txt,Bob,77,Rome,bob.mp4\n"
    'spoken.xml,"<break time=""9s""/> & Co",,Oslo,dee.mp4\n'  # markup in a value
)


def test_a_templated_batch_is_checked_row_by_row_then_submitted_once(
    ctx: Context, farm: Any, tmp_path: Path
) -> None:
    write(tmp_path / "greet.txt", GREETING)
    write(tmp_path / "spoken.xml", SPOKEN)
    manifest = write(tmp_path / "m.csv", BAD)

    refused = farm("batch", "submit", str(manifest), "--name", "t1")
    assert refused.exit_code == 1, refused.output
    lines = refused.stderr.splitlines()
    assert [ln.split(": ", 2)[1] for ln in lines[:-1]] == ["line 3", "line 4", "line 5"]
    assert lines[0].endswith(
        "template greet.txt: missing variable(s) order (no column, or an empty cell)"
    )
    assert "missing variable(s) city" in lines[1]
    assert lines[2].endswith("template spoken.xml: unused column(s) order (not in the template)")
    assert (
        lines[-1].startswith("farm: error: 3 invalid row(s)") and "nothing submitted" in lines[-1]
    )
    assert batch_jobs(ctx, "t1") == [] and queued(ctx) == []
    with ctx.session() as s:
        assert queries.get_batch_by_name(s, "t1") is None

    write(manifest, GOOD)
    first = farm("batch", "submit", str(manifest), "--name", "t1")
    assert first.exit_code == 0, first.output
    assert "3 job(s) submitted, 0 already submitted" in first.stdout
    made = {j.batch_row: j for j in batch_jobs(ctx, "t1")}
    assert sorted(made) == ["line 2", "line 3", "line 4"]
    assert made["line 2"].script == "Hello Ann! Your order 1042 ships to Paris today."
    assert made["line 3"].script == "Hello Bob! Your order 77 ships to Rome today."
    assert made["line 4"].script == (
        "<speak>A word for <emphasis>&lt;break time=&quot;9s&quot;/&gt; &amp; Co</emphasis>."
        '<break time="400ms"/> From Oslo.</speak>'
    )
    assert len({j.idempotency_key for j in made.values()}) == 3
    assert all(j.priority == batches.BULK_PRIORITY for j in made.values())
    assert sorted(queued(ctx)) == sorted(j.id for j in made.values())

    # The same manifest again: nothing new, nothing queued.
    again = farm("batch", "submit", str(manifest), "--name", "t1")
    assert again.exit_code == 0, again.output
    assert "0 job(s) submitted, 3 already submitted" in again.stdout
    assert len(batch_jobs(ctx, "t1")) == 3 and len(queued(ctx)) == 3

    # Bob's order changes: a new job (under a new output: bob.mp4 is his first job's);
    # the other rows are the jobs they were.
    write(manifest, GOOD.replace("Bob,77,Rome,bob.mp4", "Bob,78,Rome,bob2.mp4"))
    changed = farm("batch", "submit", str(manifest), "--name", "t1")
    assert changed.exit_code == 0, changed.output
    assert "1 job(s) submitted, 2 already submitted" in changed.stdout
    assert len(batch_jobs(ctx, "t1")) == 4

    # prepare speaks the markup value as words, with the template's one break.
    run_stages(ctx, until=pipeline.TTS)
    dee = made["line 4"].id
    with ctx.session() as s:
        job = queries.get_job(s, dee)
        assert job.state == states.SPEAKING
        segments = s.query(Segment).filter_by(job_id=dee).order_by(Segment.idx).all()
    assert [seg.pause_after_ms for seg in segments] == [400, 0]
    words = markup.speech_of(segments[0].text)[0]
    assert words.startswith("A word for <break") and "& Co" in words


def test_a_default_template_from_the_command_line(ctx: Context, farm: Any, tmp_path: Path) -> None:
    template = write(tmp_path / "elsewhere" / "t.txt", "Welcome aboard, {name}.")
    manifest = write(tmp_path / "in" / "people.csv", "name,output\nAnn,ann.mp4\nBob,bob.mp4\n")
    done = farm("batch", "submit", str(manifest), "--name", "t2", "--template", str(template))
    assert done.exit_code == 0, done.output
    assert sorted(j.script for j in batch_jobs(ctx, "t2")) == [
        "Welcome aboard, Ann.",
        "Welcome aboard, Bob.",
    ]
    # A template that does not parse: one line, exit 1, nothing submitted.
    write(template, "Welcome aboard,\n{name.__class__}.")
    broken = farm("batch", "submit", str(manifest), "--name", "t3", "--template", str(template))
    assert broken.exit_code == 1
    assert broken.stderr.strip().splitlines() == [
        f"farm: error: template {template}, line 2: bad field {{name.__class__}}: a field is "
        "{name} (letters, digits and _, starting with a letter)"
    ]
    assert batch_jobs(ctx, "t3") == []
