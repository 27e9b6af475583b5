#!/usr/bin/env bash
#SBATCH --job-name=hpc
#SBATCH --time=12:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
# An hpc-toolkit cluster job for SLURM, written by launchers.SlurmSystem.
# Every value in this script was shell-quoted when it was filled in.
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 42900 ))
export HPC_JOB_DRAIN_SIGNAL=TERM
export HPC_JOB_RESTART=requeue
export HPC_JOB_MAX_RESTARTS=3
export HPC_JOB_SCRIPT=/work/run/hpc-logs/hpc-cluster-golden.sh
cd -- /work/run
exec srun -n 2 --kill-on-bad-exit=0 /bin/sh -c 'trap "" TERM; exec "$@"' hpc-rank /opt/python/bin/python3 -m runtime.mpi --scheduler-file /work/run/sched.json --nthreads 1
