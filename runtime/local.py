"""Local schedulers: run a task graph in this thread, on a thread pool, or on processes.

One loop, :func:`get_async`, runs every local computation. It is given a
``submit(fn, *args) -> Future`` function, so the three schedulers are thin adapters:
:func:`get_sync` runs each job inline, :func:`get_threads` hands jobs to a
``ThreadPoolExecutor`` and :func:`get_processes` to a ``ProcessPoolExecutor``, with
tasks and results serialized on the way.

State
-----
Everything lives in one call of :func:`get_async` and dies with it; the only
module-level state is the pools, kept so that repeated computations do not pay to
start threads or processes (one pool per worker count, and per start method for
processes).

Within a call, the graph is first culled to the requested keys (unrelated tasks never
run) and its keys numbered ``0..n-1``, so that the bookkeeping below is lists indexed
by number rather than dicts hashed by key:

- ``waiting[i]``: dependencies of task ``i`` not yet finished; at zero, ``i`` is ready.
- ``remaining[i]``: dependents of ``i`` not yet finished; at zero, ``i``'s result is
  released, unless it was requested.
- ``ready``: a heap of the priorities of ready tasks (from :func:`runtime.graph.order`).
- ``cache``: the results held now, by key. This is the only state that grows with the
  data, so its size is what the policy below keeps small (``RunState.peak_held``
  records its peak).
- the jobs in flight, each a future and the task numbers it carries; a finished job
  puts its future on one queue, which is the only thing the loop ever waits on.

Policy
------
- Run ready tasks in priority order. :func:`runtime.graph.order` numbers tasks
  depth-first, finishing a branch before starting another, so a tree reduction holds
  ``O(depth)`` results rather than ``O(width)``.
- Release a result the moment its last dependent finishes.
- Batch: a job carries several ready tasks, which the worker runs back to back. Its
  size adapts to the measured task duration, aiming at about a millisecond of work
  per job: tiny tasks are batched (the per-job cost of a future, a queue round trip and
  a thread wake-up is paid once per batch), while tasks of a millisecond or more go
  one per job so that the load stays balanced. A batch never takes more than its
  share of the ready tasks, so that every worker gets some. Tasks of one batch run
  one after the other, so tasks must not wait for each other (with one worker they
  could not anyway).
- Keep at most ``num_workers`` jobs in flight; submit more as jobs finish.
- The first error wins: the remaining jobs that have not started are cancelled and
  the error is raised in the caller with its original type and a note naming the
  task. For processes the worker's traceback is chained as ``__cause__``
  (:class:`RemoteTraceback`); a worker process that dies raises
  :class:`~runtime.errors.WorkerDiedError` naming the tasks it may have been running.

Data flow for processes (threads are the same, minus serialization)::

    caller thread                                 worker process
    -------------                                 --------------
    ready heap --pop a batch--> dumps(task, inputs) --> loads, execute_task, dumps
        ^                                                       |
        |                                                       v
    finish: loads, store, release inputs <--- one queue <--- future done
            push dependents that became ready
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import (
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from concurrent.futures.process import BrokenProcessPool
from heapq import heapify, heappop, heappush
from time import perf_counter
from typing import Any, Literal, NoReturn, TypeAlias

from runtime import serialize
from runtime.errors import ConfigError, SchedulerError, SerializationError, WorkerDiedError
from runtime.graph import (
    Key,
    _cycle_error,
    _dependents_of,
    _index_graph,
    _priorities,
    execute_task,
    flatten,
    getcycle,
)

__all__ = [
    "Callback",
    "RemoteTraceback",
    "RunState",
    "SchedulerName",
    "StartMethod",
    "get",
    "get_async",
    "get_processes",
    "get_sync",
    "get_threads",
    "shutdown_pools",
]

Submit: TypeAlias = Callable[..., "Future[Any]"]

SchedulerName: TypeAlias = Literal[
    "sync",
    "synchronous",
    "single-threaded",
    "threads",
    "threading",
    "processes",
    "multiprocessing",
]
"""Names :func:`get` accepts for its ``scheduler`` argument."""

StartMethod: TypeAlias = Literal["spawn", "fork", "forkserver"]
"""How :func:`get_processes` starts its worker processes."""

_START_METHODS: tuple[StartMethod, ...] = ("spawn", "fork", "forkserver")

# Batching (see the module docstring): the work one job should carry, in seconds, and
# the most tasks in one job. The cap bounds the extra results held because a batch
# runs several branches of the graph at once.
_JOB_SECONDS = 1e-3
_MAX_CHUNK = 16


# ------------------------------------------------------------------------- callbacks

_HOOKS = ("start", "pretask", "posttask", "finish")
_active_callbacks: list[Callback] = []
_active_lock = threading.Lock()


class Callback:
    """Hooks the local schedulers call around a computation.

    Subclass it and override any of the four methods; only the overridden ones are
    called, and a computation with no callbacks pays nothing for them. Use an
    instance as a context manager to apply it to every local computation inside the
    ``with`` block (in any thread), or pass it to one call with ``callbacks=[...]``.

    All hooks run in the thread that called the scheduler.

    Examples
    --------
    >>> from operator import add
    >>> class Count(Callback):
    ...     def start(self, dsk):
    ...         self.done = 0
    ...     def posttask(self, key, result, dsk, state, worker_id):
    ...         self.done += 1
    >>> with Count() as count:
    ...     get_sync({'x': 1, 'y': (add, 'x', 1), 'z': (add, 'y', 1)}, 'z')
    3
    >>> count.done
    2
    """

    def start(self, dsk: Mapping[Key, Any]) -> None:
        """Called once before any task runs, with the graph to be run (culled)."""

    def pretask(self, key: Key, dsk: Mapping[Key, Any], state: RunState) -> None:
        """Called when task ``key`` is handed to a worker."""

    def posttask(
        self, key: Key, result: Any, dsk: Mapping[Key, Any], state: RunState, worker_id: Any
    ) -> None:
        """Called when task ``key`` has finished, with its result.

        ``worker_id`` is the thread identifier (threads, sync) or the process id
        (processes) that ran it.
        """

    def finish(self, dsk: Mapping[Key, Any], state: RunState, errored: bool) -> None:
        """Called once at the end, also when the computation failed (``errored``)."""

    def register(self) -> None:
        """Apply this callback to every local computation until :meth:`unregister`."""
        with _active_lock:
            if self not in _active_callbacks:
                _active_callbacks.append(self)

    def unregister(self) -> None:
        """Stop applying this callback to every computation."""
        with _active_lock:
            if self in _active_callbacks:
                _active_callbacks.remove(self)

    def __enter__(self) -> Callback:
        self.register()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unregister()


def _collect_hooks(callbacks: Iterable[Callback] | None) -> dict[str, list[Callable]]:
    """Return the overridden hooks of the active and the given callbacks, by name."""
    with _active_lock:
        everyone = list(_active_callbacks)
    for cb in callbacks or ():
        if cb not in everyone:
            everyone.append(cb)
    hooks: dict[str, list[Callable]] = {name: [] for name in _HOOKS}
    for cb in everyone:
        for name in _HOOKS:
            if getattr(type(cb), name, None) is not getattr(Callback, name):
                hooks[name].append(getattr(cb, name))
    return hooks


class RunState:
    """What one computation knows, as callbacks see it. Read it; do not change it.

    Attributes
    ----------
    total : int
        Tasks in the graph being run (after culling), counting literal values.
    finished : int
        Tasks finished so far (literal values count as finished from the start).
    running : int
        Tasks handed to workers and not yet finished.
    cache : dict
        The results held now, by key: requested results, and inputs that some
        unfinished task still needs.
    peak_held : int
        The most results held at once so far.
    """

    __slots__ = ("cache", "finished", "peak_held", "running", "total")

    def __init__(self, total: int, cache: dict[Key, Any]) -> None:
        self.total = total
        self.finished = 0
        self.running = 0
        self.cache = cache
        self.peak_held = len(cache)

    @property
    def held(self) -> int:
        """How many results are held now."""
        return len(self.cache)

    def __repr__(self) -> str:
        return (
            f"<RunState finished={self.finished}/{self.total} running={self.running} "
            f"held={self.held} peak_held={self.peak_held}>"
        )


# -------------------------------------------------------------------------- errors


class RemoteTraceback(Exception):
    """The traceback of a task that failed in a worker process.

    Chained as ``__cause__`` of the exception re-raised in the caller, so the
    printed traceback shows where the task failed, not only where it was re-raised.
    """

    def __init__(self, text: str, key: Key, pid: int) -> None:
        super().__init__(text, key, pid)
        self.text = text
        self.key = key
        self.pid = pid

    def __str__(self) -> str:
        return f'\n"""\ntask {self.key!r} failed in worker process {self.pid}:\n\n{self.text}"""'


class _TaskFailure:
    """An exception raised by a task, packed where it ran: the exception, its
    formatted traceback and the id of the process that ran it."""

    __slots__ = ("exc", "pid", "text")

    def __init__(self, exc: BaseException, text: str, pid: int) -> None:
        self.exc = exc
        self.text = text
        self.pid = pid

    def __reduce__(self) -> tuple:
        return (_TaskFailure, (self.exc, self.text, self.pid))


def _pack_exception(exc: BaseException, key: Key) -> _TaskFailure:
    """Default ``pack_exception``: keep the exception and its traceback as text."""
    return _TaskFailure(exc, "".join(traceback.format_exception(exc)), os.getpid())


def _raise_task_error(failure: Any, key: Key) -> NoReturn:
    """Default ``raise_task_error``: re-raise a task's exception in the caller."""
    if not isinstance(failure, _TaskFailure):
        raise failure
    exc = failure.exc
    if failure.pid != os.getpid():
        _add_note(exc, f"raised by task {key!r} in worker process {failure.pid}")
        raise exc from RemoteTraceback(failure.text, key, failure.pid)
    _add_note(exc, f"raised by task {key!r}")
    raise exc


