"""`farm live` without ffmpeg or a network: the rest pose that makes cuts invisible, the
seamless idle loop, the queue (message order per session, the bound), the edge match."""

from __future__ import annotations

import numpy as np
import pytest

from farm import live
from farm.config import Settings
from farm.context import Context
from farm.dispatch import InMemoryDispatcher
from models.base import CHANNEL_INDEX, Phone
from models.motion import build_track, idle_beat_frames, idle_exits, idle_track, rest_pose


def _speech() -> tuple[list[Phone], float]:
    # "bob met pam" after a 0.3 s lead-in, then a 0.5 s tail, as a script job has it.
    spec = [("b", 0.08), ("ɑ", 0.15, 2), ("b", 0.08), ("m", 0.08), ("ɛ", 0.12, 2)]
    spec += [("t", 0.07), ("p", 0.08), ("æ", 0.16, 2), ("m", 0.1)]
    phones, t = [], 0.3
    for symbol, length, *stress in spec:
        phones.append(Phone(symbol, t, t + length, stress[0] if stress else 0))
        t += length
    return phones, t + 0.5


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("fps", [25, 30])
def test_every_job_starts_and_ends_exactly_at_the_rest_pose(seed: int, fps: int) -> None:
    phones, seconds = _speech()
    track = build_track(phones, seconds, fps, seed)
    rest = rest_pose().astype(np.float32)
    assert np.array_equal(track[0], rest) and np.array_equal(track[-1], rest)
    # ... and it eases there: no jump on the frames next to the ends either
    assert np.abs(track[1] - rest).max() < 0.05 and np.abs(track[-2] - rest).max() < 0.05
    # and the speech in between is untouched by the ease (the mouth opens)
    assert track[:, CHANNEL_INDEX["jaw_open"]].max() > 0.3


def test_no_blink_is_cut_by_the_ease_at_the_ends() -> None:
    for seed in range(40):
        track = build_track([], 3.0, 25, seed)
        blink = track[:, CHANNEL_INDEX["blink_left"]]
        if blink.max() > 0:
            assert blink.max() >= 0.8  # whole blinks only, never a half one at an end


@pytest.mark.parametrize("fps", [24, 25, 30])
def test_idle_loop_is_seamless_and_at_rest_on_every_cut(fps: int) -> None:
    track = idle_track(fps, seed=5)
    beat = idle_beat_frames(fps)
    assert track.shape[0] % beat == 0
    rest = rest_pose().astype(np.float32)
    for cut in range(0, track.shape[0], beat):
        assert np.array_equal(track[cut], rest)
    # seamless: the step from the last frame into the first is no bigger than the loop's
    # own steps of the slow channels (head, brows), and the mouth never moves
    looped = np.concatenate([track, track[:1]])
    steps = np.abs(np.diff(looped, axis=0))
    slow = [CHANNEL_INDEX[n] for n in ("head_yaw", "head_pitch", "head_roll", "brow_raise")]
    assert steps[-1, slow].max() <= steps[:-1, slow].max()
    mouth = [CHANNEL_INDEX[n] for n in ("jaw_open", "lip_spread", "lip_round", "lip_press")]
    assert steps[:, mouth].max() == 0
    # it lives: head motion (breathing) and a blink somewhere in the loop
    assert np.ptp(track[:, CHANNEL_INDEX["head_pitch"]]) > 0.01
    assert np.array_equal(track, idle_track(fps, seed=5))  # deterministic


