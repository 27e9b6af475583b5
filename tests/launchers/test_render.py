"""Rendered job scripts: pinned by golden files, and hostile values survive the shell.

The golden files in ``tests/launchers/golden/`` are the exact scripts we submit. When a
change to a template or a system's directives is intended, regenerate them with::

    REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/launchers/test_render.py

and review the diff (``git diff tests/launchers/golden``) before committing it.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import (
    CommandResult,
    JobConfigError,
    JobKind,
    JobSpec,
    LocalSystem,
    PBSSystem,
    SlurmSystem,
)
from launchers._render import render_template

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("REGENERATE_GOLDEN") == "1"

# Values a shell would misread if they were pasted unquoted.
HOSTILE_DIR = '/scratch/it\'s a "dir" $HOME `id` %j'
HOSTILE_NEWLINE = "/tmp/two\nlines/sched.json"
HOSTILE_SCRIPT = "/home/u/$(touch pwned)/my script.py"
HOSTILE_ARGS = ["a b", "c;d", "$HOME", "'q'", "line\nbreak", "*", ""]
HOSTILE_SCRIPT_PATH = f"{HOSTILE_DIR}/my_job_rm_-rf_HOME-cluster-golden.sh"

# What srun's ranks start with when SLURM is to send them the drain signal (USR2).
IGNORE_USR2 = ["/bin/sh", "-c", 'trap "" USR2; exec "$@"', "hpc-rank"]


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; run with REGENERATE_GOLDEN=1 to create it"
    expected = path.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), str(path), "rendered"
            )
        )
        pytest.fail(
            f"rendered script differs from {path}; if intended, regenerate with "
            f"REGENERATE_GOLDEN=1 (see this module's docstring)\n{diff}"
        )


def full_spec(**changes) -> JobSpec:
    spec = JobSpec(
        name="analysis",
        queue="compute",
        account="proj42",
        walltime="02:00:00",
        nodes=2,
        tasks_per_node=4,
        cores_per_task=2,
        memory="64GiB",
        gpus_per_node=1,
        log_directory="/scratch/alice/logs",
        extra_directives=["--constraint=haswell", "#SBATCH --exclusive"],
        prologue=["module load python/3.11", "source /home/alice/venv/bin/activate"],
        env={"OMP_NUM_THREADS": "2", "HPC_LOGGING": "info"},
        interface="ib0",
        python="/home/alice/venv/bin/python",
        working_directory="/home/alice/project",
        mpi_launcher="srun",
        mpi_args=["--mpi=pmi2"],
    )
    spec.update(changes)
    return spec


def minimal_spec(**changes) -> JobSpec:
    spec = JobSpec(python="/opt/python/bin/python3", working_directory="/work/run")
    spec.update(changes)
    return spec


def hostile_spec(**changes) -> JobSpec:
    spec = JobSpec(
        name="my job; rm -rf $HOME",
        log_directory=HOSTILE_DIR,
        tasks_per_node=3,
        python="/opt/my python/bin/python'3",
        working_directory="/home/u/`whoami` dir",
        env={"HOSTILE": "it's $PATH\nand `more`"},
        runtime_args=["--note", "$(reboot)"],
    )
    spec.update(changes)
    return spec


CASES = {
    "slurm_cluster.sh": lambda: SlurmSystem().render(
        full_spec(),
        JobKind.CLUSTER,
        scheduler_file="/scratch/alice/sched.json",
        token="golden",
        script_path="/scratch/alice/logs/analysis-cluster-golden.sh",
    ),
    # Requeue, and SLURM signals the srun-started ranks 5 minutes before the walltime.
    "slurm_requeue_srun.sh": lambda: SlurmSystem().render(
        minimal_spec(
            walltime="12:00:00",
            restart="requeue",
            drain_lead="5min",
            drain_signal="SIGTERM",
            max_restarts=3,
            mpi_launcher="srun",
        ),
        JobKind.CLUSTER,
        scheduler_file="/work/run/sched.json",
        token="golden",
        script_path="/work/run/hpc-logs/hpc-cluster-golden.sh",
    ),
    # mpiexec's ranks run in the batch step, which SLURM does not signal: no --signal,
    # they drain by HPC_JOB_DRAIN_AT alone.
    "slurm_resubmit_mpiexec.sh": lambda: SlurmSystem().render(
        minimal_spec(walltime="01:00:00", restart="resubmit"),
        JobKind.CLUSTER,
        scheduler_file="/work/run/sched.json",
        token="golden",
        script_path="/work/run/hpc-logs/hpc-cluster-golden.sh",
    ),
    "pbspro_requeue.sh": lambda: PBSSystem(dialect="pbspro").render(
        minimal_spec(walltime="04:00:00", restart="requeue", drain_lead="10min"),
        JobKind.CLUSTER,
        scheduler_file="/work/run/sched.json",
        token="golden",
        script_path="/work/run/hpc-logs/hpc-cluster-golden.sh",
    ),
    "slurm_worker.sh": lambda: SlurmSystem().render(
        minimal_spec(), JobKind.WORKER, scheduler_file="/work/run/sched.json", token="golden"
    ),
    "slurm_batch_hostile.sh": lambda: SlurmSystem().render(
        hostile_spec(),
        JobKind.CLUSTER,
        scheduler_file=HOSTILE_NEWLINE,
        script=HOSTILE_SCRIPT,
        script_args=HOSTILE_ARGS,
        token="golden",
        script_path=HOSTILE_SCRIPT_PATH,
    ),
    "pbspro_cluster.sh": lambda: PBSSystem(dialect="pbspro").render(
        full_spec(mpi_launcher="mpiexec", mpi_args=[], extra_directives=["-l place=scatter"]),
        JobKind.CLUSTER,
        scheduler_file="/scratch/alice/sched.json",
        token="golden",
    ),
    "torque_worker.sh": lambda: PBSSystem(dialect="torque").render(
        minimal_spec(memory="8GiB", log_directory="/work/run/logs"),
        JobKind.WORKER,
        scheduler_file="/work/run/sched.json",
        token="golden",
    ),
    "torque_multinode.sh": lambda: PBSSystem(dialect="torque").render(
        full_spec(
            mpi_launcher="mpirun", mpi_implementation="openmpi", mpi_args=[], extra_directives=[]
        ),
        JobKind.CLUSTER,
        scheduler_file="/scratch/alice/sched.json",
        token="golden",
    ),
    "torque_batch_hostile.sh": lambda: PBSSystem(dialect="torque").render(
        hostile_spec(working_directory=None),
        JobKind.CLUSTER,
        scheduler_file=HOSTILE_NEWLINE,
        script=HOSTILE_SCRIPT,
        script_args=HOSTILE_ARGS,
        token="golden",
    ),
    "local_cluster.sh": lambda: LocalSystem().render(
        minimal_spec(tasks_per_node=4, log_directory="/work/run/logs"),
        JobKind.CLUSTER,
        scheduler_file="/work/run/sched.json",
        token="golden",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_golden_file(name):
    check_golden(name, CASES[name]())


def test_every_golden_file_has_a_case():
    if GOLDEN.exists():
        assert sorted(p.name for p in GOLDEN.glob("*.sh")) == sorted(CASES)


def test_memory_is_written_in_mib_for_each_system():
    spec = minimal_spec(memory="4GB", log_directory=None)
    slurm = SlurmSystem().render(spec, scheduler_file="/s")
    assert "#SBATCH --mem=3814M\n" in slurm
    pbspro = PBSSystem(dialect="pbspro").render(spec, scheduler_file="/s")
    assert ":mem=3814mb\n" in pbspro
    torque = PBSSystem(dialect="torque").render(spec, scheduler_file="/s")
    assert "#PBS -l mem=3814mb\n" in torque


def test_pbs_dialects_ask_for_resources_their_own_way():
    spec = minimal_spec(nodes=3, tasks_per_node=4, cores_per_task=2)
    assert "#PBS -l select=3:ncpus=8:mpiprocs=4:ompthreads=2\n" in PBSSystem(
        dialect="pbspro"
    ).render(spec, scheduler_file="/s")
    assert "#PBS -l nodes=3:ppn=8\n" in PBSSystem(dialect="torque").render(
        spec, scheduler_file="/s"
    )
    with pytest.raises(JobConfigError, match="dialect"):
        PBSSystem(dialect="sge")


def test_a_line_break_cannot_inject_a_directive_through_extra_directives():
    spec = minimal_spec()
    # Bypass JobSpec's own check to prove the renderer checks too.
    object.__setattr__(spec, "extra_directives", ("--exclusive\n#SBATCH --account=other",))
    with pytest.raises(JobConfigError, match="line break"):
        SlurmSystem().render(spec, scheduler_file="/s")


def test_a_line_break_in_a_log_directory_cannot_reach_a_directive():
    spec = minimal_spec()
    object.__setattr__(spec, "log_directory", "/tmp/x\n#PBS -A other")
    for system in (SlurmSystem(), PBSSystem()):
        with pytest.raises(JobConfigError, match="line break"):
            system.render(spec, scheduler_file="/s", token="t")


def test_unbalanced_quote_in_extra_directive_is_a_config_error():
    with pytest.raises(JobConfigError, match="cannot be split"):
        SlurmSystem().render(
            minimal_spec(extra_directives=["--comment='oops"]), scheduler_file="/s"
        )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"mpi_launcher": "mpiexec"}, ["mpiexec", "-n", "2", "-disable-auto-cleanup"]),
        ({"mpi_launcher": "mpirun"}, ["mpirun", "-n", "2", "-disable-auto-cleanup"]),
        (
            {"mpi_launcher": "mpiexec", "mpi_implementation": "openmpi"},
            ["mpiexec", "-n", "2"],
        ),
        (
            {"mpi_launcher": "srun"},
            ["srun", "-n", "2", "--kill-on-bad-exit=0", *IGNORE_USR2],
        ),
        ({"mpi_launcher": "mpiexec", "mpi_disable_auto_cleanup": False}, ["mpiexec", "-n", "2"]),
        (
            {"mpi_launcher": "/opt/mpich/bin/mpiexec", "mpi_args": ["-ppn", "2"]},
            ["/opt/mpich/bin/mpiexec", "-n", "2", "-disable-auto-cleanup", "-ppn", "2"],
        ),
    ],
)
def test_launcher_flags_keep_other_ranks_alive_where_the_launcher_allows(changes, expected):
    argv = SlurmSystem().launch_command(
        minimal_spec(**changes), JobKind.CLUSTER, scheduler_file="/s"
    )
    assert argv[: len(expected)] == expected
    assert argv[len(expected) :] == [
        "/opt/python/bin/python3",
        "-m",
        "runtime.mpi",
        "--scheduler-file",
        "/s",
        "--nthreads",
        "1",
    ]


@pytest.mark.parametrize(
    ("changes", "prefixed"),
    [
        ({"mpi_launcher": "srun"}, True),
        ({"mpi_launcher": "srun", "walltime": None}, False),  # no --signal: nothing to ignore
        ({"mpi_launcher": "mpiexec"}, False),  # SLURM signals steps: mpiexec's ranks get none
    ],
)
def test_srun_ranks_ignore_the_drain_signal_until_the_scheduler_handles_it(changes, prefixed):
    argv = SlurmSystem().launch_command(
        minimal_spec(**changes), JobKind.WORKER, scheduler_file="/s"
    )
    assert (IGNORE_USR2[0] in argv) is prefixed
    assert PBSSystem().rank_prefix(minimal_spec(**changes)) == []  # PBS sends no such signal


def test_the_rank_prefix_keeps_the_signal_ignored_into_the_program_it_runs():
    """The prefix's ignore outlives ``exec``: the program is started with it in force."""
    spec = minimal_spec(mpi_launcher="srun", drain_signal="TERM")
    prefix = SlurmSystem().rank_prefix(spec)
    program = "import sys; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [*prefix, sys.executable, "-c", program],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)  # would end it, were it not ignored
        child.communicate("", timeout=30)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0


