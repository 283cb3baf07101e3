"""`farm bench`: stage figures from a worker-side process, then whole jobs end to end.

Medians over runs; the machine is shared and noisy, so ratios in one run matter more
than absolute times."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from farm import jobs, queries, states
from farm.context import Context
from farm.db import Job
from farm.errors import FarmError, InvalidInput, RetryableError

if TYPE_CHECKING:
    from farm.load import LoadResult

DEFAULT_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "bench.txt"


def stage_figures(
    script: Path,
    runs: int,
    sizes: str,
    threads: str,
    device: str,
    batch: str = "16",
    backend: list[str] | None = None,
    frames: int | None = None,
) -> dict:
    """Runs farm/bench_stages.py in a child process so this one never imports torch.
    `backend`: its arguments for a neural backend's figures instead (--renderer ...)."""
    extra = list(backend or []) + ([] if frames is None else ["--frames", str(frames)])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm.bench_stages",
            "--script",
            str(script),
            "--runs",
            str(runs),
            "--sizes",
            sizes,
            "--threads",
            threads,
            "--device",
            device,
            "--batch",
            batch,
            "--encoder",
            os.environ.get("FARM_VIDEO_ENCODER", "auto"),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        raise FarmError(f"stage benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def end_to_end(ctx: Context, script_text: str, runs: int) -> dict[str, float]:
    """Whole jobs through the running farm: wall time from submit to published."""
    ratios, walls, audio = [], [], 0.0
    for _ in range(runs):
        size = (ctx.settings.size, ctx.settings.size)
        req = jobs.JobRequest(
            script_text, "demo", "joe", ctx.settings.fps, size, ctx.settings.chunk_frames, seed=1
        )
        started = time.perf_counter()
        job = _run_job(ctx, req)
        wall = time.perf_counter() - started
        audio = job.audio_seconds or 0.0
        walls.append(wall)
        ratios.append(wall / audio)
    return {
        "audio_seconds": audio,
        "wall_seconds": statistics.median(walls),
        "wall_over_audio": statistics.median(ratios),
    }


def _run_job(ctx: Context, req: jobs.JobRequest, timeout: float = 600) -> Job:
    """Submit one job and wait until it has succeeded (FarmError otherwise)."""
    job_id = jobs.submit(ctx, req)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.find(ctx, job_id)
        if job.state in states.FINAL:
            if job.state != states.SUCCEEDED:
                raise FarmError(f"benchmark job {job_id} {job.state}: {job.error}")
            return job
        time.sleep(0.05)
    raise FarmError(f"benchmark job {job_id} did not finish in {timeout:.0f} s")


def format_backend(stages: dict) -> str:
    """`farm bench --renderer ditto|gaussiantalker`: one line per figure."""
    row = stages["backend"]
    lines = [f"{row['renderer']} on {row['device']} (batch {row['batch']}, {row['frames']} frames)"]
    lines.append(f"  plan      {row['plan_seconds_per_audio_second']:.3f} s per second of audio")
    for key, value in row.items():
        if key.startswith("render_fps"):
            lines.append(f"  render    {value:8.2f} fps  {key.removeprefix('render_fps ')}")
    memory = [f"peak RSS {row['peak_rss_mib']:.0f} MiB"]
    if "peak_gpu_mib" in row:
        memory.append(f"peak GPU {row['peak_gpu_mib']:.0f} MiB")
    lines.append("  memory    " + ", ".join(memory))
    if "machine" in stages:
        lines.append("Machine: " + "  ".join(f"{k} {v}" for k, v in stages["machine"].items()))
    return "\n".join(lines)


def format_report(stages: dict, e2e: dict | None) -> str:
    """Per stage: frames per second (video frames at 25 fps worth of work per second)
    and real-time factor (stage time / audio time covered; lower is faster)."""
    lines = ["Per stage: fps = video frames (25 fps) per second; RTF = stage time / audio time"]
    lines.append("TTS")
    for voice, row in stages["tts"].items():
        fps = row.get("fps", 25 / row["rtf"])
        lines.append(
            f"  {voice:8} audio {row['audio_seconds']:6.1f}s  synth {row['seconds']:6.2f}s"
            f"  {fps:8.0f} fps  RTF {row['rtf']:.3f}"
        )
    if "machine" in stages:
        lines.append("Machine: " + "  ".join(f"{k} {v}" for k, v in stages["machine"].items()))
    lines.append("Plan, network, render, encode, chunks, mux (one process; mode: face crop,")
    lines.append("letterboxed face, or the whole photo with the face pasted back). network: what")
    lines.append("the loop draws, left on the device; render: the render loop to host frames;")
    lines.append("chunks: render + lossless encode of 50-frame chunks, as a render worker does")
    for row in stages["render"]:
        head = (
            f"  {row['size']:>9} {row.get('mode', 'face'):9} threads {row['threads']}"
            f"  {row['device']:5}"
        )
        if "plan" not in row:  # figures from before per-stage rates
            lines.append(
                f"{head}  plan {row['plan_seconds'] * 1000:6.1f} ms  render"
                f" {row['render_fps']:6.1f} fps  encode {row['encode_fps']:6.1f} fps"
            )
            continue
        batch = f"  batch {row['batch']}" if "batch" in row else ""
        lines.append(f"{head}  codec {row['codec']}{batch}  ({row['frames']} frames)")
        for stage in ("plan", "network", "render", "encode", "chunks", "mux"):
            fig = row.get(stage)
            if not isinstance(fig, dict):  # figures from before that stage was measured
                continue
            lines.append(f"      {stage:7} {fig['fps']:9.1f} fps  RTF {fig['rtf']:.4f}")
        memory = f"      peak memory so far: {row['peak_rss_mib']:.0f} MiB RSS"
        if "peak_cuda_mib" in row:
            memory += f", {row['peak_cuda_mib']:.0f} MiB CUDA"
        lines.append(memory)
    lines.append(f"  peak memory of the stage process: {stages['peak_rss_mib']:.0f} MiB")
    if e2e:
        lines.append("End to end (submit -> published MP4, embedded runtime)")
        lines.append(
            f"  audio {e2e['audio_seconds']:.1f}s  wall {e2e['wall_seconds']:.1f}s"
            f"  wall/audio {e2e['wall_over_audio']:.2f}"
        )
    return "\n".join(lines)


SCALING_SCRIPT = (
    "This job measures how the farm scales. It is cut into many small chunks, and each "
    "chunk is handed to whichever render worker is free."
)


def scaling(
    ctx: Context, worker_counts: list[int], frame_ms: int, chunk_frames: int = 5
) -> list[dict[str, float]]:
    """Chunk throughput with W render workers of its own, and the farm's overhead per
    chunk (`farm bench --workers`).

    The `null` renderer stands in for the GPU: each frame takes `frame_ms` of wall
    time (0: no work at all). Overhead per chunk = (W x rendering wall time - time
    spent rendering and encoding) / chunks: dispatch, state updates, store round trips.
    """
    _need_services(ctx, "--workers")
    env = {**os.environ, "FARM_NULL_FRAME_MS": str(frame_ms), "FARM_RENDER_THREADS": "1"}
    rows = []
    for count in worker_counts:
        renders = [(f"bench-render{i}", "render", 1) for i in range(count)]
        with run_workers(ctx, [("bench-cpu", "cpu", 2), *renders], env):
            _run_job(ctx, _null_job(ctx, "Warm up.", chunk_frames))
            job_id = _run_job(ctx, _null_job(ctx, SCALING_SCRIPT, chunk_frames)).id
        with ctx.session() as s:
            chunks = queries.get_chunks(s, job_id)
        first = min(c.started_at for c in chunks if c.started_at)
        last = max(c.finished_at for c in chunks if c.finished_at)
        wall = (last - first).total_seconds()
        busy = sum(c.render_seconds or 0.0 for c in chunks)
        rows.append(
            {
                "workers": count,
                "chunks": len(chunks),
                "frame_ms": frame_ms,
                "chunks_per_second": len(chunks) / wall,
                "overhead_ms_per_chunk": 1000 * (count * wall - busy) / len(chunks),
                "render_encode_ms_per_chunk": 1000 * busy / len(chunks),
            }
        )
    return rows


def _null_job(ctx: Context, text: str, chunk_frames: int) -> jobs.JobRequest:
    fps = ctx.settings.fps
    return jobs.JobRequest(
        text, "demo", "joe", fps, (64, 64), chunk_frames, seed=1, renderer="null"
    )


def load(ctx: Context, n: int) -> LoadResult:
    """N jobs at once on a cpu and a render worker of the configured concurrency,
    with the null renderer: the farm's scheduling under load, not rendering
    (`farm bench --load`)."""
    from farm import load as under_load

    _need_services(ctx, "--load")
    under_load.queue_depth_reader(ctx.settings)()  # not Redis, or down: refused first
    env = {**os.environ, "FARM_RENDERER": "null", "FARM_NULL_FRAME_MS": "0"}
    specs = [
        ("load-cpu", "cpu", ctx.settings.cpu_concurrency),
        ("load-render", "render", ctx.settings.render_concurrency),
    ]
    with run_workers(ctx, specs, env) as pids:
        roles = {name.removeprefix("load-"): pid for name, pid in pids.items()}
        return under_load.run(ctx, n, workers=roles)


def _need_services(ctx: Context, option: str) -> None:
    if ctx.settings.embedded:
        raise InvalidInput(
            f"{option} measures a farm on real services: set FARM_BROKER_URL "
            "(and FARM_DATABASE_URL) first"
        )


def format_scaling(rows: list[dict[str, float]]) -> str:
    lines = ["Render worker scaling (null renderer standing in for the GPU)"]
    for r in rows:
        lines.append(
            f"  {r['workers']} worker(s)  {r['frame_ms']:>3} ms/frame  {r['chunks']:4} chunks"
            f"  {r['chunks_per_second']:7.2f} chunks/s  overhead {r['overhead_ms_per_chunk']:6.1f}"
            f" ms/chunk  (render+encode {r['render_encode_ms_per_chunk']:.1f} ms/chunk)"
        )
    by = {(r["workers"], r["frame_ms"]): r["chunks_per_second"] for r in rows}
    for (w, ms), rate in sorted(by.items()):
        if w > 1 and (1, ms) in by:
            lines.append(f"  {w} vs 1 worker(s) at {ms} ms/frame: {rate / by[(1, ms)]:.2f}x")
    return "\n".join(lines)


@contextlib.contextmanager
def run_workers(
    ctx: Context, specs: list[tuple[str, str, int]], env: dict[str, str]
) -> Iterator[dict[str, int]]:
    """The benchmark's own workers, (name, queue, concurrency) each, logging to a temp
    directory. Yields name -> pid of each main process; a warm shutdown at the end."""
    from farm import embedded

    logs = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    procs = {}
    try:
        for name, queue, concurrency in specs:
            argv = embedded.worker_argv(
                queue, concurrency, f"{name}@%h", "WARNING", logs / f"{name}.log"
            )
            with open(logs / f"{name}.out", "wb") as out:  # the banner, a crash
                procs[name] = subprocess.Popen(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        _wait_ready(ctx, {f"{name}@" for name in procs})
        yield {name: p.pid for name, p in procs.items()}
    finally:
        for p in procs.values():
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=120)


def _wait_ready(ctx: Context, prefixes: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = ctx.dispatch.workers()
        if all(any(s.startswith(p) for s in seen) for p in prefixes):
            return
    raise RetryableError(f"benchmark workers did not start within {timeout:.0f} s")


def format_load(r: LoadResult) -> str:
    lines = [
        f"Load: {r.jobs} jobs submitted at once (null renderer, espeak, 64x64, one chunk each)",
        f"  submitted in {r.submit_seconds:.1f} s; all ended after {r.wall_seconds:.1f} s:"
        f" {r.jobs_per_minute:.0f} jobs/min",
        f"  {r.succeeded} succeeded, {r.failed} failed, {r.cancelled} cancelled",
        f"  peak queue depth: {r.peak_queue_depth} messages waiting",
        f"  `farm jobs` queries: median {r.list_ms_median:.0f} ms, max {r.list_ms_max:.0f} ms"
        f" ({r.samples} samples)",
        f"  `python -m farm jobs`: median {r.cli_seconds_median:.1f} s,"
        f" max {r.cli_seconds_max:.1f} s ({len(r.cli_runs)} runs,"
        f" {sum(1 for c in r.cli_runs if c.returncode != 0)} failed)",
        "  peak memory (RSS) of one process, by role:",
    ]
    lines += [f"    {role:14} {mib:6.0f} MiB" for role, mib in r.peak_rss_mib.items()]
    return "\n".join(lines)


# --- lip-sync quality (`farm bench --quality`) ------------------------------------------------

# The fixed set. Text jobs speak with the default Piper voice; the audio-only clip is a
# different synthetic voice (espeak-ng), made at bench time, resampled to a 16 kHz WAV
# and submitted as a user's recording would be.
QUALITY_NEWS = (
    "City officials announced on Tuesday that the old harbour bridge will close for "
    "repairs next month. Engineers found cracks in two of its steel supports during a "
    "routine inspection, and traffic will be diverted to the northern crossing while the "
    "work is carried out. The mayor said the repairs should take about six weeks, and "
    "that buses will run every ten minutes between the two sides of the river."
)
QUALITY_BILABIALS = (
    "Papa bought a big blue balloon.\n\n"
    "Bob may buy maple bread.\n\n"
    "My mom made apple pie, and the baby pulled the paper.\n\n"
    "Please bring me both, before ten.\n\n"
    "Maybe."
)
QUALITY_AUDIO_SENTENCES = (
    ("The weather service expects heavy rain across the valley this weekend.", 0.6),
    ("Farmers have been told to move their animals to higher ground.", 0.9),
    ("Schools will stay open, but some bus routes may be cancelled.", 0.45),
    ("People living near the river should prepare bags of sand.", 1.2),
    ("Updates will follow every morning at seven.", 0.7),
    ("Please check the website before you travel.", 0.5),
    ("Thank you for listening, and stay safe.", 0.0),
)
QUALITY_AUDIO_LEAD_S = 0.25  # the recording's own silence before its first word
QUALITY_AUDIO_RATE = 16_000


def quality_clip(dest: Path) -> Path:
    """The audio-only clip: espeak-ng sentences with pauses between them, resampled to a
    16 kHz mono WAV (how a user's recording might arrive)."""
    import numpy as np

    from models import tts
    from models.base import Speech
    from models.wav import SAMPLE_RATE, resample, write_wav

    pieces = [np.zeros(int(QUALITY_AUDIO_LEAD_S * SAMPLE_RATE), np.int16)]
    for sentence, pause_s in QUALITY_AUDIO_SENTENCES:
        pieces.append(tts.synthesize(sentence, "espeak").samples)
        pieces.append(np.zeros(int(pause_s * SAMPLE_RATE), np.int16))
    samples = resample(np.concatenate(pieces), SAMPLE_RATE, QUALITY_AUDIO_RATE)
    write_wav(Speech(samples=samples, sample_rate=QUALITY_AUDIO_RATE), dest)
    return dest


def quality(ctx: Context, work: Path) -> list[dict]:
    """Render the fixed set through the farm and measure each MP4 independently
    (farm/quality.py, in a child process: this one never imports mediapipe)."""
    from farm import audio as audio_input

    size = (ctx.settings.size, ctx.settings.size)
    fps = ctx.settings.fps

    def request(script: str, audio_wav: bytes | None = None) -> jobs.JobRequest:
        return jobs.JobRequest(
            script, "demo", "joe", fps, size, ctx.settings.chunk_frames, seed=1,
            audio_wav=audio_wav,
        )  # fmt: skip

    clip = quality_clip(work / "clip-16k.wav")
    samples = audio_input.decode(clip, ctx.settings.max_audio_seconds)
    cases = [
        ("text: news paragraph", request(QUALITY_NEWS), None),
        ("text: bilabials + pauses", request(QUALITY_BILABIALS), None),
        ("audio: espeak, 16 kHz WAV", request("", audio_input.to_wav(samples)), clip),
    ]
    rows = []
    for name, req, given in cases:
        job = _run_job(ctx, req)
        mp4 = work / f"{len(rows)}.mp4"
        ctx.store.get_file(job.output_key, mp4)
        rows.append({"job": name, "job_id": job.id, **measure_mp4(mp4, given)})
    return rows


def measure_mp4(mp4: Path, input_wav: Path | None = None) -> dict:
    argv = [sys.executable, "-m", "farm.quality", str(mp4)]
    if input_wav is not None:
        argv += ["--input-wav", str(input_wav)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise FarmError(f"quality measure failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_quality(rows: list[dict]) -> str:
    """The table of issue 14: one row per job, and whether it meets the targets."""
    lines = [
        "Lip-sync quality (FaceMesh on the output frames, the MP4's own audio)",
        f"  {'job':26} {'sync corr':>9} {'lag':>4} {'closed in silence':>18}"
        f" {'video':>8} {'audio':>8} {'input':>8}  targets",
    ]
    for r in rows:
        closed = f"{100 * r['closed_in_silence']:.0f}% of {r['silent_frames']}"
        given = f"{r['input_seconds']:7.2f}s" if r.get("input_seconds") else f"{'-':>8}"
        corr_ok = r["sync_corr"] >= 0.6 and abs(r["best_lag"]) <= 1
        dur_ok = not r.get("input_seconds") or abs(r["video_seconds"] - r["input_seconds"]) <= 0.04
        met = corr_ok and r["closed_in_silence"] >= 0.95 and dur_ok
        lines.append(
            f"  {r['job']:26} {r['sync_corr']:9.2f} {r['best_lag']:+4d} {closed:>18}"
            f" {r['video_seconds']:7.2f}s {r['audio_seconds']:7.2f}s {given}  "
            + ("met" if met else "NOT met")
        )
    for r in rows:
        if r.get("input_corr") is not None:
            lines.append(
                f"  {r['job']}: the MP4's audio is the input {r['input_offset_ms']:+.1f} ms,"
                f" correlation {r['input_corr']:.3f} after alignment (resampled, AAC)"
            )
    lines.append(
        "  targets: corr >= 0.6 at a lag within +-1 frame (negative: the mouth trails the"
        " sound); closed in >= 95% of silent frames; audio-only video = input +- 1 frame"
    )
    return "\n".join(lines)


# --- deliverables (issue 16) -------------------------------------------------

OUTPUTS_SCRIPT = "Farm renders talking heads for video teams, with captions and posters."
# (label, output.build arguments); the first of each size is the baseline
OUTPUT_CASES: tuple[tuple[str, dict], ...] = (
    ("mp4, no captions", {"captions": "off"}),
    ("mp4 + captions files", {"captions": "file"}),
    ("mp4 + captions burnt in", {"captions": "burn"}),
    ("mp4 + colour background", {"captions": "off", "background": "#1a73e8"}),
    ("webm (VP9)", {"captions": "off", "format": "webm"}),
    ("webm-alpha (VP9 + alpha)", {"captions": "off", "format": "webm-alpha"}),
    ("mov-prores (4444 + alpha)", {"captions": "off", "format": "mov-prores"}),
    ("draft (mp4)", {"captions": "off", "draft": True}),
)
# (label, --size, output.build arguments every case of that size shares)
OUTPUT_SIZES: tuple[tuple[str, tuple[int, int], dict], ...] = (
    ("512x512", (512, 512), {}),
    ("1080x1920 (9:16 cover)", (1080, 1080), {"aspect": "9:16", "fit": "cover"}),
)


def outputs(ctx: Context, runs: int) -> list[dict]:
    """Each deliverable against plain MP4 at 512 and at 1080x1920, whole jobs through
    the running farm: render seconds (every chunk's render, composition and lossless
    encode), mux seconds (the delivered encode, captions, poster and preview) and
    wall seconds, medians over `runs`."""
    from farm import output

    rows = []
    _run_job(ctx, _output_request(ctx, "Warm up.", (512, 512), output.OutputSpec()))
    for size_label, size, shared in OUTPUT_SIZES:
        for label, case in OUTPUT_CASES:
            spec = output.build(**shared, **case)
            render, mux, wall, frames = [], [], [], 0
            for _ in range(runs):
                started = time.perf_counter()
                job = _run_job(ctx, _output_request(ctx, OUTPUTS_SCRIPT, size, spec))
                wall.append(time.perf_counter() - started)
                _, _, chunks = jobs.overview(ctx, job.id)
                render.append(sum(c.render_seconds or 0.0 for c in chunks))
                mux.append((job.timings or {}).get("mux", 0.0))
                frames, width, height, fps = job.frame_count, job.width, job.height, job.fps
            rows.append(
                {
                    "size": size_label,
                    "case": label,
                    "output": f"{width}x{height} {fps} fps {frames} frames",
                    "render_s": statistics.median(render),
                    "mux_s": statistics.median(mux),
                    "wall_s": statistics.median(wall),
                }
            )
    return rows


def _output_request(ctx: Context, text: str, size: tuple[int, int], spec) -> jobs.JobRequest:
    return jobs.JobRequest(
        text, "demo", "joe", ctx.settings.fps, size, ctx.settings.chunk_frames, seed=1,
        output=spec,
    )  # fmt: skip


def format_outputs(rows: list[dict], runs: int) -> str:
    lines = [
        f"Deliverables against plain MP4 (portrait, demo avatar, medians of {runs})",
        f"  {'size':24} {'case':28} {'output':28} {'render s':>8} {'x':>5}"
        f" {'mux s':>6} {'x':>5} {'wall s':>7} {'x':>5}",
    ]
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["size"], r)
        lines.append(
            f"  {r['size']:24} {r['case']:28} {r['output']:28}"
            f" {r['render_s']:8.2f} {r['render_s'] / b['render_s']:5.2f}"
            f" {r['mux_s']:6.2f} {r['mux_s'] / b['mux_s']:5.2f}"
            f" {r['wall_s']:7.2f} {r['wall_s'] / b['wall_s']:5.2f}"
        )
    lines.append("  x: ratio to the first row of the same size (plain MP4, no captions)")
    return "\n".join(lines)
