#!/usr/bin/env bash
#PBS -N hpc
#PBS -S /bin/bash
#PBS -l walltime=04:00:00
#PBS -l select=1:ncpus=2:mpiprocs=2:ompthreads=1
#PBS -r y
# An hpc-toolkit cluster job for PBS, written by launchers.PBSSystem.
# Every value in this script was shell-quoted when it was filled in.
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 13800 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=requeue
export HPC_JOB_MAX_RESTARTS=10
export HPC_JOB_SCRIPT=/work/run/hpc-logs/hpc-cluster-golden.sh
cd -- /work/run
exec mpiexec -n 2 -disable-auto-cleanup /opt/python/bin/python3 -m runtime.mpi --scheduler-file /work/run/sched.json --nthreads 1
