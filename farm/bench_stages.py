"""Stage benchmarks, run in their own process by `farm bench` (the CLI never imports
torch). Prints one JSON object: medians over runs, and the peak memory.

Every stage gets frames per second (video frames at FPS worth of its work per second)
and a real-time factor (stage seconds / seconds of audio it covered; lower is faster).
A non-square size runs twice: the face letterboxed, and the whole photo with the face
pasted back (a photo of that size made from the demo photo)."""

from __future__ import annotations

import argparse
import json
import os
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
from models.timeline import assemble_audio
from models.wav import write_wav

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
    batch: int = 16,
    codec: str = "libx264",
) -> dict[str, Any]:
    """`mode`: "face" (the crop, letterboxed when not square) or "photo" (the whole
    photo at `size`, the face pasted back).

    Figures: the network alone on device tensors (no host work), the render loop into a
    sink that keeps the frames, the encode of rendered frames, delivered chunks (render
    and encode of CHUNK_FRAMES-frame chunks one after another, as a render worker makes
    them) and the mux."""
    import torch

    seconds, phones, samples, rate = speech
    renderer = get_renderer("portrait", Path(tempfile.gettempdir()), device, batch, threads)
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

    if renderer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    network_s, _ = _median_time(lambda: _network_only(renderer, avatar, plan, frames), runs)
    render_s, _ = _median_time(render_all, runs)
    video = np.concatenate(rendered)
    fmt = VideoFormat.chunk(size[0], size[1], FPS, codec)

    def delivered_chunks(tmp: Path) -> None:
        for i, first in enumerate(range(0, frames, CHUNK_FRAMES)):
            count = min(CHUNK_FRAMES, frames - first)
            enc = FrameEncoder(tmp / f"delivered-{i:04d}.mp4", fmt, count)
            renderer.render(avatar, plan, range(first, first + count), enc)
            enc.close()

    def encode(out: Path, first: int, count: int) -> None:
        enc = FrameEncoder(out, fmt, count)
        for i in range(first, first + count, 16):
            enc.write(video[i : min(i + 16, first + count)])
        enc.close()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        encode_s, _ = _median_time(lambda: encode(tmp / "whole.mp4", 0, frames), runs)
        chunk_s, _ = _median_time(lambda: delivered_chunks(tmp), runs)
        # The mux joins what the render workers leave: chunk segments, and the job audio.
        # It decodes them and encodes the delivered video once (farm.media).
        chunks = []
        for i, first in enumerate(range(0, frames, CHUNK_FRAMES)):
            chunks.append(tmp / f"{i:04d}.mp4")
            encode(chunks[-1], first, min(CHUNK_FRAMES, frames - first))
        audio = tts.Speech(samples=samples[: int(frames / FPS * rate)], sample_rate=rate, phones=[])
        with open(tmp / "audio.wav", "wb") as f:
            write_wav(audio, f)
        final = VideoFormat.delivery(size[0], size[1], FPS, codec)
        mux_s, _ = _median_time(
            lambda: join_and_encode(chunks, tmp / "audio.wav", tmp / "out.mp4", final), runs
        )
    row: dict[str, Any] = {
        "frames": frames,
        "batch": batch,
        "mode": "photo" if mode == "photo" else ("face" if size[0] == size[1] else "letterbox"),
        "codec": fmt.codec,  # of the chunks; the delivery encode uses the same
        "chunk_count": len(chunks),
        "device": str(getattr(renderer, "device", device)),
        "plan": {"seconds": plan_s, **_rates(plan_s, plan.frame_count)},
        "network": _rates(network_s, frames),
        "render": _rates(render_s, frames),
        "encode": _rates(encode_s, frames),
        "chunks": _rates(chunk_s, frames),
        "mux": _rates(mux_s, frames),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if renderer.device.type == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _network_only(renderer: Any, avatar: Any, plan: Any, frames: int) -> None:
    """What the render loop draws, on device tensors, with no copy to the host."""
    import torch

    track = torch.from_numpy(np.ascontiguousarray(plan.track[:frames], dtype=np.float32))
    track = track.to(renderer.device)
    draw = renderer.drawer(avatar, plan.width, plan.height)
    with torch.inference_mode():
        for first in range(0, frames, renderer.batch_size):
            draw(track[first : first + renderer.batch_size])
    if renderer.device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: str, setting: str) -> dict[str, Any]:
    """What the figures ran on: the encoder chosen (and why), torch, the GPU and driver."""
    import platform

    import torch

    from farm import encoders

    info: dict[str, Any] = {
        "encoder": encoders.choose(setting).reason,
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["driver"] = _driver_version()
    return info


def _driver_version() -> str:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    proc = subprocess.run(
        [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout else "?"


def bench_backend(
    renderer: Any,
    cases: list[tuple[str, Any, tuple[int, int]]],
    speech: Speech,
    frames: int,
    runs: int,
    batch: int,
) -> dict[str, Any]:
    """A neural backend's figures: plan seconds per second of audio, render fps of each
    case (label, avatar, output size) to host frames, peak GPU memory on CUDA."""
    import torch

    from models.tts import Speech as Audio

    seconds, phones, samples, rate = speech
    audio = Audio(samples=samples, sample_rate=rate, phones=phones)
    out: dict[str, Any] = {
        "renderer": renderer.name,
        "device": str(renderer.device),
        "batch": batch,
        "frames": frames,
    }

    class Keep:
        def write(self, batch_frames: np.ndarray) -> None:
            pass

    for label, avatar, size in cases:
        plan_s, plan = _median_time(
            lambda a=avatar, s=size: renderer.plan(a, seconds, phones, FPS, s, 1, audio), runs
        )
        out.setdefault("plan_seconds_per_audio_second", plan_s / seconds)
        n = min(frames, plan.frame_count)
        renderer.render(avatar, plan, range(0, min(n, batch)), Keep())  # warm up
        if renderer.device.type == "cuda":
            torch.cuda.synchronize()
        render_s, _ = _median_time(
            lambda a=avatar, p=plan, k=n: renderer.render(a, p, range(k), Keep()), runs
        )
        out[f"render_fps {label}"] = n / render_s
    if renderer.device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ditto_cases(root: Path, device: str, batch: int) -> tuple[Any, list]:
    """Ditto with the checkpoints under `root`: the 512 face crop of the demo photo, and
    a 1280x720 photo with the face pasted back."""
    from models.ditto.renderer import DittoRenderer
    from models.portrait import demo_photo

    renderer = DittoRenderer(batch_size=batch)
    renderer.load(root, device)
    face = renderer.prepare_avatar(demo_photo())
    photo = renderer.prepare_avatar(bench_photo((1280, 720)))
    return renderer, [("512 face", face, (512, 512)), ("1280x720 photo", photo, photo.photo_size)]


def gaussiantalker_cases(model: Path, data: Path | None, device: str, batch: int) -> tuple:
    """A trained GaussianTalker model: letterboxed to 512x512, and at its own size."""
    from farm.config import Settings
    from models.gaussiantalker.archive import pack
    from models.gaussiantalker.renderer import GaussianTalkerRenderer

    audio_model = Settings.from_env().gaussiantalker_audio_model
    renderer = GaussianTalkerRenderer(batch_size=batch, audio_model=audio_model)
    renderer.load(model, device)
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        archive = Path(tmp) / "model.tar"
        pack(model, data, archive)
        avatar = renderer.prepare_avatar_from_source(archive.read_bytes())
    w, h = avatar.photo_size
    return renderer, [("512 letterboxed", avatar, (512, 512)), (f"{w}x{h} model", avatar, (w, h))]


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
    ap.add_argument("--batch", default="16", help="frames per render batch, e.g. 16,64")
    ap.add_argument("--encoder", default="auto", help="FARM_VIDEO_ENCODER for the encodes")
    ap.add_argument("--renderer", default="portrait", help="portrait, ditto or gaussiantalker")
    ap.add_argument("--ditto-dir", type=Path, default=None, help="Ditto's checkpoint root")
    ap.add_argument("--model", type=Path, default=None, help="a trained GaussianTalker model")
    ap.add_argument("--data", type=Path, default=None, help="its training data directory")
    args = ap.parse_args()
    text = args.script.read_text(encoding="utf-8")
    if args.renderer != "portrait":
        batch = int(args.batch.split(",")[0])
        if args.renderer == "ditto":
            renderer, cases = ditto_cases(args.ditto_dir, args.device, batch)
        else:
            renderer, cases = gaussiantalker_cases(args.model, args.data, args.device, batch)
        row = bench_backend(renderer, cases, job_speech(text), args.frames, args.runs, batch)
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"machine": machine(args.device, args.encoder), "backend": row}))
        return
    out: dict[str, Any] = {"machine": machine(args.device, args.encoder), "tts": {}, "render": []}
    from farm import encoders

    codec = encoders.codec_for(args.encoder)
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
                for batch in (int(b) for b in args.batch.split(",")):
                    row = bench_render(
                        speech,
                        size,
                        mode,
                        args.frames,
                        threads,
                        args.device,
                        args.runs,
                        batch,
                        codec,
                    )
                    out["render"].append(
                        {"size": f"{size[0]}x{size[1]}", "threads": threads, **row}
                    )
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
