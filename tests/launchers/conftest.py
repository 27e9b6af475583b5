"""Fakes for testing launchers without a batch system: a command runner and a clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from launchers import CommandResult


class FakeRunner:
    """Replays recorded command outputs and records what was run.

    ``reply("squeue", 0, stdout)`` queues an answer for the next ``squeue``; the last
    answer queued for a command repeats until another is queued. A command with no
    answer fails the test.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self._replies: dict[str, list[tuple[int | None, str, str]]] = {}
        self._repeating: set[str] = set()

    def reply(
        self, command: str, returncode: int | None = 0, stdout: str = "", stderr: str = ""
    ) -> FakeRunner:
        if command in self._repeating:  # an answer already given is replaced
            self._replies[command].clear()
            self._repeating.discard(command)
        self._replies.setdefault(command, []).append((returncode, stdout, stderr))
        return self

    def __call__(
        self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        self.calls.append((list(argv), cwd))
        queue = self._replies.get(argv[0])
        if not queue:
            raise AssertionError(f"unexpected command: {list(argv)}")
        if len(queue) > 1:
            returncode, stdout, stderr = queue.pop(0)
        else:
            returncode, stdout, stderr = queue[0]
            self._repeating.add(argv[0])
        return CommandResult(tuple(argv), returncode, stdout, stderr)

    def commands(self) -> list[str]:
        return [argv[0] for argv, _ in self.calls]


class FakeClock:
    """A monotonic clock that moves only when told; ``sleep`` advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
