"""The settings of one batch job, checked as they are set.

A :class:`JobSpec` holds what every job script needs, whatever the batch system:
resources (nodes, tasks, cores, memory, GPUs, walltime), where it queues (queue,
account), what runs before the work (prologue, environment variables) and how the MPI
ranks start (launcher, its arguments). Each value is converted and checked when it is
assigned, so a negative core count or a walltime of ``"1:2:3:4"`` fails at the line that
set it, long before ``sbatch`` would have complained - and an unknown setting is an
error that lists the valid ones.

Values that end up in ``#SBATCH``/``#PBS`` directive lines may not contain line breaks
(a newline would start a line of its own, possibly a directive). Quoting is not done
here: the renderer quotes every value it substitutes.

Memory is *per node*, given as bytes or a string with units (``"4GiB"``, ``"4GB"``;
``GB`` is decimal, ``GiB`` binary, as in :func:`runtime.units.parse_bytes`). SLURM and
PBS read ``M``/``mb`` as MiB (2**20 bytes), so scripts carry the value converted to MiB
and rounded down: ``memory="4GB"`` becomes ``--mem=3814M``, ``memory="4GiB"`` becomes
``--mem=4096M``. We never ask for more than was given.

Near the walltime a cluster job *drains*: from ``walltime - drain_lead`` on, its
runtime starts no new tasks, lets the running ones finish and checkpoint, then ends -
and, as ``restart`` says, comes back by requeueing itself (same job id) or submitting
a replacement (a new id), at most ``max_restarts`` times. ``drain_signal`` starts the
drain too; with an ``srun`` launcher SLURM sends it to the ranks ``drain_lead`` before
the end.

This module keeps no state beyond the specs themselves.
"""

from __future__ import annotations

import datetime
import enum
import math
import os
import re
import shlex
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from launchers._errors import JobConfigError
from runtime.errors import ConfigError
from runtime.units import parse_bytes, parse_timedelta

__all__ = [
    "JOB_VARIABLES",
    "JobSpec",
    "MPIImplementation",
    "RestartMode",
    "format_walltime",
    "memory_mib",
    "parse_walltime",
]

_WALLTIME_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINE_BREAKS = re.compile(r"[\n\r\x00\x0b\x0c\x85\u2028\u2029]")

#: Environment variables through which the launcher tells a job's runtime when to drain
#: and how to come back, and where the field that sets each one is. Job scripts export
#: the first five; whoever submits a restart passes the last two on its command line.
#: ``env`` may not set any of them.
JOB_VARIABLES: dict[str, str] = {
    "HPC_JOB_DRAIN_AT": "walltime and drain_lead",
    "HPC_JOB_DRAIN_SIGNAL": "drain_signal",
    "HPC_JOB_RESTART": "restart",
    "HPC_JOB_MAX_RESTARTS": "max_restarts",
    "HPC_JOB_SCRIPT": "the path the script is written to",
    "HPC_JOB_RESTARTS": "the restart count, passed on the command line of a restart",
    "HPC_JOB_RESTART_OF": "the job replaced, passed on the command line of a restart",
}

# Signals a drain cannot use, and why.
_UNUSABLE_SIGNALS = {
    "USR1": "MPICH's mpiexec (hydra) uses SIGUSR1 itself",
    "KILL": "SIGKILL cannot be caught",
    "STOP": "SIGSTOP cannot be caught",
}


class MPIImplementation(enum.Enum):
    """Which MPI the launcher belongs to; it decides launcher-specific flags."""

    MPICH = "mpich"
    OPENMPI = "openmpi"
    OTHER = "other"


class RestartMode(enum.Enum):
    """How a cluster job comes back after draining before its walltime."""

    #: It does not: the job drains and ends.
    NONE = "none"
    #: The job requeues itself and runs again under the same job id (SLURM also
    #: requeues it after a node failure or preemption). Needs a site that allows
    #: requeueing (SLURM ``JobRequeue``, PBS rerunnable jobs).
    REQUEUE = "requeue"
    #: The job submits a copy of its script, which runs under a new job id.
    RESUBMIT = "resubmit"


