"""Ditto's networks outside PyTorch: warp + decoder as one ONNX graph for a TensorRT
engine, and the stitching network's ONNX export. (Which path a worker takes, the engine
cache and running an engine are models/engines.py's.)

The render graph is what `DittoRenderer.crops` computes, for a batch of driving
keypoints against one avatar:

    f_s [1, C, D, 64, 64]  the avatar's appearance feature volume (upstream 32 x 16)
    x_s [1, K, 3]          its posed source keypoints (K = 21)
    x_d [B, K, 3]          the driving keypoints, B dynamic
    -> image [B, 3, 512, 512] float32 in [0, 1]

f_s and x_s are expanded to B inside the graph, so one engine serves every avatar on a
worker. Both 5-D samplings are `grid_sample_3d`'s gathers: the graph holds plain ONNX
ops only, which any TensorRT builds without a plugin and onnxruntime runs.

Precision of the fp16 graph (what a GPU worker builds; TensorRT's network is strongly
typed, so these dtypes are what runs):

- float32, everything that is a position or decides one: the keypoints, the voxel grid,
  the K + 1 shifted sampling grids, the keypoints' Gaussian heatmaps (the hourglass reads
  the difference of two nearly equal maps), the softmax of the mask logits and the
  mask-weighted blend of the grids into the deformation field (the final warp's sampling
  positions), and the sampler's index and interpolation-weight arithmetic: in fp16 a
  voxel coordinate near 63 steps by 1/32 of a voxel, a quarter of an output pixel.
  Each sample is the weighted sum of 8 fp16 voxels, accumulated in float32.
- float32 statistics for SPADE's instance normalisation (mean and variance over up to
  256 x 256 pixels: a sum of squares over that many overflows fp16 if accumulated in
  it), applied to fp16 data.
- fp16, the arithmetic: every convolution (the hourglass, the mask and occlusion convs,
  the 2-D blocks after the warp, the whole decoder: nearly all of the ~1.2 TFLOP a
  frame), the feature volume and the activations between convolutions. The mask conv
  stays fp16 too: its logits go to a float32 softmax, as under PyTorch's autocast, and
  an fp32 conv would run as TF32 by default (the same 10-bit mantissa) at half the
  speed.
- Weights are rounded once, after the exact work in float32: BatchNorm is folded into
  the convolution before it and spectral norm's division is done, then the convolution
  weights are cast to fp16.

Measured on the CPU at reduced widths (f_s 8 x 4 x 16 x 16), against the float32
networks: this split is off by at most 2.4e-3 (mean 3.1e-4) of the [0, 1] image in
PyTorch's fp16 and 1.1e-3 (mean 1.3e-4) in onnxruntime; with the positions in fp16 as
well, 1.5e-2 (mean 1.7e-3), about four levels of 255.

The float32 graph (the same code with dtype float32) is what the CPU tests compare with
PyTorch on onnxruntime.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models import engines

from . import keypoints
from .decoder import SPADE, SPADEDecoder, SpectralConv2d
from .grid import grid_sample_3d
from .stitch import StitchingNetwork
from .warp import WarpingNetwork, coordinate_grid, keypoint_gaussians

if TYPE_CHECKING:
    from .renderer import DittoRenderer

log = logging.getLogger(__name__)

# 17 is well covered by onnxruntime and by the ONNX parser of TensorRT 10.
OPSET = 17
INPUTS = ("f_s", "x_s", "x_d")
OUTPUT = "image"
FEATURE_SIZE = 64  # H and W of f_s (the appearance extractor's output)
CROP = 512  # the decoder's output
# Source files whose code ends up in the render engine: a change makes old engines stale.
NETWORK_SOURCES = ("export.py", "warp.py", "grid.py", "decoder.py")
# The checkpoints whose weights are constants of the engine (checkpoints.FILES roles).
ENGINE_WEIGHTS = ("warp", "decoder")


# --- the render graph ---------------------------------------------------------------


def _fold_batchnorm(conv: nn.Module, norm: nn.Module) -> bool:
    """Fold an eval-mode BatchNorm into the convolution before it, in place, in the
    convolution's dtype. False (nothing done) unless they are such a pair."""
    if not isinstance(conv, nn.Conv2d | nn.Conv3d):
        return False
    if not isinstance(norm, nn.BatchNorm2d | nn.BatchNorm3d) or norm.running_var is None:
        return False
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        shift = (bias - norm.running_mean) * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(shift)
    return True


