"""The stage table (farm/pipeline.py) against the state machine and the routes."""

from __future__ import annotations

from types import SimpleNamespace as Row

import pytest

from farm import pipeline, states
from farm.pipeline import MUX, PLAN, PREPARE, RENDER, STAGES, TTS


def test_every_active_state_waits_for_exactly_one_stage():
    for state in states.ACTIVE:
        owners = [s for s in STAGES if state in s.states]
        assert len(owners) == 1, (state, owners)
        assert pipeline.stage_in(state) is owners[0]
    with pytest.raises(ValueError):
        pipeline.stage_in(states.SUCCEEDED)


def test_stages_follow_the_state_machine_in_order():
    # Each stage's first state comes after the previous stage's, in states.PIPELINE.
    firsts = [states.PIPELINE.index(s.states[0]) for s in STAGES]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    assert [pipeline.NEXT.get(s) for s in STAGES] == [*STAGES[1:], None]


def test_task_ids_name_every_task_of_a_job_once():
    ids = pipeline.task_ids("j", segments=2, chunks=3)
    assert len(ids) == len(set(ids)) == 4 + 2 + 3
    assert "j-tts-1" in ids and "j-render-2" in ids and "j-mux" in ids
    assert pipeline.task_id("j", RENDER, 0) == "j-render-0"


def test_a_failed_job_restarts_at_its_first_unfinished_stage():
    done, todo = "done", "failed"
    seg = [Row(idx=0, state=done), Row(idx=1, state=todo)]
    all_segs = [Row(idx=0, state=done), Row(idx=1, state=done)]
    chunk = [
        Row(idx=0, state=done, start_frame=0, stop_frame=5),
        Row(idx=1, state=todo, start_frame=5, stop_frame=9),
    ]
    all_chunks = [Row(idx=0, state=done, start_frame=0, stop_frame=5)]
    assert pipeline.restart_at([], []) is PREPARE
    assert pipeline.restart_at(seg, []) is TTS
    assert pipeline.unfinished(TTS, seg, []) == [(1,)]
    assert pipeline.restart_at(all_segs, []) is PLAN
    assert pipeline.restart_at(all_segs, chunk) is RENDER
    assert pipeline.unfinished(RENDER, all_segs, chunk) == [(1, 5, 9)]
    assert pipeline.restart_at(all_segs, all_chunks) is MUX
    assert pipeline.unfinished(MUX, all_segs, all_chunks) == []


def test_the_routes_put_each_stage_on_its_queue_and_lane():
    from workers.app import ROUTES, bulk_queue

    for stage in STAGES:
        routed = ROUTES.get(stage.task, ROUTES["farm.*"])["queue"]
        assert routed == stage.queue
        assert bulk_queue(stage.task) == f"{stage.queue}_bulk"
    assert bulk_queue("farm.notify") == "cpu_bulk"


def test_a_backend_that_plans_on_the_gpu_gets_its_plan_on_the_render_queue():
    assert pipeline.for_renderer(PLAN, "ditto").queue == "render"
    assert pipeline.for_renderer(PLAN, "ditto").task == PLAN.task  # the same task
    assert pipeline.for_renderer(PLAN, "portrait") is PLAN
    assert pipeline.for_renderer(RENDER, "ditto") is RENDER
