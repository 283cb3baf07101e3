"""Output formats, alpha and drafts (farm/output.py, farm/media.py, workers/stages.py
`join`): real jobs run in process (tests/pipeline.py) with the null renderer, and the
media layer fed RGBA frames directly. Every output is checked by decoding it with
ffmpeg's own command line or PyAV (tests/probe.py), not by farm's bookkeeping."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy.exc import IntegrityError

from farm import batches, extras, jobs, queries, states
from farm.context import Context
from farm.errors import InvalidInput
from farm.manifest import Defaults
from farm.media import FrameEncoder, VideoFormat, decode_argv, ffmpeg_exe, join_and_encode
from farm.output import OutputSpec, build
from farm.stores import job_key
from tests.conftest import job_rows
from tests.pipeline import rendered_job, run_stages, stored
from tests.probe import probe

SCRIPT = "Hello there, one short line."
FPS = 10
# codec and the pixel format ffmpeg reports (ProRes 4444 is encoded from yuva444p10le;
# ffmpeg's ProRes decoder reports the 4444 profile's planes as yuva444p12le)
EXPECTED = {
    "mp4": ("h264", ("yuv420p",), "aac"),
    "webm": ("vp9", ("yuv420p",), "opus"),
    "webm-alpha": ("vp9", ("yuva420p",), "opus"),
    "mov-prores": ("prores", ("yuva444p10le", "yuva444p12le"), "pcm_s16le"),
}


def stream_info(path: Path) -> tuple[str, str]:
    """(video codec, pixel format) as ffmpeg reports them, reading VP9's alpha plane
    (only libvpx-vp9 decodes it, and only when named before -i)."""
    pre = ["-c:v", "libvpx-vp9"] if path.suffix == ".webm" else []
    err = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", *pre, "-i", str(path)], capture_output=True, text=True
    ).stderr
    m = re.search(r"Video: (\w+).*?, (\w+)\(", err)
    assert m, err
    return m.group(1), m.group(2)


def rgba_frames(path: Path, w: int, h: int) -> np.ndarray:
    pre = ["-c:v", "libvpx-vp9"] if path.suffix == ".webm" else []
    argv = [ffmpeg_exe(), "-loglevel", "error", *pre, "-i", str(path)]
    raw = subprocess.run(
        [*argv, "-f", "rawvideo", "-pix_fmt", "rgba", "-"], capture_output=True, check=True
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 4)


def request(spec: OutputSpec | None = None, **changes: object) -> jobs.JobRequest:
    values: dict = dict(
        script=SCRIPT,
        avatar="demo",
        voice="espeak",
        fps=FPS,
        size=(96, 64),
        chunk_frames=10,
        renderer="null",
        seed=3,
        output=spec or OutputSpec(),
    )
    return jobs.JobRequest(**{**values, **changes})


def run(ctx: Context, spec: OutputSpec | None = None, **changes: object):
    return rendered_job(ctx, request(spec, **changes))


# --- the media layer: RGBA chunks, alpha delivered --------------------------------------


def _rgba(n: int, w: int, h: int) -> np.ndarray:
    frames = np.zeros((n, h, w, 4), np.uint8)
    frames[..., 0] = (np.arange(w) * 255 // w)[None, None, :]
    frames[..., 1] = (np.arange(n) * 20 % 256)[:, None, None]
    frames[..., 2] = 90
    frames[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 3] = 255  # the "person"
    return frames


def test_alpha_chunks_are_lossless_rgba_and_alpha_reaches_the_delivery(tmp_path):
    w, h, n = 96, 64, 24
    frames = _rgba(n, w, h)
    fmt = VideoFormat.chunk(w, h, FPS, "libx264", alpha=True)
    assert fmt.alpha and fmt.codec == "ffv1" and fmt.lossless
    parts = []
    for i in range(2):  # a name that says .mp4 still gets Matroska: B names its files
        part = tmp_path / f"{i:05d}.mp4"
        enc = FrameEncoder(part, fmt, n // 2)
        enc.write(frames[i * n // 2 : (i + 1) * n // 2])
        enc.close()
        parts.append(part)
    raw = subprocess.run(decode_argv(ffmpeg_exe(), parts[1], True), capture_output=True).stdout
    back = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 4)
    assert np.array_equal(back, frames[n // 2 :])  # every byte, alpha included
    with pytest.raises(Exception, match="does not match"):  # RGB frames for an RGBA chunk
        FrameEncoder(tmp_path / "x.mkv", fmt, 1).write(frames[:1, ..., :3])

    audio = tmp_path / "a.wav"
    subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=2.4:r=16000"]
        + ["-y", str(audio)],
        check=True,
    )
    mask = frames[..., 3] > 0
    for target, suffix in (("webm-alpha", ".webm"), ("mov-prores", ".mov")):
        out = tmp_path / f"out{suffix}"
        join_and_encode(parts, audio, out, VideoFormat.delivery(w, h, FPS, target=target))
        codec, pix = stream_info(out)
        assert (codec, pix) in [(EXPECTED[target][0], p) for p in EXPECTED[target][1]]
        alpha = rgba_frames(out, w, h)[..., 3]
        assert alpha.shape == mask.shape
        # transparent where alpha was 0, opaque where it was 255 (away from the edges,
        # which 4:2:0 and VP9's lossy alpha soften)
        inner = np.zeros_like(mask)
        inner[:, h // 4 + 3 : 3 * h // 4 - 3, w // 4 + 3 : 3 * w // 4 - 3] = True
        outer = np.ones_like(mask)
        outer[:, h // 4 - 3 : 3 * h // 4 + 3, w // 4 - 3 : 3 * w // 4 + 3] = False
        assert alpha[outer].max() <= 4, target
        assert alpha[inner].min() >= 250, target


def test_a_draft_delivery_draws_the_watermark_on_top_only(tmp_path):
    from farm.media import caption_font

    w, h, n = 192, 128, 10
    level = np.full((n, h, w, 3), 120, np.uint8)
    part = tmp_path / "0.mp4"
    enc = FrameEncoder(part, VideoFormat.chunk(w, h, FPS), n)
    enc.write(level)
    enc.close()
    audio = tmp_path / "a.wav"
    subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=1:r=16000"]
        + ["-y", str(audio)],
        check=True,
    )
    outs = {}
    for draft in (False, True):
        fmt = VideoFormat.delivery(w, h, FPS, draft=draft)
        if draft:
            from dataclasses import replace

            fmt = replace(fmt, fontsdir=caption_font())
        outs[draft] = tmp_path / f"{draft}.mp4"
        join_and_encode([part], audio, outs[draft], fmt)
    plain = probe(outs[False]).frames.astype(int)
    marked = probe(outs[True]).frames.astype(int)
    assert np.abs(plain - 120).max() <= 6
    top = np.abs(marked[:, : h // 4] - 120).reshape(n, -1)
    assert ((top > 80).sum(axis=1) > 100).all()  # white letters, dark outline
    assert np.abs(marked[:, h // 2 :] - 120).max() <= 6  # the rest untouched


# --- whole jobs -------------------------------------------------------------------------


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_every_format_delivers_its_codec_frames_audio_poster_and_preview(db_ctx: Context):
    for fmt in EXPECTED:
        job = run(db_ctx, build(format=fmt))
        suffix = OutputSpec(format=fmt).suffix
        assert job.output_key == job_key(job.id, "final" + suffix)
        path = stored(db_ctx, job.output_key)
        codec, pix = stream_info(path)
        assert codec == EXPECTED[fmt][0] and pix in EXPECTED[fmt][1], (fmt, codec, pix)
        p = probe(path)
        assert (p.width, p.height) == (96, 64) and p.fps == FPS
        assert p.frame_count == job.frame_count == round(job.audio_seconds * FPS + 0.49)
        assert p.audio_codec == EXPECTED[fmt][2]
        assert abs(p.audio_seconds - job.audio_seconds) < 0.1
        levels = p.frames[:, 32, 48, 1].astype(int)  # the null renderer's level per frame
        assert abs(levels[5] - 35) <= 4 and abs(levels[20] - 140) <= 4, fmt
        with Image.open(stored(db_ctx, job_key(job.id, extras.POSTER))) as poster:
            assert poster.format == "JPEG" and poster.size == (96, 64)
        with Image.open(stored(db_ctx, job_key(job.id, extras.PREVIEW))) as preview:
            assert preview.format == "WEBP" and preview.n_frames >= 10


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_draft_is_smaller_slower_and_marked(db_ctx: Context, monkeypatch):
    final = run(db_ctx, size=(192, 128), fps=20)
    draft = run(db_ctx, build(draft=True, format="webm"), size=(192, 128), fps=20)
    assert (draft.width, draft.height, draft.fps) == (96, 64, 10)
    from farm import cli

    monkeypatch.setenv("FARM_HOME", str(db_ctx.settings.home))
    shown = CliRunner().invoke(cli.main, ["status", draft.id]).output
    assert "delivers  webm, draft" in shown and "96x64@10" in shown
    a, b = probe(stored(db_ctx, final.output_key)), probe(stored(db_ctx, draft.output_key))
    assert (a.width, a.height, a.fps) == (192, 128, 20)
    assert (b.width, b.height, b.fps) == (96, 64, 10)
    assert abs(a.frame_count / a.fps - b.frame_count / b.fps) < 0.15  # as long, fewer frames
    # the null renderer's frames are flat: only the watermark differs from the level
    frames = b.frames.astype(int)
    levels = frames[:, -4:-3, 4:5]  # (n, 1, 1, 3): a corner far from the watermark
    top = np.abs(frames[:, : 64 // 4] - levels).reshape(len(frames), -1)
    assert (top > 80).sum(axis=1).min() > 20
    plain = np.abs(a.frames.astype(int)[:, : 128 // 4] - a.frames[:, -4:-3, 4:5].astype(int))
    assert plain.max() <= 8


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_batch_with_mixed_formats_then_its_draft(db_ctx: Context, tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "rows.csv").write_text(
        "text,format,draft,output\n"
        '"One line, in mp4.",mp4,,\n'
        '"Another line, in webm.",webm,,\n'
        '"A third, for an editor.",mov-prores,,editor/third.mov\n'
        '"A fourth, transparent.",webm-alpha,yes,\n'
    )
    options = batches.Options(fps=FPS, size=(96, 64), chunk_frames=10, seed=1)
    checked = batches.load(db_ctx, "mixed", folder / "rows.csv", options)
    assert not checked.problems, checked.problems
    result = batches.submit(db_ctx, "mixed", checked, options)
    assert len(result.created) == 4
    run_stages(db_ctx)
    got = {}
    for job_id in result.created:
        with db_ctx.session() as s:
            job = queries.get_job(s, job_id)
        assert job.state == states.SUCCEEDED, job.error
        assert job.output_key.endswith(job.target_key.rsplit(".", 1)[-1])
        got[job.output_key.rsplit("/", 1)[-1]] = stream_info(stored(db_ctx, job.output_key))
        spec = OutputSpec.from_json(job.delivery)
        assert job.output_key.endswith(spec.suffix)
        if spec.draft:
            assert (job.width, job.height) == (48, 32)
    assert got["third.mov"][0] == "prores"
    assert sorted(v[0] for v in got.values()) == ["h264", "prores", "vp9", "vp9"]
    assert ("vp9", "yuva420p") in got.values()

    # the same rows again: nothing new; as a draft (batch --draft): every row is new
    again = batches.submit(db_ctx, "mixed", checked, options)
    assert again.created == [] and again.existing == 4
    drafts = batches.Options(
        fps=FPS, size=(96, 64), chunk_frames=10, seed=1, defaults=Defaults(spec=build(draft=True))
    )
    checked = batches.load(db_ctx, "mixed-draft", folder / "rows.csv", drafts)
    assert len(batches.submit(db_ctx, "mixed-draft", checked, drafts).created) == 4


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_batch_is_drafted_reviewed_and_rendered_for_real_under_one_name(
    db_ctx: Context, tmp_path: Path
):
    (tmp_path / "rows.csv").write_text(
        'text,output\n"A first line.",one.mp4\n"A second.",two.mp4\n'
    )
    final = batches.Options(fps=FPS, size=(96, 64), chunk_frames=10, seed=1)
    draft = dataclasses.replace(final, defaults=Defaults(spec=build(draft=True)))

    def submit(options: batches.Options) -> list[str]:
        checked = batches.load(db_ctx, "launch", tmp_path / "rows.csv", options)
        assert not checked.problems, checked.problems
        return batches.submit(db_ctx, "launch", checked, options).created

    drafted = submit(draft)
    run_stages(db_ctx)
    assert len(drafted) == 2 and submit(draft) == []  # a draft again: nothing new
    real = submit(final)  # the same rows for real: new jobs, their own outputs
    run_stages(db_ctx)
    assert len(real) == 2 and submit(final) == []
    report = {(e["output"], e["state"]) for e in batches.report(db_ctx, "launch")["jobs"]}
    assert report == {
        ("drafts/one.mp4", "succeeded"),
        ("drafts/two.mp4", "succeeded"),
        ("one.mp4", "succeeded"),
        ("two.mp4", "succeeded"),
    }
    sizes = {}
    for job_id in drafted + real:
        with db_ctx.session() as s:
            job = queries.get_job(s, job_id)
        sizes[job.output_key] = probe(stored(db_ctx, job.output_key))
    assert {(p.width, p.height) for k, p in sizes.items() if "/drafts/" in k} == {(48, 32)}
    assert {(p.width, p.height) for k, p in sizes.items() if "/outputs/" in k} == {(96, 64)}


# --- refused at submission, nothing left behind ---------------------------------------


def test_the_cli_refuses_bad_combinations_with_nothing_left(tmp_path, monkeypatch):
    from farm import cli

    home = tmp_path / "home"
    monkeypatch.setenv("FARM_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    cases = [
        (["--format", "webm-alpha", "--background", "white"], "transparent"),
        (["--format", "mov-prores", "--background", "ok.png"], "transparent"),
        (["--format", "webm-alpha", "--captions", "burn"], "captions burn"),
        (["--background", "purpel"], "unknown colour"),
        (["--background", "bad.png"], "does not decode"),
        (["--background", "missing.jpg"], "no such background file"),
        (["--aspect", "16:9", "--size", "640x480"], "is not 16:9"),
        (["--fit", "cover"], "--fit needs --aspect"),
        (["--format", "webm", "--wait", "-o", "out.mp4"], "must end with .webm"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli.main, ["submit", "-", *args], input="Hello there.\n")
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.output)
    # batch defaults and manifest rows, refused the same way before anything exists
    (tmp_path / "rows.csv").write_text("text,background\nHi there.,ok.png\nAnd you.,bad.png\n")
    batch_cases = [
        (["--format", "webm-alpha", "--background", "red"], "transparent"),
        (["--draft", "--format", "mov-prores", "--captions", "burn"], "captions burn"),
        ([], "1 invalid row(s)"),
    ]
    for args, message in batch_cases:
        argv = ["batch", "submit", "rows.csv", "--name", "b", *args]
        result = CliRunner().invoke(cli.main, argv)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output.strip().splitlines()[-1], (args, result.output)
    assert job_rows(home) == 0
    artifacts = home / "artifacts"
    assert not artifacts.exists() or not [p for p in artifacts.rglob("*") if p.is_file()]


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_background_file_goes_with_the_job_or_not_at_all(db_ctx: Context, tmp_path: Path):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "sky.png")
    spec = build(background=str(tmp_path / "sky.png"))
    job_id = jobs.submit(db_ctx, request(spec), idempotency_key="k1")
    with db_ctx.session() as s:
        stored_spec = OutputSpec.from_json(queries.get_job(s, job_id).delivery)
    assert stored_spec.background is not None
    assert stored_spec.background.key == job_key(job_id, "background.png")
    assert db_ctx.store.exists(stored_spec.background.key)
    # a second job on the same key is refused by the database after its upload: the
    # upload is removed again, the first job's stays
    with pytest.raises(IntegrityError):
        jobs.submit(db_ctx, request(spec), idempotency_key="k1")
    backgrounds = [p for p in (db_ctx.settings.home / "artifacts").rglob("background*")]
    assert backgrounds == [stored(db_ctx, stored_spec.background.key)]
    # cancel removes it with the job
    jobs.cancel(db_ctx, job_id)
    assert not db_ctx.store.exists(stored_spec.background.key)
    with pytest.raises(InvalidInput, match="transparent"):
        jobs.submit(db_ctx, request(OutputSpec(format="webm-alpha", background=spec.background)))


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_batch_row_background_file_is_uploaded_per_job(db_ctx: Context, tmp_path: Path):
    folder = tmp_path / "m"
    (folder / "art").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(folder / "art" / "bg.jpg")
    (folder / "rows.jsonl").write_text(
        '{"text": "One.", "background": "art/bg.jpg"}\n'
        '{"text": "Two.", "background": "art/bg.jpg", "aspect": "9:16"}\n'
        '{"text": "Three."}\n'
    )
    options = batches.Options(
        fps=FPS, size=(128, 128), chunk_frames=10, defaults=Defaults(spec=build(background="teal"))
    )
    checked = batches.load(db_ctx, "bg", folder / "rows.jsonl", options)
    assert not checked.problems, checked.problems
    created = batches.submit(db_ctx, "bg", checked, options).created
    specs = {}
    for job_id in created:
        with db_ctx.session() as s:
            job = queries.get_job(s, job_id)
        specs[job.batch_row] = (OutputSpec.from_json(job.delivery), job.width, job.height)
    one, two, three = (specs[f"line {i}"] for i in (1, 2, 3))
    assert one[0].background.kind == "image" and (one[1], one[2]) == (128, 128)
    assert two[0].background.key != one[0].background.key  # one copy per job
    assert (two[1], two[2]) == (128, 228) and two[0].aspect == "9:16"
    for spec, _, _ in (one, two):
        assert db_ctx.store.get_bytes(spec.background.key) == (folder / "art/bg.jpg").read_bytes()
    assert three[0].background == build(background="teal").background


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_webm_alpha_end_to_end_is_transparent_where_the_background_was(db_ctx: Context):
    """The portrait renderer's whole photo through the compositor (engineer B's, which
    hands RGBA chunks over for alpha formats), delivered as VP9 with alpha."""
    from tests.composed import add_avatar, find_face, run_job

    add_avatar(db_ctx)
    job, path = run_job(db_ctx, (180, 180), aspect="9:16", fit="contain", format="webm-alpha")
    assert path.suffix == ".webm"
    assert stream_info(path) == ("vp9", "yuva420p")
    frames = rgba_frames(path, 180, 320)
    assert len(frames) == job.frame_count
    alpha = frames[0, ..., 3].astype(int)
    # the letterbox bars above and below the placed photo are background: transparent
    assert alpha[:10].max() <= 2 and alpha[-10:].max() <= 2
    face = find_face(frames[0, ..., :3].copy())
    assert face is not None
    cx, cy = face.mean(axis=0).round().astype(int)
    assert alpha[cy - 5 : cy + 5, cx - 5 : cx + 5].min() >= 250  # the person: opaque
