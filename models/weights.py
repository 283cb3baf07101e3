"""Loading a network's weights strictly, one way for every backend's networks (Ditto's
six, GaussianTalker's deformation): every key and shape of farm's module must be in
the file and nothing else, and a checkpoint that is not gets one line naming the
network, the first bad key and both shapes. Widths are read
from a few tensors' shapes (`tensor_shape`, `count_indexed`) before the module is
built, so reduced-width files (the tests') load by the same code as the real ones."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from farm.errors import PermanentError

# Keys torch itself tolerates missing (BatchNorm fills them in for checkpoints saved
# before it tracked batches); every other key must be present.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def load_strict(module: nn.Module, state_dict: Mapping[str, object], what: str) -> None:
    """Load `state_dict` into `module` only if every key and shape matches.

    Raises PermanentError with one line naming the first bad key: the first of the
    module's keys (in its order) that is missing or has another shape, else the first
    key of the state dict that the module does not have. `what` names the network.
    """
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            if key.endswith(OPTIONAL_SUFFIXES):
                continue
            raise PermanentError(
                f"{what}: missing key {key} (expected shape {_shape(tensor.shape)})"
            )
        found = state_dict[key]
        if not isinstance(found, torch.Tensor):
            raise PermanentError(
                f"{what}: {key} is a {type(found).__name__}, "
                f"expected a tensor of shape {_shape(tensor.shape)}"
            )
        if found.shape != tensor.shape:
            raise PermanentError(
                f"{what}: wrong shape for {key}: expected {_shape(tensor.shape)}, "
                f"found {_shape(found.shape)}"
            )
    for key, found in state_dict.items():
        if key not in expected:
            shape = _shape(found.shape) if isinstance(found, torch.Tensor) else "none"
            raise PermanentError(f"{what}: unexpected key {key} (found shape {shape})")
    present = {k: v for k, v in state_dict.items() if k in expected}
    module.load_state_dict(present, strict=False)


def tensor_shape(state_dict: Mapping[str, object], key: str, ndim: int, what: str) -> torch.Size:
    """The shape of `state_dict[key]`, which must be a tensor of `ndim` dimensions;
    PermanentError (one line) otherwise. Used to infer a network's widths."""
    found = state_dict.get(key)
    if not isinstance(found, torch.Tensor):
        raise PermanentError(f"{what}: missing key {key} (needed to infer the widths)")
    if found.ndim != ndim:
        raise PermanentError(
            f"{what}: wrong shape for {key}: expected {ndim} dimensions, "
            f"found {_shape(found.shape)}"
        )
    return found.shape


def count_indexed(state_dict: Mapping[str, object], prefix: str, suffix: str, step: int = 1) -> int:
    """How many i = 0, step, 2*step, ... in a row have `f"{prefix}{i}{suffix}"`."""
    n = 0
    while f"{prefix}{n * step}{suffix}" in state_dict:
        n += 1
    return n
