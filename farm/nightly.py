"""The nightly run: scan an inbox for scripts and manifests, submit what is new as one
batch named by the date (nightly-2026-11-22).

The inbox (FARM_NIGHTLY_INBOX) is a local directory or s3://bucket/prefix. At its top
level, every .csv / .jsonl file is a manifest (script paths relative to the inbox)
and every .txt file that no manifest names is a script of its own, rendered with
FARM_NIGHTLY_AVATAR and FARM_NIGHTLY_VOICE.

"New" is decided by idempotency keys scoped to the inbox, not to the night: a second
firing the same night, and every later night, finds the jobs of rows it already
submitted and submits nothing for them. To render a script again, change it (or its
row). Invalid rows are left out, logged and recorded on the batch; they do not stop
the others. Beat fires this (workers/beat.py); one beat only.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from farm import batches, manifest, output
from farm.config import Settings
from farm.context import Context
from farm.db import utcnow
from farm.errors import FarmError, InvalidInput, PermanentError
from farm.jobs import parse_size
from farm.manifest import Checked, Defaults, Problem, RawRow

log = logging.getLogger("farm.nightly")

MAX_INBOX_FILES = 10_000
MAX_INBOX_FILE_BYTES = 64 * 1024 * 1024


def batch_name(when: datetime) -> str:
    return f"nightly-{when:%Y-%m-%d}"


def scope(inbox: str) -> str:
    return f"nightly:{inbox.rstrip('/')}"


@dataclass(frozen=True)
class Result:
    name: str
    created: list[str]
    existing: int
    problems: list[Problem]


def scan(root: Path) -> tuple[list[RawRow], list[Problem]]:
    """The inbox's rows: every manifest's, then the .txt scripts no manifest names.
    A manifest that cannot be read at all is one problem, not the end of the night."""
    rows: list[RawRow] = []
    problems: list[Problem] = []
    named: set[str] = set()
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=str)
    for path in entries:
        if path.suffix.lower() not in manifest.MANIFEST_SUFFIXES or not path.is_file():
            continue
        try:
            _, raw = manifest.read(path)
        except FarmError as exc:
            problems.append(Problem(path.name, str(exc)))
            continue
        for r in raw:
            rows.append(RawRow(f"{path.name} {r.where}", r.values, r.line))
            for column in ("script", "template"):  # a template is not a script of its own
                named_path = r.values.get(column)
                if isinstance(named_path, str) and named_path.strip():
                    named.add(posixpath.normpath(named_path.strip()))
    for r in manifest.read_directory(root):
        if r.where not in named:
            rows.append(r)
    return rows, problems


def options(settings: Settings) -> batches.Options:
    return batches.Options(
        fps=settings.fps,
        size=parse_size(str(settings.size)),
        chunk_frames=settings.chunk_frames,
        defaults=Defaults(
            avatar=settings.nightly_avatar,
            voice=settings.nightly_voice,
            spec=output.defaults_from(settings),  # FARM_OUTPUT_FORMAT, FARM_ASPECT, ...
            size=parse_size(str(settings.size)),
        ),
    )


def run(ctx: Context, now: datetime | None = None) -> Result:
    """Submit the inbox's new rows as tonight's batch. Idempotent."""
    inbox = ctx.settings.nightly_inbox
    if not inbox:
        raise InvalidInput("FARM_NIGHTLY_INBOX is not set: there is no inbox to scan")
    name = batch_name(now or utcnow())
    opts = options(ctx.settings)
    with local_inbox(ctx.settings, inbox) as root:
        raw, problems = scan(root)
        checked = batches.check(ctx, name, root, raw, opts, scope=scope(inbox))
    checked = Checked(checked.rows, problems + checked.problems)
    for p in checked.problems:
        log.warning("nightly %s: %s left out: %s", name, p.where, p.reason)
    if not checked.rows:
        log.info("nightly %s: nothing to submit in %s", name, inbox)
        return Result(name, [], 0, checked.problems)
    done = batches.submit(ctx, name, checked, opts, source=inbox, scope=scope(inbox))
    log.info(
        "nightly %s: %d new job(s), %d already submitted, %d row(s) left out",
        name,
        len(done.created),
        done.existing,
        len(done.problems),
    )
    return Result(name, done.created, done.existing, done.problems)


@contextmanager
def local_inbox(settings: Settings, inbox: str) -> Iterator[Path]:
    """The inbox as a local directory: itself, or a temporary copy of an S3 prefix."""
    if inbox.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="farm-inbox-") as tmp:
            download_s3(settings, inbox, Path(tmp))
            yield Path(tmp)
        return
    path = Path(inbox.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise PermanentError(f"FARM_NIGHTLY_INBOX {inbox!r} is not a directory")
    yield path


def download_s3(settings: Settings, inbox: str, dest: Path) -> int:
    """Copy every object under the prefix (up to MAX_INBOX_FILES) into `dest`."""
    from farm.stores import open_store

    # The inbox is a store of its own (its bucket and prefix, the artifact store's
    # endpoint and credentials), read through the Store verbs like any other.
    store = open_store(settings.with_(store_url=inbox))
    try:
        keys = store.list("")
    except FarmError as exc:  # sorted by the store: permanent, or retryable
        raise type(exc)(f"cannot list the nightly inbox {inbox}: {exc}") from exc
    count = 0
    for rel in keys:
        if manifest.check_output_key(rel) is not None:
            continue  # names that are no safe relative path
        if store.size(rel) > MAX_INBOX_FILE_BYTES:
            log.warning("nightly: %s is larger than %d bytes; skipped", rel, MAX_INBOX_FILE_BYTES)
            continue
        count += 1
        if count > MAX_INBOX_FILES:
            log.warning("nightly: more than %d files in %s; the rest wait", MAX_INBOX_FILES, inbox)
            break
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(rel, target)
    return count
