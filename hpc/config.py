"""``hpc.config``: read and change hpc-toolkit's configuration.

The front door to `runtime.config`. It keeps no state of its own: every name here is
the very object defined there, so ``hpc.config.set(scheduler="sync")`` changes what
the engine's ``runtime.config.get("scheduler")`` returns, and ``hpc.config.config`` is
the same dict.

Examples
--------
>>> import hpc.config
>>> with hpc.config.set(scheduler="sync"):
...     hpc.config.get("scheduler")
'sync'
>>> hpc.config.sources("multiprocessing.context")  # doctest: +SKIP
'default /.../runtime/runtime.yaml'
"""

from __future__ import annotations

from runtime.config import collect, config, get, refresh, set, show, sources, validate

__all__ = ["collect", "config", "get", "refresh", "set", "show", "sources", "validate"]