def _add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc``: ``add_note`` on 3.11+, ``__notes__`` by hand on 3.10.

    On 3.10 tracebacks do not print notes, but ``exc.__notes__`` holds them all the
    same, so code that inspects the error can find the task key either way.
    """
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        if note not in getattr(exc, "__notes__", ()):
            add_note(note)
        return
    try:
        notes = exc.__dict__.setdefault("__notes__", [])
    except AttributeError:  # no __dict__: nowhere to put it
        return
    if note not in notes:
        notes.append(note)


def _job_failed(exc: BaseException, keys: list[Key], others: list[Key]) -> BaseException:
    """Turn the failure of a whole job (not of one of its tasks) into the error to raise."""
    if isinstance(exc, BrokenExecutor):
        suspects = keys + [k for k in others if k not in keys]
        which = f"task {keys[0]!r}" if len(suspects) == 1 else f"one of the tasks {suspects!r}"
        err = WorkerDiedError(
            f"a worker process died while running {which}: it exited without raising "
            "an exception (os._exit, a crash such as a segfault, a kill such as the "
            "out-of-memory killer's, or a failure to start: see the worker's output). "
            "The process pool is replaced for the next computation.",
            suspects,
        )
        err.__cause__ = exc
        return err
    if isinstance(exc, CancelledError):
        err2 = SchedulerError(
            f"the executor cancelled tasks {keys!r}: it was shut down while the "
            "computation was running"
        )
        err2.__cause__ = exc
        return err2
    _add_note(exc, f"raised while running tasks {keys!r}")
    return exc


# ---------------------------------------------------------------- the worker's side


def _run_batch(
    keys: list[Key],
    tasks: list[Any],
    cache: Mapping[Key, Any],
    pack_exception: Callable[[BaseException, Key], Any],
) -> tuple[int, float, list[Any], Any]:
    """Run tasks in order in this process, reading inputs from the shared cache.

    Returns ``(thread id, seconds taken, values, failure)``: the values of the tasks
    that succeeded, and then the packed error of the first that failed, or ``None``.
    """
    start = perf_counter()
    values: list[Any] = []
    append = values.append
    failure = None
    try:
        for task in tasks:
            append(execute_task(task, cache))
    except Exception as exc:
        failure = pack_exception(exc, keys[len(values)])
    return threading.get_ident(), perf_counter() - start, values, failure


def _run_serialized_batch(
    keys: list[Key],
    payloads: list[list[bytes | bytearray]],
    dumps: Callable[[Any], list],
    loads: Callable[[list], Any],
    pack_exception: Callable[[BaseException, Key], Any],
) -> tuple[int, float, list[list[bytes | bytearray]], list[bytes | bytearray] | None]:
    """Run serialized tasks in a worker process; return serialized results.

    Each payload is ``dumps((task, inputs))``. Returns ``(pid, seconds taken,
    results, failure)`` like :func:`_run_batch`, with every value serialized.
    """
    start = perf_counter()
    values: list[list[bytes | bytearray]] = []
    failure = None
    for key, payload in zip(keys, payloads, strict=True):
        try:
            task, inputs = _unpack_task(key, payload, loads)
            value = execute_task(task, inputs)
            values.append(_pack_result(key, value, dumps))
        except Exception as exc:
            failure = _serialize_failure(pack_exception(exc, key), dumps, loads)
            break
    return os.getpid(), perf_counter() - start, values, failure


def _unpack_task(key: Key, payload: list, loads: Callable[[list], Any]) -> Any:
    try:
        return loads(payload)
    except Exception as exc:
        detail = f"{exc}" if isinstance(exc, SerializationError) else f"{type(exc).__name__}: {exc}"
        raise SerializationError(
            f"task {key!r} could not be deserialized in worker process {os.getpid()}: "
            f"{detail.rstrip('.')}. Everything a task uses must be importable in the "
            "workers, or use scheduler='threads'"
        ) from exc


def _pack_result(key: Key, value: Any, dumps: Callable[[Any], list]) -> list[bytes | bytearray]:
    try:
        return _as_bytes(dumps(value))
    except Exception as exc:
        raise SerializationError(
            f"the result of task {key!r} cannot be sent back from the worker process: "
            f"{_describe(value, 'the result', exc)}; return something picklable, or use "
            "scheduler='threads'"
        ) from exc


def _serialize_failure(
    failure: Any, dumps: Callable[[Any], list], loads: Callable[[list], Any]
) -> list[bytes | bytearray]:
    """Serialize a packed failure, replacing an exception that cannot make the trip."""
    try:
        frames = _as_bytes(dumps(failure))
        loads(frames)  # some exceptions pickle but cannot be rebuilt: find out here
        return frames
    except Exception as exc:
        if not isinstance(failure, _TaskFailure):
            raise
        original = failure.exc
        stand_in = RuntimeError(
            f"{type(original).__qualname__}: {original} (the original exception could "
            f"not be sent back from the worker process: {type(exc).__name__}: {exc})"
        )
        return _as_bytes(dumps(_TaskFailure(stand_in, failure.text, failure.pid)))


def _as_bytes(frames: list) -> list[bytes | bytearray]:
    """Make frames picklable by the process pool (which cannot pickle memoryviews).

    Buffer frames become ``bytearray`` rather than ``bytes`` so that arrays rebuilt
    from them on the other side are writable, as a task's own result would be.
    """
    return [f if type(f) is bytes else bytearray(f) for f in frames]


def _describe(obj: Any, name: str, exc: BaseException) -> str:
    """Explain which part of ``obj`` (called ``name``) cannot be serialized."""
    try:
        detail = serialize.describe_unserializable(obj)
    except Exception:
        detail = None
    if detail is None:
        return f"{name} cannot be serialized ({type(exc).__name__}: {exc})"
    # describe_unserializable names the object "obj" (or "the object" when it is the
    # culprit itself); say which object we mean instead.
    for prefix in ("the object", "obj"):
        if detail.startswith(prefix):
            return name + detail[len(prefix) :]
    return detail


def _unserializable_task(
    key: Key, task: Any, inputs: dict[Key, Any], exc: BaseException
) -> SerializationError:
    """Say which part of a task (its own arguments or an input) cannot be sent."""
    detail = _describe(task, "task", exc)
    if serialize.describe_unserializable(task) is None:
        for dep, value in inputs.items():
            if serialize.describe_unserializable(value) is not None:
                detail = _describe(value, f"its input {dep!r}", exc)
                break
    return SerializationError(
        f"task {key!r} cannot be sent to a worker process: {detail}. Make the object "
        "picklable, create it inside the task, or use scheduler='threads'"
    )


# ---------------------------------------------------------------------- the loop


def get_async(
    submit: Submit,
    num_workers: int,
    dsk: Mapping[Key, Any],
    result: Any,
    *,
    cache: Mapping[Key, Any] | None = None,
    callbacks: Iterable[Callback] | None = None,
    raise_task_error: Callable[[Any, Key], NoReturn] = _raise_task_error,
    pack_exception: Callable[[BaseException, Key], Any] = _pack_exception,
    chunksize: int | None = None,
    dumps: Callable[[Any], list] | None = None,
    loads: Callable[[list], Any] | None = None,
) -> Any:
    """Compute ``result`` from ``dsk`` with jobs handed to ``submit``.

    Parameters
    ----------
    submit
        ``Executor.submit``-like: ``submit(fn, *args)`` returns a
        ``concurrent.futures.Future`` of ``fn(*args)``.
    num_workers
        How many jobs to keep in flight.
    dsk
        The task graph. Only what ``result`` needs is run.
    result
        A key, or a nested list of keys.
    cache
        Values already known, by key: those keys are not computed, and tasks may
        refer to keys found only here. Not modified.
    callbacks
        :class:`Callback` instances for this call, in addition to the active ones.
    raise_task_error
        ``raise_task_error(failure, key)`` raises, in the caller, the error of a
        task; ``failure`` is what ``pack_exception`` returned.
    pack_exception
        ``pack_exception(exc, key)``, called where the task ran, packs the
        exception it raised. With ``dumps`` it must be a module-level function (it
        is sent to the worker processes) and return something serializable.
    chunksize
        The most tasks one job carries. By default it adapts to the task duration
        (see the module docstring).
    dumps, loads
        Serialize tasks and results (``dumps(obj) -> frames``,
        ``loads(frames) -> obj``) for workers in other processes; both module-level
        functions. Without them, workers share this process's memory and read
        inputs straight from the cache.

    Returns
    -------
    object
        The value of ``result``, in the same nested-list structure.

    Raises
    ------
    GraphError
        A requested key is not in the graph.
    CycleError
        The graph has a cycle.
    SerializationError
        With ``dumps``: a task or its result cannot be serialized.
    WorkerDiedError
        A worker process died while running tasks.
    Exception
        Whatever a task raised, with a note naming the task.
    """
    if num_workers < 1:
        raise ConfigError(f"num_workers must be at least 1, not {num_workers!r}")
    if chunksize is not None and chunksize < 1:
        raise ConfigError(f"chunksize must be at least 1 (or None to adapt), not {chunksize!r}")
    if (dumps is None) != (loads is None):
        raise ConfigError("give both dumps and loads (workers in other processes), or neither")
    io = (dumps, loads) if dumps is not None and loads is not None else None
    requested = list(flatten(result))
    done = cache if cache else None
    keys, deps = _index_graph(dsk, requested, done)
    n = len(keys)
    n_requested = len(dict.fromkeys(requested))  # numbered first by _index_graph
    dependents = _dependents_of(deps)
    priority, stuck = _priorities(deps, dependents)
    if stuck:
        graph = dict(dsk) if done is None else {**dsk, **dict.fromkeys(done)}
        raise _cycle_error(getcycle(graph, [keys[i] for i in stuck]))
    by_priority = [0] * n
    for i, p in enumerate(priority):
        by_priority[p] = i

    data: dict[Key, Any] = {}
    waiting = [len(ds) for ds in deps]
    remaining = [len(ds) for ds in dependents]
    ready: list[int] = []
    known: list[int] = []  # keys whose value is known without running anything
    for i, k in enumerate(keys):
        if done is not None and k in done:
            data[k] = done[k]
            known.append(i)
        elif not deps[i]:
            value = dsk[k]
            if type(value) is tuple and value and callable(value[0]) or isinstance(value, list):
                ready.append(priority[i])
            else:
                data[k] = value
                known.append(i)
    for i in known:
        for c in dependents[i]:
            waiting[c] -= 1
            if not waiting[c]:
                ready.append(priority[c])
    heapify(ready)

    hooks = _collect_hooks(callbacks)
    pretask, posttask = hooks["pretask"], hooks["posttask"]
    view: Mapping[Key, Any] = dsk
    if any(hooks.values()):
        view = {k: (done[k] if done is not None and k in done else dsk[k]) for k in keys}
    state = RunState(n, data)
    state.finished = finished = len(known)
    peak = len(data)
    for hook in hooks["start"]:
        hook(view)

    completions: queue.SimpleQueue[Future] = queue.SimpleQueue()
    in_flight: dict[Future, list[int]] = {}
    per_task: float | None = None  # seconds per task, smoothed, as workers report it
    errored = True
    try:
        while True:
            while ready and len(in_flight) < num_workers:
                if chunksize is not None:
                    size = chunksize
                else:
                    share = -(-len(ready) // num_workers)
                    budget = 1 if per_task is None else int(_JOB_SECONDS / per_task) + 1
                    size = min(share, budget, _MAX_CHUNK)
                ids = [by_priority[heappop(ready)] for _ in range(min(size, len(ready)))]
                batch_keys = [keys[i] for i in ids]
                if pretask:
                    for k in batch_keys:
                        for hook in pretask:
                            hook(k, view, state)
                if io is not None:
                    payloads = [_task_payload(i, keys, deps, dsk, data, io[0]) for i in ids]
                    fut = submit(_run_serialized_batch, batch_keys, payloads, *io, pack_exception)
                else:
                    tasks = [dsk[k] for k in batch_keys]
                    fut = submit(_run_batch, batch_keys, tasks, data, pack_exception)
                in_flight[fut] = ids
                state.running += len(ids)
                fut.add_done_callback(completions.put)
            if not in_flight:
                break

            fut = completions.get()
            ids = in_flight.pop(fut)
            try:
                worker_id, elapsed, values, failure = fut.result()
            except BaseException as exc:
                others = [keys[i] for other in in_flight.values() for i in other]
                raise _job_failed(exc, [keys[i] for i in ids], others)  # noqa: B904
            if values:
                sample = max(elapsed / len(values), 1e-9)
                per_task = sample if per_task is None else 0.7 * per_task + 0.3 * sample
            for i, value in zip(ids, values, strict=False):
                key = keys[i]
                if io is not None:
                    value = _unpack_result(key, value, io[1])
                data[key] = value
                if len(data) > peak:  # counted before inputs go: they coexisted
                    peak = state.peak_held = len(data)
                for d in deps[i]:
                    remaining[d] -= 1
                    if not remaining[d] and d >= n_requested:
                        del data[keys[d]]
                for c in dependents[i]:
                    waiting[c] -= 1
                    if not waiting[c]:
                        heappush(ready, priority[c])
                finished += 1
                if posttask:
                    state.finished = finished
                    state.running -= 1
                    for hook in posttask:
                        hook(key, value, view, state, worker_id)
            if not posttask:
                state.finished = finished
                state.running -= len(values)
            if failure is not None:
                key = keys[ids[len(values)]]
                if io is not None:
                    failure = _unpack_result(key, failure, io[1])
                raise_task_error(failure, key)
        if finished != n:  # pragma: no cover - would be a bug in the bookkeeping
            raise SchedulerError(f"internal error: {n - finished} of {n} tasks never became ready")
        errored = False
        return _pack(result, data)
    finally:
        for fut in in_flight:
            fut.cancel()
        for hook in hooks["finish"]:
            hook(view, state, errored)


def _task_payload(
    i: int,
    keys: list[Key],
    deps: list[list[int]],
    dsk: Mapping[Key, Any],
    data: Mapping[Key, Any],
    dumps: Callable[[Any], list],
) -> list[bytes | bytearray]:
    """Serialize task ``i`` with the values of its inputs, for a worker process."""
    key = keys[i]
    task = dsk[key]
    inputs = {keys[j]: data[keys[j]] for j in deps[i]}
    try:
        return _as_bytes(dumps((task, inputs)))
    except Exception as exc:
        raise _unserializable_task(key, task, inputs, exc) from exc


def _unpack_result(key: Key, frames: list, loads: Callable[[list], Any]) -> Any:
    try:
        return loads(frames)
    except Exception as exc:
        raise SerializationError(
            f"the result of task {key!r} could not be deserialized in the caller: "
            f"{type(exc).__name__}: {exc}. Classes it uses must be importable here too"
        ) from exc


def _pack(result: Any, data: Mapping[Key, Any]) -> Any:
    """Return the values of ``result``'s keys in its nested-list structure."""
    if isinstance(result, list):
        return [_pack(r, data) for r in result]
    return data[result]


