"""The portrait network outside PyTorch: ONNX export, onnxruntime and TensorRT backends,
and which path a worker renders on.

Paths, best first: a TensorRT engine (a GPU worker with `farm[tensorrt]` installed),
PyTorch on CUDA, PyTorch on the CPU. An engine is one avatar at one size: the avatar's
fields and photo are constants of the graph, so TensorRT can fold and fuse around them.
It is built on the first render of that avatar and size, then kept on disk under
FARM_MODEL_DIR/engines, keyed by everything that makes an engine unusable elsewhere.
Every backend is called like `PortraitNet`: (N, C) float32 track rows in, (N, S, S, 3)
uint8 frames out.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from farm.errors import MissingDependency, PermanentError
from models.base import CHANNELS

from .avatar import PortraitAvatar
from .net import PortraitNet
from .render import build_rig

if TYPE_CHECKING:
    from .renderer import PortraitRenderer

log = logging.getLogger(__name__)

# GridSample entered ONNX in opset 16; 17 is well covered by onnxruntime and by the
# ONNX parser of TensorRT 10.
OPSET = 17
INPUT, OUTPUT = "track", "frames"
TENSORRT_HINT = "pip install 'farm[tensorrt]'"
# Set to 0 to keep a GPU worker on PyTorch CUDA although tensorrt is installed.
TENSORRT_SWITCH = "FARM_TENSORRT"
# Source files whose code ends up in an engine: any change to them makes old engines stale.
NETWORK_SOURCES = ("net.py", "render.py", "mouth.py", "eyes.py", "fields.py", "controls.py")


# --- ONNX ---------------------------------------------------------------------------


class _Frames(torch.nn.Module):
    """What is exported: the network's frames in the photo's dtype, not uint8, because
    TensorRT takes no uint8 tensors; the backends cast (the values are whole numbers)."""

    def __init__(self, net: PortraitNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, track: torch.Tensor) -> torch.Tensor:
        return self.net.frames(track)


def export_onnx(
    renderer: PortraitRenderer,
    avatar: PortraitAvatar,
    size: int,
    path: str | Path | IO[bytes],
    batch: int,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the network for `avatar` at `size` x `size` as ONNX: input `track` (B, C)
    float32, output `frames` (B, S, S, 3), whole numbers 0-255 in the photo's dtype. The
    batch axis is dynamic; `batch` is the example's. Traced on the renderer's device in
    its precision (fp16 photo on CUDA, float32 positions), unless `dtype` says otherwise.
    """
    net = build_rig(avatar, size, renderer.device, dtype or renderer.dtype).eval()
    example = torch.zeros(batch, len(CHANNELS), device=renderer.device)
    target = str(path) if isinstance(path, Path) else path
    with warnings.catch_warnings():
        # The tracer flags the mouth colours as constants, which they are.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # The TorchScript exporter (dynamo=False): the torch.export-based one needs
        # onnxscript, which farm does not install, and gains nothing on this graph.
        torch.onnx.export(
            _Frames(net),
            (example,),
            target,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )


def onnx_bytes(renderer: PortraitRenderer, avatar: PortraitAvatar, size: int, batch: int) -> bytes:
    buf = io.BytesIO()
    export_onnx(renderer, avatar, size, buf, batch)
    return buf.getvalue()


