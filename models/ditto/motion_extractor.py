"""Ditto's motion extractor (LivePortrait's M): a ConvNeXt-V2 (tiny at full size) with
seven linear heads that read a 256² RGB crop's canonical keypoints, head pose (as bin
logits), translation, expression offsets and scale.

Loads upstream's ``motion_extractor.pth`` unchanged: its keys all start with
``detector.`` (upstream wraps the ConvNeXt in a module under that name), and the names
below (``downsample_layers``, ``stages``, ``dwconv``, ``grn``, ``fc_*``) are its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from farm.errors import PermanentError
from models.weights import count_indexed, load_strict, tensor_shape

# Head names in the order upstream's network returns them.
OUTPUTS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W], written as upstream writes it (mean
    and biased variance over C, then the per-channel affine)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the last dimension, eps 1e-6 (the blocks' norm)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GRN(nn.Module):
    """Global response normalisation on [B, H, W, C]: each channel's L2 norm over the
    image, divided by the mean of those norms over channels, scales the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    """ConvNeXt-V2 block: depthwise 7x7, LayerNorm, 4x pointwise MLP with GELU and GRN,
    added to the input (stochastic depth is a no-op at inference)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = ChannelsLastLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class MotionConfig:
    """The network's widths; the defaults are upstream's (ConvNeXt-V2 tiny, 21
    keypoints, 66 pose bins: ≈28 M parameters)."""

    in_channels: int = 3
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    num_kp: int = 21
    num_bins: int = 66

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ValueError(f"dims {self.dims} and depths {self.depths} differ in length")


class ConvNeXtV2(nn.Module):
    """The backbone and heads: image -> the seven head outputs (see MotionExtractor)."""

    def __init__(self, config: MotionConfig) -> None:
        super().__init__()
        dims = config.dims
        stem = nn.Sequential(
            nn.Conv2d(config.in_channels, dims[0], kernel_size=4, stride=4),
            ChannelsFirstLayerNorm(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                nn.Sequential(
                    ChannelsFirstLayerNorm(dims[i]),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(dim) for _ in range(depth)))
            for dim, depth in zip(dims, config.depths, strict=True)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        width = dims[-1]
        self.fc_kp = nn.Linear(width, 3 * config.num_kp)
        self.fc_scale = nn.Linear(width, 1)
        self.fc_pitch = nn.Linear(width, config.num_bins)
        self.fc_yaw = nn.Linear(width, config.num_bins)
        self.fc_roll = nn.Linear(width, config.num_bins)
        self.fc_t = nn.Linear(width, 3)
        self.fc_exp = nn.Linear(width, 3 * config.num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        x = self.norm(x.mean(dim=(-2, -1)))
        return {name: getattr(self, f"fc_{name}")(x) for name in OUTPUTS}


class MotionExtractor(nn.Module):
    """Image [B, 3, H, W] in [0, 1] (no further normalisation; upstream feeds 256²) ->
    dict of the raw head outputs, as upstream's checkpoint produces them:

    - ``kp`` [B, 3K]: canonical keypoints, K = 21 (reshape to [B, K, 3])
    - ``pitch``, ``yaw``, ``roll`` [B, 66]: pose bin logits (keypoints.headpose_to_degrees)
    - ``t`` [B, 3]: translation; ``exp`` [B, 3K]: expression offsets; ``scale`` [B, 1]

    Upstream runs it under fp16 autocast; this module computes in its own dtype.
    """

    Config = MotionConfig
    NAME = "motion extractor"

    def __init__(self, config: MotionConfig | None = None) -> None:
        super().__init__()
        self.config = config or MotionConfig()
        self.detector = ConvNeXtV2(self.config)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(image)

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, object]) -> MotionConfig:
        """The widths that upstream's state dict was saved with, read from its shapes."""
        p = "detector."
        stem = tensor_shape(state_dict, f"{p}downsample_layers.0.0.weight", 4, cls.NAME)
        stages = count_indexed(state_dict, f"{p}stages.", ".0.dwconv.weight")
        if stages == 0:
            key = f"{p}stages.0.0.dwconv.weight"
            raise PermanentError(f"{cls.NAME}: missing key {key} (needed to infer the widths)")
        dims = [stem[0]]
        for i in range(1, stages):
            down = tensor_shape(state_dict, f"{p}downsample_layers.{i}.1.weight", 4, cls.NAME)
            dims.append(down[0])
        depths = [
            count_indexed(state_dict, f"{p}stages.{i}.", ".dwconv.weight") for i in range(stages)
        ]
        kp = tensor_shape(state_dict, f"{p}fc_kp.weight", 2, cls.NAME)
        bins = tensor_shape(state_dict, f"{p}fc_pitch.weight", 2, cls.NAME)
        return MotionConfig(
            in_channels=stem[1],
            dims=tuple(dims),
            depths=tuple(depths),
            num_kp=kp[0] // 3,
            num_bins=bins[0],
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, object]) -> MotionExtractor:
        """The network built to the state dict's widths, its weights loaded strictly,
        in eval mode. PermanentError (one line) for a missing, unexpected or
        mis-shaped key."""
        module = cls(cls.config_from_state_dict(state_dict))
        load_strict(module, state_dict, cls.NAME)
        return module.eval()
