"""Ditto's appearance extractor (LivePortrait's F): a 256² RGB crop in, the 3-D feature
volume f_s [B, 32, 16, 64, 64] out, computed once per avatar.

Loads upstream's ``appearance_extractor.pth`` unchanged: the submodule names below
(``first``, ``down_blocks``, ``second``, ``resblocks_3d.3dr{i}``) are its state-dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from farm.errors import PermanentError
from models.weights import count_indexed, load_strict, tensor_shape


class SameBlock2d(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU, resolution kept."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU -> 2x2 average pool: half the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class ResBlock3d(nn.Module):
    """Pre-activation 3-D residual block: x + conv2(relu(bn2(conv1(relu(bn1(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


@dataclass(frozen=True)
class AppearanceConfig:
    """The extractor's widths; the defaults are upstream's (≈0.84 M parameters).

    The 2-D features after `second` have `max_features` channels, viewed as
    `reshape_channels` x `reshape_depth`, so those two must multiply to it.
    """

    image_channels: int = 3
    block_expansion: int = 64
    num_down_blocks: int = 2
    max_features: int = 512
    reshape_channels: int = 32
    reshape_depth: int = 16
    num_resblocks: int = 6

    def __post_init__(self) -> None:
        if self.reshape_channels * self.reshape_depth != self.max_features:
            raise ValueError(
                f"reshape_channels x reshape_depth ({self.reshape_channels} x "
                f"{self.reshape_depth}) must equal max_features ({self.max_features})"
            )

    def width(self, level: int) -> int:
        """Channels after `level` down blocks (level 0: after `first`)."""
        return min(self.max_features, self.block_expansion * 2**level)


class AppearanceExtractor(nn.Module):
    """Image [B, 3, H, W] in [0, 1] (no further normalisation) -> f_s
    [B, reshape_channels, reshape_depth, H / 2^num_down_blocks, W / 2^num_down_blocks];
    at full size and 256² input, [B, 32, 16, 64, 64]."""

    Config = AppearanceConfig
    NAME = "appearance extractor"

    def __init__(self, config: AppearanceConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AppearanceConfig()
        self.first = SameBlock2d(config.image_channels, config.block_expansion)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(config.width(i), config.width(i + 1)) for i in range(config.num_down_blocks)
        )
        self.second = nn.Conv2d(config.width(config.num_down_blocks), config.max_features, 1)
        self.resblocks_3d = nn.Sequential()
        for i in range(config.num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(config.reshape_channels))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.first(image)
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)
        b, _, h, w = out.shape
        volume = out.view(b, self.config.reshape_channels, self.config.reshape_depth, h, w)
        return self.resblocks_3d(volume)

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, object]) -> AppearanceConfig:
        """The widths that upstream's state dict was saved with, read from its shapes."""
        first = tensor_shape(state_dict, "first.conv.weight", 4, cls.NAME)
        second = tensor_shape(state_dict, "second.weight", 4, cls.NAME)
        res = tensor_shape(state_dict, "resblocks_3d.3dr0.conv1.weight", 5, cls.NAME)
        max_features, reshape_channels = second[0], res[0]
        if max_features % reshape_channels:
            raise PermanentError(
                f"{cls.NAME}: wrong shape for second.weight: {max_features} output channels,"
                f" not a multiple of the 3-D blocks' {reshape_channels}"
            )
        return AppearanceConfig(
            image_channels=first[1],
            block_expansion=first[0],
            num_down_blocks=count_indexed(state_dict, "down_blocks.", ".conv.weight"),
            max_features=max_features,
            reshape_channels=reshape_channels,
            reshape_depth=max_features // reshape_channels,
            num_resblocks=count_indexed(state_dict, "resblocks_3d.3dr", ".conv1.weight"),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, object]) -> AppearanceExtractor:
        """The extractor built to the state dict's widths, its weights loaded strictly,
        in eval mode. PermanentError (one line) for a missing, unexpected or
        mis-shaped key."""
        module = cls(cls.config_from_state_dict(state_dict))
        load_strict(module, state_dict, cls.NAME)
        return module.eval()
