"""Quick-start demo: a word count and a tree reduction built with ``hpc.delayed``.

Run it with ``make demo``. It generates a corpus, counts words per document in
parallel, merges the counts with a tree reduction, and checks every answer against a
plain serial computation, on each local scheduler (and on a local distributed cluster
when the distributed runtime is available).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import hpc

WORDS = [
    "allocation",
    "batch",
    "checkpoint",
    "cluster",
    "core",
    "dask",
    "delayed",
    "future",
    "graph",
    "job",
    "mpi",
    "node",
    "partition",
    "queue",
    "rank",
    "scheduler",
    "slurm",
    "task",
    "thread",
    "walltime",
    "worker",
]


def make_corpus(n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Return ``n_docs`` documents of random words, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=words_per_doc)) for _ in range(n_docs)]


def count_words(doc: str) -> Counter:
    return Counter(doc.split())


def merge(a: Counter, b: Counter) -> Counter:
    return a + b


def add(a: int, b: int) -> int:
    return a + b


def tree_reduce(items: list[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Combine ``items`` pairwise, level by level, into one delayed value."""
    level = list(items)
    while len(level) > 1:
        nxt = [hpc.delayed(combine, pure=True)(a, b) for a, b in zip(level[::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def build(corpus: list[str], leaves: int) -> tuple[Any, Any]:
    counts = [hpc.delayed(count_words, pure=True)(doc) for doc in corpus]
    word_count = tree_reduce(counts, merge)
    numbers = [hpc.delayed(lambda i: i * i, pure=True)(i) for i in range(leaves)]
    sum_of_squares = tree_reduce(numbers, add)
    return word_count, sum_of_squares


def run(scheduler: Any, corpus: list[str], leaves: int, expected: tuple) -> float:
    start = time.perf_counter()
    word_count, sum_of_squares = build(corpus, leaves)
    wc, ss = hpc.compute(word_count, sum_of_squares, scheduler=scheduler)
    elapsed = time.perf_counter() - start
    if (wc, ss) != expected:
        raise SystemExit(f"wrong answer from scheduler {scheduler!r}")
    return elapsed


def _have_mpi() -> bool:
    import importlib.util
    import shutil

    bindir = os.path.dirname(sys.executable)
    return importlib.util.find_spec("mpi4py") is not None and bool(
        shutil.which("mpiexec", path=bindir) or shutil.which("mpiexec")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--leaves", type=int, default=4096)
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    corpus = make_corpus(args.docs, args.words)
    expected_wc = Counter()
    for doc in corpus:
        expected_wc.update(doc.split())
    expected = (expected_wc, sum(i * i for i in range(args.leaves)))
    n_tasks = (2 * args.docs - 1) + (2 * args.leaves - 1)

    print(
        f"corpus: {args.docs} documents x {args.words} words; tree reduction: {args.leaves} leaves"
    )
    print(f"graph: {n_tasks} tasks per run\n")
    top = ", ".join(f"{w}={c}" for w, c in expected_wc.most_common(5))
    print(f"top words: {top}")
    print(f"sum of squares 0..{args.leaves - 1}: {expected[1]}\n")
    print(f"{'scheduler':<24}{'seconds':>10}{'tasks/s':>12}")
    for name in ("sync", "threads", "processes"):
        elapsed = run(name, corpus, args.leaves, expected)
        print(f"{name:<24}{elapsed:>10.3f}{n_tasks / elapsed:>12,.0f}")
    if args.distributed:
        with (
            hpc.LocalCluster(n_workers=2, threads_per_worker=1) as cluster,
            hpc.Client(cluster) as client,
        ):
            elapsed = run(client, corpus, args.leaves, expected)
            print(f"{'LocalCluster (2 procs)':<24}{elapsed:>10.3f}{n_tasks / elapsed:>12,.0f}")
        if _have_mpi():
            # The same graph on an MPI-launched cluster: mpiexec -n 3 python -m runtime.mpi
            # (rank 0 scheduler, ranks 1-2 workers), as a batch job would start it.
            logs = tempfile.mkdtemp(prefix="hpc-demo-")  # job script and rank output
            with (
                hpc.LocalMPICluster(
                    profile="local-mpi", tasks_per_node=3, log_directory=logs
                ) as cluster,
                hpc.Client(cluster) as client,
            ):
                elapsed = run(client, corpus, args.leaves, expected)
                print(
                    f"{'mpiexec -n 3 (2 workers)':<24}{elapsed:>10.3f}{n_tasks / elapsed:>12,.0f}"
                )
        else:
            print("(mpiexec/mpi4py not installed: pip install 'hpc-toolkit[mpi]' for the MPI run)")
    print("\nall results match the serial computation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
