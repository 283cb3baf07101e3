"""The portrait network outside PyTorch: ONNX export, and the onnxruntime and TensorRT
backends (which path a worker takes, and the engine cache, are models/engines.py's).

An engine is one avatar at one size: the avatar's fields and photo are constants of the
graph, so TensorRT can fold and fuse around them. It is built on the first render of
that avatar and size, then kept on disk under FARM_MODEL_DIR/engines.
Every backend is called like `PortraitNet`: (N, C) float32 track rows in, (N, S, S, 3)
uint8 frames out.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import torch

from farm.errors import MissingDependency
from models import engines
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


class TensorRTBackend:
    """The portrait engine of one avatar and size, called like `PortraitNet`."""

    def __init__(self, engine: engines.Engine) -> None:
        self.engine = engine

    @classmethod
    def for_avatar(
        cls, renderer: PortraitRenderer, avatar: PortraitAvatar, size: int, cache: Path
    ) -> TensorRTBackend:
        """The engine for this avatar, size and the renderer's batch, from the cache
        under `cache` or built now (minutes; once per machine)."""
        trt = engines.import_tensorrt()
        precision = "fp16" if renderer.dtype == torch.float16 else "fp32"
        batch = renderer.batch_size
        name = engines.engine_name(
            "portrait",
            avatar_digest(avatar, size),
            engines.gpu_arch(renderer.device),
            trt.__version__,
            precision,
            f"b{batch}-{size}x{size}",
        )
        channels = len(CHANNELS)
        profiles = {INPUT: ((1, channels), (batch, channels), (batch, channels))}

        def build() -> bytes:
            log.info("portrait renderer: building TensorRT engine %s", name)
            onnx = onnx_bytes(renderer, avatar, size, batch)
            return engines.build_engine(onnx, profiles, "portrait network")

        backend = cls(engines.Engine.cached(cache / name, build, renderer.device))
        engines.note_owner(cache / name, avatar.cache.get("owner"))  # workers/avatars.py
        return backend

    def __call__(self, track: torch.Tensor) -> torch.Tensor:
        return self.engine(**{INPUT: track.float()})[OUTPUT].to(torch.uint8)