def test_worker_job_joins_with_no_scheduler_flag_interface_and_worker_size():
    argv = SlurmSystem().launch_command(
        minimal_spec(
            interface="ib0",
            cores_per_task=4,
            tasks_per_node=2,
            memory="16GiB",
            runtime_args=["--port", "0"],
        ),
        JobKind.WORKER,
        scheduler_file="/s",
    )
    assert argv[-12:] == [
        "runtime.mpi",
        "--no-scheduler",
        "--scheduler-file",
        "/s",
        "--interface",
        "ib0",
        "--nthreads",
        "4",
        "--memory-limit",
        "8192MiB",
        "--port",
        "0",
    ]


def test_cluster_job_needs_ranks_for_scheduler_worker_and_script():
    system = SlurmSystem()
    with pytest.raises(JobConfigError, match="at least 2 MPI ranks"):
        system.render(minimal_spec(tasks_per_node=1), scheduler_file="/s")
    with pytest.raises(JobConfigError, match="at least 2 MPI ranks"):
        system.render(minimal_spec(tasks_per_node=1), scheduler_file="/s", script="/x.py")
    # Two ranks are enough in batch mode: the script then shares rank 0 with the scheduler.
    system.render(minimal_spec(tasks_per_node=2), scheduler_file="/s", script="/x.py")


