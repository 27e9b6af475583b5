"""SLURM: ``#SBATCH`` directives, ``sbatch``, ``scancel``, and job states.

Status comes from one ``squeue`` call for all the session's jobs still in the queue.
Jobs no longer there are looked up with one ``sacct`` call; where accounting is
disabled (no slurmdbd, as on single-node test machines) ``sacct`` fails, and each such
job is looked up with ``scontrol show job``, which knows finished jobs for
``MinJobAge`` seconds. A job none of them knows is ``UNKNOWN``.

The one piece of state kept is whether ``sacct`` works on this site, learnt on its
first failure so that it is not asked again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

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
    translate,
    uses_srun,
)

__all__ = ["SLURM_STATES", "SlurmSystem"]

#: SLURM's job states (``squeue -o %T``, ``sacct``, ``scontrol``) -> JobState.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "NODE_FAIL": JobState.NODE_FAIL,
    "PREEMPTED": JobState.PREEMPTED,
    "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
}

_SUBMITTED = re.compile(r"Submitted batch job (\d+)")
_PARSABLE = re.compile(r"^(\d+)(?:;\S+)?$")
_EXIT_CODE = re.compile(r"^(\d+):(\d+)$")
# `scontrol -o show job` prints Key=Value pairs on one line; values may hold spaces
# (job names), keys never do.
_SCONTROL_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:]*)=")
_GONE = re.compile(r"Invalid job id specified", re.IGNORECASE)
_ALREADY_ENDED = re.compile(
    r"Invalid job id specified|already completing or completed|Job/step already", re.IGNORECASE
)
_SQUEUE_FORMAT = "%i|%T|%r"
_MAX_SIGNAL_TIME = 65535  # sbatch --signal=SIG@TIME takes at most this many seconds


def _exit_code(text: str) -> tuple[int | None, int | None]:
    """``"3:0"`` -> ``(3, None)``; ``"0:15"`` -> ``(0, 15)``."""
    match = _EXIT_CODE.match(text.strip())
    if not match:
        return None, None
    code, sig = int(match.group(1)), int(match.group(2))
    return code, (sig or None)


def _reason(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text in ("", "None", "(null)") else text


def parse_squeue(stdout: str) -> dict[str, JobStatus]:
    """Parse ``squeue -h -o '%i|%T|%r'`` output.

    Examples
    --------
    >>> parse_squeue("12|PENDING|Priority\\n13|RUNNING|None\\n")["12"].reason
    'Priority'
    """
    out = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        job_id, native = parts[0], parts[1]
        reason = _reason(parts[2]) if len(parts) > 2 else None
        out[job_id] = JobStatus(
            job_id, translate(SLURM_STATES, native), native, reason, source="squeue"
        )
    return out


def parse_sacct(stdout: str) -> dict[str, JobStatus]:
    """Parse ``sacct -n -P -X -o JobID,State,ExitCode`` output.

    Examples
    --------
    >>> s = parse_sacct("42|CANCELLED by 0|0:15\\n")["42"]
    >>> s.state, s.signal
    (<JobState.CANCELLED: 'CANCELLED'>, 15)
    """
    out = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        job_id, native = parts[0], parts[1].split(" ")[0]
        code, sig = _exit_code(parts[2])
        out[job_id] = JobStatus(
            job_id, translate(SLURM_STATES, native), native, None, code, sig, source="sacct"
        )
    return out


def parse_scontrol(stdout: str) -> dict[str, str]:
    """Parse one job of ``scontrol -o show job`` (or the multi-line form) into a dict.

    Examples
    --------
    >>> d = parse_scontrol("JobId=7 JobName=my job JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0")
    >>> d["JobName"], d["JobState"], d["ExitCode"]
    ('my job', 'FAILED', '3:0')
    """
    text = " ".join(stdout.split("\n"))
    fields: dict[str, str] = {}
    matches = list(_SCONTROL_KEY.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        fields.setdefault(match.group(1), text[match.end() : end].strip())
    return fields


class SlurmSystem(JobSystem):
    """SLURM: renders ``#SBATCH`` scripts and drives ``sbatch``/``squeue``/``scancel``.

    Memory is written as ``--mem=<MiB>M`` (per node; SLURM's ``M`` is 2**20 bytes),
    the walltime as ``--time=[D-]HH:MM:SS``, output and errors together to
    ``<log_directory>/<name>-%j.log``.

    With a walltime and ``srun`` as the MPI launcher, ``--signal=<drain_signal>@<drain_lead>``
    has SLURM signal the ranks when they should drain (SLURM signals job *steps*: ranks
    started by ``mpiexec`` run in the batch step and would not get it; they drain by
    ``HPC_JOB_DRAIN_AT`` alone). ``restart="requeue"`` adds ``--requeue``, which also lets
    SLURM requeue the job after a node failure or a preemption, and
    ``--open-mode=append`` so that each run adds to the job's output file;
    ``restart="resubmit"`` adds ``--no-requeue``, so that after a node failure the
    replacement comes from the cluster alone, not also from SLURM.

    Parameters
    ----------
    **options
        Passed to :class:`~launchers._system.JobSystem` (runner, retry, command_timeout).
    """

    name = "slurm"
    template = "slurm.sh.tmpl"
    transient_errors = (
        *JobSystem.transient_errors,
        r"Socket timed out",
        r"Unable to contact slurm controller",
        r"Zero Bytes were transmitted or received",
        r"temporarily unable to accept job",
        r"Communication connection failure",
        r"Slurm backup controller in standby mode",
        r"Job submit/allocate failed: Resource temporarily unavailable",
    )

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.sacct_available: bool | None = None

    # --- rendering -----------------------------------------------------------------

    def directives(self, spec: JobSpec, *, output: str | None) -> list[str]:
        """Return the ``#SBATCH`` lines for ``spec``."""
        lines = [directive("#SBATCH", f"--job-name={spec.name}")]
        if spec.queue:
            lines.append(directive("#SBATCH", f"--partition={spec.queue}"))
        if spec.account:
            lines.append(directive("#SBATCH", f"--account={spec.account}"))
        if spec.walltime:
            lines.append(
                directive("#SBATCH", f"--time={format_walltime(spec.walltime, days=True)}")
            )
        if self.signals_drain(spec):
            spec.check()
            if spec.drain_lead > _MAX_SIGNAL_TIME:
                raise JobConfigError(
                    f"drain_lead {spec.drain_lead} s is longer than the {_MAX_SIGNAL_TIME} s "
                    "that sbatch --signal accepts; lower drain_lead"
                )
            lines.append(directive("#SBATCH", f"--signal={spec.drain_signal}@{spec.drain_lead}"))
        if spec.restart is RestartMode.REQUEUE:
            lines.append(directive("#SBATCH", "--requeue"))
            # A requeued job writes the same output file: keep the earlier runs' logs.
            lines.append(directive("#SBATCH", "--open-mode=append"))
        elif spec.restart is RestartMode.RESUBMIT:
            # Sites often requeue jobs after a node failure by default (JobRequeue=1);
            # a resubmitting cluster brings the job back itself, and only once.
            lines.append(directive("#SBATCH", "--no-requeue"))
        lines.append(directive("#SBATCH", f"--nodes={spec.nodes}"))
        lines.append(directive("#SBATCH", f"--ntasks-per-node={spec.tasks_per_node}"))
        lines.append(directive("#SBATCH", f"--cpus-per-task={spec.cores_per_task}"))
        if spec.memory:
            lines.append(directive("#SBATCH", f"--mem={memory_mib(spec.memory)}M"))
        if spec.gpus_per_node:
            lines.append(directive("#SBATCH", f"--gpus-per-node={spec.gpus_per_node}"))
        if output:
            lines.append(directive("#SBATCH", f"--output={output}"))
        lines += [
            directive("#SBATCH", *directive_words(item, "#SBATCH"))
            for item in spec.extra_directives
        ]
        return lines

    def output_path(self, spec: JobSpec, token: str) -> str | None:
        """``<log_directory>/<name>-%j.log``, with ``%`` in the directory escaped as ``%%``."""
        if not spec.log_directory:
            return None
        return os.path.join(spec.log_directory.replace("%", "%%"), f"{file_stem(spec.name)}-%j.log")

    def log_path(self, output: str | None, job_id: str) -> str | None:
        """The output file of job ``job_id``."""
        if output is None or "\\" in output:  # a backslash turns SLURM's patterns off
            return output
        return re.sub(r"%(%|j)", lambda m: "%" if m.group(1) == "%" else job_id, output)

    # --- commands ------------------------------------------------------------------

    def signals_drain(self, spec: JobSpec) -> bool:
        """Whether SLURM is to signal the ranks ``drain_lead`` before the walltime.

        Only ``srun``'s ranks get the signal (they form a job step), and only a
        walltime has a "before".
        """
        return spec.drain_after is not None and uses_srun(spec)

    def rank_prefix(self, spec: JobSpec) -> list[str]:
        """Start each rank with the drain signal ignored, when SLURM is to send it.

        SLURM sends ``--signal`` at a time-limit check of its own, up to a minute before
        ``drain_lead`` ahead of the end: with a walltime near ``drain_lead`` that can be
        as the ranks start, before Python has set any handler, and the signal's default
        action (USR2, TERM) would kill them.
        ``/bin/sh -c 'trap "" SIG; exec "$@"'`` makes the ranks ignore it from their
        first instruction (an ignored signal stays ignored across ``exec``); the
        scheduler then sets its handler, and a signal before that is covered by
        ``HPC_JOB_DRAIN_AT``, the same drain time.
        """
        if not self.signals_drain(spec):
            return []
        return ["/bin/sh", "-c", f'trap "" {spec.drain_signal}; exec "$@"', "hpc-rank"]

    def submit_command(
        self,
        script_path: str,
        *,
        output: str | None,
        variables: Mapping[str, str] | None = None,
    ) -> tuple[list[str], str | None]:
        """``sbatch --parsable [--export=ALL,K=V,...] SCRIPT``, run in the current directory."""
        argv = ["sbatch", "--parsable"]
        if variables:
            pairs = ",".join(f"{k}={v}" for k, v in check_variables(variables).items())
            argv.append(f"--export=ALL,{pairs}")
        return [*argv, script_path], None

    def parse_job_id(self, stdout: str) -> str:
        """Read the id from ``Submitted batch job N`` or ``--parsable``'s ``N[;cluster]``.

        Examples
        --------
        >>> SlurmSystem().parse_job_id("Submitted batch job 4242\\n")
        '4242'
        >>> SlurmSystem().parse_job_id("4243;cluster2\\n")
        '4243'
        """
        for line in reversed(stdout.strip().splitlines()):
            line = line.strip()
            match = _SUBMITTED.search(line) or _PARSABLE.match(line)
            if match:
                return match.group(1)
        raise ValueError(f"no job id in {stdout!r}")

    cancel_program = "scancel"

    def cancel_found_ended(self, result: CommandResult) -> bool:
        return bool(_ALREADY_ENDED.search(result.output))

    def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Return each job's status: ``squeue``, then ``sacct``, then ``scontrol``.

        Raises
        ------
        JobQueueError
            ``squeue`` failed (after retries when the failure was transient).
        """
        ids = list(dict.fromkeys(job_ids))
        found: dict[str, JobStatus] = {}
        for chunk in chunks(ids):
            result = self._run(["squeue", "-h", "-j", ",".join(chunk), "-o", _SQUEUE_FORMAT])
            if result.ok:
                found.update(parse_squeue(result.stdout))
            elif not _GONE.search(result.output):  # all ids left the queue: not an error
                raise self._query_error(result)
        missing = [j for j in ids if j not in found]
        if missing and self.sacct_available is not False:
            found.update(self._sacct(missing))
            missing = [j for j in ids if j not in found]
        for job_id in missing:
            found[job_id] = self._scontrol(job_id)
        return {j: found[j] for j in ids}

    def _sacct(self, ids: list[str]) -> dict[str, JobStatus]:
        found: dict[str, JobStatus] = {}
        for chunk in chunks(ids):
            result = self._run(
                ["sacct", "-n", "-P", "-X", "-j", ",".join(chunk), "-o", "JobID,State,ExitCode"]
            )
            if not result.ok:
                if not self.is_transient(result):
                    self.sacct_available = False  # e.g. "accounting storage is disabled"
                return found
            self.sacct_available = True
            found.update(parse_sacct(result.stdout))
        return found

    def _scontrol(self, job_id: str) -> JobStatus:
        result = self._run(["scontrol", "-o", "show", "job", job_id])
        if not result.ok:
            if _GONE.search(result.output):
                return JobStatus(job_id, JobState.UNKNOWN, source="none")
            raise self._query_error(result)
        fields = parse_scontrol(result.stdout)
        native = fields.get("JobState", "")
        code, sig = _exit_code(fields.get("ExitCode", ""))
        state = translate(SLURM_STATES, native)
        if not state.is_terminal:
            code = sig = None  # ExitCode=0:0 means nothing yet for a queued job
        return JobStatus(
            job_id, state, native, _reason(fields.get("Reason")), code, sig, source="scontrol"
        )
