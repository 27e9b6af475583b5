#!/usr/bin/env bash
#PBS -N analysis
#PBS -S /bin/bash
#PBS -q compute
#PBS -A proj42
#PBS -l walltime=02:00:00
#PBS -l nodes=2:ppn=8:gpus=1
#PBS -l pmem=16384mb
#PBS -o /scratch/alice/logs/analysis-golden.log
#PBS -j oe
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
exec mpirun -n 8 /home/alice/venv/bin/python -m runtime.mpi --scheduler-file /scratch/alice/sched.json --interface ib0 --nthreads 2 --memory-limit 16384MiB
