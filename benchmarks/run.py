"""Run every benchmark and print the tables (``make bench``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SUITES = ["local_schedulers", "checkpoint", "distributed"]


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as ``benchmarks_<name>``.

    Not by its own name: ``distributed`` would otherwise be taken for Dask's package.
    """
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no benchmark suite {name!r} in {HERE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    only = sys.argv[1:] or SUITES
    for name in only:
        print(f"\n== {name} ==")
        load(name).main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
