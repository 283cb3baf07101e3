"""Bulk batches: a manifest's rows become jobs of one named batch, at bulk priority.

- Every row is checked before anything is submitted (farm/manifest.py); the caller
  decides whether problems refuse the whole batch or only their rows.
- Submitting is idempotent: each row's job carries an idempotency key (a hash of the
  batch name and the row's content), so the same manifest submitted again creates
  no job twice, and a resubmission with new rows adds only those.
- Bulk jobs have a lower priority; their tasks go to the bulk queues, which workers
  drain only when the interactive queues are empty (workers/app.py).
- Completion is a guarded transition on the batch row: the finisher of the last job
  moves it running -> completed, exactly once; the report and the batch.completed
  event follow from that (`complete`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from farm import extras, jobs, manifest, output, pipeline, queries, script, states
from farm.context import Context
from farm.db import Batch, Job
from farm.errors import InvalidInput, RetryableError
from farm.manifest import Checked, Defaults, Problem, RawRow, Row
from farm.stores import job_key

log = logging.getLogger("farm.batches")

BULK_PRIORITY = 1  # interactive jobs keep JobRequest's default, 5
RUNNING, COMPLETED = "running", "completed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid batch name {name[:120]!r}: use 1-100 letters, digits, '.', '-' or '_'"
        )
    return name


def batch_key(name: str, *parts: str) -> str:
    return "/".join(("batches", name, *parts))


def output_key(name: str, output: str, draft: bool = False) -> str:
    """Where a row's video is published in the store: batches/NAME/outputs/OUTPUT, or
    batches/NAME/drafts/OUTPUT for a draft, so a batch can be drafted, reviewed and then
    rendered for real under one name without the final run clashing with its draft."""
    return batch_key(name, "drafts" if draft else "outputs", output)


def report_key(name: str) -> str:
    return batch_key(name, "report.json")


def is_bulk_priority(priority: int) -> bool:
    """Whether a job of this priority runs on the bulk lane (cpu_bulk, render_bulk)."""
    return priority <= BULK_PRIORITY


@dataclass(frozen=True)
class Options:
    """What every job of the batch shares. Rows name avatar, voice, webhook, output."""

    fps: int
    size: tuple[int, int]
    chunk_frames: int
    seed: int | None = None
    defaults: Defaults = field(default_factory=Defaults)

    def key_parts(self) -> tuple[Any, ...]:
        return (self.fps, list(self.size), self.chunk_frames, self.seed)


# --- checking ---------------------------------------------------------------


def check(
    ctx: Context,
    name: str,
    base: Path,
    raw: Iterable[RawRow],
    options: Options,
    scope: str | None = None,
) -> Checked:
    """Check every row: script, avatar, voice, webhook and output key, and that no
    row takes an output an earlier submission of this batch gave to another row."""
    check_name(name)
    raw = list(raw)
    limit = ctx.settings.max_batch_jobs
    if len(raw) > limit:
        raise InvalidInput(
            f"the manifest has {len(raw)} rows; the limit is {limit} jobs per batch "
            "(FARM_MAX_BATCH_JOBS)"
        )
    jobs_checked: dict[tuple[str, str, str | None], str | None] = {}

    def check_job(avatar: str, voice: str, webhook: str | None) -> str | None:
        # The interactive submit's own checks, once per distinct combination.
        combo = (avatar, voice, webhook)
        if combo not in jobs_checked:
            req = jobs.JobRequest(
                script="",
                avatar=avatar,
                voice=voice,
                fps=options.fps,
                size=options.size,
                chunk_frames=options.chunk_frames,
                webhook=webhook,
            )
            jobs_checked[combo] = jobs.validate(ctx, req).webhook_url
        return jobs_checked[combo]

    with ctx.session() as s:
        batch = queries.get_batch_by_name(s, name)
        targets = queries.batch_targets(s, batch.id) if batch is not None else {}
    key_scope = scope or name

    earlier = {draft: manifest.OutputKeys() for draft in (False, True)}
    for target in targets:
        for draft, keys in earlier.items():
            if target.startswith(area := output_key(name, "", draft)):
                keys.add(target.removeprefix(area), "a row submitted earlier")

    def taken(row: Row) -> str | None:
        holder = targets.get(output_key(name, row.output, row.spec.draft))
        if holder is not None:
            if holder == manifest.row_key(key_scope, row, options.key_parts()):
                return None  # this very row, submitted again
            return (
                f"output key {row.output!r} already belongs to a different row submitted "
                f"earlier to batch {name}"
            )
        return earlier[row.spec.draft].clash(row.output)

    def check_script(text: str) -> None:
        padding = sum(jobs.padding(False))
        script.check_script_frames(text, options.fps, ctx.settings, padding)

    return manifest.check_rows(
        raw, base, options.defaults, ctx.settings.max_script_chars, check_job, taken, check_script
    )


def load(
    ctx: Context, name: str, path: Path, options: Options, scope: str | None = None
) -> Checked:
    """Read and check a manifest file or directory."""
    base, raw = manifest.read(path, templated=options.defaults.template is not None)
    return check(ctx, name, base, raw, options, scope)


# --- submitting -------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    batch_id: str | None  # None: nothing was new and no batch of that name exists
    name: str
    created: list[str]  # ids of the jobs this call created and queued
    existing: int  # rows whose job an earlier submission created
    problems: list[Problem]  # rows left out


def submit(
    ctx: Context,
    name: str,
    checked: Checked,
    options: Options,
    *,
    source: str = "",
    webhook: str | None = None,
    scope: str | None = None,
) -> Submitted:
    """Create and queue the jobs of the checked rows that no earlier submission
    created. `scope` (default: the batch name) goes into the idempotency keys; the
    nightly run uses its inbox, so a script seen on an earlier night is not new.
    Problems are recorded on the batch; refusing them is the caller's decision."""
    check_name(name)
    if not checked.rows:
        raise InvalidInput(f"batch {name}: no valid rows to submit")
    ctx.store.check()  # a missing bucket or bad credentials: refuse before any row
    key_scope = scope or name
    keyed = [(manifest.row_key(key_scope, r, options.key_parts()), r) for r in checked.rows]
    invalid = [{"row": p.where, "line": p.line, "reason": p.reason} for p in checked.problems]
    batch_webhook = _batch_webhook(ctx, webhook)
    for attempt in range(3):
        try:
            batch_id, created = _insert(ctx, name, keyed, options, source, batch_webhook, invalid)
            break
        except IntegrityError as exc:
            # Another submission of this batch got there first: go again, skipping its rows.
            if attempt == 2:
                raise RetryableError(f"batch {name} is being submitted concurrently") from exc
    for i, job_id in enumerate(created):
        try:
            ctx.dispatch.enqueue(pipeline.PREPARE, job_id, bulk=True)
        except Exception as exc:  # the broker refused: these jobs were never accepted
            _forget(ctx, batch_id, created[i:])
            raise RetryableError(
                f"queued {i} of {len(created)} new jobs of batch {name}, then: {exc}; "
                "submit again to queue the rest"
            ) from exc
    return Submitted(batch_id, name, created, len(keyed) - len(created), checked.problems)


