"""``hpc submit`` / ``hpc status`` / ``hpc cancel`` against the real SLURM on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import testing

pytestmark = pytest.mark.slurm
HPC = str(Path(sys.executable).parent / "hpc")


def hpc(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HPC, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def wait_for_state(job_id: str, states: set[str], env: dict, cwd: Path, timeout: float = 90):
    def state() -> str:
        out = hpc("status", "--system", "slurm", job_id, env=env, cwd=cwd).stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        seen = next((row[2] for row in rows if row and row[0] == job_id), "")
        return seen if seen in states else ""

    return testing.wait_until(state, f"job {job_id} to reach {states}", timeout, 0.5)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


def test_batch_mode_runs_the_script_as_client_in_a_slurm_job(tmp_path, env, cancel_jobs):
    from launchers import SlurmSystem

    script = tmp_path / "job.py"
    script.write_text(
        "import hpc\n"
        "def inc(x):\n"
        "    return x + 1\n"
        "total = hpc.delayed(sum)([hpc.delayed(inc)(i) for i in range(100)])\n"
        # One write: other ranks share the job log, and a print() under
        # PYTHONUNBUFFERED writes "RESULT", " ", the value and the newline apart.
        "import sys\n"
        "sys.stdout.write(f'RESULT {total.compute()}\\n')\n"
    )
    proc = hpc(
        "submit",
        "--profile",
        "slurm",
        "--walltime",
        "00:05:00",
        "--",
        "python",
        str(script),
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[3]
    cancel_jobs(SlurmSystem(), job_id)
    assert wait_for_state(job_id, {"COMPLETED", "FAILED"}, env, tmp_path) == "COMPLETED"
    logs = "".join(p.read_text() for p in (tmp_path / "hpc-logs").glob("*.log"))
    assert "RESULT 5050" in logs
    # With no ids, status lists the jobs this user submitted with `hpc submit`.
    assert job_id in hpc("status", env=env, cwd=tmp_path).stdout


def test_cancel_moves_a_job_to_cancelled(tmp_path, env, cancel_jobs):
    from launchers import SlurmSystem

    script = tmp_path / "wait.py"
    script.write_text("import time\ntime.sleep(300)\n")
    proc = hpc(
        "submit",
        "--profile",
        "slurm",
        "--walltime",
        "00:05:00",
        "--",
        "python",
        str(script),
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[3]
    cancel_jobs(SlurmSystem(), job_id)
    wait_for_state(job_id, {"RUNNING", "PENDING"}, env, tmp_path)
    assert hpc("cancel", "--system", "slurm", job_id, env=env, cwd=tmp_path).returncode == 0
    assert wait_for_state(job_id, {"CANCELLED"}, env, tmp_path) == "CANCELLED"
