"""`farm live`: a channel's idle loop, rendered once by the avatar's own backend.

Run as `python -m workers.live_idle AVATAR FPS WIDTH HEIGHT SEED OUT` (the channel starts
it in a child, so the CLI never imports torch): renders the backend's idle plan
(`renderer.idle_plan`, seamless, at the rest pose at every cut point) with exactly the
renderer and avatar loading a worker does, into a lossless MP4 at OUT, and prints one
JSON line: {"frames": N, "cuts": [frame, ...], "renderer": NAME, "loop": L, "exits":
[frame, ...], "exit_frames": E} (frames L.. are the loop's exits, E frames each). An
error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from farm import queries
from farm.config import Settings
from farm.context import Context
from farm.errors import FarmError, InvalidInput
from farm.media import FrameEncoder, VideoFormat
from workers.avatars import load_avatar, renderer_for


def render_idle(
    ctx: Context, avatar_name: str, fps: int, size: tuple[int, int], seed: int, out: Path
) -> dict[str, object]:
    with ctx.session() as s:
        row = queries.get_avatar(s, avatar_name)
        renderer_name = row.renderer if row is not None else ctx.settings.renderer
    renderer = renderer_for(ctx, renderer_name)
    if not hasattr(renderer, "idle_plan"):
        raise InvalidInput(f"the {renderer_name} renderer has no idle loop for a live channel yet")
    avatar = load_avatar(ctx, avatar_name, renderer_name)
    plan = renderer.idle_plan(avatar, fps, size, seed)
    encoder = FrameEncoder(out, VideoFormat.chunk(plan.width, plan.height, fps), plan.frame_count)
    try:
        renderer.render(avatar, plan, range(plan.frame_count), encoder)
        encoder.close()
    except BaseException:
        encoder.abort()
        raise
    cuts = [int(c) for c in plan.arrays.get("cuts", [0])]
    loop = int(plan.arrays["loop"][0]) if "loop" in plan.arrays else plan.frame_count
    exits = [int(j) for j in plan.arrays.get("exit_from", [])]
    length = int(plan.arrays["exit_frames"][0]) if exits else 0
    return {
        "frames": plan.frame_count,
        "cuts": cuts,
        "renderer": renderer_name,
        "loop": loop,
        "exits": exits,
        "exit_frames": length,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 6:
        print(
            "usage: python -m workers.live_idle AVATAR FPS WIDTH HEIGHT SEED OUT", file=sys.stderr
        )
        return 2
    avatar, fps, width, height, seed, out = args
    try:
        info = render_idle(
            Context(Settings.from_env()),
            avatar,
            int(fps),
            (int(width), int(height)),
            int(seed),
            Path(out),
        )
    except FarmError as exc:
        print(f"farm: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
