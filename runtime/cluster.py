"""LocalCluster: a scheduler and workers on this machine, for laptops, tests and nodes.

The scheduler runs inside this process, on the background loop of
:mod:`runtime.ioloop` (the loop the client uses too, so scheduler and client talk
without crossing threads), and writes its scheduler file into a private temporary
directory. Workers are separate processes (``python -m runtime.worker``) reading that
file, or, with ``processes=False``, :class:`~runtime.worker.Worker` objects on the same
background loop.

State kept here, per cluster: the scheduler object, the worker processes (``Popen``)
or in-process workers, and the temporary directory holding the scheduler file and the
worker logs. All of it is also held by a ``weakref.finalize`` so that no worker
process outlives the cluster, whatever happens to the code using it:

- ``close()`` (or leaving the ``with`` block) runs the finalizer: workers get SIGTERM
  and close gracefully; those still running after a grace period are killed;
- a cluster dropped without ``close()`` (a failing test) is finalized when garbage
  collected, and any cluster still open at interpreter exit is finalized by the
  finalizer's ``atexit`` hook (``weakref.finalize`` runs at exit by default);
- if this process dies without running any of that (SIGKILL), each worker notices its
  parent is gone within a heartbeat and exits, and would in any case exit once its
  scheduler connection has been gone for ``distributed.worker.death-timeout``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from typing import Any

from runtime import ioloop
from runtime.errors import ConfigError, SchedulerError

__all__ = ["LocalCluster"]

logger = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_CLOSE_GRACE = 3.0
_LOG_TAIL = 4000


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _default_shape(
    n_workers: int | None, threads_per_worker: int | None, processes: bool, cores: int
) -> tuple[int, int]:
    """Workers and threads per worker filling ``cores`` when not given.

    Processes by default get one thread each on small machines (tasks holding the GIL
    scale with processes), and a few threads each on larger ones.

    Examples
    --------
    >>> _default_shape(None, None, True, 2)
    (2, 1)
    >>> _default_shape(None, None, True, 16)
    (4, 4)
    >>> _default_shape(None, None, False, 8)
    (1, 8)
    >>> _default_shape(3, None, True, 8)
    (3, 2)
    """
    for name, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name} must be an integer, not {value!r}")
    if n_workers is not None and n_workers < 0:
        raise ConfigError(f"n_workers must be >= 0, not {n_workers}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ConfigError(f"threads_per_worker must be >= 1, not {threads_per_worker}")
    if n_workers is None and threads_per_worker is None:
        if not processes:
            return 1, cores
        if cores <= 4:
            return cores, 1
        n = next(f for f in range(1, cores + 1) if cores % f == 0 and f * f >= cores)
        return n, cores // n
    if n_workers is None:
        assert threads_per_worker is not None
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, cores // max(n_workers, 1))
    return n_workers, threads_per_worker


def _flatten(section: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in section.items():
        path = f"{prefix}__{name}" if prefix else name
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


# Config sections workers read; passed on as HPC_* variables so that values set in this
# process (config.set, e.g. in a test) hold in the worker processes too.
_INHERITED_SECTIONS = ("distributed", "serialize")


def _round_trips(text: str, value: Any) -> bool:
    """Whether the config's env-var reader gets ``value`` back from ``text``."""
    try:
        return bool(ast.literal_eval(text) == value)
    except (ValueError, SyntaxError):
        return isinstance(value, str)


def _worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The worker must import this very copy of the package, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else os.pathsep.join([root, path])
    try:
        from runtime import config

        for section in _INHERITED_SECTIONS:
            values = config.get(section, None)
            if isinstance(values, Mapping):
                for name, value in _flatten(values, section).items():
                    text = repr(value)
                    if not _round_trips(text, value):
                        continue  # e.g. .inf: the worker reads it from the same files
                    env["HPC_" + name.upper().replace("-", "_")] = text
    except ImportError:  # pragma: no cover - the config module is part of runtime
        pass
    return env


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _run_on_loop(coro: Any, timeout: float) -> None:
    """Run ``coro`` on the background loop and wait, or just schedule it from that loop."""
    try:
        if sys.is_finalizing():
            coro.close()
        elif ioloop.in_loop_thread():
            # Finalized on the loop's own thread: waiting here would deadlock.
            asyncio.ensure_future(coro)
        else:
            ioloop.run_sync(coro, timeout)
    except Exception:
        logger.warning("closing %r failed", coro, exc_info=True)


