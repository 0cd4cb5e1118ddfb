"""Sending a job to the worker queue by the task's name: this module needs nothing from jobs.tasks,
so jobs.submission (web) and jobs.reliability (the worker's watchdog) both enqueue without an
import cycle. Where jobs.tasks is loaded (the worker, tests) its registered task object sends the
message; elsewhere (the web server) Celery sends it by name (`send_task`), the same message."""
from __future__ import annotations

import logging

from celery import current_app
from django.conf import settings

from .models import Job

log = logging.getLogger(__name__)

RUN_JOB = "jobs.tasks.run_job"  # the name jobs.tasks registers its task under
QUEUE = "gpu"


def enqueue(job: Job, *, fail_if_unreachable: bool = True) -> None:
    """Send the job to the `gpu` queue. If the broker refuses, the job fails visibly (or, for the
    watchdog's re-sends, stays queued for the next attempt)."""
    try:
        options = {"queue": QUEUE, "retry": True,
                   "retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}}
        task = current_app.tasks.get(RUN_JOB)
        if task is not None:
            task.apply_async(args=[str(job.id)], **options)
        else:
            current_app.send_task(RUN_JOB, args=[str(job.id)], **options)
    except Exception as exc:  # kombu raises several connection error types
        log.exception("could not enqueue job %s", job.id)
        if fail_if_unreachable:
            Job.fail(job.id, "BrokerUnavailable",
                     f"the job queue (Redis at {settings.REDIS_URL}) is unreachable: {exc}")
    else:
        log.info("queued job %s", job.id)
