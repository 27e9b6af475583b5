"""Run under ``mpiexec -n 3`` / ``-n 4`` with ``pytest --with-mpi`` (``make test`` does).

Every rank runs these tests: rank 0 becomes the scheduler, the other ranks workers,
bootstrapped through MPI exactly as ``python -m runtime.mpi`` does, but on each
process's background loop so the test body can drive the cluster from rank 0.
"""

from __future__ import annotations

import argparse
import os

import pytest

pytestmark = pytest.mark.mpi(min_size=3)


def square(x):
    return x * x


def host_pid(_):
    return os.getpid()


def test_rank_roles_form_a_cluster_that_computes(tmp_path_factory):
    from mpi4py import MPI

    from runtime import ioloop
    from runtime.client import Client
    from runtime.mpi import make_parser, start_role

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = comm.bcast(str(tmp_path_factory.mktemp("mpi") / "scheduler.json") if rank == 0 else None)
    args: argparse.Namespace = make_parser().parse_args(
        ["--scheduler-file", path, "--host", "127.0.0.1"]
    )
    role = ioloop.run_sync(start_role(args, comm), timeout=60)
    comm.Barrier()  # every worker has registered once start_role returned everywhere
    failure = None
    if rank == 0:
        try:
            with Client(role.address, secret=role.secret) as client:
                workers = client.scheduler_info()["workers"]
                assert len(workers) == size - 1
                futures = client.map(square, range(100))
                assert sum(client.gather(futures)) == sum(i * i for i in range(100))
                pids = client.run(os.getpid)
                assert len(set(pids.values())) == size - 1
                assert os.getpid() not in pids.values()
                client.shutdown()
        except BaseException as exc:  # keep the other ranks from waiting forever
            failure = exc
            ioloop.run_sync(role.close(), timeout=30)
    else:
        ioloop.run_sync(role.finished(), timeout=60)
    comm.Barrier()
    if failure is not None:
        raise failure


def test_stale_scheduler_file_is_never_read(tmp_path_factory):
    from mpi4py import MPI

    from runtime import ioloop
    from runtime.client import Client
    from runtime.mpi import make_parser, start_role
    from runtime.rendezvous import read_scheduler_file, write_scheduler_file

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    path = None
    if rank == 0:
        path = str(tmp_path_factory.mktemp("stale") / "scheduler.json")
        # A file from an earlier run: an address nobody listens on, another secret.
        write_scheduler_file(path, "tcp://127.0.0.1:9", b"x" * 32)
    path = comm.bcast(path)
    args = make_parser().parse_args(["--scheduler-file", path, "--host", "127.0.0.1"])
    role = ioloop.run_sync(start_role(args, comm), timeout=60)
    comm.Barrier()
    failure = None
    if rank == 0:
        try:
            info = read_scheduler_file(path)
            assert info["address"] == role.address != "tcp://127.0.0.1:9"
            with Client(scheduler_file=path) as client:
                assert len(client.scheduler_info()["workers"]) == comm.Get_size() - 1
                client.shutdown()
        except BaseException as exc:
            failure = exc
            ioloop.run_sync(role.close(), timeout=30)
    else:
        ioloop.run_sync(role.finished(), timeout=60)
    comm.Barrier()
    if failure is not None:
        raise failure
