"""The job state machine. Every change is a guarded UPDATE ... WHERE state IN (expected),
so a re-delivered task that finds the job already moved on changes nothing."""

from __future__ import annotations

QUEUED = "queued"
PREPARING = "preparing"
SPEAKING = "speaking"
PLANNING = "planning"
RENDERING = "rendering"
MUXING = "muxing"
PUBLISHING = "publishing"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

# The stages in order: a job walks this list, or leaves it for a final state.
PIPELINE: tuple[str, ...] = (
    QUEUED,
    PREPARING,
    SPEAKING,
    PLANNING,
    RENDERING,
    MUXING,
    PUBLISHING,
    SUCCEEDED,
)
FINAL: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE: frozenset[str] = frozenset(PIPELINE) - FINAL


def can_transition(current: str, target: str) -> bool:
    """Forward one stage, or from any active state to failed/cancelled."""
    if current in FINAL:
        return False
    if target in (FAILED, CANCELLED):
        return True
    if current in PIPELINE and target in PIPELINE:
        return PIPELINE.index(target) == PIPELINE.index(current) + 1
    return False


def predecessors(target: str) -> tuple[str, ...]:
    """The states a job may be in for a move to `target` to be legal."""
    return tuple(s for s in PIPELINE + (FAILED, CANCELLED) if can_transition(s, target))


def progress(state: str, chunks_done: int, chunks_total: int) -> float:
    """A 0..1 figure for progress bars; rendering dominates the wall time."""
    if state == SUCCEEDED:
        return 1.0
    if state in (QUEUED, PREPARING):
        return 0.0
    if state in (SPEAKING, PLANNING):
        return 0.05
    if state == RENDERING:
        return 0.1 + 0.8 * (chunks_done / chunks_total if chunks_total else 0.0)
    if state in (MUXING, PUBLISHING):
        return 0.95
    return 0.0
