"""farm/usage.py's shaping and formatting of the usage aggregates (pure, no database)."""

from __future__ import annotations

import csv
import io
import json

from farm import usage

JOBS = [
    ("2026-12-01", "succeeded", 3, 30.0, 3000),
    ("2026-12-01", "rendering", 1, 0.0, 0),
    ("2026-12-02", "failed", 2, 5.5, 100),
]
CHUNKS = [
    ("2026-12-01", "cpu", 300, 12.0),
    ("2026-12-01", "unknown", 50, 1.0),
    ("2026-12-02", "tensorrt", 40, 0.5),
]


def test_rows_per_group_add_up_to_the_total():
    rows = usage.shape(JOBS, CHUNKS, "day")
    assert [r["group"] for r in rows] == ["2026-12-01", "2026-12-02", "total"]
    first, second, total = rows
    assert (first["jobs"], first["succeeded"], first["active"], first["failed"]) == (4, 3, 1, 0)
    assert (first["frames"], first["render_seconds_cpu"], first["render_seconds_unknown"]) == (
        350,
        12.0,
        1.0,
    )
    assert (second["failed"], second["render_seconds_tensorrt"]) == (2, 0.5)
    assert total["jobs"] == 6 and total["frames"] == 390 and total["bytes_stored"] == 3100
    assert total["audio_seconds"] == 35.5 and total["render_seconds_cuda"] == 0.0


def test_by_worker_has_chunk_figures_only_and_no_grouping_is_one_row():
    rows = usage.shape([], [("render1@h", "cuda", 10, 2.0)], "worker")
    assert "jobs" not in rows[0] and "bytes_stored" not in rows[0]
    assert [r["group"] for r in rows] == ["render1@h", "total"]
    (only,) = usage.shape([], [], None)
    assert only["group"] == "all" and only["jobs"] == 0 and only["frames"] == 0


def test_formats_parse_back():
    rows = usage.shape(JOBS, CHUNKS, "day")
    parsed = list(csv.DictReader(io.StringIO(usage.render(rows, "csv", None, "day"))))
    assert [r["group"] for r in parsed] == ["2026-12-01", "2026-12-02", "total"]
    assert int(parsed[-1]["frames"]) == 390
    doc = json.loads(usage.render(rows, "json", None, "day"))
    assert doc["rows"] == rows and doc["by"] == "day" and doc["since"] is None
    table = usage.render(rows, "table", None, "day").splitlines()
    assert table[0].split()[:3] == ["day", "jobs", "succeeded"] and len(table) == 4
    assert table[-1].split()[:2] == ["total", "6"]
