"""The Celery app: queues, routes and the settings long GPU tasks need.

`celery -A workers.app worker -Q render` starts a worker; `farm worker` does the
same with the right options. Settings are read once, here, at process start-up.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from farm.config import Settings
from workers.beat import beat_schedule

CPU_QUEUE = "cpu"
RENDER_QUEUE = "render"
# The bulk lane (batches): the same work at a lower priority. Workers list these after
# the interactive queues and drain queues in the order listed (queue_order_strategy
# below), so with prefetch 1 a worker that frees up takes an interactive task first.
CPU_BULK_QUEUE = "cpu_bulk"
RENDER_BULK_QUEUE = "render_bulk"
BULK_QUEUES = {CPU_QUEUE: CPU_BULK_QUEUE, RENDER_QUEUE: RENDER_BULK_QUEUE}

ROUTES = {
    "farm.render": {"queue": RENDER_QUEUE},
    "farm.*": {"queue": CPU_QUEUE},
}


def bulk_queue(task_name: str) -> str:
    """The bulk-lane queue of a task: render_bulk for chunks, cpu_bulk for the rest."""
    return BULK_QUEUES[RENDER_QUEUE if task_name == "farm.render" else CPU_QUEUE]


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


settings = Settings.from_env()
app = make_app(settings)
