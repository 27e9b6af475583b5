#!/usr/bin/env bash
#SBATCH --job-name=analysis
#SBATCH --partition=compute
#SBATCH --account=proj42
#SBATCH --time=02:00:00
#SBATCH --signal=USR2@120
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=2
#SBATCH --mem=65536M
#SBATCH --gpus-per-node=1
#SBATCH --output=/scratch/alice/logs/analysis-%j.log
#SBATCH --constraint=haswell
#SBATCH --exclusive
# An hpc-toolkit cluster job for SLURM, written by launchers.SlurmSystem.
# Every value in this script was shell-quoted when it was filled in.
export OMP_NUM_THREADS=2
export HPC_LOGGING=info
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 7080 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=none
export HPC_JOB_MAX_RESTARTS=10
export HPC_JOB_SCRIPT=/scratch/alice/logs/analysis-cluster-golden.sh
module load python/3.11
source /home/alice/venv/bin/activate
cd -- /home/alice/project
exec srun -n 8 --kill-on-bad-exit=0 --mpi=pmi2 /bin/sh -c 'trap "" USR2; exec "$@"' hpc-rank /home/alice/venv/bin/python -m runtime.mpi --scheduler-file /scratch/alice/sched.json --interface ib0 --nthreads 2 --memory-limit 16384MiB
