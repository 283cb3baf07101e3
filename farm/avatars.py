"""Avatars on the control plane: check the photo, hand it to a worker, list them.

Landmark detection needs the ML stack, so it runs in a worker (workers/avatars.py);
here the file is only validated and the result waited for.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from farm import queries
from farm.config import Settings
from farm.context import Context
from farm.db import Avatar
from farm.errors import InvalidInput
from farm.stores import avatar_key

MAX_PHOTO_BYTES = 50 * 1024 * 1024


@contextmanager
def pixel_limit(limit: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at FARM_MAX_PHOTO_PIXELS for the images opened
    inside, then back to what it was: the guard is a global of the PIL module, and a
    process (a test, a worker) may use other limits later."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def photo_rgb(data: bytes, limit: int) -> Any:
    """A photo's pixels as 8-bit RGB (an H x W x 3 uint8 array), whatever its depth.

    Pillow's convert("RGB") clips 16- and 32-bit greyscale at 255, so a 16-bit PNG of
    a face would become a white page with no face on it. Those modes are scaled to
    8 bits first: 16 bits by 1/257, float images taken as 0..1."""
    import numpy as np
    from PIL import Image

    with pixel_limit(limit), Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
            return np.asarray(img.convert("RGB"))
        values = np.asarray(img).astype(np.float64)
        mode = img.mode
    if mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    elif values.max(initial=0) > 255:
        values = values / 257.0
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def read_photo(path: Path, settings: Settings) -> bytes:
    """The photo's bytes, if they decode as an image of sane size; else InvalidInput.

    The pixel limit (FARM_MAX_PHOTO_PIXELS) is checked on the header, before a pixel
    is decoded: Pillow's decompression-bomb guard is set to it and made an error."""
    from PIL import Image

    if not path.is_file():
        raise InvalidInput(f"no such photo: {path}")
    if path.stat().st_size > MAX_PHOTO_BYTES:
        raise InvalidInput(f"photo {path.name} is larger than {MAX_PHOTO_BYTES >> 20} MiB")
    data = path.read_bytes()
    limit = settings.max_photo_pixels
    too_big = f"photo {path.name} has more than {limit} pixels (FARM_MAX_PHOTO_PIXELS)"
    try:
        with pixel_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > limit:
                    raise InvalidInput(f"{too_big}: it is {width}x{height}")
            # Every pixel decoded as the worker will (any bit depth): catches truncation.
            photo_rgb(data, limit)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(too_big) from exc
    except Exception as exc:  # PIL raises many types for undecodable data
        raise InvalidInput(f"photo {path.name} is not a readable image ({exc})") from exc
    return data


def register(
    ctx: Context, name: str, photo: bytes, timeout: float, renderer: str | None = None
) -> str:
    """Store the photo, have a worker register it (for `renderer`, None: the configured
    one), wait. Nothing is left on failure."""
    source = avatar_key(name, f"source-{int(time.time() * 1000)}")
    ctx.store.put_bytes(source, photo)
    try:
        return ctx.dispatch.register_avatar(name, source, timeout, renderer)
    except BaseException:
        ctx.store.delete_prefix(source)
        raise


def add(
    ctx: Context,
    name: str,
    photo: Path | None,
    timeout: float,
    webhook: str | None,
    renderer: str | None = None,
    model: Path | None = None,
    data: Path | None = None,
) -> str:
    """`farm avatar add`: everything checked before the (slow) registration; the
    avatar's default webhook recorded after it. Its jobs render with `renderer` (the
    backend: None is the configured one). A photo, or for gaussiantalker a trained
    model directory (and its training data directory). Returns the artifact key."""
    from farm import jobs, webhooks

    jobs.check_avatar_name(name)
    if renderer is not None and renderer not in jobs.renderer_names():
        raise InvalidInput(
            f"unknown backend {renderer!r}; choose one of {', '.join(jobs.renderer_names())}"
        )
    if (photo is None) == (model is None):
        raise InvalidInput("give exactly one of --photo FILE or --model DIR")
    if model is not None and renderer not in (None, "gaussiantalker"):
        raise InvalidInput(f"--model is a trained gaussiantalker model; --backend {renderer}")
    if data is not None and model is None:
        raise InvalidInput("--data goes with --model (the model's training data directory)")
    if webhook:
        webhooks.check_target(webhook, ctx.settings)
    if model is not None:
        source, renderer = pack_model(model, data), "gaussiantalker"
    else:
        assert photo is not None
        source = read_photo(photo, ctx.settings)
    key = register(ctx, name, source, timeout, renderer)
    if webhook:
        with ctx.session() as s:
            queries.set_avatar_webhook(s, name, webhook)
    return key


def pack_model(model: Path, data: Path | None) -> bytes:
    """A trained GaussianTalker model and its data, checked and packed by a child
    process (models/gaussiantalker/archive.py: this one never imports torch). Every
    problem of the layout is refused here, before anything is stored."""
    import subprocess
    import sys
    import tempfile

    if not model.is_dir():
        raise InvalidInput(f"no such model directory: {model}")
    with tempfile.TemporaryDirectory(prefix="farm-pack-") as tmp:
        out = Path(tmp) / "model.tar"
        argv = [sys.executable, "-m", "models.gaussiantalker.archive"]
        argv += [str(model), str(data) if data else "-", str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 1:
            lines = proc.stdout.strip().splitlines() or ["the model could not be read"]
            more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
            raise InvalidInput(f"{lines[0]}{more}")
        if proc.returncode != 0:
            raise InvalidInput(f"could not pack {model}: {proc.stderr.strip()[-300:]}")
        return out.read_bytes()


def listing(ctx: Context) -> tuple[list[Avatar], list[str]]:
    """The registered avatars, and the built-in names not registered yet."""
    from farm.jobs import BUILTIN_AVATARS

    with ctx.session() as s:
        rows = queries.list_avatars(s)
    names = {a.name for a in rows}
    return rows, [n for n in BUILTIN_AVATARS if n not in names]


def find(ctx: Context, name: str) -> Avatar | None:
    from farm.jobs import check_avatar_name

    check_avatar_name(name)
    with ctx.session() as s:
        return queries.get_avatar(s, name)