def _batch_webhook(ctx: Context, explicit: str | None) -> str | None:
    url = explicit or ctx.settings.webhook_url
    if not url:
        return None
    from farm import webhooks

    return webhooks.check_target(url, ctx.settings)


def _insert(
    ctx: Context,
    name: str,
    keyed: list[tuple[str, Row]],
    options: Options,
    source: str,
    webhook: str | None,
    invalid: list[dict[str, Any]],
) -> tuple[str | None, list[str]]:
    created: list[str] = []
    uploaded: list[str] = []  # jobs whose background file went to jobs/{id}/
    try:
        with ctx.session() as s:
            batch = queries.get_batch_by_name(s, name)
            existing = queries.existing_idempotency_keys(s, [k for k, _ in keyed])
            new = [(k, r) for k, r in keyed if k not in existing]
            if not new:
                # Nothing new: a batch that does not exist is not made (it would never end).
                if batch is not None:
                    queries.set_batch_invalid(s, batch.id, invalid)
                return (batch.id if batch is not None else None), created
            if batch is None:
                batch = queries.insert_batch(
                    s,
                    id=uuid.uuid4().hex,
                    name=name,
                    state=RUNNING,
                    source=source or None,
                    webhook_url=webhook,
                    invalid=invalid,
                )
            queries.reopen_batch(s, batch.id, invalid)  # first: it locks the batch row
            for key, row in new:
                job = _job_row(ctx, s, name, batch.id, key, row, options)
                if row.spec.background is not None and row.spec.background.path:
                    uploaded.append(job["id"])
                # A background file goes to jobs/{id}/background{ext}; the row keeps its key.
                job["delivery"] = output.upload_background(ctx.store, job["id"], row.spec).to_json()
                queries.insert_job(s, **job)
                created.append(job["id"])
            return batch.id, created
    except BaseException:
        for job_id in uploaded:  # the jobs were never accepted: their files go too
            ctx.store.delete_prefix(job_key(job_id))
        raise


