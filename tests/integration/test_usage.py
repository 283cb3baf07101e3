"""`farm usage` (farm/usage.py): the figures equal what was rendered, measured on the
rows and on the MP4s themselves, on SQLite and real Postgres; the CLI's csv and json
parse; a bad --since is one line. Two tiny jobs (espeak, null renderer, 64 px, 10 fps)
run through the real stages in process."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from farm import cli, jobs, queries, states, usage
from farm.config import Settings
from farm.context import Context
from farm.db import Chunk, Job, utcnow
from farm.dispatch import InMemoryDispatcher
from farm.errors import InvalidInput
from tests.pipeline import run_stages
from tests.probe import probe

SCRIPTS = ("Hello there.", "A second job, a little longer than the first one.")


def request(script: str) -> jobs.JobRequest:
    return jobs.JobRequest(
        script=script,
        avatar="demo",
        voice="espeak",
        fps=10,
        size=(64, 64),
        chunk_frames=8,
        seed=1,
        renderer="null",
    )


def render_two(ctx: Context) -> list[Job]:
    ids = [jobs.submit(ctx, request(script)) for script in SCRIPTS]
    run_stages(ctx)
    with ctx.session() as s:
        done = [queries.get_job(s, job_id) for job_id in ids]
    assert [j.state for j in done] == [states.SUCCEEDED] * 2, [j.error for j in done]
    return done


def test_usage_figures_equal_what_was_rendered(db_ctx: Context):
    ctx = Context(dataclasses.replace(db_ctx.settings, keep_intermediates=True), db_ctx.dispatch)
    done = render_two(ctx)
    failed = jobs.submit(ctx, request("Never rendered."))
    jobs.fail(ctx, failed, "test")
    videos = [probe(ctx.settings.home / "artifacts" / j.output_key) for j in done]
    with ctx.session() as s:
        chunks = list(s.scalars(sa.select(Chunk)))
    assert {c.device for c in chunks} == {"cpu"}  # the null renderer's path

    (total,) = usage.report(ctx, None, None)
    assert (total["jobs"], total["succeeded"], total["failed"], total["active"]) == (3, 2, 1, 0)
    # Frames: every frame of both MP4s, as decoded.
    assert total["frames"] == sum(v.frame_count for v in videos) == sum(j.frame_count for j in done)
    # Audio seconds: the jobs' timelines; each MP4's audio is that long (AAC padding aside).
    assert total["audio_seconds"] == pytest.approx(sum(j.audio_seconds for j in done), abs=1e-3)
    for job, video in zip(done, videos, strict=True):
        assert video.audio_seconds == pytest.approx(job.audio_seconds, abs=0.05)
    assert total["render_seconds_cpu"] == pytest.approx(
        sum(c.render_seconds for c in chunks), abs=1e-3
    )
    assert total["render_seconds_cpu"] > 0
    assert total["render_seconds_cuda"] == total["render_seconds_tensorrt"] == 0
    stored = sum(ctx.store.size(k) for j in done for k in ctx.store.list(f"jobs/{j.id}"))
    assert total["bytes_stored"] == stored > 0

    # Grouped: by avatar and day every job is in one group; by worker, chunk figures only.
    (by_avatar, avatar_total) = usage.report(ctx, None, "avatar")
    assert by_avatar["group"] == "demo" and avatar_total["group"] == "total"
    assert {k: by_avatar[k] for k in total if k != "group"} == {
        k: total[k] for k in total if k != "group"
    }
    (day, _) = usage.report(ctx, None, "day")
    assert day["group"] == f"{utcnow():%Y-%m-%d}" and day["frames"] == total["frames"]
    workers = usage.report(ctx, None, "worker")
    assert "jobs" not in workers[0] and workers[-1]["frames"] == total["frames"]
    (batch, _) = usage.report(ctx, None, "batch")
    assert batch["group"] == "-" and batch["jobs"] == 3

    # --since counts only jobs created from then: one made "yesterday" drops out.
    with ctx.session() as s:
        s.execute(
            sa.update(Job)
            .where(Job.id == done[0].id)
            .values(created_at=utcnow() - timedelta(days=2))
        )
    since = usage.parse_since(f"{utcnow() - timedelta(days=1):%Y-%m-%d}")
    (recent,) = usage.report(ctx, since, None)
    assert (recent["jobs"], recent["frames"]) == (2, done[1].frame_count)


def test_since_must_be_a_date():
    assert usage.parse_since(None) is None
    assert usage.parse_since("2026-12-01").isoformat() == "2026-12-01T00:00:00+00:00"
    assert usage.parse_since("2026-12-01T08:30").hour == 8
    for bad in ("yesterday", "2026-13-01", "12/01/2026", "2026-12-01; drop table jobs"):
        with pytest.raises(InvalidInput, match="invalid --since"):
            usage.parse_since(bad)


def test_cli_formats_parse(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    for name in ("FARM_DATABASE_URL", "FARM_STORE_URL", "FARM_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    dispatcher = InMemoryDispatcher()
    runner = CliRunner()
    empty = runner.invoke(cli.main, ["usage"], obj=dispatcher)  # makes the schema too
    assert empty.exit_code == 0, empty.output
    ctx = Context(Settings.from_env(), dispatcher)
    done = render_two(ctx)
    frames = sum(j.frame_count for j in done)

    out = runner.invoke(cli.main, ["usage", "--format", "json", "--by", "avatar"], obj=dispatcher)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["by"] == "avatar" and [r["group"] for r in doc["rows"]] == ["demo", "total"]
    assert doc["rows"][-1]["frames"] == frames and doc["rows"][-1]["succeeded"] == 2

    out = runner.invoke(cli.main, ["usage", "--format", "csv", "--by", "day"], obj=dispatcher)
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert out.exit_code == 0 and [r["group"] for r in rows][-1] == "total"
    assert int(rows[-1]["frames"]) == frames and float(rows[-1]["audio_seconds"]) > 0

    table = runner.invoke(cli.main, ["usage", "--since", "2020-01-01"], obj=dispatcher)
    lines = table.output.splitlines()
    assert table.exit_code == 0 and lines[0].split()[:2] == ["jobs", "succeeded"]
    assert lines[1].split()[:3] == ["all", "2", "2"]

    bad = runner.invoke(cli.main, ["usage", "--since", "last week"], obj=dispatcher)
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "farm: error: invalid --since 'last week': use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
    ]
