"""The client of the distributed runtime: ``Client``, ``Future``, ``wait``, ``as_completed``.

The client is synchronous for its users and asynchronous inside. Its network I/O runs
on the process-wide background event loop of :mod:`runtime.ioloop` (the same loop a
:class:`~runtime.cluster.LocalCluster` runs its scheduler on); user threads never
touch a socket::

    user threads                         loop thread                 scheduler
    ------------                         -----------                 ---------
    submit/map/release ---> outbox ---> _flush: refcounts, one ---> update-graph
                          (deque)        BatchedSend per client      release-keys
    result/gather/wait <--- Condition <-- _handle_batch <----------- key-in-memory
           |                notify_all    (one lock, one wake-up    task-erred
           |                              per received batch)
           +-------> run_sync(_fetch) ---> get-data, one message per worker holding
                                           results (direct; data never passes
                                           through the scheduler)

State kept here, and why:

* ``Client._states`` maps each key this client holds to one ``_KeyState`` (status,
  size, type, error, the workers that reported holding it, and *watchers* - internal
  callbacks fired once on completion). All ``Future`` objects for a key share that
  state, so a completion message is an O(1) dictionary update whatever the number of
  futures, and waiting threads re-check plain attributes after a single
  ``notify_all`` per received batch rather than one event per future.
* ``Client._refcount`` counts live ``Future`` objects per key. Dropping a future
  (``__del__`` or ``release()``) only appends to the outbox - a ``deque`` - so it is
  safe from any thread, from the garbage collector, and inside the loop thread; the
  count is decremented by the loop in order with every outgoing message, and the key
  is released on the scheduler (``release-keys``) when it reaches zero. Nothing is
  released while the interpreter is finalizing.
* The outbox: everything user threads send to the scheduler goes through it, so a
  ``release-keys`` can never overtake the ``update-graph`` that created the key. A
  submission wakes the loop at once (chains of dependent tasks are latency bound);
  releases wait ``_RELEASE_DELAY`` so that dropping a list of futures is one message.
  A ``map`` of any size is one ``update-graph``.
* ``_default`` and the ``as_current`` context variable: the client that
  ``hpc.compute`` uses when none is named (:func:`get_default_client`).

Task payloads are serialized here, once, with :mod:`runtime.serialize`; the scheduler
forwards them to workers without unpickling them. Futures found in ``submit``
arguments (also inside lists, tuples, sets and dicts) become dependencies: they are
replaced by their keys and the worker substitutes the values. A function pickled by
value (lambda, closure, ``__main__``) is pickled once per batch, not once per task.

:class:`ClientExecutor` (``client.get_executor()``) gives ``concurrent.futures``
futures; results of tasks finishing together are fetched in one request per worker
and set from the client's callback thread, which also runs ``add_done_callback``
callbacks, so user code never runs on the network loop.

Importing this module is cheap: the network stack (``asyncio``, comm, serialization)
is imported when the first ``Client`` is created.
"""

from __future__ import annotations

import concurrent.futures as _cf
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import os
import random
import sys
import threading
import time
import types
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, Literal, NamedTuple

from runtime.errors import GraphError, HandshakeError, HPCError, SchedulerError, SerializationError

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsCompleted",
    "Client",
    "ClientExecutor",
    "DoneAndNotDoneFutures",
    "Future",
    "FutureStatus",
    "RemoteTraceback",
    "as_completed",
    "get_default_client",
    "wait",
]

logger = logging.getLogger(__name__)

#: ``wait(..., return_when=)`` values; the same strings as in ``concurrent.futures``.
FIRST_COMPLETED: Literal["FIRST_COMPLETED"] = "FIRST_COMPLETED"
FIRST_EXCEPTION: Literal["FIRST_EXCEPTION"] = "FIRST_EXCEPTION"
ALL_COMPLETED: Literal["ALL_COMPLETED"] = "ALL_COMPLETED"

_RETURN_WHEN = (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED)
_DEFAULT_CONNECT_TIMEOUT = 30.0  # when distributed.comm.connect-timeout is not set
# How long gather waits for a lost result to be recomputed and reported again before
# it gives up on fetching it.
_REFETCH_TIMEOUT = 60.0
# After an unannounced disconnect, how long the client tries the same scheduler again
# before it waits for a successor.
_SAME_SCHEDULER_TIMEOUT = 3.0
# A successor scheduler that cannot be reached for these may be gone already, its own
# successor on the way: the client follows the chain (a HandshakeError is not that).
_SUCCESSOR_GONE = (OSError, TimeoutError)
_FETCH_ATTEMPTS = 5
# Seconds releases of dropped futures wait, to leave in one message with later ones.
_RELEASE_DELAY = 0.01


class FutureStatus(str, Enum):
    """Where the task behind a :class:`Future` stands, as seen by the client.

    The values are the strings Dask uses, so ``future.status == "finished"`` works.
    """

    PENDING = "pending"
    FINISHED = "finished"
    ERROR = "error"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


_PENDING = FutureStatus.PENDING
_FINISHED = FutureStatus.FINISHED
_ERROR = FutureStatus.ERROR
_CANCELLED = FutureStatus.CANCELLED


