"""TensorRT engines for every backend: which path a GPU worker renders on, the engine
cache on disk, building an engine from ONNX, and running one on PyTorch's stream.

Paths, best first: a TensorRT engine (a GPU worker with `farm[tensorrt]` installed),
PyTorch on CUDA, PyTorch on the CPU. A backend exports its network to ONNX (its own
module says what goes in and out), and this module does the rest the same way for all:
- an engine is built once per machine, under a file lock, and kept under
  FARM_MODEL_DIR/engines in a file whose name holds everything that makes an engine
  unusable elsewhere (what it computes, GPU architecture, TensorRT version, precision,
  shapes);
- an engine that does not build or load leaves the worker on PyTorch CUDA, with the
  reason logged by the backend.

tensorrt is imported only here and only when a GPU worker asks for it.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from farm.errors import MissingDependency, PermanentError

log = logging.getLogger(__name__)

TENSORRT_HINT = "pip install 'farm[tensorrt]'"
# Set to 0 to keep a GPU worker on PyTorch CUDA although tensorrt is installed.
TENSORRT_SWITCH = "FARM_TENSORRT"
# One shape per input: (min, opt, max) of an optimisation profile.
Profiles = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependency(f"the TensorRT path needs tensorrt: {TENSORRT_HINT}") from exc


# --- choice -------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    path: str  # "tensorrt" | "cuda" | "cpu"
    device: str  # the torch device it runs on
    reason: str


def backend_choice(device: str) -> BackendChoice:
    """TensorRT where CUDA and tensorrt both are (and FARM_TENSORRT is not 0), else
    PyTorch CUDA, else the CPU; `device=cpu` always means the CPU."""
    if device == "cpu":
        return BackendChoice("cpu", "cpu", "device cpu requested")
    if device != "auto" and not device.startswith("cuda"):
        raise PermanentError(f"unknown device {device!r}: auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        if device == "auto":
            return BackendChoice("cpu", "cpu", "no CUDA device")
        raise PermanentError(f"device {device!r} requested, but PyTorch sees no CUDA device")
    cuda = device if device.startswith("cuda") else "cuda"
    gpu = torch.cuda.get_device_name(torch.device(cuda))
    if os.environ.get(TENSORRT_SWITCH, "1").strip() == "0":
        return BackendChoice("cuda", cuda, f"{gpu}; TensorRT off by {TENSORRT_SWITCH}=0")
    try:
        trt = import_tensorrt()
    except MissingDependency:
        return BackendChoice("cuda", cuda, f"{gpu}; tensorrt not installed: {TENSORRT_HINT}")
    except Exception as exc:  # a broken install (missing CUDA libraries): keep rendering
        return BackendChoice("cuda", cuda, f"{gpu}; tensorrt failed to import: {exc}")
    arch = gpu_arch(torch.device(cuda))
    return BackendChoice("tensorrt", cuda, f"{gpu} {arch}, TensorRT {trt.__version__} fp16")


def gpu_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


# --- the cache ----------------------------------------------------------------------


def digest(*parts: bytes | str, files: Iterable[Path] = ()) -> str:
    """A short name for what an engine computes: the given parts (code versions,
    shapes) and the bytes of `files` (the weights, the network's source)."""
    sha = hashlib.sha256(f"torch {torch.__version__}".encode())
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def engine_name(backend: str, digest: str, arch: str, trt_version: str, precision: str, shape: str):
    """The cache file of one engine. An engine only runs on the GPU architecture and
    TensorRT version it was built with, and only within the shapes of its profile."""
    parts = {
        "backend": backend,
        "digest": digest,
        "arch": arch,
        "trt_version": trt_version,
        "precision": precision,
        "shape": shape,
    }
    for key, value in parts.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or ".." in value:
            raise ValueError(f"engine {key} {value!r} is not a plain name")
    return f"{backend}-{digest}-{arch}-trt{trt_version}-{precision}-{shape}.engine"


def cached_engine(path: Path, build: Callable[[], bytes], timeout: float = 3600.0) -> Path:
    """`path`, built by `build` unless it is there: once per machine even when several
    workers start together (a lock file beside it), never seen half written (written
    under a temporary name, then renamed)."""
    if path.exists():
        return path
    from filelock import FileLock  # a dependency of torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=timeout):
        if path.exists():  # another worker built it while this one waited
            return path
        data = build()
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            partial.write_bytes(data)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # left only when writing failed (a full disk)
    return path


# Beside a per-avatar engine: the avatar's name (farm/retention.py reads it; the same
# suffix there, as models import nothing of farm but its errors).
OWNER_SUFFIX = ".owner"


def note_owner(path: Path, owner: str | None) -> None:
    """Record beside a per-avatar engine which avatar it was built for (a file of the
    same name + ".owner"), so `farm avatar delete` finds it without torch."""
    if owner is None or not path.exists():
        return
    marker = path.with_name(path.name + OWNER_SUFFIX)
    try:
        if not marker.exists() or marker.read_text(encoding="utf-8").strip() != owner:
            marker.write_text(owner + "\n", encoding="utf-8")
    except OSError as exc:  # the engine still works; only its cleanup is harder
        log.warning("could not record the owner of engine %s: %s", path.name, exc)


# --- building and running -----------------------------------------------------------


def build_engine(onnx: bytes, profiles: Profiles, what: str) -> bytes:
    """A serialised engine for `onnx`, whose dynamic inputs range over `profiles`.

    The network is strongly typed: each tensor keeps the type the export gave it, so a
    backend decides precision by how it exports (fp16 for the heavy convolutions, fp32
    where rounding would show). (TensorRT 11 builds only this way.) A TensorRT before
    strong typing gets the FP16 flag instead and picks precision per layer.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PermanentError(f"TensorRT cannot parse the {what}: {errors}")
    config = builder.create_builder_config()
    if typed is None and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PermanentError(f"TensorRT could not build the {what} engine (see its log)")
    return bytes(plan)


_TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32}


class Engine:
    """A deserialised engine on one CUDA device, run on PyTorch's current stream with
    PyTorch tensors as its buffers (no other CUDA bindings needed)."""

    def __init__(self, engine: bytes, device: torch.device) -> None:
        trt = import_tensorrt()
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(engine)
            if self.engine is None:
                raise ValueError("TensorRT could not deserialise the engine")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == is_input]
        self.outputs = [n for n in names if n not in self.inputs]
        self.types = {n: _TORCH_TYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    @classmethod
    def cached(cls, path: Path, build: Callable[[], bytes], device: torch.device) -> Engine:
        """The engine at `path`, built now (minutes; once per machine) unless it is
        there; one that does not load (truncated by a full disk, or from a driver this
        TensorRT rejects) is built again."""
        try:
            return cls(cached_engine(path, build).read_bytes(), device)
        except ValueError:
            log.warning("engine %s unusable, rebuilding", path.name)
            path.unlink(missing_ok=True)
            return cls(cached_engine(path, build).read_bytes(), device)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named inputs (moved to the device in the engine's types) -> every output."""
        keep = []  # the converted inputs must live until the stream has read them
        for name in self.inputs:
            tensor = inputs[name].to(self.device, self.types[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{name} {list(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.types[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        return outputs
