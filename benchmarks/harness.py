"""Timing helpers shared by the benchmarks: best-of-N wall time and a results table."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
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


@dataclass
class Comparison:
    """One row of a side-by-side table: a metric on several systems, and its target.

    ``values`` maps a system name to its measurement (None: not measured, e.g. Dask
    not installed). ``ratio`` is ours against the reference named in ``target``;
    ``passed`` is None when the row has no target or the reference is missing.
    """

    metric: str
    unit: str
    values: Mapping[str, float | None]
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None


def format_value(value: float | None) -> str:
    """A number short enough for a table cell: ``12,345``, ``98.7``, ``0.0123``, ``-``."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_comparison(rows: list[Comparison], systems: list[str]) -> None:
    """Print ``rows`` with one column per system, then ratio, target and PASS/MISS."""
    metric_width = max([len(r.metric) for r in rows] + [6]) + 2
    unit_width = max([len(r.unit) for r in rows] + [4]) + 2
    header = f"{'metric':<{metric_width}}{'unit':<{unit_width}}"
    header += "".join(f"{s:>12}" for s in systems)
    header += f"{'ratio':>9}  {'target':<26}{'result':<6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r.metric:<{metric_width}}{r.unit:<{unit_width}}"
        line += "".join(f"{format_value(r.values.get(s)):>12}" for s in systems)
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        result = {True: "PASS", False: "MISS", None: "-" if not r.target else "n/a"}[r.passed]
        line += f"{ratio:>9}  {r.target:<26}{result:<6}"
        print(line.rstrip())
