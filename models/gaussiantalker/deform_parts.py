"""The parts of GaussianTalker's deformation network (models/gaussiantalker/deformation.py):
the tri-plane feature grid, the audio encoder and its attention over 8 frames, the
bias-free MLPs, the eye encoding and the Gaussians-attend-to-conditions transformer.

Attribute names follow upstream's (KU-CVLAB/GaussianTalker) so that the modules'
state-dict keys are those of ``deformation.pth``. Inference only: upstream's dropout
layers (identity in eval mode) are left out.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

# Upstream's fixed sizes (not in its config).
AUDIO_CODE = 32  # width of one frame's audio code (AudioNet's dim_aud)
AUDIO_FRAMES = 8  # frames in the audio window (AudioAttNet's seq_len)
AUDIO_ROWS = 16  # feature rows per frame (AudioNet's win_size)
EYE_CODE = 32  # width of the sinusoidal eye encoding
CAMERA_WIDTH = 12  # camera input: R (3x3, row-major) then T (3)
SH_COEFFS = 16  # SH degree 3


class PlaneGrid(nn.Module):
    """Upstream's HexPlaneField with 2-D planes over 3-D points (a tri-plane per level).

    ``grids[l][p]`` is the plane of level l over the coordinate pair
    ``itertools.combinations(range(3), 2)[p]`` ((x,y), (x,z), (y,z)), of shape
    [1, channels, res[second], res[first]] at level l's resolution. A point's feature is,
    per level, the product of its bilinear samples on the three planes (border padding,
    corners aligned); the levels are concatenated: [N, channels * levels].

    ``aabb`` [2, 3] holds (xyz_max, xyz_min) as upstream set them from the point cloud;
    points are mapped by (p - aabb[0]) * 2 / (aabb[1] - aabb[0]) - 1.
    """

    PAIRS = tuple(itertools.combinations(range(3), 2))

    def __init__(
        self,
        bounds: float,
        channels: int,
        resolution: tuple[int, int, int],
        multires: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.aabb = nn.Parameter(
            torch.tensor([[bounds] * 3, [-bounds] * 3], dtype=torch.float32), requires_grad=False
        )
        self.grids = nn.ModuleList()
        for multiplier in multires:
            res = [r * multiplier for r in resolution]
            # Overwritten by the checkpoint; drawn (as upstream initialises its planes,
            # uniform 0.1..0.5) so that a module built without one is seeded, not garbage.
            planes = nn.ParameterList(
                nn.Parameter(torch.empty(1, channels, res[b], res[a]).uniform_(0.1, 0.5))
                for a, b in self.PAIRS
            )
            self.grids.append(planes)
        self.feature_width = channels * len(multires)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """xyz [N, 3] (world) -> features [N, channels * levels]."""
        pts = (xyz - self.aabb[0]) * (2.0 / (self.aabb[1] - self.aabb[0])) - 1.0
        levels = []
        for planes in self.grids:
            feature: torch.Tensor | float = 1.0
            for plane, pair in zip(planes, self.PAIRS, strict=True):
                coords = pts[:, list(pair)].view(1, 1, -1, 2)
                sample = F.grid_sample(
                    plane, coords, mode="bilinear", padding_mode="border", align_corners=True
                )  # [1, C, 1, N]
                feature = feature * sample[0, :, 0].transpose(0, 1)
            levels.append(feature)
        return torch.cat(levels, dim=-1)


def head(width_in: int, width: int, width_out: int) -> nn.Sequential:
    """ReLU, Linear, ReLU, Linear: upstream's per-attribute heads (keys ``1.*``, ``3.*``)."""
    return nn.Sequential(
        nn.ReLU(), nn.Linear(width_in, width), nn.ReLU(), nn.Linear(width, width_out)
    )


class CanonicalTriPlane(nn.Module):
    """Upstream's canonical_tri_plane: the feature grid plus the coarse stage's MLPs.

    At render time (the fine stage) only ``grid`` is used; ``feature_out`` and the
    scales/rotations/opacity/shs heads produced the canonical Gaussians during training
    (their result is baked into the PLY) and are kept so ``deformation.pth`` loads.
    """

    def __init__(
        self,
        bounds: float,
        channels: int,
        resolution: tuple[int, int, int],
        multires: tuple[int, ...],
        depth: int,
        width: int,
        d_model: int,
    ) -> None:
        super().__init__()
        self.grid = PlaneGrid(bounds, channels, resolution, multires)
        layers: list[nn.Module] = [nn.Linear(d_model, width)]
        for _ in range(depth - 1):
            layers += [nn.ReLU(), nn.Linear(width, width)]
        self.feature_out = nn.Sequential(*layers)
        self.scales = head(width, width, 3)
        self.rotations = head(width, width, 4)
        self.opacity = head(width, width, 1)
        self.shs = head(width, width, SH_COEFFS * 3)


