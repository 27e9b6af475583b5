"""Fixtures for tests against the real SLURM on this machine (and its Torque-compatible
``qsub``/``qstat``/``qdel``), started by ``.ci/setup-slurm.sh``.

Tests marked ``slurm`` need a working ``sbatch``. Where it does not work they are
skipped - unless ``HPC_REQUIRE_SLURM=1`` is set (CI sets it), which turns the skip into
a failure saying what is wrong, so a broken setup cannot pass as "all skipped".

Every job a test submits is registered with ``cancel_jobs`` and cancelled at teardown,
even when the test fails. Job output goes to pytest's temporary directories.

``walltime_job`` submits, at the first SLURM test of the session, a job that outlives
its 1-minute ``--time``; the TIMEOUT test runs last and finds it (nearly) done, so the
slow part overlaps the other tests instead of adding to them.

Until ``runtime/mpi.py`` exists, jobs that need the runtime run
``tests/launchers/standin_runtime.py`` in its place (the ``standin_python`` fixture):
the scripts, submission, MPI start-up and scheduler-file rendezvous are the real ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launchers import JobSpec, JobSystem, SlurmSystem

REQUIRE_VARIABLE = "HPC_REQUIRE_SLURM"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
STANDIN = Path(__file__).resolve().parents[1] / "launchers" / "standin_runtime.py"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def _slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when it can."""
    for command in ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "qsub", "qstat", "qdel"):
        if shutil.which(command) is None:
            return f"{command} is not on PATH"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s (is slurmctld running?)"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip() or result.stdout.strip()}"
    states = result.stdout.split()
    if not any(state in USABLE_NODE_STATES for state in states):
        return f"no node is usable (sinfo says {states or 'nothing'})"
    if not MPIEXEC.exists():
        return f"no mpiexec beside {sys.executable} (pip install mpich)"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip (or, with HPC_REQUIRE_SLURM=1, fail) when SLURM does not work here."""
    problem = _slurm_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(
            f"{REQUIRE_VARIABLE}=1 but SLURM does not work here: {problem}. "
            "Run .ci/setup-slurm.sh as root to install and start it.",
            pytrace=False,
        )
    pytest.skip(f"no working SLURM: {problem} (run .ci/setup-slurm.sh as root)")


@pytest.fixture(autouse=True)
def _slurm_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm")
        request.getfixturevalue("walltime_job")


@pytest.fixture
def cancel_jobs() -> Iterator[Callable[[JobSystem, str], str]]:
    """Register ``(system, job_id)``; every registered job is cancelled at teardown."""
    registered: list[tuple[JobSystem, str]] = []

    def register(system: JobSystem, job_id: str) -> str:
        registered.append((system, job_id))
        return job_id

    yield register
    for system, job_id in registered:
        with contextlib.suppress(Exception):
            system.cancel([job_id])


def _write_standin(directory: Path) -> str:
    wrapper = directory / "python-standin"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def standin_python(tmp_path: Path) -> str:
    """An executable to use as ``python`` in job specs: runs the stand-in runtime."""
    return _write_standin(tmp_path)


@pytest.fixture(scope="session")
def walltime_job(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A job with our 1-minute ``--time`` directive that sleeps far past it; its id.

    A plain shell body rather than MPI ranks: once, cancelling another job's MPI
    ranks also ended this job's ranks early (proctrack/linuxproc on this machine),
    and this test is about walltime, not MPI.
    """
    directory = tmp_path_factory.mktemp("walltime")
    system = SlurmSystem()
    spec = JobSpec(
        name="hpc-walltime", walltime="00:01:00", tasks_per_node=1, log_directory=str(directory)
    )
    directives = system.directives(spec, output=system.output_path(spec, "t"))
    script = directory / "walltime.sh"
    script.write_text("\n".join(["#!/bin/bash", *directives, "sleep 600", ""]))
    job_id = system.submit(str(script))
    yield job_id
    with contextlib.suppress(Exception):
        system.cancel([job_id])