@pytest.mark.parametrize("fps", [24, 25, 30])
def test_exits_leave_the_loop_smoothly_and_end_exactly_at_rest(fps: int) -> None:
    """Between the beats' cut points the loop has exits: each carries on from its loop
    frame, eases to the rest pose with no velocity left, never cuts a blink, keeps the
    mouth shut, and none sits where a cut point comes as soon."""
    track = idle_track(fps, seed=5)
    beat = idle_beat_frames(fps)
    exits = idle_exits(track, fps)
    assert len(exits) >= 2 * (track.shape[0] // beat)  # a way out far more often than a beat
    rest = rest_pose().astype(np.float32)
    blinks = [CHANNEL_INDEX["blink_left"], CHANNEL_INDEX["blink_right"]]
    mouth = [CHANNEL_INDEX[n] for n in ("jaw_open", "lip_spread", "lip_round", "lip_press")]
    loop_step = np.abs(np.diff(track, axis=0)).max(axis=0)
    for j, part in exits:
        length = part.shape[0]
        assert (beat - j % beat) % beat > length  # no cut point at or just after j
        assert np.array_equal(part[-1], rest)
        assert np.abs(part[-2] - rest).max() < 0.05  # eased: no jump into the rest pose
        path = np.concatenate([track[j : j + 1], part])
        assert np.abs(path[1] - track[(j + 1) % track.shape[0]]).max() <= loop_step.max()
        assert (path[:, blinks] == 0).all() and (path[:, mouth] == rest[mouth]).all()
        # no faster than the loop's own motion plus the ease (smoothstep's steepest slope
        # is 1.5 / length) over the farthest the loop strays from the rest pose
        bound = loop_step + 1.5 * np.abs(track - rest).max(axis=0) / length + 1e-6
        assert (np.abs(np.diff(path, axis=0)) <= bound).all()


def test_the_loop_goes_on_from_the_next_cut_point() -> None:
    clip = live.Clip([b"x"] * 30, np.zeros(0, np.int16))
    idle = live.IdleLoop(clip, frozenset({0, 10, 20}), "portrait", 24, {5: 24}, 6)
    assert [idle.next_cut(p) for p in (0, 1, 10, 11, 21, 23)] == [0, 10, 10, 20, 0, 0]
    assert live.IdleLoop(clip, frozenset({0}), "portrait").loop == 30


def _channel(tmp_path, queue_max: int = 3) -> live.Channel:
    ctx = Context(Settings(home=tmp_path), InMemoryDispatcher())
    spec = live.ChannelSpec("demo", "rtmp://127.0.0.1:1/app/key", 25, (64, 64), 0, None, queue_max)
    return live.Channel(ctx, spec, say=lambda line: None)


def test_jobs_go_on_air_in_message_order_per_session(tmp_path) -> None:
    channel = _channel(tmp_path, queue_max=10)
    for job, session in (("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b")):
        channel.add(job, session)
    state = {p.job_id: p for p in channel.pending}
    state["a2"].state = state["b2"].state = state["b1"].state = "ready"
    assert channel._next_ready().job_id == "b1"  # a1 is not ready: a2 waits behind it
    assert channel._next_ready().job_id == "b2"
    assert channel._next_ready() is None
    state["a1"].state = "ready"
    assert [channel._next_ready().job_id for _ in range(2)] == ["a1", "a2"]


def test_a_burst_is_bounded_by_the_setting(tmp_path) -> None:
    channel = _channel(tmp_path, queue_max=3)
    for i in range(3):
        channel.add(f"j{i}")
    assert not channel.has_room()
    with pytest.raises(live.QueueFull, match="3 pending"):
        channel.add("j3")
    assert [p.job_id for p in channel.pending] == ["j0", "j1", "j2"]


def test_queue_bound_is_a_validated_setting() -> None:
    assert Settings.from_env({}, dotenv=None).live_queue_max == 16
    with pytest.raises(Exception, match="FARM_LIVE_QUEUE_MAX"):
        Settings.from_env({"FARM_LIVE_QUEUE_MAX": "0"})


def test_edges_of_a_job_take_the_loops_rest_frame_exactly() -> None:
    rng = np.random.default_rng(0)
    rest = rng.integers(0, 256, 96, dtype=np.uint8)
    noisy = [np.clip(rest.astype(int) + rng.integers(-3, 4, 96), 0, 255).astype(np.uint8)]
    frames = [f.tobytes() for f in noisy * 20]
    out = live.match_edges(frames, rest.tobytes(), 8)
    assert out[0] == rest.tobytes() and out[-1] == rest.tobytes()
    assert out[10] == frames[10]  # the middle is the job's own
    steps = [np.abs(np.diff([np.frombuffer(out[i + j], np.uint8).astype(int) for j in (0, 1)],
                            axis=0)).max() for i in range(8)]  # fmt: skip
    assert max(steps) <= 2  # faded, not switched


def test_rtmp_key_is_not_shown() -> None:
    assert live.show_url("rtmp://host:1935/app/secret-key") == "rtmp://host:1935/app/***"
