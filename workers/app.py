"""The Celery app: queues, routes and the settings long GPU tasks need.

`celery -A workers.app worker -Q render` starts a worker; `farm worker` does the
same with the right options. Settings are read once, here, at process start-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_ready,
)
from kombu import Queue

from farm.config import Settings, redact_logs
from farm.pipeline import BY_TASK, STAGES
from workers.beat import beat_schedule

CPU_QUEUE = "cpu"
RENDER_QUEUE = "render"
# The bulk lane (batches): the same work at a lower priority. Workers list these after
# the interactive queues and drain queues in the order listed (queue_order_strategy
# below), so with prefetch 1 a worker that frees up takes an interactive task first.
CPU_BULK_QUEUE = "cpu_bulk"
RENDER_BULK_QUEUE = "render_bulk"
BULK_QUEUES = {CPU_QUEUE: CPU_BULK_QUEUE, RENDER_QUEUE: RENDER_BULK_QUEUE}

# Each stage's queue is in the stage table (farm/pipeline.py); every other task is cpu.
ROUTES = {
    **{stage.task: {"queue": stage.queue} for stage in STAGES if stage.queue != CPU_QUEUE},
    "farm.*": {"queue": CPU_QUEUE},
}


def bulk_queue(task_name: str) -> str:
    """The bulk-lane queue of a task: render_bulk for chunks, cpu_bulk for the rest."""
    stage = BY_TASK.get(task_name)
    return BULK_QUEUES[stage.queue if stage else CPU_QUEUE]


# Publishing from a worker (the next stage, a retry, a webhook attempt) waits out a broker
# restart, about two minutes, before the task fails: with Celery's default of under a
# second, a chunk that finished while Redis restarted would fail its job. Elsewhere (the
# CLI) the default stands, so `farm submit` against a broker that is down answers at once.
WORKER_PUBLISH_RETRY = {
    "max_retries": 60,
    "interval_start": 0,
    "interval_step": 1,
    "interval_max": 2,
}


def make_app(settings: Settings) -> Celery:
    app = Celery("farm", include=["workers.tasks"])
    app.conf.update(
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
        task_queues=[
            Queue(q) for q in (CPU_QUEUE, RENDER_QUEUE, CPU_BULK_QUEUE, RENDER_BULK_QUEUE)
        ],
        task_default_queue=CPU_QUEUE,
        task_routes=ROUTES,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        # A killed worker's task goes back to the queue instead of vanishing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Long tasks: take one at a time so a queued chunk can go to an idle worker.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Redelivery of unacked messages happens after this; it must exceed the
            # longest task plus its queue wait or long renders run twice (celery#5935).
            "visibility_timeout": settings.visibility_timeout,
            # BRPOP names a worker's queues in -Q order and takes from the first that
            # is not empty. kombu's default, round robin, would alternate between an
            # interactive queue and a full bulk queue.
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # A worker that lost its broker reconnects for as long as it takes (a supervisor
        # restarting it would only wait the same way). The task it was running goes on;
        # see tests/integration/test_restarts.py for what happens to its message.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Events for Flower: sent, started, succeeded, failed.
        task_send_sent_event=True,
        worker_send_task_events=True,
        # Progress lives in the database; results only where a caller waits for one
        # (avatar registration), which saves a backend round trip on every task.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        # The nightly batch (workers/beat.py): crontabs are read in UTC. Run exactly
        # one `celery -A workers.app beat`; a second would fire every entry twice.
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    return app


@worker_init.connect
def _patient_publishing(sender: Any, **_: Any) -> None:
    # Before the pool starts and before anything is sent: the policy is read when the
    # app's task sender is made, on the first send.
    sender.app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY


@worker_init.connect
def _probe_video_encoder(sender: Any, **_: Any) -> None:
    # Render chunks and the mux both encode. Probed once in the main process, before
    # the pool forks (ffmpeg only, no CUDA), so every child inherits the choice; an
    # explicit FARM_VIDEO_ENCODER that cannot encode stops the worker here, with
    # ffmpeg's reason, instead of failing every chunk it would take. Logging is not
    # set up yet at this point: the refusal goes to stderr, the choice is logged once
    # the worker is ready.
    from farm import encoders

    try:
        encoders.choose(settings.video_encoder)
    except encoders.EncoderError as exc:
        print(f"farm worker: cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from exc


@worker_ready.connect
def _say_video_encoder(sender: Any, **_: Any) -> None:
    from farm import encoders

    choice = encoders.choose(settings.video_encoder)
    logging.getLogger("farm.worker").info("video encoder: %s", choice.reason)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _redact_secrets(logger: Any, **_: Any) -> None:
    # Passwords, keys and tokens never reach a worker's log, at any --loglevel.
    redact_logs(logger)


settings = Settings.from_env()
app = make_app(settings)
