#!/usr/bin/env bash
# An hpc-toolkit cluster job run directly on this machine (no batch system),
# written by launchers.LocalSystem.
# Every value in this script was shell-quoted when it was filled in.
cd -- /work/main
exec /work/main/.venv/bin/mpiexec -n 3 -disable-auto-cleanup /work/main/.venv/bin/python -m runtime.mpi --scheduler-file /work/main/hpc-logs/scheduler-20261127-070551-f735ea.json --nthreads 1
