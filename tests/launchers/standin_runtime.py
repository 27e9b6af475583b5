"""A stand-in for ``python -m runtime.mpi``, for testing launchers end to end.

Job scripts run ``<launcher> -n N <python> -m runtime.mpi --scheduler-file F ...``.
Tests set ``python`` to a wrapper that runs this file instead, so that real job
submission, MPI rank start-up and the scheduler-file rendezvous can be tested before
(and independently of) the real runtime. It follows the command line of the issue:

- cluster job, rank 0: writes the scheduler file (a fake address, a random secret,
  the batch job id), then waits for ``F.stop`` or the end of the batch script;
- ``--script S ARGS``: rank 1 runs ``python S ARGS``, writes ``F.done`` and exits with
  the script's status; the other ranks exit once ``F.done`` exists;
- ``--no-scheduler`` (worker job): waits for F, writes ``F.worker-<job>-<rank>``, then
  waits for ``F.stop``.

The rank comes from ``PMI_RANK`` (MPICH), ``OMPI_COMM_WORLD_RANK`` or ``SLURM_PROCID``.
It polls files because it stands in for processes on other nodes. Not collected by
pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

from runtime.rendezvous import current_job_id, write_scheduler_file
from runtime.testing import wait_for_path

LIFETIME = 600.0  # never outlive a forgotten test by much


def rank() -> int:
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def say(line: str) -> None:
    """Print one line in one write: the ranks share the job's output file through
    mpiexec, and a line written in two pieces (text, then newline) can interleave with
    another rank's line."""
    os.write(1, f"{line}\n".encode())


def wait_for(path: Path) -> bool:
    try:
        wait_for_path(path, LIFETIME)
    except TimeoutError:
        return False
    return True


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "runtime.mpi"]:
        argv = argv[2:]
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheduler-file", required=True)
    parser.add_argument("--no-scheduler", action="store_true")
    parser.add_argument("--interface")
    parser.add_argument("--nthreads", type=int)
    parser.add_argument("--memory-limit")
    parser.add_argument("--script", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    target = Path(args.scheduler_file)
    stop, done = Path(f"{target}.stop"), Path(f"{target}.done")
    me = rank()

    if args.no_scheduler:
        if not wait_for(target):
            return 3
        Path(f"{target}.worker-{current_job_id() or 'local'}-{me}").write_text("ready\n")
        say(f"stand-in worker rank {me} joined {target}")
        wait_for(stop)
        return 0

    if me == 0:
        write_scheduler_file(
            target, f"tcp://127.0.0.1:{40000 + os.getpid() % 20000}", secrets.token_bytes(32)
        )
        say(f"stand-in scheduler wrote {target}")
    if args.script and me == 1:
        script, *script_args = args.script
        code = subprocess.call([sys.executable, script, *script_args])
        done.write_text(f"{code}\n")
        return code
    if args.script:
        wait_for(done)
        return 0
    wait_for(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