class BiasFreeMLP(nn.Module):
    """Upstream's MLP: ``layers`` bias-free Linear layers (``net.i``), ReLU between them."""

    def __init__(self, width_in: int, width_out: int, hidden: int, layers: int) -> None:
        super().__init__()
        widths = [width_in] + [hidden] * (layers - 1) + [width_out]
        self.net = nn.ModuleList(
            nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i < len(self.net) - 1:
                x = F.relu(x)
        return x


class AudioEncoder(nn.Module):
    """Upstream's AudioNet: one frame's features [F, C, 16] -> codes [F, 32].

    Four stride-2 convolutions (16 -> 8 -> 4 -> 2 -> 1 time steps, widths 32, 32, 64, 64,
    LeakyReLU 0.02) then Linear 64 -> 64 -> 32. C is read from ``encoder_conv.0.weight``.
    """

    def __init__(self, audio_in: int) -> None:
        super().__init__()
        widths = [audio_in, 32, 32, 64, 64]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv1d(a, b, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(0.02)]
        self.encoder_conv = nn.Sequential(*layers)
        self.encoder_fc1 = nn.Sequential(
            nn.Linear(64, 64), nn.LeakyReLU(0.02), nn.Linear(64, AUDIO_CODE)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One time step is left (W <= 16); flatten, not squeeze, exports without an If.
        return self.encoder_fc1(self.encoder_conv(x[:, :, :AUDIO_ROWS]).flatten(1))


class AudioAttention(nn.Module):
    """Upstream's AudioAttNet: the 8 frame codes [B, 8, 32] -> their weighted sum [B, 32]
    (upstream runs it on one frame at a time, B = 1).

    Convolutions over the frame axis (32 -> 16 -> 8 -> 4 -> 2 -> 1 channels, LeakyReLU
    0.02 after each) give one score per frame; Linear 8 -> 8 and a softmax turn the
    scores into the weights.
    """

    def __init__(self) -> None:
        super().__init__()
        widths = [AUDIO_CODE, 16, 8, 4, 2, 1]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv1d(a, b, kernel_size=3, stride=1, padding=1), nn.LeakyReLU(0.02)]
        self.attentionConvNet = nn.Sequential(*layers)
        self.attentionNet = nn.Sequential(nn.Linear(AUDIO_FRAMES, AUDIO_FRAMES), nn.Softmax(dim=1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        scores = self.attentionConvNet(codes.permute(0, 2, 1)).view(b, AUDIO_FRAMES)
        weights = self.attentionNet(scores).view(b, AUDIO_FRAMES, 1)
        return (weights * codes).sum(dim=1)


def eye_encoding(eye: torch.Tensor) -> torch.Tensor:
    """eye [B, 1] -> [B, 32]: sin/cos interleaved of eye * 10000^(2k/32), k = 0..15.

    Upstream multiplies (not divides) by the frequencies, so the highest is ~5.6e3: the
    products are taken in float64 as upstream's (its eye values are numpy float64), then
    the result is cast to float32.
    """
    k = torch.arange(EYE_CODE // 2, device=eye.device, dtype=torch.float32)
    freq = torch.pow(10000, (2 * k) / EYE_CODE)  # float32, as upstream computes it
    angle = eye.to(torch.float64) * freq.to(torch.float64)  # [B, 16]
    code = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)
    return code.to(torch.float32)


class LayerNorm(nn.Module):
    """Upstream's LayerNorm (``gamma``, ``beta``; biased variance, eps 1e-12)."""

    def __init__(self, width: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))
        self.beta = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return self.gamma * ((x - mean) / torch.sqrt(var + self.eps)) + self.beta


class MultiHeadAttention(nn.Module):
    """Queries from the Gaussians, keys/values from the conditions (``w_q``, ``w_k``,
    ``w_v``, ``w_concat``: d_model x d_model with bias). Returns the output [B, N, d] and
    the attention weights [B, heads, N, S]."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_concat = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_head, d // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (
            self._split(self.w_q(x)),
            self._split(self.w_k(source)),
            self._split(self.w_v(source)),
        )
        score = torch.softmax((q @ k.transpose(2, 3)) / math.sqrt(k.shape[-1]), dim=-1)
        out = (score @ v).transpose(1, 2).contiguous().view(x.shape)
        return self.w_concat(out), score


class FeedForward(nn.Module):
    """Linear d -> hidden, ReLU, Linear hidden -> d (``linear1``, ``linear2``)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden)
        self.linear2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class AttentionLayer(nn.Module):
    """One post-norm cross-attention block: x = norm1(x + attn(x, source)), then
    x = norm2(x + ffn(x)). Each Gaussian attends only to the conditions, never to other
    Gaussians, so every Gaussian's output is independent of the others."""

    def __init__(self, d_model: int, n_head: int, ffn_hidden: int) -> None:
        super().__init__()
        self.enc_dec_attention = MultiHeadAttention(d_model, n_head)
        self.norm1 = LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_hidden)
        self.norm2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, score = self.enc_dec_attention(x, source)
        x = self.norm1(attended + x)
        x = self.norm2(self.ffn(x) + x)
        return x, score


class ConditionTransformer(nn.Module):
    """Upstream's Spatial_Audio_Attention_Module: ``layers`` AttentionLayers.

    x [B, N, d] (per-Gaussian features), source [B, S, d] (the condition tokens) ->
    (x [B, N, d], attention [B, layers, N, S], each layer's weights averaged over heads).
    """

    def __init__(self, d_model: int, n_head: int, ffn_hidden: int, n_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            AttentionLayer(d_model, n_head, ffn_hidden) for _ in range(n_layer)
        )

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for layer in self.layers:
            x, score = layer(x, source)
            maps.append(score.mean(dim=1, keepdim=True))
        return x, torch.cat(maps, dim=1)
