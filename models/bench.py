"""Stage benchmarks, run in their own process by `farm bench` (the CLI never imports
torch). Prints one JSON object: medians over runs, and the peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from farm.media import FrameEncoder, VideoFormat
from farm.script import split_script
from models import tts
from models.base import Phone
from models.registry import get_renderer
from models.stages import assemble_audio


def _median_time(fn: Any, runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def bench_tts(text: str, voice: str, runs: int) -> dict[str, float]:
    segments = [t for t, _ in split_script(text, 400, 350)]
    tts.synthesize(segments[0], voice)  # load the voice outside the timing

    def speak_all() -> list[tts.Speech]:
        return [tts.synthesize(s, voice) for s in segments]

    seconds, speeches = _median_time(speak_all, runs)
    audio = sum(s.seconds for s in speeches)
    return {"audio_seconds": audio, "seconds": seconds, "rtf": seconds / audio}


def job_speech(text: str) -> tuple[float, list[Phone]]:
    """The job's audio timeline as the plan stage builds it: (seconds, phones)."""
    parts = [tts.synthesize(t, "joe") for t, _ in split_script(text, 400, 350)]
    samples, rate, phones = assemble_audio(
        [(p.samples, p.sample_rate, p.phones, 350) for p in parts], 0.3, 0.5
    )
    return len(samples) / rate, phones


def bench_render(
    speech: tuple[float, list[Phone]],
    size: tuple[int, int],
    frames: int,
    threads: int,
    device: str,
    runs: int,
) -> dict[str, float]:
    import torch

    seconds, phones = speech
    renderer = get_renderer("portrait", Path(tempfile.gettempdir()), device, 16, threads)
    torch.set_num_threads(threads)
    from models.portrait import demo_photo

    avatar = renderer.prepare_avatar(demo_photo())
    plan_s, plan = _median_time(
        lambda: renderer.plan(avatar, seconds, phones, 25, size, 1),
        runs,
    )
    frames = min(frames, plan.frame_count)
    rendered: list[np.ndarray] = []

    class Keep:
        def write(self, batch: np.ndarray) -> None:
            rendered.append(np.array(batch))

    renderer.render(avatar, plan, range(0, 16), Keep())  # warm-up: caches, allocator
    rendered.clear()

    def render_all() -> None:
        rendered.clear()
        renderer.render(avatar, plan, range(frames), Keep())

    render_s, _ = _median_time(render_all, runs)
    video = np.concatenate(rendered)

    def encode_all() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            enc = FrameEncoder(Path(tmp) / "b.mp4", VideoFormat(size[0], size[1], 25), frames)
            for i in range(0, frames, 16):
                enc.write(video[i : i + 16])
            enc.close()

    encode_s, _ = _median_time(encode_all, runs)
    return {
        "frames": frames,
        "plan_seconds": plan_s,
        "render_fps": frames / render_s,
        "encode_fps": frames / encode_s,
        "device": str(getattr(renderer, "device", device)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--sizes", default="512,1280x720")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    text = args.script.read_text(encoding="utf-8")
    out: dict[str, Any] = {"tts": {}, "render": []}
    for voice in tts.VOICES:
        out["tts"][voice] = bench_tts(text, voice, args.runs)
    speech = job_speech(text)
    for size_text in args.sizes.split(","):
        w, _, h = size_text.partition("x")
        size = (int(w), int(h or w))
        for threads in (int(t) for t in args.threads.split(",")):
            row = bench_render(speech, size, args.frames, threads, args.device, args.runs)
            out["render"].append({"size": f"{size[0]}x{size[1]}", "threads": threads, **row})
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
