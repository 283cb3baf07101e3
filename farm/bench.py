"""`farm bench`: stage figures from a worker-side process, then whole jobs end to end.

Medians over runs; the machine is shared and noisy, so ratios in one run matter more
than absolute times."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from farm import jobs, queries, states
from farm.context import Context
from farm.errors import FarmError

DEFAULT_SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "bench.txt"


def stage_figures(script: Path, runs: int, sizes: str, threads: str, device: str) -> dict:
    """Runs models.bench in a child process so this one never imports torch."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.bench",
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
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        raise FarmError(f"stage benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def end_to_end(ctx: Context, enqueue: Any, script_text: str, runs: int) -> dict[str, float]:
    """Whole jobs through the running farm: wall time from submit to published."""
    ratios, walls, audio = [], [], 0.0
    for _ in range(runs):
        req = jobs.JobRequest(
            script_text,
            "demo",
            "joe",
            ctx.settings.fps,
            (ctx.settings.size, ctx.settings.size),
            ctx.settings.chunk_frames,
            seed=1,
        )
        started = time.perf_counter()
        job_id = jobs.create(ctx, req)
        enqueue("farm.prepare", job_id)
        while True:
            with ctx.session() as s:
                job = queries.get_job(s, job_id)
            if job.state in states.FINAL:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - started
        if job.state != states.SUCCEEDED:
            raise FarmError(f"benchmark job {job_id} {job.state}: {job.error}")
        audio = job.audio_seconds or 0.0
        walls.append(wall)
        ratios.append(wall / audio)
    return {
        "audio_seconds": audio,
        "wall_seconds": statistics.median(walls),
        "wall_over_audio": statistics.median(ratios),
    }


def format_report(stages: dict, e2e: dict | None) -> str:
    lines = ["TTS (real-time factor = synthesis time / audio time; lower is faster)"]
    for voice, row in stages["tts"].items():
        lines.append(
            f"  {voice:8} audio {row['audio_seconds']:6.1f}s  synth {row['seconds']:6.2f}s"
            f"  RTF {row['rtf']:.3f}"
        )
    lines.append("Render and encode (one process; frames per second)")
    for row in stages["render"]:
        lines.append(
            f"  {row['size']:>9} threads {row['threads']}  {row['device']:5}"
            f"  plan {row['plan_seconds'] * 1000:6.1f} ms  render {row['render_fps']:6.1f}"
            f" fps  encode {row['encode_fps']:6.1f} fps"
        )
    lines.append(f"  peak memory of the stage process: {stages['peak_rss_mib']:.0f} MiB")
    if e2e:
        lines.append("End to end (submit -> published MP4, embedded runtime)")
        lines.append(
            f"  audio {e2e['audio_seconds']:.1f}s  wall {e2e['wall_seconds']:.1f}s"
            f"  wall/audio {e2e['wall_over_audio']:.2f}"
        )
    return "\n".join(lines)
