"""GPU workers: one Celery worker process per visible GPU, each pinned with
CUDA_VISIBLE_DEVICES, concurrency 1. Found with nvidia-smi, never by importing torch
(CUDA must not be initialised before the fork)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from functools import cache

from farm.errors import InvalidInput


def visible_gpus() -> list[str]:
    """GPU indices this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi."""
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [g.strip() for g in pinned.split(",") if g.strip() and g.strip() != "-1"]
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    proc = subprocess.run(
        [exe, "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


@cache
def gpu_present() -> bool:
    """An NVIDIA GPU this process may use (asked once per process): CUDA_VISIBLE_DEVICES
    set to nothing hides them all; else nvidia-smi must list one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and b"GPU " in proc.stdout


def select_gpus(spec: str, available: list[str]) -> list[str]:
    """'all' or a comma list of indices, checked against what is visible."""
    if spec == "all":
        if not available:
            raise InvalidInput("--gpus all: no NVIDIA GPU is visible on this machine")
        return available
    wanted = [g.strip() for g in spec.split(",") if g.strip()]
    missing = [g for g in wanted if g not in available]
    if missing or not wanted:
        raise InvalidInput(
            f"--gpus {spec}: GPU {', '.join(missing) or '?'} is not visible "
            f"(visible: {', '.join(available) or 'none'})"
        )
    return wanted


def gpu_worker_names(base: str, gpus: list[str], per_gpu: int) -> dict[str, str]:
    """Worker name -> the GPU it is pinned to: `base-gpuN@%h`, or with more than one
    process per GPU `base-gpuN-K@%h`. Each process renders and encodes its own chunk,
    so `per_gpu` is how many encodes are in flight per GPU: the CPU encoder, not the
    GPU, limits a GPU worker (libx264 makes ~1,000 lossless 512x512 fps on 16 cores)."""
    if per_gpu == 1:
        return {f"{base}-gpu{g}@%h": g for g in gpus}
    return {f"{base}-gpu{g}-{k}@%h": g for g in gpus for k in range(per_gpu)}


def gpu_worker_env(gpu: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "FARM_DEVICE": "cuda"}


def supervise(argvs: dict[str, list[str]], envs: dict[str, dict[str, str]]) -> int:
    """Run the worker processes; forward SIGTERM/SIGINT (warm shutdown) and return
    when all have exited. If one dies, stop the others: let the orchestrator restart
    the whole box's set rather than run with a GPU silently idle."""
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    # Handlers first: a SIGTERM while the workers start must still reach them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for name, argv in argvs.items():
        if not stopping:
            procs[name] = subprocess.Popen(argv, env=envs[name])
    while any(p.poll() is None for p in procs.values()):
        if not stopping and any(p.poll() is not None for p in procs.values()):
            forward(signal.SIGTERM, None)
        time.sleep(0.5)
    # Any worker that did not exit cleanly (a signal gives a negative code) fails the set.
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1
