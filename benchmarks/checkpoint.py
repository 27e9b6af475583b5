"""What checkpoints cost, and how fast a restarted scheduler gets back to work.

1. Overhead: a tree reduction whose every task returns 1 MB (a float64 array of
   131,072 values) and first does ``--work`` of numpy computation, run with and
   without ``checkpoint=DIR`` (a fresh directory each run, so that every result is
   written), on the threads scheduler and on a LocalCluster. Target: <= 10% extra.
   Shown with ``checkpoint.fsync`` on (the default: files survive a node crash) and
   off (they survive killed processes only).
2. Resume: a graph of 10,000 map tasks is computed with checkpoints; the scheduler is
   killed (SIGKILL) and a new one started; a new client runs the same map plus a
   reduction over it. Measured: from starting the new scheduler process to the start
   of the first reduction task (the first task that is really computed). Scheduler,
   workers and clients are separate processes, as on a cluster. Target: < 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import best_of  # noqa: E402

import hpc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
VALUES = 131_072  # 1 MB of float64


def _busy(seconds: float, out: object) -> None:
    """Do ``seconds`` of numpy work (which releases the GIL, as real kernels do)."""
    import numpy as np

    end = time.perf_counter() + seconds
    scratch = np.empty(4096)
    while time.perf_counter() < end:
        np.sqrt(np.arange(4096.0), out=scratch)


def make(i: int, work: float) -> object:
    import numpy as np

    _busy(work, None)
    return np.full(VALUES, float(i))


def add(a: object, b: object, work: float) -> object:
    _busy(work, None)
    return a + b  # type: ignore[operator]


def tree(leaves: int, work: float) -> object:
    level = [hpc.delayed(make)(i, work) for i in range(leaves)]
    while len(level) > 1:
        level = [hpc.delayed(add)(a, b, work) for a, b in zip(level[::2], level[1::2])]
    return level[0]


def _runners(stack: contextlib.ExitStack) -> dict[str, dict]:
    """The schedulers to compare; a cluster's workers read the config when started."""
    cluster = stack.enter_context(hpc.LocalCluster(n_workers=2, threads_per_worker=1))
    client = stack.enter_context(hpc.Client(cluster))
    return {
        "threads (2)": {"scheduler": "threads", "num_workers": 2},
        "LocalCluster (2x1)": {"scheduler": client},
    }


