"""Per-task overhead of the local schedulers, side by side with Dask's when installed.

Workloads (graph construction included, as a user experiences it):

- tree reduction: 4,096 leaves combined pairwise (8,191 tasks) with ``delayed``;
- independent map: 10,000 independent ``delayed`` calls computed together.

Each system runs the same Python functions. Ratios are Dask's time over ours for the
same scheduler kind (higher is better for us; the target is >= 2x).
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Measurement, best_of, print_table  # noqa: E402

import hpc  # noqa: E402

LEAVES = 4096
MAP_TASKS = 10_000


def inc(x: int) -> int:
    return x + 1


def tree(delayed, leaves: int):
    level = [delayed(inc)(i) for i in range(leaves)]
    while len(level) > 1:
        level = [delayed(operator.add)(a, b) for a, b in zip(level[::2], level[1::2])]
    return level[0]


def tree_ours(scheduler: str) -> int:
    return hpc.compute(tree(hpc.delayed, LEAVES), scheduler=scheduler)[0]


def map_ours(scheduler: str) -> int:
    parts = [hpc.delayed(inc)(i) for i in range(MAP_TASKS)]
    return len(hpc.compute(*parts, scheduler=scheduler))


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        import dask
    except ImportError:
        dask = None
        print("dask is not installed: showing hpc-toolkit only (pip install '.[bench]')")
    expected_tree = sum(range(1, LEAVES + 1))
    rows: list[Measurement] = []
    for kind in ("sync", "threads"):
        assert tree_ours(kind) == expected_tree
        rows.append(
            Measurement(
                f"tree-{LEAVES} ({kind})",
                "hpc",
                best_of(lambda k=kind: tree_ours(k), args.repeat),
                2 * LEAVES - 1,
            )
        )
        if dask is not None:

            def tree_dask(k=kind):
                return dask.compute(tree(dask.delayed, LEAVES), scheduler=k)[0]

            assert tree_dask() == expected_tree
            rows.append(
                Measurement(
                    f"tree-{LEAVES} ({kind})",
                    "dask",
                    best_of(tree_dask, args.repeat),
                    2 * LEAVES - 1,
                )
            )
    for kind in ("sync", "threads"):
        rows.append(
            Measurement(
                f"map-{MAP_TASKS} ({kind})",
                "hpc",
                best_of(lambda k=kind: map_ours(k), args.repeat),
                MAP_TASKS,
            )
        )
        if dask is not None:

            def map_dask(k=kind):
                parts = [dask.delayed(inc)(i) for i in range(MAP_TASKS)]
                return len(dask.compute(*parts, scheduler=k))

            rows.append(
                Measurement(
                    f"map-{MAP_TASKS} ({kind})", "dask", best_of(map_dask, args.repeat), MAP_TASKS
                )
            )
    print_table(rows, baseline="dask" if dask is not None else None)
    return rows


if __name__ == "__main__":
    main()
