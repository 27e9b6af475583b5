#!/usr/bin/env bash
#SBATCH --job-name=hpc
#SBATCH --time=01:00:00
#SBATCH --no-requeue
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
# An hpc-toolkit cluster job for SLURM, written by launchers.SlurmSystem.
# Every value in this script was shell-quoted when it was filled in.
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3480 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=resubmit
export HPC_JOB_MAX_RESTARTS=10
export HPC_JOB_SCRIPT=/work/run/hpc-logs/hpc-cluster-golden.sh
cd -- /work/run
exec mpiexec -n 2 -disable-auto-cleanup /opt/python/bin/python3 -m runtime.mpi --scheduler-file /work/run/sched.json --nthreads 1
