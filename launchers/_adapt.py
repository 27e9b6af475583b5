"""How many worker jobs a cluster should have, given the scheduler's load.

:class:`AdaptivePolicy` is a pure function of a snapshot - queued tasks, idle workers,
running and pending worker jobs - to a target number of worker jobs, so every rule can
be tested with numbers alone:

- work is queued beyond what idle workers can take: ask for enough jobs to run it,
  counting jobs still pending as capacity on its way;
- nothing is queued: jobs whose workers are all idle may go;
- always within ``[minimum_jobs, maximum_jobs]``.

:class:`Adaptive` adds the one piece of memory adapting needs: scaling *down* happens
only after the policy has asked for fewer jobs ``wait_count`` times in a row, so a
short lull between two stages of a computation does not cancel jobs that waited in
the queue for an hour. Scaling up is immediate.
"""

from __future__ import annotations

import dataclasses
import math

from launchers._errors import JobConfigError

__all__ = ["Adaptive", "AdaptivePolicy", "ClusterLoad"]


@dataclasses.dataclass(frozen=True)
class ClusterLoad:
    """A snapshot of the scheduler's load, as the cluster's load source reports it.

    Attributes
    ----------
    queued_tasks
        Tasks ready to run that no worker has taken yet.
    idle_workers
        Workers with nothing to do.
    idle_jobs
        Worker jobs all of whose workers are idle (by job id): the ones that can be
        retired without interrupting work.
    """

    queued_tasks: int
    idle_workers: int
    idle_jobs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdaptivePolicy:
    """Target worker-job count for a load; see the module docstring for the rules.

    Parameters
    ----------
    minimum_jobs, maximum_jobs
        Bounds on the number of worker jobs.
    workers_per_job
        Workers each worker job starts (its MPI ranks).
    threads_per_worker
        Tasks each worker runs at once.
    """

    minimum_jobs: int = 0
    maximum_jobs: int = 4
    workers_per_job: int = 1
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.minimum_jobs < 0:
            raise JobConfigError(f"minimum_jobs must be at least 0, got {self.minimum_jobs}")
        if self.maximum_jobs < self.minimum_jobs:
            raise JobConfigError(
                f"maximum_jobs ({self.maximum_jobs}) is below minimum_jobs ({self.minimum_jobs})"
            )
        if self.workers_per_job < 1 or self.threads_per_worker < 1:
            raise JobConfigError("workers_per_job and threads_per_worker must be at least 1")

    def recommend(
        self, queued_tasks: int, idle_workers: int, running_jobs: int, pending_jobs: int
    ) -> int:
        """Return the number of worker jobs the cluster should have.

        Parameters
        ----------
        queued_tasks
            Tasks waiting for a worker.
        idle_workers
            Workers with nothing to do.
        running_jobs, pending_jobs
            Worker jobs running, and waiting in the batch queue.

        Examples
        --------
        >>> policy = AdaptivePolicy(maximum_jobs=10, workers_per_job=2)
        >>> policy.recommend(queued_tasks=7, idle_workers=0, running_jobs=1, pending_jobs=0)
        5
        >>> policy.recommend(queued_tasks=0, idle_workers=4, running_jobs=3, pending_jobs=1)
        1
        """
        slots_per_job = self.workers_per_job * self.threads_per_worker
        if queued_tasks > 0:
            uncovered = max(0, queued_tasks - idle_workers * self.threads_per_worker)
            wanted = running_jobs + math.ceil(uncovered / slots_per_job)
            # Pending jobs are capacity on its way: keep them while work is queued.
            target = max(wanted, running_jobs + pending_jobs) if uncovered else wanted
        else:
            target = running_jobs - idle_workers // self.workers_per_job
        return min(max(target, self.minimum_jobs), self.maximum_jobs)


class Adaptive:
    """An :class:`AdaptivePolicy` with patience before scaling down.

    State: how many consecutive steps recommended fewer jobs than the cluster has.

    Parameters
    ----------
    policy
        The rules.
    wait_count
        Consecutive lower recommendations needed before scaling down (1: at once).
    """

    def __init__(self, policy: AdaptivePolicy, wait_count: int = 3) -> None:
        if wait_count < 1:
            raise JobConfigError(f"wait_count must be at least 1, got {wait_count}")
        self.policy = policy
        self.wait_count = wait_count
        self._lower_in_a_row = 0

    def step(self, load: ClusterLoad, running_jobs: int, pending_jobs: int) -> int:
        """Return the target number of worker jobs for this step.

        Examples
        --------
        >>> adaptive = Adaptive(AdaptivePolicy(maximum_jobs=4), wait_count=2)
        >>> idle = ClusterLoad(queued_tasks=0, idle_workers=2)
        >>> adaptive.step(idle, running_jobs=2, pending_jobs=0)
        2
        >>> adaptive.step(idle, running_jobs=2, pending_jobs=0)
        0
        """
        current = running_jobs + pending_jobs
        target = self.policy.recommend(
            load.queued_tasks, load.idle_workers, running_jobs, pending_jobs
        )
        bounded = min(max(current, self.policy.minimum_jobs), self.policy.maximum_jobs)
        if target < current and target < bounded:
            self._lower_in_a_row += 1
            if self._lower_in_a_row < self.wait_count:
                return bounded
        self._lower_in_a_row = 0
        return target
