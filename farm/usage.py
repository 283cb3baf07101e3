"""`farm usage`: what the farm did, from the database (SQL aggregates in farm/queries.py),
shaped and formatted here: jobs by state, audio seconds, frames rendered, render seconds
per device kind, bytes stored; for all jobs created since a date, as one group or by
day, avatar, batch or worker.

A job is counted in the group of its creation day, avatar or batch. By worker only the
chunk figures (frames, render seconds) have a group: a job spans workers, so its job
figures are left empty there.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from typing import Any

from farm import queries
from farm.context import Context
from farm.errors import InvalidInput

DEVICES = ("cpu", "cuda", "tensorrt")
FORMATS = ("table", "csv", "json")
STATE_COLUMNS = ("succeeded", "failed", "cancelled", "active")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?")


def parse_since(text: str | None) -> datetime | None:
    """'2026-12-01' or '2026-12-01T08:30' (UTC) to a datetime; None: since the start."""
    if text is None:
        return None
    if not _DATE.fullmatch(text.strip()):
        raise InvalidInput(f"invalid --since {text[:40]!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidInput(f"invalid --since {text[:40]!r}: {exc}") from exc
    return when.replace(tzinfo=UTC)


def report(ctx: Context, since: datetime | None, by: str | None) -> list[dict[str, Any]]:
    """One row per group (sorted), with a last row "total" when grouped."""
    if by is not None and by not in queries.USAGE_GROUPS:
        raise InvalidInput(f"--by {by!r}: choose one of {', '.join(queries.USAGE_GROUPS)}")
    with ctx.session() as s:
        job_rows = [] if by == "worker" else queries.usage_jobs(s, since, by)
        chunk_rows = queries.usage_chunks(s, since, by)
    return shape(job_rows, chunk_rows, by)


def shape(
    job_rows: list[tuple[str, str, int, float, int]],
    chunk_rows: list[tuple[str, str, int, float]],
    by: str | None,
) -> list[dict[str, Any]]:
    """Rows of figures from the aggregates (pure: tested without a database)."""
    devices = list(DEVICES) + sorted({d for _, d, _, _ in chunk_rows} - set(DEVICES))
    jobs_known = by != "worker"

    def blank(group: str) -> dict[str, Any]:
        fresh: dict[str, Any] = {"group": group}
        if jobs_known:
            fresh.update(jobs=0, **{c: 0 for c in STATE_COLUMNS}, audio_seconds=0.0)
        fresh["frames"] = 0
        fresh.update({f"render_seconds_{d}": 0.0 for d in devices})
        if jobs_known:
            fresh["bytes_stored"] = 0
        return fresh

    groups: dict[str, dict[str, Any]] = {}
    for group, state, n, audio, stored in job_rows:
        r = groups.setdefault(group, blank(group))
        r["jobs"] += n
        r[state if state in STATE_COLUMNS else "active"] += n
        r["audio_seconds"] += audio
        r["bytes_stored"] += stored
    for group, device, frames, seconds in chunk_rows:
        r = groups.setdefault(group, blank(group))
        r["frames"] += frames
        r[f"render_seconds_{device}"] += seconds
    rows = [groups[g] for g in sorted(groups)]
    if by is None and not rows:
        rows = [blank("all")]
    if by is not None:
        total = blank("total")
        for r in rows:
            for key, value in r.items():
                if key != "group":
                    total[key] += value
        rows.append(total)
    for r in rows:
        for key, value in r.items():
            if isinstance(value, float):
                r[key] = round(value, 3)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]) if rows else ["group"]


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_json(rows: list[dict[str, Any]], since: datetime | None, by: str | None) -> str:
    doc = {"since": since.isoformat() if since else None, "by": by, "rows": rows}
    return json.dumps(doc, indent=2)


def to_table(rows: list[dict[str, Any]], by: str | None) -> str:
    names = columns(rows)
    head = [by or "", *(_short(n) for n in names[1:])]
    cells = [[_cell(r[n]) for n in names] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=True)]
    lines = []
    for line in (head, *cells):
        first = line[0].ljust(widths[0])
        rest = (x.rjust(w) for x, w in zip(line[1:], widths[1:], strict=True))
        lines.append("  ".join((first, *rest)).rstrip())
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.replace("render_seconds_", "render_s_").replace("audio_seconds", "audio_s")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render(rows: list[dict[str, Any]], fmt: str, since: datetime | None, by: str | None) -> str:
    if fmt == "csv":
        return to_csv(rows).rstrip("\n")
    if fmt == "json":
        return to_json(rows, since, by)
    return to_table(rows, by)