def test_worker_job_cannot_run_a_script():
    with pytest.raises(JobConfigError, match="worker job"):
        SlurmSystem().render(minimal_spec(), JobKind.WORKER, scheduler_file="/s", script="/x.py")


def test_mpiexec_is_taken_from_the_python_environment_when_it_is_there(tmp_path):
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    mpiexec = bin_dir / "mpiexec"
    mpiexec.write_text("#!/bin/sh\n")
    mpiexec.chmod(0o755)
    spec = minimal_spec(python=str(bin_dir / "python"))
    assert SlurmSystem().launch_command(spec, JobKind.CLUSTER, scheduler_file="/s")[0] == str(
        mpiexec
    )
    srun = spec.replace(mpi_launcher="srun")
    assert SlurmSystem().launch_command(srun, JobKind.CLUSTER, scheduler_file="/s")[0] == "srun"


def test_template_slots_and_values_must_match():
    with pytest.raises(KeyError, match="missing"):
        render_template("{{ missing }}\n", {})
    with pytest.raises(ValueError, match="extra"):
        render_template("plain\n", {"extra": "x"})


# --- the shell reads back exactly what we meant -----------------------------------


def _argv_printer(directory: Path) -> Path:
    """A fake MPI launcher that prints what it was given, as JSON."""
    printer = directory / "print argv's $args"
    printer.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "                  'hostile': os.environ.get('HOSTILE'),\n"
        "                  'job': {k: v for k, v in os.environ.items()\n"
        "                          if k.startswith('HPC_JOB_')}}))\n"
    )
    printer.chmod(printer.stat().st_mode | stat.S_IXUSR)
    return printer


