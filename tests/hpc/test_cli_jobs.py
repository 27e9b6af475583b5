"""``hpc script`` / ``hpc submit --dry-run`` render without a batch system."""

from __future__ import annotations

import pytest

from hpc.cli import main


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "analysis.py"
    path.write_text("print('hi')\n")
    return str(path)


def test_script_prints_a_slurm_batch_job(capsys, script, tmp_path):
    status = main(
        [
            "script",
            "--profile",
            "slurm",
            "--walltime",
            "00:10:00",
            "--nodes",
            "2",
            "--",
            "python",
            script,
            "x y",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "#SBATCH --time=00:10:00" in out
    assert "#SBATCH --nodes=2" in out
    assert f"--script {script} 'x y'" in out


def test_submit_dry_run_prints_a_pbs_job_and_submits_nothing(capsys, script, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert main(["submit", "--dry-run", "--profile", "pbs", "--", "python", script]) == 0
    out = capsys.readouterr().out
    assert "#PBS" in out and "runtime.mpi" in out
    assert not (tmp_path / "state").exists()


def test_worker_job_script(capsys, tmp_path):
    sched = str(tmp_path / "s.json")
    assert (
        main(["script", "--profile", "slurm", "--kind", "worker", "--scheduler-file", sched]) == 0
    )
    out = capsys.readouterr().out
    assert "--no-scheduler" in out and sched in out


def test_submit_needs_a_script_or_a_scheduler_file():
    with pytest.raises(SystemExit, match="scheduler-file"):
        main(["submit", "--profile", "slurm"])


def test_submit_rejects_a_command_that_is_not_a_python_script(script):
    with pytest.raises(SystemExit, match="python SCRIPT.py"):
        main(["submit", "--profile", "slurm", "--", "bash", "run.sh"])


def test_bad_setting_is_a_clear_error(capsys, script):
    assert main(["script", "--profile", "slurm", "--walltime", "ten minutes", "--", script]) == 1
    assert "walltime" in capsys.readouterr().err


def test_restart_options_reach_the_script(capsys, script):
    argv = ["script", "--profile", "slurm", "--walltime", "01:00:00", "--restart", "requeue"]
    argv += ["--drain-lead", "5min", "--max-restarts", "2", "--", "python", script]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --requeue" in out and "#SBATCH --signal=USR2@300" in out
    assert "export HPC_JOB_RESTART=requeue" in out and "HPC_JOB_MAX_RESTARTS=2" in out
    assert "export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3300 ))" in out


def test_a_restart_policy_that_is_not_one_is_refused(capsys, script):
    with pytest.raises(SystemExit):
        main(["script", "--profile", "slurm", "--restart", "often", "--", "python", script])
    assert "invalid choice" in capsys.readouterr().err
