"""What every job system shares, and the hooks each one fills in.

A :class:`JobSystem` turns a :class:`~launchers._spec.JobSpec` into a script (its
template plus its directives), submits it, cancels jobs and asks for their states.
Subclasses (:class:`~launchers._slurm.SlurmSystem`, :class:`~launchers._pbs.PBSSystem`,
:class:`~launchers._local.LocalSystem`) supply the per-system hooks:

=====================  ==================================================
``template``           file name under ``launchers/templates/``
``directives()``       the ``#SBATCH``/``#PBS`` lines
``output_path()``      where the job's output goes, as the system spells it
``submit_command()``   ``sbatch ...``/``qsub ...``
``parse_job_id()``     the id in the submit command's output
``job_environment()``  the ``HPC_JOB_*`` exports: when to drain, how to restart
``cancel()``           ``scancel``/``qdel``
``query()``            one batched status call (plus fallbacks) -> JobStatus
``transient_errors``   patterns of failures worth retrying
=====================  ==================================================

The launch line (``<mpiexec|srun> -n N python -m runtime.mpi ...``) is the same for all
systems and built here.

A system object keeps no job state: it holds its settings (runner, retry policy,
timeouts). Job bookkeeping lives in :mod:`launchers._poller` and the clusters.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from launchers._commands import CommandResult, Retry, Runner, run_command
from launchers._errors import JobConfigError, JobQueueError, SubmissionError
from launchers._render import (
    quote,
    quote_command,
    read_template,
    render_template,
    template_slots,
)
from launchers._spec import JOB_VARIABLES, JobSpec, MPIImplementation, memory_mib
from launchers._states import JobKind, JobState, JobStatus

__all__ = ["JobSystem", "SubmittedJob", "new_token", "same_job"]

_FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LINE_BREAKS = re.compile(r"[\n\r\x00\x0b\x0c\x85\u2028\u2029]")
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_.@\[\]-]+$")


def new_token() -> str:
    """Return a fresh submission token: a timestamp and random hex, safe in file names."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def file_stem(name: str) -> str:
    """Return ``name`` made safe for a file name.

    Examples
    --------
    >>> file_stem("my job/$x")
    'my_job_x'
    """
    return _FILE_NAME_UNSAFE.sub("_", name).strip("_")[:64] or "job"


@dataclasses.dataclass(frozen=True)
class SubmittedJob:
    """A job that a batch system accepted.

    Attributes
    ----------
    job_id
        The id the system gave it.
    kind
        Cluster job or worker job.
    script_path
        The script as submitted (kept for reproducing the submission by hand).
    log_path
        Where its output goes, with the job id filled in; ``None`` when the system's
        default applies.
    output
        The output file as the script names it, the system's job-id pattern (SLURM's
        ``%j``) included: where a restart of the same script writes is
        ``system.log_path(output, new_job_id)``.
    """

    job_id: str
    kind: JobKind
    script_path: str
    log_path: str | None
    output: str | None = None