@pytest.mark.parametrize(
    "system", [SlurmSystem(), PBSSystem(dialect="torque"), LocalSystem()], ids=lambda s: s.name
)
def test_hostile_values_reach_the_launcher_unchanged(tmp_path, system):
    printer = _argv_printer(tmp_path)
    workdir = tmp_path / "work `dir` $x 'q'"
    workdir.mkdir()
    spec = hostile_spec(mpi_launcher=str(printer), working_directory=str(workdir))
    script = system.render(
        spec,
        JobKind.CLUSTER,
        scheduler_file=HOSTILE_NEWLINE,
        script=HOSTILE_SCRIPT,
        script_args=HOSTILE_ARGS,
        token="t",
        script_path=HOSTILE_SCRIPT_PATH,
    )
    path = tmp_path / "job.sh"
    path.write_text(script)
    started = time.time()
    proc = subprocess.run(
        ["bash", str(path)], capture_output=True, text=True, timeout=30, check=True, cwd=tmp_path
    )
    seen = json.loads(proc.stdout)
    assert seen["argv"] == [
        "-n",
        "3",
        "-disable-auto-cleanup",
        "/opt/my python/bin/python'3",
        "-m",
        "runtime.mpi",
        "--scheduler-file",
        HOSTILE_NEWLINE,
        "--nthreads",
        "1",
        "--note",
        "$(reboot)",
        "--script",
        HOSTILE_SCRIPT,
        *HOSTILE_ARGS,
    ]
    assert seen["cwd"] == str(workdir)
    assert seen["hostile"] == "it's $PATH\nand `more`"
    assert not (tmp_path / "pwned").exists()
    if isinstance(system, LocalSystem):
        assert seen["job"] == {}  # nothing ends or requeues a local job
        return
    drain_at = int(seen["job"].pop("HPC_JOB_DRAIN_AT"))
    assert started + 3480 - 1 <= drain_at <= time.time() + 3480  # computed at job start
    assert seen["job"] == {
        "HPC_JOB_DRAIN_SIGNAL": "USR2",
        "HPC_JOB_RESTART": "none",
        "HPC_JOB_MAX_RESTARTS": "10",
        "HPC_JOB_SCRIPT": HOSTILE_SCRIPT_PATH,
    }


# --- draining before the walltime, and restarting ------------------------------------


def job_exports(script: str) -> dict[str, str]:
    prefix = "export HPC_JOB_"
    lines = [line[len("export ") :] for line in script.splitlines() if line.startswith(prefix)]
    return dict(line.split("=", 1) for line in lines)


