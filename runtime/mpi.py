"""MPI rank roles: one MPI launch becomes a whole cluster.

::

    mpiexec -n 4 python -m runtime.mpi --scheduler-file F          # rank 0 scheduler, 1-3 workers
    mpiexec -n 4 python -m runtime.mpi --scheduler-file F --script job.py arg ...
                                                                  # rank 1 runs job.py as client
    mpiexec -n 8 python -m runtime.mpi --scheduler-file F --no-scheduler
                                                                  # 8 more workers for F's cluster

MPI is used only to bootstrap. Rank 0 removes any scheduler file left by an earlier
run, starts the scheduler, writes the new file, and broadcasts the address and secret
to the other ranks, which connect with what they received: no rank ever reads a stale
file. After that every byte travels over the runtime's authenticated TCP connections,
and no rank calls MPI again, so one rank dying (a node lost, a worker killed) does not
stop the others; launch with MPICH's ``-disable-auto-cleanup`` (the launchers do) so
``mpiexec`` does not kill the survivors either. Ranks leave with ``os._exit`` once
their role is over, skipping ``MPI_Finalize``, which would otherwise wait for ranks
that are gone.

In batch mode (``--script``), rank 1 runs the user's script (in a 2-rank job, rank 0
runs it beside the scheduler, so one worker rank remains) with ``__name__ ==
"__main__"`` and a default :class:`~runtime.client.Client` connected to the cluster
(``hpc.compute`` and ``Client()`` find it; ``HPC_SCHEDULER_FILE`` is set too). When
the script ends the cluster shuts down, and the job's exit code is the script's.

State kept: none beyond the role objects of the current process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from runtime.errors import HPCError
from runtime.jobenv import DrainGuard, JobEnvironment

__all__ = ["MPIError", "main", "make_parser", "run", "start_role"]

logger = logging.getLogger(__name__)

SCHEDULER_RANK = 0
CLIENT_RANK = 1


class MPIError(HPCError, RuntimeError):
    """MPI is missing or the launch cannot form a cluster."""


def _mpi_comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
        raise MPIError(
            "runtime.mpi needs mpi4py: `pip install 'hpc-toolkit[mpi]'` installs it with "
            "an MPI from PyPI; on a cluster build mpi4py against the site MPI instead "
            "(`module load mpi; pip install --no-binary mpi4py mpi4py`)"
        ) from exc
    return MPI.COMM_WORLD


def make_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m runtime.mpi``."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.mpi",
        description="Start a scheduler on MPI rank 0 and workers on the other ranks.",
    )
    parser.add_argument(
        "--scheduler-file", required=True, help="where to write/read the rendezvous"
    )
    parser.add_argument(
        "--interface", default=None, help="network interface for addresses (e.g. ib0)"
    )
    parser.add_argument("--host", default=None, help="host/IP to listen on instead of --interface")
    parser.add_argument("--port", type=int, default=0, help="scheduler port (0: any free port)")
    parser.add_argument("--nthreads", type=int, default=1, help="threads per worker rank")
    parser.add_argument("--memory-limit", default="auto", help="per worker rank, e.g. 4GiB")
    parser.add_argument(
        "--no-scheduler",
        action="store_true",
        help="every rank is a worker joining the scheduler named by --scheduler-file",
    )
    parser.add_argument(
        "--script",
        nargs=argparse.REMAINDER,
        default=None,
        metavar="SCRIPT [ARGS]",
        help="run SCRIPT with ARGS as the client on rank 1; the job ends with it",
    )
    return parser


def _check_launch(args: argparse.Namespace, size: int) -> None:
    if args.no_scheduler:
        return
    if size < 2:
        raise MPIError(
            f"a cluster needs at least 2 MPI ranks (scheduler + worker); got {size}. "
            "Launch with e.g. `mpiexec -n 4 python -m runtime.mpi ...`"
        )
    if args.script is not None and not args.script:
        raise MPIError("--script needs the path of a Python script to run")


def _finalize_mpi() -> None:
    from mpi4py import MPI

    if not MPI.Is_finalized():
        MPI.Finalize()


async def start_role(args: argparse.Namespace, comm: Any, *, finalize: bool = False) -> Any:
    """Start this rank's scheduler or worker on the running loop and return it.

    Rank 0 starts the scheduler (unless ``--no-scheduler``) and broadcasts its address
    and secret; the other ranks start workers connected to it. Returns the started
    :class:`~runtime.scheduler.Scheduler` or :class:`~runtime.worker.Worker`, or, on
    the client rank in batch mode, the ``(address, secret)`` pair to connect with.
    This is a collective call: every rank of ``comm`` must make it. With
    ``finalize=True`` every rank finalizes MPI right after the address exchange (before
    any worker connects), so that MPI takes no further part: a rank lost later is then
    a closed TCP connection, handled by the runtime, not an MPI failure.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    _check_launch(args, size)
    if args.no_scheduler:
        if finalize:
            _finalize_mpi()
        return await _start_worker(args, rank=rank, scheduler_file=args.scheduler_file)
    if rank == SCHEDULER_RANK:
        scheduler = await _start_scheduler(args, comm)
        if finalize:
            _finalize_mpi()  # connections wait in the listen backlog meanwhile
        return scheduler
    info = comm.bcast(None, root=SCHEDULER_RANK)
    if finalize:
        _finalize_mpi()
    if info is None:
        raise MPIError("the scheduler on rank 0 failed to start; see rank 0's error output")
    address, secret_hex = info
    if args.script and rank == CLIENT_RANK and size > 2:
        return address, bytes.fromhex(secret_hex)
    return await _start_worker(args, rank=rank, address=address, secret=bytes.fromhex(secret_hex))


