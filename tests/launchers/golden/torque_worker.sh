#!/usr/bin/env bash
#PBS -N hpc
#PBS -S /bin/bash
#PBS -l walltime=01:00:00
#PBS -l nodes=1:ppn=2
#PBS -l mem=8192mb
#PBS -o /work/run/logs/hpc-golden.log
#PBS -j oe
# An hpc-toolkit worker job for PBS, written by launchers.PBSSystem.
# Every value in this script was shell-quoted when it was filled in.
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3480 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=none
export HPC_JOB_MAX_RESTARTS=10
cd -- /work/run
exec mpiexec -n 2 -disable-auto-cleanup /opt/python/bin/python3 -m runtime.mpi --no-scheduler --scheduler-file /work/run/sched.json --nthreads 1 --memory-limit 4096MiB