class _ClientStatus(Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class RemoteTraceback(Exception):
    """The traceback of a task that failed on a worker.

    It is attached as ``__cause__`` of the exception re-raised by the client, so the
    printed error shows where the task failed remotely, then where it was re-raised.

    Attributes
    ----------
    key
        The key of the task that failed.
    worker, host, pid
        The worker address, host name and process id that ran it (``None`` when not
        reported).
    traceback
        The formatted remote traceback.
    """

    def __init__(
        self,
        traceback: str,
        key: Any,
        worker: str | None = None,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(traceback, key, worker, host, pid)
        self.traceback = traceback
        self.key = key
        self.worker = worker
        self.host = host
        self.pid = pid

    def __str__(self) -> str:
        where = f"worker {self.worker}" if self.worker else "a worker"
        if self.host:
            where += f" on host {self.host}"
        if self.pid is not None:
            where += f" (pid {self.pid})"
        tb = self.traceback.rstrip("\n")
        return f'task {self.key!r} failed on {where}:\n"""\n{tb}\n"""'


class _RemoteError:
    """A task error as received: deserialized (once) only when someone asks."""

    __slots__ = ("key", "frames", "traceback", "worker", "host", "pid", "exc_type", "_exc")

    def __init__(self, key: Any, msg: Mapping[str, Any]) -> None:
        # The task that raised: ``key`` itself, or a dependency it inherited the error from.
        self.key = msg.get("origin", key)
        self.frames = msg.get("exception")
        self.traceback = msg.get("traceback") or ""
        self.worker = msg.get("worker")
        self.host = msg.get("host")
        self.pid = msg.get("pid")
        self.exc_type = msg.get("exc_type")
        self._exc: BaseException | None = None

    def get(self) -> BaseException:
        if self._exc is None:
            self._exc = self._load()
        return self._exc

    def _load(self) -> BaseException:
        from runtime import serialize

        where = f"worker {self.worker}" + (f" on host {self.host}" if self.host else "")
        exc: Any
        try:
            exc = serialize.loads(self.frames) if self.frames is not None else None
        except Exception as err:
            exc = SerializationError(
                f"task {self.key!r} failed on {where} with "
                f"{self.exc_type or 'an exception'} that cannot be unpickled on the "
                f"client ({type(err).__name__}: {err}); install the module that defines "
                "it where the client runs. The remote traceback is attached."
            )
        if not isinstance(exc, BaseException):
            exc = HPCError(f"task {self.key!r} failed on {where}: {exc!r}")
        if self.traceback:
            exc.__cause__ = RemoteTraceback(
                self.traceback, self.key, self.worker, self.host, self.pid
            )
        return exc


class _KeyState:
    """What the client knows about one key; shared by all futures of that key."""

    __slots__ = ("status", "nbytes", "type", "workers", "error", "watchers", "version")

    def __init__(self, status: FutureStatus = _PENDING) -> None:
        self.status = status
        self.nbytes: int | None = None
        self.type: str | None = None
        # Workers that held the result when it was reported: spares gather a who-has.
        self.workers: list[str] | None = None
        self.error: _RemoteError | BaseException | None = None
        # (function, argument) pairs called once, under the client lock, when the key
        # leaves PENDING. Internal only: they must be quick and must not block.
        self.watchers: list[tuple[Callable[[Any], None], Any]] | None = None
        self.version = 0

    def exception(self) -> BaseException:
        err = self.error
        if isinstance(err, _RemoteError):
            return err.get()
        if err is None:
            return HPCError("task failed without an error being reported")
        return err


def _funcname(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name is None:
        inner = getattr(func, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None)
    if not isinstance(name, str):
        name = type(func).__name__
    if name == "<lambda>":
        return "lambda"
    return name


class Future:
    """A remote result: the handle returned by :meth:`Client.submit` and friends.

    A ``Future`` refers to a key on the cluster. The result stays in worker memory
    while any ``Future`` for the key is alive; when the last one is dropped (or
    :meth:`release` is called on each), the client tells the scheduler the result is
    no longer wanted.

    Futures are created by a :class:`Client`; do not construct them directly.
    """

    __slots__ = ("key", "client", "_state", "_released", "__weakref__")

    key: Any
    client: Client
    _state: _KeyState
    _released: bool

    def __init__(self, key: Any, client: Client, state: _KeyState) -> None:
        # The client has already counted this reference (in bulk, under its lock).
        self._released = False
        self.key = key
        self.client = client
        self._state = state

    # -- state ----------------------------------------------------------------
    @property
    def status(self) -> FutureStatus:
        """``"pending"``, ``"finished"``, ``"error"`` or ``"cancelled"``."""
        return self._state.status

    @property
    def type(self) -> str | None:
        """The type name of the result, once it is known."""
        return self._state.type

    def done(self) -> bool:
        """Return whether the task has finished, failed or been cancelled."""
        return self._state.status is not _PENDING

    def cancelled(self) -> bool:
        """Return whether this future was cancelled."""
        return self._state.status is _CANCELLED

    # -- results ----------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its result (fetched from the worker holding it).

        Parameters
        ----------
        timeout
            Seconds to wait; ``None`` waits for ever.

        Raises
        ------
        TimeoutError
            The task did not finish within ``timeout`` seconds.
        concurrent.futures.CancelledError
            The future was cancelled.
        Exception
            Whatever the task raised, with its original type; ``__cause__`` is a
            :class:`RemoteTraceback` naming the task, worker and host.
        """
        self._check_not_released()
        deadline = None if timeout is None else time.monotonic() + timeout
        self.client._wait_states([self._state], deadline)
        status = self._state.status
        if status is _FINISHED:
            return self.client._gather_flat([self], "raise", deadline)[0]
        self._raise_unfinished()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the task and return the exception it raised, or ``None``.

        Raises
        ------
        TimeoutError
            The task did not finish within ``timeout`` seconds.
        concurrent.futures.CancelledError
            The future was cancelled.
        """
        self._check_not_released()
        deadline = None if timeout is None else time.monotonic() + timeout
        self.client._wait_states([self._state], deadline)
        status = self._state.status
        if status is _ERROR:
            return self._state.exception()
        if status is _CANCELLED:
            raise _cf.CancelledError(f"future {self.key!r} was cancelled")
        return None

    def traceback(self, timeout: float | None = None) -> str | None:
        """Wait for the task and return the remote traceback text of its failure."""
        exc = self.exception(timeout)
        cause = getattr(exc, "__cause__", None)
        return cause.traceback if isinstance(cause, RemoteTraceback) else None

    def _check_not_released(self) -> None:
        if self._released:
            raise HPCError(
                f"future {self.key!r} was released: its result may be gone from the "
                "cluster; keep the future (do not call release()) until you have the result"
            )

    def _raise_unfinished(self) -> Any:
        status = self._state.status
        if status is _ERROR:
            raise self._state.exception()
        if status is _CANCELLED:
            raise _cf.CancelledError(f"future {self.key!r} was cancelled")
        raise SchedulerError(
            f"the result of {self.key!r} could not be fetched from the workers: "
            "they no longer hold it and the scheduler did not report it again"
        )

    # -- control ----------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the task (and free its result if it already ran).

        Returns
        -------
        bool
            ``True``: the future is cancelled from now on, for every holder of the key.
        """
        self.client.cancel([self])
        return True

    def release(self) -> None:
        """Drop this future's claim on the result now instead of when it is collected.

        When no other future refers to the key, the scheduler frees the result.
        """
        if not self._released:
            self._released = True
            self.client._dec_ref(self.key)

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once the task has finished, failed or been cancelled.

        Callbacks run one at a time in a thread owned by the client (never on the
        network loop), also when the future is already done; exceptions they raise are
        logged.
        """
        self.client._watch(self, self.client._run_callback_soon, fn)

    # -- protocol helpers -----------------------------------------------------------
    def __del__(self) -> None:
        if not self._released:
            self._released = True
            client = self.client
            if client is not None:
                client._dec_ref(self.key)

    def __repr__(self) -> str:
        typ = self._state.type
        extra = f", type: {typ}" if typ and self._state.status is _FINISHED else ""
        return f"<Future: {self._state.status.value}{extra}, key: {self.key!r}>"

    def __dask_tokenize__(self) -> Any:
        return ("Future", self.key)

    def __hpc_tokenize__(self) -> Any:
        return ("Future", self.key)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a Future (key {self.key!r}) cannot be pickled: pass futures to submit/map "
            "directly or inside lists, tuples, sets or dicts, where they become "
            "dependencies, not inside other objects"
        )


# -- the default client --------------------------------------------------------------

_default_lock = threading.Lock()
_default: Client | None = None
# The last "scheduler-draining" notice any client of this process received: a batch
# script that fails because its job drained is not a failure (runtime.mpi).
_drain_notice: dict[str, Any] | None = None
_current: contextvars.ContextVar[Client | None] = contextvars.ContextVar(
    "hpc_current_client", default=None
)


def get_default_client() -> Client | None:
    """Return the client ``hpc.compute`` uses when none is named, or ``None``.

    That is the client made current by :meth:`Client.as_current` in this context if
    any, else the most recently created (or entered) client that is still open.
    """
    client = _current.get()
    if client is not None and client._status is _ClientStatus.RUNNING:
        return client
    client = _default
    if client is not None and client._status is _ClientStatus.RUNNING:
        return client
    return None


def _set_default(client: Client | None) -> None:
    global _default
    with _default_lock:
        _default = client


def _unset_default(client: Client) -> None:
    global _default
    with _default_lock:
        if _default is client:
            _default = None


# -- task packing ----------------------------------------------------------------------

_ATOMS = frozenset({int, float, bool, complex, bytes, type(None)})


def _pack(value: Any, deps: dict[Any, Future], quote: Callable[[Any], Any]) -> Any:
    """Turn a submit argument into a task argument.

    Futures (also inside lists, tuples, sets and dicts) become their keys and are
    recorded in ``deps``; containers holding futures are rebuilt inside the task;
    everything else that the task spec could misread (strings, containers) is quoted.
    """
    typ = type(value)
    if typ in _ATOMS:
        return value
    if typ is Future:
        deps[value.key] = value
        return value.key
    if typ in (list, tuple, set, frozenset, dict):
        if not _holds_future(value):
            return quote(value)
        if typ is list:
            return [_pack(v, deps, quote) for v in value]
        if typ is dict:
            return (
                dict,
                [[_pack(k, deps, quote), _pack(v, deps, quote)] for k, v in value.items()],
            )
        return (typ, [_pack(v, deps, quote) for v in value])
    if typ is str:
        return quote(value)
    if isinstance(value, Future):
        deps[value.key] = value
        return value.key
    return value


def _holds_future(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        typ = type(v)
        if typ in (list, tuple, set, frozenset):
            stack.extend(v)
        elif typ is dict:
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Future):
            return True
    return False


def _graph_futures(task: Any, deps: dict[Any, Future], literal_type: type) -> Any:
    """Replace futures inside a graph task (tuples, lists, dicts) by their keys."""
    typ = type(task)
    if typ in _ATOMS or typ is str:
        return task
    if isinstance(task, Future):
        deps[task.key] = task
        return task.key
    if typ is tuple:
        if task and type(task[0]) is literal_type:
            return task  # a quoted value: data, never a reference
        if not _holds_future(task):
            return task
        return tuple(_graph_futures(t, deps, literal_type) for t in task)
    if typ is list:
        if not _holds_future(task):
            return task
        return [_graph_futures(t, deps, literal_type) for t in task]
    if typ is dict and _holds_future(task):
        return (dict, [[k, _graph_futures(v, deps, literal_type)] for k, v in task.items()])
    return task


def _flatten_keys(keys: Any, out: list) -> list:
    """Flatten nested lists of keys (tuples are keys, not containers)."""
    if type(keys) is list:
        for k in keys:
            _flatten_keys(k, out)
    else:
        out.append(keys)
    return out


def _nbytes(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    try:
        return sys.getsizeof(value)
    except TypeError:
        return 0


def _as_worker_list(workers: Any) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    return list(workers)


def _config(key: str, default: Any) -> Any:
    try:
        from runtime import config

        value = config.get(key, default)
    except Exception:  # the key may not exist in this version of the defaults
        return default
    return default if value is None else value


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return float(value)
    from runtime.units import parse_timedelta

    seconds = parse_timedelta(value)
    return default if seconds is None else float(seconds)


class Client:
    """Connect to a distributed scheduler and run work on its cluster.

    Parameters
    ----------
    address
        ``"tcp://host:port"`` of the scheduler, or a cluster object exposing
        ``scheduler_address`` and ``secret`` (e.g. :class:`~runtime.cluster.LocalCluster`).
        With neither ``address`` nor ``scheduler_file``, the scheduler file named by
        ``$HPC_SCHEDULER_FILE`` is used (set inside batch jobs); failing that, a
        ``LocalCluster`` is started for this client and closed with it.
    scheduler_file
        Path of the JSON file the scheduler wrote (address and secret); waits up to
        ``timeout`` for it to appear.
    secret
        The cluster secret (bytes, or hex text) when connecting by address.
    timeout
        Seconds (or a duration such as ``"30s"``) to wait for the connection;
        default ``distributed.comm.connect-timeout``.
    set_as_default
        Make this client the default for ``hpc.compute`` (see
        :func:`get_default_client`).
    name
        A label for this client in scheduler logs.

    Examples
    --------
    >>> with Client(cluster) as client:                     # doctest: +SKIP
    ...     futures = client.map(inc, range(100))
    ...     total = client.submit(sum, futures).result()
    """

    def __init__(
        self,
        address: Any = None,
        *,
        scheduler_file: str | os.PathLike[str] | None = None,
        secret: bytes | str | None = None,
        timeout: float | str | None = None,
        set_as_default: bool = True,
        name: str | None = None,
    ) -> None:
        from runtime import graph, ioloop, serialize, tokenize

        self.id = f"client-{uuid.uuid4().hex}"
        self.name = name or self.id
        self._status = _ClientStatus.CONNECTING
        self._timeout = _seconds(
            timeout,
            _seconds(_config("distributed.comm.connect-timeout", None), _DEFAULT_CONNECT_TIMEOUT),
        )
        self._dumps = serialize.dumps
        self._loads = serialize.loads
        self._tokenize = tokenize.tokenize
        self._quote = graph.quote
        self._apply = graph.apply
        self._run_sync = ioloop.run_sync
        self._in_loop_thread = ioloop.in_loop_thread
        self._loop = ioloop.get_loop()

        # Guards _states, _refcount and every _KeyState; waiting threads sleep on it.
        self._cond = threading.Condition(threading.Lock())
        self._states: dict[Any, _KeyState] = {}
        self._refcount: dict[Any, int] = {}
        self._outbox: deque[tuple[bool, Any]] = deque()
        self._flush_scheduled = False
        self._release_scheduled = False
        self._cf_ready: deque[tuple[Future, _cf.Future]] = deque()
        self._cf_scheduled = False
        self._generation = itertools.count()
        self._callback_pool: _cf.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # Loop-thread state: the scheduler stream, replies awaited on it (by request
        # id), and idle direct connections to workers.
        self._comm: Any = None
        self._bsend: Any = None
        self._reader: Any = None
        self._replies: dict[Any, Any] = {}
        self._request_ids = itertools.count()
        self._worker_comms: dict[str, list[Any]] = defaultdict(list)
        self._cluster: Any = None
        self._owns_cluster = False
        # Following a scheduler to its successor (a cluster job that drained before its
        # walltime and restarted): where to wait for it, what the scheduler file said
        # last, and - while that is possible - every task sent, to send again.
        self._successor: Callable[[Mapping[str, Any], float | None], Any] | None = None
        self._scheduler_doc: dict[str, Any] = {}
        self._restart_notice: dict[str, Any] | None = None
        self._reconnecting = False
        self._replay: dict[Any, tuple] | None = None
        self._replay_kept = 0

        self.scheduler_address, self._secret = self._resolve(address, scheduler_file, secret)
        # A cluster may checkpoint every computation of its clients by default.
        self._checkpoint_default: Any = getattr(self._cluster, "checkpoint", None)
        if self._successor is not None:
            self._replay = {}
        try:
            self._sync(self._connect(), self._timeout + 5.0)
        except BaseException:
            self._status = _ClientStatus.CLOSED
            if self._owns_cluster and self._cluster is not None:
                self._cluster.close()
            raise
        self._status = _ClientStatus.RUNNING
        if set_as_default:
            _set_default(self)
        # A cluster object may want the connected client (job-queue clusters follow
        # the scheduler's load through it for adaptive scaling).
        connected = getattr(self._cluster, "_client_connected", None)
        if callable(connected):
            connected(self)

    # -- connecting ----------------------------------------------------------------
    def _resolve(self, address: Any, scheduler_file: Any, secret: Any) -> tuple[str, bytes]:
        if address is not None and scheduler_file is not None:
            raise SchedulerError("Client got both an address and a scheduler_file; pass one")
        if address is None and scheduler_file is None:
            # Inside a batch job (python -m runtime.mpi --script) this names the job's
            # cluster, so a plain Client() in the user's script connects to it.
            scheduler_file = os.environ.get("HPC_SCHEDULER_FILE") or None
        if scheduler_file is not None:
            from runtime.rendezvous import read_scheduler_file

            path = os.fspath(scheduler_file)
            info = read_scheduler_file(path, timeout=self._timeout)
            address = _info_field(info, "address")
            secret = _info_field(info, "secret") if secret is None else secret
            self._scheduler_doc = dict(info)
            if not _same_job(info):
                # A client outside the scheduler's job may outlive it: when it drains
                # for a restart, its successor rewrites this file.
                self._successor = functools.partial(
                    _await_scheduler_file, path, closed=self._is_closed
                )
        elif address is None:
            from runtime.cluster import LocalCluster

            address = LocalCluster()
            self._owns_cluster = True
        if not isinstance(address, str):
            cluster = address
            try:
                address = cluster.scheduler_address
            except AttributeError:
                raise SchedulerError(
                    "Client(address) takes 'tcp://host:port' or a cluster with "
                    f"scheduler_address and secret, not {type(cluster).__name__}"
                ) from None
            if secret is None:
                secret = getattr(cluster, "secret", None)
            self._cluster = cluster
            follow = getattr(cluster, "_await_scheduler", None)
            if callable(follow):  # a job-queue cluster: it follows its job's successors
                self._successor = follow
                self._scheduler_doc = dict(getattr(cluster, "scheduler_info", None) or {})
        if not secret:
            raise SchedulerError(
                f"no secret for the scheduler at {address}: pass secret=..., or connect with "
                "scheduler_file=... (the file holds the address and the secret)"
            )
        if isinstance(secret, str):
            try:
                secret = bytes.fromhex(secret)
            except ValueError:
                raise SchedulerError(
                    "a secret given as text must be hex digits, as in the scheduler file"
                ) from None
        return str(address), bytes(secret)

    async def _connect(self, timeout: float | None = None) -> None:
        import asyncio

        from runtime import comm, protocol

        conn = await comm.connect(
            self.scheduler_address,
            self._secret,
            timeout=self._timeout if timeout is None else timeout,
            role=protocol.Role.CLIENT,
            hello={"client": self.id},
        )
        try:
            # The scheduler checks our versions too, but our own check names the
            # differences from this side and honours our distributed.version-mismatch.
            remote = conn.remote_info.get("versions")
            if isinstance(remote, Mapping):
                protocol.check_versions(
                    protocol.versions(), remote, peer=f"the scheduler at {self.scheduler_address}"
                )
            register = {
                "op": "register-client",
                "client": self.id,
                "name": self.name,
                "versions": protocol.versions(),
            }
            await _maybe_await(conn.write([register]))
            replies = await asyncio.wait_for(conn.read(), self._timeout)
        except BaseException:
            await _close_quietly(conn)
            raise
        reply = replies[0] if replies else {}
        if reply.get("op") == "error" or str(reply.get("status", "OK")).upper() != "OK":
            await _close_quietly(conn)
            message = reply.get("message") or reply.get("error") or reply
            raise SchedulerError(
                f"the scheduler at {self.scheduler_address} refused the client: {message}"
            )
        self._comm = conn
        self._bsend = comm.BatchedSend(conn)
        start = getattr(self._bsend, "start", None)
        if start is not None:
            start()
        self._reader = asyncio.ensure_future(self._read_loop())
        if len(replies) > 1:
            self._handle_batch(replies[1:])

    async def _read_loop(self) -> None:
        import asyncio

        try:
            while True:
                self._handle_batch(await self._comm.read())
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self._status in (_ClientStatus.CLOSING, _ClientStatus.CLOSED):
                return
            logger.warning(
                "client %s lost its connection to the scheduler at %s: %r",
                self.id, self.scheduler_address, err,
            )  # fmt: skip
            plan = self._reconnect_plan()
            if plan is not None:
                self._start_reconnect(err, plan)
                return
            self._status = _ClientStatus.CLOSED
            _unset_default(self)
            lost = SchedulerError(
                f"lost the connection to the scheduler at {self.scheduler_address} ({err!r}); "
                "results held on the cluster are gone: create a new Client"
            )
            self._fail_all(lost)
            self._fail_requests(lost)

    def _sync(self, coro: Any, timeout: float | None = None) -> Any:
        if self._in_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking Client method was called on the event loop thread (e.g. from "
                "an asyncio callback); call it from another thread"
            )
        return self._run_sync(coro, timeout)

    # -- the outbox (any thread) -> the scheduler (loop thread) -----------------------
    def _send(self, msg: dict) -> None:
        self._outbox.append((True, msg))
        self._schedule_flush()

    def _dec_ref(self, key: Any) -> None:
        # Called from Future.__del__: any thread, maybe inside the garbage collector,
        # maybe at interpreter exit. Only a deque append and (maybe) a loop wake-up.
        if self._status is _ClientStatus.CLOSED or sys.is_finalizing():
            return
        self._outbox.append((False, key))
        if not (self._flush_scheduled or self._release_scheduled):
            # Releases are not urgent: flush them a little later, so that dropping a
            # list of 20,000 futures is one message rather than a wake-up per key (a
            # wake-up hands the GIL to the loop thread, which would flush at once).
            self._release_scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop sends nothing
                self._loop.call_soon_threadsafe(self._flush_releases_later)

    def _flush_releases_later(self) -> None:
        self._loop.call_later(_RELEASE_DELAY, self._flush_releases)

    def _flush_releases(self) -> None:
        self._release_scheduled = False
        self._flush()

    def _schedule_flush(self) -> None:
        # The flag is reset by _flush before it drains the outbox, and set here after
        # the append: an item is never left behind without a flush scheduled.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # RuntimeError: the loop is closed, nothing can be sent any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._reconnecting:
            return  # kept in the outbox until the successor scheduler is connected
        outbox = self._outbox
        msgs: list[dict] = []
        released: list = []
        with self._cond:
            refcount = self._refcount
            while outbox:
                is_msg, item = outbox.popleft()
                if is_msg:
                    if released:
                        msgs.append({"op": "release-keys", "keys": released, "client": self.id})
                        released = []
                    msgs.append(item)
                    continue
                n = refcount.get(item, 0) - 1
                if n > 0:
                    refcount[item] = n
                elif n == 0:
                    del refcount[item]
                    self._states.pop(item, None)
                    released.append(item)
        if released:
            msgs.append({"op": "release-keys", "keys": released, "client": self.id})
        if self._replay is not None and msgs:
            self._record(msgs)
        bsend = self._bsend
        if msgs and bsend is not None and self._status is not _ClientStatus.CLOSED:
            try:
                bsend.send(*msgs)
                bsend.flush()  # already one batch: no need to wait another iteration
            except Exception as err:  # the stream is gone; the reader reports it
                logger.debug("client %s could not send %d message(s): %r", self.id, len(msgs), err)

    # -- incoming messages (loop thread) --------------------------------------------
    def _handle_batch(self, msgs: list[dict]) -> None:
        """Apply a batch of scheduler messages: one lock, at most one wake-up."""
        changed = False
        other: list[dict] = []
        with self._cond:
            states = self._states
            for msg in msgs:
                op = msg.get("op")
                if op == "key-in-memory":
                    st = states.get(msg["key"])
                    if (
                        st is not None
                        and st.status is not _FINISHED
                        and st.status is not _CANCELLED
                    ):
                        st.nbytes = msg.get("nbytes")
                        st.type = msg.get("type")
                        workers = msg.get("workers")
                        st.workers = list(workers) if workers else None
                        self._transition(st, _FINISHED)
                        changed = True
                elif op == "task-erred":
                    key = msg["key"]
                    st = states.get(key)
                    if st is not None and st.status is _PENDING:
                        st.error = _RemoteError(key, msg)
                        self._transition(st, _ERROR)
                        changed = True
                elif op == "task-cancelled":
                    st = states.get(msg["key"])
                    if st is not None and st.status is not _CANCELLED:
                        self._transition(st, _CANCELLED)
                        changed = True
                elif op == "scheduler-draining":
                    global _drain_notice
                    self._restart_notice = _drain_notice = dict(msg)
                    logger.warning(
                        "the scheduler at %s is draining (%s)%s", self.scheduler_address,
                        msg.get("reason"), "; a successor will take over"
                        if msg.get("restart") else "",
                    )  # fmt: skip
                elif op == "lost-data":
                    st = states.get(msg["key"])
                    if st is not None and st.status is _FINISHED:
                        st.status = _PENDING
                        st.workers = None
                        st.version += 1
                        changed = True
                else:
                    other.append(msg)
            if changed:
                self._cond.notify_all()
        for msg in other:
            waiter = self._replies.pop(msg.get("id"), None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(msg)
            else:
                logger.debug("client %s ignores scheduler message %r", self.id, msg.get("op"))

    def _transition(self, st: _KeyState, status: FutureStatus) -> None:
        """Move ``st`` to ``status`` and fire its watchers. Call with the lock held."""
        st.status = status
        st.version += 1
        watchers = st.watchers
        if watchers is not None and status is not _PENDING:
            st.watchers = None
            for fn, arg in watchers:
                try:
                    fn(arg)
                except Exception:  # an internal watcher must never break the loop
                    logger.exception("client watcher %r failed", fn)

    def _fail_all(self, error: BaseException) -> None:
        """Fail every pending future (the scheduler connection is gone)."""
        with self._cond:
            for st in self._states.values():
                if st.status is _PENDING:
                    st.error = error
                    self._transition(st, _ERROR)
            self._cond.notify_all()

    def _fail_requests(self, error: BaseException) -> None:
        replies, self._replies = self._replies, {}
        for waiter in replies.values():
            if not waiter.done():
                waiter.set_exception(error)

    # -- following a restarted scheduler (loop thread) ---------------------------------
    def _record(self, msgs: list[dict]) -> None:
        """Keep what each ``update-graph`` sent, to send it again to a successor."""
        replay = self._replay
        assert replay is not None
        for msg in msgs:
            if msg.get("op") != "update-graph":
                continue
            deps = msg.get("dependencies") or {}
            prio = msg.get("priority") or {}
            retries = msg.get("retries") or {}
            workers = msg.get("workers") or {}
            ckpt = msg.get("checkpoint")
            stored: dict[Any, tuple[str, str]] = {}
            wheres: list[Mapping[str, Any]] = (
                ckpt if isinstance(ckpt, list) else [ckpt] if ckpt else []
            )
            for where in wheres:
                directory = where.get("directory")
                if directory:
                    for key, token in (where.get("tokens") or {}).items():
                        stored[key] = (directory, token)
            for key, payload in msg["tasks"].items():
                replay[key] = (
                    payload,
                    deps.get(key) or (),
                    prio.get(key),
                    retries.get(key),
                    workers.get(key),
                    stored.get(key),
                )
        if len(replay) > max(10_000, 2 * self._replay_kept):
            with self._cond:
                held = list(self._refcount)
            needed = self._lineage(held)
            self._replay = {k: replay[k] for k in needed}
            self._replay_kept = len(self._replay)

    def _lineage(self, keys: Iterable[Any]) -> list[Any]:
        """Keys of ``keys`` with a recorded task, and every recorded input they need."""
        replay = self._replay or {}
        seen: dict[Any, None] = {}
        stack = [k for k in keys if k in replay]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen[key] = None
            stack.extend(d for d in replay[key][1] if d in replay and d not in seen)
        return list(seen)

    def _is_closed(self) -> bool:
        return self._status is _ClientStatus.CLOSED

    def _reconnect_plan(self) -> str | None:
        """What to do when the scheduler connection is lost, instead of failing at once.

        ``"successor"``: wait for the scheduler that takes over (a job-queue cluster
        knows whether one comes; a scheduler file, when the scheduler said so);
        ``"same"``: only try the same scheduler again (the connection may merely have
        broken); ``None``: fail every future now (no record of the graphs to resend).
        """
        if self._successor is None or self._status is not _ClientStatus.RUNNING:
            return None
        notice = self._restart_notice
        if self._cluster is not None or (notice and notice.get("restart")):
            return "successor"
        return None if notice else "same"

    def _start_reconnect(self, err: BaseException, plan: str) -> None:
        import asyncio

        self._reconnecting = True
        old = self._bsend
        self._bsend = None
        self._comm = None
        close = getattr(old, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        self._worker_comms.clear()
        self._fail_requests(
            SchedulerError(f"the scheduler at {self.scheduler_address} went away ({err!r})")
        )
        # Results held by the old workers are gone: wait for the successor's.
        with self._cond:
            for st in self._states.values():
                if st.status is _FINISHED:
                    st.status = _PENDING
                    st.workers = None
                    st.version += 1
            self._cond.notify_all()
        asyncio.ensure_future(self._reconnect(err, plan))

    async def _reconnect(self, err: BaseException, plan: str) -> None:
        configured = _config("distributed.client.reconnect-timeout", None)
        timeout = None if configured is None else _seconds(configured, 0.0)
        previous = dict(self._scheduler_doc)
        logger.warning(
            "client %s waits up to %s for the successor of the scheduler at %s",
            self.id, "forever" if timeout is None else f"{timeout:g} s", self.scheduler_address,
        )  # fmt: skip
        assert self._successor is not None
        info: Any = None
        why = "no successor scheduler came"
        if self._restart_notice is None:
            # Not a drain: maybe the connection broke and the scheduler is still there
            # (it keeps this client's work for its grace period).
            try:
                await self._connect(timeout=_SAME_SCHEDULER_TIMEOUT)
            except Exception as exc:  # gone: wait for a successor
                logger.info("client %s: the scheduler is gone (%r)", self.id, exc)
                why = f"it did not answer again ({exc!r})"
            else:
                logger.warning("client %s reconnected to %s", self.id, self.scheduler_address)
                self._resume_after_reconnect()
                return
        if plan == "same":
            self._fail_reconnect(err, why)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                info = await self._wait_for_successor(previous, remaining)
            except Exception as exc:  # the cluster could not follow its job
                info, why = None, f"no successor scheduler could be found: {exc!r}"
                break
            if info is None:
                break
            self.scheduler_address = str(_info_field(info, "address"))
            self._secret = bytes(_info_field(info, "secret"))
            self._scheduler_doc = dict(info)
            self._restart_notice = None
            try:
                await self._connect()
            except _SUCCESSOR_GONE as exc:
                if isinstance(exc, HandshakeError):  # the wrong secret: waiting will not mend it
                    info, why = None, f"could not connect to the successor scheduler: {exc!r}"
                    break
                # Gone already: a job that drained as it started (SLURM's --signal can
                # come that early) has restarted in its turn. Follow the chain.
                logger.warning(
                    "client %s could not reach the successor scheduler at %s (%r); waiting "
                    "for the scheduler that follows it", self.id, self.scheduler_address, exc,
                )  # fmt: skip
                why = f"could not connect to the successor scheduler: {exc!r}"
                previous = dict(info)
                continue
            except Exception as exc:  # refused, or another version: say so now
                info, why = None, f"could not connect to the successor scheduler: {exc!r}"
            break
        if info is None or self._status is not _ClientStatus.RUNNING:
            self._fail_reconnect(err, why)
            return
        logger.warning("client %s reconnected to %s", self.id, self.scheduler_address)
        self._resume_after_reconnect()

    async def _wait_for_successor(self, previous: Mapping[str, Any], timeout: float | None) -> Any:
        """The successor's scheduler file (``None``: none came), waited for in a thread."""
        import asyncio

        # A daemon thread, not the loop's executor: the wait may be long, and an
        # executor thread would hold up the interpreter's exit until it ends.
        loop = asyncio.get_running_loop()
        waiting: asyncio.Future[Any] = loop.create_future()
        successor = self._successor
        assert successor is not None

        def wait() -> None:
            try:
                result: Any = successor(previous, timeout)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_resolve_future, waiting, None, exc)
            else:
                loop.call_soon_threadsafe(_resolve_future, waiting, result, None)

        threading.Thread(target=wait, name=f"{self.id}-successor", daemon=True).start()
        return await waiting

    def _fail_reconnect(self, err: BaseException, why: str) -> None:
        self._reconnecting = False
        if self._status is _ClientStatus.RUNNING:
            self._status = _ClientStatus.CLOSED
            _unset_default(self)
        lost = SchedulerError(
            f"lost the connection to the scheduler at {self.scheduler_address} ({err!r}) "
            f"and {why}; results held on the cluster are gone: create a new Client "
            "(with checkpoint=DIR, finished tasks are loaded from their checkpoints)"
        )
        self._fail_all(lost)
        self._fail_requests(lost)

    def _resume_after_reconnect(self) -> None:
        try:
            self._send_replay()
        except Exception as exc:  # a bug here must not leave every future waiting
            logger.exception("client %s could not send its graphs again", self.id)
            self._fail_all(SchedulerError(f"could not resubmit to the scheduler: {exc!r}"))
        finally:
            self._reconnecting = False
            self._flush()

    def _send_replay(self) -> None:
        """Send every task still needed to the new scheduler, in one ``update-graph``."""
        replay = self._replay or {}
        lost: list[Any] = []
        # Graphs made while reconnecting wait in the outbox: they go out after this one.
        unsent = {
            k for is_msg, m in self._outbox if is_msg and m.get("op") == "update-graph"
            for k in m.get("tasks", ())
        }  # fmt: skip
        with self._cond:
            wanted = []
            for key in self._refcount:
                st = self._states.get(key)
                if st is None or st.status is not _PENDING or key in unsent:
                    continue  # failed or cancelled futures keep their outcome
                if key in replay:
                    wanted.append(key)
                else:
                    lost.append(key)
        needed = self._lineage(wanted)
        self._replay = {k: replay[k] for k in needed}
        self._replay_kept = len(self._replay)
        if needed:
            msg: dict[str, Any] = {
                "op": "update-graph",
                "tasks": {},
                "dependencies": {},
                "keys": wanted,
                "priority": {},
                "client": self.id,
            }
            retries: dict[Any, int] = {}
            workers: dict[Any, Any] = {}
            stores: dict[str, dict[Any, str]] = {}
            for key in needed:
                payload, deps, prio, n, where, ckpt = replay[key]
                msg["tasks"][key] = payload
                msg["dependencies"][key] = list(deps)
                if prio is not None:
                    msg["priority"][key] = prio
                if n is not None:
                    retries[key] = n
                if where is not None:
                    workers[key] = where
                if ckpt is not None:
                    stores.setdefault(ckpt[0], {})[key] = ckpt[1]
            if retries:
                msg["retries"] = retries
            if workers:
                msg["workers"] = workers
            if stores:
                msg["checkpoint"] = [{"directory": d, "tokens": t} for d, t in stores.items()]
            self._outbox.appendleft((True, msg))
        if lost:
            error = SchedulerError(
                f"{len(lost)} result(s) (e.g. {lost[0]!r}) were scattered to or held by the "
                "workers of a scheduler that is gone, with no task to compute them again: "
                "scatter them again"
            )
            with self._cond:
                for key in lost:
                    st = self._states.get(key)
                    if st is not None and st.status is _PENDING:
                        st.error = error
                        self._transition(st, _ERROR)
                self._cond.notify_all()
        logger.info(
            "client %s sent %d task(s) again for %d future(s)", self.id, len(needed), len(wanted)
        )

    async def _request(self, msg: dict) -> dict:
        """Send a request on the scheduler stream and await its reply (loop thread).

        The scheduler copies the request's ``id`` into the reply.
        """
        import asyncio

        if self._status is _ClientStatus.CLOSED:
            raise SchedulerError(f"client {self.id} is closed")
        waiter = asyncio.get_running_loop().create_future()
        request_id = next(self._request_ids)
        self._replies[request_id] = waiter
        self._send({**msg, "id": request_id})
        try:
            reply = await waiter
        finally:
            self._replies.pop(request_id, None)
        if reply.get("status") == "error" or reply.get("op") == "error":
            raise SchedulerError(
                f"the scheduler refused {msg['op']}: {reply.get('message', reply)}"
            )
        return reply

    # -- watching futures -------------------------------------------------------------
    def _watch(self, future: Future, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Call ``fn(future)`` (or ``fn((future, arg))``) once ``future`` is done.

        Right away, in this thread, if it already is; otherwise under the client lock
        in whichever thread completes it, so ``fn`` must be quick and must not block.
        """
        target = future if arg is None else (future, arg)
        st = future._state
        with self._cond:
            if st.status is _PENDING:
                if st.watchers is None:
                    st.watchers = []
                st.watchers.append((fn, target))
                return
        fn(target)

    def _unwatch(self, future: Future, fn: Callable[[Any], None]) -> None:
        st = future._state
        with self._cond:
            if st.watchers:
                st.watchers = [w for w in st.watchers if w[0] is not fn] or None

    def _callbacks(self) -> _cf.ThreadPoolExecutor:
        pool = self._callback_pool
        if pool is None:
            with self._pool_lock:
                if self._callback_pool is None:
                    self._callback_pool = _cf.ThreadPoolExecutor(
                        1, thread_name_prefix="hpc-client-callbacks"
                    )
                pool = self._callback_pool
        return pool

    def _run_callback_soon(self, target: tuple[Future, Callable[[Future], Any]]) -> None:
        future, fn = target
        try:
            self._callbacks().submit(_call_logged, fn, future)
        except RuntimeError:
            # The client is closed and its callback thread gone. Not here: this may
            # be under the client lock, which the callback may need.
            threading.Thread(target=_call_logged, args=(fn, future), daemon=True).start()

    # -- the executor view: results fetched as tasks finish -----------------------------
    def _on_executor_done(self, target: tuple[Future, _cf.Future]) -> None:
        self._cf_ready.append(target)
        if not self._cf_scheduled:
            self._cf_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._settle_executor_futures)
            except RuntimeError:
                self._settle_executor_futures()

    def _settle_executor_futures(self) -> None:
        import asyncio

        self._cf_scheduled = False
        batch = []
        while self._cf_ready:
            batch.append(self._cf_ready.popleft())
        finished = [(f, cf) for f, cf in batch if f._state.status is _FINISHED]
        failed = [(f, cf) for f, cf in batch if f._state.status is not _FINISHED]
        if failed:
            self._submit_settle(failed, {})
        if not finished:
            return
        hints = {f.key: f._state.workers for f, _ in finished if f._state.workers}
        keys = list(dict.fromkeys(f.key for f, _ in finished))

        async def fetch_then_settle() -> None:
            try:
                data = await self._fetch(keys, hints)
            except Exception as err:  # settle falls back to Future.result()
                logger.debug("client %s: executor fetch failed: %r", self.id, err)
                data = {}
            self._submit_settle(finished, data)

        if self._in_loop_thread():
            asyncio.ensure_future(fetch_then_settle())
        else:  # the loop is gone
            self._submit_settle(finished, {})

    def _submit_settle(self, pairs: list[tuple[Future, _cf.Future]], data: dict) -> None:
        try:
            self._callbacks().submit(_settle, pairs, data)
        except RuntimeError:  # the client is closed: its callback thread is gone
            _settle(pairs, data, may_block=False)

    # -- waiting ------------------------------------------------------------------------
    def _wait_states(self, states: list[_KeyState], deadline: float | None) -> None:
        """Block until every state is done; ``TimeoutError`` after ``deadline``."""
        cond = self._cond
        with cond:
            for st in states:
                while st.status is _PENDING:
                    if deadline is None:
                        cond.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if (remaining <= 0 or not cond.wait(remaining)) and st.status is _PENDING:
                        pending = sum(1 for s in states if s.status is _PENDING)
                        raise TimeoutError(
                            f"{pending} of {len(states)} future(s) still pending at the deadline"
                        )

    # -- creating futures -----------------------------------------------------------------
    def _new_futures(self, keys: list) -> tuple[list[Future], list]:
        """Futures for ``keys``, and the keys new to this client. Call with the lock held."""
        states = self._states
        refcount = self._refcount
        futures = []
        new = []
        for key in keys:
            st = states.get(key)
            if st is None or st.status is _CANCELLED:
                st = states[key] = _KeyState()
                new.append(key)
            refcount[key] = refcount.get(key, 0) + 1
            futures.append(Future(key, self, st))
        return futures, new

    def _check_running(self) -> None:
        if self._status is not _ClientStatus.RUNNING:
            raise SchedulerError(
                f"client {self.id} is {self._status.value}; create a new Client to submit work"
            )

    def _check_deps(self, deps: Mapping[Any, Future], key: Any) -> None:
        for dep in deps.values():
            if dep.client is not self:
                raise HPCError(
                    f"task {key!r} depends on future {dep.key!r} of another client "
                    f"({dep.client.id}); gather it and pass the value, or use one client"
                )
            if dep._state.status is _CANCELLED:
                raise _cf.CancelledError(
                    f"task {key!r} depends on future {dep.key!r}, which was cancelled"
                )

    def _serialization_error(
        self, key: Any, func: Any, args: tuple, kwargs: Mapping[str, Any], err: Exception
    ) -> SerializationError:
        """Name the part of a task that could not be serialized."""
        parts: list[tuple[str, Any]] = [("the function", func)]
        parts += [(f"argument {i}", a) for i, a in enumerate(args)]
        parts += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        for what, value in parts:
            if isinstance(value, Future):
                continue
            try:
                self._dumps(value)
            except Exception as part_err:
                return SerializationError(
                    f"cannot serialize task {key!r}: {what} ({type(value).__name__}) "
                    f"cannot be pickled: {part_err}"
                )
        return SerializationError(f"cannot serialize task {key!r}: {err}")

    def _build_task(
        self, func: Callable, args: tuple, kwargs: Mapping[str, Any], deps: dict[Any, Future]
    ) -> Any:
        quote = self._quote
        targs = [_pack(a, deps, quote) for a in args]
        if kwargs:
            tkw = (dict, [[k, _pack(v, deps, quote)] for k, v in kwargs.items()])
            return (self._apply, func, targs, tkw)
        return (func, *targs)

    # -- public API: submitting ---------------------------------------------------------
    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        key: Any = None,
        pure: bool = True,
        retries: int | None = None,
        workers: str | Iterable[str] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Future:
        """Run ``func(*args, **kwargs)`` on the cluster.

        Parameters
        ----------
        func
            The function to run; it is pickled (cloudpickle for lambdas and closures).
        *args, **kwargs
            Its arguments. Futures among them (also inside lists, tuples, sets and
            dicts) are dependencies: the task runs when they are done, with their
            results in their place.
        key
            The key of the result; default ``"<function name>-<token>"``.
        pure
            Whether the call is a pure function of its arguments: the token is then a
            hash of the function and arguments, so repeating a call reuses the result.
            With ``False`` every call gets a new random key.
        retries
            How often to rerun the task when it raises a retryable exception
            (``OSError`` by default, see ``distributed.retry-exceptions``).
        workers
            Addresses or names of the workers allowed to run the task.
        priority
            Higher runs earlier among tasks that are ready at the same time.

        Returns
        -------
        Future

        Raises
        ------
        SerializationError
            The function or an argument cannot be pickled (the message names which).
        """
        keys = None if key is None else [key]
        return self._map_calls(
            func, [args], kwargs, keys=keys, pure=pure, retries=retries,
            workers=workers, priority=priority,
        )[0]  # fmt: skip

    def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list | None = None,
        pure: bool = True,
        retries: int | None = None,
        workers: str | Iterable[str] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> list[Future]:
        """Run ``func`` on each element (of several iterables, zipped) in one batch.

        Parameters
        ----------
        func
            The function to run.
        *iterables
            Iterables of arguments (futures allowed, as in :meth:`submit`).
        key
            A key prefix (default the function name), or a list with one key per call.
        pure, retries, workers, priority, **kwargs
            As for :meth:`submit`, applied to every call.

        Returns
        -------
        list of Future
            One future per call, in order. The whole map is one message to the
            scheduler.
        """
        if not iterables:
            raise TypeError("map needs at least one iterable of arguments")
        arg_tuples = list(zip(*iterables, strict=False))
        keys = list(key) if isinstance(key, list) else None
        if keys is not None and len(keys) != len(arg_tuples):
            raise ValueError(f"map got {len(keys)} keys for {len(arg_tuples)} calls")
        prefix = key if isinstance(key, str) else None
        return self._map_calls(
            func, arg_tuples, kwargs, keys=keys, prefix=prefix, pure=pure,
            retries=retries, workers=workers, priority=priority,
        )  # fmt: skip

    def _map_calls(
        self,
        func: Callable[..., Any],
        arg_tuples: list[tuple],
        kwargs: Mapping[str, Any],
        *,
        keys: list | None = None,
        prefix: str | None = None,
        pure: bool = True,
        retries: int | None = None,
        workers: Any = None,
        priority: int = 0,
    ) -> list[Future]:
        """Submit ``func(*args, **kwargs)`` for each ``args``: one update-graph message."""
        self._check_running()
        if not callable(func):
            raise TypeError(f"the function to run must be callable, not {type(func).__name__}")
        if keys is None:
            prefix = prefix or _funcname(func)
            if pure:
                tokenize = self._tokenize
                base = tokenize(func, kwargs)
                keys = [f"{prefix}-{tokenize(base, *args)}" for args in arg_tuples]
            elif len(arg_tuples) == 1:
                keys = [f"{prefix}-{uuid.uuid4().hex}"]
            else:  # one random draw per batch: unique keys are all that is needed
                batch = uuid.uuid4().hex
                keys = [f"{prefix}-{batch}-{i}" for i in range(len(arg_tuples))]
        first: dict[Any, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        tasks: dict[Any, list] = {}
        dependencies: dict[Any, list] = {}
        held: dict[Any, Future] = {}  # keeps dependencies alive until the message is sent
        shipped = None
        while True:
            with self._cond:
                states = self._states
                todo = [
                    k
                    for k in first
                    if k not in tasks and ((st := states.get(k)) is None or st.status is _CANCELLED)
                ]
                if not todo:
                    # Every key is held by this client or has its task serialized: commit.
                    # (Serializing happens outside the lock, so a key held a moment ago
                    # may have been released since: the loop serializes it too.)
                    futures, new = self._new_futures(keys)
                    if new:
                        msg = self._graph_message(
                            new, tasks, dependencies, first, priority, retries, workers
                        )
                        self._outbox.append((True, msg))
                    break
            if shipped is None:
                shipped = _ship(func)
            for k in todo:
                args = arg_tuples[first[k]]
                deps: dict[Any, Future] = {}
                task = self._build_task(shipped, args, kwargs, deps)
                if deps:
                    self._check_deps(deps, k)
                    held.update(deps)
                try:
                    tasks[k] = self._dumps(task)
                except Exception as err:
                    raise self._serialization_error(k, func, args, kwargs, err) from err
                dependencies[k] = list(deps)
        if new:
            self._schedule_flush()
        return futures

    def _graph_message(
        self,
        send: list,
        tasks: Mapping[Any, list],
        dependencies: Mapping[Any, list],
        order: Mapping[Any, int],
        priority: int,
        retries: int | None,
        workers: Any,
        wanted: Iterable[Any] | None = None,
    ) -> dict[str, Any]:
        """The ``update-graph`` message creating the tasks ``send``."""
        gen = next(self._generation)
        prio = -int(priority)
        msg: dict[str, Any] = {
            "op": "update-graph",
            "tasks": {k: tasks[k] for k in send},
            "dependencies": {k: dependencies[k] for k in send},
            "keys": list(send) if wanted is None else list(wanted),
            "priority": {k: (prio, gen, order.get(k, 0)) for k in send},
            "client": self.id,
        }
        if retries:
            msg["retries"] = dict.fromkeys(send, int(retries))
        restrict = _as_worker_list(workers)
        if restrict:
            msg["workers"] = dict.fromkeys(send, restrict)
        return msg

    # -- public API: results --------------------------------------------------------------
    def gather(
        self,
        futures: Any,
        errors: Literal["raise", "skip"] = "raise",
        timeout: float | None = None,
    ) -> Any:
        """Wait for futures and return their results, in the same structure.

        Parameters
        ----------
        futures
            A future, or lists, tuples, sets and dicts of futures (nested as you
            like); other values are returned as they are.
        errors
            ``"raise"``: raise the first failed task's exception (original type, with
            the remote traceback as ``__cause__``). ``"skip"``: leave failed and
            cancelled futures out of the result lists/dicts (a lone future gives
            ``None``).
        timeout
            Seconds to wait for the tasks; ``TimeoutError`` afterwards.

        Returns
        -------
        The results in place of the futures. Data comes straight from the workers
        holding it, one request per worker.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")
        if isinstance(futures, Iterator):
            futures = list(futures)
        flat: list[Future] = []
        _collect_futures(futures, flat)
        deadline = None if timeout is None else time.monotonic() + timeout
        values = self._gather_flat(flat, errors, deadline)
        result = _rebuild(futures, {id(f): v for f, v in zip(flat, values, strict=True)})
        return None if result is _SKIP else result

    def _gather_flat(self, futures: list[Future], errors: str, deadline: float | None) -> list:
        """Results of ``futures`` in order; ``_SKIP`` for failed ones with ``"skip"``."""
        by_client: dict[Client, list[Future]] = defaultdict(list)
        for f in futures:
            f._check_not_released()
            by_client[f.client].append(f)
        for client, fs in by_client.items():
            client._wait_states([f._state for f in fs], deadline)
        if errors == "raise":
            for f in futures:
                if f._state.status is not _FINISHED:
                    f._raise_unfinished()
        results: dict[Any, Any] = {}
        for client, fs in by_client.items():
            keys = list(dict.fromkeys(f.key for f in fs if f._state.status is _FINISHED))
            if keys:
                results.update(client._fetch_keys(keys, deadline, errors))
        out = [results.get(f.key, _SKIP) for f in futures]
        if errors == "raise":
            for f, value in zip(futures, out, strict=True):
                if value is _SKIP:
                    f._raise_unfinished()  # failed while we were fetching
        return out

    def _fetch_keys(self, keys: list, deadline: float | None, errors: str = "raise") -> dict:
        """Fetch results from the workers, waiting for lost results to be recomputed."""
        data: dict[Any, Any] = {}
        missing = keys
        for _attempt in range(_FETCH_ATTEMPTS):
            with self._cond:
                hints = {}
                versions = {}
                for k in missing:
                    st = self._states.get(k)
                    if st is not None:
                        versions[k] = st.version
                        if st.workers:
                            hints[k] = st.workers
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            data.update(self._sync(self._fetch(missing, hints), remaining))
            missing = [k for k in missing if k not in data]
            if not missing:
                return data
            # The results we could not fetch were lost with their worker: wait for the
            # scheduler to report them again (or failed), then try again.
            until = time.monotonic() + _REFETCH_TIMEOUT
            if deadline is not None:
                until = min(until, deadline)
            pairs = []
            with self._cond:
                for k in missing:
                    st = self._states.get(k)
                    if st is None:  # released meanwhile: nothing to wait for
                        continue
                    while st.version == versions.get(k) and (left := until - time.monotonic()) > 0:
                        self._cond.wait(left)
                    pairs.append((k, st))
            self._wait_states([st for _, st in pairs], deadline)
            still = []
            for k, st in pairs:
                if st.status is _FINISHED:
                    still.append(k)
                elif errors == "raise":
                    raise _error_of(k, st)
            missing = still
            if not missing:
                return data
        raise SchedulerError(
            f"could not fetch {len(missing)} result(s) from the workers (e.g. {missing[0]!r}) "
            f"after {_FETCH_ATTEMPTS} attempts: the workers said to hold them do not"
        )

    async def _fetch(self, keys: list, hints: Mapping[Any, list[str]]) -> dict[Any, Any]:
        """Get the values of ``keys`` from workers: one ``get-data`` per worker.

        ``hints`` are workers that reported holding keys; keys without a hint, or not
        found where hinted, are looked up with ``who-has``.
        """
        import asyncio

        data: dict[Any, Any] = {}
        todo = list(keys)
        who_has = dict(hints)
        unknown = [k for k in todo if k not in who_has]
        for attempt in range(2):
            if unknown:
                who_has.update(await self._who_has(unknown))
            by_worker: dict[str, list] = defaultdict(list)
            for k in todo:
                holders = who_has.get(k)
                if holders:
                    by_worker[holders[0] if len(holders) == 1 else random.choice(holders)].append(k)
            if by_worker:
                replies = await asyncio.gather(
                    *(self._get_data(w, ks) for w, ks in by_worker.items()),
                    return_exceptions=True,
                )
                for worker, reply in zip(by_worker, replies, strict=True):
                    if isinstance(reply, BaseException):
                        logger.info(
                            "client %s: get-data from %s failed: %r", self.id, worker, reply
                        )
                    else:
                        data.update(reply)
            todo = [k for k in todo if k not in data]
            if not todo or attempt:
                break
            # Some hints were stale (the data moved or its worker died): ask the
            # scheduler where those keys are now.
            unknown = todo
            who_has = {}
        return data

    async def _get_data(self, worker: str, keys: list) -> dict[Any, Any]:
        replies = await self._worker_rpc(worker, [{"op": "get-data", "keys": keys}])
        reply = replies[0]
        if reply.get("op") != "data":
            raise SchedulerError(f"worker {worker} answered get-data with {reply!r}")
        return dict(reply["data"])

    async def _worker_rpc(self, worker: str, msgs: list[dict]) -> list[dict]:
        """Send requests to a worker and read the replies, on a pooled direct connection."""
        from runtime import comm

        idle = self._worker_comms[worker]
        while True:
            pooled = bool(idle)
            if pooled:
                conn = idle.pop()
            else:
                conn = await comm.connect(
                    worker, self._secret, timeout=self._timeout, hello={"client": self.id}
                )
            try:
                await _maybe_await(conn.write(msgs))
                replies = await conn.read()
            except Exception:
                await _close_quietly(conn)
                if pooled:
                    continue  # an idle connection may have gone stale: try another
                raise
            if self._status is _ClientStatus.CLOSED or len(idle) >= 4:
                await _close_quietly(conn)
            else:
                idle.append(conn)
            return list(replies)

    async def _who_has(self, keys: list) -> dict[Any, list[str]]:
        if not keys:
            return {}
        reply = await self._request({"op": "who-has", "keys": list(keys)})
        return {k: list(v) for k, v in reply.get("who_has", {}).items() if v}

    # -- public API: data ----------------------------------------------------------
    def scatter(
        self,
        data: Any,
        workers: str | Iterable[str] | None = None,
        broadcast: bool = False,
        hash: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """Move local data into worker memory and return futures for it.

        Parameters
        ----------
        data
            One object (one future back), a list/tuple/set of objects (a list of
            futures), or a dict (futures under the same keys; the dict keys become the
            cluster keys).
        workers
            Addresses of the workers to place data on; default all workers.
        broadcast
            Put every object on every (chosen) worker instead of spreading them.
        hash
            Derive keys from the data's content (scattering the same data twice gives
            the same key); with ``False`` keys are random.
        timeout
            Seconds to wait for the workers.

        Returns
        -------
        Future, list of Future, or dict of Future
        """
        self._check_running()
        single = not isinstance(data, (list, tuple, set, frozenset, dict))
        if isinstance(data, dict):
            items = dict(data)
        else:
            values = [data] if single else list(data)
            if hash:
                keys = [f"{_typename(v)}-{self._tokenize(v)}" for v in values]
            else:
                keys = [f"{_typename(v)}-{uuid.uuid4().hex}" for v in values]
            items = dict(zip(keys, values, strict=True))
        if isinstance(data, dict):
            keys = list(items)
        restrict = _as_worker_list(workers)
        who_has, nbytes = self._sync(
            self._scatter(items, restrict, broadcast), timeout or self._timeout
        )
        with self._cond:
            futures, _ = self._new_futures(keys)
            for k, v in items.items():
                st = self._states[k]
                st.workers = who_has[k]
                st.nbytes = nbytes[k]
                st.type = _typename(v)
                if st.status is not _FINISHED:
                    self._transition(st, _FINISHED)
            self._outbox.append(
                (
                    True,
                    {"op": "update-data", "who_has": who_has, "nbytes": nbytes, "client": self.id},
                )
            )
            self._cond.notify_all()
        self._schedule_flush()
        if isinstance(data, dict):
            return dict(zip(keys, futures, strict=True))
        return futures[0] if single else futures

    async def _scatter(
        self, data: dict[Any, Any], workers: list[str] | None, broadcast: bool
    ) -> tuple[dict[Any, list[str]], dict[Any, int]]:
        import asyncio

        if workers is None:
            workers = list((await self._scheduler_info())["workers"])
        if not workers:
            raise SchedulerError(
                f"cannot scatter: the scheduler at {self.scheduler_address} has no workers yet"
            )
        if broadcast:
            plan = {w: dict(data) for w in workers}
        else:
            plan = defaultdict(dict)
            first = random.randrange(len(workers))
            for i, (k, v) in enumerate(data.items()):
                plan[workers[(first + i) % len(workers)]][k] = v
        replies = await asyncio.gather(
            *(self._worker_rpc(w, [{"op": "update-data", "data": d}]) for w, d in plan.items())
        )
        who_has: dict[Any, list[str]] = defaultdict(list)
        nbytes: dict[Any, int] = {}
        for (w, d), reply in zip(plan.items(), replies, strict=True):
            ack = reply[0] if reply else {}
            if ack.get("op") != "ok":
                raise SchedulerError(f"worker {w} refused scattered data: {ack!r}")
            sizes = ack.get("nbytes") or {}
            for k, v in d.items():
                who_has[k].append(w)
                nbytes[k] = int(sizes.get(k, _nbytes(v)))
        return dict(who_has), nbytes

    def cancel(self, futures: Any) -> None:
        """Cancel futures: pending tasks do not run, finished results are freed.

        Every future of the same key becomes ``cancelled``; waiting on it raises
        :class:`concurrent.futures.CancelledError`.
        """
        flat: list[Future] = []
        _collect_futures(futures, flat)
        keys = []
        with self._cond:
            for f in flat:
                st = f._state
                if st.status is not _CANCELLED:
                    self._transition(st, _CANCELLED)
                    keys.append(f.key)
            self._cond.notify_all()
        if keys:
            self._send({"op": "cancel-keys", "keys": list(dict.fromkeys(keys)), "client": self.id})

    def who_has(self, futures: Any = None) -> dict[Any, list[str]]:
        """Return which workers hold the results of ``futures`` (default: all of ours)."""
        if futures is None:
            with self._cond:
                keys = list(self._states)
        else:
            flat: list[Future] = []
            _collect_futures(futures, flat)
            keys = list(dict.fromkeys(f.key for f in flat))
        return dict(self._sync(self._who_has(keys), self._timeout))

    # -- public API: collections and graphs --------------------------------------------------
    def _submit_graph(
        self,
        dsk: Mapping[Any, Any],
        wanted: list,
        *,
        priority: int = 0,
        retries: int | None = None,
        workers: Any = None,
        checkpoint: Any = None,
    ) -> list[Future]:
        """Send a graph; return futures for the ``wanted`` keys (in order).

        ``checkpoint``: a directory or ``CheckpointSpec`` (see ``runtime.checkpoint``);
        the identity tokens go along with the graph (``update-graph``'s ``checkpoint``).
        """
        from runtime import graph

        self._check_running()
        held: dict[Any, Future] = {}  # keys computed already, held as futures
        ext: dict[Any, Future] = {}  # futures the tasks refer to
        plain: dict[Any, Any] = {}
        for k, task in dsk.items():
            if isinstance(task, Future):
                if task.key == k:
                    held[k] = task
                    continue
                ext[task.key] = task
                plain[k] = task.key  # an alias of the future's key
                continue
            plain[k] = _graph_futures(task, ext, graph.literal)
        self._check_deps({**held, **ext}, "of the graph")
        external = {**held, **ext}
        order = graph.order(plain) if plain else {}
        missing = [k for k in wanted if k not in plain and k not in held]
        if missing:
            raise GraphError(f"cannot compute {missing[0]!r}: it is not a key of the graph")
        spec = None
        if checkpoint is not None:
            from runtime.checkpoint import checkpoint_spec

            # Results held as futures have no identity: what uses them is not stored.
            spec = checkpoint_spec(checkpoint, plain, wanted, inputs=dict.fromkeys(external))
        tasks: dict[Any, list] = {}
        dependencies: dict[Any, list] = {}
        while True:
            with self._cond:
                states = self._states
                live = {
                    k
                    for k in plain
                    if (st := states.get(k)) is not None and st.status is not _CANCELLED
                }
                todo = [k for k in plain if k not in live and k not in tasks]
                if not todo:
                    # Atomically with creating the futures: tasks of keys this client
                    # holds are not sent again (see _map_calls for why this loops).
                    send = [k for k in tasks if k not in live]
                    futures, new = self._new_futures(wanted)
                    if send:
                        msg = self._graph_message(
                            send, tasks, dependencies, order, priority, retries, workers, new
                        )
                        if spec is not None:
                            msg["checkpoint"] = spec.message(send)
                        self._outbox.append((True, msg))
                    break
            for k in todo:
                task = plain[k]
                deps = list(graph.get_dependencies(plain, k, as_list=True))
                if external:
                    deps += [d for d in _refs_to(task, external) if d not in deps]
                try:
                    tasks[k] = self._dumps(task)
                except Exception as err:
                    raise SerializationError(f"cannot serialize task {k!r}: {err}") from err
                dependencies[k] = deps
        if send:
            self._schedule_flush()
        return futures

    def get(
        self,
        dsk: Mapping[Any, Any],
        keys: Any,
        *,
        priority: int = 0,
        retries: int | None = None,
        workers: Any = None,
        timeout: float | None = None,
        checkpoint: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run a task graph on the cluster and return the values of ``keys``.

        The scheduler-function form: ``client.get`` can be passed wherever a ``get``
        is expected (``hpc.compute(x, scheduler=client.get)``).

        Parameters
        ----------
        dsk
            A graph in the classic dict form (``{key: task}``).
        keys
            A key, or (nested) lists of keys; the result has the same structure.
        priority, retries, workers
            As for :meth:`submit`.
        timeout
            Seconds to wait for the results.
        checkpoint
            A directory every worker shares: reuse the task results checkpointed
            there, checkpoint the others (``runtime.checkpoint``). Default: the
            cluster's ``checkpoint`` (e.g. ``LocalCluster(checkpoint=DIR)``), else
            the ``checkpoint.directory`` config value; ``False``: none.
        **kwargs
            Options of the local schedulers (e.g. ``num_workers``); ignored.
        """
        flat = list(dict.fromkeys(_flatten_keys(keys, [])))
        target = self._checkpoint_for(checkpoint)
        futures = self._submit_graph(
            dsk, flat, priority=priority, retries=retries, workers=workers, checkpoint=target
        )
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            values = self._gather_flat(futures, "raise", deadline)
            return _pack_keys(keys, dict(zip(flat, values, strict=True)))
        finally:
            for f in futures:
                f.release()

    def compute(
        self,
        collections: Any,
        sync: bool = False,
        optimize_graph: bool = True,
        priority: int = 0,
        retries: int | None = None,
        workers: Any = None,
        checkpoint: Any = None,
    ) -> Any:
        """Start computing collections (objects with Dask's collection protocol).

        Parameters
        ----------
        collections
            One collection, or a list/tuple of them; other values pass through.
        sync
            Wait and return results instead of futures.
        optimize_graph
            Cull the graph to what the collections need (and fuse linear chains when
            ``optimization.fuse`` is set).
        priority, retries, workers
            As for :meth:`submit`, for every task of the graph.
        checkpoint
            As for :meth:`get`. Checkpointed graphs are not fused.

        Returns
        -------
        A future per collection (in the same shape), or the results with ``sync=True``.
        """
        single = not isinstance(collections, (list, tuple))
        items = [collections] if single else list(collections)
        positions = [i for i, c in enumerate(items) if _is_collection(c)]
        out = list(items)
        if positions:
            colls = [items[i] for i in positions]
            target = self._checkpoint_for(checkpoint)
            dsk, key_lists = self._collections_graph(colls, optimize_graph, target is None)
            finals = []
            for c, keys in zip(colls, key_lists, strict=True):
                func, extra = c.__dask_postcompute__()
                if not extra and _is_first(func) and type(keys) is list and len(keys) == 1:
                    finals.append(keys[0])  # the result is that key's value: no extra task
                    continue
                name = f"finalize-{self._tokenize(keys, func, *extra)}"
                dsk[name] = (func, keys, *(self._quote(e) for e in extra))
                finals.append(name)
            futures = self._submit_graph(
                dsk, finals, priority=priority, retries=retries, workers=workers, checkpoint=target
            )
            for i, f in zip(positions, futures, strict=True):
                out[i] = f
        if sync:
            out = self.gather(out)
        return out[0] if single else (type(collections)(out) if sync else out)

    def persist(
        self,
        collections: Any,
        optimize_graph: bool = True,
        priority: int = 0,
        retries: int | None = None,
        workers: Any = None,
        checkpoint: Any = None,
    ) -> Any:
        """Start computing collections; return equivalent ones backed by futures.

        The results stay in cluster memory while the returned objects (or the futures
        inside them) are alive; drop them to free that memory. ``checkpoint`` is as
        for :meth:`get`.

        Returns
        -------
        One persisted collection per input, in the same shape; other values pass
        through.
        """
        single = not isinstance(collections, (list, tuple))
        items = [collections] if single else list(collections)
        positions = [i for i, c in enumerate(items) if _is_collection(c)]
        out = list(items)
        if positions:
            colls = [items[i] for i in positions]
            target = self._checkpoint_for(checkpoint)
            dsk, key_lists = self._collections_graph(colls, optimize_graph, target is None)
            flat = list(dict.fromkeys(_flatten_keys(key_lists, [])))
            futures = self._submit_graph(
                dsk, flat, priority=priority, retries=retries, workers=workers, checkpoint=target
            )
            by_key = dict(zip(flat, futures, strict=True))
            for i, c, keys in zip(positions, colls, key_lists, strict=True):
                rebuild, extra = c.__dask_postpersist__()
                out[i] = rebuild({k: by_key[k] for k in _flatten_keys(keys, [])}, *extra)
        return out[0] if single else out

    def _checkpoint_for(self, checkpoint: Any) -> Any:
        """``checkpoint=`` of a computation, resolved: given, the cluster's, or config's."""
        return _checkpoint_target(self._checkpoint_default if checkpoint is None else checkpoint)

    def _collections_graph(
        self, colls: list, optimize: bool, fuse: bool = True
    ) -> tuple[dict, list]:
        # The same graph hpc.compute builds (runtime.compute), so both paths agree.
        from runtime.compute import _collections_to_graph, _optimize

        dsk, key_lists = _collections_to_graph(colls)
        if optimize:
            dsk = _optimize(dsk, key_lists, fuse=fuse)
        return dict(dsk), key_lists

    # -- public API: the cluster -----------------------------------------------------------
    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Iterable[str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Call ``function(*args, **kwargs)`` once in every worker process.

        Runs outside the task system (not scheduled, not retried): for setup and
        inspection. A ``dask_worker`` parameter of ``function`` receives the worker.

        Returns
        -------
        dict
            ``{worker address: return value}``.

        Raises
        ------
        Exception
            The first exception a worker raised, with its remote traceback.
        """
        self._check_running()
        try:
            payload = self._dumps((function, args, kwargs))
        except Exception as err:
            raise SerializationError(
                f"cannot serialize the function given to run ({_funcname(function)}): {err}"
            ) from err
        targets = None if workers is None else list(workers)
        return dict(self._sync(self._run(payload, _funcname(function), targets), timeout))

    async def _run(self, payload: list, name: str, workers: list[str] | None) -> dict[str, Any]:
        import asyncio

        if workers is None:
            workers = list((await self._scheduler_info())["workers"])
        replies = await asyncio.gather(
            *(self._worker_rpc(w, [{"op": "run", "function": payload}]) for w in workers)
        )
        results = {}
        for worker, reply in zip(workers, replies, strict=True):
            msg = reply[0] if reply else {}
            if str(msg.get("status", "")).upper() != "OK":
                msg.setdefault("worker", worker)
                raise _RemoteError(f"run:{name}", msg).get()
            results[worker] = msg.get("result")
        return results

    def scheduler_info(self) -> dict[str, Any]:
        """Return the scheduler's description of its workers.

        Returns
        -------
        dict
            ``{"address": ..., "workers": {address: {"name", "nthreads",
            "memory_limit", "pid", "host", ...}}, ...}``.
        """
        self._check_running()
        return dict(self._sync(self._scheduler_info(), self._timeout))

    async def _scheduler_info(self) -> dict[str, Any]:
        reply = await self._request({"op": "scheduler-info"})
        info = {k: v for k, v in reply.items() if k not in ("op", "status", "id")}
        info.setdefault("address", self.scheduler_address)
        workers = info.get("workers") or {}
        if isinstance(workers, list):  # a list of worker records: key them by address
            workers = {w["address"]: w for w in workers}
        info["workers"] = dict(workers)
        return info

    def retire_workers(self, workers: Sequence[str]) -> list[str]:
        """Close the given workers (by address or name); return the addresses retired.

        Tasks running there are rescheduled and results only they held are recomputed
        from the graph when needed, so nothing is lost, though work may be repeated.
        """
        self._check_running()
        reply = self._sync(
            self._request({"op": "retire-workers", "workers": list(workers)}), self._timeout
        )
        return list(reply.get("workers") or [])

    def get_executor(self, **kwargs: Any) -> ClientExecutor:
        """Return a :class:`concurrent.futures.Executor` that runs calls on this client.

        Parameters
        ----------
        **kwargs
            Options applied to every call: ``pure`` (default ``False``), ``retries``,
            ``workers``, ``priority``.
        """
        return ClientExecutor(self, **kwargs)

    @contextmanager
    def as_current(self) -> Iterator[Client]:
        """Make this the client :func:`get_default_client` returns, within a ``with``."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    # -- closing ------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``"connecting"``, ``"running"``, ``"closing"`` or ``"closed"``."""
        return self._status.value

    def close(self, timeout: float | None = None) -> None:
        """Disconnect; the scheduler forgets this client's futures. Idempotent.

        Futures of this client fail with :class:`~runtime.errors.SchedulerError` from
        now on. A cluster the client started itself is closed too.
        """
        self._close_client(shutdown=False, timeout=timeout)

    def shutdown(self) -> None:
        """Stop the scheduler and all its workers, then close this client."""
        cluster = self._cluster
        self._close_client(shutdown=True, timeout=None)
        if cluster is not None and not self._owns_cluster:
            cluster.close()

    def _close_client(self, shutdown: bool, timeout: float | None) -> None:
        if self._status in (_ClientStatus.CLOSING, _ClientStatus.CLOSED):
            return
        self._status = _ClientStatus.CLOSING
        _unset_default(self)
        try:
            self._sync(self._close(shutdown), timeout or self._timeout)
        except Exception as err:  # closing must not fail because the peer is gone
            logger.debug("client %s: error while closing: %r", self.id, err)
        finally:
            self._status = _ClientStatus.CLOSED
            closed = SchedulerError(f"client {self.id} is closed")
            self._fail_all(closed)
            if self._callback_pool is not None:
                self._callback_pool.shutdown(wait=False)
            if self._owns_cluster and self._cluster is not None:
                self._cluster.close()

    async def _close(self, shutdown: bool) -> None:
        self._flush()  # releases and messages queued before closing go out first
        bsend = self._bsend
        if bsend is not None:
            last = {"op": "shutdown"} if shutdown else {"op": "close-client", "client": self.id}
            with contextlib.suppress(Exception):
                bsend.send(last)
            close = getattr(bsend, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await _maybe_await(close())
        if self._reader is not None:
            self._reader.cancel()
        if self._comm is not None:
            await _close_quietly(self._comm)
        self._fail_requests(SchedulerError(f"client {self.id} is closed"))
        for idle in self._worker_comms.values():
            while idle:
                await _close_quietly(idle.pop())

    def __enter__(self) -> Client:
        _set_default(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.id!r} scheduler={self.scheduler_address!r} {self._status.value}>"


def _checkpoint_target(checkpoint: Any) -> Any:
    """``checkpoint=`` resolved: a directory or spec, or None (config, if not given)."""
    if checkpoint is False or (
        checkpoint is None and _config("checkpoint.directory", None) is None
    ):
        return None  # the common case: no need to import runtime.checkpoint
    from runtime.checkpoint import checkpoint_target

    return checkpoint_target(checkpoint)


def _info_field(info: Any, name: str) -> Any:
    if isinstance(info, Mapping):
        return info[name]
    return getattr(info, name)


def _resolve_future(future: Any, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _same_job(info: Mapping[str, Any]) -> bool:
    """Whether this process runs inside the batch job whose scheduler wrote ``info``."""
    from runtime.rendezvous import current_job_id

    job = info.get("job_id")
    return bool(job) and str(job) == current_job_id()


def _await_scheduler_file(
    path: str,
    previous: Mapping[str, Any],
    timeout: float | None,
    *,
    closed: Callable[[], bool] = lambda: False,
) -> dict[str, Any] | None:
    """Wait until ``path`` names a scheduler other than ``previous``; ``None`` at the timeout.

    ``closed`` ends the wait early (the client was closed meanwhile).

    Runs in a helper thread: it polls the file (a stat every half second) because the
    successor may start on another node, seen only through the shared filesystem.
    """
    from runtime.errors import SchedulerError as _SchedulerError
    from runtime.rendezvous import read_scheduler_file, same_scheduler

    deadline = None if timeout is None else time.monotonic() + timeout
    while (deadline is None or time.monotonic() < deadline) and not closed():
        if os.path.exists(path):
            try:
                info = read_scheduler_file(path)
            except _SchedulerError:  # being replaced, or not ours: look again
                info = None
            if info is not None and not same_scheduler(info, previous):
                return info
        time.sleep(0.5)  # polling a shared filesystem, with the caller's deadline
    return None


def _call_logged(fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        fn(arg)
    except Exception:
        logger.exception("future callback %r raised", fn)


def _error_of(key: Any, st: _KeyState) -> BaseException:
    if st.status is _CANCELLED:
        return _cf.CancelledError(f"future {key!r} was cancelled")
    return st.exception()


def _refs_to(task: Any, keys: Mapping[Any, Any]) -> list:
    """The keys of ``keys`` that ``task`` refers to (as the executor would read it)."""
    found = []
    stack = [task]
    while stack:
        t = stack.pop()
        typ = type(t)
        if typ is list or (typ is tuple and t and callable(t[0])):
            stack.extend(t)
            continue
        try:
            if t in keys:
                found.append(t)
        except TypeError:  # unhashable values are data
            pass
    return found


class _ShippedFunction:
    """A function sent by value, pickled once for a whole batch of tasks.

    cloudpickle costs tens of microseconds per lambda or closure; tasks of one ``map``
    share these bytes instead, and unpickling on the worker yields the function itself
    (cached by :func:`runtime.serialize.loads_function`), so no wrapper is called.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        # Stored reversed: runtime.serialize re-pickles with cloudpickle (about 3x
        # slower) any stream containing b"__main__", which the bytes of a function
        # from a script do. Reversed, they (almost surely) do not; if they still
        # did, only speed would suffer.
        self.data = data[::-1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _load_function(self.data)(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (_load_function, (self.data,))


def _load_function(reversed_data: bytes) -> Callable[..., Any]:
    from runtime.serialize import loads_function

    return loads_function(reversed_data[::-1])


def _ship(func: Any) -> Any:
    """``func``, or a :class:`_ShippedFunction` when it would be pickled by value."""
    if not isinstance(func, types.FunctionType):
        return func
    if func.__module__ != "__main__" and "<" not in func.__qualname__:
        return func  # pickled by reference: a few bytes, nothing to save
    from runtime.serialize import dumps_function

    try:
        return _ShippedFunction(dumps_function(func))
    except Exception:  # let the per-task serialization report it, naming the task
        return func


def _typename(value: Any) -> str:
    return type(value).__name__


def _is_first(func: Any) -> bool:
    """Whether ``func`` is ``Delayed``'s finalizer that just takes the only result."""
    delayed = sys.modules.get("runtime.delayed")
    return delayed is not None and func is getattr(delayed, "_first", None)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):
        await _maybe_await(conn.close())


def _settle(
    pairs: list[tuple[Future, _cf.Future]], data: Mapping[Any, Any], may_block: bool = True
) -> None:
    """Give executor futures their outcome (in the client's callback thread).

    With ``may_block=False`` (the callback thread is gone and this runs wherever the
    future completed, maybe under the client lock) nothing is fetched or waited for.
    """
    for future, cf in pairs:
        st = future._state
        try:
            if st.status is _CANCELLED:
                cf.cancel()
            elif cf.set_running_or_notify_cancel():
                if st.status is _FINISHED and future.key in data:
                    cf.set_result(data[future.key])
                elif st.status is _ERROR:
                    cf.set_exception(st.exception())
                elif may_block:
                    try:
                        cf.set_result(future.result())
                    except BaseException as err:
                        cf.set_exception(err)
                else:
                    cf.set_exception(
                        SchedulerError(f"client closed before the result of {future.key!r} arrived")
                    )
        except _cf.InvalidStateError:  # settled already (e.g. cancelled meanwhile)
            pass
        finally:
            vars(cf).pop("_hpc_future", None)
            future.release()


def _is_collection(obj: object) -> bool:
    if isinstance(obj, type):
        return False
    return callable(getattr(obj, "__dask_graph__", None))


# -- packing results back into their structure -------------------------------------------

_SKIP = object()


def _collect_futures(obj: Any, out: list[Future]) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _collect_futures(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_futures(v, out)


def _rebuild(obj: Any, values: Mapping[int, Any]) -> Any:
    if isinstance(obj, Future):
        return values[id(obj)]
    typ = type(obj)
    if typ is list or typ is tuple or typ is set or typ is frozenset:
        items = [_rebuild(v, values) for v in obj]
        return typ(v for v in items if v is not _SKIP)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            r = _rebuild(v, values)
            if r is not _SKIP:
                out[k] = r
        return out if typ is dict else typ(out)
    return obj


def _pack_keys(keys: Any, results: Mapping[Any, Any]) -> Any:
    if type(keys) is list:
        return [_pack_keys(k, results) for k in keys]
    return results[keys]


# -- waiting on many futures ----------------------------------------------------------------


class DoneAndNotDoneFutures(NamedTuple):
    """What :func:`wait` returns: the futures that are done, and the others."""

    done: set[Future]
    not_done: set[Future]


class _Waiter:
    """Counts completions of a set of futures; wakes one waiting thread."""

    def __init__(self, return_when: str, pending: int) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.return_when = return_when
        self.pending = pending

    def __call__(self, future: Future) -> None:
        with self.lock:
            self.pending -= 1
            status = future._state.status
            if (
                self.pending <= 0
                or self.return_when == FIRST_COMPLETED
                or (self.return_when == FIRST_EXCEPTION and status is _ERROR)
            ):
                self.event.set()


def wait(
    futures: Future | Iterable[Future],
    timeout: float | None = None,
    return_when: str = ALL_COMPLETED,
) -> DoneAndNotDoneFutures:
    """Wait until futures are done.

    Parameters
    ----------
    futures
        A future or an iterable of futures (from one client or several).
    timeout
        Seconds to wait. As in Dask, running out of time raises ``TimeoutError``
        (``concurrent.futures.wait`` would return instead).
    return_when
        ``ALL_COMPLETED`` (default), ``FIRST_COMPLETED``, or ``FIRST_EXCEPTION`` (the
        first failed future, else all).

    Returns
    -------
    DoneAndNotDoneFutures
        ``(done, not_done)`` sets.
    """
    if return_when not in _RETURN_WHEN:
        raise ValueError(f"return_when must be one of {_RETURN_WHEN}, not {return_when!r}")
    fs = [futures] if isinstance(futures, Future) else list(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == ALL_COMPLETED:
        by_client: dict[Client, list[_KeyState]] = defaultdict(list)
        for f in fs:
            by_client[f.client].append(f._state)
        for client, states in by_client.items():
            client._wait_states(states, deadline)
        return DoneAndNotDoneFutures(set(fs), set())

    def split() -> DoneAndNotDoneFutures:
        done = {f for f in fs if f._state.status is not _PENDING}
        return DoneAndNotDoneFutures(done, set(fs) - done)

    result = split()
    if _wait_satisfied(result, return_when) or not fs:
        return result
    waiter = _Waiter(return_when, len(result.not_done))
    watched = []
    try:
        for f in result.not_done:
            f.client._watch(f, waiter)
            watched.append(f)
        if not waiter.event.wait(None if deadline is None else max(deadline - time.monotonic(), 0)):
            raise TimeoutError(f"timed out after {timeout} s waiting for futures ({return_when})")
    finally:
        for f in watched:
            f.client._unwatch(f, waiter)
    return split()


def _wait_satisfied(result: DoneAndNotDoneFutures, return_when: str) -> bool:
    if not result.not_done:
        return True
    if return_when == FIRST_COMPLETED:
        return bool(result.done)
    return any(f._state.status is _ERROR for f in result.done)


class AsCompleted:
    """Iterate over futures in the order they complete; more can be added meanwhile.

    Use :func:`as_completed` to make one.
    """

    def __init__(
        self,
        futures: Iterable[Future] = (),
        with_results: bool = False,
        raise_errors: bool = True,
        timeout: float | None = None,
    ) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[Future] = deque()
        self._results: deque[tuple[Future, Any]] = deque()
        self._pending = 0
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self.update(futures)

    def add(self, future: Future) -> None:
        """Add a future to iterate over once it completes."""
        if not isinstance(future, Future):
            raise TypeError(f"as_completed takes Future objects, not {type(future).__name__}")
        with self._cond:
            self._pending += 1
        future.client._watch(future, self._on_done)

    def update(self, futures: Iterable[Future]) -> None:
        """Add several futures."""
        for f in futures:
            self.add(f)

    def _on_done(self, future: Future) -> None:
        with self._cond:
            self._pending -= 1
            self._ready.append(future)
            self._cond.notify_all()

    def count(self) -> int:
        """The number of futures not yet yielded."""
        with self._cond:
            return self._pending + len(self._ready) + len(self._results)

    def __len__(self) -> int:
        return self.count()

    def is_empty(self) -> bool:
        """Whether every future has been yielded."""
        return self.count() == 0

    def has_ready(self) -> bool:
        """Whether a future can be yielded without waiting."""
        with self._cond:
            return bool(self._ready or self._results)

    def clear(self) -> None:
        """Forget all futures not yet yielded."""
        with self._cond:
            self._ready.clear()
            self._results.clear()
            self._pending = 0
            self._cond.notify_all()

    def __iter__(self) -> AsCompleted:
        return self

    def __next__(self) -> Any:
        if self.with_results:
            if not self._results:
                batch = self._take(block=True, batch=True)
                if not batch:
                    raise StopIteration
                self._results.extend(self._with_results(batch))
            future, value = self._results.popleft()
            if isinstance(value, _Failure):
                if self.raise_errors:
                    raise value.error
                return future, value.error
            return future, value
        batch = self._take(block=True, batch=False)
        if not batch:
            raise StopIteration
        return batch[0]

    def next_batch(self, block: bool = True) -> list[Any]:
        """Everything ready now (waiting for at least one if ``block``)."""
        out = []
        if self.with_results:
            while self._results:
                out.append(self.__next__())
            if out:
                return out
        batch = self._take(block=block, batch=True)
        if not self.with_results:
            return batch
        self._results.extend(self._with_results(batch))
        while self._results:
            out.append(self.__next__())
        return out

    def batches(self) -> Iterator[list[Any]]:
        """Yield lists of completed futures (or ``(future, result)`` pairs)."""
        while True:
            batch = self.next_batch(block=True)
            if not batch:
                return
            yield batch

    def _take(self, block: bool, batch: bool) -> list[Future]:
        with self._cond:
            while not self._ready:
                if not block or self._pending == 0:
                    return []
                if self._deadline is None:
                    self._cond.wait()
                else:
                    remaining = self._deadline - time.monotonic()
                    if (remaining <= 0 or not self._cond.wait(remaining)) and not self._ready:
                        raise TimeoutError(
                            f"as_completed: {self._pending} future(s) still pending "
                            f"after {self._timeout} s"
                        )
            if batch:
                out = list(self._ready)
                self._ready.clear()
                return out
            return [self._ready.popleft()]

    def _with_results(self, futures: list[Future]) -> list[tuple[Future, Any]]:
        ok = [f for f in futures if f._state.status is _FINISHED]
        values: dict[int, Any] = {}
        if ok:
            by_client: dict[Client, list[Future]] = defaultdict(list)
            for f in ok:
                by_client[f.client].append(f)
            for client, fs in by_client.items():
                try:
                    got = client._gather_flat(fs, "skip", None)
                except Exception as err:  # e.g. the result could not be fetched
                    got = [_Failure(err)] * len(fs)
                values.update((id(f), v) for f, v in zip(fs, got, strict=True))
        out = []
        for f in futures:
            if id(f) in values and values[id(f)] is not _SKIP:
                out.append((f, values[id(f)]))
            else:
                out.append((f, _Failure(_error_of(f.key, f._state))))
        return out


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def as_completed(
    futures: Iterable[Future] = (),
    with_results: bool = False,
    raise_errors: bool = True,
    *,
    timeout: float | None = None,
) -> AsCompleted:
    """Iterate over futures as they complete.

    Parameters
    ----------
    futures
        The futures to watch; more can be added with ``add``/``update`` while
        iterating.
    with_results
        Yield ``(future, result)`` pairs; results of futures completing together are
        fetched in one request per worker.
    raise_errors
        With ``with_results``: raise a failed future's exception when it comes up
        (default) or yield ``(future, exception)``.
    timeout
        Seconds from now after which iteration raises ``TimeoutError``.

    Examples
    --------
    >>> ac = as_completed(client.map(inc, range(3)))      # doctest: +SKIP
    >>> for future in ac:                                   # doctest: +SKIP
    ...     if future.result() < 10:
    ...         ac.add(client.submit(inc, future))
    """
    return AsCompleted(
        futures, with_results=with_results, raise_errors=raise_errors, timeout=timeout
    )


# -- concurrent.futures view ----------------------------------------------------------------


class ClientExecutor(_cf.Executor):
    """A :class:`concurrent.futures.Executor` running calls on a :class:`Client`.

    ``submit`` returns real :class:`concurrent.futures.Future` objects, so
    ``concurrent.futures.wait``/``as_completed`` and code written for any executor work
    unchanged. Results are fetched as tasks finish (one request per worker for
    everything that finished together) and then released from cluster memory.
    Cancelling the returned future cancels the task.

    Parameters
    ----------
    client
        The client to run on.
    pure
        Default ``False`` (an executor call is expected to run every time).
    retries, workers, priority
        As for :meth:`Client.submit`.
    """

    def __init__(
        self,
        client: Client,
        *,
        pure: bool = False,
        retries: int | None = None,
        workers: Any = None,
        priority: int = 0,
    ) -> None:
        self._client = client
        self._options: dict[str, Any] = {
            "pure": pure,
            "retries": retries,
            "workers": workers,
            "priority": priority,
        }
        self._lock = threading.Lock()
        self._shutdown = False
        self._futures: set[_cf.Future] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _cf.Future:
        """Schedule ``fn(*args, **kwargs)``; return a ``concurrent.futures.Future``."""
        self._check_open()
        return self._link(self._client._map_calls(fn, [args], kwargs, **self._options))[0]

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`; all calls go in one message.

        ``chunksize`` is accepted for compatibility and ignored: calls are batched
        anyway.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        fs = self._link(
            self._client._map_calls(fn, list(zip(*iterables, strict=False)), {}, **self._options)
        )

        def results() -> Iterator[Any]:
            try:
                fs.reverse()
                while fs:
                    f = fs.pop()
                    if deadline is None:
                        yield f.result()
                    else:
                        yield f.result(max(deadline - time.monotonic(), 0))
            finally:
                for f in fs:
                    f.cancel()

        return results()

    def _link(self, futures: list[Future]) -> list[_cf.Future]:
        out = []
        client = self._client
        for f in futures:
            cf: _cf.Future = _cf.Future()
            out.append(cf)
            # The client future stays with its twin until the outcome is set (see
            # _settle), which keeps the result on the cluster exactly that long.
            cf._hpc_future = f  # type: ignore[attr-defined]
            cf.add_done_callback(self._cf_done)
            client._watch(f, client._on_executor_done, cf)
        with self._lock:
            self._futures.update(cf for cf in out if not cf.done())
        return out

    def _cf_done(self, cf: _cf.Future) -> None:
        with self._lock:
            self._futures.discard(cf)
        if cf.cancelled():
            twin = getattr(cf, "_hpc_future", None)
            if twin is not None:
                twin.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; optionally cancel or wait for those still pending.

        The client stays open.
        """
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for cf in pending:
                cf.cancel()
        if wait:
            _cf.wait(pending)