# ---------------------------------------------------------------------- adapters


class _InlineExecutor(Executor):
    """Runs each submitted call at once, in the calling thread."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


_inline = _InlineExecutor()


def get_sync(dsk: Mapping[Key, Any], keys: Any, **kwargs: Any) -> Any:
    """Compute ``keys`` of ``dsk`` in the calling thread, one task at a time.

    For debugging: exceptions keep their full traceback, ``pdb.pm()`` lands in the
    failing task, and nothing runs concurrently.

    Parameters
    ----------
    dsk
        The task graph.
    keys
        A key or a nested list of keys.
    **kwargs
        Passed to :func:`get_async` (``cache``, ``callbacks``, ``chunksize``...).

    Examples
    --------
    >>> from operator import add
    >>> get_sync({'x': 1, 'y': (add, 'x', 1)}, ['x', ['y']])
    [1, [2]]
    """
    return get_async(_inline.submit, 1, dsk, keys, **kwargs)


_pools_lock = threading.Lock()
_thread_pools: dict[int, ThreadPoolExecutor] = {}
_process_pools: dict[tuple[int, str], ProcessPoolExecutor] = {}
_pool_thread = threading.local()


def _mark_pool_thread() -> None:
    _pool_thread.active = True


def _default_workers() -> int:
    """Workers when the caller gives no number: ``num-workers`` config, else the CPUs
    this process may run on (which respects batch-system CPU binding)."""
    from runtime import config

    n = config.get("num-workers", None)
    if n:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def get_threads(
    dsk: Mapping[Key, Any],
    keys: Any,
    num_workers: int | None = None,
    pool: Executor | None = None,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of ``dsk`` on a pool of threads.

    Parameters
    ----------
    dsk
        The task graph.
    keys
        A key or a nested list of keys.
    num_workers
        Threads to use; default: the ``num-workers`` config, else one per CPU.
        Pools are kept and reused, one per number of threads.
    pool
        Run on this executor instead.
    **kwargs
        Passed to :func:`get_async`.

    Examples
    --------
    >>> from operator import add
    >>> get_threads({'x': 1, 'y': (add, 'x', 1)}, 'y', num_workers=2)
    2
    """
    if pool is not None:
        n = num_workers or getattr(pool, "_max_workers", None) or _default_workers()
        return get_async(pool.submit, n, dsk, keys, **kwargs)
    n = num_workers or _default_workers()
    if getattr(_pool_thread, "active", False):
        # Called from a task on one of our pools: waiting on that same pool could
        # deadlock once every thread waits, so this computation gets its own.
        with ThreadPoolExecutor(n, thread_name_prefix="hpc-nested") as own:
            return get_async(own.submit, n, dsk, keys, **kwargs)
    with _pools_lock:
        shared = _thread_pools.get(n)
        if shared is None:
            shared = _thread_pools[n] = ThreadPoolExecutor(
                n, thread_name_prefix="hpc-threads", initializer=_mark_pool_thread
            )
    return get_async(shared.submit, n, dsk, keys, **kwargs)