class JobSystem(abc.ABC):
    """Base of the per-system classes: rendering, submission with retries, cancel, query.

    Parameters
    ----------
    runner
        Runs batch-system commands; :func:`launchers._commands.run_command` by default.
        Tests pass a fake that replays recorded outputs.
    retry
        Retry policy for transient failures (busy controller, socket timeouts).
    command_timeout
        Seconds a single command may take before it counts as a (transient) failure.
    """

    #: Short name used in profiles and on the command line.
    name: ClassVar[str]
    #: File name of this system's template under ``launchers/templates/``.
    template: ClassVar[str]
    #: Regular expressions (case-insensitive) matching failures worth retrying.
    transient_errors: ClassVar[tuple[str, ...]] = (
        r"timed out",
        r"Resource temporarily unavailable",
        r"Connection refused",
        r"try again",
    )

    def __init__(
        self,
        *,
        runner: Runner | None = None,
        retry: Retry | None = None,
        command_timeout: float = 60.0,
    ) -> None:
        self.runner: Runner = runner or run_command
        self.retry = retry or Retry()
        self.command_timeout = command_timeout

    # --- hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def directives(self, spec: JobSpec, *, output: str | None) -> list[str]:
        """Return the directive lines (already quoted) for ``spec``."""

    @abc.abstractmethod
    def output_path(self, spec: JobSpec, token: str) -> str | None:
        """Return the output file as written in the script (may hold a job-id pattern)."""

    @abc.abstractmethod
    def submit_command(
        self,
        script_path: str,
        *,
        output: str | None,
        variables: Mapping[str, str] | None = None,
    ) -> tuple[list[str], str | None]:
        """Return the submit command line and the directory to run it in (``None``: here).

        ``variables`` are set in the job's environment on top of the submitter's
        (``sbatch --export=ALL,K=V``, ``qsub -V -v K=V``); see :func:`check_variables`.
        """

    @abc.abstractmethod
    def parse_job_id(self, stdout: str) -> str:
        """Return the job id from the submit command's output; ``ValueError`` if absent."""

    #: The batch system's cancel command (``scancel``, ``qdel``), given the job ids.
    cancel_program: str = ""

    def cancel_found_ended(self, result: CommandResult) -> bool:
        """Whether a failed cancel only says the jobs had already ended."""
        return False

    def cancel(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs with :attr:`cancel_program`; jobs that already ended are not an error."""
        ids = list(job_ids)
        if not ids:
            return
        result = self._run([self.cancel_program, *ids])
        if result.ok or self.cancel_found_ended(result):
            return
        raise JobQueueError(
            self._failure_message("cancel", result),
            command=result.argv,
            stderr=result.output,
            returncode=result.returncode,
            transient=self.is_transient(result),
        )

    @abc.abstractmethod
    def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Return the status of each job, asking the system as few times as it can."""

    def log_path(self, output: str | None, job_id: str) -> str | None:
        """Return ``output`` with the system's job-id pattern replaced by ``job_id``."""
        return output

    def default_workdir(self) -> str:
        """The script line that picks the working directory when the spec sets none."""
        return ""

    def job_environment(self, spec: JobSpec, *, script_path: str | None) -> list[str]:
        """Return the ``export`` lines that tell the job's runtime when to drain and restart.

        With a walltime, ``HPC_JOB_DRAIN_AT`` is computed by the shell when the job
        starts: the epoch second at which to drain, ``walltime - drain_lead`` after the
        start (the numbers in it are ours, so it needs no quoting); and
        ``HPC_JOB_DRAIN_SIGNAL`` names the signal that means "drain now" (SLURM sends
        it to ``srun``'s ranks, see :class:`~launchers.SlurmSystem`; anyone may send it
        by hand). Always, ``HPC_JOB_RESTART`` and ``HPC_JOB_MAX_RESTARTS`` are
        the ``restart`` and ``max_restarts`` settings; ``HPC_JOB_SCRIPT`` is the
        script's own path (omitted when unknown), which a resubmission submits again.
        The restart count and the job replaced (``HPC_JOB_RESTARTS``,
        ``HPC_JOB_RESTART_OF``) are left to the command line of a restart.

        Raises
        ------
        JobConfigError
            ``drain_lead`` is not shorter than the walltime.
        """
        lines = []
        drain_after = spec.drain_after
        if drain_after is not None:
            lines.append(f"export HPC_JOB_DRAIN_AT=$(( $(date +%s) + {drain_after:d} ))")
            lines.append(f"export HPC_JOB_DRAIN_SIGNAL={quote(spec.drain_signal)}")
        lines.append(f"export HPC_JOB_RESTART={quote(spec.restart.value)}")
        lines.append(f"export HPC_JOB_MAX_RESTARTS={spec.max_restarts:d}")
        if script_path is not None:
            lines.append(f"export HPC_JOB_SCRIPT={quote(script_path)}")
        return lines

    # --- rendering -----------------------------------------------------------------

    def rank_prefix(self, spec: JobSpec) -> list[str]:
        """Return what each rank's command starts with, before the Python interpreter.

        Nothing by default; see :meth:`SlurmSystem.rank_prefix
        <launchers.SlurmSystem.rank_prefix>`.
        """
        return []

    def launch_command(
        self,
        spec: JobSpec,
        kind: JobKind,
        *,
        scheduler_file: str,
        script: str | None = None,
        script_args: Sequence[str] = (),
    ) -> list[str]:
        """Return the command that starts the job's MPI ranks, unquoted.

        ``<launcher> -n RANKS [flags] [rank prefix] <python> -m runtime.mpi [--no-scheduler]
        --scheduler-file F [--interface IF] --nthreads C [--memory-limit M]
        [runtime_args] [--script S ARGS]``: each worker rank gets the task's cores as
        threads and, when memory is set, the node's memory divided by its ranks.

        Raises
        ------
        JobConfigError
            A cluster job with too few ranks (the scheduler needs rank 0 and at least
            one worker; in batch mode the script runs on rank 1, or beside the
            scheduler on rank 0 in a 2-rank job), or a script for a worker job.
        """
        ranks = spec.total_tasks
        if kind is JobKind.WORKER and script is not None:
            raise JobConfigError("a worker job cannot run a script; use a cluster job")
        if kind is JobKind.CLUSTER:
            needed = 2
            if ranks < needed:
                roles = "scheduler and a worker"
                raise JobConfigError(
                    f"a cluster job needs at least {needed} MPI ranks ({roles}); it has "
                    f"nodes * tasks_per_node = {spec.nodes} * {spec.tasks_per_node} = {ranks}; "
                    "raise tasks_per_node or nodes"
                )
        python = spec.python or sys.executable
        launcher = _beside_python(spec.mpi_launcher, python)
        argv = [launcher, "-n", str(ranks)]
        if spec.mpi_disable_auto_cleanup:
            if uses_srun(spec):
                argv.append("--kill-on-bad-exit=0")
            elif spec.mpi_implementation is MPIImplementation.MPICH:
                argv.append("-disable-auto-cleanup")
        argv += spec.mpi_args
        argv += self.rank_prefix(spec)
        argv += [python, "-m", "runtime.mpi"]
        if kind is JobKind.WORKER:
            argv.append("--no-scheduler")
        argv += ["--scheduler-file", scheduler_file]
        if spec.interface:
            argv += ["--interface", spec.interface]
        argv += ["--nthreads", str(spec.cores_per_task)]
        if spec.memory:
            per_rank = max(1, memory_mib(spec.memory // spec.tasks_per_node))
            argv += ["--memory-limit", f"{per_rank}MiB"]
        argv += spec.runtime_args
        if script is not None:
            argv += ["--script", script, *script_args]
        return argv

    def render(
        self,
        spec: JobSpec,
        kind: JobKind = JobKind.CLUSTER,
        *,
        scheduler_file: str,
        script: str | None = None,
        script_args: Sequence[str] = (),
        token: str = "",
        script_path: str | None = None,
    ) -> str:
        """Return the job script for ``spec``.

        Parameters
        ----------
        spec
            The job's settings.
        kind
            Cluster job (scheduler + workers) or worker job.
        scheduler_file
            Path of the scheduler file (written by the cluster job, read by workers).
        script, script_args
            Batch mode: the user's script run as the client on rank 1 (cluster jobs).
        token
            Makes output file names unique where the system cannot name them after the
            job id (PBS); :func:`new_token` when submitting, a fixed string in tests.
        script_path
            Where the script will be written, exported to the job as
            ``HPC_JOB_SCRIPT`` (a resubmission submits it again); ``None`` when it is
            only shown, not submitted.

        Raises
        ------
        JobConfigError
            Settings that cannot work together (see :meth:`launch_command` and
            :meth:`JobSpec.check <launchers.JobSpec.check>`).
        """
        command = self.launch_command(
            spec, kind, scheduler_file=scheduler_file, script=script, script_args=script_args
        )
        if spec.working_directory:
            workdir = f"cd -- {quote(spec.working_directory)}"
        else:
            workdir = self.default_workdir()
        blocks = {
            "directives": "\n".join(self.directives(spec, output=self.output_path(spec, token))),
            "kind": quote(kind.value),
            "environment": "\n".join(
                [
                    *(f"export {k}={quote(v)}" for k, v in spec.env),
                    *self.job_environment(spec, script_path=script_path),
                ]
            ),
            "prologue": "\n".join(spec.prologue),
            "workdir": workdir,
            "command": quote_command(command),
        }
        template = read_template(self.template)
        if not blocks["directives"] and "directives" not in template_slots(template):
            del blocks["directives"]  # systems without directives (local) have no slot
        return render_template(template, blocks)

    # --- submission ----------------------------------------------------------------

    @staticmethod
    def script_file(directory: str | os.PathLike[str], stem: str) -> str:
        """Return the path :meth:`write_script` writes ``stem`` to in ``directory``."""
        return os.path.join(os.fspath(directory), f"{stem}.sh")

    def write_script(self, text: str, directory: str | os.PathLike[str], stem: str) -> str:
        """Write a job script to ``directory/stem.sh`` (created if needed); return its path."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = self.script_file(folder, stem)
        tmp = folder / f".{stem}.sh.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, path)
        return path

    def submit(
        self,
        script_path: str,
        *,
        output: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> str:
        """Submit a script; return the job id.

        ``variables`` are added to the job's environment (see :meth:`submit_command`).
        Transient failures are retried with back-off (:attr:`retry`); permanent ones
        raise at once.

        Raises
        ------
        SubmissionError
            The system refused the script or could not be reached; ``transient`` says
            which kind of failure it was.
        """
        argv, cwd = self.submit_command(script_path, output=output, variables=variables)
        result = self._run(argv, cwd=cwd)
        if not result.ok:
            raise SubmissionError(
                self._failure_message("submission", result, script_path),
                command=result.argv,
                stderr=result.output,
                returncode=result.returncode,
                transient=self.is_transient(result),
                script_path=script_path,
            )
        try:
            return self.parse_job_id(result.stdout)
        except ValueError:
            raise SubmissionError(
                f"{argv[0]} succeeded but printed no job id we can read: {result.stdout!r}",
                command=result.argv,
                stderr=result.output,
                returncode=result.returncode,
                script_path=script_path,
            ) from None

    def submit_job(
        self,
        spec: JobSpec,
        kind: JobKind = JobKind.CLUSTER,
        *,
        scheduler_file: str,
        script: str | None = None,
        script_args: Sequence[str] = (),
        script_directory: str | os.PathLike[str] | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> SubmittedJob:
        """Render, write and submit one job.

        The script goes to ``script_directory`` (default: the spec's log directory, else
        the current directory) as ``<name>-<kind>-<token>.sh``, an absolute path that
        the script knows as ``HPC_JOB_SCRIPT``. ``variables`` are added to the job's
        environment at submission (a restart passes ``HPC_JOB_RESTARTS`` and
        ``HPC_JOB_RESTART_OF`` so).
        """
        token = new_token()
        directory = os.path.abspath(script_directory or spec.log_directory or os.getcwd())
        stem = f"{file_stem(spec.name)}-{kind.value}-{token}"
        text = self.render(
            spec,
            kind,
            scheduler_file=scheduler_file,
            script=script,
            script_args=script_args,
            token=token,
            script_path=self.script_file(directory, stem),
        )
        path = self.write_script(text, directory, stem)
        output = self.output_path(spec, token)
        job_id = self.submit(path, output=output, variables=variables)
        return SubmittedJob(job_id, kind, path, self.log_path(output, job_id), output)

    # --- helpers for subclasses ----------------------------------------------------

    def is_transient(self, result: CommandResult) -> bool:
        """Whether a failed command is worth retrying."""
        if result.returncode is None:
            return "timed out" in result.stderr
        text = result.output
        return any(re.search(p, text, re.IGNORECASE) for p in self.transient_errors)

    def _run(self, argv: Sequence[str], *, cwd: str | None = None) -> CommandResult:
        """Run a command, retrying transient failures; return the last result."""
        waits = self.retry.delays()
        attempt = 0
        while True:
            result = self.runner(argv, cwd=cwd, timeout=self.command_timeout)
            if result.ok or not self.is_transient(result) or attempt >= len(waits):
                return result
            self.retry.sleep(waits[attempt])
            attempt += 1

    def _failure_message(
        self, what: str, result: CommandResult, script_path: str | None = None
    ) -> str:
        kind = "transient" if self.is_transient(result) else "permanent"
        tries = f" after {self.retry.retries + 1} attempts" if kind == "transient" else ""
        where = f" for {script_path}" if script_path else ""
        detail = result.output or f"exit status {result.returncode}"
        return f"{self.name} {what} failed{where} ({kind}{tries}): {quote_command(result.argv)}: {detail}"

    def _query_error(self, result: CommandResult) -> JobQueueError:
        return JobQueueError(
            self._failure_message("status query", result),
            command=result.argv,
            stderr=result.output,
            returncode=result.returncode,
            transient=self.is_transient(result),
        )


def _beside_python(launcher: str, python: str) -> str:
    """``mpiexec`` -> ``<python's bin>/mpiexec`` when that exists, else unchanged.

    The ``mpich`` wheel installs ``mpiexec`` into the environment's ``bin/``, which is
    not on PATH inside a job unless the environment was activated. ``srun`` and
    explicit paths are left alone.
    """
    if os.sep in launcher or launcher == "srun":
        return launcher
    candidate = os.path.join(os.path.dirname(python), launcher)
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else launcher


def uses_srun(spec: JobSpec) -> bool:
    """Whether the job's ranks are started by ``srun`` (as a SLURM job step)."""
    return os.path.basename(spec.mpi_launcher) == "srun"


def directive_words(item: str, prefix: str) -> list[str]:
    """Split one extra directive into words, dropping a leading ``#SBATCH``/``#PBS``.

    Examples
    --------
    >>> directive_words("#PBS -l place=scatter", "#PBS")
    ['-l', 'place=scatter']
    """
    if _LINE_BREAKS.search(item):
        raise JobConfigError(
            f"extra directive {item!r} contains a line break, which would start a new "
            "line of the script; give one directive per item"
        )
    text = item.strip()
    if text.startswith(prefix):
        text = text[len(prefix) :]
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise JobConfigError(
            f"extra directive {item!r} cannot be split into words: {exc}"
        ) from None
    if not words:
        raise JobConfigError(f"extra directive {item!r} is empty")
    return words


def check_variables(variables: Mapping[str, str] | None) -> dict[str, str]:
    """Check variables passed to a job on the submit command line; return them as a dict.

    Their names must be among the launcher's own (:data:`~launchers._spec.JOB_VARIABLES`)
    and their values plain words: ``sbatch --export`` and ``qsub -v`` split on commas,
    and SLURM's ``qsub`` passes its arguments through a shell unquoted.

    Examples
    --------
    >>> check_variables({"HPC_JOB_RESTARTS": "1", "HPC_JOB_RESTART_OF": "123.srv"})
    {'HPC_JOB_RESTARTS': '1', 'HPC_JOB_RESTART_OF': '123.srv'}
    """
    checked = dict(variables or {})
    for name, value in checked.items():
        if name not in JOB_VARIABLES or not _PLAIN_WORD.match(value):
            raise ValueError(
                f"cannot pass {name}={value!r} on a submit command line: only the "
                f"launcher's variables ({', '.join(JOB_VARIABLES)}) with plain values"
            )
    return checked


def same_job(a: str, b: str) -> bool:
    """Whether two ids name the same job (PBS: ``123.srv`` and ``123.srv.example.org``).

    Examples
    --------
    >>> same_job("123.pbs01", "123.pbs01.example.org")
    True
    >>> same_job("123", "1234")
    False
    """
    return a == b or a.split(".", 1)[0] == b.split(".", 1)[0]


def chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    """Split job ids into batches small enough for one command line each."""
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def translate(table: Mapping[str, JobState], native: str) -> JobState:
    """Look up a native state; unknown words become :attr:`JobState.UNKNOWN`."""
    return table.get(native.strip().upper(), JobState.UNKNOWN)