def parse_walltime(value: object) -> int | None:
    """Return a walltime in whole seconds.

    Parameters
    ----------
    value
        ``None``; a number of seconds; a :class:`datetime.timedelta`; a clock string
        ``"HH:MM:SS"`` or ``"D-HH:MM:SS"``; or a duration with a unit (``"90min"``,
        ``"2h"``). Fractions of a second are rounded up.

    Raises
    ------
    JobConfigError
        The value is not one of those forms, or is not positive. ``"MM:SS"`` and
        ``"HH:MM"`` are refused because SLURM and PBS read two-part times differently.

    Examples
    --------
    >>> parse_walltime("01:30:00")
    5400
    >>> parse_walltime("1-00:00:00")
    86400
    >>> parse_walltime("45min")
    2700
    """
    if value is None:
        return None
    return _seconds("walltime", value)


def _seconds(name: str, value: object) -> int:
    """A positive duration in whole seconds, rounded up; the forms of :func:`parse_walltime`."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise JobConfigError(f"{name} {value!r} is not a duration; write e.g. '01:30:00'")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _WALLTIME_CLOCK.match(text)
        if match:
            days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
            seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
        elif ":" in text:
            raise JobConfigError(
                f"{name} {value!r} is malformed; write 'HH:MM:SS' or 'D-HH:MM:SS' "
                "(two-part times are ambiguous between SLURM and PBS), or e.g. '90min'"
            )
        else:
            try:
                parsed = parse_timedelta(text)
            except ConfigError:
                raise JobConfigError(
                    f"{name} {value!r} is malformed; write 'HH:MM:SS', 'D-HH:MM:SS', "
                    "a number of seconds, or a duration such as '90min' or '2h'"
                ) from None
            seconds = float(parsed or 0.0)
    else:
        raise JobConfigError(f"{name} {value!r} is not a duration; write e.g. '01:30:00'")
    if not seconds > 0:
        raise JobConfigError(f"{name} {value!r} must be positive")
    return math.ceil(seconds)


def format_walltime(seconds: int, *, days: bool = False) -> str:
    """Format whole seconds as ``HH:MM:SS``, or ``D-HH:MM:SS`` from one day up if ``days``.

    Examples
    --------
    >>> format_walltime(5400)
    '01:30:00'
    >>> format_walltime(100000)
    '27:46:40'
    >>> format_walltime(100000, days=True)
    '1-03:46:40'
    """
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if days and hours >= 24:
        d, hours = divmod(hours, 24)
        return f"{d}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def memory_mib(nbytes: int) -> int:
    """Bytes as whole MiB, rounded down but at least 1: what ``--mem=<n>M`` gets.

    Examples
    --------
    >>> memory_mib(4 * 10**9)
    3814
    >>> memory_mib(4 * 2**30)
    4096
    """
    return max(1, nbytes // 2**20)


# --- converters: each takes the field name and a value, returns the stored value ----


def _single_line(name: str, value: str) -> str:
    if _LINE_BREAKS.search(value):
        raise JobConfigError(
            f"{name} {value!r} contains a line break; it would end up in a directive "
            "line of the job script, where a line break could start a new directive"
        )
    return value


def _text(name: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise JobConfigError(f"{name} must be a string, not {type(value).__name__} {value!r}")
    return value


def _name(name: str, value: object) -> str:
    text = _single_line(name, _text(name, value))
    if not text.strip():
        raise JobConfigError(f"{name} must not be empty")
    return text


def _optional_name(name: str, value: object) -> str | None:
    return None if value is None else _name(name, value)


def _optional_path(name: str, value: object) -> str | None:
    return None if value is None else _name(name, value)


def _optional_body_text(name: str, value: object) -> str | None:
    # Used only in the script body, where the renderer's quoting makes anything safe.
    if value is None:
        return None
    text = _text(name, value)
    if not text:
        raise JobConfigError(f"{name} must not be empty")
    return text


def _optional_word(name: str, value: object) -> str | None:
    if value is None:
        return None
    text = _name(name, value)
    if any(c.isspace() for c in text):
        raise JobConfigError(f"{name} {text!r} must not contain spaces")
    return text


def _count(minimum: int) -> Callable[[str, object], int]:
    def convert(name: str, value: object) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobConfigError(
                f"{name} must be a whole number, not {type(value).__name__} {value!r}"
            )
        if value < minimum:
            raise JobConfigError(f"{name} must be at least {minimum}, got {value}")
        return value

    return convert


def _walltime(name: str, value: object) -> int | None:
    return parse_walltime(value)


def _duration(name: str, value: object) -> int:
    return _seconds(name, value)


def _restart(name: str, value: object) -> RestartMode:
    if isinstance(value, RestartMode):
        return value
    if value is None:  # YAML's null
        return RestartMode.NONE
    try:
        return RestartMode(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in RestartMode)
        raise JobConfigError(f"{name} {value!r} is not one of: {choices}") from None


def _drain_signal(name: str, value: object) -> str:
    text = _name(name, value).strip().upper()
    bare = text.removeprefix("SIG")
    if f"SIG{bare}" not in signal.Signals.__members__:
        raise JobConfigError(f"{name} {value!r} is not a signal name; write e.g. USR2, TERM or INT")
    if bare in _UNUSABLE_SIGNALS:
        raise JobConfigError(
            f"{name} {bare} cannot be used: {_UNUSABLE_SIGNALS[bare]}; use USR2 (the "
            "default), TERM, INT or HUP"
        )
    return bare


def _memory(name: str, value: object) -> int | None:
    if value is None:
        return None
    try:
        nbytes = parse_bytes(value)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise JobConfigError(f"{name}: {exc}") from None
    if nbytes <= 0:
        raise JobConfigError(f"{name} must be positive, got {value!r}")
    return nbytes


def _string_list(*, split: bool, single_line: bool) -> Callable[[str, object], tuple[str, ...]]:
    def convert(name: str, value: object) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            items: list[object] = list(shlex.split(value)) if split else [value]
        elif isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
            items = list(value)
        else:
            raise JobConfigError(f"{name} must be a list of strings, not {value!r}")
        out = []
        for item in items:
            text = _text(f"each item of {name}", item)
            out.append(_single_line(f"{name} item", text) if single_line else text)
        return tuple(out)

    return convert


def _env(name: str, value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):  # ["NAME=value", ...], as config files hold it
        pairs = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise JobConfigError(f"{name}: {item!r} is not a NAME=value string")
            key, _, val = item.partition("=")
            pairs[key] = val
        value = pairs
    if not isinstance(value, Mapping):
        raise JobConfigError(
            f"{name} must map variable names to values, or list NAME=value strings"
        )
    out = []
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise JobConfigError(
                f"{name}: {key!r} is not a valid environment variable name "
                "(letters, digits and underscores, not starting with a digit)"
            )
        if key in JOB_VARIABLES:
            raise JobConfigError(
                f"{name}: {key} is set by the launcher from {JOB_VARIABLES[key]}; "
                "remove it from env (and set that instead)"
            )
        if val is None or isinstance(val, (Mapping, list, tuple)):
            raise JobConfigError(f"{name}: value of {key} must be a string or number")
        out.append((key, str(val).lower() if isinstance(val, bool) else str(val)))
    return tuple(out)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise JobConfigError(f"{name} must be true or false, not {value!r}")
    return value


def _mpi_implementation(name: str, value: object) -> MPIImplementation:
    if isinstance(value, MPIImplementation):
        return value
    try:
        return MPIImplementation(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in MPIImplementation)
        raise JobConfigError(f"{name} {value!r} is not one of: {choices}") from None


# name -> (converter, default, one line of documentation). Order is the order of
# JobSpec's repr and of the schema in launchers-schema.yaml.
_FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any, str]] = {
    "name": (_name, "hpc", "job name shown by squeue/qstat"),
    "queue": (_optional_word, None, "partition (SLURM) or queue (PBS); None: the site default"),
    "account": (_optional_word, None, "account/project charged for the job"),
    "walltime": (_walltime, 3600, "time limit: 'HH:MM:SS', 'D-HH:MM:SS', seconds, or '90min'"),
    "drain_lead": (
        _duration,
        120,
        "how long before the walltime the runtime starts draining ('2min')",
    ),
    "drain_signal": (
        _drain_signal,
        "USR2",
        "signal that starts the drain; SLURM sends it to srun's ranks drain_lead early",
    ),
    "restart": (
        _restart,
        RestartMode.NONE,
        "none, requeue or resubmit: how a drained cluster job comes back",
    ),
    "max_restarts": (_count(0), 10, "most times a cluster job is restarted"),
    "nodes": (_count(1), 1, "number of nodes"),
    "tasks_per_node": (_count(1), 2, "MPI ranks per node"),
    "cores_per_task": (_count(1), 1, "cores for each rank (its worker's threads)"),
    "memory": (_memory, None, "memory per node ('4GiB'); written to scripts in MiB"),
    "gpus_per_node": (_count(0), 0, "GPUs per node"),
    "log_directory": (_optional_path, None, "where job output goes; None: the submit directory"),
    "extra_directives": (
        _string_list(split=False, single_line=True),
        (),
        "more directive options, one per item, e.g. '--constraint=haswell'",
    ),
    "prologue": (
        _string_list(split=False, single_line=False),
        (),
        "shell lines run before the work, e.g. 'module load mpi'",
    ),
    "env": (_env, (), "environment variables exported before the work"),
    "interface": (_optional_word, None, "network interface for the cluster's addresses"),
    "python": (_optional_body_text, None, "Python executable; None: this one (sys.executable)"),
    "working_directory": (_optional_body_text, None, "directory the job runs in; None: unchanged"),
    "mpi_launcher": (_name, "mpiexec", "srun, mpiexec or mpirun (or a path to one)"),
    "mpi_implementation": (
        _mpi_implementation,
        MPIImplementation.MPICH,
        "mpich, openmpi or other: picks launcher flags",
    ),
    "mpi_args": (
        _string_list(split=True, single_line=False),
        (),
        "more arguments for the MPI launcher",
    ),
    "mpi_disable_auto_cleanup": (
        _bool,
        True,
        "keep other ranks running when one dies (MPICH -disable-auto-cleanup, srun "
        "--kill-on-bad-exit=0)",
    ),
    "runtime_args": (
        _string_list(split=True, single_line=False),
        (),
        "more arguments for `python -m runtime.mpi`",
    ),
}


class JobSpec:
    """The settings of a batch job, each checked when it is set.

    Parameters
    ----------
    **values
        Any of the settings listed in :attr:`FIELDS` (``name``, ``queue``, ``account``,
        ``walltime``, ``drain_lead``, ``drain_signal``, ``restart``, ``max_restarts``,
        ``nodes``, ``tasks_per_node``, ``cores_per_task``, ``memory``,
        ``gpus_per_node``, ``log_directory``, ``extra_directives``, ``prologue``,
        ``env``, ``interface``, ``python``, ``working_directory``, ``mpi_launcher``,
        ``mpi_implementation``, ``mpi_args``, ``mpi_disable_auto_cleanup``,
        ``runtime_args``). Dashes are accepted in place of underscores, as written in
        YAML profiles. Unset settings keep their defaults.

    Raises
    ------
    JobConfigError
        A setting is unknown (the message lists the valid ones) or its value is
        impossible.

    Examples
    --------
    >>> spec = JobSpec(nodes=2, walltime="00:30:00", memory="8GiB")
    >>> spec.walltime, spec.memory
    (1800, 8589934592)
    >>> spec.cores_per_task = -1
    Traceback (most recent call last):
    ...
    launchers._errors.JobConfigError: cores_per_task must be at least 1, got -1
    """

    FIELDS: tuple[str, ...] = tuple(_FIELDS)
    __slots__ = tuple(_FIELDS)

    # Declared for type checkers; __setattr__ converts and checks each one.
    name: str
    queue: str | None
    account: str | None
    walltime: int | None
    drain_lead: int
    drain_signal: str
    restart: RestartMode
    max_restarts: int
    nodes: int
    tasks_per_node: int
    cores_per_task: int
    memory: int | None
    gpus_per_node: int
    log_directory: str | None
    extra_directives: tuple[str, ...]
    prologue: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    interface: str | None
    python: str | None
    working_directory: str | None
    mpi_launcher: str
    mpi_implementation: MPIImplementation
    mpi_args: tuple[str, ...]
    mpi_disable_auto_cleanup: bool
    runtime_args: tuple[str, ...]

    def __init__(self, **values: Any) -> None:
        for field, (_, default, _doc) in _FIELDS.items():
            object.__setattr__(self, field, default)
        self.update(values)

    @classmethod
    def canonical_name(cls, key: str) -> str:
        """Return the attribute name for ``key`` (``"tasks-per-node"`` -> ``"tasks_per_node"``).

        Raises
        ------
        JobConfigError
            ``key`` is not a setting; the message lists the valid ones.
        """
        field = key.replace("-", "_")
        if field not in _FIELDS:
            valid = ", ".join(cls.FIELDS)
            raise JobConfigError(f"unknown job setting {key!r}; valid settings are: {valid}")
        return field

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Return each setting's one-line description, in order."""
        return {field: doc for field, (_, _, doc) in _FIELDS.items()}

    def __setattr__(self, key: str, value: Any) -> None:
        field = self.canonical_name(key)
        converter = _FIELDS[field][0]
        object.__setattr__(self, field, converter(field, value))

    def update(self, values: Mapping[str, Any]) -> None:
        """Set several settings; unknown ones fail before any is changed."""
        fields = {self.canonical_name(k): v for k, v in values.items()}
        for field, value in fields.items():
            setattr(self, field, value)

    def replace(self, **values: Any) -> JobSpec:
        """Return a copy with some settings changed."""
        new = JobSpec(**self.to_dict())
        new.update(values)
        return new

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as plain values that :class:`JobSpec` accepts back."""
        out: dict[str, Any] = {}
        for field in self.FIELDS:
            value = getattr(self, field)
            if field == "env":
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            out[field] = value
        return out

    @property
    def total_tasks(self) -> int:
        """Number of MPI ranks the job starts: nodes times tasks per node."""
        return self.nodes * self.tasks_per_node

    def check(self) -> None:
        """Check the settings that limit each other; each alone was checked when set.

        Called before a script is rendered and when a cluster is created, not on each
        assignment: setting ``walltime`` and then ``drain_lead`` must not fail in
        between.

        Raises
        ------
        JobConfigError
            A job that is to restart (``restart`` is not ``none``) has a ``drain_lead``
            not shorter than its walltime. Without a restart such a job simply does
            not drain (the default lead must not break short jobs).
        """
        if (
            self.walltime is not None
            and self.drain_lead >= self.walltime
            and self.restart is not RestartMode.NONE
        ):
            raise JobConfigError(
                f"drain_lead {format_walltime(self.drain_lead)} ({self.drain_lead} s) must be "
                f"shorter than the walltime {format_walltime(self.walltime)} "
                f"({self.walltime} s), or the job would drain as soon as it starts; lower "
                "drain_lead (e.g. drain_lead='30s') or raise the walltime"
            )

    @property
    def drain_after(self) -> int | None:
        """Seconds from the job's start to when it drains; ``None`` when it does not.

        It does not without a walltime, nor when ``drain_lead`` leaves no time to run
        (allowed only with ``restart="none"``, see :meth:`check`).

        Raises
        ------
        JobConfigError
            See :meth:`check`.
        """
        self.check()
        if self.walltime is None or self.drain_lead >= self.walltime:
            return None
        return self.walltime - self.drain_lead

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobSpec):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = {f: getattr(self, f) for f in self.FIELDS if getattr(self, f) != _FIELDS[f][1]}
        inner = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"JobSpec({inner})"
