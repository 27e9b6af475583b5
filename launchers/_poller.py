"""Job states for a session, fetched in batches and no more often than sites allow.

Sites rate-limit ``squeue``/``qstat``: a session with a hundred worker jobs must not
run a hundred queries, nor one query per caller per second. A
:class:`JobStatusPoller` asks the system about *all* of the session's unfinished jobs
in one :meth:`~launchers._system.JobSystem.query`, at most once per
``min_interval``; callers in between get the last answer. A failed query backs off:
each consecutive failure doubles the wait (up to ``max_interval``); a success
restores ``min_interval``.

State: the last status of each tracked job; which jobs are *settled* (terminal, or
unknown to the system several times in a row after having been seen) and so are not
asked about again; the time of the next allowed query and the current interval.
A lock makes it safe to share between the adapt thread and callers. The clock is
injected so tests can drive time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from launchers._errors import JobQueueError
from launchers._states import JobState, JobStatus
from launchers._system import JobSystem

__all__ = ["JobStatusPoller"]

logger = logging.getLogger("launchers.poller")


class JobStatusPoller:
    """Batched, rate-limited, backed-off job status for one session.

    Parameters
    ----------
    system
        The job system to ask.
    min_interval
        Seconds between two queries when all is well.
    max_interval
        Longest wait between queries after repeated failures.
    backoff
        Factor the wait grows by after each failed query.
    unknown_limit
        After this many answers in a row of "unknown job" for a job that was seen
        before, stop asking about it (it left the system's memory).
    clock
        Monotonic time in seconds; tests pass a fake.
    """

    def __init__(
        self,
        system: JobSystem,
        *,
        min_interval: float = 5.0,
        max_interval: float = 60.0,
        backoff: float = 2.0,
        unknown_limit: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval < 0 or max_interval < min_interval or backoff < 1:
            raise ValueError(
                "need 0 <= min_interval <= max_interval and backoff >= 1, got "
                f"{min_interval}, {max_interval}, {backoff}"
            )
        self.system = system
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.backoff = backoff
        self.unknown_limit = unknown_limit
        self.clock = clock
        self.interval = min_interval
        self.last_error: JobQueueError | None = None
        self.queries = 0
        self._statuses: dict[str, JobStatus] = {}
        self._seen: set[str] = set()
        self._unknown_runs: dict[str, int] = {}
        self._settled: set[str] = set()
        self._next_query = -math.inf
        self._lock = threading.Lock()

    def track(self, job_id: str) -> None:
        """Start following a job (just submitted: ``PENDING`` until the system says)."""
        with self._lock:
            self._statuses.setdefault(job_id, JobStatus(job_id, JobState.PENDING, source="submit"))

    def forget(self, job_id: str) -> None:
        """Stop following a job."""
        with self._lock:
            self._statuses.pop(job_id, None)
            self._settled.discard(job_id)
            self._seen.discard(job_id)
            self._unknown_runs.pop(job_id, None)

    def unsettle(self, job_id: str) -> None:
        """Ask about an ended job again: a requeued job comes back under the same id.

        Its last status is kept until the system says otherwise.
        """
        with self._lock:
            self._settled.discard(job_id)
            self._unknown_runs.pop(job_id, None)

    def statuses(self) -> dict[str, JobStatus]:
        """The last known status of every tracked job, without asking the system."""
        with self._lock:
            return dict(self._statuses)

    def is_settled(self, job_id: str) -> bool:
        """Whether the job is no longer asked about (it ended, or vanished)."""
        with self._lock:
            return job_id in self._settled

    def seconds_until_next_query(self) -> float:
        """How long until :meth:`poll` may ask the system again (0 if it may now)."""
        with self._lock:
            return max(0.0, self._next_query - self.clock())

    def poll(self) -> dict[str, JobStatus]:
        """Ask the system about unsettled jobs if the interval allows; return all statuses.

        A transient query failure is logged and backed off; the previous statuses are
        returned. A permanent failure (e.g. ``squeue`` missing) is raised, after the
        same back-off is recorded.

        Raises
        ------
        JobQueueError
            The status command failed in a way retrying will not fix.
        """
        with self._lock:
            now = self.clock()
            if now < self._next_query:
                return dict(self._statuses)
            ids = [j for j in self._statuses if j not in self._settled]
            if not ids:
                return dict(self._statuses)
            self.queries += 1
            try:
                fresh = self.system.query(ids)
            except JobQueueError as exc:
                self.last_error = exc
                self.interval = min(max(self.interval, 1e-3) * self.backoff, self.max_interval)
                self._next_query = now + self.interval
                logger.warning(
                    "job status query failed; next try in %.0f s: %s", self.interval, exc
                )
                if not exc.transient:
                    raise
                return dict(self._statuses)
            self.last_error = None
            self.interval = self.min_interval
            self._next_query = now + self.interval
            for job_id in ids:
                self._record(job_id, fresh.get(job_id))
            return dict(self._statuses)

    def _record(self, job_id: str, status: JobStatus | None) -> None:
        if status is None or status.state is JobState.UNKNOWN:
            runs = self._unknown_runs.get(job_id, 0) + 1
            self._unknown_runs[job_id] = runs
            if runs >= self.unknown_limit:
                self._statuses[job_id] = status or JobStatus(job_id, JobState.UNKNOWN)
                if job_id in self._seen:
                    self._settled.add(job_id)
            # Otherwise keep the last known state: one miss is not news.
            return
        self._unknown_runs.pop(job_id, None)
        self._seen.add(job_id)
        self._statuses[job_id] = status
        if status.state.is_terminal:
            self._settled.add(job_id)

    def wait(
        self,
        job_ids: Iterable[str],
        until: Callable[[JobStatus], bool],
        *,
        timeout: float | None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, JobStatus]:
        """Poll until ``until(status)`` holds for every job, or ``timeout`` passes.

        Returns the statuses either way; callers check them. Sleeps only until the next
        query is allowed.
        """
        ids = list(job_ids)
        for job_id in ids:
            self.track(job_id)
        deadline = math.inf if timeout is None else self.clock() + timeout
        while True:
            statuses = self.poll()
            current = {j: statuses[j] for j in ids}
            if all(until(s) for s in current.values()):
                return current
            remaining = deadline - self.clock()
            if remaining <= 0:
                return current
            sleep(min(max(self.seconds_until_next_query(), 0.05), remaining))
