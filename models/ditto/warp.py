"""Ditto's warping network (LivePortrait's W): the source feature volume moved from the
source keypoints to the driving keypoints, flattened to the decoder's 2-D feature.

Written in farm, computing what upstream's `WarpingNetwork` and `DenseMotionNetwork`
compute (ditto-talkinghead core/models/modules/, LivePortrait src/modules/), with
their state-dict keys and shapes, so `warp_network.pth` loads unchanged. Inference
only: BatchNorm uses its running statistics (the module is built in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from farm.errors import PermanentError
from models.weights import load_strict, tensor_shape

from .grid import grid_sample_3d

NAME = "warping network"

# The keypoint heatmaps' Gaussian variance, in normalised [-1, 1] coordinates.
KP_VARIANCE = 0.01


def coordinate_grid(depth: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Voxel centres in normalised coordinates, [D, H, W, 3] as (x, y, z): each axis
    runs from -1 at its first voxel to 1 at its last (upstream's make_coordinate_grid)."""

    def axis(size: int) -> torch.Tensor:
        return 2 * (torch.arange(size, dtype=like.dtype, device=like.device) / (size - 1)) - 1

    z = axis(depth).view(-1, 1, 1).expand(depth, height, width)
    y = axis(height).view(1, -1, 1).expand(depth, height, width)
    x = axis(width).view(1, 1, -1).expand(depth, height, width)
    return torch.stack([x, y, z], dim=3)


def keypoint_gaussians(kp: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """One Gaussian blob per keypoint over the grid: kp [B, K, 3], grid [D, H, W, 3] ->
    [B, K, D, H, W] (upstream's kp2gaussian)."""
    diff = grid.unsqueeze(0).unsqueeze(0) - kp.view(*kp.shape[:2], 1, 1, 1, 3)
    return torch.exp(-0.5 * (diff**2).sum(-1) / KP_VARIANCE)


class ConvNorm3d(nn.Module):
    """Conv3d, BatchNorm3d, ReLU, then optionally halve H and W by averaging
    (upstream's DownBlock3d with `pool`, and the conv/norm of UpBlock3d)."""

    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(cout)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm(self.conv(x)))
        return F.avg_pool3d(out, kernel_size=(1, 2, 2)) if self.pool else out


