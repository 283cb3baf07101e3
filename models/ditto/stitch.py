"""Ditto's stitching network (LivePortrait's S): a small MLP that reads the source and
driving 3-D keypoints and returns a correction for the driving ones (keypoints.stitch).

Ditto loads it from ``stitch_network.pth``: a dict whose ``"retarget_shoulder"`` entry
is the state dict, its keys prefixed ``module.`` (saved from DataParallel), e.g.
``module.mlp.0.weight``. `from_state_dict` takes that file's dict or the bare state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from farm.errors import PermanentError
from models.weights import load_strict, tensor_shape

from . import keypoints

CHECKPOINT_ENTRY = "retarget_shoulder"
PREFIX = "module."


@dataclass(frozen=True)
class StitchConfig:
    """The MLP's widths; the defaults are upstream's (≈0.05 M parameters): input 2 x 3K
    (source and driving keypoints, K = 21), output 3K + 2 (per-keypoint offsets, then
    one x/y shift)."""

    input_size: int = 126
    hidden_sizes: tuple[int, ...] = (128, 128, 64)
    output_size: int = 65


class StitchingNetwork(nn.Module):
    """[B, input_size] -> [B, output_size]: Linear layers with ReLU between them
    (``mlp.0``, ``mlp.2``, ... are the Linear layers, as in upstream's keys)."""

    Config = StitchConfig
    NAME = "stitching network"

    def __init__(self, config: StitchConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or StitchConfig()
        widths = (config.input_size, *config.hidden_sizes)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], config.output_size))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)

    def stitch(self, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        """x_d [B, K, 3] corrected for the source x_s [B, K, 3] (upstream's forward)."""
        return keypoints.stitch(x_s, x_d, self)

    @staticmethod
    def unwrap(checkpoint: Mapping[str, object]) -> dict[str, object]:
        """The bare state dict (``mlp.*`` keys) from what ``stitch_network.pth`` holds:
        its ``retarget_shoulder`` entry with the ``module.`` prefixes removed. A bare
        state dict is returned as it is."""
        state = checkpoint.get(CHECKPOINT_ENTRY, checkpoint)
        if not isinstance(state, Mapping):
            raise PermanentError(
                f"stitching network: checkpoint entry {CHECKPOINT_ENTRY!r} is a "
                f"{type(state).__name__}, expected a state dict"
            )
        return {k.removeprefix(PREFIX): v for k, v in state.items()}

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, object]) -> StitchConfig:
        """The widths of a bare state dict, read from its Linear weights."""
        # Linear layers sit at even indices (the ReLUs between them have no weights).
        n = 0
        while f"mlp.{2 * n}.weight" in state_dict:
            n += 1
        if n < 2:
            key = f"mlp.{2 * n}.weight"
            raise PermanentError(f"{cls.NAME}: missing key {key} (needed to infer the widths)")
        shapes = [tensor_shape(state_dict, f"mlp.{2 * i}.weight", 2, cls.NAME) for i in range(n)]
        return StitchConfig(
            input_size=shapes[0][1],
            hidden_sizes=tuple(s[0] for s in shapes[:-1]),
            output_size=shapes[-1][0],
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, object]) -> StitchingNetwork:
        """The network built to the checkpoint's widths, its weights loaded strictly, in
        eval mode. Takes ``stitch_network.pth``'s dict or a bare state dict.
        PermanentError (one line) for a missing, unexpected or mis-shaped key."""
        state = cls.unwrap(state_dict)
        module = cls(cls.config_from_state_dict(state))
        load_strict(module, state, cls.NAME)
        return module.eval()
