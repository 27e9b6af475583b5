"""Running batch-system commands: one call, and retries with back-off.

Everything that talks to ``sbatch``/``squeue``/``qsub``/... goes through a *runner*,
a callable with :func:`run_command`'s signature. Tests pass a fake runner that replays
recorded outputs, so the parsers and the retry policy are tested without a batch
system. This module keeps no state.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["CommandResult", "Retry", "Runner", "run_command"]


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a command did.

    ``returncode`` is ``None`` when the command could not be started or did not finish
    within its timeout; ``stderr`` then says which.
    """

    argv: tuple[str, ...]
    returncode: int | None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """Whether the command ran and exited with status 0."""
        return self.returncode == 0

    @property
    def output(self) -> str:
        """stderr and stdout together: some tools (Torque-compatible qsub) report errors on stdout."""
        return "\n".join(part for part in (self.stderr.strip(), self.stdout.strip()) if part)


class Runner(Protocol):
    """Runs one command; see :func:`run_command`."""

    def __call__(
        self, argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None
    ) -> CommandResult: ...


def run_command(
    argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None
) -> CommandResult:
    """Run ``argv`` without a shell and capture its output as text.

    Never raises for the command's own failures: a missing executable or a timeout
    comes back as a result with ``returncode=None``.
    """
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return CommandResult(
            tuple(argv), None, "", f"{argv[0]}: command not found on PATH (is it installed?)"
        )
    except subprocess.TimeoutExpired:
        return CommandResult(tuple(argv), None, "", f"{argv[0]}: timed out after {timeout}s")
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


@dataclasses.dataclass(frozen=True)
class Retry:
    """How often and how patiently to retry transient failures.

    Attempt ``k`` (from 0) that fails transiently waits ``min(delay * factor**k,
    max_delay)`` seconds before the next one; after ``retries`` retries the failure is
    raised.
    """

    retries: int = 3
    delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def delays(self) -> list[float]:
        """The waits between attempts, in order.

        Examples
        --------
        >>> Retry(retries=4, delay=1.0, max_delay=5.0).delays()
        [1.0, 2.0, 4.0, 5.0]
        """
        return [min(self.delay * self.factor**k, self.max_delay) for k in range(self.retries)]
