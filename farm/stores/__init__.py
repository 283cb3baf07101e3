"""The artifact store: one namespace of keys for audio, plans, chunks and final videos.

Workers share nothing but this store, so every artifact goes through it. The local
directory store is the embedded default; S3-compatible stores plug in behind the
same verbs.

    keys.py   the key namespace (job_key, chunk_key, avatar_key, check_key)
    local.py  LocalStore, and write_user_file for files the user names
    s3.py     S3Store, and the one mapping of boto errors to farm errors

Neither store module imports this one. boto3 is imported only once an s3:// store is
made (farm.stores.s3 imports it inside S3Store), so the CLI never loads it for a local
store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from farm.config import Settings
from farm.errors import InvalidInput
from farm.stores.keys import avatar_key, check_key, chunk_key, job_key
from farm.stores.local import LocalStore, write_user_file
from farm.stores.s3 import S3Store

__all__ = [
    "LocalStore",
    "S3Store",
    "Store",
    "avatar_key",
    "check_key",
    "chunk_key",
    "job_key",
    "open_store",
    "write_user_file",
]


class Store(Protocol):
    """Every verb checks its key (farm.stores.keys.check_key) before any I/O. A missing
    artifact is NotFound; a store that cannot be used is PermanentError; an outage that
    may pass is RetryableError."""

    def check(self) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, dest: Path) -> Path: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...  # bytes; NotFound when missing
    def delete_prefix(self, prefix: str) -> int: ...
    def url(self, key: str) -> str: ...

    def list(self, prefix: str) -> list[str]:
        """The keys at or under `prefix`, by whole segments ("jobs/abc" holds
        "jobs/abc/plan.json", not "jobs/abcd"), sorted; "" lists the whole store."""
        ...

    def sizes(self, prefix: str) -> dict[str, int]:
        """`list`'s keys, in its order, each with its size in bytes, from the same one
        listing (no request per object)."""
        ...


def open_store(settings: Settings) -> Store:
    url = settings.effective_store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
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
