"""Avatar registration from the control plane: check the photo, hand it to a worker.

Landmark detection needs the ML stack, so it runs in a worker (models/stages.py);
the CLI only validates the file and waits for the result.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from farm.config import Settings
from farm.context import Context
from farm.errors import FarmError, InvalidInput, RetryableError
from farm.store import avatar_key

MAX_PHOTO_BYTES = 50 * 1024 * 1024
MAX_PHOTO_PIXELS = 40_000_000


def read_photo(path: Path, settings: Settings) -> bytes:
    """The photo's bytes, if they decode as an image of sane size; else InvalidInput."""
    from PIL import Image

    if not path.is_file():
        raise InvalidInput(f"no such photo: {path}")
    if path.stat().st_size > MAX_PHOTO_BYTES:
        raise InvalidInput(f"photo {path.name} is larger than {MAX_PHOTO_BYTES >> 20} MiB")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PHOTO_PIXELS:
                raise InvalidInput(
                    f"photo {path.name} has {width}x{height} pixels; "
                    f"the limit is {MAX_PHOTO_PIXELS}"
                )
            img.load()  # decodes every pixel: catches truncated files
    except InvalidInput:
        raise
    except Exception as exc:  # PIL raises many types for undecodable data
        raise InvalidInput(f"photo {path.name} is not a readable image ({exc})") from exc
    return data


def register(ctx: Context, tasks: Any, name: str, photo: bytes, timeout: float) -> str:
    """Store the photo, have a worker register it, wait. Nothing is left on failure."""
    source = avatar_key(name, f"source-{int(time.time() * 1000)}")
    ctx.store.put_bytes(source, photo)
    try:
        result = tasks.app.send_task("farm.register_avatar", args=(name, source))
        return str(result.get(timeout=timeout, propagate=True))
    except Exception as exc:
        ctx.store.delete_prefix(source)
        if isinstance(exc, FarmError):
            raise
        if type(exc).__name__ == "TimeoutError":
            raise RetryableError(f"no worker registered {name!r} within {timeout:.0f} s") from exc
        raise InvalidInput(f"avatar {name!r} was not added: {exc}") from exc
