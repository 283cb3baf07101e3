"""The key namespace of the artifact store: where each artifact lives.

Keys are relative, slash-separated paths. Every store verb checks its key with
check_key before touching anything, so no key can leave the store's root or prefix.
"""

from __future__ import annotations

from farm.errors import InvalidInput


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


def is_key(key: str) -> bool:
    """Whether check_key would accept `key`."""
    try:
        check_key(key)
    except InvalidInput:
        return False
    return True


def check_prefix(prefix: str) -> str:
    """A prefix for list and delete_prefix: a key, or "" for the whole store. A trailing
    slash is dropped: "jobs/abc/" and "jobs/abc" name the same keys."""
    prefix = prefix.rstrip("/")
    return check_key(prefix) if prefix else ""


def under(key: str, prefix: str) -> bool:
    """Whether `key` is at or under `prefix` (a checked prefix), by whole path segments:
    "jobs/abc" holds "jobs/abc" and "jobs/abc/plan.json", not "jobs/abcd"."""
    return not prefix or key == prefix or key.startswith(prefix + "/")
