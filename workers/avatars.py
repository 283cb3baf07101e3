"""Avatars on a worker: the renderer for a job, its avatar kept warm per process, and
the registration of a photo (landmarks and caches), which needs the ML stack."""

from __future__ import annotations

import io
import time
from functools import lru_cache

import numpy as np
from sqlalchemy.exc import IntegrityError

from farm import jobs, queries
from farm.avatars import photo_rgb
from farm.context import Context
from farm.errors import NotFound
from farm.stores import avatar_key
from models.base import AvatarArtifact, Renderer
from models.registry import get_renderer
from workers import health


def renderer_for(ctx: Context, name: str | None = None) -> Renderer:
    s = ctx.settings
    name = name or s.renderer
    renderer = get_renderer(
        name,
        s.renderer_dir(name),
        s.device,
        s.render_batch,
        s.render_threads,
        s.renderer_options(name),
    )
    health.saw_renderer(renderer)  # its render path, for `farm workers`
    return renderer


@lru_cache(maxsize=8)
def _avatar_from_store(ctx: Context, renderer_name: str, key: str) -> AvatarArtifact:
    return renderer_for(ctx, renderer_name).avatar_from_bytes(ctx.store.get_bytes(key))


def load_avatar(ctx: Context, name: str, renderer_name: str) -> AvatarArtifact:
    """An LRU of warm avatars per worker process; built-in avatars register on first use."""
    with ctx.session() as s:
        row = queries.get_avatar(s, name)
        key, registered_for, source = (
            (row.artifact_key, row.renderer, row.source_key) if row else (None, None, None)
        )
    if key is None:
        if name not in jobs.BUILTIN_AVATARS:
            raise NotFound(f"unknown avatar {name!r}")
        key, registered_for = register_avatar(ctx, name, None, renderer_name)
    if registered_for != renderer_name and source is not None:
        # A job on another backend than the avatar was registered for: prepare the
        # same photo for that backend, kept warm in this process only.
        return _owned(_avatar_from_photo(ctx, renderer_name, source), name)
    return _owned(_avatar_from_store(ctx, renderer_name, key), name)


def _owned(artifact: AvatarArtifact, name: str) -> AvatarArtifact:
    """Tag the artifact with its avatar's name: a TensorRT engine built for it records
    that name beside it (models/engines.py note_owner) for `farm avatar delete`."""
    cache = getattr(artifact, "cache", None)
    if isinstance(cache, dict):
        cache.setdefault("owner", name)
    return artifact


@lru_cache(maxsize=4)
def _avatar_from_photo(ctx: Context, renderer_name: str, source_key: str) -> AvatarArtifact:
    return renderer_for(ctx, renderer_name).prepare_avatar(_read_photo(ctx, source_key))


def _read_photo(ctx: Context, source_key: str) -> np.ndarray:
    data = ctx.store.get_bytes(source_key)
    # The limit `farm avatar add` checked, not Pillow's own (which could be lower).
    return photo_rgb(data, ctx.settings.max_photo_pixels)


def register_avatar(
    ctx: Context, name: str, source_key: str | None, renderer_name: str | None = None
) -> tuple[str, str]:
    """Landmarks and caches for a photo in the store (None: the built-in demo photo).
    Returns (artifact key, renderer name)."""
    from PIL import Image

    jobs.check_avatar_name(name)
    renderer_name = renderer_name or ctx.settings.renderer
    renderer = renderer_for(ctx, renderer_name)
    if source_key is None:
        from models.portrait import demo_photo

        photo = demo_photo()
        source_key = avatar_key(name, "source.png")
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="PNG")
        ctx.store.put_bytes(source_key, buf.getvalue())
    elif hasattr(renderer, "prepare_avatar_from_source"):
        # A backend whose avatar is a trained model, not a photo (gaussiantalker).
        artifact = renderer.prepare_avatar_from_source(ctx.store.get_bytes(source_key))
        width, height = artifact.photo_size
        return _record(ctx, name, renderer_name, artifact, source_key, (width, height))
    else:
        photo = _read_photo(ctx, source_key)
    artifact = renderer.prepare_avatar(photo)
    return _record(ctx, name, renderer_name, artifact, source_key, photo.shape[1::-1])


def _record(
    ctx: Context,
    name: str,
    renderer_name: str,
    artifact: AvatarArtifact,
    source_key: str,
    size: tuple[int, int],
) -> tuple[str, str]:
    """The artifact into the store and the avatar's row; (artifact key, renderer)."""
    key = avatar_key(name, f"{renderer_name}-{int(time.time() * 1000)}.npz")
    ctx.store.put_bytes(key, artifact.to_bytes())
    try:
        with ctx.session() as s:
            queries.upsert_avatar(
                s,
                name=name,
                renderer=renderer_name,
                artifact_key=key,
                source_key=source_key,
                width=int(size[0]),
                height=int(size[1]),
            )
    except IntegrityError:
        # Two workers registered the same built-in avatar at once: keep the first.
        with ctx.session() as s:
            row = queries.get_avatar(s, name)
            assert row is not None
            return row.artifact_key, row.renderer
    return key, renderer_name