def _plain_conv(spectral: SpectralConv2d) -> nn.Conv2d:
    """The spectral-norm convolution as a plain Conv2d with its normalised weight."""
    weight = spectral.weight().detach()
    cout, cin, k, _ = weight.shape
    conv = nn.Conv2d(cin, cout, k, padding=spectral.padding, bias=spectral.bias is not None)
    conv = conv.to(weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if spectral.bias is not None:
            conv.bias.copy_(spectral.bias)
    return conv


class _SpadeFp32Statistics(nn.Module):
    """SPADE (decoder.py) with its instance normalisation computed on a float32 copy of
    x; the result and the modulation stay in x's dtype. Same values for float32 x."""

    def __init__(self, spade: SPADE) -> None:
        super().__init__()
        self.spade = spade

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        spade = self.spade
        normalized = F.instance_norm(x.float()).to(x.dtype)
        actv = spade.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return normalized * (1 + spade.mlp_gamma(actv)) + spade.mlp_beta(actv)


def _rounded_once(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `net` for export: BatchNorm folded and spectral norm applied in float32,
    SPADE's statistics in float32, then cast to `dtype`; eval mode, no gradients."""
    net = copy.deepcopy(net).float().eval()
    for module in list(net.modules()):
        for conv_name in ("conv", "compress"):
            conv, norm = getattr(module, conv_name, None), getattr(module, "norm", None)
            if conv is not None and norm is not None and _fold_batchnorm(conv, norm):
                module.norm = nn.Identity()
        for name, child in list(module.named_children()):
            if isinstance(child, SpectralConv2d):
                setattr(module, name, _plain_conv(child))
            elif isinstance(child, SPADE):
                setattr(module, name, _SpadeFp32Statistics(child))
    return net.to(dtype).requires_grad_(False)


class RenderGraph(nn.Module):
    """warp -> decoder -> clamp for B driving keypoint sets against one avatar, with the
    precision split of this module's docstring. Computes what `WarpingNetwork` and
    `SPADEDecoder` compute (the dense-motion step is spelled out here to place the
    float32 parts); the float32 graph matches them to float32 rounding."""

    def __init__(self, warp: WarpingNetwork, decoder: SPADEDecoder, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype  # of the convolutions and the feature volume
        self.warp = _rounded_once(warp, dtype)
        self.warp.use_gathers = True  # no 5-D GridSample in the graph
        self.decoder = _rounded_once(decoder, dtype)

    def forward(self, f_s: torch.Tensor, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        b = x_d.shape[0]
        f_s = f_s.to(self.dtype).expand(b, -1, -1, -1, -1)
        x_s = x_s.float().expand(b, -1, -1)
        x_d = x_d.float()
        deformation, occlusion = self.dense_motion(f_s, x_s, x_d)
        warped = grid_sample_3d(f_s, deformation).to(self.dtype)  # [B, C, D, H, W]
        n, c, d, h, w = warped.shape
        warp = self.warp
        feature = warp.fourth(warp.third(warped.reshape(n, c * d, h, w))) * occlusion
        return self.decoder(feature).float().clamp(0, 1)

    def dense_motion(
        self, feature: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DenseMotionNetwork.forward (warp.py) with positions in float32: the
        deformation field [B, D, H, W, 3] float32, the occlusion map [B, 1, H, W]."""
        net = self.warp.dense_motion_network
        b, _, d, h, w = feature.shape
        k = net.num_kp + 1
        compressed = F.relu(net.norm(net.compress(feature)))
        identity = coordinate_grid(d, h, w, kp_driving)  # float32, as the keypoints
        shifted = identity.view(1, 1, d, h, w, 3) - kp_driving.view(b, -1, 1, 1, 1, 3)
        shifted = shifted + kp_source.view(b, -1, 1, 1, 1, 3)
        motions = torch.cat([identity.expand(b, 1, d, h, w, 3), shifted], dim=1)
        deformed = grid_sample_3d(compressed, motions.reshape(b, k * d, h, w, 3))
        deformed = deformed.view(b, -1, k, d, h, w).transpose(1, 2)
        heatmap = keypoint_gaussians(kp_driving, identity) - keypoint_gaussians(kp_source, identity)
        heatmap = torch.cat([torch.zeros_like(heatmap[:, :1]), heatmap], dim=1)
        hourglass_in = torch.cat([heatmap.unsqueeze(2), deformed], dim=2).view(b, -1, d, h, w)
        prediction = net.hourglass(hourglass_in.to(self.dtype))
        mask = F.softmax(net.mask(prediction).float(), dim=1).unsqueeze(2)
        deformation = (motions.permute(0, 1, 5, 2, 3, 4) * mask).sum(dim=1)
        occlusion = torch.sigmoid(net.occlusion(prediction.reshape(b, -1, h, w)))
        return deformation.permute(0, 2, 3, 4, 1), occlusion


def example_inputs(
    warp: WarpingNetwork,
    batch: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    size: int = FEATURE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (f_s, x_s, x_d) of the graph's shapes for `warp`'s widths: a volume of unit
    variance and driving keypoints near the source ones, as in a real job. (`size`, the
    volume's H and W, is 64 for the real networks; the decoder's image is 8 x that.)"""
    cfg = warp.config
    gen = torch.Generator().manual_seed(seed)
    f_s = torch.randn(1, cfg.feature_channels, cfg.depth, size, size, generator=gen)
    x_s = (torch.rand(1, cfg.num_kp, 3, generator=gen) * 2 - 1) * 0.7
    x_d = x_s + torch.randn(batch, cfg.num_kp, 3, generator=gen) * 0.05
    return f_s.to(device), x_s.to(device), x_d.to(device)


def export_render(
    warp: WarpingNetwork,
    decoder: SPADEDecoder,
    path: str | Path | IO[bytes],
    batch: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    size: int = FEATURE_SIZE,
) -> None:
    """Write the render graph as ONNX, traced on `device` with an example of `batch`
    frames (the batch axis stays dynamic). f_s is an input of `dtype` (the avatar keeps
    it in fp16), x_s and x_d float32, the image float32."""
    graph = RenderGraph(warp, decoder, dtype).to(device)
    f_s, x_s, x_d = example_inputs(graph.warp, batch, device, size=size)
    target = str(path) if isinstance(path, Path) else path
    with warnings.catch_warnings():
        # Tracer notes (shapes read as Python numbers where they are constants), the
        # exporter's deprecation notice, and its note that instance_norm normalises by
        # the input's own statistics, which is what SPADE does.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", ".*'instance_norm' is set to train=True", UserWarning)
        # The TorchScript exporter (dynamo=False): the torch.export-based one needs
        # onnxscript, which farm does not install.
        torch.onnx.export(
            graph,
            (f_s.to(dtype), x_s, x_d),
            target,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes={"x_d": {0: "batch"}, OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )


def render_onnx(
    warp: WarpingNetwork,
    decoder: SPADEDecoder,
    batch: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    size: int = FEATURE_SIZE,
) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad():
        export_render(warp, decoder, buf, batch, dtype, device, size)
    return buf.getvalue()


# --- the stitching network ----------------------------------------------------------

STITCH_INPUTS = ("x_s", "x_d")
STITCH_OUTPUT = "x_d_stitched"


class StitchGraph(nn.Module):
    """keypoints.stitch: x_d [B, K, 3] corrected against x_s [B, K, 3]."""

    def __init__(self, net: StitchingNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        return keypoints.stitch(x_s, x_d, self.net)


def stitch_onnx(net: StitchingNetwork, batch: int = 2) -> bytes:
    """The stitching network (with its input flattening and output split) as float32
    ONNX, batch axis dynamic. Exported for completeness and checked against PyTorch; no
    engine runs it: it is a 0.05 M-parameter MLP that runs once per job, in plan, over
    the whole job's frames in float32 (DittoRenderer.stitch), not per rendered frame."""
    graph = StitchGraph(copy.deepcopy(net).float().cpu().eval().requires_grad_(False))
    k = net.config.input_size // 6  # 2 x 3K inputs
    x_s = torch.zeros(batch, k, 3)
    x_d = torch.zeros(batch, k, 3)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            (x_s, x_d),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(STITCH_INPUTS),
            output_names=[STITCH_OUTPUT],
            dynamic_axes={name: {0: "batch"} for name in (*STITCH_INPUTS, STITCH_OUTPUT)},
        )
    return buf.getvalue()


# --- TensorRT -----------------------------------------------------------------------


def render_digest(weights: Mapping[str, str], warp: WarpingNetwork, precision: str) -> str:
    """Names what a render engine computes: the graph's code (NETWORK_SOURCES), the
    opset, the precision, f_s's shape and the weights (`weights`: the sha256 of each
    ENGINE_WEIGHTS checkpoint file, by role)."""
    cfg = warp.config
    here = Path(__file__).parent
    return engines.digest(
        f"opset {OPSET}",
        f"precision {precision}",
        f"f_s {cfg.feature_channels}x{cfg.depth}x{FEATURE_SIZE}x{FEATURE_SIZE}",
        *(f"{role} {weights[role]}" for role in ENGINE_WEIGHTS),
        files=[here / name for name in NETWORK_SOURCES],
    )


def engine_path(
    renderer: DittoRenderer, arch: str, trt_version: str, precision: str = "fp16"
) -> Path:
    """Where the renderer's engine is cached: under its engine_dir (else the checkpoint
    root's engines/), named by what it computes (the loaded weights' hashes), the GPU
    architecture, TensorRT's version, the precision and the largest batch."""
    assert renderer.root is not None, "load() first"
    name = engines.engine_name(
        "ditto",
        render_digest(renderer.checkpoint_sha256, renderer.nets["warp"], precision),
        arch,
        trt_version,
        precision,
        f"b{renderer.batch_size}-{CROP}",
    )
    return (renderer.engine_dir or renderer.root / "engines") / name


def profiles(warp: WarpingNetwork, batch: int) -> engines.Profiles:
    """x_d from 1 to `batch` frames, tuned for `batch` (f_s and x_s are static)."""
    k = warp.config.num_kp
    return {"x_d": ((1, k, 3), (batch, k, 3), (batch, k, 3))}


def build_render_engine(renderer: DittoRenderer) -> bytes:
    """A serialised fp16 engine of the renderer's warp + decoder, exported on its device
    (minutes at full size)."""
    warp, decoder, batch = renderer.nets["warp"], renderer.nets["decoder"], renderer.batch_size
    onnx = render_onnx(warp, decoder, batch, torch.float16, renderer.device)
    return engines.build_engine(onnx, profiles(warp, batch), "ditto render graph")


class TensorRTRender:
    """The render engine, called like `DittoRenderer.crops`: (f_s, x_s, x_d) on the
    device -> [B, 3, 512, 512] float32 in [0, 1], for any B (run in slices of at most
    the profile's largest batch)."""

    def __init__(self, engine: engines.Engine, batch: int, path: Path) -> None:
        self.engine = engine
        self.batch = batch
        self.path = path

    @classmethod
    def for_renderer(cls, renderer: DittoRenderer) -> TensorRTRender:
        """The engine for the renderer's weights and batch size, from the cache or built
        now (minutes; once per machine, under a file lock)."""
        trt = engines.import_tensorrt()
        path = engine_path(renderer, engines.gpu_arch(renderer.device), trt.__version__)

        def build() -> bytes:
            log.info("ditto renderer: building TensorRT engine %s", path.name)
            return build_render_engine(renderer)

        engine = engines.Engine.cached(path, build, renderer.device)
        return cls(engine, renderer.batch_size, path)

    def __call__(self, f_s: torch.Tensor, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        images = [
            self.engine(f_s=f_s, x_s=x_s, x_d=x_d[first : first + self.batch])[OUTPUT]
            for first in range(0, x_d.shape[0], self.batch)
        ]
        return (images[0] if len(images) == 1 else torch.cat(images)).float()