def _survive_lost_ranks() -> None:
    """Keep running when the launcher reports that another rank died.

    MPICH's ``mpiexec -disable-auto-cleanup`` tells the surviving ranks about a failed
    rank with SIGUSR1, whose default action terminates the process; the runtime
    notices the loss itself (a closed connection), so the signal is only logged.
    """
    if not hasattr(signal, "SIGUSR1"):  # pragma: no cover - not POSIX
        return

    def note(signum: int, frame: Any) -> None:
        logger.warning("the MPI launcher reports a lost rank; carrying on without it")

    signal.signal(signal.SIGUSR1, note)


def _closed_cluster(job: JobEnvironment, scheduler_file: str | None) -> str | None:
    """Why this restarted job's cluster is closed (it is to end at once); else ``None``.

    A cluster closed on the login node cancels the jobs it knows of; a restart that the
    cluster job submitted just before (or SLURM requeued) may still start: it ends here.
    """
    if not job.restarts or not scheduler_file:
        return None
    from runtime.rendezvous import closed_reason

    return closed_reason(scheduler_file)


def run(args: argparse.Namespace, comm: Any = None) -> int:
    """Play this rank's role until the cluster ends and return its exit code.

    Worker ranks run their worker in a child process and supervise it: MPICH's
    ``mpiexec`` tears the whole job down when a rank process is killed by a signal,
    even with ``-disable-auto-cleanup``, but not when it exits. So when a worker is
    killed (the OOM killer, ``kill -9``, a crash in native code) its rank exits with a
    status instead, and the scheduler and the other ranks carry on.

    Parameters
    ----------
    args
        Parsed command-line arguments (see :func:`make_parser`).
    comm
        An MPI communicator; ``MPI.COMM_WORLD`` by default.
    """
    comm = _mpi_comm() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    _check_launch(args, size)
    _survive_lost_ranks()
    job = JobEnvironment.from_environ()
    closed = _closed_cluster(job, args.scheduler_file)
    if closed is not None:
        if rank == SCHEDULER_RANK:
            logger.warning(
                "job %s restarts a cluster that was closed (%s): it ends here", job.job_id, closed
            )
        _finalize_mpi()
        return 0
    if job.drain_signal is not None:
        # SLURM's --signal reaches every process of the job step: only the scheduler
        # acts on it (see _guard); workers and what they start carry on until drained.
        signal.signal(job.drain_signal, signal.SIG_IGN)
    if args.no_scheduler:
        _finalize_mpi()
        return _supervise_worker(args, rank=rank, scheduler_file=args.scheduler_file)
    if args.script and size == 2:
        # Two ranks: the script runs beside the scheduler on rank 0, the worker on rank 1.
        if rank == SCHEDULER_RANK:
            return _run_script_beside_scheduler(args, comm)
        info = comm.bcast(None, root=SCHEDULER_RANK)
        _finalize_mpi()
        if info is None:
            raise MPIError("the scheduler on rank 0 failed to start; see rank 0's error output")
        return _supervise_worker(args, rank=rank, address=info[0], secret_hex=info[1])
    if rank == SCHEDULER_RANK:

        async def serve() -> None:
            scheduler = await _start_scheduler(args, comm)
            _finalize_mpi()  # worker connections wait in the listen backlog meanwhile
            guard = DrainGuard(scheduler, job)
            guard.install(asyncio.get_running_loop())
            await scheduler.finished()
            await guard.finished()

        asyncio.run(serve())
        return 0
    info = comm.bcast(None, root=SCHEDULER_RANK)
    _finalize_mpi()
    if info is None:
        raise MPIError("the scheduler on rank 0 failed to start; see rank 0's error output")
    address, secret_hex = info
    if args.script and rank == CLIENT_RANK:
        return _run_script(
            args.script, address, bytes.fromhex(secret_hex), args.scheduler_file, size - 2
        )
    return _supervise_worker(args, rank=rank, address=address, secret_hex=secret_hex)