def _shutdown(
    procs: list[subprocess.Popen[bytes]],
    state: dict[str, Any],
    tmpdir: str,
    grace: float,
) -> None:
    """Stop every worker and the scheduler; kill what does not stop within ``grace``.

    Holds no reference to the cluster object, so it can run from its finalizer.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
    closers = [w.close("cluster-close") for w in state.pop("workers", [])]
    scheduler = state.pop("scheduler", None)
    if scheduler is not None:
        closers.append(scheduler.close())
    for coro in closers:
        _run_on_loop(coro, grace)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker process %d did not stop within %gs; killing it", proc.pid, grace)
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
    shutil.rmtree(tmpdir, ignore_errors=True)


class LocalCluster:
    """A scheduler and workers on this machine.

    Parameters
    ----------
    n_workers
        Workers to start. Default: fill the cores (see ``threads_per_worker``).
    threads_per_worker
        Task threads per worker. Default: one per worker on machines with up to 4
        cores, more on larger ones, so that workers x threads = cores.
    processes
        Workers are processes (the default: tasks holding the GIL run in parallel), or
        objects in this process sharing its GIL (cheaper to start, no pickling of
        results between them).
    scheduler_port
        Port of the scheduler; 0 picks a free one.
    host
        Address the scheduler and workers listen on.
    memory_limit
        Per-worker memory limit (see :func:`runtime.worker.parse_memory_limit`).
    timeout
        Seconds to wait for the scheduler and every worker to start.
    checkpoint
        A directory: every computation of a client of this cluster is checkpointed
        there unless it says otherwise (``checkpoint=False`` or another directory).

    Examples
    --------
    >>> from runtime.cluster import LocalCluster
    >>> from runtime.client import Client
    >>> with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:  # doctest: +SKIP
    ...     with Client(cluster) as client:
    ...         client.submit(sum, [1, 2, 3]).result()
    6
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        scheduler_port: int = 0,
        host: str = "127.0.0.1",
        *,
        memory_limit: int | float | str | None = "auto",
        timeout: float = _START_TIMEOUT,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        #: Default ``checkpoint=`` of the computations of this cluster's clients.
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.n_workers, self.threads_per_worker = _default_shape(
            n_workers, threads_per_worker, processes, _cores()
        )
        self.processes = processes
        self.host = host
        self.memory_limit = memory_limit
        self.secret: bytes = secrets.token_bytes(32)
        self._tmpdir = tempfile.mkdtemp(prefix="hpc-cluster-")
        #: Path of the scheduler file (address and secret, mode 0600).
        self.scheduler_file: str = os.path.join(self._tmpdir, "scheduler.json")
        self.scheduler_address: str = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self._names: list[str] = []
        # Shared with the finalizer: what it must stop (never a reference to self).
        self._state: dict[str, Any] = {"workers": []}
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._state, self._tmpdir, _CLOSE_GRACE
        )
        try:
            self._start(scheduler_port, timeout)
        except BaseException:
            self._finalizer()
            raise

    # ------------------------------------------------------------------ starting

    def _start(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.processes:
            # Spawned first: their start-up (mostly imports) overlaps the scheduler's;
            # they wait for the scheduler file, written once it listens.
            env = _worker_environment()
            for i in range(self.n_workers):
                self._spawn_process(str(i), env)
        scheduler = self._make_scheduler(port)
        self._state["scheduler"] = scheduler
        ioloop.run_sync(scheduler.start(), timeout)
        self.scheduler_address = str(scheduler.address)
        if not self.processes:
            from runtime.worker import Worker

            for i in range(self.n_workers):
                worker = Worker(
                    self.scheduler_address,
                    secret=self.secret,
                    nthreads=self.threads_per_worker,
                    memory_limit=self.memory_limit,
                    name=str(i),
                    host=self.host,
                )
                self._state["workers"].append(worker)
                self._names.append(str(i))
                ioloop.run_sync(worker.start(), max(0.1, deadline - time.monotonic()))
        self._wait_for_workers(self.n_workers, deadline)

    def _make_scheduler(self, port: int) -> Any:
        from runtime.scheduler import Scheduler

        return Scheduler(
            host=self.host,
            port=port,
            secret=self.secret,
            scheduler_file=self.scheduler_file,
        )

    def _spawn_process(self, name: str, env: dict[str, str]) -> None:
        log_path = os.path.join(self._tmpdir, f"worker-{name}.log")
        argv = [
            sys.executable,
            "-m",
            "runtime.worker",
            "--scheduler-file",
            self.scheduler_file,
            "--nthreads",
            str(self.threads_per_worker),
            "--memory-limit",
            str(self.memory_limit),
            "--name",
            name,
            "--host",
            self.host,
            "--parent-pid",
            str(os.getpid()),
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stderr=log,
                env=env,
                # Ctrl-C goes to this process, which then stops the workers in order.
                start_new_session=True,
            )
        self._procs.append(proc)
        self._names.append(name)

    def _registered(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of its workers: ``{address: {name, pid, nthreads, ...}}``."""
        scheduler = self._state.get("scheduler")
        if scheduler is None:
            return {}
        info = ioloop.run_sync(_scheduler_workers(scheduler), 10)
        return {str(addr): dict(w) for addr, w in info.items()}

    def _wait_for_workers(self, n: int, deadline: float) -> None:
        scheduler = self._state["scheduler"]
        while True:
            # Wait on the loop in short slices, checking the processes in between.
            registered = ioloop.run_sync(_count_workers(scheduler, n, 0.1), 10)
            if registered >= n:
                return
            for name, proc in zip(self._names[: len(self._procs)], self._procs, strict=True):
                code = proc.poll()
                if code is not None:
                    raise SchedulerError(
                        f"worker {name} of the LocalCluster exited with code {code} while "
                        f"starting; its log:\n{self._log(name)}"
                    )
            if time.monotonic() >= deadline:
                logs = "\n".join(f"--- worker {w}:\n{self._log(w)}" for w in self._names)
                raise SchedulerError(
                    f"only {registered} of {n} workers registered with the scheduler "
                    f"at {self.scheduler_address} in time; worker logs:\n{logs}"
                )

    def _log(self, name: str) -> str:
        return _tail(os.path.join(self._tmpdir, f"worker-{name}.log"))

    # ------------------------------------------------------------------ public

    @property
    def status(self) -> str:
        """``"running"`` or ``"closed"``."""
        return "running" if self._finalizer.alive else "closed"

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """Each worker by name: ``pid``, ``address``, ``nthreads``, ``status``.

        ``status`` is ``"running"``, ``"starting"`` (not registered yet),
        ``"exited (code N)"`` for a worker process that ended, or ``"closed"``.
        """
        registered = self._registered() if self._finalizer.alive else {}
        by_name = {str(w.get("name")): (addr, w) for addr, w in registered.items()}
        out: dict[str, dict[str, Any]] = {}
        if self.processes:
            members: list[tuple[str, int | None, int | None]] = [
                (name, proc.pid, proc.poll())
                for name, proc in zip(self._names, self._procs, strict=True)
            ]
        else:
            members = [(name, os.getpid(), None) for name in self._names]
        for name, pid, code in members:
            addr, info = by_name.get(name, (None, {}))
            if code is not None:
                status = f"exited (code {code})"
            elif not self._finalizer.alive:
                status = "closed"
            else:
                status = "running" if addr else "starting"
            out[name] = {
                "name": name,
                "pid": pid,
                "address": addr,
                "nthreads": info.get("nthreads", self.threads_per_worker),
                "memory_limit": info.get("memory_limit"),
                "status": status,
            }
        return out

    @property
    def worker_processes(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes (empty with ``processes=False``)."""
        return list(self._procs)

    def logs(self) -> dict[str, str]:
        """The end of each worker process's log (its stderr), by worker name."""
        return {name: self._log(name) for name in self._names} if self.processes else {}

    def close(self) -> None:
        """Stop the workers and the scheduler; no process is left behind.

        Workers get SIGTERM and close gracefully; any still running after a few
        seconds is killed. Closing twice is harmless.
        """
        self._finalizer()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "processes" if self.processes else "threads"
        return (
            f"LocalCluster({self.scheduler_address!r}, workers={self.n_workers}, "
            f"threads_per_worker={self.threads_per_worker}, {kind}, status={self.status})"
        )


async def _count_workers(scheduler: Any, n: int, timeout: float) -> int:
    """Wait up to ``timeout`` for ``n`` workers to be registered; return how many are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(scheduler.state.workers) < n and loop.time() < deadline:
        await asyncio.sleep(0.002)
    return len(scheduler.state.workers)


async def _scheduler_workers(scheduler: Any) -> Mapping[Any, Mapping[str, Any]]:
    """``{address: info}`` for the workers registered with an in-process scheduler."""
    return dict(scheduler.identity()["workers"])
