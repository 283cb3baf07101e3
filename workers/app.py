"""The Celery app: queues, routes and the settings long GPU tasks need.

`celery -A workers.app worker -Q render` starts a worker; `farm worker` does the
same with the right options. Settings are read once, here, at process start-up.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from farm.config import Settings

CPU_QUEUE = "cpu"
RENDER_QUEUE = "render"

ROUTES = {
    "farm.render": {"queue": RENDER_QUEUE},
    "farm.*": {"queue": CPU_QUEUE},
}


def make_app(settings: Settings) -> Celery:
    app = Celery("farm", include=["workers.tasks"])
    app.conf.update(
        broker_url=settings.effective_broker_url,
        result_backend=settings.effective_result_backend,
        task_queues=[Queue(CPU_QUEUE), Queue(RENDER_QUEUE)],
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
        # Redelivery of unacked messages happens after this; it must exceed the
        # longest task plus its queue wait or long renders run twice (celery#5935).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # Events for Flower: sent, started, succeeded, failed.
        task_send_sent_event=True,
        worker_send_task_events=True,
        # Progress lives in the database; results only where a caller waits for one
        # (avatar registration), which saves a backend round trip on every task.
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app


settings = Settings.from_env()
app = make_app(settings)
