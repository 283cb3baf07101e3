"""The local directory store (the embedded default), and writing a file the user named.

Nothing here imports boto3.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from farm.errors import InvalidInput, NotFound
from farm.stores.keys import check_key, check_prefix, is_key

# Writes stage their bytes in a file named so beside the artifact, then rename it.
_TEMP_PREFIX = ".tmp-"


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
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TEMP_PREFIX)
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TEMP_PREFIX)
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

    def size(self, key: str) -> int:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"artifact {key} is missing from the store")
        return src.stat().st_size

    def list(self, prefix: str) -> list[str]:
        """The keys at or under `prefix` ("" for all), sorted. Files a write is still
        staging, and names no key could have, are not listed."""
        return list(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        prefix = check_prefix(prefix)
        target = self.root / prefix if prefix else self.root
        if target.is_file():
            return {prefix: target.stat().st_size}
        keys = {}
        # os.walk follows no symlinked folders: nothing outside the root is listed.
        for folder, _, files in os.walk(target):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if name.startswith(_TEMP_PREFIX) or not is_key(key):
                    continue
                path = Path(folder) / name
                if path.is_file():
                    keys[key] = path.stat().st_size
        return dict(sorted(keys.items()))

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