def _supervise_worker(
    args: argparse.Namespace,
    *,
    rank: int,
    address: str | None = None,
    secret_hex: str | None = None,
    scheduler_file: str | None = None,
) -> int:
    """Run a worker process for this rank; return its status, never die by a signal."""
    cmd = [sys.executable, "-m", "runtime.worker", "--parent-pid", str(os.getpid())]
    cmd += ["--nthreads", str(args.nthreads), "--memory-limit", str(args.memory_limit)]
    if args.host:
        cmd += ["--host", args.host]
    if args.interface:
        cmd += ["--interface", args.interface]
    secret_path = None
    if scheduler_file is not None:
        cmd += ["--scheduler-file", scheduler_file]
    else:
        assert address is not None and secret_hex is not None
        fd, secret_path = tempfile.mkstemp(prefix="hpc-secret-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(secret_hex)
        cmd += [address, "--secret-file", secret_path, "--name", f"rank-{rank}"]
    # Own session: the launcher's signals to the rank's process group (SIGUSR1 when a
    # rank is lost) are not for the worker; SIGTERM/SIGINT are forwarded below.
    child = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        code = child.wait()
    finally:
        if secret_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(secret_path)
    if code < 0:
        logger.warning("worker of rank %d was killed by signal %d; rank exits", rank, -code)
        return 128 - code
    return code


async def _start_scheduler(args: argparse.Namespace, comm: Any) -> Any:
    from runtime.rendezvous import remove_scheduler_file
    from runtime.scheduler import Scheduler

    with contextlib.suppress(FileNotFoundError):
        remove_scheduler_file(args.scheduler_file)
    scheduler = Scheduler(
        host=args.host,
        port=args.port,
        interface=args.interface,
        scheduler_file=args.scheduler_file,
    )
    try:
        await scheduler.start()
    except BaseException:
        comm.bcast(None, root=SCHEDULER_RANK)
        raise
    comm.bcast((scheduler.address, scheduler.secret.hex()), root=SCHEDULER_RANK)
    return scheduler


async def _start_worker(
    args: argparse.Namespace,
    *,
    rank: int,
    address: str | None = None,
    secret: bytes | None = None,
    scheduler_file: str | None = None,
) -> Any:
    from runtime.worker import Worker

    worker = Worker(
        address,
        scheduler_file=scheduler_file,
        secret=secret,
        nthreads=args.nthreads,
        memory_limit=args.memory_limit,
        name=None if args.no_scheduler else f"rank-{rank}",
        host=args.host,
        interface=args.interface,
    )
    await worker.start()
    return worker


def _run_script_beside_scheduler(args: argparse.Namespace, comm: Any) -> int:
    from runtime import ioloop

    scheduler = ioloop.run_sync(_start_scheduler(args, comm))
    _finalize_mpi()

    def drained(successor: str | None) -> None:
        # The script runs again in the successor job (or is re-run by hand), resuming
        # from its checkpoints; this one would only wait for a scheduler that is gone.
        logger.warning("the job drained before its walltime; the batch script stops here")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    guard = DrainGuard(scheduler, on_done=drained)
    guard.install(ioloop.get_loop())
    try:
        return _run_script(args.script, scheduler.address, scheduler.secret, args.scheduler_file, 1)
    finally:
        if guard.started:
            # The script stopped because the job drains: let the drain restart the
            # job (it ends this process when done) rather than cut it short.
            ioloop.run_sync(guard.finished(), timeout=None)
        ioloop.run_sync(scheduler.close("batch script finished"), timeout=30)


def _wait_for_workers(client: Any, n: int, timeout: float) -> None:
    """Wait until ``n`` workers have registered, so the script starts on the whole job."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        have = len(client.scheduler_info()["workers"])
        if have >= n:
            return
        if time.monotonic() > deadline:
            logger.warning("only %d of %d worker ranks registered; starting the script", have, n)
            return
        time.sleep(delay)  # polling with a deadline and back-off, not synchronisation
        delay = min(delay * 2, 0.5)


def _run_script(
    script: Sequence[str], address: str, secret: bytes, scheduler_file: str, n_workers: int
) -> int:
    from runtime.client import Client

    path, *script_args = script
    os.environ["HPC_SCHEDULER_FILE"] = os.path.abspath(scheduler_file)
    code = 0
    client = Client(address, secret=secret)
    try:
        _wait_for_workers(client, n_workers, timeout=60.0)
        sys.argv = [path, *script_args]
        script_dir = os.path.dirname(os.path.abspath(path))
        sys.path.insert(0, script_dir)
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            client.shutdown()
        with contextlib.suppress(Exception):
            client.close()
    return _unless_drained(code)


def _unless_drained(code: int) -> int:
    """A script that failed because its job drained for a restart exits 0.

    It lost its scheduler on purpose: the successor job runs it again and it resumes
    from its checkpoints. Reporting the failure would mark the job FAILED.
    """
    from runtime import client

    notice = client._drain_notice
    if code != 0 and notice is not None and notice.get("restart"):
        logger.warning(
            "the batch script stopped (status %d) because its job drained (%s); the job "
            "restarts (%s) and runs it again",
            code, notice.get("reason"), notice.get("restart"),
        )  # fmt: skip
        return 0
    return code


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.mpi``; returns this rank's exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except HPCError as exc:
        print(f"runtime.mpi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
