"""Composed output on a worker: the sizes a composed job plans at, and the compositor
(workers/compositor.py) that a render chunk's frames go through.

A job is composed when its OutputSpec (farm/output.py) asks for an aspect ratio, a
background or alpha, or when its output size differs from its render size (a draft of
`--size photo`). Any other job renders exactly as before: no compositor in its path.

- With an aspect, the renderer draws the avatar's whole photo (`photo_size`) and the
  layout (farm/layout.py) frames it on the job's size, by the face's box.
- `--size photo` renders the whole photo; a draft delivers it at half size.
- A background or alpha at the job's own size renders as a plain job would, and only
  replaces what lies around the person.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm import layout
from farm.context import Context
from farm.errors import InvalidInput
from farm.output import OutputSpec
from models.base import Plan


def plan_sizes(
    spec: OutputSpec, size: tuple[int, int], avatar: Any, renderer_name: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(render size, output size) of a job whose row asks for `size` ((0, 0): the whole
    photo). The renderer plans at the first; the job row records the second. InvalidInput
    when the job needs the whole photo and the backend has none."""
    if spec.aspect is None and size != (0, 0):
        return size, size
    photo = _photo_size(avatar, renderer_name, spec)
    if spec.aspect is not None:
        _face_box(avatar, renderer_name)  # refused now, not in every chunk
    return photo, layout.output_size(size, photo, spec.draft)


def composed(spec: OutputSpec, plan_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    return bool(spec.aspect or spec.background is not None or spec.alpha or plan_size != out_size)


def chunk_layout(
    spec: OutputSpec, plan: Plan, out_size: tuple[int, int], avatar: Any, renderer_name: str
) -> layout.Layout:
    """The same in every chunk: from the row's output size, the plan's size and the
    avatar's face box (only an aspect places the face; otherwise the render is scaled
    to the output as a whole)."""
    render = (plan.width, plan.height)
    if spec.aspect is not None:
        box = _face_box(avatar, renderer_name)
        return layout.compute(out_size, render, box, spec.fit, spec.aspect)
    return layout.compute(out_size, render, (0, 0, 1), "contain")


# A background video's frames per pass, by (store key, fps): counting them decodes the
# whole video, once per worker process and job rather than once per chunk.
_periods: dict[tuple[str, int], int] = {}
_MAX_PERIODS = 256


def chunk_compositor(
    ctx: Context,
    spec: OutputSpec,
    out_size: tuple[int, int],
    plan: Plan,
    avatar: Any,
    renderer_name: str,
    first_frame: int,
    work: Path,
) -> Any:
    """The compositor for a chunk starting at `first_frame` of a job delivering `spec` at
    `out_size`, or None for a plain job. A background file is fetched from the store into
    `work`."""
    from workers.compositor import Compositor, Looping, Still

    if not composed(spec, (plan.width, plan.height), out_size):
        return None
    lay = chunk_layout(spec, plan, out_size, avatar, renderer_name)
    bg = spec.background
    backdrop = None
    if bg is not None and bg.kind == "color":
        assert bg.rgb is not None
        backdrop = Still.colour(bg.rgb, out_size)
    elif bg is not None:
        assert bg.key is not None
        local = ctx.store.get_file(bg.key, work / ("background" + Path(bg.key).suffix))
        if bg.kind == "image":
            backdrop = Still.image(local, out_size)
        else:
            known = _periods.get((bg.key, plan.fps))
            backdrop = Looping(local, out_size, plan.fps, first_frame, known)
            if len(_periods) >= _MAX_PERIODS:
                _periods.clear()
            _periods[(bg.key, plan.fps)] = backdrop.period
    return Compositor(lay, backdrop, alpha=spec.alpha)


def _photo_size(avatar: Any, renderer_name: str, spec: OutputSpec) -> tuple[int, int]:
    size = getattr(avatar, "photo_size", None)
    if size is None:
        why = f"--aspect {spec.aspect}" if spec.aspect else "--size photo"
        raise InvalidInput(f"the {renderer_name} renderer has no whole-photo output ({why})")
    return (int(size[0]), int(size[1]))


def _face_box(avatar: Any, renderer_name: str) -> tuple[int, int, int]:
    box = getattr(avatar, "face_box", None)
    if box is None:
        raise InvalidInput(f"the {renderer_name} renderer cannot place a face for --aspect")
    return box
