#!/usr/bin/env bash
#PBS -N analysis
#PBS -S /bin/bash
#PBS -q compute
#PBS -A proj42
#PBS -l walltime=02:00:00
#PBS -l select=2:ncpus=8:mpiprocs=4:ompthreads=2:ngpus=1:mem=65536mb
#PBS -o /scratch/alice/logs/analysis-golden.log
#PBS -j oe
#PBS -l place=scatter
# An hpc-toolkit cluster job for PBS, written by launchers.PBSSystem.
# Every value in this script was shell-quoted when it was filled in.
export OMP_NUM_THREADS=2
export HPC_LOGGING=info
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 7080 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=none
export HPC_JOB_MAX_RESTARTS=10
module load python/3.11
source /home/alice/venv/bin/activate
cd -- /home/alice/project
exec mpiexec -n 8 -disable-auto-cleanup /home/alice/venv/bin/python -m runtime.mpi --scheduler-file /scratch/alice/sched.json --interface ib0 --nthreads 2 --memory-limit 16384MiB
