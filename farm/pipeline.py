"""The stages of a job, in one table: prepare -> tts x S -> plan -> render x N -> mux ->
publish (DESIGN.md). Everything that names a stage reads it here: the dispatcher (task
name, queue, task id), the sweep (which stage a stalled job waits for), `farm retry`
(where a failed job starts again) and `farm cancel` (which task ids to revoke).

A stage's work is due while the job is in one of its `states`; a stage with members
(`segments`, `chunks`) runs once per unfinished member, the others once per job. The
functions that do each stage's work live in workers/stages.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from farm import states

SEGMENTS, CHUNKS = "segments", "chunks"


@dataclass(frozen=True)
class Stage:
    name: str
    queue: str  # cpu | render; a bulk job's stages go to the queue's bulk lane
    states: tuple[str, ...]  # job states in which this stage's work is due
    members: str | None = None  # SEGMENTS | CHUNKS: one task per unfinished member

    @property
    def task(self) -> str:
        return f"farm.{self.name}"


PREPARE = Stage("prepare", "cpu", (states.QUEUED, states.PREPARING))
TTS = Stage("tts", "cpu", (states.SPEAKING,), SEGMENTS)
PLAN = Stage("plan", "cpu", (states.PLANNING,))
RENDER = Stage("render", "render", (states.RENDERING,), CHUNKS)
MUX = Stage("mux", "cpu", (states.MUXING,))
PUBLISH = Stage("publish", "cpu", (states.PUBLISHING,))
STAGES: tuple[Stage, ...] = (PREPARE, TTS, PLAN, RENDER, MUX, PUBLISH)
BY_NAME = {s.name: s for s in STAGES}
BY_TASK = {s.task: s for s in STAGES}
NEXT = dict(zip(STAGES, STAGES[1:], strict=False))


# A backend whose plan needs the GPU (Ditto's HuBERT and diffusion sampling) plans
# on the render queue: the same task, another queue.
PLAN_ON_RENDER = replace(PLAN, queue="render")


def for_renderer(stage: Stage, renderer: str) -> Stage:
    """The stage as a job of this renderer runs it: where its plan runs is the
    backend's declaration (models/registry.py, PLANS_ON_RENDER)."""
    from models.registry import PLANS_ON_RENDER  # names only: no backend is imported

    if stage == PLAN and renderer in PLANS_ON_RENDER:
        return PLAN_ON_RENDER
    return stage


def task_id(job_id: str, stage: Stage, idx: int | None = None) -> str:
    """Deterministic, so `farm cancel` can revoke a job's queued tasks by id."""
    return f"{job_id}-{stage.name}" if idx is None else f"{job_id}-{stage.name}-{idx}"


def task_ids(job_id: str, segments: int, chunks: int) -> list[str]:
    """Every task id a job can have."""
    counts = {SEGMENTS: segments, CHUNKS: chunks}
    ids = []
    for stage in STAGES:
        if stage.members is None:
            ids.append(task_id(job_id, stage))
        else:
            ids += [task_id(job_id, stage, i) for i in range(counts[stage.members])]
    return ids


def unfinished(stage: Stage, segments: list[Any], chunks: list[Any]) -> list[tuple[int, ...]]:
    """The task arguments after the job id of a stage's unfinished members: (idx,) for
    a segment, (idx, start, stop) for a chunk (Flower shows each chunk's frames)."""
    if stage.members == SEGMENTS:
        return [(seg.idx,) for seg in segments if seg.state != "done"]
    if stage.members == CHUNKS:
        return [(c.idx, c.start_frame, c.stop_frame) for c in chunks if c.state != "done"]
    return []


def stage_in(state: str) -> Stage:
    """The stage whose work an active job in `state` waits for."""
    for stage in STAGES:
        if state in stage.states:
            return stage
    raise ValueError(f"no stage runs in state {state!r}")


def restart_at(segments: list[Any], chunks: list[Any]) -> Stage:
    """Where a failed job starts again, keeping everything it finished: the first
    stage whose work is not all done."""
    if chunks:
        return RENDER if unfinished(RENDER, segments, chunks) else MUX
    if segments:
        return TTS if unfinished(TTS, segments, chunks) else PLAN
    return PREPARE
