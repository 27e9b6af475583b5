"""Run every benchmark and print the tables (``make bench``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUITES = ["local_schedulers"]


def main() -> int:
    only = sys.argv[1:] or SUITES
    for name in only:
        print(f"\n== {name} ==")
        importlib.import_module(name).main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