class OnnxBackend:
    """An exported network on onnxruntime (CPU unless other providers are given)."""

    def __init__(
        self, model: str | Path | bytes, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise MissingDependency("the ONNX backend needs pip install onnxruntime") from exc
        source = model if isinstance(model, bytes) else str(model)
        self.session = onnxruntime.InferenceSession(source, providers=list(providers))

    def __call__(self, track: torch.Tensor) -> torch.Tensor:
        rows = track.detach().to("cpu", torch.float32).numpy()
        (frames,) = self.session.run([OUTPUT], {INPUT: rows})
        return torch.from_numpy(np.asarray(frames)).to(torch.uint8)


# --- TensorRT -----------------------------------------------------------------------


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependency(f"the TensorRT path needs tensorrt: {TENSORRT_HINT}") from exc


@cache
def _network_digest() -> str:
    here = Path(__file__).parent
    sha = hashlib.sha256(f"torch {torch.__version__} opset {OPSET}".encode())
    for name in NETWORK_SOURCES:
        sha.update((here / name).read_bytes())
    return sha.hexdigest()


def avatar_digest(avatar: PortraitAvatar, size: int) -> str:
    """Names what an engine computes: the avatar, the size and the network's code."""
    sha = hashlib.sha256(_network_digest().encode())
    sha.update(np.ascontiguousarray(avatar.image).tobytes())
    sha.update(np.ascontiguousarray(avatar.landmarks, dtype=np.float32).tobytes())
    sha.update(str(size).encode())
    return sha.hexdigest()[:16]


def engine_name(
    digest: str, arch: str, trt_version: str, precision: str, batch: int, width: int, height: int
) -> str:
    """The cache file of one engine. An engine only runs on the GPU architecture and
    TensorRT version it was built with, and only up to the batch its profile allows."""
    parts = {"digest": digest, "arch": arch, "trt_version": trt_version, "precision": precision}
    for key, value in parts.items():
        if not re.fullmatch(r"[A-Za-z0-9._]+", value):
            raise ValueError(f"engine {key} {value!r} is not a plain name")
    return f"portrait-{digest}-{arch}-trt{trt_version}-{precision}-b{batch}-{width}x{height}.engine"


def gpu_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


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


def build_engine(onnx: bytes, batch: int) -> bytes:
    """A serialised engine for batches of 1 to `batch` rows, optimised for `batch`.

    The network is strongly typed: each tensor keeps the type the export gave it, which
    is fp16 for the photo, its samples and the compositing (as on PyTorch CUDA) and
    float32 for positions, whose fp16 rounding would be a visible fraction of a pixel.
    (TensorRT 11 builds only this way.) A TensorRT before strong typing gets the FP16
    flag instead and picks precision per layer.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PermanentError(f"TensorRT cannot parse the portrait network: {errors}")
    config = builder.create_builder_config()
    if typed is None and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    channels = len(CHANNELS)
    profile.set_shape(INPUT, (1, channels), (batch, channels), (batch, channels))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PermanentError("TensorRT could not build the portrait engine (see its log)")
    return bytes(plan)


class TensorRTBackend:
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
        kind = self.engine.get_tensor_dtype(OUTPUT)
        self.out_dtype = torch.float16 if kind == trt.DataType.HALF else torch.float32

    @classmethod
    def for_avatar(
        cls, renderer: PortraitRenderer, avatar: PortraitAvatar, size: int, engines: Path
    ) -> TensorRTBackend:
        """The engine for this avatar, size and the renderer's batch, from the cache
        under `engines` or built now (minutes; once per machine)."""
        trt = import_tensorrt()
        precision = "fp16" if renderer.dtype == torch.float16 else "fp32"
        batch = renderer.batch_size
        name = engine_name(
            avatar_digest(avatar, size),
            gpu_arch(renderer.device),
            trt.__version__,
            precision,
            batch,
            size,
            size,
        )

        def build() -> bytes:
            log.info("portrait renderer: building TensorRT engine %s", name)
            return build_engine(onnx_bytes(renderer, avatar, size, batch), batch)

        path = cached_engine(engines / name, build)
        try:
            return cls(path.read_bytes(), renderer.device)
        except ValueError:
            # Truncated by a full disk, or from a driver this TensorRT rejects: rebuild.
            log.warning("portrait renderer: engine %s unusable, rebuilding", name)
            path.unlink(missing_ok=True)
            return cls(cached_engine(path, build).read_bytes(), renderer.device)

    def __call__(self, track: torch.Tensor) -> torch.Tensor:
        rows = track.to(self.device, torch.float32).contiguous()
        if not self.context.set_input_shape(INPUT, tuple(rows.shape)):
            raise ValueError(f"batch of {rows.shape[0]} is outside the engine's profile")
        shape = tuple(self.context.get_tensor_shape(OUTPUT))
        frames = torch.empty(shape, dtype=self.out_dtype, device=self.device)
        self.context.set_tensor_address(INPUT, rows.data_ptr())
        self.context.set_tensor_address(OUTPUT, frames.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the portrait engine")
        return frames.to(torch.uint8)


# --- choice -------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendChoice:
    path: str  # "tensorrt" | "cuda" | "cpu"
    device: str  # the torch device it runs on
    reason: str


def choose_backend(device: str) -> str:
    """The path for a FARM_DEVICE value (auto, cpu, cuda[:N]): tensorrt, cuda or cpu."""
    return backend_choice(device).path


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