def _job_row(
    ctx: Context, s: Any, name: str, batch_id: str, key: str, row: Row, options: Options
) -> dict[str, Any]:
    """The job row of one manifest row (jobs.new_row, as `farm submit` builds it)."""
    request = jobs.JobRequest(
        script=row.script,
        avatar=row.avatar,
        voice=row.voice,
        fps=options.fps,
        size=options.size,
        chunk_frames=options.chunk_frames,
        # Derived from the key, so the same row renders the same motion again.
        seed=options.seed if options.seed is not None else int(key[3:11], 16) % 2**31,
        priority=BULK_PRIORITY,
        output=row.spec,
    )
    avatar = queries.get_avatar(s, row.avatar)
    return jobs.new_row(
        ctx,
        request,
        row.webhook,
        avatar.renderer if avatar else None,
        idempotency_key=key,
        batch_id=batch_id,
        batch_row=row.where,
        target_key=output_key(name, row.output, row.spec.draft),
    )


def _forget(ctx: Context, batch_id: str | None, job_ids: list[str]) -> None:
    with ctx.session() as s:
        queries.delete_jobs(s, job_ids)
        if batch_id is not None:
            queries.delete_batch_if_empty(s, batch_id)
    for job_id in job_ids:  # a background file uploaded for it
        ctx.store.delete_prefix(job_key(job_id))


# --- completion -------------------------------------------------------------


def job_finished(ctx: Context, job_id: str) -> str | None:
    """Call after a job reached a final state (each time: it is idempotent). Returns
    the batch id when this call completed the job's batch, for exactly one caller."""
    with ctx.session() as s:
        batch_id = queries.job_batch_id(s, job_id)
        if batch_id is None:
            return None
        # On Postgres: wait for a resubmission that is adding jobs to commit them, so
        # the check below, a fresh statement, sees them.
        queries.lock_batch(s, batch_id)
        moved = queries.complete_batch(s, batch_id, states.ACTIVE)
    if moved:
        log.info("batch %s completed", batch_id)
    return batch_id if moved else None


@dataclass(frozen=True)
class Completion:
    batch_id: str
    report_key: str
    event: dict[str, Any]
    delivery_id: str | None  # the batch.completed webhook, when one was sent


def job_ended(ctx: Context, job_id: str, report_here: bool = False) -> Completion | None:
    """After a job reached a final state (each time: it is idempotent): the last job
    of a batch completes the batch, once, and has it reported: by a worker, or, with
    `report_here`, by this call (`farm cancel`), which returns the Completion."""
    batch_id = job_finished(ctx, job_id)
    if batch_id is None:
        return None
    if report_here:
        return complete(ctx, batch_id)
    ctx.dispatch.report_batch(batch_id)
    return None


def complete(ctx: Context, batch_id: str) -> Completion | None:
    """Write the report of a completed batch to the store and send its
    batch.completed event, once per completion. None when there is nothing to do
    (running again, or this completion was already reported)."""
    with ctx.session() as s:
        batch = queries.get_batch(s, batch_id)
        if batch.state != COMPLETED or batch.reported_at is not None:
            return None
        report = build_report(ctx, s, batch)
    key = report_key(batch.name)
    ctx.store.put_bytes(key, json.dumps(report, indent=2, default=str).encode())
    with ctx.session() as s:
        first = queries.mark_batch_reported(s, batch_id, key)
    if not first:
        return None
    event = event_data(ctx, report, key)
    delivery = None
    if batch.webhook_url:
        from farm import webhooks

        delivery = webhooks.enqueue_event(
            ctx, webhooks.BATCH_COMPLETED, event, batch.webhook_url, batch_id=batch_id
        )
    log.info("batch %s reported to %s", batch.name, key)
    return Completion(batch_id, key, event, delivery)


