"""The distributed runtime side by side with Dask distributed and a process pool (issue 3).

Systems, all with two single-threaded worker processes on this machine:

- ``ours``: ``runtime.cluster.LocalCluster(n_workers=2, threads_per_worker=1)`` and
  ``runtime.client.Client`` (scheduler in the client process);
- ``dask``: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True, dashboard_address=None)`` and ``distributed.Client`` (scheduler in
  the client process, Dask's default; no dashboard, as we have none);
- ``ppe``: ``concurrent.futures.ProcessPoolExecutor(2)`` (W1 only), ``map`` with
  ``chunksize=1``.

Workloads (the issue's "Numbers"):

- W1: ``gather(map(inc, range(20_000)))``: tasks/s.
- W2: a tree reduction of 4,096 leaves (8,191 tasks) built with ``delayed`` and
  computed through the client (``hpc.compute`` / ``dask.compute`` with the client as
  default scheduler; graph construction included): tasks/s.
- W3: a chain of 500 dependent tasks, all submitted before waiting for the last: us/task.
- W4: a 256 MiB float64 array produced on worker A (not timed), then summed on worker
  B (timed: B fetches it from A, sums it, the float comes back): MB/s. The reference is
  a raw loopback TCP transfer between two processes measured in the same run: for
  each transfer the receiver allocates a fresh buffer with ``numpy.empty`` (as the
  receiver of a new array must), sends one byte to start the sender, and times
  ``recv_into`` until the buffer is full.
- W5: cluster start to first result (``LocalCluster(...)``, ``Client(...)``,
  ``submit(inc, 1).result()``), then shutdown (``client.close()``, ``cluster.close()``),
  in a fresh process after the client library is imported (its import time is shown
  apart). Shutdown is *clean* when no worker process is left running. Median of 3
  fresh processes per system.
- Memory: RSS of the worker processes (pids reported by ``client.run(os.getpid)``)
  plus the growth of the client process, which hosts the scheduler (and Dask's
  nannies): its RSS just before the cluster starts, with the client library already
  imported, is subtracted from its RSS at the time of measurement. The client
  process's share therefore also counts the client's own state and, for ours, the
  scheduler modules imported on first start - conservative for ours. Measured right
  after the first result, and after W1 once its futures and results are dropped and
  the scheduler holds no task any more.
- Scheduler memory per pending task: ``runtime.scheduler.SchedulerState`` driven in
  process with two workers registered and one ``update-graph`` of 1,000,000 tasks
  (500,000 roots, 500,000 tasks of two roots each; the client wants the latter), keys
  and payload frames shaped like the client's: what ``update_graph`` allocates and
  keeps once the message is dropped (``tracemalloc``), plus the keys and payload
  frames it keeps from the message (``sys.getsizeof``, shown apart), per task.

Method. Each system runs in its own fresh child process, one after another (the
machine has 2 cores), so no system's imports, threads or heap affect another's.
Tasks use functions defined in this file, which the children run as ``__main__``:
both clients then pickle them by value, as for a user's script. Every timed run uses
new input values, so no result is reused from an earlier run. Timed workloads get
one small warm-up, then the best of ``--repeat`` runs; Dask's W1 and W2 (about 45 s
and 15 s each) run once. Before anything runs, the ``runtime`` and ``hpc`` sources are
byte-compiled (``compileall``, as a pip install does): with ``PYTHONDONTWRITEBYTECODE``
set, every worker process would otherwise recompile them at start while Dask's
installed modules load from their ``.pyc`` files.

Run ``python benchmarks/distributed.py`` (2 to 3 minutes with Dask installed) or
``--quick`` for a smoke test with small sizes (targets are then not meaningful).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _unshadow_dask() -> None:
    """Take this directory off ``sys.path``: this file would shadow Dask's ``distributed``.

    Done in the processes that run this file as a script (the children import Dask);
    ``benchmarks/run.py`` loads it under another module name.
    """
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


if __name__ == "distributed":
    # Imported for Dask's package (dask.compute looks for it) because this directory is
    # on sys.path: hand the real one over instead (ImportError if Dask's is missing).
    import importlib

    del sys.modules[__name__]
    _unshadow_dask()
    sys.modules[__name__] = importlib.import_module(__name__)
else:
    sys.path.insert(0, _HERE)
    from harness import Comparison, print_comparison

# Full sizes (the issue's) and --quick ones.
SIZES = {
    "full": {"map": 20_000, "leaves": 4096, "chain": 500, "array": 256 * 2**20, "state": 10**6},
    "quick": {"map": 2_000, "leaves": 512, "chain": 100, "array": 32 * 2**20, "state": 10**5},
}
W5_SAMPLES = 3
CHILD_TIMEOUT = 600.0


# ---------------------------------------------------------------------- task functions


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def make_array(nbytes: int, seed: int) -> Any:
    import numpy

    return numpy.full(nbytes // 8, float(seed))


def array_sum(a: Any) -> float:
    return float(a.sum())


def tree(delayed: Callable[..., Any], leaves: int, offset: int) -> Any:
    level = [delayed(inc)(offset + i) for i in range(leaves)]
    while len(level) > 1:
        level = [delayed(add)(a, b) for a, b in zip(level[::2], level[1::2])]
    return level[0]


# ---------------------------------------------------------------------- systems


class _System:
    """One cluster + client, behind the calls the workloads make."""

    name = ""
    repeat_long = 3  # repeats of W1 and W2
    client: Any = None
    cluster: Any = None

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.client.submit(fn, *args, **kwargs)

    def map_gather(self, values: range) -> list[int]:
        return list(self.client.gather(self.client.map(inc, values)))

    def tree(self, leaves: int, offset: int) -> int:
        raise NotImplementedError

    def wait(self, futures: list[Any]) -> None:
        raise NotImplementedError

    def scheduler_tasks(self) -> int:
        raise NotImplementedError

    def worker_pids(self) -> dict[str, int]:
        return {str(addr): int(pid) for addr, pid in self.client.run(os.getpid).items()}

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class _Ours(_System):
    name = "ours"

    def __init__(self) -> None:
        import hpc
        from runtime.client import Client, wait
        from runtime.cluster import LocalCluster

        self._hpc = hpc
        self._client_cls, self._cluster_cls, self._wait = Client, LocalCluster, wait

    def start(self) -> None:
        self.cluster = self._cluster_cls(n_workers=2, threads_per_worker=1)
        self.client = self._client_cls(self.cluster)

    def tree(self, leaves: int, offset: int) -> int:
        return int(self._hpc.compute(tree(self._hpc.delayed, leaves, offset))[0])

    def wait(self, futures: list[Any]) -> None:
        self._wait(futures)

    def scheduler_tasks(self) -> int:
        return len(self.cluster._state["scheduler"].state.tasks)


class _Dask(_System):
    name = "dask"
    repeat_long = 1

    def __init__(self) -> None:
        import dask
        from distributed.client import Client, wait
        from distributed.deploy.local import LocalCluster

        self._dask = dask
        self._client_cls, self._cluster_cls, self._wait = Client, LocalCluster, wait

    def start(self) -> None:
        import logging

        self.cluster = self._cluster_cls(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        )
        self.client = self._client_cls(self.cluster)

    def tree(self, leaves: int, offset: int) -> int:
        return int(self._dask.compute(tree(self._dask.delayed, leaves, offset))[0])

    def wait(self, futures: list[Any]) -> None:
        self._wait(futures)

    def scheduler_tasks(self) -> int:
        return len(self.cluster.scheduler.tasks)


SYSTEMS: dict[str, Callable[[], _System]] = {"ours": _Ours, "dask": _Dask}


# ---------------------------------------------------------------------- measuring


def _rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _running(pids: list[int]) -> list[int]:
    """The pids among ``pids`` that still run (zombies count as gone)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            pass
    return alive


