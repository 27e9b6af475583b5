#!/usr/bin/env bash
#SBATCH '--job-name=my job; rm -rf $HOME'
#SBATCH --time=01:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=3
#SBATCH --cpus-per-task=1
#SBATCH '--output=/scratch/it'"'"'s a "dir" $HOME `id` %%j/my_job_rm_-rf_HOME-%j.log'
# An hpc-toolkit cluster job for SLURM, written by launchers.SlurmSystem.
# Every value in this script was shell-quoted when it was filled in.
export HOSTILE='it'"'"'s $PATH
and `more`'
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3480 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=none
export HPC_JOB_MAX_RESTARTS=10
export HPC_JOB_SCRIPT='/scratch/it'"'"'s a "dir" $HOME `id` %j/my_job_rm_-rf_HOME-cluster-golden.sh'
cd -- '/home/u/`whoami` dir'
exec mpiexec -n 3 -disable-auto-cleanup '/opt/my python/bin/python'"'"'3' -m runtime.mpi --scheduler-file '/tmp/two
lines/sched.json' --nthreads 1 --note '$(reboot)' --script '/home/u/$(touch pwned)/my script.py' 'a b' 'c;d' '$HOME' ''"'"'q'"'"'' 'line
break' '*' ''
