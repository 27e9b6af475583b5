"""The distributed scheduler: a task state machine, and the asyncio server around it.

Two layers, kept apart so the first can be driven and checked in-process:

- :class:`SchedulerState` holds every task, worker and client the scheduler knows
  and moves tasks between the states of :class:`TaskState`. It does no I/O: each
  public method takes one parsed message (or a batch from one peer) and returns the
  messages to send, grouped by recipient (``{worker address or client id: [msg, ...]}``).
  :meth:`SchedulerState.validate` checks every invariant; the tests call it after each
  step.
- :class:`Scheduler` listens (``runtime.comm``), keeps one connection and one
  ``BatchedSend`` per worker and per client, feeds received batches to the state and
  sends what comes back. It writes the scheduler file, removes workers whose
  connection closed or that went silent for ``distributed.scheduler.worker-ttl``, and
  stops on the ``shutdown`` op or SIGTERM.

Life of a task (one record, :class:`TaskRecord`, per key)::

    update-graph --> RELEASED --(needed)--> WAITING --(inputs in memory)--+
                        ^                      |                          |
                        |                      v                          v
                        |        QUEUED (root tasks, or no worker fits) --> PROCESSING
                        |                                                 |    |
                        +--(nobody needs it: freed)-- MEMORY <-task-finished   |
                        +--(nobody wants it)--------- ERRED  <-task-erred -----+
                   FORGOTTEN: released, and no client or dependent refers to it

State kept in :class:`SchedulerState`, and why:

- ``tasks``: key -> :class:`TaskRecord`. A record keeps its opaque payload (the frames
  the client serialized; never unpickled here) until it is forgotten, so a result
  lost with its worker can be recomputed, walking back through released inputs.
- Per task, ``waiters`` (dependents that still need its result) and ``who_wants``
  (clients holding a Future): a result is freed on the workers the moment both are
  empty. ``waiting_on`` (inputs not in memory yet) makes "ready" an O(1) check.
- ``workers``: address -> :class:`WorkerRecord` with the tasks ``processing`` there
  and those it holds (``has_what``); ``clients``: id -> :class:`ClientRecord`.
- The root-task queue: a heap of ready tasks without inputs (or fanning out from
  shared inputs), released only while some worker has a free slot (threads times
  ``worker-saturation``, plus a look-ahead for tasks measured to be short), so a
  100,000-task map never floods the workers. Ready tasks with inputs go straight to
  the worker holding most of their input bytes.
- Failure bookkeeping: ``suspicious`` counts the workers that died while a task was
  processing on them; at ``allowed-failures`` it errs with
  :class:`~runtime.errors.KilledWorker`. A task that was on a dying worker more than
  once runs alone on a worker, so that an innocent neighbour of a task that kills
  its worker is not blamed with it.

Checkpoints (:mod:`runtime.checkpoint`): an ``update-graph`` may carry a directory
and the identity token of each task (``TaskRecord.checkpoint``). Before a task is
computed, the scheduler looks its token up (a header read; it never unpickles a
result). A task found stored (``TaskRecord.stored``) is not computed, and its inputs
are not needed for it:

- if only dependents need it, it goes straight to MEMORY with no worker holding it
  ("held by the store"): each worker running a dependent loads it itself, where it is
  needed (``stored`` in ``compute-task``). A worker that cannot load it reports
  ``missing-data`` with ``checkpoint``; the task is then computed from its inputs.
- if a client wants it, a worker loads it as a task (``load`` in ``compute-task``),
  like a root task, so that the client can gather it from that worker. A failed load
  (``task-erred``) is not an error: the task is computed from its inputs instead.

The worker that computes a task with a token writes its checkpoint. Lookups happen
each time a task is about to be (re)computed, so a result lost with its worker is
loaded from its checkpoint rather than recomputed when one was written meanwhile.

Per-task cost is what limits a central scheduler, so the hot path avoids anything
per-task that is not needed: records use ``__slots__``, sets are created only when a
task has something to put in them, no logging happens per task, and messages are
plain dicts appended to one list per recipient (the server's ``BatchedSend`` turns
each list into one write).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import gc
import heapq
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from runtime.errors import (
    CommClosedError,
    HPCError,
    KilledWorker,
    SchedulerError,
    SerializationError,
    VersionMismatchError,
)
from runtime.protocol import Op

__all__ = [
    "ClientRecord",
    "Outgoing",
    "Scheduler",
    "SchedulerState",
    "TaskRecord",
    "TaskState",
    "WorkerRecord",
    "main",
    "make_parser",
]

logger = logging.getLogger(__name__)

Key = Hashable
_QueueEntry = tuple[tuple, int, "TaskRecord"]
Outgoing = dict[str, list[dict[str, Any]]]
"""Messages to send, by recipient: a worker's address or a client's id."""


class TaskState(enum.Enum):
    """Where a task is in its life (see the diagram in the module docstring)."""

    RELEASED = "released"
    """Known, but not in memory and not being computed (nobody needs it now)."""
    WAITING = "waiting"
    """Needed; some of its inputs are not in memory yet."""
    QUEUED = "queued"
    """Ready to run, waiting for a worker slot (or for a worker it may run on)."""
    PROCESSING = "processing"
    """Assigned to exactly one worker."""
    MEMORY = "memory"
    """Its result is held by at least one worker."""
    ERRED = "erred"
    """It, or one of its inputs, failed; a client still holds it."""
    FORGOTTEN = "forgotten"
    """Dropped from the scheduler: no client and no dependent refers to it."""


_RELEASED = TaskState.RELEASED
_WAITING = TaskState.WAITING
_QUEUED = TaskState.QUEUED
_PROCESSING = TaskState.PROCESSING
_MEMORY = TaskState.MEMORY
_ERRED = TaskState.ERRED
_FORGOTTEN = TaskState.FORGOTTEN

# Plain strings on the wire (an Op member would pickle as a reference to its class).
_COMPUTE_TASK = Op.COMPUTE_TASK.value
_FREE_KEYS = Op.FREE_KEYS.value
_KEY_IN_MEMORY = Op.KEY_IN_MEMORY.value
_TASK_ERRED = Op.TASK_ERRED.value
_TASK_CANCELLED = Op.TASK_CANCELLED.value
_LOST_DATA = Op.LOST_DATA.value
_TASK_FINISHED = Op.TASK_FINISHED.value
_HEARTBEAT = Op.HEARTBEAT.value
_MISSING_DATA = Op.MISSING_DATA.value
_RELEASE_WORKER_DATA = Op.RELEASE_WORKER_DATA.value
_UPDATE_GRAPH = Op.UPDATE_GRAPH.value
_RELEASE_KEYS = Op.RELEASE_KEYS.value
_CANCEL_KEYS = Op.CANCEL_KEYS.value
_UPDATE_DATA = Op.UPDATE_DATA.value
_WHO_HAS = Op.WHO_HAS.value
_SCHEDULER_INFO = Op.SCHEDULER_INFO.value
_CLOSE_CLIENT = Op.CLOSE_CLIENT.value
_REGISTER_WORKER = Op.REGISTER_WORKER.value
_REGISTER_CLIENT = Op.REGISTER_CLIENT.value
_RETIRE_WORKERS = Op.RETIRE_WORKERS.value
_SHUTDOWN = Op.SHUTDOWN.value
_CLOSE = Op.CLOSE.value
_OK = Op.OK.value
_ERROR = Op.ERROR.value

# Where a QUEUED task waits (TaskRecord.queued_in).
_NOT_QUEUED = 0
_IN_HEAP = 1  # the root-task queue
_IN_UNRUNNABLE = 2  # no running worker may take it (none at all, or restrictions)
_IN_SUSPECTS = 3  # it was on dying workers before: waits to run alone on a worker

# Root-ish tasks: no inputs, or at most this many inputs that each feed many tasks.
_ROOTISH_MAX_DEPENDENCIES = 4
# Cap of the look-ahead: extra root tasks per thread for very short tasks.
_MAX_LOOKAHEAD_PER_THREAD = 256
# Durations of root tasks are averaged over about this many of the latest ones.
_DURATION_WINDOW = 64
# Graphs with at least this many tasks are added with the cyclic GC paused.
_GC_PAUSE_TASKS = 1000


def _config(name: str) -> Any:
    # The defaults are runtime.yaml's (always loaded); not repeated here.
    from runtime import config

    return config.get(f"distributed.scheduler.{name}")


# ----------------------------------------------------------------------------- records


#: Graphs with at least this many tasks have their checkpoints looked up in threads.
_LOOKUP_AHEAD_TASKS = 32

#: Up to this many idle workers, root tasks go to the least occupied one.
_LEAST_OCCUPIED_SCAN = 64


def _occupancy(ws: WorkerRecord) -> float:
    return len(ws.processing) / ws.nthreads


class TaskRecord:
    """What the scheduler knows about one task (one key).

    Sets that are often empty (``dependents``, ``waiters``, ``waiting_on``,
    ``who_has``, ``who_wants``) are None until they get a first member: a million
    pending tasks should not cost a million empty sets each.

    Attributes
    ----------
    key
        The task's key (str or tuple).
    state : TaskState
    payload
        The serialized task (frames from the client), forwarded to workers as is;
        None for data that was scattered (it cannot be recomputed).
    priority : tuple
        Lower runs first; given by the client.
    dependencies : tuple of TaskRecord
        Inputs; fixed when the task is defined.
    dependents : set of TaskRecord or None
        Known tasks that take this one as input.
    waiters : set of TaskRecord or None
        Dependents that are waiting, queued or processing: they need the result.
    waiting_on : set of TaskRecord or None
        While WAITING: the inputs not in memory yet.
    who_has : set of WorkerRecord or None
        While MEMORY: the workers holding the result.
    processing_on : WorkerRecord or None
        While PROCESSING: the worker it was sent to.
    who_wants : set of ClientRecord or None
        Clients holding a Future for this key.
    nbytes : int
        Size of the result as reported by the worker (0 until known).
    type : str or None
        Type name of the result.
    retries : int
        Retries left for retryable exceptions.
    suspicious : int
        Workers that died while this task was processing on them.
    lost_on : list of str or None
        Their addresses, for the KilledWorker message.
    restrictions : frozenset or None
        Worker addresses, names or hosts the task may run on.
    error : _ErrorInfo or None
        While ERRED: the failure (of this task or of the input it inherited it from).
    rootish : bool
        Went through the root-task queue (its duration feeds the look-ahead).
    scattered : bool
        Its data came from a client (``update-data``), not from running it.
    queued_in : int
        While QUEUED: which queue holds it.
    checkpoint : tuple of (str, str) or None
        ``(directory, identity token)`` when the client asked for checkpoints.
    stored : bool or None
        True when the last lookup found its checkpoint (it is then loaded, not
        computed); False after loading it failed (it is no longer looked up); None
        otherwise.
    """

    __slots__ = (
        "checkpoint",
        "dependencies",
        "dependents",
        "error",
        "key",
        "lost_on",
        "nbytes",
        "payload",
        "priority",
        "processing_on",
        "queued_in",
        "restrictions",
        "retries",
        "rootish",
        "scattered",
        "state",
        "stored",
        "suspicious",
        "type",
        "waiters",
        "waiting_on",
        "who_has",
        "who_wants",
    )

    def __init__(self, key: Key, payload: Any = None, priority: tuple = (0,)) -> None:
        self.key = key
        self.state = _RELEASED
        self.payload = payload
        self.priority = priority
        self.dependencies: tuple[TaskRecord, ...] = ()
        self.dependents: set[TaskRecord] | None = None
        self.waiters: set[TaskRecord] | None = None
        self.waiting_on: set[TaskRecord] | None = None
        self.who_has: set[WorkerRecord] | None = None
        self.processing_on: WorkerRecord | None = None
        self.who_wants: set[ClientRecord] | None = None
        self.nbytes = 0
        self.type: str | None = None
        self.retries = 0
        self.suspicious = 0
        self.lost_on: list[str] | None = None
        self.restrictions: frozenset[Any] | None = None
        self.error: _ErrorInfo | None = None
        self.rootish = False
        self.scattered = False
        self.queued_in = _NOT_QUEUED
        self.checkpoint: tuple[str, str] | None = None
        self.stored: bool | None = None

    def __repr__(self) -> str:
        return f"<TaskRecord {self.key!r} {self.state.value}>"


class WorkerRecord:
    """What the scheduler knows about one worker.

    Attributes
    ----------
    address, name, nthreads, memory_limit, pid, host, job_id, versions
        As the worker registered them.
    index : int
        Registration order: breaks placement ties deterministically.
    processing : set of TaskRecord
        Tasks sent to it and not finished.
    has_what : set of TaskRecord
        Tasks whose result it holds.
    nbytes : int
        Total size of those results.
    slots : int
        How many tasks it may be processing before it gets no more root tasks.
    blocked : bool
        Gets no new tasks: it is leaving, is being drained for, or runs, an isolated
        task.
    draining : bool
        Being emptied so an isolated (suspicious) task can run on it alone.
    suspect : TaskRecord or None
        The isolated task it runs.
    closing : bool
        Removed from the scheduler.
    last_seen : float
        ``time.monotonic()`` of its last message.
    metrics : dict
        Its last heartbeat.
    """

    __slots__ = (
        "address",
        "blocked",
        "closing",
        "draining",
        "has_what",
        "host",
        "index",
        "job_id",
        "last_seen",
        "memory_limit",
        "metrics",
        "name",
        "nbytes",
        "nthreads",
        "pid",
        "processing",
        "slots",
        "suspect",
        "versions",
    )

    def __init__(
        self,
        address: str,
        *,
        name: Any = None,
        nthreads: int = 1,
        memory_limit: int | None = None,
        pid: int | None = None,
        host: str | None = None,
        job_id: str | None = None,
        versions: Mapping[str, Any] | None = None,
        index: int = 0,
        last_seen: float = 0.0,
    ) -> None:
        self.address = address
        self.name = address if name is None else name
        self.nthreads = max(int(nthreads), 1)
        self.memory_limit = memory_limit
        self.pid = pid
        self.host = host
        self.job_id = job_id
        self.versions = dict(versions or {})
        self.index = index
        self.processing: set[TaskRecord] = set()
        self.has_what: set[TaskRecord] = set()
        self.nbytes = 0
        self.slots = 1
        self.blocked = False
        self.draining = False
        self.suspect: TaskRecord | None = None
        self.closing = False
        self.last_seen = last_seen
        self.metrics: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"<WorkerRecord {self.address} nthreads={self.nthreads} "
            f"processing={len(self.processing)} memory={len(self.has_what)}>"
        )

    def info(self) -> dict[str, Any]:
        """Return the JSON-ready description ``scheduler-info`` reports."""
        return {
            "name": self.name,
            "nthreads": self.nthreads,
            "memory_limit": self.memory_limit,
            "pid": self.pid,
            "host": self.host,
            "job_id": self.job_id,
            "processing": len(self.processing),
            "in_memory": len(self.has_what),
            "nbytes": self.nbytes,
            "metrics": self.metrics,
        }


class ClientRecord:
    """A connected client and the keys it holds Futures for."""

    __slots__ = ("id", "wants")

    def __init__(self, client_id: str) -> None:
        self.id = client_id
        self.wants: set[TaskRecord] = set()

    def __repr__(self) -> str:
        return f"<ClientRecord {self.id} wants={len(self.wants)}>"


class _ErrorInfo:
    """A task failure as reported to clients; shared by the dependents it fails."""

    __slots__ = ("exc_type", "exception", "host", "key", "pid", "traceback", "worker")

    def __init__(
        self,
        key: Key,
        exception: Any,
        traceback: str = "",
        exc_type: str | None = None,
        worker: str | None = None,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.key = key
        self.exception = exception
        self.traceback = traceback
        self.exc_type = exc_type
        self.worker = worker
        self.host = host
        self.pid = pid


def _error_frames(exc: BaseException) -> list[Any]:
    """Serialize an error the scheduler itself raises on a task (rare path)."""
    from runtime.serialize import dumps

    return dumps(exc)


# ------------------------------------------------------------------------ the state


class SchedulerState:
    """The scheduler's tasks, workers and clients, and the transitions between states.

    No sockets and no clock: methods take parsed messages (plus ``now`` where time
    matters) and return the messages to send as :data:`Outgoing`. Every public method
    is one *stimulus*: it applies the message completely (cascading through
    dependents and dependencies) before it returns.

    Parameters
    ----------
    allowed_failures
        Worker deaths while a task is processing after which it errs with
        :class:`~runtime.errors.KilledWorker`.
    worker_saturation
        Root tasks a worker is sent at once, per thread (rounded up, at least 1);
        ``math.inf`` disables queuing.
    root_task_lookahead
        Seconds of measured root-task run time per thread sent ahead of need; 0
        disables.
    default_retries
        Retries of a retryable failure when the client gave none for the task.
    validate
        Call :meth:`validate` after every stimulus (slow; for tests).
    checkpoint_lookup
        ``lookup(directory, token) -> bool``: whether a valid checkpoint exists;
        default :func:`runtime.checkpoint.stored` (reads a file header).
    """

    def __init__(
        self,
        *,
        allowed_failures: int = 3,
        worker_saturation: float = 1.1,
        root_task_lookahead: float = 0.005,
        default_retries: int = 1,
        validate: bool = False,
        checkpoint_lookup: Callable[[str, str], bool] | None = None,
    ) -> None:
        if allowed_failures < 1:
            raise SchedulerError(
                f"allowed_failures must be at least 1, not {allowed_failures} "
                "(distributed.scheduler.allowed-failures)"
            )
        if not worker_saturation > 0:
            raise SchedulerError(
                f"worker_saturation must be positive, not {worker_saturation} "
                "(distributed.scheduler.worker-saturation)"
            )
        self.allowed_failures = int(allowed_failures)
        self.worker_saturation = float(worker_saturation)
        self.root_task_lookahead = float(root_task_lookahead)
        self.default_retries = int(default_retries)
        self.validating = validate
        self.checkpoint_lookup = checkpoint_lookup
        # Answers looked up ahead, off the event loop (see prime_checkpoints).
        self._primed: dict[tuple[str, str], bool] = {}
        # Set by the first graph with checkpoints: only then do placement decisions
        # look for inputs held by the checkpoint store alone.
        self._checkpointing = False
        # A task that was on this many dying workers runs alone from then on: the
        # task killing its workers is then the only one to reach allowed_failures.
        self._isolate_after = max(1, self.allowed_failures - 1)

        self.tasks: dict[Key, TaskRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.total_nthreads = 0
        self.unrunnable: dict[TaskRecord, None] = {}

        # The root-task queue: entries (priority, seq, task), stale ones skipped when
        # popped. Large batches (one update-graph) are sorted once into a run, popped
        # in O(1); single tasks go to the heap.
        self._queue: list[_QueueEntry] = []
        self._runs: list[collections.deque[_QueueEntry]] = []
        self._new_roots: list[_QueueEntry] = []
        self._seq = 0
        self._suspects: list[TaskRecord] = []
        self._draining: dict[WorkerRecord, None] = {}
        self._idle: dict[WorkerRecord, None] = {}  # workers with room for root tasks
        self._retry_unrunnable = False
        self._worker_index = 0
        self._generation = 0
        self._extra_per_thread = 0
        self._root_samples = 0
        self._root_duration = 0.0
        self._out: Outgoing = {}
        #: While paused (a job draining before its walltime) no task is sent to a
        #: worker: tasks that become ready wait among the unrunnable ones.
        self.paused = False
        #: Tasks computed (or loaded) since this state was created: a drain that saw
        #: none finish knows a restart would make no progress.
        self.finished_count = 0

    def __repr__(self) -> str:
        return (
            f"<SchedulerState tasks={len(self.tasks)} workers={len(self.workers)} "
            f"clients={len(self.clients)}>"
        )

    # ------------------------------------------------------------------ read-only

    def queued_count(self) -> int:
        """Return how many tasks are QUEUED (root queue, unrunnable or isolated)."""
        return sum(1 for ts in self.tasks.values() if ts.state is _QUEUED)

    def processing_count(self) -> int:
        """Return how many tasks are PROCESSING on some worker."""
        return sum(len(ws.processing) for ws in self.workers.values())

    def who_has(self, keys: Iterable[Key]) -> dict[Key, list[str]]:
        """Return the workers holding each key (an empty list when none does)."""
        tasks = self.tasks
        result: dict[Key, list[str]] = {}
        for key in keys:
            ts = tasks.get(key)
            result[key] = [ws.address for ws in ts.who_has] if ts and ts.who_has else []
        return result

    def workers_info(self) -> dict[str, dict[str, Any]]:
        """Return ``{address: description}`` for every worker (see WorkerRecord.info)."""
        return {address: ws.info() for address, ws in self.workers.items()}

    def tasks_info(self) -> dict[str, int]:
        """Return task counts by state (what adaptive scaling follows); O(tasks)."""
        counts = {state.name.lower(): 0 for state in TaskState}
        for ts in self.tasks.values():
            counts[ts.state.name.lower()] += 1
        return counts

    def resolve_workers(self, names: Iterable[Any]) -> list[str]:
        """Return the addresses of the workers given by address or name (unknown: skipped)."""
        found: dict[str, None] = {}
        for name in names:
            if name in self.workers:
                found[name] = None
                continue
            for ws in self.workers.values():
                if ws.name == name or str(ws.name) == str(name):
                    found[ws.address] = None
        return list(found)

    def stale_workers(self, now: float, ttl: float) -> list[str]:
        """Return the workers that sent nothing for more than ``ttl`` seconds before ``now``."""
        limit = now - ttl
        return [a for a, ws in self.workers.items() if ws.last_seen < limit]

    # ------------------------------------------------------------ stimuli: workers

    def add_worker(
        self,
        address: str,
        *,
        name: Any = None,
        nthreads: int = 1,
        memory_limit: int | None = None,
        pid: int | None = None,
        host: str | None = None,
        job_id: str | None = None,
        versions: Mapping[str, Any] | None = None,
        now: float = 0.0,
    ) -> Outgoing:
        """Register a worker (replacing one registered at the same address)."""
        if address in self.workers:
            # The worker lost its state (it reconnected): not a death its tasks caused.
            self._remove_worker(self.workers[address], safe=True)
        self._worker_index += 1
        ws = WorkerRecord(
            address,
            name=name,
            nthreads=nthreads,
            memory_limit=memory_limit,
            pid=pid,
            host=host,
            job_id=job_id,
            versions=versions,
            index=self._worker_index,
            last_seen=now,
        )
        ws.slots = self._slots_for(ws.nthreads)
        self.workers[address] = ws
        self.total_nthreads += ws.nthreads
        self._idle[ws] = None
        self._retry_unrunnable = True
        return self._finish()

    def remove_worker(self, address: str, *, safe: bool = False) -> Outgoing:
        """Forget a worker that died or left: reschedule its tasks, recompute lost results.

        Parameters
        ----------
        address
            The worker.
        safe
            The worker was closed on purpose (retired), so its death is not blamed on
            the tasks it was running: their ``suspicious`` counts stay as they are.
        """
        ws = self.workers.get(address)
        if ws is not None:
            self._remove_worker(ws, safe=safe)
        return self._finish()

    def task_finished(
        self,
        worker: str,
        key: Key,
        nbytes: int | None = 0,
        type: str | None = None,
        start: float | None = None,
        stop: float | None = None,
    ) -> Outgoing:
        """A worker computed ``key`` and holds its result."""
        ws = self.workers.get(worker)
        if ws is not None:
            self._task_finished(ws, key, nbytes, type, start, stop)
        return self._finish()

    def task_erred(
        self,
        worker: str,
        key: Key,
        exception: Any = None,
        traceback: str = "",
        exc_type: str | None = None,
        retryable: bool = False,
        **info: Any,
    ) -> Outgoing:
        """A task raised on a worker: retry it, or fail it and everything that needs it.

        Parameters
        ----------
        worker
            The worker reporting.
        key
            The task.
        exception
            The pickled exception (frames), forwarded to clients untouched.
        traceback
            The remote traceback, formatted.
        exc_type
            ``"module.Qualname"`` of the exception.
        retryable
            Whether the worker's ``distributed.retry-exceptions`` matches it; only
            then are the task's retries used.
        **info
            Other fields of the message (``start``, ``stop``, ``host``, ``pid``).
        """
        ws = self.workers.get(worker)
        if ws is not None:
            self._task_erred(ws, key, exception, traceback, exc_type, retryable, info)
        return self._finish()

    def missing_data(self, worker: str, key: Key, holder: str) -> Outgoing:
        """``worker`` could not get ``key`` from ``holder``, which was said to hold it."""
        ws = self.workers.get(worker)
        if ws is not None:
            self._missing_data(ws, key, holder)
        return self._finish()

    def release_worker_data(self, worker: str, keys: Iterable[Key]) -> Outgoing:
        """``worker`` dropped these results on its own: where they were the last copy, recompute."""
        ws = self.workers.get(worker)
        if ws is not None:
            self._release_worker_data(ws, keys)
        return self._finish()

    def heartbeat(
        self, worker: str, metrics: Mapping[str, Any] | None = None, now: float | None = None
    ) -> Outgoing:
        """Record that ``worker`` is alive (and its metrics)."""
        ws = self.workers.get(worker)
        if ws is not None:
            if now is not None:
                ws.last_seen = now
            if metrics is not None:
                ws.metrics = dict(metrics)
        return self._finish()

    def handle_worker_messages(
        self, worker: str, msgs: Iterable[Mapping[str, Any]], now: float | None = None
    ) -> Outgoing:
        """Apply a batch of messages from ``worker`` in order; one stimulus for all.

        Handles ``task-finished``, ``task-erred``, ``heartbeat``, ``missing-data`` and
        ``release-worker-data``; other ops are logged and ignored.
        """
        ws = self.workers.get(worker)
        if ws is None:
            return self._finish()
        if now is not None:
            ws.last_seen = now
        for msg in msgs:
            op = msg.get("op")
            if op == _TASK_FINISHED:
                self._task_finished(
                    ws,
                    msg["key"],
                    msg.get("nbytes"),
                    msg.get("type"),
                    msg.get("start"),
                    msg.get("stop"),
                )
            elif op == _TASK_ERRED:
                self._task_erred(
                    ws,
                    msg["key"],
                    msg.get("exception"),
                    msg.get("traceback") or "",
                    msg.get("exc_type"),
                    bool(msg.get("retryable")),
                    msg,
                )
            elif op == _HEARTBEAT:
                metrics = msg.get("metrics")
                if metrics is not None:
                    ws.metrics = metrics
            elif op == _MISSING_DATA:
                self._missing_data(ws, msg["key"], msg.get("worker"), bool(msg.get("checkpoint")))
            elif op == _RELEASE_WORKER_DATA:
                self._release_worker_data(ws, msg.get("keys") or ())
            else:
                logger.warning("ignoring unknown op %r from worker %s", op, worker)
            if ws.closing:  # a message made the state drop this worker
                break
        return self._finish()

    # ------------------------------------------------------------ stimuli: clients

    def add_client(self, client: str) -> Outgoing:
        """Register a client (idempotent)."""
        self._client(client)
        return self._finish()

    def remove_client(self, client: str) -> Outgoing:
        """Forget a client and release every key it held."""
        self._remove_client(client)
        return self._finish()

    # ------------------------------------------------------------ stimuli: draining

    def pause(self, notice: Mapping[str, Any] | None = None) -> Outgoing:
        """Send no more tasks to workers; the ones running carry on (idempotent).

        ``notice``, if given, is sent to every client (e.g. the job is draining before
        its walltime and will restart).
        """
        self.paused = True
        if notice is not None:
            msg = dict(notice)
            for client in self.clients:
                self._send(client, msg)
        return self._finish()

    def resume(self) -> Outgoing:
        """Undo :meth:`pause`: place every task that became ready meanwhile."""
        if self.paused:
            self.paused = False
            self._retry_unrunnable = True
        return self._finish()

    def update_graph(
        self,
        client: str,
        tasks: Mapping[Key, Any],
        dependencies: Mapping[Key, Iterable[Key]] | None = None,
        keys: Iterable[Key] = (),
        priority: Mapping[Key, tuple] | None = None,
        retries: Mapping[Key, int] | None = None,
        workers: Mapping[Key, Iterable[Any]] | None = None,
        checkpoint: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    ) -> Outgoing:
        """Add tasks and mark ``keys`` as wanted by ``client``; start what is needed.

        Parameters
        ----------
        client
            The client's id.
        tasks
            ``{key: payload frames}``. Keys already known keep their record.
        dependencies
            ``{key: [input keys]}``; inputs may be keys defined earlier.
        keys
            The keys the client holds Futures for.
        priority
            ``{key: tuple}``, lower first; missing ones run in submission order.
        retries
            ``{key: n}``; missing ones get ``default_retries``.
        workers
            ``{key: [address, name or host]}``: where a task may run.
        checkpoint
            ``{"directory": str, "tokens": {key: identity token}}``: look these tasks'
            checkpoints up before computing them, and have workers write them.
        """
        self._update_graph(
            self._client(client), tasks, dependencies, keys, priority, retries, workers, checkpoint
        )
        return self._finish()

    def release_keys(self, client: str, keys: Iterable[Key]) -> Outgoing:
        """``client`` holds no Future for ``keys`` any more; free what nobody needs."""
        cs = self.clients.get(client)
        if cs is not None:
            self._release_keys(cs, keys)
        return self._finish()

    def cancel_keys(self, client: str, keys: Iterable[Key]) -> Outgoing:
        """Cancel ``keys`` and what depends on them, for ``client``.

        The client is told ``task-cancelled`` for each key it held among them; tasks
        no other client or dependent needs are released (and stopped on workers).
        """
        cs = self.clients.get(client)
        if cs is not None:
            self._cancel_keys(cs, keys)
        return self._finish()

    def update_data(
        self,
        client: str,
        who_has: Mapping[Key, Iterable[str]],
        nbytes: Mapping[Key, int] | None = None,
    ) -> Outgoing:
        """A client scattered data onto workers; it holds Futures for those keys."""
        self._update_data(self._client(client), who_has, nbytes or {})
        return self._finish()

    def handle_client_messages(self, client: str, msgs: Iterable[Mapping[str, Any]]) -> Outgoing:
        """Apply a batch of messages from ``client`` in order; one stimulus for all.

        Handles ``update-graph``, ``release-keys``, ``cancel-keys``, ``update-data``,
        ``close-client``, and the requests ``who-has`` and ``scheduler-info``, whose
        replies go to the client in order with everything else (the request's ``id``
        field, if any, is copied to the reply). ``shutdown`` and ``retire-workers``
        need I/O: the server handles them.
        """
        cs = self._client(client)
        for msg in msgs:
            op = msg.get("op")
            if op == _UPDATE_GRAPH:
                self._update_graph(
                    cs,
                    msg.get("tasks") or {},
                    msg.get("dependencies"),
                    msg.get("keys") or (),
                    msg.get("priority"),
                    msg.get("retries"),
                    msg.get("workers"),
                    msg.get("checkpoint"),
                )
            elif op == _RELEASE_KEYS:
                self._release_keys(cs, msg.get("keys") or ())
            elif op == _CANCEL_KEYS:
                self._cancel_keys(cs, msg.get("keys") or ())
            elif op == _UPDATE_DATA:
                self._update_data(cs, msg.get("who_has") or {}, msg.get("nbytes") or {})
            elif op == _WHO_HAS:
                self._reply(
                    cs.id, msg, {"op": _WHO_HAS, "who_has": self.who_has(msg.get("keys") or ())}
                )
            elif op == _SCHEDULER_INFO:
                self._reply(
                    cs.id,
                    msg,
                    {
                        "op": _SCHEDULER_INFO,
                        "workers": self.workers_info(),
                        "tasks": self.tasks_info(),
                    },
                )
            elif op == _CLOSE_CLIENT:
                self._remove_client(cs.id)
                break
            else:
                logger.warning("ignoring unknown op %r from client %s", op, client)
        return self._finish()

    # ------------------------------------------------------------------- invariants

    def validate(self) -> None:
        """Check every invariant of the state; raise AssertionError naming the first broken one.

        O(tasks + workers): for tests and debugging, not for production loops.
        """
        tasks = self.tasks
        in_heap = {entry[2] for entry in self._queue}
        in_heap.update(entry[2] for entry in self._new_roots)
        for run in self._runs:
            in_heap.update(entry[2] for entry in run)

        def fail(what: str) -> NoReturn:
            raise AssertionError(what)

        for key, ts in tasks.items():
            st = ts.state
            if ts.key != key:
                fail(f"{ts!r} is stored under key {key!r}")
            if st is _FORGOTTEN:
                fail(f"{ts!r} is forgotten but still in tasks")
            for dep in ts.dependencies:
                if tasks.get(dep.key) is not dep:
                    fail(f"{ts!r} depends on {dep!r}, which is not in tasks")
                if not dep.dependents or ts not in dep.dependents:
                    fail(f"{ts!r} is missing from the dependents of its input {dep!r}")
            for dts in ts.dependents or ():
                if ts not in dts.dependencies:
                    fail(f"{dts!r} is a dependent of {ts!r} without depending on it")
                if tasks.get(dts.key) is not dts:
                    fail(f"dependent {dts!r} of {ts!r} is not in tasks")
            # waiters: exactly the dependents that still need this result
            # (A stored dependent being loaded does not need its inputs.)
            expected = {
                d
                for d in ts.dependents or ()
                if d.state in (_WAITING, _QUEUED, _PROCESSING) and not d.stored
            }
            if (ts.waiters or set()) != expected:
                fail(f"waiters of {ts!r} are {ts.waiters}, expected {expected}")
            for cs in ts.who_wants or ():
                if self.clients.get(cs.id) is not cs or ts not in cs.wants:
                    fail(f"{ts!r} wanted by {cs!r}, which does not list it")
            needed = bool(ts.who_wants) or bool(ts.waiters)
            if st is not _PROCESSING and ts.processing_on is not None:
                fail(f"{ts!r} has processing_on {ts.processing_on!r}")
            if st is not _MEMORY and ts.who_has:
                fail(f"{ts!r} has who_has {ts.who_has!r}")
            if st is not _WAITING and ts.waiting_on:
                fail(f"{ts!r} has waiting_on {ts.waiting_on!r}")
            if st is not _QUEUED and ts.queued_in != _NOT_QUEUED:
                fail(f"{ts!r} is in queue {ts.queued_in}")
            if st is not _ERRED and ts.error is not None:
                fail(f"{ts!r} keeps an error")
            if st in (_WAITING, _QUEUED, _PROCESSING, _MEMORY) and not needed:
                fail(f"{ts!r} is neither wanted by a client nor needed by a dependent")
            if st is _RELEASED and needed:
                fail(f"{ts!r} is needed (wanted {ts.who_wants}, waiters {ts.waiters})")
            if st in (_RELEASED, _ERRED) and not ts.who_wants and not ts.dependents:
                fail(f"{ts!r} should have been forgotten")
            if st is _WAITING:
                missing = {d for d in ts.dependencies if d.state is not _MEMORY}
                if not ts.waiting_on or ts.waiting_on != missing:
                    fail(f"{ts!r} waits on {ts.waiting_on}, but inputs not in memory are {missing}")
                for d in missing:
                    if d.state not in (_WAITING, _QUEUED, _PROCESSING):
                        fail(f"{ts!r} waits on {d!r}, which is not being computed")
            elif (st is _QUEUED or st is _PROCESSING) and not ts.stored:
                for d in ts.dependencies:
                    if d.state is not _MEMORY:
                        fail(f"{ts!r} is {st.value} but its input {d!r} is not in memory")
            if st is _QUEUED:
                q = ts.queued_in
                if q == _IN_HEAP:
                    if ts not in in_heap:
                        fail(f"{ts!r} is queued but not in the root queue")
                elif q == _IN_UNRUNNABLE:
                    if ts not in self.unrunnable:
                        fail(f"{ts!r} is not in unrunnable")
                elif q == _IN_SUSPECTS:
                    if ts not in self._suspects:
                        fail(f"{ts!r} is not among the isolated tasks")
                else:
                    fail(f"{ts!r} is queued nowhere")
            elif st is _PROCESSING:
                ws = ts.processing_on
                if ws is None or self.workers.get(ws.address) is not ws or ts not in ws.processing:
                    fail(f"{ts!r} is processing on {ws!r}, which does not list it")
            elif st is _MEMORY:
                if not ts.who_has and not ts.stored:
                    fail(f"{ts!r} is in memory nowhere")
                for holder in ts.who_has or ():
                    if self.workers.get(holder.address) is not holder or ts not in holder.has_what:
                        fail(f"{ts!r} held by {holder!r}, which does not list it")
            elif st is _ERRED:
                if ts.error is None:
                    fail(f"{ts!r} erred without an error")
                if not ts.who_wants:
                    fail(f"{ts!r} erred and nobody wants it: it should be released")
        total = 0
        for address, ws in self.workers.items():
            total += ws.nthreads
            if ws.address != address or ws.closing:
                fail(f"{ws!r} stored under {address!r} (closing={ws.closing})")
            for ts in ws.processing:
                if ts.state is not _PROCESSING or ts.processing_on is not ws:
                    fail(f"{ws!r} lists {ts!r} as processing")
            nbytes = 0
            for ts in ws.has_what:
                if ts.state is not _MEMORY or not ts.who_has or ws not in ts.who_has:
                    fail(f"{ws!r} lists {ts!r} in memory")
                nbytes += ts.nbytes
            if nbytes != ws.nbytes:
                fail(f"{ws!r} counts {ws.nbytes} bytes, its results add up to {nbytes}")
            blocked = ws.draining or ws.suspect is not None
            if ws.blocked != blocked:
                fail(f"{ws!r} blocked={ws.blocked}, expected {blocked}")
            if ws.suspect is not None and ws.suspect not in ws.processing:
                fail(f"{ws!r} isolates {ws.suspect!r}, which is not processing there")
            has_room = not ws.blocked and len(ws.processing) < ws.slots
            if has_room != (ws in self._idle):
                fail(f"{ws!r} idle bookkeeping: has room {has_room}, listed {ws in self._idle}")
            if ws.draining != (ws in self._draining):
                fail(f"{ws!r} draining bookkeeping is inconsistent")
        if total != self.total_nthreads:
            fail(f"total_nthreads is {self.total_nthreads}, workers have {total}")
        for ws in self._idle:
            if self.workers.get(ws.address) is not ws:
                fail(f"idle {ws!r} is not a current worker")
        for cid, cs in self.clients.items():
            if cs.id != cid:
                fail(f"{cs!r} stored under {cid!r}")
            for ts in cs.wants:
                if tasks.get(ts.key) is not ts or not ts.who_wants or cs not in ts.who_wants:
                    fail(f"{cs!r} wants {ts!r}, which does not list it")
        if (self._queue or self._runs) and self._idle and not self.paused:
            live = [ts for ts in in_heap if ts.queued_in == _IN_HEAP]
            if live:
                fail(f"{len(live)} root tasks queued while {list(self._idle)} have room")

    # ------------------------------------------------------------------ internals

    def _client(self, client: str) -> ClientRecord:
        cs = self.clients.get(client)
        if cs is None:
            cs = self.clients[client] = ClientRecord(client)
        return cs

    def _remove_client(self, client: str) -> None:
        cs = self.clients.pop(client, None)
        if cs is None:
            return
        stack = []
        for ts in cs.wants:
            if ts.who_wants is not None:
                ts.who_wants.discard(cs)
            stack.append(ts)
        cs.wants = set()
        self._release_cascade(stack)

    def _send(self, recipient: str, msg: dict[str, Any]) -> None:
        out = self._out.get(recipient)
        if out is None:
            self._out[recipient] = [msg]
        else:
            out.append(msg)

    def _send_free(self, address: str, key: Key) -> None:
        # Consecutive frees to one worker share a message; order with respect to
        # compute-task messages is kept (a free must never overtake a later compute).
        out = self._out.get(address)
        if out is None:
            self._out[address] = [{"op": _FREE_KEYS, "keys": [key]}]
            return
        last = out[-1]
        if last["op"] is _FREE_KEYS:
            last["keys"].append(key)
        else:
            out.append({"op": _FREE_KEYS, "keys": [key]})

    def _reply(self, recipient: str, request: Mapping[str, Any], reply: dict[str, Any]) -> None:
        if "id" in request:
            reply["id"] = request["id"]
        self._send(recipient, reply)

    def _finish_partial(self) -> None:
        """Settle queues without handing the outgoing messages back yet."""
        if self.paused:
            return
        if self._suspects or self._draining:
            self._place_suspects()
        if self._retry_unrunnable:
            self._retry_unrunnable = False
            if self.unrunnable:
                self._place_unrunnable()
        new = self._new_roots
        if new:
            if len(new) > 64:
                new.sort()  # linear when already in priority order, as clients send them
                self._runs.append(collections.deque(new))
            else:
                queue = self._queue
                push = heapq.heappush
                for entry in new:
                    push(queue, entry)
            self._new_roots = []
        if (self._queue or self._runs) and self._idle:
            self._fill()

    def _finish(self) -> Outgoing:
        """End of a stimulus: settle the queues, hand back the outgoing messages."""
        self._finish_partial()
        out = self._out
        self._out = {}
        if self.validating:
            self.validate()
        return out

    def _slots_for(self, nthreads: int) -> int:
        saturation = self.worker_saturation
        if saturation == math.inf:
            return sys.maxsize
        return max(math.ceil(nthreads * saturation), 1) + nthreads * self._extra_per_thread

    def _record_root_duration(self, duration: float) -> None:
        n = self._root_samples = self._root_samples + 1
        avg = self._root_duration
        avg += (duration - avg) / (n if n < _DURATION_WINDOW else _DURATION_WINDOW)
        self._root_duration = avg
        if n > _DURATION_WINDOW and n % _DURATION_WINDOW:
            return
        extra = 0
        if self.root_task_lookahead > 0:
            extra = min(_MAX_LOOKAHEAD_PER_THREAD, int(self.root_task_lookahead / max(avg, 1e-7)))
        if extra != self._extra_per_thread:
            self._extra_per_thread = extra
            idle = self._idle
            for ws in self.workers.values():
                ws.slots = self._slots_for(ws.nthreads)
                if not ws.blocked and len(ws.processing) < ws.slots:
                    idle[ws] = None
                else:
                    idle.pop(ws, None)

    # -- placing ready tasks

    def _is_rootish(self, ts: TaskRecord) -> bool:
        deps = ts.dependencies
        if not deps:
            return True
        if self._checkpointing and all(not d.who_has for d in deps):
            return True  # every input is loaded from a checkpoint: it starts a branch
        if len(deps) > _ROOTISH_MAX_DEPENDENCIES:
            return False
        fanout = max(2 * self.total_nthreads, 4)
        for dep in deps:
            dependents = dep.dependents
            if dependents is None or len(dependents) <= fanout:
                return False
        return True

    def _ready(self, ts: TaskRecord) -> None:
        """Every input of ``ts`` is in memory: queue it or send it to a worker."""
        if self.paused:
            ts.state = _QUEUED
            ts.queued_in = _IN_UNRUNNABLE
            self.unrunnable[ts] = None
            return
        if ts.suspicious >= self._isolate_after and ts.restrictions is None:
            ts.state = _QUEUED
            ts.queued_in = _IN_SUSPECTS
            self._suspects.append(ts)
            return
        if ts.restrictions is not None:
            ws = self._decide_restricted(ts)
        elif not ts.dependencies or ts.stored or self._is_rootish(ts):
            ts.rootish = True
            ts.state = _QUEUED
            ts.queued_in = _IN_HEAP
            self._seq += 1
            self._new_roots.append((ts.priority, self._seq, ts))
            return
        else:
            ws = self._decide_worker(ts)
        if ws is None:
            ts.state = _QUEUED
            ts.queued_in = _IN_UNRUNNABLE
            self.unrunnable[ts] = None
        else:
            self._assign(ts, ws)

    @staticmethod
    def _busier(a: WorkerRecord, b: WorkerRecord) -> bool:
        """Whether ``a`` is more occupied than ``b`` (ties: the later-registered one)."""
        pa = len(a.processing) * b.nthreads
        pb = len(b.processing) * a.nthreads
        return pa > pb or (pa == pb and a.index > b.index)

    def _least_busy(
        self, allowed: Callable[[WorkerRecord], bool] | None = None
    ) -> WorkerRecord | None:
        best = None
        for ws in self.workers.values():
            if ws.blocked or (allowed is not None and not allowed(ws)):
                continue
            if best is None or self._busier(best, ws):
                best = ws
        return best

    def _most_bytes(
        self, ts: TaskRecord, allowed: Callable[[WorkerRecord], bool] | None = None
    ) -> WorkerRecord | None:
        """The worker holding most input bytes of ``ts`` (ties: least occupied)."""
        deps = ts.dependencies
        best = None
        if len(deps) == 1:
            holders = deps[0].who_has or ()
            for ws in holders:
                if ws.blocked or (allowed is not None and not allowed(ws)):
                    continue
                if best is None or self._busier(best, ws):
                    best = ws
            return best
        scores: dict[WorkerRecord, int] = {}
        for dep in deps:
            nb = dep.nbytes
            for ws in dep.who_has or ():
                scores[ws] = scores.get(ws, 0) + nb
        best_bytes = -1
        for ws, nb in scores.items():
            if ws.blocked or (allowed is not None and not allowed(ws)):
                continue
            if nb > best_bytes or (
                nb == best_bytes and best is not None and self._busier(best, ws)
            ):
                best, best_bytes = ws, nb
        return best

    def _decide_worker(self, ts: TaskRecord) -> WorkerRecord | None:
        deps = ts.dependencies
        if len(deps) == 1:
            holders = deps[0].who_has
            if holders is not None and len(holders) == 1:
                for ws in holders:
                    if not ws.blocked:
                        return ws
        best = self._most_bytes(ts) if deps else None
        if best is None:
            best = self._least_busy()
        return best

    def _decide_restricted(self, ts: TaskRecord) -> WorkerRecord | None:
        allowed_names = ts.restrictions or frozenset()

        def allowed(ws: WorkerRecord) -> bool:
            return (
                ws.address in allowed_names
                or ws.name in allowed_names
                or str(ws.name) in allowed_names
                or ws.host in allowed_names
            )

        best = self._most_bytes(ts, allowed) if ts.dependencies else None
        if best is None:
            best = self._least_busy(allowed)
        return best

    def _assign(self, ts: TaskRecord, ws: WorkerRecord) -> None:
        ts.state = _PROCESSING
        ts.processing_on = ws
        processing = ws.processing
        processing.add(ts)
        if len(processing) >= ws.slots:
            self._idle.pop(ws, None)
        msg = self._compute_message(ts)
        out = self._out.get(ws.address)
        if out is None:
            self._out[ws.address] = [msg]
        else:
            out.append(msg)

    def _compute_message(self, ts: TaskRecord) -> dict[str, Any]:
        checkpoint = ts.checkpoint
        if checkpoint is not None and ts.stored:
            # Load the stored result instead of computing it: no inputs, no payload.
            return {
                "op": _COMPUTE_TASK,
                "key": ts.key,
                "task": None,
                "who_has": {},
                "priority": ts.priority,
                "checkpoint": checkpoint,
                "load": True,
            }
        deps = ts.dependencies
        who_has = {d.key: [w.address for w in d.who_has or ()] for d in deps} if deps else {}
        msg = {
            "op": _COMPUTE_TASK,
            "key": ts.key,
            "task": ts.payload,
            "who_has": who_has,
            "priority": ts.priority,
        }
        if checkpoint is not None:
            msg["checkpoint"] = checkpoint  # the worker writes the result there
        if deps and self._checkpointing:
            stored = {d.key: d.checkpoint for d in deps if d.stored}
            if stored:
                msg["stored"] = stored  # inputs a worker may load itself
        return msg

    def _unassign(self, ts: TaskRecord) -> WorkerRecord:
        """Take ``ts`` off the worker it was processing on (state is left to the caller)."""
        ws = ts.processing_on
        assert ws is not None
        ts.processing_on = None
        processing = ws.processing
        processing.discard(ts)
        if ws.suspect is ts:
            ws.suspect = None
            ws.blocked = ws.draining or ws.closing
            self._retry_unrunnable = True
        if not ws.blocked and len(processing) < ws.slots:
            self._idle[ws] = None
        return ws

    def _dequeue(self, ts: TaskRecord) -> None:
        where = ts.queued_in
        ts.queued_in = _NOT_QUEUED
        if where == _IN_UNRUNNABLE:
            self.unrunnable.pop(ts, None)
        elif where == _IN_SUSPECTS:
            with contextlib.suppress(ValueError):
                self._suspects.remove(ts)
        # _IN_HEAP: the heap entry goes stale and is skipped when popped.

    def _fill(self) -> None:
        """Send queued root tasks to workers with free slots, highest priority first."""
        heap = self._queue
        runs = self._runs
        idle = self._idle
        pop = heapq.heappop
        assign = self._assign
        while idle:
            if runs:
                run = runs[0]
                if len(runs) > 1:
                    for other in runs:
                        if other[0] < run[0]:
                            run = other
                if heap and heap[0] < run[0]:
                    ts = pop(heap)[2]
                else:
                    ts = run.popleft()[2]
                    if not run:
                        runs.remove(run)
            elif heap:
                ts = pop(heap)[2]
            else:
                break
            if ts.queued_in != _IN_HEAP:
                continue
            ts.queued_in = _NOT_QUEUED
            if len(idle) <= _LEAST_OCCUPIED_SCAN:
                # The emptiest worker first, so a quick task does not queue behind a
                # slow one on a worker that merely has a look-ahead slot free.
                target = min(idle, key=_occupancy)
            else:  # many idle workers: any of them will do, and scanning costs O(workers)
                target = next(iter(idle))
            assign(ts, target)

    def _place_unrunnable(self) -> None:
        pending = sorted(self.unrunnable, key=lambda t: t.priority)
        self.unrunnable.clear()
        for ts in pending:
            ts.queued_in = _NOT_QUEUED
            self._ready(ts)

    def _place_suspects(self) -> None:
        """Run isolated tasks on empty workers; drain workers for those still waiting."""
        remaining = []
        for ts in self._suspects:
            target = None
            for ws in self.workers.values():
                if ws.suspect is None and not ws.processing:
                    target = ws
                    break
            if target is None:
                remaining.append(ts)
                continue
            ts.queued_in = _NOT_QUEUED
            if target.draining:
                target.draining = False
                del self._draining[target]
            target.blocked = True
            self._idle.pop(target, None)
            self._assign(ts, target)
            target.suspect = ts
        self._suspects = remaining
        need = len(remaining) - len(self._draining)
        while need > 0:
            candidates = [
                ws for ws in self.workers.values() if ws.suspect is None and not ws.draining
            ]
            if not candidates:
                break
            ws = min(candidates, key=lambda w: (len(w.processing), w.index))
            ws.draining = ws.blocked = True
            self._draining[ws] = None
            self._idle.pop(ws, None)
            need -= 1
        while len(self._draining) > len(remaining):
            ws = next(iter(self._draining))
            del self._draining[ws]
            ws.draining = False
            ws.blocked = ws.suspect is not None
            if not ws.blocked and len(ws.processing) < ws.slots:
                self._idle[ws] = None
            self._retry_unrunnable = True

    # -- computing what is needed

    def _compute(self, roots: Iterable[TaskRecord]) -> None:
        """Start every RELEASED task in ``roots``, and the released inputs they need."""
        stack = list(roots)
        while stack:
            ts = stack.pop()
            if ts.state is not _RELEASED:
                continue
            if not ts.who_wants and not ts.waiters:
                continue  # no longer needed (a stored task no longer waits on it)
            if ts.payload is None:
                self._err(ts, self._lost_error(ts))
                continue
            if ts.checkpoint is not None and ts.stored is not False and self._lookup(ts):
                # Stored: its inputs are not needed. A client gathers from a worker, so
                # a worker loads it; dependents load it themselves where they run.
                self._stop_waiting(ts)
                if ts.who_wants:
                    self._ready(ts)
                else:
                    self._from_store(ts)
                continue
            deps = ts.dependencies
            if deps:
                blame = None
                for dep in deps:
                    if dep.state is _ERRED:
                        blame = dep
                        break
                if blame is not None:
                    assert blame.error is not None
                    self._err(ts, blame.error)
                    continue
                waiting = None
                for dep in deps:
                    w = dep.waiters
                    if w is None:
                        dep.waiters = {ts}
                    else:
                        w.add(ts)
                    st = dep.state
                    if st is not _MEMORY:
                        if waiting is None:
                            waiting = {dep}
                        else:
                            waiting.add(dep)
                        if st is _RELEASED:
                            stack.append(dep)
                if waiting is not None:
                    ts.waiting_on = waiting
                    ts.state = _WAITING
                    continue
            self._ready(ts)

    def _lost_error(self, ts: TaskRecord) -> _ErrorInfo:
        if not ts.scattered:
            message = (
                f"the scheduler has no task and no data for key {ts.key!r}: it was released "
                "or never submitted; submit it again (or keep a Future for it)"
            )
        else:
            message = (
                f"the result of {ts.key!r} was lost with the workers holding it and cannot "
                "be recomputed: it was scattered, not computed; scatter it again"
            )
        exc = SchedulerError(message)
        return _ErrorInfo(ts.key, _error_frames(exc), "", "runtime.errors.SchedulerError")

    # -- worker reports

    def _task_finished(
        self,
        ws: WorkerRecord,
        key: Key,
        nbytes: int | None,
        typ: str | None,
        start: float | None,
        stop: float | None,
    ) -> None:
        ts = self.tasks.get(key)
        if ts is None or ts.processing_on is not ws:
            self._stale_result(ws, key, ts, nbytes, typ)
            return
        # processing -> memory
        self._unassign(ts)
        self.finished_count += 1
        nbytes = nbytes or 0
        ts.state = _MEMORY
        ts.nbytes = nbytes
        ts.type = typ
        ts.who_has = {ws}
        ws.has_what.add(ts)
        ws.nbytes += nbytes
        if ts.rootish and start is not None and stop is not None:
            self._record_root_duration(stop - start)

        waiters = ts.waiters
        if waiters:
            for dts in waiters:
                wo = dts.waiting_on
                if wo is not None and dts.state is _WAITING:
                    wo.discard(ts)
                    if not wo:
                        dts.waiting_on = None
                        self._ready(dts)
        release = None
        for dep in ts.dependencies:
            w = dep.waiters
            if w is not None:
                w.discard(ts)
                if not w and not dep.who_wants:
                    if release is None:
                        release = [dep]
                    else:
                        release.append(dep)
        wants = ts.who_wants
        if wants:
            msg = {
                "op": _KEY_IN_MEMORY,
                "key": key,
                "nbytes": nbytes,
                "type": typ,
                "workers": [ws.address],
            }
            for cs in wants:
                self._send(cs.id, msg)
        elif not waiters:
            if release is None:
                release = [ts]
            else:
                release.append(ts)
        if release is not None:
            self._release_cascade(release)

    def _stale_result(
        self, ws: WorkerRecord, key: Key, ts: TaskRecord | None, nbytes: int | None, typ: str | None
    ) -> None:
        """A result the scheduler did not ask ``ws`` for (any more)."""
        if ts is not None and ts.state is _MEMORY and ts.who_has is not None:
            if ws not in ts.who_has:  # a second copy: keep it as a replica
                ts.who_has.add(ws)
                ws.has_what.add(ts)
                ws.nbytes += ts.nbytes
            return
        self._send_free(ws.address, key)

    def _task_erred(
        self,
        ws: WorkerRecord,
        key: Key,
        exception: Any,
        traceback: str,
        exc_type: str | None,
        retryable: bool,
        info: Mapping[str, Any],
    ) -> None:
        ts = self.tasks.get(key)
        if ts is None or ts.processing_on is not ws:
            return  # stale: the worker has already forgotten the task
        self._unassign(ts)
        ts.state = _RELEASED
        if ts.stored:
            # Loading its checkpoint failed (the worker logged why): compute it instead.
            ts.stored = False
            self._compute((ts,))
            return
        if retryable and ts.retries > 0:
            ts.retries -= 1
            self._compute((ts,))
            return
        error = _ErrorInfo(
            key,
            exception,
            traceback,
            exc_type,
            info.get("worker") or ws.address,
            info.get("host") or ws.host,
            info.get("pid") or ws.pid,
        )
        self._err(ts, error)

    def _missing_data(
        self, reporter: WorkerRecord, key: Key, holder: str | None, checkpoint: bool = False
    ) -> None:
        ts = self.tasks.get(key)
        if ts is None or ts.state is not _MEMORY:
            return
        if checkpoint:
            # The reporter could not load the checkpoint: stop relying on it.
            ts.stored = False
        if ts.who_has is None:
            if not ts.stored:
                self._lose((ts,))
            return
        hw = self.workers.get(holder) if holder is not None else None
        if hw is not None and hw in ts.who_has:
            ts.who_has.discard(hw)
            hw.has_what.discard(ts)
            hw.nbytes -= ts.nbytes
            # It said it holds it, a peer says it does not: make sure it does not.
            self._send_free(hw.address, key)
        if not ts.who_has:
            self._lose((ts,))
            return
        # Still held elsewhere: tell the reporter again where, for its tasks needing it.
        for dts in ts.waiters or ():
            if dts.processing_on is reporter:
                self._send(reporter.address, self._compute_message(dts))

    def _release_worker_data(self, ws: WorkerRecord, keys: Iterable[Key]) -> None:
        lost = []
        tasks = self.tasks
        for key in keys:
            ts = tasks.get(key)
            if ts is None or ts.who_has is None or ws not in ts.who_has:
                continue
            ts.who_has.discard(ws)
            ws.has_what.discard(ts)
            ws.nbytes -= ts.nbytes
            if not ts.who_has:
                lost.append(ts)
        if lost:
            self._lose(lost)

    def _remove_worker(self, ws: WorkerRecord, safe: bool = False) -> None:
        address = ws.address
        del self.workers[address]
        self.total_nthreads -= ws.nthreads
        self._idle.pop(ws, None)
        self._draining.pop(ws, None)
        ws.closing = ws.blocked = True
        ws.draining = False
        ws.suspect = None

        # 1. Tasks that were processing there: each was on a dying worker once more.
        killed = list(ws.processing)
        ws.processing = set()
        for ts in killed:
            ts.processing_on = None
            ts.state = _RELEASED
            if safe:
                continue
            ts.suspicious += 1
            if ts.lost_on is None:
                ts.lost_on = [address]
            else:
                ts.lost_on.append(address)
        # 2. Results only it held are lost; tasks about to use them wait again.
        lost = []
        for ts in ws.has_what:
            holders = ts.who_has
            if holders is not None:
                holders.discard(ws)
                if not holders:
                    lost.append(ts)
        ws.has_what = set()
        ws.nbytes = 0
        recompute = self._lose(lost, compute=False)
        # 3. A task that has now been on allowed_failures dying workers fails.
        for ts in killed:
            if ts.state is not _RELEASED:
                continue
            if not safe and ts.suspicious >= self.allowed_failures:
                self._err(ts, self._killed_error(ts, ws))
            else:
                recompute.append(ts)
        self._compute(recompute)
        self._retry_unrunnable = True

    def _killed_error(self, ts: TaskRecord, ws: WorkerRecord) -> _ErrorInfo:
        workers = list(ts.lost_on or ())
        exc = KilledWorker(
            f"task {ts.key!r} was running on {len(workers)} workers that died: "
            f"{', '.join(workers)}. It probably kills its worker process (os._exit, a crash "
            "in native code, running out of memory); fix the task, or raise "
            f"distributed.scheduler.allowed-failures (now {self.allowed_failures}) if the "
            "workers die for other reasons.",
            ts.key,
            workers,
        )
        return _ErrorInfo(
            ts.key,
            _error_frames(exc),
            "",
            "runtime.errors.KilledWorker",
            ws.address,
            ws.host,
            ws.pid,
        )

    def _lose(
        self, lost: Iterable[TaskRecord], compute: bool = True, notify: bool = True
    ) -> list[TaskRecord]:
        """Results in ``lost`` have no copy left: back to RELEASED; recompute where needed.

        With ``notify=False`` clients are not told (``lost-data``): for a result that
        only moves from the checkpoint store to a worker.
        """
        recompute = []
        for ts in lost:
            ts.state = _RELEASED
            ts.who_has = None
            wants = ts.who_wants
            if wants and notify:
                for cs in wants:
                    self._send(cs.id, {"op": _LOST_DATA, "key": ts.key})
            waiters = ts.waiters
            if waiters:
                for dts in waiters:
                    st = dts.state
                    if st is _WAITING:
                        assert dts.waiting_on is not None
                        dts.waiting_on.add(ts)
                    elif st is _QUEUED:
                        self._dequeue(dts)
                        dts.state = _WAITING
                        dts.waiting_on = {ts}
                    elif st is _PROCESSING:
                        self._send_free(self._unassign(dts).address, dts.key)
                        dts.state = _WAITING
                        dts.waiting_on = {ts}
            if wants or waiters:
                recompute.append(ts)
            else:
                self._release_cascade([ts])
        if compute:
            self._compute(recompute)
        return recompute

    # -- failures

    def _err(self, origin: TaskRecord, error: _ErrorInfo) -> None:
        """Fail ``origin`` and every task waiting for it, transitively."""
        stack = [origin]
        release = []
        while stack:
            ts = stack.pop()
            st = ts.state
            if st is _QUEUED:
                self._dequeue(ts)
            elif st is _PROCESSING:
                self._send_free(self._unassign(ts).address, ts.key)
            elif st is not _WAITING and st is not _RELEASED:
                continue
            ts.state = _ERRED
            ts.error = error
            ts.waiting_on = None
            for dep in ts.dependencies:
                w = dep.waiters
                if w is not None:
                    w.discard(ts)
                    if not w and not dep.who_wants:
                        release.append(dep)
            wants = ts.who_wants
            if wants:
                msg = self._erred_message(ts)
                for cs in wants:
                    self._send(cs.id, msg)
            else:
                release.append(ts)
            if ts.waiters:
                stack.extend(ts.waiters)
        self._release_cascade(release)

    @staticmethod
    def _erred_message(ts: TaskRecord) -> dict[str, Any]:
        error = ts.error
        assert error is not None
        return {
            "op": _TASK_ERRED,
            "key": ts.key,
            "exception": error.exception,
            "traceback": error.traceback,
            "exc_type": error.exc_type,
            "worker": error.worker,
            "host": error.host,
            "pid": error.pid,
            "origin": error.key,
        }

    # -- releasing and forgetting

    def _release_cascade(self, stack: list[TaskRecord]) -> None:
        """Release every task in ``stack`` nobody needs; forget those nothing refers to.

        Releasing a task can leave its inputs unneeded, and forgetting one can leave
        its inputs unreferenced: both are followed, iteratively.
        """
        tasks = self.tasks
        while stack:
            ts = stack.pop()
            st = ts.state
            if st is _FORGOTTEN or ts.who_wants or ts.waiters:
                continue
            if st is _MEMORY:
                self._free_data(ts)
                ts.state = _RELEASED
            elif st is _PROCESSING or st is _WAITING or st is _QUEUED:
                if st is _PROCESSING:
                    self._send_free(self._unassign(ts).address, ts.key)
                elif st is _QUEUED:
                    self._dequeue(ts)
                ts.waiting_on = None
                ts.state = _RELEASED
                for dep in ts.dependencies:
                    w = dep.waiters
                    if w is not None:
                        w.discard(ts)
                        if not w:
                            stack.append(dep)
            elif st is _ERRED:
                ts.state = _RELEASED
                ts.error = None
            if not ts.dependents:
                del tasks[ts.key]
                ts.state = _FORGOTTEN
                for dep in ts.dependencies:
                    dependents = dep.dependents
                    if dependents is not None:
                        dependents.discard(ts)
                        if not dependents:
                            stack.append(dep)

    def _free_data(self, ts: TaskRecord) -> None:
        nbytes = ts.nbytes
        key = ts.key
        for ws in ts.who_has or ():
            ws.has_what.discard(ts)
            ws.nbytes -= nbytes
            self._send_free(ws.address, key)
        ts.who_has = None

    # -- client requests

    def _update_graph(
        self,
        cs: ClientRecord,
        tasks: Mapping[Key, Any],
        dependencies: Mapping[Key, Iterable[Key]] | None,
        keys: Iterable[Key],
        priority: Mapping[Key, tuple] | None,
        retries: Mapping[Key, int] | None,
        restrictions: Mapping[Key, Iterable[Any]] | None,
        checkpoint: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    ) -> None:
        if len(tasks) < _GC_PAUSE_TASKS or not gc.isenabled():
            self._add_graph(
                cs, tasks, dependencies, keys, priority, retries, restrictions, checkpoint
            )
            return
        # A large graph allocates a record per task: without the pause, the cyclic GC
        # runs over and over while the scheduler's heap grows (measured: 2x slower on
        # a 1,000,000-task graph). Nothing here makes garbage cycles.
        gc.disable()
        try:
            self._add_graph(
                cs, tasks, dependencies, keys, priority, retries, restrictions, checkpoint
            )
        finally:
            gc.enable()

    def _add_graph(
        self,
        cs: ClientRecord,
        tasks: Mapping[Key, Any],
        dependencies: Mapping[Key, Iterable[Key]] | None,
        keys: Iterable[Key],
        priority: Mapping[Key, tuple] | None,
        retries: Mapping[Key, int] | None,
        restrictions: Mapping[Key, Iterable[Any]] | None,
        checkpoint: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    ) -> None:
        known = self.tasks
        self._generation += 1
        generation = self._generation
        default_retries = self.default_retries
        new: list[TaskRecord] = []
        for i, (key, payload) in enumerate(tasks.items()):
            ts = known.get(key)
            if ts is None:
                ts = known[key] = TaskRecord(key, payload)
            elif ts.payload is None and ts.state is _RELEASED:
                ts.payload = payload  # known only as a missing input until now
            else:
                continue
            new.append(ts)
            p = priority.get(key) if priority else None
            ts.priority = (0, generation, i) if p is None else p if type(p) is tuple else tuple(p)
            n = retries.get(key) if retries else None
            ts.retries = default_retries if n is None else int(n)
            if restrictions:
                where = restrictions.get(key)
                if where:
                    ts.restrictions = frozenset(where)
        if dependencies:
            for ts in new:
                deps = dependencies.get(ts.key)
                if not deps or ts.dependencies:
                    continue
                records = []
                for dkey in deps:
                    dts = known.get(dkey)
                    if dts is None:
                        # An input nobody defined: it errs if it is ever needed.
                        dts = known[dkey] = TaskRecord(dkey)
                        new.append(dts)
                    records.append(dts)
                    dependents = dts.dependents
                    if dependents is None:
                        dts.dependents = {ts}
                    else:
                        dependents.add(ts)
                ts.dependencies = tuple(records)
        if checkpoint:
            # One directory, or (a client sending its graphs again) a list of them.
            for where in checkpoint if isinstance(checkpoint, list) else (checkpoint,):
                self._add_checkpoints(where)
        wanted = []
        for key in keys:
            ts = known.get(key)
            if ts is None:
                ts = known[key] = TaskRecord(key)
            if ts.who_wants is None:
                ts.who_wants = {cs}
            else:
                ts.who_wants.add(cs)
            cs.wants.add(ts)
            st = ts.state
            if st is _RELEASED:
                wanted.append(ts)
            elif st is _MEMORY:
                if ts.who_has:
                    self._send(cs.id, self._memory_message(ts))
                else:
                    # Held by the checkpoint store alone: have a worker load it.
                    self._lose((ts,), notify=False)
            elif st is _ERRED:
                self._send(cs.id, self._erred_message(ts))
        if wanted:
            self._compute(wanted)
        # Tasks sent along that nothing wants or needs are dropped.
        self._release_cascade([ts for ts in new if ts.state is _RELEASED])

    def _add_checkpoints(self, checkpoint: Mapping[str, Any]) -> None:
        """Record the checkpoint directory and token of each task that has one."""
        directory = checkpoint.get("directory")
        tokens = checkpoint.get("tokens") or {}
        if not directory or not tokens:
            return
        self._checkpointing = True
        directory = str(directory)
        known = self.tasks
        for key, token in tokens.items():
            ts = known.get(key)
            if ts is not None and ts.checkpoint is None and ts.payload is not None:
                ts.checkpoint = (directory, str(token))

    def prime_checkpoints(self, answers: Mapping[tuple[str, str], bool]) -> None:
        """Use these lookups (``{(directory, token): stored}``) until :meth:`unprime`.

        The scheduler looks up a large graph's checkpoints in threads before it
        applies the graph, so the state machine does not wait on the filesystem.
        """
        self._primed = dict(answers)

    def unprime(self) -> None:
        """Forget primed lookups: later ones ask the filesystem again."""
        self._primed = {}

    def _lookup(self, ts: TaskRecord) -> bool:
        """Whether the checkpoint of ``ts`` exists (and so it need not be computed)."""
        assert ts.checkpoint is not None
        primed = self._primed.pop(ts.checkpoint, None) if self._primed else None
        if primed is not None:
            ts.stored = True if primed else None
            return primed
        lookup = self.checkpoint_lookup
        if lookup is None:
            from runtime.checkpoint import stored

            lookup = self.checkpoint_lookup = stored
        try:
            found = bool(lookup(*ts.checkpoint))
        except Exception:
            logger.exception("checkpoint lookup failed for %r", ts.key)
            found = False
        ts.stored = True if found else None
        return found

    def _stop_waiting(self, ts: TaskRecord) -> None:
        """``ts`` no longer needs its inputs (it was needing them before it was killed)."""
        release = None
        for dep in ts.dependencies:
            w = dep.waiters
            if w is not None and ts in w:
                w.discard(ts)
                if not w and not dep.who_wants:
                    if release is None:
                        release = [dep]
                    else:
                        release.append(dep)
        if release is not None:
            self._release_cascade(release)

    def _from_store(self, ts: TaskRecord) -> None:
        """``ts`` is needed by dependents only, and stored: MEMORY, held by no worker."""
        ts.state = _MEMORY
        ts.who_has = None
        for dts in ts.waiters or ():
            wo = dts.waiting_on
            if wo is not None and dts.state is _WAITING:
                wo.discard(ts)
                if not wo:
                    dts.waiting_on = None
                    self._ready(dts)

    @staticmethod
    def _memory_message(ts: TaskRecord) -> dict[str, Any]:
        return {
            "op": _KEY_IN_MEMORY,
            "key": ts.key,
            "nbytes": ts.nbytes,
            "type": ts.type,
            "workers": [ws.address for ws in ts.who_has or ()],
        }

    def _release_keys(self, cs: ClientRecord, keys: Iterable[Key]) -> None:
        tasks = self.tasks
        stack = []
        for key in keys:
            ts = tasks.get(key)
            if ts is None or ts not in cs.wants:
                continue
            cs.wants.discard(ts)
            if ts.who_wants is not None:
                ts.who_wants.discard(cs)
            stack.append(ts)
        self._release_cascade(stack)

    def _cancel_keys(self, cs: ClientRecord, keys: Iterable[Key]) -> None:
        tasks = self.tasks
        seen: set[TaskRecord] = set()
        todo = [ts for ts in (tasks.get(k) for k in keys) if ts is not None]
        release = []
        while todo:
            ts = todo.pop()
            if ts in seen:
                continue
            seen.add(ts)
            if ts.dependents:
                todo.extend(d for d in ts.dependents if d.state is not _MEMORY)
            if ts in cs.wants:
                cs.wants.discard(ts)
                if ts.who_wants is not None:
                    ts.who_wants.discard(cs)
                self._send(cs.id, {"op": _TASK_CANCELLED, "key": ts.key})
                release.append(ts)
        self._release_cascade(release)

    def _update_data(
        self, cs: ClientRecord, who_has: Mapping[Key, Iterable[str]], nbytes: Mapping[Key, int]
    ) -> None:
        known = self.tasks
        release: list[TaskRecord] = []
        for key, addresses in who_has.items():
            holders = [self.workers[a] for a in addresses if a in self.workers]
            ts = known.get(key)
            if ts is None:
                ts = known[key] = TaskRecord(key)
            if ts.who_wants is None:
                ts.who_wants = {cs}
            else:
                ts.who_wants.add(cs)
            cs.wants.add(ts)
            if not holders:
                if ts.state is _RELEASED:
                    self._compute((ts,))  # nowhere to be found: errs as lost
                continue
            st = ts.state
            if st is not _MEMORY:
                # The client's data replaces whatever the scheduler was doing for the key.
                if st is _PROCESSING:
                    self._send_free(self._unassign(ts).address, key)
                elif st is _QUEUED:
                    self._dequeue(ts)
                ts.waiting_on = None
                ts.error = None
                for dep in ts.dependencies:
                    w = dep.waiters
                    if w is not None:
                        w.discard(ts)
                        if not w:
                            release.append(dep)
                ts.state = _MEMORY
                ts.nbytes = int(nbytes.get(key) or 0)
                ts.scattered = True
                ts.who_has = set()
                for dts in ts.waiters or ():
                    wo = dts.waiting_on
                    if wo is not None and dts.state is _WAITING:
                        wo.discard(ts)
                        if not wo:
                            dts.waiting_on = None
                            self._ready(dts)
                for other in ts.who_wants:
                    if other is not cs:
                        self._send(other.id, self._memory_message(ts))
            if ts.who_has is None:  # it was held by the checkpoint store alone
                ts.who_has = set()
            for ws in holders:
                if ws not in ts.who_has:
                    ts.who_has.add(ws)
                    ws.has_what.add(ts)
                    ws.nbytes += ts.nbytes
            self._send(cs.id, self._memory_message(ts))
        self._release_cascade(release)


# ----------------------------------------------------------------------------- server


class Scheduler:
    """The scheduler server: a :class:`SchedulerState` behind an authenticated listener.

    Runs on one asyncio loop (``LocalCluster`` runs it on the client's background
    loop). One coroutine per connection; every batch read from a peer is applied to
    the state as one stimulus and the outgoing messages go out through one
    ``BatchedSend`` per peer.

    Parameters
    ----------
    address
        ``tcp://host:port`` to listen on; overrides ``host``/``port``/``interface``.
    host
        Host or IP to bind; default every interface (``0.0.0.0``), advertised as this
        host's routable IP.
    port
        Port to bind; 0 picks a free one.
    interface
        Network interface to bind and advertise (e.g. ``ib0``), instead of ``host``.
    secret
        The cluster secret (bytes or hex); default a fresh random one.
    scheduler_file
        Where to write the scheduler file (address and secret, mode 0600).
    worker_ttl
        Seconds (or ``"60s"``) of silence after which a worker is removed; None reads
        ``distributed.scheduler.worker-ttl``; 0 disables.
    allowed_failures, worker_saturation, root_task_lookahead, default_retries
        See :class:`SchedulerState`; None reads ``distributed.scheduler.*``.
    version_mismatch
        ``"error"`` or ``"warn"``; None reads ``distributed.version-mismatch``.
    validate
        Validate the state after every stimulus (slow; for tests).

    Examples
    --------
    >>> async def serve():  # doctest: +SKIP
    ...     async with Scheduler(port=0, scheduler_file="sched.json") as s:
    ...         await s.finished()
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        host: str | None = None,
        port: int = 0,
        interface: str | None = None,
        secret: bytes | str | None = None,
        scheduler_file: str | os.PathLike[str] | None = None,
        worker_ttl: float | str | None = None,
        allowed_failures: int | None = None,
        worker_saturation: float | None = None,
        root_task_lookahead: float | str | None = None,
        default_retries: int | None = None,
        version_mismatch: str | None = None,
        client_grace: float | str | None = None,
        validate: bool = False,
    ) -> None:
        from runtime.units import parse_timedelta

        if host is not None and interface is not None:
            raise SchedulerError("give the scheduler a host or an interface, not both")
        if isinstance(secret, str):
            secret = bytes.fromhex(secret)
        if secret is None:
            from runtime.comm import new_secret

            secret = new_secret()
        self.secret: bytes = bytes(secret)
        self._listen_on = address
        self._host = host
        self._port = int(port)
        self._interface = interface
        self.scheduler_file = os.fspath(scheduler_file) if scheduler_file is not None else None
        ttl = _config("worker-ttl") if worker_ttl is None else worker_ttl
        self.worker_ttl: float | None = parse_timedelta(ttl) if ttl else None
        grace = _config("client-grace") if client_grace is None else client_grace
        self.client_grace: float = (parse_timedelta(grace) or 0.0) if grace else 0.0
        self.version_mismatch = version_mismatch
        self.state = SchedulerState(
            allowed_failures=_config("allowed-failures")
            if allowed_failures is None
            else allowed_failures,
            worker_saturation=(
                _config("worker-saturation") if worker_saturation is None else worker_saturation
            ),
            root_task_lookahead=parse_timedelta(
                _config("root-task-lookahead")
                if root_task_lookahead is None
                else root_task_lookahead
            )
            or 0.0,
            default_retries=_config("default-retries")
            if default_retries is None
            else default_retries,
            validate=validate,
        )
        self.address = ""
        self.started: float | None = None
        self._listener: Any = None
        self._streams: dict[str, Any] = {}  # worker address / client id -> BatchedSend
        self._comms: dict[str, Any] = {}  # worker address / client id -> Comm
        self._rpc_comms: set[Any] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._stopping = False  # a shutdown was requested: no more state changes
        self._closed: asyncio.Event | None = None
        # Clients whose connection dropped: their work goes on until the timer fires.
        self._orphans: dict[str, asyncio.TimerHandle] = {}

    def __repr__(self) -> str:
        return f"<Scheduler {self.address or 'not started'} {self.state!r}>"

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Scheduler:
        """Listen, write the scheduler file, start watching heartbeats. Returns self."""
        from runtime import comm
        from runtime.protocol import Role

        if self._listener is not None:
            return self
        self._closed = asyncio.Event()
        if self._listen_on is not None:
            listen_address = self._listen_on
        else:
            if self._interface is not None:
                host = comm.get_ip(self._interface)
            else:
                host = self._host if self._host is not None else "0.0.0.0"
            listen_address = comm.format_address(host, self._port)
        self._listener = await comm.listen(
            listen_address, self._handle_comm, self.secret, role=Role.SCHEDULER
        )
        self.address = self._listener.address
        self.started = time.time()
        if self.scheduler_file is not None:
            from runtime.rendezvous import write_scheduler_file

            try:
                write_scheduler_file(self.scheduler_file, self.address, self.secret)
            except BaseException:
                self._listener.close()
                raise
        if self.worker_ttl:
            self._watcher = asyncio.ensure_future(self._watch_workers(self.worker_ttl))
        logger.info("scheduler listening at %s", self.address)
        return self

    async def close(self, reason: str = "scheduler closing", *, successor: bool = False) -> None:
        """Tell workers to close, drop every connection, stop listening. Idempotent.

        With ``successor`` (a drained job that restarts), only the workers of this
        scheduler's own batch job are told to close: those of other jobs (a cluster's
        worker jobs) just lose the connection and wait for the successor scheduler,
        which they find through the scheduler file.
        """
        if self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._closing = self._stopping = True
        if self._closed is None:  # never started
            self._closed = asyncio.Event()
        if self._watcher is not None:
            self._watcher.cancel()
        for timer in self._orphans.values():
            timer.cancel()
        self._orphans.clear()
        if self._listener is not None:
            self._listener.close()
        from runtime.rendezvous import current_job_id

        own_job = current_job_id() if successor else None
        workers = self.state.workers
        for name, stream in list(self._streams.items()):
            with contextlib.suppress(Exception):
                ws = workers.get(name)
                if ws is not None and (not successor or ws.job_id == own_job):
                    stream.send({"op": _CLOSE, "reason": reason})
                stream.close()
        comms = [*self._comms.values(), *self._rpc_comms]
        self._streams.clear()
        self._comms.clear()
        self._rpc_comms.clear()
        if comms:
            await asyncio.wait([asyncio.ensure_future(_close_comm(c)) for c in comms])
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 5.0)
        if self.scheduler_file is not None and self.address:
            from runtime.rendezvous import remove_scheduler_file

            with contextlib.suppress(Exception):
                remove_scheduler_file(self.scheduler_file, self.address)
        logger.info("scheduler %s closed (%s)", self.address, reason)
        assert self._closed is not None
        self._closed.set()

    async def finished(self) -> None:
        """Wait until the scheduler is closed (by :meth:`close`, ``shutdown`` or a signal)."""
        if self._closed is None:
            raise SchedulerError("the scheduler was not started; await scheduler.start() first")
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has finished."""
        return self._closed is not None and self._closed.is_set()

    async def __aenter__(self) -> Scheduler:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def identity(self) -> dict[str, Any]:
        """Return ``{"address", "started", "workers": {address: info}, "tasks": counts}``."""
        return {
            "address": self.address,
            "started": self.started,
            "workers": self.state.workers_info(),
            "tasks": self.state.tasks_info(),
        }

    # ------------------------------------------------------------- connections

    def _dispatch(self, out: Outgoing) -> None:
        streams = self._streams
        for recipient, msgs in out.items():
            stream = streams.get(recipient)
            if stream is None:
                continue  # the peer is gone; the state already knows or will soon
            with contextlib.suppress(CommClosedError):
                stream.send(*msgs)

    async def _handle_comm(self, comm: Any) -> None:
        try:
            msgs = await comm.read()
        except (CommClosedError, OSError):
            return
        except SerializationError as exc:
            logger.warning(
                "closing connection from %s: unreadable first message: %s", comm.peer, exc
            )
            await _close_comm(comm)
            return
        if not msgs or not isinstance(msgs[0], Mapping):
            await _close_comm(comm)
            return
        op = msgs[0].get("op")
        if self._stopping:
            await _close_comm(comm)
        elif op == _REGISTER_WORKER:
            await self._serve_worker(comm, msgs[0], msgs[1:])
        elif op == _REGISTER_CLIENT:
            await self._serve_client(comm, msgs[0], msgs[1:])
        else:
            await self._serve_requests(comm, msgs)

    def _check_versions(self, comm: Any, what: str, remote: Any) -> str | None:
        """Return why the peer is refused, or None (differences may be logged)."""
        from runtime import protocol

        try:
            protocol.check_versions(
                protocol.versions(),
                remote if isinstance(remote, Mapping) else {},
                peer=what,
                mode=self.version_mismatch,  # type: ignore[arg-type]
            )
        except VersionMismatchError as exc:
            logger.error("refused %s: %s", what, exc)
            return str(exc)
        return None

    async def _refuse(self, comm: Any, message: str) -> None:
        with contextlib.suppress(Exception):
            comm.write([{"op": _ERROR, "status": "error", "message": message}])
        await _close_comm(comm)

    async def _admit(
        self, comm: Any, reg: Mapping[str, Any], field: str, role: str
    ) -> tuple[str, Any] | None:
        """Check a registration and install the peer's stream; None if refused.

        ``reg[field]`` names the peer (a worker's address, a client's id). A peer that
        registers again before its old connection was noticed gone replaces it.
        """
        from runtime.comm import BatchedSend

        name = reg.get(field)
        if not isinstance(name, str) or not name:
            await self._refuse(comm, f"register-{role} needs the {role}'s {field}")
            return None
        refusal = self._check_versions(comm, f"{role} {name}", reg.get("versions"))
        if refusal is not None:
            await self._refuse(comm, refusal)
            return None
        old = self._comms.pop(name, None)
        if old is not None:
            self._streams.pop(name, None)
            old.abort()
        stream = BatchedSend(comm)
        self._comms[name] = comm
        self._streams[name] = stream
        return name, stream

    async def _serve_worker(self, comm: Any, reg: Mapping[str, Any], rest: list[Any]) -> None:
        admitted = await self._admit(comm, reg, "address", "worker")
        if admitted is None:
            return
        address, stream = admitted
        stream.send({"op": _OK, "status": "OK", "address": self.address})
        state = self.state
        self._dispatch(
            state.add_worker(
                address,
                name=reg.get("name"),
                nthreads=int(reg.get("nthreads") or 1),
                memory_limit=reg.get("memory_limit"),
                pid=reg.get("pid"),
                host=reg.get("host"),
                job_id=reg.get("job_id"),
                versions=reg.get("versions"),
                now=time.monotonic(),
            )
        )
        ws = state.workers[address]
        logger.info(
            "worker %s registered (name %s, %d threads, pid %s on %s)",
            address,
            ws.name,
            ws.nthreads,
            ws.pid,
            ws.host,
        )
        monotonic = time.monotonic
        try:
            if rest:
                self._dispatch(state.handle_worker_messages(address, rest, monotonic()))
            while True:
                msgs = await comm.read()
                if state.workers.get(address) is not ws:
                    break  # removed meanwhile (worker-ttl, retire)
                try:
                    out = state.handle_worker_messages(address, msgs, monotonic())
                except Exception:
                    logger.exception("error handling a batch from worker %s", address)
                    continue
                self._dispatch(out)
        except (CommClosedError, OSError):
            pass
        except SerializationError as exc:
            logger.error("dropping worker %s: unreadable batch: %s", address, exc)
        finally:
            if self._comms.get(address) is comm:
                self._forget_peer(address)
                if not self._stopping and state.workers.get(address) is ws:
                    logger.warning("worker %s connection closed; removing it", address)
                    self._dispatch(state.remove_worker(address))
            await _close_comm(comm)

    async def _serve_client(self, comm: Any, reg: Mapping[str, Any], rest: list[Any]) -> None:
        admitted = await self._admit(comm, reg, "client", "client")
        if admitted is None:
            return
        client, stream = admitted
        stream.send(
            {
                "op": _OK,
                "status": "OK",
                "client": client,
                "address": self.address,
                "workers": len(self.state.workers),
            }
        )
        orphaned = self._orphans.pop(client, None)
        if orphaned is not None:
            orphaned.cancel()
            logger.info("client %s reconnected within its grace period", client)
        self._dispatch(self.state.add_client(client))
        logger.info("client %s connected from %s", client, comm.peer)
        try:
            batch = rest
            while True:
                if batch and not await self._client_batch(client, batch, stream):
                    break
                batch = await comm.read()
        except (CommClosedError, OSError):
            pass
        except SerializationError as exc:
            logger.error("dropping client %s: unreadable batch: %s", client, exc)
        finally:
            if self._comms.get(client) is comm:
                self._forget_peer(client)
                if not self._stopping:
                    self._client_gone(client)
            await _close_comm(comm)

    def _client_gone(self, client: str) -> None:
        """A client's connection dropped without ``close-client``: keep its work a while.

        For ``client_grace`` seconds its keys stay wanted, so a client that reconnects
        (or a new one submitting the same keys) finds the work done or under way.
        """
        if client not in self.state.clients:
            return  # it closed properly: its keys were released already
        if not self.client_grace:
            self._dispatch(self.state.remove_client(client))
            return
        logger.warning(
            "client %s disconnected; its work goes on for %g s (distributed.scheduler."
            "client-grace) in case it, or a client with the same graph, comes back",
            client, self.client_grace,
        )  # fmt: skip
        previous = self._orphans.pop(client, None)
        if previous is not None:
            previous.cancel()
        loop = asyncio.get_running_loop()
        self._orphans[client] = loop.call_later(self.client_grace, self._expire_client, client)

    def _expire_client(self, client: str) -> None:
        self._orphans.pop(client, None)
        if client in self._comms or self._stopping:
            return
        logger.info("client %s did not come back within %g s; releasing its work",
                    client, self.client_grace)  # fmt: skip
        self._dispatch(self.state.remove_client(client))

    # ---------------------------------------------------------------- draining

    async def drain(
        self, reason: str, *, timeout: float | None = None, restart: str | None = None
    ) -> dict[str, int]:
        """Start no more tasks; wait up to ``timeout`` seconds for the running ones.

        Used before a job's walltime: a running task that finishes has its result
        (and its checkpoint) kept; one still running at the timeout is abandoned and
        computed again by the successor. Clients are told (``scheduler-draining``,
        with ``restart``: whether a successor scheduler is coming).

        Returns
        -------
        dict
            ``finished``: tasks computed since the scheduler started; ``abandoned``:
            tasks still running when the drain ended.
        """
        notice = {"op": Op.SCHEDULER_DRAINING.value, "reason": reason, "restart": restart}
        self._dispatch(self.state.pause(notice))
        running = self.state.processing_count()
        logger.warning(
            "draining (%s): no new tasks; waiting up to %s s for %d running task(s)",
            reason, "unlimited" if timeout is None else f"{timeout:g}", running,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        delay = 0.005
        while running and not self._closing and loop.time() < deadline:
            # Poll with back-off: a task-finished stimulus does not need to wake us.
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.1)
            running = self.state.processing_count()
        if running:
            logger.warning("drain timed out: abandoning %d running task(s)", running)
        return {"finished": self.state.finished_count, "abandoned": running}

    async def _client_batch(self, client: str, msgs: list[Any], stream: Any) -> bool:
        """Apply one batch from a client; False when the client is done (closed/shutdown)."""
        primed = await self._look_up_checkpoints(msgs)
        try:
            return await self._apply_client_batch(client, msgs, stream)
        finally:
            if primed:
                self.state.unprime()

    async def _look_up_checkpoints(self, msgs: list[Any]) -> bool:
        """Look up the checkpoints of large graphs in threads; whether any were primed."""
        graphs = [
            m
            for m in msgs
            if m.get("op") == _UPDATE_GRAPH
            and m.get("checkpoint")
            and len(m.get("tasks") or ()) >= _LOOKUP_AHEAD_TASKS
        ]
        if not graphs:
            return False
        from runtime.checkpoint import lookup_ahead

        loop = asyncio.get_running_loop()
        answers: dict[tuple[str, str], bool] = {}
        for msg in graphs:
            try:
                answers.update(
                    await loop.run_in_executor(
                        None, lookup_ahead, msg, self.state.checkpoint_lookup
                    )
                )
            except Exception:  # the state looks them up itself, one by one
                logger.exception("looking up checkpoints ahead failed")
        self.state.prime_checkpoints(answers)
        return True

    async def _apply_client_batch(self, client: str, msgs: list[Any], stream: Any) -> bool:
        chunk: list[Any] = []
        for msg in msgs:
            op = msg.get("op")
            if op in (_SHUTDOWN, _RETIRE_WORKERS, _SCHEDULER_INFO):
                if chunk:
                    self._client_chunk(client, chunk)
                    chunk = []
                if op == _SCHEDULER_INFO:
                    self._reply(stream, msg, {"op": _SCHEDULER_INFO, **self.identity()})
                    continue
                if op == _SHUTDOWN:
                    self._reply(stream, msg, {"op": _OK, "status": "OK"})
                    stream.flush()
                    logger.info("shutdown requested by client %s", client)
                    self._stopping = True
                    asyncio.ensure_future(self.close(f"shutdown requested by client {client}"))
                    return False
                self._reply(stream, msg, self._retire(msg.get("workers") or ()))
            elif op == _CLOSE_CLIENT:
                chunk.append(msg)
                self._client_chunk(client, chunk)
                return False
            else:
                chunk.append(msg)
        if chunk:
            self._client_chunk(client, chunk)
        return True

    def _client_chunk(self, client: str, msgs: list[Any]) -> None:
        try:
            out = self.state.handle_client_messages(client, msgs)
        except Exception:
            logger.exception("error handling a batch from client %s", client)
            return
        self._dispatch(out)

    async def _serve_requests(self, comm: Any, msgs: list[Any]) -> None:
        """A connection that did not register: answer its requests one batch at a time."""
        self._rpc_comms.add(comm)
        try:
            while True:
                replies = []
                stop = False
                for msg in msgs:
                    op = msg.get("op") if isinstance(msg, Mapping) else None
                    if op == _WHO_HAS:
                        reply = {
                            "op": _WHO_HAS,
                            "who_has": self.state.who_has(msg.get("keys") or ()),
                        }
                    elif op == _SCHEDULER_INFO:
                        reply = {"op": _SCHEDULER_INFO, **self.identity()}
                    elif op == _RETIRE_WORKERS:
                        reply = self._retire(msg.get("workers") or ())
                    elif op == _SHUTDOWN:
                        reply = {"op": _OK, "status": "OK"}
                        stop = True
                    else:
                        reply = {
                            "op": _ERROR,
                            "status": "error",
                            "message": f"unknown request {op!r}; register first to send {op!r}",
                        }
                    if isinstance(msg, Mapping) and "id" in msg:
                        reply["id"] = msg["id"]
                    replies.append(reply)
                comm.write(replies)
                if stop:
                    self._stopping = True
                    asyncio.ensure_future(self.close(f"shutdown requested from {comm.peer}"))
                    return
                msgs = await comm.read()
        except (CommClosedError, OSError, SerializationError):
            pass
        finally:
            self._rpc_comms.discard(comm)
            await _close_comm(comm)

    @staticmethod
    def _reply(stream: Any, request: Mapping[str, Any], reply: dict[str, Any]) -> None:
        if "id" in request:
            reply["id"] = request["id"]
        with contextlib.suppress(CommClosedError):
            stream.send(reply)

    def _forget_peer(self, name: str) -> None:
        self._comms.pop(name, None)
        stream = self._streams.pop(name, None)
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _drop_worker(self, address: str, reason: str, *, safe: bool = False) -> None:
        """Remove a worker from the state now and close its connection."""
        stream = self._streams.get(address)
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.send({"op": _CLOSE, "reason": reason})
        comm = self._comms.get(address)
        self._forget_peer(address)
        self._dispatch(self.state.remove_worker(address, safe=safe))
        if comm is not None:
            asyncio.ensure_future(_close_comm(comm))

    def _retire(self, workers: Iterable[Any]) -> dict[str, Any]:
        addresses = self.state.resolve_workers(workers)
        for address in addresses:
            logger.info("retiring worker %s", address)
            self._drop_worker(address, "retired", safe=True)
        return {"op": _RETIRE_WORKERS, "workers": addresses}

    async def _watch_workers(self, ttl: float) -> None:
        """Remove workers silent for longer than ``ttl`` (missed heartbeats)."""
        interval = min(max(ttl / 10, 0.01), 1.0)
        while True:
            await asyncio.sleep(interval)
            for address in self.state.stale_workers(time.monotonic(), ttl):
                logger.warning(
                    "worker %s sent nothing for %.3g s (distributed.scheduler.worker-ttl); "
                    "removing it",
                    address,
                    ttl,
                )
                self._drop_worker(address, "missed heartbeats")


async def _close_comm(comm: Any, timeout: float = 2.0) -> None:
    """Close ``comm``, aborting it if the peer does not let the buffer drain in time."""
    try:
        await asyncio.wait_for(comm.close(), timeout)
    except (asyncio.TimeoutError, Exception):
        with contextlib.suppress(Exception):
            comm.abort()


# ------------------------------------------------------------------ entry point


def make_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m runtime.scheduler``."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.scheduler",
        description="Run the distributed scheduler; workers and clients find it through "
        "the scheduler file (address and secret, mode 0600).",
    )
    parser.add_argument(
        "--scheduler-file",
        required=True,
        help="where to write the scheduler file (a path every node can read)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--host", help="host or IP to listen on (default: every interface)")
    where.add_argument("--interface", help="network interface to listen on, e.g. ib0")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO)",
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    scheduler = Scheduler(
        host=args.host,
        port=args.port,
        interface=args.interface,
        scheduler_file=args.scheduler_file,
    )
    await scheduler.start()
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        logger.info("received %s; shutting down", signame)
        asyncio.ensure_future(scheduler.close(f"received {signame}"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop, sig.name)
    # Inside a batch job whose script asked for it: drain before the walltime.
    from runtime.jobenv import DrainGuard

    guard = DrainGuard(scheduler)
    guard.install(loop)
    print(
        f"scheduler at {scheduler.address}; scheduler file {args.scheduler_file}", file=sys.stderr
    )
    await scheduler.finished()
    await guard.finished()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a scheduler until ``shutdown`` or SIGTERM/SIGINT; return the exit status.

    ``python -m runtime.scheduler --scheduler-file F [--host H | --interface IF]
    [--port P]``.
    """
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(_serve(args))
    except HPCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