def _cluster_memory(system: _System, base_rss: int) -> dict[str, float]:
    workers = sum(_rss(pid) for pid in system.worker_pids().values())
    client = max(0, _rss(os.getpid()) - base_rss)
    return {
        "workers": workers / 2**20,
        "client": client / 2**20,
        "total": (workers + client) / 2**20,
    }


def _best(fn: Callable[[int], float], repeat: int) -> float:
    """The shortest of ``repeat`` timings; ``fn(i)`` runs attempt ``i`` and returns its time."""
    times = []
    for i in range(repeat):
        gc.collect()
        times.append(fn(i))
    return min(times)


@contextlib.contextmanager
def _timer(out: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    out.append(time.perf_counter() - start)


def _wait_idle(system: _System, timeout: float = 20.0) -> None:
    """Wait until the scheduler has forgotten every task (released futures arrive late)."""
    deadline = time.monotonic() + timeout
    while system.scheduler_tasks() and time.monotonic() < deadline:
        time.sleep(0.01)


def _start_to_first(system: _System) -> float:
    start = time.perf_counter()
    system.start()
    if system.submit(inc, 1).result() != 2:
        raise RuntimeError(f"{system.name}: wrong first result")
    return time.perf_counter() - start


def _shutdown(system: _System, pids: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    system.close()
    elapsed = time.perf_counter() - start
    return elapsed, len(_running(pids))


def child_system(kind: str, sizes: dict[str, int], repeat: int) -> dict[str, Any]:
    """Every workload on one system, in this (fresh) process."""
    started = time.perf_counter()
    try:
        system = SYSTEMS[kind]()
    except ImportError as err:
        return {"missing": str(err)}
    result: dict[str, Any] = {"import_s": time.perf_counter() - started}
    gc.collect()
    base_rss = _rss(os.getpid())
    result["start_s"] = _start_to_first(system)
    result["mem_start"] = _cluster_memory(system, base_rss)
    pids = list(system.worker_pids().values())
    addrs = sorted(system.worker_pids())
    offsets = iter(range(1, 10**6))

    n = sizes["map"]
    warm = system.map_gather(range(10**8, 10**8 + n // 20))
    del warm

    def w1(_: int) -> float:
        lo = next(offsets) * 10**7
        t: list[float] = []
        with _timer(t):
            out = system.map_gather(range(lo, lo + n))
        if out[-1] != lo + n:
            raise RuntimeError("W1: wrong result")
        return t[0]

    result["w1_s"] = _best(w1, min(repeat, system.repeat_long))
    gc.collect()
    _wait_idle(system)
    result["mem_w1"] = _cluster_memory(system, base_rss)

    leaves = sizes["leaves"]
    system.tree(64, 10**9)

    def w2(_: int) -> float:
        lo = next(offsets) * 10**7
        t: list[float] = []
        with _timer(t):
            total = system.tree(leaves, lo)
        if total != sum(range(lo + 1, lo + leaves + 1)):
            raise RuntimeError("W2: wrong result")
        return t[0]

    result["w2_s"] = _best(w2, min(repeat, system.repeat_long))

    chain = sizes["chain"]

    def w3(_: int) -> float:
        lo = next(offsets) * 10**7
        t: list[float] = []
        with _timer(t):
            f = system.submit(inc, lo)
            for _ in range(chain - 1):
                f = system.submit(inc, f)
            last = f.result()
        if last != lo + chain:
            raise RuntimeError("W3: wrong result")
        return t[0]

    w3(0)
    result["w3_s"] = _best(w3, repeat)

    nbytes = sizes["array"]

    def w4(i: int) -> float:
        a = system.submit(make_array, nbytes, i, workers=[addrs[0]], pure=False)
        system.wait([a])
        t: list[float] = []
        with _timer(t):
            total = system.submit(array_sum, a, workers=[addrs[1]], pure=False).result()
        if total != float(i) * (nbytes // 8):
            raise RuntimeError("W4: wrong result")
        del a
        _wait_idle(system)
        return t[0]

    result["w4_s"] = _best(w4, repeat)
    result["shutdown_s"], result["left_running"] = _shutdown(system, pids)
    return result


def child_w5(kind: str) -> dict[str, Any]:
    """Start to first result, and shutdown, in this (fresh) process."""
    try:
        system = SYSTEMS[kind]()
    except ImportError as err:
        return {"missing": str(err)}
    start_s = _start_to_first(system)
    pids = list(system.worker_pids().values())
    shutdown_s, left = _shutdown(system, pids)
    return {"start_s": start_s, "shutdown_s": shutdown_s, "left_running": left}


def child_ppe(sizes: dict[str, int], repeat: int) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    n = sizes["map"]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(inc, range(n // 20), chunksize=1))

        def w1(i: int) -> float:
            lo = (i + 1) * 10**7
            t: list[float] = []
            with _timer(t):
                out = list(pool.map(inc, range(lo, lo + n), chunksize=1))
            if out[-1] != lo + n:
                raise RuntimeError("W1 (ppe): wrong result")
            return t[0]

        return {"w1_s": _best(w1, repeat)}


def _raw_sender(port: int, nbytes: int, repeat: int) -> None:
    import socket

    import numpy

    data = numpy.ones(nbytes, dtype=numpy.uint8).data
    for _ in range(repeat):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.recv(1)
            sock.sendall(data)


def child_raw(sizes: dict[str, int], repeat: int) -> dict[str, Any]:
    """Loopback TCP between two processes; a fresh receive buffer per transfer."""
    import multiprocessing
    import socket

    import numpy

    nbytes = sizes["array"]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sender = multiprocessing.get_context("fork").Process(
        target=_raw_sender, args=(port, nbytes, repeat)
    )
    sender.start()
    times = []
    try:
        for _ in range(repeat):
            conn, _ = server.accept()
            with conn:
                buf = numpy.empty(nbytes, dtype=numpy.uint8)
                view = buf.data
                start = time.perf_counter()
                conn.sendall(b"g")
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:])
                    if not n:
                        raise RuntimeError("raw transfer: sender closed early")
                    got += n
                times.append(time.perf_counter() - start)
                del view, buf
    finally:
        sender.join(30)
        server.close()
    return {"w4_s": min(times)}


def _graph_message(n: int) -> tuple[dict[Any, Any], dict[Any, Any], list[Any], dict[Any, Any]]:
    """An update-graph of ``n`` tasks: n/2 roots, n/2 tasks of two roots each.

    Keys are as long as the client's (name, dash, 32 hex digits); payloads are the
    frames ``runtime.serialize.dumps`` makes of a small task, one copy per task as
    received. The functions are referenced by name, so payloads stay small: what is
    measured is the scheduler's own cost, not the user's code.
    """
    import operator

    from runtime.serialize import dumps

    roots = n // 2
    root_frames = dumps((operator.neg, 12345))
    add_frames = dumps((operator.add, "inc-" + "0" * 32, "inc-" + "1" * 32))
    tasks: dict[Any, Any] = {}
    deps: dict[Any, Any] = {}
    prio: dict[Any, Any] = {}
    root_keys = [f"inc-{i:032x}" for i in range(roots)]
    for i, key in enumerate(root_keys):
        tasks[key] = [bytes(memoryview(f)) for f in root_frames]
        deps[key] = []
        prio[key] = (0, 0, i)
    wanted = []
    for i in range(n - roots):
        key = f"add-{i:032x}"
        tasks[key] = [bytes(memoryview(f)) for f in add_frames]
        deps[key] = [root_keys[i], root_keys[(i + 1) % roots]]
        prio[key] = (0, 0, roots + i)
        wanted.append(key)
    return tasks, deps, wanted, prio


def child_state(sizes: dict[str, int]) -> dict[str, Any]:
    """Memory the scheduler state keeps per pending task, for a graph of sizes['state'].

    The message is built first, untraced; ``tracemalloc`` then counts what
    ``update_graph`` allocates and keeps (records, sets, queue entries). Keys and
    payload frames are kept too, and added by their ``sys.getsizeof``. Ingestion is
    timed on a separate state without tracing (tracing slows allocation down).
    """
    import tracemalloc

    from runtime.scheduler import SchedulerState

    def new_state() -> SchedulerState:
        state = SchedulerState()
        for i in range(2):
            state.add_worker(f"tcp://127.0.0.1:{4000 + i}", name=str(i), nthreads=1)
        return state

    n = sizes["state"]
    tasks, deps, wanted, prio = _graph_message(n)
    received = sum(
        sys.getsizeof(k) + sys.getsizeof(v) + sum(sys.getsizeof(f) for f in v)
        for k, v in tasks.items()
    )
    state = new_state()
    start = time.perf_counter()
    state.update_graph("client-1", tasks, deps, wanted, prio)
    ingest_s = time.perf_counter() - start
    del state
    gc.collect()
    state = new_state()
    tracemalloc.start()
    state.update_graph("client-1", tasks, deps, wanted, prio)
    del tasks, deps, wanted, prio
    gc.collect()
    own = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "tasks": len(state.tasks),
        "states": state.tasks_info(),
        "own_per_task": own / n,
        "received_per_task": received / n,
        "bytes_per_task": (own + received) / n,
        "ingest_s": ingest_s,
    }


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="full")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = SIZES[args.size]
    if args.kind in SYSTEMS:
        result = child_system(args.kind, sizes, args.repeat)
    elif args.kind.startswith("w5-"):
        result = child_w5(args.kind[3:])
    elif args.kind == "ppe":
        result = child_ppe(sizes, args.repeat)
    elif args.kind == "raw":
        result = child_raw(sizes, args.repeat)
    elif args.kind == "state":
        result = child_state(sizes)
    else:
        parser.error(f"unknown child {args.kind!r}")
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------- the parent


def _precompile() -> None:
    """Byte-compile our packages, as installing them would (see the module docstring)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "runtime", "hpc"],
        cwd=_ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _run_child(kind: str, size: str, repeat: int, tmpdir: str) -> dict[str, Any] | None:
    out = os.path.join(tmpdir, f"{kind}.json")
    log = os.path.join(tmpdir, f"{kind}.log")
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind, "--out", out]
    argv += ["--size", size, "--repeat", str(repeat)]
    start = time.perf_counter()
    with open(log, "wb") as err:
        try:
            code = subprocess.run(
                argv, cwd=_ROOT, stdout=err, stderr=err, timeout=CHILD_TIMEOUT
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    print(f"  {kind:<10} {time.perf_counter() - start:6.1f} s", flush=True)
    if code != 0 or not os.path.exists(out):
        with open(log, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
        print(f"  {kind} failed (exit code {code}); its output ends with:\n{tail}")
        return None
    with open(out) as f:
        result: dict[str, Any] = json.load(f)
    return result


def _get(result: dict[str, Any] | None, *path: str) -> Any:
    value: Any = result
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    return value


def _per_second(count: float, seconds: float | None) -> float | None:
    return None if not seconds else count / seconds


def _us_per_task(count: int, seconds: float | None) -> float | None:
    return None if seconds is None else seconds / count * 1e6


def _ratio(ours: float | None, reference: float | None) -> float | None:
    return None if ours is None or not reference else ours / reference


def _check(ratio: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if ratio is None else ok(ratio)


def _median(samples: list[dict[str, Any] | None], name: str) -> float | None:
    values = [s[name] for s in samples if s is not None and s.get(name) is not None]
    return statistics.median(values) if values else None


def _target_row(
    metric: str,
    unit: str,
    values: dict[str, float | None],
    reference: str,
    target: str,
    ok: Callable[[float], bool],
) -> Comparison:
    """A row whose ratio is ours over ``reference``; PASS when ``ok(ratio)``."""
    ratio = _ratio(values.get("ours"), values.get(reference))
    return Comparison(metric, unit, values, ratio, target, None if ratio is None else ok(ratio))


def _info_row(metric: str, unit: str, values: dict[str, float | None]) -> Comparison:
    """A row without a target; its ratio is ours over Dask's when both are there."""
    return Comparison(metric, unit, values, _ratio(values.get("ours"), values.get("dask")))


def build_rows(results: dict[str, Any], sizes: dict[str, int]) -> list[Comparison]:
    """The table rows from the children's results (None where a child was not run)."""
    both = ("ours", "dask")
    rows = []

    def seconds(name: str, systems: tuple[str, ...] = both) -> dict[str, float | None]:
        return {s: _get(results.get(s), name) for s in systems}

    n = sizes["map"]
    w1 = {s: _per_second(n, t) for s, t in seconds("w1_s", (*both, "ppe")).items()}
    row = _target_row(
        f"W1 map {n:,}", "tasks/s", w1, "dask", ">= 20x dask, > ppe", lambda r: r >= 20
    )
    above_ppe = _ratio(w1["ours"], w1["ppe"])
    if row.passed is not None and above_ppe is not None:
        row.passed = row.passed and above_ppe > 1
    rows.append(row)
    rows.append(_target_row("   ours vs ppe", "tasks/s", w1, "ppe", "> 1x ppe", lambda r: r > 1))

    tasks = 2 * sizes["leaves"] - 1
    w2 = {s: _per_second(tasks, t) for s, t in seconds("w2_s").items()}
    rows.append(
        _target_row(f"W2 tree {tasks:,}", "tasks/s", w2, "dask", ">= 20x dask", lambda r: r >= 20)
    )

    chain = sizes["chain"]
    w3 = {s: _us_per_task(chain, t) for s, t in seconds("w3_s").items()}
    rows.append(
        _target_row(f"W3 chain {chain}", "us/task", w3, "dask", "<= 0.1x dask", lambda r: r <= 0.1)
    )

    mb = sizes["array"] / 1e6
    w4 = {s: _per_second(mb, t) for s, t in seconds("w4_s", (*both, "raw")).items()}
    name = f"W4 {sizes['array'] // 2**20} MiB A->B"
    rows.append(_target_row(name, "MB/s", w4, "raw", ">= 0.7x raw tcp", lambda r: r >= 0.7))
    rows.append(_info_row("   ours vs dask", "MB/s", w4))

    samples = {s: [results.get(s), *results.get(f"w5-{s}", [])] for s in both}
    start = {s: _median(samples[s], "start_s") for s in both}
    stop = {s: _median(samples[s], "shutdown_s") for s in both}
    total: dict[str, float | None] = {}
    for s in both:
        first, last = start[s], stop[s]
        total[s] = None if first is None or last is None else first + last
    left: dict[str, float | None] = {
        s: float(sum(x.get("left_running", 0) for x in samples[s] if x is not None)) for s in both
    }
    row = _target_row(
        "W5 start+first+shutdown", "s", total, "dask", "<= 1/3 dask, clean", lambda r: r <= 1 / 3
    )
    if row.passed is not None:
        row.passed = row.passed and left["ours"] == 0
    rows.append(row)
    rows.append(_info_row("   start to first result", "s", start))
    rows.append(_info_row("   shutdown", "s", stop))
    rows.append(_info_row("   processes left running", "count", left))
    rows.append(_info_row("   client import (not in W5)", "s", seconds("import_s")))

    for label, key in (("after start", "mem_start"), ("after W1", "mem_w1")):
        mem = {s: _get(results.get(s), key, "total") for s in both}
        rows.append(
            _target_row(
                f"memory {label}", "MiB RSS", mem, "dask", "<= 0.5x dask", lambda r: r <= 0.5
            )
        )
        for part in ("workers", "client"):
            rows.append(
                _info_row(
                    f"   {part}", "MiB RSS", {s: _get(results.get(s), key, part) for s in both}
                )
            )

    state = results.get("state")
    count = sizes["state"]
    rows.append(
        _info_row(
            f"sched memory/task ({count:,})", "bytes", {"ours": _get(state, "bytes_per_task")}
        )
    )
    rows.append(_info_row("   state structures", "bytes", {"ours": _get(state, "own_per_task")}))
    received = {"ours": _get(state, "received_per_task")}
    rows.append(_info_row("   key + payload as received", "bytes", received))
    ingest = {"ours": _per_second(count, _get(state, "ingest_s"))}
    rows.append(_info_row("   update-graph ingest", "tasks/s", ingest))
    return rows


def main(argv: list[str] | None = None) -> list[Comparison]:
    """Run every child, print the table and return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per workload")
    parser.add_argument("--no-dask", action="store_true", help="leave Dask out")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    sizes = SIZES[size]
    _precompile()
    results: dict[str, Any] = {}
    systems = ["ours"] if args.no_dask else ["ours", "dask"]
    with tempfile.TemporaryDirectory(prefix="hpc-bench-") as tmpdir:
        run = lambda kind: _run_child(kind, size, args.repeat, tmpdir)  # noqa: E731
        results["raw"] = run("raw")
        results["ppe"] = run("ppe")
        for name in systems:
            results[name] = run(name)
        if "missing" in (results.get("dask") or {}):
            print(f"dask is not installed ({results['dask']['missing']}): showing ours only "
                  "(pip install '.[bench]')")  # fmt: skip
            results.pop("dask")
            systems = ["ours"]
        for _ in range(W5_SAMPLES - 1):
            for name in systems:
                results.setdefault(f"w5-{name}", []).append(run(f"w5-{name}"))
        results["state"] = run("state")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print()
    for name in systems:
        samples = [results.get(name), *results.get(f"w5-{name}", [])]
        shown = ", ".join(
            f"{x['start_s']:.3f}+{x['shutdown_s']:.3f}" for x in samples if x is not None
        )
        print(f"W5 samples {name} (start to first result + shutdown, s): {shown}")
    if args.quick:
        print("(--quick: small sizes; the targets are for the full sizes)")
    columns = [*systems, "ppe", "raw"]
    rows = build_rows(results, sizes)
    print_comparison(rows, columns)
    return rows


if __name__ == "__main__":
    _unshadow_dask()
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    main()
