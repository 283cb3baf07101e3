"""Fake GPU machines for tests on a machine without one: an `nvidia-smi` that lists an
H200, and an `ffmpeg` wrapper in front of the real one that plays the NVENC of such a
machine. Put `fake_gpu(dir, nvenc=...)` first on PATH (for this process and the
workers it starts) and farm sees that machine.

nvenc:
- "refused": ffmpeg lists h264_nvenc (the real build does) but every encode that asks
  for it fails the way it fails on an H200 with driver 580 (measured there);
- "works": an encode that asks for h264_nvenc is done by libx264 with the same
  lossless-or-not intent, so a job really finishes "on NVENC";
- "dies": NVENC opens (a probe of a few frames passes) but an encode from a pipe (a
  render chunk, the mux) dies after its first frames, like a card that falls over.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

NVENC_REFUSAL = (
    "[h264_nvenc @ 0x5581] Driver does not support the required nvenc API version. "
    "Required: 13.1 Found: 13.0\n"
    "[h264_nvenc @ 0x5581] The minimum required Nvidia driver for nvenc is 610.00 or newer\n"
    "[vost#0:0/h264_nvenc @ 0x5582] Error while opening encoder - maybe incorrect "
    "parameters such as bit_rate, rate, width or height.\n"
)
GPU_NAME = "NVIDIA H200"
DRIVER = "580.95.05"

_SMI = """#!/bin/sh
# A fake nvidia-smi: one H200.
case "$*" in
  *-L*) echo "GPU 0: {name} (UUID: GPU-00000000-fake-fake-fake-000000000000)" ;;
  *--query-gpu=index*) echo "0" ;;
  *--query-gpu=*) echo "{name}, 143771 MiB, {driver}" ;;
  *) echo "NVIDIA-SMI {driver}   Driver Version: {driver}" ;;
esac
"""

_FFMPEG = '''#!{python}
"""A fake NVENC in front of the real ffmpeg ({mode})."""
import os, sys, time

REAL = {real!r}
MODE = {mode!r}
args = sys.argv[1:]
if "h264_nvenc" not in args:
    os.execv(REAL, [REAL, *args])
if MODE == "refused":
    sys.stderr.write({refusal!r})
    sys.exit(1)
from_pipe = "pipe:" in args
if MODE == "dies" and from_pipe:
    sys.stdin.buffer.read(64 * 64 * 3)  # a little input, then the card falls over
    sys.stderr.write("[h264_nvenc @ 0x5581] OpenEncodeSessionEx failed: out of memory (10)\\n")
    sys.exit(1)
# "works" (and the probes of "dies"): libx264 with the same intent.
out, skip = [], 0
for i, a in enumerate(args):
    if skip:
        skip -= 1
        continue
    if a in ("-rc", "-cq", "-forced-idr"):
        skip = 1
        continue
    if a == "h264_nvenc":
        a = "libx264"
    if i and args[i - 1] == "-preset" and a.startswith("p"):
        a = "ultrafast"
    out.append(a)
os.execv(REAL, [REAL, *out])
'''


def real_ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def fake_gpu(where: Path, nvenc: str | None = "refused") -> Path:
    """A folder with the fake nvidia-smi and (unless nvenc is None) the ffmpeg wrapper;
    put it first on PATH."""
    where.mkdir(parents=True, exist_ok=True)
    smi = where / "nvidia-smi"
    smi.write_text(_SMI.format(name=GPU_NAME, driver=DRIVER))
    smi.chmod(0o755)
    if nvenc is not None:
        ffmpeg = where / "ffmpeg"
        ffmpeg.write_text(
            _FFMPEG.format(
                python=sys.executable, real=real_ffmpeg(), mode=nvenc, refusal=NVENC_REFUSAL
            )
        )
        ffmpeg.chmod(0o755)
    return where


def path_with(folder: Path) -> str:
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
