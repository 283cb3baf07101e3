"""`farm live --amqp` as a user runs it: a real subprocess on the embedded default (real
workers, TTS and renderer, at 128x128 for speed), messages from the real RabbitMQ on
127.0.0.1:5672 (queues of its own, deleted afterwards), the broadcast recorded by a real
RTMP listener on loopback and decoded.

Every message is accounted for: the valid one is a job that goes on air (idle, then
talking, then idle) and whose result message arrives on its reply_to; the invalid one is
a dead letter with its reason, and the channel keeps streaming through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from farm import intake, jobs, live
from farm.config import Settings
from farm.context import Context
from tests.conftest import need_service
from tests.onair import (
    FPS,
    audio,
    check_continuous,
    listen,
    mouth_motion,
    until,
    video,
    voiced_frames,
)
from tests.services import AMQP_URL, Broker, free_port, rabbitmq_up

pytest.importorskip("av")

pytestmark = pytest.mark.integration
SIZE = 128
TEXT = "Hello there, this is a live test."


def _status(home: Path) -> dict:
    try:
        return live.read_status(home, "demo")[0]
    except Exception:  # not written yet, or being replaced
        return {}


def test_farm_live_takes_jobs_from_amqp(tmp_path: Path) -> None:
    need_service(rabbitmq_up(), f"RabbitMQ at {AMQP_URL}")
    broker = Broker("live")
    home = tmp_path / "home"
    env = {**os.environ, "FARM_HOME": str(home), "FARM_FPS": str(FPS)}
    for name in ("FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_STORE_URL", "FARM_RENDERER"):
        env.pop(name, None)
    env.pop("FARM_SIZE", None)  # the channel's --size, not the settings', sizes its jobs
    reply = broker.declare(broker.name("reply"))
    dead_letters = intake.dead_letter_name(broker.queue)
    port = free_port()
    recording = tmp_path / "rec.flv"
    listener = listen(port, recording)
    log_path = tmp_path / "live.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", "live", "--avatar", "demo", "--size", str(SIZE)]
        + ["--rtmp", f"rtmp://127.0.0.1:{port}/app/key", "--amqp", AMQP_URL]
        + ["--queue", broker.queue],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        until(lambda: _status(home).get("state") == "idle", 120, "the channel on air")
        until(lambda: broker.counts(broker.queue)[1] == 1, 60, "the channel's consumer")
        time.sleep(2.5)  # idle on air
        broker.publish(
            json.dumps({"type": "text", "data": TEXT, "session_id": "s-1"}).encode(),
            message_id="live-1",
            correlation_id="c-1",
            reply_to=reply,
        )
        broker.publish(b'{"type": "video", "data": "x"}', message_id="live-bad")
        (dead,) = broker.take(dead_letters, 1, timeout=60)
        (result,) = broker.take(reply, 1, timeout=120)
        until(
            lambda: _status(home).get("jobs_aired") == 1 and _status(home)["state"] == "idle",
            60,
            "the job on air",
        )
        frames_then = _status(home)["frames_on_air"]
        time.sleep(4.0)  # idle again, still streaming
        status = _status(home)
        assert status["frames_on_air"] >= frames_then + 2 * FPS, status
        assert status["outputs"]["rtmp"]["connected"], status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        listener.wait(timeout=20)  # ends when the channel's output closes
    finally:
        for p in (proc, listener):
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()
        subprocess.run([sys.executable, "-m", "farm", "stop"], env=env, timeout=180)
        broker.close()
    out = log_path.read_text()

    # --- every message accounted for: a result for the job, a dead letter with its reason
    body = json.loads(result.body)
    assert body["state"] == "succeeded", (body, out)
    assert body["message_id"] == "live-1" and body["session_id"] == "s-1"
    assert result.properties["correlation_id"] == "c-1"
    assert (
        "unknown message type 'video'"
        in dead.properties["application_headers"][intake.REASON_HEADER]
    )
    assert dead.properties["message_id"] == "live-bad"
    ctx = Context(Settings(home=home))
    job = jobs.find(ctx, body["job_id"])
    assert (job.width, job.height, job.fps) == (SIZE, SIZE, FPS)  # the channel's, not scaled
    assert "scaled" not in out and "guest:guest" not in out

    # --- the latency was measured from the message, and itemized
    (aired,) = status["latencies"]
    assert aired["job"] == body["job_id"] and aired["seconds"] > 0
    parts = aired["parts"]
    assert set(parts) == {"job", "notice", "decode", "cut", "lead_in"}
    assert all(v >= 0 for v in parts.values()), parts
    assert abs(sum(parts.values()) - aired["seconds"]) < 0.05, aired

    # --- the broadcast: continuous, idle, then the job talking, then idle
    pts, grey = video(recording)
    astarts, samples, rate = audio(recording)
    check_continuous(pts, astarts, samples, rate)
    voiced = voiced_frames(pts, astarts, samples, rate)
    speech = np.flatnonzero(voiced)
    assert speech.size > FPS, "about a second and more of speech"
    lead = aired["frame"] - int(speech[0])  # channel frame of the recording's first frame
    assert 0 <= lead <= 2, lead
    job_start = aired["first_frame"] - lead
    job_end = job_start + aired["frames"]  # the first idle frame after the job
    assert speech[0] > 2 * FPS and not voiced[: speech[0] - 1].any()  # idle before
    assert speech[-1] < job_end and job_end < len(pts) - 2 * FPS  # idle after, on air
    assert not voiced[job_end + 1 :].any()
    motion = mouth_motion(grey)
    in_speech = motion[speech[0] : speech[-1]]
    idle = np.concatenate([motion[: job_start - 1], motion[job_end + 1 :]])
    assert np.median(in_speech) > 5 * max(np.median(idle), 0.02), (in_speech, idle)
