"""Renderer backends by name, imported lazily: a worker loads only the one it uses."""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

from farm.errors import InvalidInput, MissingDependency
from models.base import Renderer

# name -> (module:class, the pip extra or package that provides its dependencies)
RENDERERS: dict[str, tuple[str, str]] = {
    "portrait": ("models.portrait:PortraitRenderer", "farm"),
    "null": ("models.null:NullRenderer", "farm"),  # no work: scheduling tests, overhead
}


@cache
def get_renderer(name: str, model_dir: Path, device: str, batch: int, threads: int) -> Renderer:
    """One loaded renderer per process and configuration; models stay warm."""
    try:
        target, extra = RENDERERS[name]
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
    import torch

    torch.set_num_threads(threads)
    renderer: Renderer = getattr(module, cls_name)(batch_size=batch)
    renderer.load(model_dir, device)
    return renderer
