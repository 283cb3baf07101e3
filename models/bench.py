"""Stage benchmarks, run in their own process by `farm bench` (the CLI never imports
torch). Prints one JSON object: medians over runs, and the peak memory.

Every stage gets frames per second (video frames at FPS worth of its work per second)
and a real-time factor (stage seconds / seconds of audio it covered; lower is faster).
A non-square size runs twice: the face letterboxed, and the whole photo with the face
pasted back (a photo of that size made from the demo photo)."""

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

from farm.media import FrameEncoder, VideoFormat, join_and_encode
from farm.script import split_script
from models import tts
from models.base import Phone
from models.registry import get_renderer
from models.stages import assemble_audio

FPS = 25
CHUNK_FRAMES = 50  # the mux joins the encoded frames as chunks of this many
Speech = tuple[float, list[Phone], np.ndarray, int]  # seconds, phones, samples, rate


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
    rtf = seconds / audio
    return {"audio_seconds": audio, "seconds": seconds, "rtf": rtf, "fps": FPS / rtf}


def job_speech(text: str) -> Speech:
    """The job's audio timeline as the plan stage builds it."""
    parts = [tts.synthesize(t, "joe") for t, _ in split_script(text, 400, 350)]
    samples, rate, phones = assemble_audio(
        [(p.samples, p.sample_rate, p.phones, 350) for p in parts], 0.3, 0.5
    )
    return len(samples) / rate, phones, samples, rate


def bench_photo(size: tuple[int, int]) -> np.ndarray:
    """A photo of exactly `size`: the demo portrait scaled to the height, edges extended
    sideways (or the other way round), so the face sits as in a typical upload."""
    import cv2

    from models.portrait import demo_photo

    width, height = size
    side = min(width, height)
    face = cv2.resize(demo_photo(), (side, side), interpolation=cv2.INTER_CUBIC)
    left, top = (width - side) // 2, (height - side) // 2
    pad = ((top, height - side - top), (left, width - side - left), (0, 0))
    return np.pad(face, pad, mode="edge")


def _rates(seconds: float, frames: int) -> dict[str, float]:
    return {"fps": frames / seconds, "rtf": seconds / (frames / FPS)}


def bench_render(
    speech: Speech,
    size: tuple[int, int],
    mode: str,
    frames: int,
    threads: int,
    device: str,
    runs: int,
) -> dict[str, Any]:
    """`mode`: "face" (the crop, letterboxed when not square) or "photo" (the whole
    photo at `size`, the face pasted back)."""
    import torch

    seconds, phones, samples, rate = speech
    renderer = get_renderer("portrait", Path(tempfile.gettempdir()), device, 16, threads)
    torch.set_num_threads(threads)
    from models.portrait import demo_photo

    photo = bench_photo(size) if mode == "photo" else demo_photo()
    avatar = renderer.prepare_avatar(photo)
    if mode == "photo" and avatar.photo_size != size:
        raise RuntimeError(f"bench photo is {avatar.photo_size}, not {size}")
    plan_s, plan = _median_time(
        lambda: renderer.plan(avatar, seconds, phones, FPS, size, 1),
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

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    render_s, _ = _median_time(render_all, runs)
    video = np.concatenate(rendered)
    fmt = VideoFormat.chunk(size[0], size[1], FPS)

    def encode(out: Path, first: int, count: int) -> None:
        enc = FrameEncoder(out, fmt, count)
        for i in range(first, first + count, 16):
            enc.write(video[i : min(i + 16, first + count)])
        enc.close()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        encode_s, _ = _median_time(lambda: encode(tmp / "whole.mp4", 0, frames), runs)
        # The mux joins what the render workers leave: chunk segments, and the job audio.
        # It decodes them and encodes the delivered video once (farm.media).
        chunks = []
        for i, first in enumerate(range(0, frames, CHUNK_FRAMES)):
            chunks.append(tmp / f"{i:04d}.mp4")
            encode(chunks[-1], first, min(CHUNK_FRAMES, frames - first))
        audio = tts.Speech(samples=samples[: int(frames / FPS * rate)], sample_rate=rate, phones=[])
        with open(tmp / "audio.wav", "wb") as f:
            tts.write_wav(audio, f)
        final = VideoFormat.delivery(size[0], size[1], FPS)
        mux_s, _ = _median_time(
            lambda: join_and_encode(chunks, tmp / "audio.wav", tmp / "out.mp4", final), runs
        )
    row: dict[str, Any] = {
        "frames": frames,
        "mode": "photo" if mode == "photo" else ("face" if size[0] == size[1] else "letterbox"),
        "codec": fmt.codec,  # of the chunks; the delivery encode uses the same
        "chunks": len(chunks),
        "device": str(getattr(renderer, "device", device)),
        "plan": {"seconds": plan_s, **_rates(plan_s, plan.frame_count)},
        "render": _rates(render_s, frames),
        "encode": _rates(encode_s, frames),
        "mux": _rates(mux_s, frames),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument(
        "--sizes",
        default="512,1280x720",
        help="WxH or N; a non-square size runs letterboxed and as a whole photo, unless "
        "suffixed :face or :photo",
    )
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    text = args.script.read_text(encoding="utf-8")
    out: dict[str, Any] = {"tts": {}, "render": []}
    for voice in tts.VOICES:
        out["tts"][voice] = bench_tts(text, voice, args.runs)
    speech = job_speech(text)
    for size_text in args.sizes.split(","):
        size_text, _, only = size_text.partition(":")
        w, _, h = size_text.partition("x")
        size = (int(w), int(h or w))
        modes = [only] if only else (["face"] if size[0] == size[1] else ["face", "photo"])
        for mode in modes:
            for threads in (int(t) for t in args.threads.split(",")):
                row = bench_render(speech, size, mode, args.frames, threads, args.device, args.runs)
                out["render"].append({"size": f"{size[0]}x{size[1]}", "threads": threads, **row})
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
