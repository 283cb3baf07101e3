"""Ditto's SPADE decoder (LivePortrait's G): the warped feature to the 512x512 face.

Written in farm, computing what upstream's `SPADEDecoder` computes (ditto-talkinghead
core/models/modules/spade_generator.py and util.py) with its state-dict keys and
shapes, so `decoder.pth` loads unchanged, spectral-norm convs included. Inference only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.weights import load_strict, tensor_shape

NAME = "decoder"

MIDDLE_BLOCKS = 6


class SpectralConv2d(nn.Module):
    """A Conv2d stored as `torch.nn.utils.spectral_norm` stores it (`weight_orig`, `bias`
    and the power-iteration vectors `weight_u`, `weight_v`), computed as spectral norm
    computes it in eval mode: weight = weight_orig / (u . (W v)), W = weight_orig as a
    [out, in*k*k] matrix, with u and v as loaded (no power-iteration update)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_orig = nn.Parameter(torch.empty(cout, cin, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight_orig, a=5**0.5)
        self.register_buffer("weight_u", F.normalize(torch.randn(cout), dim=0))
        self.register_buffer("weight_v", F.normalize(torch.randn(cin * kernel_size**2), dim=0))

    def weight(self) -> torch.Tensor:
        matrix = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(matrix, self.weight_v))
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


class SPADE(nn.Module):
    """Instance-normalise x (no affine), then scale and shift it per pixel by maps
    predicted from the segmentation feature resized (nearest) to x's size."""

    def __init__(self, channels: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_channels, hidden, kernel_size=3, padding=1), nn.ReLU()
        )
        self.mlp_gamma = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x)
        actv = self.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """Two SPADE -> LeakyReLU(0.2) -> spectral conv 3x3 steps plus a shortcut, which is
    itself SPADE -> spectral conv 1x1 (no bias) when the width changes."""

    def __init__(self, cin: int, cout: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        middle = min(cin, cout)
        self.learned_shortcut = cin != cout
        self.conv_0 = SpectralConv2d(cin, middle, 3)
        self.conv_1 = SpectralConv2d(middle, cout, 3)
        if self.learned_shortcut:
            self.conv_s = SpectralConv2d(cin, cout, 1, bias=False)
        self.norm_0 = SPADE(cin, label_channels, hidden)
        self.norm_1 = SPADE(middle, label_channels, hidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(cin, label_channels, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return shortcut + dx


class SPADEDecoder(nn.Module):
    """feature [B, in_channels, H, W] (upstream [B, 256, 64, 64]) -> RGB
    [B, 3, 8H, 8W] in [0, 1] (upstream [B, 3, 512, 512]): six SPADE blocks at H x W,
    two more each after a 2x nearest upsampling, a 3x3 conv to 12 channels,
    PixelShuffle x2 and a sigmoid."""

    @dataclass(frozen=True)
    class Config:
        """Widths of the decoder; the defaults are upstream's (Ditto's decoder.pth)."""

        in_channels: int = 256  # the warped feature, also SPADE's segmentation input
        out_channels: int = 64  # the last block's width, before the RGB conv
        hidden: int = 128  # SPADE's shared-MLP width

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SPADEDecoder.Config()
        wide = 2 * cfg.in_channels
        self.fc = nn.Conv2d(cfg.in_channels, wide, kernel_size=3, padding=1)
        for i in range(MIDDLE_BLOCKS):
            block = SPADEResnetBlock(wide, wide, cfg.in_channels, cfg.hidden)
            self.add_module(f"G_middle_{i}", block)
        self.up_0 = SPADEResnetBlock(wide, cfg.in_channels, cfg.in_channels, cfg.hidden)
        self.up_1 = SPADEResnetBlock(cfg.in_channels, cfg.out_channels, cfg.in_channels, cfg.hidden)
        self.conv_img = nn.Sequential(
            nn.Conv2d(cfg.out_channels, 3 * 2 * 2, kernel_size=3, padding=1),
            nn.PixelShuffle(upscale_factor=2),
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.fc(feature)
        for i in range(MIDDLE_BLOCKS):
            x = getattr(self, f"G_middle_{i}")(x, feature)
        x = self.up_0(F.interpolate(x, scale_factor=2.0), feature)
        x = self.up_1(F.interpolate(x, scale_factor=2.0), feature)
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))

    @classmethod
    def config_of(cls, state_dict: Mapping[str, torch.Tensor]) -> SPADEDecoder.Config:
        """The widths a state dict was made for, read from a few tensors' shapes."""
        return cls.Config(
            in_channels=tensor_shape(state_dict, "fc.weight", 4, NAME)[1],
            out_channels=tensor_shape(state_dict, "up_1.conv_1.weight_orig", 4, NAME)[0],
            hidden=tensor_shape(state_dict, "G_middle_0.norm_0.mlp_shared.0.weight", 4, NAME)[0],
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> SPADEDecoder:
        """Build the decoder the state dict was made for, load it strictly, in eval mode.
        Raises PermanentError on the first missing, unexpected or misshapen key."""
        net = cls(cls.config_of(state_dict))
        load_strict(net, state_dict, NAME)
        return net.eval()
