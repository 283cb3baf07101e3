"""The artifact store: one namespace of keys for audio, plans, chunks and final videos.

Workers share nothing but this store, so every artifact goes through it. The local
directory store is the embedded default; S3-compatible stores plug in behind the
same four verbs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from farm.config import Settings
from farm.errors import InvalidInput, NotFound


def job_key(job_id: str, *parts: str) -> str:
    return "/".join(("jobs", job_id, *parts))


def chunk_key(job_id: str, idx: int) -> str:
    return job_key(job_id, "chunks", f"{idx:05d}.mp4")


def avatar_key(name: str, *parts: str) -> str:
    return "/".join(("avatars", name, *parts))


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise InvalidInput(f"invalid artifact key {key!r}")
    return key


class Store(Protocol):
    def check(self) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, dest: Path) -> Path: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def url(self, key: str) -> str: ...


class LocalStore:
    """Keys are paths under a root directory. Writes are atomic (temp file + rename),
    so a reader never sees half an artifact and a re-run overwrites cleanly."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInput(f"artifact directory {self.root} is not writable: {exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

    def get_file(self, key: str, dest: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"artifact {key} is missing from the store")
        shutil.copyfile(src, dest)
        return dest

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"artifact {key} is missing from the store")
        return src.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        target = self._path(prefix.rstrip("/"))
        if target.is_file():
            target.unlink()
            return 1
        if not target.is_dir():
            return 0
        count = sum(1 for p in target.rglob("*") if p.is_file())
        shutil.rmtree(target)
        return count

    def url(self, key: str) -> str:
        return str(self._path(key))


def write_user_file(dest: Path, write: Callable[[Path], object]) -> Path:
    """Write a file the user named (`--output`, `farm fetch DEST`) with `write(dest)`.

    One rule everywhere: missing folders above DEST are created. Any failure (a full
    disk, a read-only folder, a folder where the file should go) is one InvalidInput
    that names DEST, and leaves no partial file behind. A device or pipe (/dev/stdout)
    is written in place, never replaced: the file is staged in a temporary folder and
    copied into it (a store's own download would rename a temp file over it)."""
    if dest.is_dir():
        raise InvalidInput(f"cannot write {dest}: it is a directory")
    created = not dest.exists()
    special = not created and not dest.is_file()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if special:
            with tempfile.TemporaryDirectory(prefix="farm-out-") as tmp:
                staged = Path(tmp) / "staged"
                write(staged)
                with open(staged, "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        else:
            write(dest)
    except BaseException as exc:
        if created and dest.is_file():
            dest.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InvalidInput(f"cannot write {dest}: {exc.strerror or exc}") from exc
        raise
    return dest


def open_store(settings: Settings) -> Store:
    url = settings.effective_store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        from farm.s3 import S3Store

        if not parsed.netloc:
            raise InvalidInput(f"artifact store URL {url!r} names no bucket")
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
            presign_seconds=settings.presign_seconds,
        )
    raise InvalidInput(f"unsupported artifact store URL {url!r} (use file:///path or s3://)")