def _start_method(context: str | None) -> StartMethod:
    if context is None:
        from runtime import config

        context = config.get("multiprocessing.context")
    if context not in _START_METHODS:
        raise ConfigError(
            f"unknown multiprocessing context {context!r}; valid start methods are "
            f"{', '.join(map(repr, _START_METHODS))} (set `multiprocessing.context`)"
        )
    if context not in multiprocessing.get_all_start_methods():
        raise ConfigError(
            f"start method {context!r} is not available on this platform; use one of "
            f"{multiprocessing.get_all_start_methods()!r}"
        )
    return context


def _process_pool(n: int, method: StartMethod) -> ProcessPoolExecutor:
    with _pools_lock:
        pool = _process_pools.get((n, method))
        if pool is None:
            pool = _process_pools[(n, method)] = ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context(method)
            )
        return pool


def _discard_process_pool(n: int, method: StartMethod, pool: ProcessPoolExecutor) -> None:
    with _pools_lock:
        if _process_pools.get((n, method)) is pool:
            del _process_pools[(n, method)]
    pool.shutdown(wait=True, cancel_futures=True)


def get_processes(
    dsk: Mapping[Key, Any],
    keys: Any,
    num_workers: int | None = None,
    context: StartMethod | None = None,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of ``dsk`` on a pool of worker processes.

    Tasks, their inputs and their results are serialized (cloudpickle where pickle
    cannot), so they must be picklable; results travel back to this process.

    Parameters
    ----------
    dsk
        The task graph.
    keys
        A key or a nested list of keys.
    num_workers
        Processes to use; default: the ``num-workers`` config, else one per CPU.
    context
        How to start the processes: ``'spawn'``, ``'fork'`` or ``'forkserver'``;
        default: the ``multiprocessing.context`` config. Pools are kept and reused,
        one per (number of processes, start method).
    **kwargs
        Passed to :func:`get_async`.

    Raises
    ------
    SerializationError
        A task, an input or a result cannot be serialized; the message names the
        task.
    WorkerDiedError
        A worker process died while running tasks; the pool is replaced.
    """
    method = _start_method(context)
    n = num_workers or _default_workers()
    for attempt in (1, 2):
        pool = _process_pool(n, method)
        try:
            return get_async(
                pool.submit, n, dsk, keys, dumps=serialize.dumps, loads=serialize.loads, **kwargs
            )
        except BrokenProcessPool:
            # Raised by submit(): the pool broke before this computation used it
            # (a worker died while idle). Start a fresh pool, once.
            _discard_process_pool(n, method, pool)
            if attempt == 2:
                raise
        except WorkerDiedError:
            _discard_process_pool(n, method, pool)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def shutdown_pools() -> None:
    """Shut down the thread and process pools kept for reuse (new ones start on demand)."""
    with _pools_lock:
        pools: list[Executor] = [*_thread_pools.values(), *_process_pools.values()]
        _thread_pools.clear()
        _process_pools.clear()
    for pool in pools:
        pool.shutdown(wait=True)


_SCHEDULERS: dict[str, Callable[..., Any]] = {
    "sync": get_sync,
    "synchronous": get_sync,
    "single-threaded": get_sync,
    "threads": get_threads,
    "threading": get_threads,
    "processes": get_processes,
    "multiprocessing": get_processes,
}


def get(
    dsk: Mapping[Key, Any],
    keys: Any,
    scheduler: SchedulerName | Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Compute ``keys`` of ``dsk`` with a local scheduler chosen by name.

    The graph is culled to ``keys`` (unrelated tasks do not run) but not otherwise
    optimized: fuse it first with :func:`runtime.graph.fuse_linear` if you wish.

    Parameters
    ----------
    dsk
        The task graph.
    keys
        A key or a nested list of keys; the result has the same structure.
    scheduler
        ``'sync'`` (also ``'synchronous'``, ``'single-threaded'``), ``'threads'``
        (also ``'threading'``), ``'processes'`` (also ``'multiprocessing'``), or a
        ``get``-like function. Default: the ``scheduler`` config, else threads.
    **kwargs
        Passed to the scheduler (``num_workers``, ``callbacks``...).

    Raises
    ------
    ConfigError
        ``scheduler`` is not one of the names above.

    Examples
    --------
    >>> from operator import add
    >>> dsk = {'x': 1, 'y': (add, 'x', 1), ('z', 0): (add, 'y', 10)}
    >>> get(dsk, [('z', 0), 'y'], scheduler='sync')
    [12, 2]
    """
    name: Any = scheduler
    if name is None:
        from runtime import config

        name = config.get("scheduler", None) or "threads"
    if callable(name):
        return name(dsk, keys, **kwargs)
    try:
        run = _SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown local scheduler {name!r}; valid names are {', '.join(map(repr, _SCHEDULERS))}"
        ) from None
    return run(dsk, keys, **kwargs)
