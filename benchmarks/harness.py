"""Timing helpers shared by the benchmarks: best-of-N wall time and a results table."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Measurement:
    workload: str
    system: str
    seconds: float
    tasks: int

    @property
    def tasks_per_second(self) -> float:
        return self.tasks / self.seconds

    @property
    def us_per_task(self) -> float:
        return self.seconds / self.tasks * 1e6


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Return the shortest wall time of ``repeat`` calls of ``fn`` (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table(rows: list[Measurement], baseline: str | None = None) -> None:
    """Print measurements grouped by workload, with ratios against ``baseline``."""
    by_workload: dict[str, list[Measurement]] = {}
    for row in rows:
        by_workload.setdefault(row.workload, []).append(row)
    header = f"{'workload':<28}{'system':<26}{'seconds':>9}{'tasks/s':>11}{'us/task':>9}"
    if baseline:
        header += f"{'vs ' + baseline:>16}"
    print(header)
    print("-" * len(header))
    for workload, group in by_workload.items():
        base = next((r for r in group if r.system == baseline), None)
        for r in group:
            line = (
                f"{workload:<28}{r.system:<26}{r.seconds:>9.3f}"
                f"{r.tasks_per_second:>11,.0f}{r.us_per_task:>9.1f}"
            )
            if base is not None:
                line += f"{base.seconds / r.seconds:>15.2f}x"
            print(line)
