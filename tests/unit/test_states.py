import pytest

from farm import states


def test_forward_one_stage_only():
    assert states.can_transition(states.QUEUED, states.PREPARING)
    assert states.can_transition(states.RENDERING, states.MUXING)
    assert not states.can_transition(states.QUEUED, states.RENDERING)
    assert not states.can_transition(states.MUXING, states.RENDERING)


@pytest.mark.parametrize("final", sorted(states.FINAL))
def test_final_states_are_final(final):
    for target in states.PIPELINE + (states.FAILED, states.CANCELLED):
        assert not states.can_transition(final, target)


def test_any_active_state_can_fail_or_be_cancelled():
    for s in states.ACTIVE:
        assert states.can_transition(s, states.FAILED)
        assert states.can_transition(s, states.CANCELLED)


def test_predecessors_match_can_transition():
    assert states.predecessors(states.MUXING) == (states.RENDERING,)
    assert set(states.predecessors(states.CANCELLED)) == set(states.ACTIVE)


def test_progress_is_monotonic_along_the_pipeline():
    seen = [states.progress(s, 1, 2) for s in states.PIPELINE]
    assert seen == sorted(seen)
    assert states.progress(states.RENDERING, 0, 4) < states.progress(states.RENDERING, 3, 4)
