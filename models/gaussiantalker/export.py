"""GaussianTalker's per-frame deformation outside PyTorch: the ONNX graph of one avatar
and its TensorRT engine (which path a worker takes, and the engine cache, are
models/engines.py's). Rasterization stays in PyTorch (gsplat on CUDA).

The graph is one avatar's: inputs ``audio`` [B, 8, W, C], ``eye`` [B, 1] and ``camera``
[B, 12] (float32, B dynamic; see `Deformation.forward`), outputs the deformed raw
``xyz`` [B, N, 3], ``scales`` [B, N, 3], ``rotations`` [B, N, 4], ``opacity`` [B, N, 1]
and ``shs`` [B, N, 16, 3] (float32), what render activates and rasterizes. The avatar's
raw Gaussians and canonical grid features are constants of the graph, so the tri-plane
lookups never run per frame and TensorRT can fold around them.

Precision (the CUDA graph; `export_onnx` with ``dtype=torch.float16``). The work per
frame is per Gaussian (N of them, tens of thousands): the cross-attention block and the
five offset heads, about 70k multiply-adds per Gaussian. That part runs in fp16:

- the queries of the first layer (a constant, computed once in float32, rounded once),
  the attention scores and their softmax over the four tokens, the attended values,
  ``w_concat``, the feed-forward block and all five heads. Their outputs are offsets,
  small next to what they are added to, so fp16's relative error (2^-11) is a small
  absolute error;
- LayerNorm takes fp16 in and out but keeps its statistics in float32 (ONNX
  LayerNormalization, stash_type float): its eps (1e-12) underflows in fp16 and a sum
  of squares over 64 channels could overflow it.

In float32:

- the condition tokens (the audio encoder and its attention over 8 windows, the eye's
  and the camera's MLPs, the null token) and their keys and values: B rows, not N, so
  fp16 would save nothing there (TensorRT may take their matrix products in TF32, its
  default for float32: harmless, the keys and values go on in fp16);
- the eye encoding, which upstream computes in float64 (its frequencies reach ~5.6e3
  rad per unit of eye, where a float32 product is off by up to 2.4e-4 rad): TensorRT
  has no float64, so `eye_code` recovers the exact product in float32 pieces and reduces
  it by 2 pi before sin and cos (within ~1e-6 of float64);
- every addition of an offset to the PLY's raw value, and the outputs. The positions are
  world coordinates (|x| up to ~1.6), where fp16's step is ~1e-3: 1-2 pixels at 1080p
  and a focal length of ~2000 px, and a quantised, shimmering cloud. Scales (log),
  rotations and opacity (logit) are the rasterizer's geometry too, so they stay float32
  as well, and so do the SH colours (cheap, and the rasterizer takes float32).

`export_onnx` with ``dtype=torch.float32`` writes the same graph in float32 throughout
(the CPU-checkable one: onnxruntime on the CPU runs it, tests/unit).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import engines

from .deform_parts import EYE_CODE, SH_COEFFS
from .deformation import Deformation, Deformed

log = logging.getLogger(__name__)

# LayerNormalization entered ONNX in opset 17, which TensorRT 10's parser maps to its
# normalization layer.
OPSET = 17
INPUTS = ("audio", "eye", "camera")
OUTPUTS = ("xyz", "scales", "rotations", "opacity", "shs")
# The renderer's names of the raw Gaussians (GaussianTalkerRenderer._network), in the
# order of OUTPUTS.
GAUSSIANS = ("xyz", "scale", "rotation", "opacity", "sh")
# Source files whose code ends up in an engine: any change to them makes old engines stale.
SOURCES = ("export.py", "deformation.py", "deform_parts.py")
BACKEND = "gaussiantalker"


# --- the eye encoding without float64 -------------------------------------------------


def _split(value: float, bits: int) -> tuple[float, float]:
    """A float32 value as high + low, the high part rounded to `bits` significant bits
    (both float32, exact)."""
    exponent = math.frexp(value)[1] - bits
    high = float(np.float32(round(value / 2.0**exponent) * 2.0**exponent))
    return high, float(np.float32(value - high))


def _cody_waite(bits: int = 12) -> tuple[float, float, float]:
    """2 pi as three float32 parts, the first two of `bits` significant bits, so that
    n * part is exact for any integer n < 2^(24 - bits)."""
    c1, _ = _split(2 * math.pi, bits)
    c2, _ = _split(2 * math.pi - c1, bits)
    return c1, c2, float(np.float32(2 * math.pi - c1 - c2))


_TWO_PI = _cody_waite()
_EYE_STEP = 2.0**-12  # the eye's high part is a multiple of this


class EyeCode(nn.Module):
    """Upstream's eye encoding (`deform_parts.eye_encoding`) in float32 only.

    angle_k = eye * f_k with f_k = 10000^(2k/32) in float32, as upstream; upstream takes
    the product and its sin and cos in float64. Here eye = e_hi + e_lo (e_hi a multiple of
    2^-12) and f_k = f_hi + f_lo (f_hi of 10 significant bits): e_hi * f_hi is exact in
    float32 for |eye| < 2, and e_hi * f_lo + e_lo * f_k is small (|.| < 12) with an error
    of ~1e-6 rad. The exact part is reduced by n * 2 pi (Cody-Waite, three parts of 2 pi)
    before the small part is added, so sin and cos see |angle| <= pi + 1e-6. Plain ONNX
    ops (Mul, Round, Sub, Sin, Cos) that TensorRT runs in float32.
    """

    def __init__(self) -> None:
        super().__init__()
        k = torch.arange(EYE_CODE // 2, dtype=torch.float32)
        freq = torch.pow(10000, (2 * k) / EYE_CODE)  # float32, as eye_encoding's
        parts = [_split(float(f), 10) for f in freq]
        self.register_buffer("freq", freq)
        self.register_buffer("freq_hi", torch.tensor([p[0] for p in parts]))
        self.register_buffer("freq_lo", torch.tensor([p[1] for p in parts]))

    def forward(self, eye: torch.Tensor) -> torch.Tensor:
        """eye [B, 1] (float32) -> [B, 32] float32: sin/cos interleaved."""
        eye_hi = torch.round(eye / _EYE_STEP) * _EYE_STEP  # both exact (a power of 2)
        eye_lo = eye - eye_hi  # exact: |eye_lo| <= 2^-13
        exact = eye_hi * self.freq_hi  # [B, 16], exact
        small = eye_hi * self.freq_lo + eye_lo * self.freq
        n = torch.round((exact + small) * (1 / (2 * math.pi)))
        c1, c2, c3 = _TWO_PI
        angle = (((exact - n * c1) - n * c2) - n * c3) + small
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)


# --- the graph ------------------------------------------------------------------------


class PerFrame(nn.Module):
    """The per-frame part of one avatar's deformation (see the module docstring):
    forward(audio, eye, camera) -> (xyz, scales, rotations, opacity, shs), raw.

    `dtype` is the per-Gaussian compute type (float16 for TensorRT, float32 for parity);
    the condition tokens, the additions and the outputs are float32 either way. Built on
    the device of `features`.
    """

    def __init__(
        self,
        net: Deformation,
        gaussians: Mapping[str, torch.Tensor],
        features: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        dn = net.deformation_net
        self.dn = dn  # the float32 condition encoders (the per-Gaussian copies are below)
        self.eye_code = EyeCode().to(features.device)
        self.dtype = dtype
        self.n = int(features.shape[0])
        for name, out in zip(GAUSSIANS, OUTPUTS, strict=True):
            value = gaussians[name].detach().to(features.device, torch.float32)
            self.register_buffer(f"raw_{out}", value.contiguous())
        # Per-Gaussian constants and layers in `dtype`.
        first = dn.transformer.layers[0].enc_dec_attention
        with torch.no_grad():
            q = F.linear(features.float(), first.w_q.weight, first.w_q.bias)  # float32
        self.register_buffer("features", features.detach().to(dtype))
        self.register_buffer("query", self._heads(q[None], first.n_head).to(dtype))
        self.layers = nn.ModuleList(
            copy.deepcopy(layer).to(dtype) for layer in dn.transformer.layers
        )
        self.kv = [layer.enc_dec_attention for layer in dn.transformer.layers]  # float32
        heads = [dn.pos_deform, dn.scales_deform, dn.rotations_deform, dn.opacity_deform]
        heads.append(dn.shs_deform)
        self.hidden = nn.Linear(heads[0][1].in_features, sum(int(h[1].out_features) for h in heads))
        with torch.no_grad():  # the heads' first layers as one: [5 * width, d_model]
            self.hidden.weight.copy_(torch.cat([h[1].weight for h in heads]))
            self.hidden.bias.copy_(torch.cat([h[1].bias for h in heads]))
        self.hidden.to(features.device, dtype)
        self.splits = [int(h[1].out_features) for h in heads]
        self.outs = nn.ModuleList(copy.deepcopy(h[3]).to(dtype) for h in heads)

    @staticmethod
    def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
        """[B, rows, d] -> [B, heads, rows, d / heads] (static sizes but B: no shape
        arithmetic in the graph)."""
        rows, d = (int(s) for s in x.shape[1:])
        return x.reshape(-1, rows, n_head, d // n_head).transpose(1, 2)

    def _attend(self, i: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Layer i (upstream's AttentionLayer, post-norm) of x [N or B, N, d] in `dtype`
        on the tokens [B, 4, d] (float32) -> [B, N, d] in `dtype`."""
        layer, kv = self.layers[i], self.kv[i]
        att = layer.enc_dec_attention
        h = att.n_head
        d = int(tokens.shape[-1])
        # Keys and values of the 4 tokens in float32, the 1/sqrt(d_k) scale on the keys.
        k = self._heads(kv.w_k(tokens), h) * (1.0 / math.sqrt(d // h))
        v = self._heads(kv.w_v(tokens), h)
        q = self.query if i == 0 else self._heads(att.w_q(x), h)
        score = torch.softmax(q @ k.transpose(2, 3).to(self.dtype), dim=-1)  # [B, h, N, 4]
        attended = (score @ v.to(self.dtype)).transpose(1, 2).reshape(-1, self.n, d)
        x = self._norm(layer.norm1, att.w_concat(attended) + x)
        return self._norm(layer.norm2, layer.ffn(x) + x)

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # LayerNormalization in ONNX (statistics in float32 whatever x's type).
        return F.layer_norm(x, (int(norm.gamma.shape[0]),), norm.gamma, norm.beta, norm.eps)

    def forward(
        self, audio: torch.Tensor, eye: torch.Tensor, camera: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        tokens = self.dn.conditions(audio, eye, camera, eye_code=self.eye_code)  # float32
        x = self.features
        for i in range(len(self.layers)):
            x = self._attend(i, x, tokens)
        hidden = F.relu(self.hidden(F.relu(x)))  # the five heads' first layers
        chunks = torch.split(hidden, self.splits, dim=-1)
        offsets = [out(chunk).float() for out, chunk in zip(self.outs, chunks, strict=True)]
        offsets[-1] = offsets[-1].reshape(-1, self.n, SH_COEFFS, 3)
        raws = [self.raw_xyz, self.raw_scales, self.raw_rotations, self.raw_opacity]
        raws.append(self.raw_shs)
        return tuple(raw + offset for raw, offset in zip(raws, offsets, strict=True))


def export_onnx(
    net: Deformation,
    gaussians: Mapping[str, torch.Tensor],
    features: torch.Tensor,
    rows: int,
    path: str | Path | IO[bytes],
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write one avatar's per-frame graph as ONNX (see the module docstring): the raw
    Gaussians (the renderer's names, GAUSSIANS) and their canonical `features` folded in,
    audio windows of `rows` rows of the model's width. Traced on the device of
    `features` with an example of `batch` frames; the batch axis is dynamic."""
    device = features.device
    graph = PerFrame(net, gaussians, features, dtype).eval()
    example = (
        torch.zeros(batch, 8, rows, net.config.audio_in, device=device),
        torch.zeros(batch, 1, device=device),
        torch.zeros(batch, 12, device=device),
    )
    net.check_audio(example[0])
    target = str(path) if isinstance(path, Path) else path
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # The TorchScript exporter, as for the portrait network (models/portrait/export.py).
        torch.onnx.export(
            graph,
            example,
            target,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)},
            do_constant_folding=True,
        )


def onnx_bytes(
    net: Deformation,
    gaussians: Mapping[str, torch.Tensor],
    features: torch.Tensor,
    rows: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> bytes:
    """`export_onnx`'s graph as bytes."""
    buf = io.BytesIO()
    export_onnx(net, gaussians, features, rows, buf, batch, dtype)
    return buf.getvalue()


# --- TensorRT -------------------------------------------------------------------------


def window_rows(width: int) -> int:
    """The rows W of the audio windows a model of audio width C gets from its extractor
    (models/gaussiantalker/audio.py): 2 for HuBERT (1024), else 16."""
    from .audio import HUBERT_WIDTH, HubertHidden, Wav2Vec2Logits

    return HubertHidden.window if width == HUBERT_WIDTH else Wav2Vec2Logits.window


def avatar_digest(
    deformation_path: Path,
    gaussians: Mapping[str, torch.Tensor],
    rows: int,
    width: int,
    precision: str,
) -> str:
    """Names what an engine computes: the deformation weights, the Gaussians, the audio
    window's shape, the precision, the opset and the code (SOURCES)."""
    parts: list[bytes | str] = [f"opset {OPSET}", f"audio {rows}x{width}", precision]
    for name in GAUSSIANS:
        value = gaussians[name].detach().to("cpu", torch.float32).contiguous()
        parts += [f"{name} {list(value.shape)}", value.numpy().tobytes()]
    here = Path(__file__).parent
    return engines.digest(*parts, files=[deformation_path, *(here / s for s in SOURCES)])


def engine_file(digest: str, arch: str, trt_version: str, precision: str, batch: int, n: int):
    """The cache file name of one avatar's engine (models/engines.engine_name)."""
    return engines.engine_name(BACKEND, digest, arch, trt_version, precision, f"b{batch}-n{n}")


class TensorRTDeformation:
    """One avatar's deformation engine, called per frame like the PyTorch network:
    (audio [B, 8, W, C], eye [B, 1], camera [B, 12]) on the device -> `Deformed` (raw;
    no attention maps: an empty tensor)."""

    PRECISION = "fp16"

    def __init__(self, engine: engines.Engine, path: Path) -> None:
        self.engine = engine
        self.path = path

    @classmethod
    def for_network(
        cls,
        net: Deformation,
        gaussians: Mapping[str, torch.Tensor],
        features: torch.Tensor,
        *,
        deformation_path: Path,
        rows: int,
        batch: int,
        cache: Path,
    ) -> TensorRTDeformation:
        """The engine of one avatar's network (the renderer's `_network`: the module, its
        raw Gaussians and canonical features, on the CUDA device it runs on) for audio
        windows of `rows` rows, from `cache` or built now (minutes; once per machine).
        Profile: B from 1 to `batch`, tuned for 1 (the renderer deforms one frame at a
        time)."""
        trt = engines.import_tensorrt()
        width, n = net.config.audio_in, int(features.shape[0])
        net.check_audio(torch.zeros(1, 8, rows, width))
        digest = avatar_digest(deformation_path, gaussians, rows, width, cls.PRECISION)
        arch = engines.gpu_arch(features.device)
        name = engine_file(digest, arch, trt.__version__, cls.PRECISION, batch, n)
        shapes = {"audio": (8, rows, width), "eye": (1,), "camera": (12,)}
        profiles = {k: ((1, *s), (1, *s), (batch, *s)) for k, s in shapes.items()}

        def build() -> bytes:
            log.info("gaussiantalker renderer: building TensorRT engine %s", name)
            onnx = onnx_bytes(net, gaussians, features, rows, 1, torch.float16)
            return engines.build_engine(onnx, profiles, "gaussiantalker deformation")

        path = cache / name
        return cls(engines.Engine.cached(path, build, features.device), path)

    def __call__(self, audio: torch.Tensor, eye: torch.Tensor, camera: torch.Tensor) -> Deformed:
        out = self.engine(audio=audio, eye=eye, camera=camera)
        return Deformed(*(out[name] for name in OUTPUTS), attention=audio.new_empty(0))
