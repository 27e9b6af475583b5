#!/usr/bin/env bash
# An hpc-toolkit cluster job run directly on this machine (no batch system),
# written by launchers.LocalSystem.
# Every value in this script was shell-quoted when it was filled in.
cd -- /work/run
exec mpiexec -n 4 -disable-auto-cleanup /opt/python/bin/python3 -m runtime.mpi --scheduler-file /work/run/sched.json --nthreads 1