def overhead(leaves: int, works: list[float], repeat: int) -> None:
    tasks = 2 * leaves - 1
    print(
        f"tree reduction, {leaves} leaves ({tasks} tasks, 1 MB result each: {tasks} MB "
        f"written per checkpointed run), best of {repeat}"
    )
    header = (
        f"{'scheduler':<22}{'fsync':<7}{'work/task':>10}{'plain s':>10}{'checkpoint s':>14}"
        f"{'extra':>8}{'per task':>10}"
    )
    print(header)
    print("-" * len(header))
    scratch = Path(tempfile.mkdtemp(prefix="hpc-ckpt-bench-"))
    try:
        for fsync in (True, False):
            with hpc.config.set({"checkpoint.fsync": fsync}), contextlib.ExitStack() as stack:
                for name, kwargs in _runners(stack).items():
                    for work in works:

                        def plain(kwargs=kwargs, work=work) -> None:
                            hpc.compute(tree(leaves, work), checkpoint=False, **kwargs)

                        def checkpointed(kwargs=kwargs, work=work) -> None:
                            where = scratch / "run"
                            try:
                                hpc.compute(tree(leaves, work), checkpoint=where, **kwargs)
                            finally:
                                shutil.rmtree(where, ignore_errors=True)

                        base = best_of(plain, repeat)
                        with_ckpt = best_of(checkpointed, repeat)
                        extra = with_ckpt - base
                        print(
                            f"{name:<22}{'on' if fsync else 'off':<7}{work * 1e3:>8.0f}ms"
                            f"{base:>10.3f}{with_ckpt:>14.3f}{extra / base * 100:>7.1f}%"
                            f"{extra / tasks * 1e3:>8.2f}ms"
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------- resume


def square(i: int) -> int:
    return i * i


def first_new(marker: str, a: int, b: int) -> int:
    """A reduction task: records when the first of them started."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, repr(time.time()).encode())
        os.close(fd)
    return a + b


def resume_graph(n: int, marker: str, reduce: bool) -> object:
    level = [hpc.delayed(square)(i) for i in range(n)]
    if not reduce:
        return hpc.delayed(len)(level)
    while len(level) > 1:
        pairs = list(zip(level[::2], level[1::2]))
        rest = level[2 * len(pairs) :]
        level = [hpc.delayed(first_new)(marker, a, b) for a, b in pairs] + rest
    return level[0]


CLIENT = textwrap.dedent(
    """
    import sys, time
    import hpc
    from checkpoint import resume_graph

    scheduler_file, store, marker, n, reduce = sys.argv[1:6]
    start = time.time()
    with hpc.Client(scheduler_file=scheduler_file, timeout=60) as client:
        connected = time.time()
        graph = resume_graph(int(n), marker, reduce == "1")
        built = time.time()
        (result,) = hpc.compute(graph, checkpoint=store)
        done = time.time()
    print("TIMES", start, connected, built, done, result, flush=True)
    """
)


class _Cluster:
    """Scheduler and worker processes sharing one scheduler file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.file = tmp / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def scheduler(self) -> subprocess.Popen:
        with contextlib.suppress(FileNotFoundError):
            self.file.unlink()
        return self.start(
            "-m",
            "runtime.scheduler",
            "--scheduler-file",
            str(self.file),
            "--host",
            "127.0.0.1",
            "--log-level",
            "WARNING",
        )

    def workers(self, n: int, nthreads: int) -> None:
        for _ in range(n):
            self.start(
                "-m",
                "runtime.worker",
                "--scheduler-file",
                str(self.file),
                "--nthreads",
                str(nthreads),
                "--memory-limit",
                "none",
            )

    def client(self, store: Path, marker: Path, n: int, reduce: bool) -> list[float]:
        script = self.tmp / "client.py"
        script.write_text(CLIENT)
        proc = self.start(
            str(script),
            str(self.file),
            str(store),
            str(marker),
            str(n),
            "1" if reduce else "0",
        )
        out, _ = proc.communicate(timeout=600)
        line = next(x for x in out.splitlines() if x.startswith("TIMES "))
        return [float(x) for x in line.split()[1:]]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def resume(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hpc-resume-bench-"))
    cluster = _Cluster(tmp)
    store, marker = tmp / "store", tmp / "first-new-task"
    try:
        scheduler = cluster.scheduler()
        cluster.workers(2, 2)
        first = cluster.client(store, marker, n, reduce=False)
        stored = len(list(store.rglob("*.ckpt")))
        print(
            f"resume: {stored} checkpoints written by the first run ({first[3] - first[0]:.1f} s)"
        )

        scheduler.send_signal(signal.SIGKILL)
        scheduler.wait()
        restart = time.time()
        cluster.scheduler()
        times = cluster.client(store, marker, n, reduce=True)
        started, connected, built, done, result = times
        first_task = float(marker.read_text())
        assert int(result) == sum(i * i for i in range(n)), result
        print(f"  client connected            {connected - restart:7.2f} s after the restart")
        print(f"  graph built ({2 * n - 1} tasks)  {built - connected:7.2f} s")
        print(f"  first new task started      {first_task - restart:7.2f} s after the restart")
        print(f"  whole graph done            {done - restart:7.2f} s after the restart")
        print(f"  checkpoints now             {len(list(store.rglob('*.ckpt')))}")
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _importable_by_workers() -> None:
    """Make worker processes find this file's task functions by reference.

    ``benchmarks/run.py`` loads this file as ``benchmarks_checkpoint``, a name other
    processes cannot import; publish the functions as ``checkpoint.*`` instead (this
    directory is on the workers' PYTHONPATH, see :func:`main`).
    """
    if __name__ in ("__main__", "checkpoint"):
        return  # __main__ is pickled by value; "checkpoint" is importable as it is
    sys.modules.setdefault("checkpoint", sys.modules[__name__])
    for func in (make, add, square, first_new):
        func.__module__ = "checkpoint"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--leaves", type=int, default=64)
    parser.add_argument(
        "--work",
        type=float,
        nargs="+",
        default=[0.0, 0.02, 0.05, 0.1],
        help="seconds of work per task",
    )
    parser.add_argument("--resume-tasks", type=int, default=10_000)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args(argv)
    # Workers unpickle this module's functions by reference: let them import it.
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), path] if path else [str(HERE)])
    _importable_by_workers()
    if not args.skip_overhead:
        overhead(args.leaves, args.work, args.repeat)
    if not args.skip_resume:
        resume(args.resume_tasks)


if __name__ == "__main__":
    main()