def test_without_a_walltime_only_the_restart_variables_are_exported():
    spec = minimal_spec(walltime=None, mpi_launcher="srun", restart="resubmit", max_restarts=4)
    for system in (SlurmSystem(), PBSSystem(dialect="pbspro"), PBSSystem(dialect="torque")):
        script = system.render(spec, scheduler_file="/s", token="t", script_path="/j/job.sh")
        assert job_exports(script) == {
            "HPC_JOB_RESTART": "resubmit",
            "HPC_JOB_MAX_RESTARTS": "4",
            "HPC_JOB_SCRIPT": "/j/job.sh",
        }
        assert "--signal" not in script


def test_a_shown_script_has_no_path_to_export():
    # `hpc script` and cluster.job_script() print a script that is never written.
    script = SlurmSystem().render(minimal_spec(), scheduler_file="/s")
    assert "HPC_JOB_SCRIPT" not in script
    assert set(job_exports(script)) == {
        "HPC_JOB_DRAIN_AT",
        "HPC_JOB_DRAIN_SIGNAL",
        "HPC_JOB_RESTART",
        "HPC_JOB_MAX_RESTARTS",
    }


def test_only_requeue_asks_the_system_to_allow_requeueing():
    for mode in ("none", "resubmit"):
        assert "--requeue" not in SlurmSystem().render(
            minimal_spec(restart=mode), scheduler_file="/s"
        )
        assert "#PBS -r" not in PBSSystem().render(minimal_spec(restart=mode), scheduler_file="/s")
    # A resubmitting job must not also be requeued by SLURM after a node failure.
    assert "#SBATCH --no-requeue\n" in SlurmSystem().render(
        minimal_spec(restart="resubmit"), scheduler_file="/s"
    )
    assert "#SBATCH --requeue\n" in SlurmSystem().render(
        minimal_spec(restart="requeue"), scheduler_file="/s"
    )
    torque = PBSSystem(dialect="torque").render(
        minimal_spec(restart="requeue"), scheduler_file="/s"
    )
    assert "#PBS -r y\n" in torque


def test_worker_job_scripts_carry_the_same_drain_and_restart_settings():
    spec = minimal_spec(mpi_launcher="srun", restart="requeue", drain_lead="3min")
    script = SlurmSystem().render(spec, JobKind.WORKER, scheduler_file="/s", script_path="/w.sh")
    assert "#SBATCH --signal=USR2@180\n#SBATCH --requeue\n" in script
    assert "export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3420 ))\n" in script


def test_a_drain_lead_not_shorter_than_the_walltime_cannot_be_rendered():
    # The default drain_lead is 2 minutes too.
    spec = minimal_spec(walltime="00:02:00", restart="requeue")
    for system in (SlurmSystem(), PBSSystem()):
        with pytest.raises(JobConfigError, match=r"drain_lead 00:02:00 .* walltime 00:02:00"):
            system.render(spec, scheduler_file="/s")
    # Locally nothing drains, so nothing is checked.
    LocalSystem().render(spec, scheduler_file="/s")
    # Without a restart, such a job just does not drain.
    plain = SlurmSystem().render(spec.replace(restart="none"), scheduler_file="/s")
    assert "HPC_JOB_DRAIN_AT" not in plain and "--signal" not in plain


def test_sbatch_signal_times_are_limited_to_what_sbatch_accepts():
    spec = minimal_spec(walltime="2-00:00:00", drain_lead="20h", mpi_launcher="srun")
    with pytest.raises(JobConfigError, match="65535"):
        SlurmSystem().render(spec, scheduler_file="/s")
    SlurmSystem().render(spec.replace(mpi_launcher="mpiexec"), scheduler_file="/s")


def test_submitted_scripts_export_their_own_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    submitted = []

    def runner(argv, *, cwd=None, timeout=None):
        submitted.append(list(argv))
        return CommandResult(tuple(argv), 0, "77\n", "")

    spec = minimal_spec(log_directory="logs")  # relative: taken from the current directory
    job = SlurmSystem(runner=runner).submit_job(spec, scheduler_file="/s")
    assert os.path.isabs(job.script_path) and Path(job.script_path).parent == tmp_path / "logs"
    exports = job_exports(Path(job.script_path).read_text())
    assert exports["HPC_JOB_SCRIPT"] == job.script_path
    assert submitted == [["sbatch", "--parsable", job.script_path]]
    assert job.output == "logs/hpc-%j.log" and job.log_path == "logs/hpc-77.log"
