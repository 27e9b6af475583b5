"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from runtime import checkpoint

HOLD_TIMEOUT = 30.0


class SaveProbe:
    """Stands in for ``runtime.checkpoint.save_quietly``, around the real one.

    Records the name of each thread that saves; after :meth:`hold`, each save waits
    for :attr:`release` (failing after ``HOLD_TIMEOUT`` s, so a test that never
    releases fails instead of hanging). :attr:`started` is set when a save begins,
    :attr:`written` when one has written its file.
    """

    def __init__(self, save: Callable[..., bool]) -> None:
        self._save = save
        self.threads: list[str] = []
        self.started = threading.Event()
        self.written = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> SaveProbe:
        self.release.clear()
        return self

    def __call__(self, directory: str, token: str, value: Any, key: Any = None) -> bool:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(HOLD_TIMEOUT), "the test never released the write"
        ok = self._save(directory, token, value, key)
        self.written.set()
        return ok


@pytest.fixture
def checkpoint_saves(monkeypatch: pytest.MonkeyPatch) -> SaveProbe:
    """Every checkpoint save of this process goes through a :class:`SaveProbe`."""
    probe = SaveProbe(checkpoint.save_quietly)
    monkeypatch.setattr(checkpoint, "save_quietly", probe)
    return probe
