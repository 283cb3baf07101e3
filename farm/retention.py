"""Retention and deletion: `farm jobs delete`, `farm avatar delete`, FARM_RETENTION_DAYS
and FARM_KEEP_INTERMEDIATES (issue 17, item 4).

A deletion removes rows and store objects, in this order: one transaction deletes the
rows, writes the audit row (`deletions`) and one `pending_deletions` row per store
prefix; then the store prefixes are deleted and their rows dropped, counting objects
and bytes on the audit row. A store that is down leaves the pending rows, and the
sweep (farm/sweep.py, from beat) retries them until they succeed: the knowledge of what
to delete never lives only in a process that may die.

Retention keeps the job's row (its figures stay in `farm usage`) and marks it expired
(`expired_at`), with its video and every artifact under jobs/{id}/ deleted. A job's
chunk videos and segment audio (jobs/{id}/chunks/, jobs/{id}/audio/) go right after
publish unless FARM_KEEP_INTERMEDIATES is on; a job whose stored bytes were never
measured (publish died first) is tidied and measured by the sweep.

Never imports torch: engines of a deleted avatar are found by the owner files the
workers write beside them (models/engines.py note_owner).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from farm import queries, states
from farm.context import Context
from farm.db import Deletion, utcnow
from farm.errors import FarmError, InvalidInput, NotFound
from farm.stores import avatar_key, job_key

log = logging.getLogger("farm.retention")

JOBS_COMMAND = "farm jobs delete"
AVATAR_COMMAND = "farm avatar delete"
# Work one sweep does at most per pass (expired jobs, unmeasured jobs, pending store
# deletions): a sweep stays cheap however much has piled up; the next one goes on.
SWEEP_LIMIT = 50
INTERMEDIATES = ("chunks", "audio")  # under jobs/{id}/: chunk videos, segment audio
# Beside an engine file: the avatar it was built for (models/engines.py note_owner).
OWNER_SUFFIX = ".owner"


@dataclass(frozen=True)
class Deleted:
    """What one deletion did. `already`: it had been deleted before (nothing done now)."""

    kind: str
    subject: str
    rows: int
    objects: int
    bytes: int
    pending: int
    engines: int = 0
    already: datetime | None = None
    registered: bool = True  # False: a built-in avatar that was never registered


def _deleted(row: Deletion, engines: int = 0, already: bool = False) -> Deleted:
    return Deleted(
        row.kind,
        row.subject,
        row.rows,
        row.objects,
        row.bytes,
        row.pending,
        engines,
        row.created_at if already else None,
    )


# --- jobs --------------------------------------------------------------------------


def delete_jobs(ctx: Context, names: list[str], cancel: bool = False) -> list[Deleted]:
    """Delete the jobs named (ids or unique prefixes): rows and store objects. Every
    name is checked before anything is deleted: an unknown one (never a job, never
    deleted) is NotFound, an active job without `cancel` is InvalidInput. A job deleted
    before is reported as such (deleting twice is fine)."""
    from farm import jobs

    found: list[tuple[str, bool, Deleted | None]] = []
    for name in names:
        with ctx.session() as s:
            try:
                job = queries.find_job_by_prefix(s, name)
            except NotFound as exc:
                gone = None if "ambiguous" in str(exc) else queries.last_deletion(s, "job", name)
                if gone is None or gone.kind != "job":
                    raise
                found.append((gone.subject, False, _deleted(gone, already=True)))
                continue
        active = job.state in states.ACTIVE
        if active and not cancel:
            raise InvalidInput(
                f"job {job.id} is {job.state}: cancel it first, or delete with --cancel"
            )
        found.append((job.id, active, None))
    done: list[Deleted] = []
    for job_id, active, before in found:
        if before is not None:
            done.append(before)
            continue
        if active:
            try:
                jobs.cancel(ctx, job_id)
            except InvalidInput:  # it ended meanwhile: delete it as it is
                pass
        done.append(delete_job(ctx, job_id))
    return done


def delete_job(ctx: Context, job_id: str, command: str = JOBS_COMMAND) -> Deleted:
    """One job that has ended: its rows, the audit row and pending store deletions in
    one transaction, then the store objects."""
    with ctx.session() as s:
        try:
            job = queries.get_job(s, job_id)
        except NotFound:
            gone = queries.last_deletion(s, "job", job_id)
            if gone is None:
                raise
            return _deleted(gone, already=True)
        if job.state in states.ACTIVE:
            raise InvalidInput(f"job {job.id} is {job.state}; it must end before it is deleted")
        prefixes = [job_key(job.id)] + ([job.target_key] if job.target_key else [])
        rows = queries.delete_job_rows(s, job.id)
        deletion_id = None
        if rows:  # 0: another delete of it committed first, and recorded it
            deletion_id = queries.record_deletion(s, "job", job.id, command, rows, prefixes)
    if deletion_id is None:
        with ctx.session() as s:
            gone = queries.last_deletion(s, "job", job_id)
            if gone is None:
                raise NotFound(f"no job {job_id!r}")
            return _deleted(gone, already=True)
    drain(ctx, deletion_id=deletion_id)
    with ctx.session() as s:
        return _deleted(queries.get_deletion(s, deletion_id))


# --- avatars -----------------------------------------------------------------------


def delete_avatar(ctx: Context, name: str, command: str = AVATAR_COMMAND) -> Deleted:
    """The avatar's row, everything under avatars/{name}/ in the store, and the TensorRT
    engines built for it on this machine. Refused while a job that has not ended uses
    it. The built-in `demo` may be deleted too: its next job registers it again."""
    from farm.jobs import BUILTIN_AVATARS, check_avatar_name

    check_avatar_name(name)
    with ctx.session() as s:
        active = queries.active_jobs_of_avatar(s, name)
        if active:
            shown = ", ".join(active[:10]) + (" ..." if len(active) > 10 else "")
            raise InvalidInput(
                f"avatar {name} is used by {len(active)} job(s) that have not ended ({shown});"
                " cancel them or wait for them to end"
            )
        row = queries.get_avatar(s, name)
        if row is None:
            gone = queries.last_deletion(s, "avatar", name)
            if gone is not None:
                return _deleted(gone, remove_engines(engine_dir(ctx), name), already=True)
            if name in BUILTIN_AVATARS:
                return Deleted("avatar", name, 0, 0, 0, 0, registered=False)
            raise NotFound(f"unknown avatar {name!r}")
        rows = queries.delete_avatar_row(s, name)
        deletion_id = queries.record_deletion(s, "avatar", name, command, rows, [avatar_key(name)])
    engines = remove_engines(engine_dir(ctx), name)
    drain(ctx, deletion_id=deletion_id)
    with ctx.session() as s:
        return _deleted(queries.get_deletion(s, deletion_id), engines)


def engine_dir(ctx: Context) -> Path:
    return ctx.settings.model_dir / "engines"


def remove_engines(folder: Path, avatar: str) -> int:
    """Delete the engines whose owner file names `avatar` (and the owner files)."""
    if not folder.is_dir():
        return 0
    n = 0
    for owner in folder.glob(f"*{OWNER_SUFFIX}"):
        try:
            if owner.read_text(encoding="utf-8").strip() != avatar:
                continue
            engine = owner.with_name(owner.name[: -len(OWNER_SUFFIX)])
            if engine.exists():
                engine.unlink()
                n += 1
            owner.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove engine %s: %s", owner, exc)
    return n


# --- the store side: pending deletions ---------------------------------------------


def drain(ctx: Context, limit: int = SWEEP_LIMIT, deletion_id: int | None = None) -> int:
    """Delete pending store prefixes (of one deletion, or the oldest `limit`); a prefix
    the store refuses now stays pending for the next sweep. Returns how many are left
    of those tried."""
    with ctx.session() as s:
        pending = [(p.id, p.prefix) for p in queries.pending_deletions(s, limit, deletion_id)]
    left = 0
    for pending_id, prefix in pending:
        try:
            objects, size = _delete_prefix(ctx, prefix)
        except (FarmError, OSError) as exc:
            left += 1
            log.warning("store deletion of %s failed; the sweep retries it: %s", prefix, exc)
            with ctx.session() as s:
                queries.note_pending_deletion_error(s, pending_id, str(exc))
            continue
        with ctx.session() as s:
            queries.finish_pending_deletion(s, pending_id, objects, size)
    return left


def _delete_prefix(ctx: Context, prefix: str) -> tuple[int, int]:
    """(objects, bytes) deleted under `prefix`, sizes measured just before."""
    sizes = ctx.store.sizes(prefix)
    deleted = ctx.store.delete_prefix(prefix)
    return max(deleted, len(sizes)), sum(sizes.values())


# --- retention and intermediates (the sweep) ---------------------------------------


def stored_bytes(ctx: Context, job_id: str, target_key: str | None) -> int:
    """What a job holds in the store now: everything under jobs/{id}/ and its output
    key outside it (a batch row's)."""
    prefixes = [p for p in (job_key(job_id), target_key) if p]
    return sum(sum(ctx.store.sizes(p).values()) for p in prefixes)


def tidy_job(ctx: Context, job_id: str, command: str) -> int:
    """A published job: its intermediates deleted (unless FARM_KEEP_INTERMEDIATES), then
    its stored bytes measured and recorded. The unmeasured row is the record of what is
    left to do, so a store outage here only leaves it to the next sweep. Returns the
    bytes stored."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        target_key = job.target_key
    if not ctx.settings.keep_intermediates:
        objects = size = 0
        for part in INTERMEDIATES:
            n, b = _delete_prefix(ctx, job_key(job_id, part))
            objects, size = objects + n, size + b
        if objects:
            with ctx.session() as s:
                queries.record_deletion(
                    s, "intermediates", job_id, command, 0, [], objects=objects, size=size
                )
    total = stored_bytes(ctx, job_id, target_key)
    with ctx.session() as s:
        queries.set_bytes_stored(s, job_id, total)
    return total


def after_publish(ctx: Context, job_id: str) -> None:
    """The publish stage's tidy: never fails the publish (the sweep catches up)."""
    try:
        tidy_job(ctx, job_id, "publish")
    except Exception as exc:
        log.warning("job %s: intermediates and size left to the sweep: %s", job_id, exc)


def expire(ctx: Context, now: datetime | None = None, limit: int = SWEEP_LIMIT) -> int:
    """Mark ended jobs older than FARM_RETENTION_DAYS expired and queue their outputs
    for deletion (0 days: keep forever). Returns how many jobs expired now."""
    days = ctx.settings.retention_days
    if days <= 0:
        return 0
    now = now or utcnow()
    command = f"retention ({days} days)"
    n = 0
    with ctx.session() as s:
        for job in queries.expirable_jobs(s, now - timedelta(days=days), limit):
            prefixes = [job_key(job.id)] + ([job.target_key] if job.target_key else [])
            if queries.mark_expired(s, job.id, now):
                queries.record_deletion(s, "outputs", job.id, command, 0, prefixes)
                n += 1
    return n


@dataclass(frozen=True)
class SweepResult:
    expired: int
    tidied: int
    pending_left: int


def sweep(ctx: Context, now: datetime | None = None, limit: int = SWEEP_LIMIT) -> SweepResult:
    """One bounded retention pass (beat's sweep runs it): expire old outputs, tidy and
    measure succeeded jobs that publish left unmeasured, retry pending store deletions."""
    expired = expire(ctx, now, limit)
    tidied = 0
    with ctx.session() as s:
        unmeasured = [j.id for j in queries.unmeasured_jobs(s, limit)]
    for job_id in unmeasured:
        try:
            tidy_job(ctx, job_id, "sweep")
            tidied += 1
        except (FarmError, OSError) as exc:
            log.warning("job %s: could not tidy its intermediates now: %s", job_id, exc)
    return SweepResult(expired, tidied, drain(ctx, limit))


def jobs_of_avatar(ctx: Context, name: str) -> list[str]:
    """The ids of every job of avatar `name` (for `farm jobs delete --avatar`)."""
    from farm.jobs import check_avatar_name

    check_avatar_name(name)
    with ctx.session() as s:
        return list(queries.job_ids_of_avatar(s, name))