def event_data(ctx: Context, report: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "batch_id": report["id"],
        "name": report["name"],
        "status": report["state"],
        "total": report["total"],
        "counts": report["counts"],
        "invalid_rows": len(report["invalid_rows"]),
        "created_at": report["created_at"],
        "completed_at": report["completed_at"],
        "report_url": ctx.store.url(key),
    }


# --- status and report --------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    row: str
    job_id: str
    state: str
    error: str


@dataclass(frozen=True)
class Status:
    id: str
    name: str
    state: str
    total: int
    counts: dict[str, int]
    fraction: float
    failures: list[Failure]
    invalid: list[dict[str, Any]]
    report_key: str | None

    @property
    def finished(self) -> int:
        return sum(n for s, n in self.counts.items() if s in states.FINAL)


def status(ctx: Context, name: str) -> Status:
    with ctx.session() as s:
        batch = queries.find_batch(s, name)
        progress = queries.batch_job_progress(s, batch.id)
        ended_badly = (states.FAILED, states.CANCELLED)
        failed = [j for j in queries.batch_jobs(s, batch.id) if j.state in ended_badly]
    counts: dict[str, int] = {}
    for state, _, _ in progress:
        counts[state] = counts.get(state, 0) + 1
    # A job that ended, however it ended, is done as far as the batch is concerned.
    parts = [
        1.0 if state in states.FINAL else states.progress(state, done, total)
        for state, done, total in progress
    ]
    return Status(
        id=batch.id,
        name=batch.name,
        state=batch.state,
        total=len(progress),
        counts=counts,
        fraction=sum(parts) / len(parts) if parts else 1.0,
        failures=[
            Failure(j.batch_row or "", j.id, j.state, j.error or "no reason recorded")
            for j in failed
        ],
        invalid=list(batch.invalid or []),
        report_key=batch.report_key,
    )


REPORT_FIELDS: tuple[str, ...] = (
    "row",
    "output",
    "job_id",
    "state",
    "output_url",
    *extras.URL_FIELDS,
    "duration",
    "error",
)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


def _job_entry(ctx: Context, name: str, job: Job) -> dict[str, Any]:
    target = job.target_key or ""
    # "x.mp4" for a final render's output, "drafts/x.mp4" for a draft's
    shown = target.removeprefix(output_key(name, "")).removeprefix(batch_key(name, ""))
    duration = None
    if job.finished_at is not None:
        duration = round((job.finished_at - job.created_at).total_seconds(), 3)
    return {
        "row": job.batch_row,
        "output": shown or None,
        "job_id": job.id,
        "state": job.state,
        "output_url": ctx.store.url(job.output_key) if job.output_key else None,
        "duration": duration,  # seconds from submission to the end, queueing included
        "error": job.error,
        **extras.artifact_urls(job, ctx.store.url),
    }


def build_report(ctx: Context, session: Any, batch: Batch) -> dict[str, Any]:
    entries = [_job_entry(ctx, batch.name, j) for j in queries.batch_jobs(session, batch.id)]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    return {
        "id": batch.id,
        "name": batch.name,
        "state": batch.state,
        "source": batch.source,
        "created_at": _iso(batch.created_at),
        "completed_at": _iso(batch.completed_at),
        "total": len(entries),
        "counts": counts,
        "jobs": entries,
        "invalid_rows": list(batch.invalid or []),
    }


def report(ctx: Context, name: str) -> dict[str, Any]:
    """Every job of the batch (and every row refused at submission), now."""
    with ctx.session() as s:
        return build_report(ctx, s, queries.find_batch(s, name))


def report_csv(report: dict[str, Any]) -> str:
    """One line per job, then one per refused row (state `invalid`)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for entry in report["jobs"]:
        writer.writerow({k: csv_cell(entry[k]) for k in REPORT_FIELDS})
    for bad in report["invalid_rows"]:
        row = {"row": bad["row"], "state": "invalid", "error": bad["reason"]}
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return out.getvalue()


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP, "CSV
# injection"); tab and carriage return start one in some of them too.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A report value as a CSV cell: None is empty, and text that a spreadsheet would
    run as a formula (a file named '=1+1.txt') gets a leading ' so it is shown as
    text. Numbers are left as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def unreported(ctx: Context) -> list[str]:
    """Completed batches whose report was never written (its task was lost)."""
    with ctx.session() as s:
        return list(queries.unreported_batches(s))
