"""The scheduler's load as adaptive scaling sees it, read through a runtime Client.

State kept: the :class:`runtime.client.Client` connected to the cluster (the cluster
gets it when ``Client(cluster)`` connects). Each call asks the scheduler for its task
counts and workers and turns them into a :class:`~launchers._adapt.ClusterLoad`;
retiring a job closes its workers through the scheduler before the job is cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from launchers._adapt import ClusterLoad

__all__ = ["SchedulerLoad"]


def _same_job(worker_job: str | None, job_id: str) -> bool:
    # PBS ids may come with or without the server suffix ("123" vs "123.server").
    if not worker_job:
        return False
    return worker_job == job_id or worker_job.split(".")[0] == job_id.split(".")[0]


class SchedulerLoad:
    """Callable load source and job retirer for a cluster's scheduler.

    Parameters
    ----------
    client
        A connected :class:`runtime.client.Client`.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def _connect(self) -> Any:
        return self._client

    def __call__(self) -> ClusterLoad:
        info = self._connect().scheduler_info()
        tasks = info.get("tasks") or {}
        workers = info.get("workers") or {}
        idle = [w for w in workers.values() if not w.get("processing")]
        by_job: dict[str, list[dict]] = {}
        for w in workers.values():
            if w.get("job_id"):
                by_job.setdefault(str(w["job_id"]), []).append(w)
        idle_jobs = tuple(
            job for job, ws in by_job.items() if all(not w.get("processing") for w in ws)
        )
        queued = int(tasks.get("queued", 0)) + int(tasks.get("waiting", 0))
        return ClusterLoad(queued_tasks=queued, idle_workers=len(idle), idle_jobs=idle_jobs)

    def retire(self, job_ids: Sequence[str]) -> None:
        """Close the workers of ``job_ids`` through the scheduler."""
        client = self._connect()
        workers = client.scheduler_info().get("workers") or {}
        doomed = [
            address
            for address, w in workers.items()
            if any(_same_job(w.get("job_id"), j) for j in job_ids)
        ]
        if doomed:
            client.retire_workers(doomed)
