"""Renderer backends by name, imported lazily: a worker loads only the one it uses."""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import InvalidInput, MissingDependency

if TYPE_CHECKING:  # the control plane reads RENDERERS without the backends' imports
    from models.base import Renderer

# name -> (module:class, the pip extra or package that provides its dependencies,
#          whether it runs on torch: only then is torch imported and its threads set)
RENDERERS: dict[str, tuple[str, str, bool]] = {
    "portrait": ("models.portrait:PortraitRenderer", "farm", True),
    "null": ("models.null:NullRenderer", "farm", False),  # no work: scheduling tests, overhead
    "ditto": ("models.ditto.renderer:DittoRenderer", "farm[ditto]", True),
    "gaussiantalker": (
        "models.gaussiantalker.renderer:GaussianTalkerRenderer",
        "farm[gaussiantalker]",
        True,
    ),
}
# Per-job options a backend takes, with their ranges (`farm submit --ditto-steps`).
RENDERER_OPTIONS: dict[str, dict[str, tuple[int, int]]] = {
    # eyes: 1 natural (living eyes), 0 still; portrait animates its gaze itself
    "ditto": {"steps": (1, 1000), "emotion": (0, 7), "eyes": (0, 1)},
    "gaussiantalker": {"eyes": (0, 1)},
}
# Ditto's emotion classes, by their index in its condition (upstream's order).
DITTO_EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise", "contempt")
# Backends whose plan stage needs the GPU, so it runs on the render queue.
PLANS_ON_RENDER: frozenset[str] = frozenset({"ditto", "gaussiantalker"})
# Backends that can render the avatar's whole photo (`--size photo`, `--aspect`): their
# avatars have photo_size and face_box (models/base.py WholePhotoAvatar).
WHOLE_PHOTO: frozenset[str] = frozenset({"portrait", "ditto", "gaussiantalker"})


@cache
def get_renderer(
    name: str,
    model_dir: Path,
    device: str,
    batch: int,
    threads: int,
    options: tuple[tuple[str, Any], ...] = (),
) -> Renderer:
    """One loaded renderer per process and configuration; models stay warm.
    `options`: the renderer's own settings, passed to its constructor."""
    try:
        target, extra, uses_torch = RENDERERS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown renderer {name!r}; available: {', '.join(RENDERERS)}"
        ) from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependency(
            f"renderer {name!r} needs {exc.name}: pip install '{extra}'"
        ) from exc
    if uses_torch:
        import torch

        torch.set_num_threads(threads)
    renderer: Renderer = getattr(module, cls_name)(batch_size=batch, **dict(options))
    renderer.load(model_dir, device)
    return renderer
