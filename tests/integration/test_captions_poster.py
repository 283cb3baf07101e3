"""A job's captions, poster and preview (farm/extras.py, farm/captions.py), made by the
real stages run in process (tests/pipeline.py) with the null renderer (flat grey frames,
a level per frame index): what lands in the store, where status, the webhook payload and
the batch report point, what `--captions burn` draws, and bad input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import srt
import webvtt
from click.testing import CliRunner
from PIL import Image

from farm import batches, captions, extras, jobs, pipeline, queries, states, webhooks
from farm.context import Context
from farm.errors import InvalidInput
from farm.output import OutputSpec
from farm.stores import job_key
from tests.conftest import job_rows
from tests.pipeline import rendered_job, run_stages, stored
from tests.probe import probe
from workers import stages

SCRIPT = "One sentence to speak, with a clause. And another one after it, to be captioned."
FPS = 25


def request(**changes: object) -> jobs.JobRequest:
    values: dict = dict(
        script=SCRIPT,
        avatar="demo",
        voice="espeak",
        fps=FPS,
        size=(160, 96),
        chunk_frames=50,
        renderer="null",
        seed=3,
    )
    spec = {k: changes.pop(k) for k in ("captions", "poster_at") if k in changes}
    return jobs.JobRequest(**{**values, **changes}, output=OutputSpec(**spec))


def run(ctx: Context, **changes: object):
    return rendered_job(ctx, request(**changes))


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_job_delivers_captions_poster_and_preview(db_ctx: Context, monkeypatch):
    job = run(db_ctx)
    words = json.loads(stored(db_ctx, job_key(job.id, extras.WORDS)).read_text())
    assert [w["text"] for w in words] == SCRIPT.split()

    # SRT and WebVTT, read back by independent parsers; each cue starts on its first
    # word, within a frame, and shows until its last word ends
    cues = list(srt.parse(stored(db_ctx, job_key(job.id, extras.CAPTIONS_SRT)).read_text()))
    vtt = webvtt.read(str(stored(db_ctx, job_key(job.id, extras.CAPTIONS_VTT))))
    assert len(cues) == len(vtt.captions) >= 2
    k = 0
    for cue in cues:
        n = len(cue.content.split())
        mine = words[k : k + n]
        assert cue.content.split() == [w["text"] for w in mine]
        assert abs(cue.start.total_seconds() - mine[0]["start"]) <= 1 / FPS
        assert cue.end.total_seconds() >= mine[-1]["end"] - 1 / FPS
        assert all(len(line) <= 42 for line in cue.content.split("\n"))
        k += n
    assert k == len(words)

    # the poster: a JPEG at the output size, of the frame after 1 s (the null plan's
    # eyes are open); the preview: an animated WebP no wider than the video
    with Image.open(stored(db_ctx, job_key(job.id, extras.POSTER))) as poster:
        assert poster.format == "JPEG" and poster.size == (160, 96)
        poster.load()
    with Image.open(stored(db_ctx, job_key(job.id, extras.PREVIEW))) as preview:
        assert preview.format == "WEBP" and preview.is_animated and preview.n_frames >= 20
        assert preview.size[0] == 160

    # where they are announced: the webhook payload, the batch report, `farm status`
    keys = extras.artifact_keys(job)
    data = webhooks.job_event_data(db_ctx, job)
    for name, key in keys.items():
        url = data[f"{name}_url"]
        assert url.startswith("file://") and url.endswith(key)
    entry = batches._job_entry(db_ctx, "none", job)
    assert entry["poster_url"] == db_ctx.store.url(keys["poster"])
    csv_text = batches.report_csv({"jobs": [entry], "invalid_rows": []})
    assert "captions_srt_url" in csv_text.splitlines()[0]

    from farm import cli

    monkeypatch.setenv("FARM_HOME", str(db_ctx.settings.home))
    out = CliRunner().invoke(cli.main, ["status", job.id]).output
    for key in keys.values():
        assert db_ctx.store.url(key) in out

    # captions off: no caption files, no caption URLs; the poster and preview stay
    off = run(db_ctx, captions="off", poster_at=0.5)
    assert not stored(db_ctx, job_key(off.id, extras.CAPTIONS_SRT)).exists()
    assert webhooks.job_event_data(db_ctx, off)["captions_srt_url"] is None
    assert stored(db_ctx, job_key(off.id, extras.POSTER)).is_file()


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_burnt_captions_draw_at_the_bottom_only_while_a_cue_shows(db_ctx: Context):
    plain = run(db_ctx)
    burnt = run(db_ctx, captions="burn")
    a = probe(stored(db_ctx, plain.output_key)).frames.astype(np.int16)
    b = probe(stored(db_ctx, burnt.output_key)).frames.astype(np.int16)
    assert a.shape == b.shape
    cues = list(srt.parse(stored(db_ctx, job_key(burnt.id, extras.CAPTIONS_SRT)).read_text()))
    shown = np.zeros(len(a), bool)
    for cue in cues:
        lo = int(np.ceil(cue.start.total_seconds() * FPS)) + 1
        hi = int(cue.end.total_seconds() * FPS) - 1
        shown[lo:hi] = True
    edges = np.zeros(len(a), bool)  # frames at a cue's edge: either way is right
    for cue in cues:
        for t in (cue.start.total_seconds(), cue.end.total_seconds()):
            f = int(round(t * FPS))
            edges[max(f - 2, 0) : f + 3] = True
    diff = np.abs(a - b)
    h = a.shape[1]
    bottom = diff[:, int(h * 0.6) :].reshape(len(a), -1)
    top = diff[:, : int(h * 0.4)].reshape(len(a), -1)
    assert shown.sum() > 10 and (~shown & ~edges).sum() > 5
    assert (bottom[shown].max(axis=1) > 100).all()  # white text on grey, in every frame
    assert top.max() <= 8  # the face area is untouched (codec noise only)
    assert bottom[~shown & ~edges].max() <= 8  # no cue shown: the same picture


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_burnt_captions_fit_the_width_of_a_tall_video(db_ctx: Context):
    # 180x320 (9:16): at 5.5% of the height the longest line would be about twice as wide
    # as the frame; the size follows the widest line, so the side margins stay clear
    plain = run(db_ctx, size=(180, 320), captions="off")
    burnt = run(db_ctx, size=(180, 320), captions="burn")
    a = probe(stored(db_ctx, plain.output_key)).frames.astype(np.int16)
    b = probe(stored(db_ctx, burnt.output_key)).frames.astype(np.int16)
    diff = np.abs(a - b).max(axis=3)  # (frames, h, w)
    drawn = diff > 100
    assert drawn[:, int(320 * 0.6) :].any(axis=(1, 2)).sum() > 10  # captions were drawn
    columns = np.flatnonzero(drawn.any(axis=(0, 1)))
    side = round(180 * captions.SIDE_OF_WIDTH)
    assert columns.min() >= side - 2 and columns.max() <= 180 - side + 1, columns


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_bad_delivery_options_are_refused_with_nothing_left(db_ctx: Context):
    home = db_ctx.settings.home
    for changes in (
        {"poster_at": -1.0},
        {"poster_at": float("nan")},
        {"poster_at": float("inf")},
        {"captions": "sideways"},
    ):
        with pytest.raises(InvalidInput):
            jobs.submit(db_ctx, request(**changes))
    # an audio job's length is known at submission: a poster past it is refused there
    from farm import audio as audio_input

    wav = audio_input.to_wav(np.zeros(audio_input.SAMPLE_RATE * 2, np.int16))
    with pytest.raises(InvalidInput, match="beyond the video"):
        jobs.submit(db_ctx, request(script="", audio_wav=wav, poster_at=2.5))
    assert job_rows(home) == 0
    assert not list((home / "artifacts").rglob("*.*")) if (home / "artifacts").exists() else True

    # a script's length is known once spoken: the plan fails the job before any render
    # (the driver raises what a worker would record with stages.failed)
    job_id = jobs.submit(db_ctx, request(poster_at=60.0))
    with pytest.raises(InvalidInput, match="beyond the video") as refused:
        run_stages(db_ctx)
    stages.failed(db_ctx, pipeline.PLAN.task, (job_id,), refused.value)
    with db_ctx.session() as s:
        job = queries.get_job(s, job_id)
    assert job.state == states.FAILED and "beyond the video" in (job.error or "")
    assert job.chunks_total == 0 and job.output_key is None
    assert not db_ctx.store.exists(job_key(job_id, "plan.npz"))  # nothing rendered


@pytest.mark.parametrize(
    "args, message",
    [
        (["--poster-at", "-1"], "--poster-at must be a time"),
        (["--poster-at", "nan"], "--poster-at must be a time"),
        (["--captions", "sideways"], "sideways"),
    ],
)
def test_the_cli_refuses_bad_delivery_options(tmp_path, monkeypatch, args, message):
    from farm import cli

    home = tmp_path / "home"
    monkeypatch.setenv("FARM_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["submit", "-", *args], input="Hello there.\n")
    assert result.exit_code != 0 and message in result.output
    assert job_rows(home) == 0
    assert not (home / "artifacts").exists() or not any((home / "artifacts").rglob("*.*"))
