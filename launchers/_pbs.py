"""PBS (PBS Pro / OpenPBS and Torque): ``#PBS`` directives, ``qsub``, ``qdel``, states.

Two dialects, chosen by the ``pbs.dialect`` setting, differ in how resources are
asked for:

- ``pbspro``: ``#PBS -l select=N:ncpus=C:mpiprocs=T:ompthreads=c[:ngpus=G][:mem=Mmb]``,
  with C = T * c cores per node; status with ``qstat -f -x`` (``-x`` keeps finished jobs
  visible).
- ``torque``: ``#PBS -l nodes=N:ppn=C[:gpus=G]`` and ``-l mem=Mmb`` for one node
  (``pmem`` per process for several, as Torque's ``mem`` only works on one node);
  status with ``qstat -f``. SLURM's Torque-compatible ``qsub``/``qstat``/``qdel``
  speak this dialect.

PBS reads ``mb`` as MiB: memory is written in MiB rounded down, as for SLURM.

``restart="requeue"`` adds ``#PBS -r y`` (the job may be rerun, by ``qrerun`` or after
a node failure).

PBS has no job-id pattern for output files, so each submission gets its own
``<log_directory>/<name>-<kind>-<token>.log``. It is given both as a directive and
on the ``qsub`` command line: SLURM's Torque-compatible ``qsub`` ignores ``#PBS -o``
in the script. That ``qsub`` also passes its arguments through a shell unquoted, so
``qsub`` is run from the script's directory with the (always safe) script file name.

This module keeps no state.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Literal

from launchers._commands import CommandResult
from launchers._errors import JobConfigError
from launchers._render import directive
from launchers._spec import JobSpec, RestartMode, format_walltime, memory_mib
from launchers._states import JobState, JobStatus
from launchers._system import (
    JobSystem,
    check_variables,
    chunks,
    directive_words,
    file_stem,
    same_job,
    translate,
)

__all__ = ["PBSPRO_EXIT_STATES", "PBS_STATES", "PBSDialect", "PBSSystem", "parse_qstat_full"]

PBSDialect = Literal["pbspro", "torque"]

#: PBS job states (one letter, from ``qstat``) -> JobState. ``C`` (Torque) and ``F``
#: (PBS Pro) mean "finished"; the exit status decides between COMPLETED and FAILED.
PBS_STATES: dict[str, JobState] = {
    "Q": JobState.PENDING,  # queued
    "H": JobState.PENDING,  # held
    "W": JobState.PENDING,  # waiting for its start time
    "T": JobState.PENDING,  # being moved
    "S": JobState.PENDING,  # suspended
    "U": JobState.PENDING,  # suspended: workstation busy (PBS Pro)
    "R": JobState.RUNNING,
    "E": JobState.RUNNING,  # exiting after having run
    "B": JobState.RUNNING,  # array job begun (PBS Pro)
    "X": JobState.COMPLETED,  # subjob finished (PBS Pro)
    "C": JobState.COMPLETED,
    "F": JobState.COMPLETED,
    "M": JobState.UNKNOWN,  # moved to another server
}

_JOB_ID = re.compile(r"^[A-Za-z0-9_.\-\[\]@]+$")
_UNKNOWN_JOB = re.compile(r"Unknown Job Id|Job has finished|job.*not found|invalid job id", re.I)
_WALLTIME_KILL = re.compile(r"walltime.*exceed", re.IGNORECASE)
_MEMORY_KILL = re.compile(r"\bmem\w*.*exceed", re.IGNORECASE)
_PREEMPTED = re.compile(r"preempt", re.IGNORECASE)

#: PBS Pro's own (negative) exit statuses that say more than "failed" (PBS Professional
#: Reference Guide, "Job Exit Codes"). Torque numbers its codes differently.
PBSPRO_EXIT_STATES: dict[int, JobState] = {
    -14: JobState.NODE_FAIL,  # JOB_EXEC_RERUN_ON_SIS_FAIL: lost a sister MoM
    -20: JobState.NODE_FAIL,  # JOB_EXEC_RERUN_MS_FAIL: lost the primary execution host
    -26: JobState.OUT_OF_MEMORY,  # JOB_EXEC_KILL_VMEM
    -27: JobState.OUT_OF_MEMORY,  # JOB_EXEC_KILL_MEM
    -29: JobState.TIMEOUT,  # JOB_EXEC_KILL_WALLTIME
}


def parse_qstat_full(stdout: str) -> dict[str, dict[str, str]]:
    """Parse ``qstat -f`` output into ``{job id: {attribute: value}}``.

    Attribute names are kept as printed (``job_state``, ``Exit_status``, ...). Long
    values that ``qstat`` wraps onto indented lines without ``=`` are joined back.

    Examples
    --------
    >>> jobs = parse_qstat_full("Job Id: 7.srv\\n    job_state = C\\n    exit_status = 0\\n")
    >>> jobs["7.srv"]["job_state"], jobs["7.srv"]["exit_status"]
    ('C', '0')
    """
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key: str | None = None
    for raw in stdout.splitlines():
        line = raw.rstrip()
        if not line.strip():
            continue
        if line.startswith("Job Id:"):
            current = jobs.setdefault(line.split(":", 1)[1].strip(), {})
            last_key = None
            continue
        if current is None:
            continue
        key, sep, value = line.strip().partition(" = ")
        if sep and " " not in key:
            current[key] = value.strip()
            last_key = key
        elif last_key is not None:  # a wrapped continuation of the previous value
            current[last_key] += line.strip()
    return jobs


def _status_from_attributes(
    job_id: str, attrs: dict[str, str], dialect: PBSDialect = "pbspro"
) -> JobStatus:
    native = attrs.get("job_state", "").strip()
    state = translate(PBS_STATES, native)
    lowered = {k.lower(): v for k, v in attrs.items()}
    comment = lowered.get("comment")
    code: int | None = None
    sig: int | None = None
    if "exit_status" in lowered:
        try:
            code = int(lowered["exit_status"])
        except ValueError:
            code = None
    reason = comment if state is JobState.PENDING else None
    if native in ("C", "F") and code is not None and code != 0:
        state = JobState.FAILED
        if code > 256:  # PBS reports a job killed by signal S as 256 + S
            sig, code = code - 256, None
        text = comment or ""
        if dialect == "pbspro" and code in PBSPRO_EXIT_STATES:
            state = PBSPRO_EXIT_STATES[code]
        elif _WALLTIME_KILL.search(text):
            state = JobState.TIMEOUT
        elif _MEMORY_KILL.search(text):
            state = JobState.OUT_OF_MEMORY
        elif _PREEMPTED.search(text):
            state = JobState.PREEMPTED
        reason = comment or (f"PBS exit status {code}" if code is not None and code < 0 else None)
    return JobStatus(job_id, state, native, reason, code, sig, source="qstat")


class PBSSystem(JobSystem):
    """PBS Pro/OpenPBS and Torque: ``#PBS`` scripts, ``qsub``, ``qstat``, ``qdel``.

    Parameters
    ----------
    dialect
        ``"pbspro"`` (``-l select=...``) or ``"torque"`` (``-l nodes=N:ppn=C``).
    **options
        Passed to :class:`~launchers._system.JobSystem` (runner, retry, command_timeout).
    """

    name = "pbs"
    template = "pbs.sh.tmpl"
    transient_errors = (
        *JobSystem.transient_errors,
        r"cannot connect to server",
        r"pbs_iff",
        r"End of File",
        r"Server (is )?busy",
        r"Communication failure",
    )

    def __init__(self, *, dialect: str = "pbspro", **options: object) -> None:
        if dialect not in ("pbspro", "torque"):
            raise JobConfigError(f"PBS dialect {dialect!r} is not one of: pbspro, torque")
        super().__init__(**options)  # type: ignore[arg-type]
        self.dialect: PBSDialect = dialect  # type: ignore[assignment]

    # --- rendering -----------------------------------------------------------------

    def directives(self, spec: JobSpec, *, output: str | None) -> list[str]:
        """Return the ``#PBS`` lines for ``spec`` in this system's dialect."""
        lines = [directive("#PBS", "-N", spec.name), directive("#PBS", "-S", "/bin/bash")]
        if spec.queue:
            lines.append(directive("#PBS", "-q", spec.queue))
        if spec.account:
            lines.append(directive("#PBS", "-A", spec.account))
        if spec.walltime:
            lines.append(directive("#PBS", "-l", f"walltime={format_walltime(spec.walltime)}"))
        cores = spec.tasks_per_node * spec.cores_per_task
        if self.dialect == "pbspro":
            chunk = (
                f"select={spec.nodes}:ncpus={cores}:mpiprocs={spec.tasks_per_node}"
                f":ompthreads={spec.cores_per_task}"
            )
            if spec.gpus_per_node:
                chunk += f":ngpus={spec.gpus_per_node}"
            if spec.memory:
                chunk += f":mem={memory_mib(spec.memory)}mb"
            lines.append(directive("#PBS", "-l", chunk))
        else:
            nodes = f"nodes={spec.nodes}:ppn={cores}"
            if spec.gpus_per_node:
                nodes += f":gpus={spec.gpus_per_node}"
            lines.append(directive("#PBS", "-l", nodes))
            if spec.memory and spec.nodes == 1:
                lines.append(directive("#PBS", "-l", f"mem={memory_mib(spec.memory)}mb"))
            elif spec.memory:
                per_process = memory_mib(spec.memory // spec.tasks_per_node)
                lines.append(directive("#PBS", "-l", f"pmem={per_process}mb"))
        if spec.restart is RestartMode.REQUEUE:
            lines.append(directive("#PBS", "-r", "y"))
        if output:
            lines += [directive("#PBS", "-o", output), directive("#PBS", "-j", "oe")]
        lines += [
            directive("#PBS", *directive_words(item, "#PBS")) for item in spec.extra_directives
        ]
        return lines

    def output_path(self, spec: JobSpec, token: str) -> str | None:
        """``<log_directory>/<name>-<token>.log``: PBS cannot put the job id in it."""
        if not spec.log_directory:
            return None
        return os.path.join(spec.log_directory, f"{file_stem(spec.name)}-{token}.log")

    def default_workdir(self) -> str:
        """PBS starts jobs in the home directory; go where ``qsub`` ran, as SLURM does."""
        return 'if [ -n "${PBS_O_WORKDIR:-}" ]; then cd -- "$PBS_O_WORKDIR"; fi'

    # --- commands ------------------------------------------------------------------

    def submit_command(
        self,
        script_path: str,
        *,
        output: str | None,
        variables: Mapping[str, str] | None = None,
    ) -> tuple[list[str], str | None]:
        """``qsub [-o LOG -j oe] [-V -v K=V,...] SCRIPT``, run from the script's directory.

        ``-V`` goes with ``-v``: SLURM's Torque-compatible ``qsub`` turns ``-v`` alone
        into ``sbatch --export=NONE,K=V``, a job without the submitter's environment.
        """
        argv = ["qsub"]
        if output:
            argv += ["-o", output, "-j", "oe"]
        if variables:
            pairs = ",".join(f"{k}={v}" for k, v in check_variables(variables).items())
            argv += ["-V", "-v", pairs]
        directory, name = os.path.split(os.path.abspath(script_path))
        return [*argv, name], directory

    def parse_job_id(self, stdout: str) -> str:
        """Read the id ``qsub`` prints: ``123.server`` (PBS) or a bare ``123``.

        Examples
        --------
        >>> PBSSystem().parse_job_id("4242.pbs01\\n")
        '4242.pbs01'
        >>> PBSSystem().parse_job_id("17\\n")
        '17'
        """
        for line in reversed(stdout.strip().splitlines()):
            line = line.strip()
            if line and _JOB_ID.match(line) and line[0].isdigit():
                return line
        raise ValueError(f"no job id in {stdout!r}")

    cancel_program = "qdel"

    def cancel_found_ended(self, result: CommandResult) -> bool:
        # SLURM's Torque-compatible qdel exits 1 without a word for ended jobs.
        return not result.output or bool(_UNKNOWN_JOB.search(result.output))

    def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Return each job's status from one ``qstat -f`` call (per 500 jobs).

        Jobs ``qstat`` does not know (any more) are ``UNKNOWN``.

        Raises
        ------
        JobQueueError
            ``qstat`` failed for another reason than unknown job ids.
        """
        ids = list(dict.fromkeys(job_ids))
        found: dict[str, JobStatus] = {}
        for chunk in chunks(ids):
            argv = ["qstat", "-f", *(["-x"] if self.dialect == "pbspro" else []), *chunk]
            result = self._run(argv)
            jobs = parse_qstat_full(result.stdout)
            if (
                not result.ok
                and not jobs
                and result.output
                and not _UNKNOWN_JOB.search(result.output)
            ):
                raise self._query_error(result)
            for job_id in chunk:
                for reported, attrs in jobs.items():
                    if same_job(job_id, reported):
                        found[job_id] = _status_from_attributes(job_id, attrs, self.dialect)
                        break
        return {j: found.get(j, JobStatus(j, JobState.UNKNOWN, source="none")) for j in ids}

    def __repr__(self) -> str:
        return f"PBSSystem(dialect={self.dialect!r})"
