"""Local "jobs": the same scripts run directly on this machine, no batch system.

For laptops and CI: the cluster job's ``mpiexec -n N python -m runtime.mpi ...`` runs as
a child process in its own session (so cancelling it signals every rank), its output
going to the log file. Walltime, queue and other directives have no meaning here and
are not written; nor are the drain and restart variables (nothing ends a local job at
its walltime, and there is no queue to come back through).

State: the :class:`subprocess.Popen` of every job this object started, by job id
(the process id), so that it can report exit codes and cancel what it started -
and nothing else: ids it did not start are ``UNKNOWN`` and never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping

from launchers._spec import JobSpec
from launchers._states import JobState, JobStatus
from launchers._system import JobSystem, check_variables, file_stem

__all__ = ["LocalSystem"]


class LocalSystem(JobSystem):
    """Runs job scripts as local processes.

    Parameters
    ----------
    kill_timeout
        Seconds between SIGTERM and SIGKILL when cancelling.
    **options
        Passed to :class:`~launchers._system.JobSystem`.
    """

    name = "local"
    template = "local.sh.tmpl"

    def __init__(self, *, kill_timeout: float = 5.0, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.kill_timeout = kill_timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def directives(self, spec: JobSpec, *, output: str | None) -> list[str]:
        """None: there is no batch system to read them."""
        return []

    def output_path(self, spec: JobSpec, token: str) -> str | None:
        """``<log_directory>/<name>-<token>.log``."""
        if not spec.log_directory:
            return None
        return os.path.join(spec.log_directory, f"{file_stem(spec.name)}-{token}.log")

    def job_environment(self, spec: JobSpec, *, script_path: str | None) -> list[str]:
        """None: a local job neither drains before a walltime nor restarts."""
        return []

    def submit_command(
        self,
        script_path: str,
        *,
        output: str | None,
        variables: Mapping[str, str] | None = None,
    ) -> tuple[list[str], str | None]:
        """``bash SCRIPT`` (``variables`` go into the process's environment instead)."""
        return ["bash", script_path], None

    def parse_job_id(self, stdout: str) -> str:
        """Not used: the job id is the process id."""
        raise ValueError("local jobs have no submit output")

    def submit(
        self,
        script_path: str,
        *,
        output: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> str:
        """Start the script in a new session; return its process id as the job id."""
        argv, cwd = self.submit_command(script_path, output=output)
        env = {**os.environ, **check_variables(variables)} if variables else None
        with contextlib.ExitStack() as stack:
            if output:
                os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                out = stack.enter_context(open(output, "ab"))
                proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            else:
                proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True
                )
        job_id = str(proc.pid)
        with self._lock:
            self._procs[job_id] = proc
        return job_id

    def cancel(self, job_ids: Iterable[str]) -> None:
        """SIGTERM each job's process group, then SIGKILL what is left after ``kill_timeout``."""
        with self._lock:
            procs = {j: self._procs[j] for j in job_ids if j in self._procs}
            self._cancelled.update(j for j, p in procs.items() if p.poll() is None)
        live = [p for p in procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_timeout
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Ranks that outlived their leader (same process group) go too.
        for proc in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def query(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Status of the processes this object started; others are ``UNKNOWN``."""
        out = {}
        with self._lock:
            for job_id in job_ids:
                proc = self._procs.get(job_id)
                if proc is None:
                    out[job_id] = JobStatus(job_id, JobState.UNKNOWN, source="none")
                    continue
                code = proc.poll()
                if code is None:
                    out[job_id] = JobStatus(job_id, JobState.RUNNING, "running", source="local")
                elif code == 0:
                    out[job_id] = JobStatus(
                        job_id, JobState.COMPLETED, "exited", None, 0, source="local"
                    )
                elif code < 0 or job_id in self._cancelled:
                    state = JobState.CANCELLED if job_id in self._cancelled else JobState.FAILED
                    sig = -code if code < 0 else None
                    out[job_id] = JobStatus(
                        job_id, state, "killed" if code < 0 else "exited", None,
                        code if code >= 0 else None, sig, source="local",
                    )  # fmt: skip
                else:
                    out[job_id] = JobStatus(
                        job_id, JobState.FAILED, "exited", None, code, source="local"
                    )
        return out
