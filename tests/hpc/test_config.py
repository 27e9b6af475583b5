"""``hpc.config`` is the front door to runtime.config: one state, two names."""

from __future__ import annotations

import hpc.config
import runtime.config


def test_hpc_config_set_changes_what_the_engine_reads():
    with hpc.config.set(scheduler="sync"):
        assert runtime.config.get("scheduler") == "sync"
        assert runtime.config.sources("scheduler") == "set()"
    with runtime.config.set(num_workers=3):
        assert hpc.config.get("num-workers") == 3


def test_hpc_config_names_are_the_runtime_objects():
    assert hpc.config.config is runtime.config.config
    for name in hpc.config.__all__:
        assert getattr(hpc.config, name) is getattr(runtime.config, name), name


def test_hpc_config_public_surface():
    assert hpc.config.__all__ == [
        "collect",
        "config",
        "get",
        "refresh",
        "set",
        "show",
        "sources",
        "validate",
    ]