class UpBlock3d(ConvNorm3d):
    """Double H and W (nearest), then conv, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, pool=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=(1, 2, 2)))


class HourglassEncoder(nn.Module):
    """`blocks` down blocks; returns the input and every block's output, for the skips."""

    def __init__(self, widths: list[int], cin: int) -> None:
        super().__init__()
        ins = [cin, *widths[:-1]]
        pairs = zip(ins, widths, strict=True)
        self.down_blocks = nn.ModuleList(ConvNorm3d(a, b, pool=True) for a, b in pairs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    """Up blocks that concatenate the matching encoder output after each, then a last
    conv + BatchNorm + ReLU over (expansion + input) channels."""

    def __init__(self, widths: list[int], cin: int, expansion: int) -> None:
        super().__init__()
        outs = [min(widths[0], expansion), *widths[:-1]][::-1]
        ins = [widths[-1]] + [2 * c for c in outs[:-1]]
        self.up_blocks = nn.ModuleList(UpBlock3d(a, b) for a, b in zip(ins, outs, strict=True))
        self.out_channels = expansion + cin
        self.conv = nn.Conv3d(self.out_channels, self.out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_channels)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        out = skips[-1]
        for block, skip in zip(self.up_blocks, skips[-2::-1], strict=True):
            out = torch.cat([block(out), skip], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    """A 3-D U-Net that halves and restores H and W `blocks` times (D is kept)."""

    def __init__(self, cin: int, expansion: int, max_channels: int, blocks: int) -> None:
        super().__init__()
        widths = [min(max_channels, expansion * 2 ** (i + 1)) for i in range(blocks)]
        self.encoder = HourglassEncoder(widths, cin)
        self.decoder = HourglassDecoder(widths, cin, expansion)
        self.out_channels = self.decoder.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenseMotionNetwork(nn.Module):
    """From the keypoints and a compressed copy of the volume: a dense sampling field
    [B, D, H, W, 3] (a softmax blend of one rigid shift per keypoint plus the
    identity) and an occlusion map [B, 1, H, W]."""

    def __init__(self, config: WarpingNetwork.Config, use_gathers: bool) -> None:
        super().__init__()
        cfg = config
        self.num_kp = cfg.num_kp
        self.use_gathers = use_gathers
        cin = (cfg.num_kp + 1) * (cfg.compress + 1)
        self.hourglass = Hourglass(
            cin, cfg.hourglass_expansion, cfg.hourglass_max, cfg.hourglass_blocks
        )
        hidden = self.hourglass.out_channels
        self.mask = nn.Conv3d(hidden, cfg.num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(cfg.feature_channels, cfg.compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(cfg.compress)
        self.occlusion = nn.Conv2d(hidden * cfg.depth, 1, kernel_size=7, padding=3)

    def sample(self, volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if self.use_gathers:
            return grid_sample_3d(volume, grid)
        return F.grid_sample(volume, grid, align_corners=False)

    def forward(
        self, feature: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, d, h, w = feature.shape
        k = self.num_kp + 1
        feature = F.relu(self.norm(self.compress(feature)))  # [B, c, D, H, W]
        identity = coordinate_grid(d, h, w, feature)  # [D, H, W, 3]

        # Sampling grids: the identity, then per keypoint the identity shifted by
        # (source - driving) keypoint, computed in upstream's order.
        shifted = identity.view(1, 1, d, h, w, 3) - kp_driving.view(b, -1, 1, 1, 1, 3)
        shifted = shifted + kp_source.view(b, -1, 1, 1, 1, 3)
        motions = torch.cat([identity.expand(b, 1, d, h, w, 3), shifted], dim=1)

        # All K grids sample the one volume: stack them along depth, one call.
        deformed = self.sample(feature, motions.reshape(b, k * d, h, w, 3))
        deformed = deformed.view(b, -1, k, d, h, w).transpose(1, 2)  # [B, K, c, D, H, W]

        heatmap = keypoint_gaussians(kp_driving, identity) - keypoint_gaussians(kp_source, identity)
        heatmap = torch.cat([torch.zeros_like(heatmap[:, :1]), heatmap], dim=1)
        hourglass_in = torch.cat([heatmap.unsqueeze(2), deformed], dim=2).view(b, -1, d, h, w)
        prediction = self.hourglass(hourglass_in)

        mask = F.softmax(self.mask(prediction), dim=1).unsqueeze(2)  # [B, K, 1, D, H, W]
        deformation = (motions.permute(0, 1, 5, 2, 3, 4) * mask).sum(dim=1)  # [B, 3, D, H, W]
        deformation = deformation.permute(0, 2, 3, 4, 1)
        occlusion = torch.sigmoid(self.occlusion(prediction.reshape(b, -1, h, w)))
        return deformation, occlusion


class SameBlock2d(nn.Module):
    """Conv2d 3x3, BatchNorm2d, LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)))


class WarpingNetwork(nn.Module):
    """f_s [B, C, D, H, W] (upstream [B, 32, 16, 64, 64]), kp_source and kp_driving
    [B, K, 3] -> the warped feature [B, out_channels, H, W] (upstream [B, 256, 64, 64]),
    already multiplied by the occlusion map: what the SPADE decoder takes.

    `use_gathers` picks the 5-D sampler: `grid_sample_3d` (exports to plain ONNX) or
    `F.grid_sample`; both compute the same values.
    """

    @dataclass(frozen=True)
    class Config:
        """Widths of the network; the defaults are upstream's (Ditto's warp_network.pth)."""

        num_kp: int = 21
        feature_channels: int = 32  # C of f_s
        depth: int = 16  # D of f_s: `third` and the occlusion conv see C * D channels
        out_channels: int = 256
        compress: int = 4  # the volume's channels inside the dense-motion network
        hourglass_expansion: int = 32
        hourglass_max: int = 1024
        hourglass_blocks: int = 5

    def __init__(self, config: Config | None = None, use_gathers: bool = True) -> None:
        super().__init__()
        self.config = cfg = config or WarpingNetwork.Config()
        self.dense_motion_network = DenseMotionNetwork(cfg, use_gathers)
        self.third = SameBlock2d(cfg.feature_channels * cfg.depth, cfg.out_channels)
        self.fourth = nn.Conv2d(cfg.out_channels, cfg.out_channels, kernel_size=1)

    @property
    def use_gathers(self) -> bool:
        return self.dense_motion_network.use_gathers

    @use_gathers.setter
    def use_gathers(self, value: bool) -> None:
        self.dense_motion_network.use_gathers = value

    def forward(
        self, feature_3d: torch.Tensor, kp_source: torch.Tensor, kp_driving: torch.Tensor
    ) -> torch.Tensor:
        deformation, occlusion = self.dense_motion_network(feature_3d, kp_source, kp_driving)
        out = self.dense_motion_network.sample(feature_3d, deformation)  # [B, C, D, H, W]
        b, c, d, h, w = out.shape
        out = self.fourth(self.third(out.reshape(b, c * d, h, w)))
        return out * occlusion

    @classmethod
    def config_of(cls, state_dict: Mapping[str, torch.Tensor]) -> WarpingNetwork.Config:
        """The widths a state dict was made for, read from a few tensors' shapes."""
        prefix = "dense_motion_network."
        compress = tensor_shape(state_dict, prefix + "compress.weight", 5, NAME)
        mask = tensor_shape(state_dict, prefix + "mask.weight", 5, NAME)
        hidden = tensor_shape(state_dict, prefix + "hourglass.decoder.conv.weight", 5, NAME)[0]
        occlusion_in = tensor_shape(state_dict, prefix + "occlusion.weight", 4, NAME)[1]
        third = tensor_shape(state_dict, "third.conv.weight", 4, NAME)
        down = prefix + "hourglass.encoder.down_blocks.{}.conv.weight"
        blocks = 0
        while down.format(blocks) in state_dict:
            blocks += 1
        if blocks == 0:
            raise PermanentError(f"missing key {down.format(0)} (needed to infer the widths)")
        num_kp = mask[0] - 1
        cin = (num_kp + 1) * (compress[0] + 1)
        return cls.Config(
            num_kp=num_kp,
            feature_channels=compress[1],
            depth=max(1, occlusion_in // hidden),
            out_channels=third[0],
            compress=compress[0],
            hourglass_expansion=hidden - cin,
            hourglass_max=tensor_shape(state_dict, down.format(blocks - 1), 5, NAME)[0],
            hourglass_blocks=blocks,
        )

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], use_gathers: bool = True
    ) -> WarpingNetwork:
        """Build the network the state dict was made for, load it strictly, in eval mode.
        Raises PermanentError on the first missing, unexpected or misshapen key."""
        config = cls.config_of(state_dict)
        if config.hourglass_expansion <= 0:
            raise PermanentError(
                "wrong shape for dense_motion_network.hourglass.decoder.conv.weight: "
                f"fewer channels than the hourglass input ({config.hourglass_expansion})"
            )
        net = cls(config, use_gathers=use_gathers)
        load_strict(net, state_dict, NAME)
        return net.eval()
