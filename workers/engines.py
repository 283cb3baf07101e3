"""`farm engines build`: TensorRT engines built ahead of the first job, on the GPU worker
machine that will use them, by exactly the renderer and avatar loading a worker does.

Run as `python -m workers.engines RENDERER [AVATAR ...]` (the CLI starts it in a child,
so the CLI never imports torch): prints one path per engine, or one error line and
exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from farm.config import Settings
from farm.context import Context
from farm.errors import FarmError, InvalidInput
from workers.avatars import load_avatar, renderer_for


def build(ctx: Context, renderer_name: str, avatar_names: list[str]) -> list[Path]:
    """The engines `renderer_name` renders with on this machine, built now unless they
    are cached: one per worker for ditto, one per avatar for gaussiantalker."""
    renderer = renderer_for(ctx, renderer_name)
    avatars = [load_avatar(ctx, name, renderer_name) for name in avatar_names]
    if not hasattr(renderer, "build_engines"):
        raise InvalidInput(f"the {renderer_name} renderer builds no engines ahead of a job")
    return list(renderer.build_engines(avatars))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m workers.engines RENDERER [AVATAR ...]", file=sys.stderr)
        return 2
    try:
        paths = build(Context(Settings.from_env()), args[0], args[1:])
    except FarmError as exc:
        print(f"farm: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
