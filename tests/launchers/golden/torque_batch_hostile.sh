#!/usr/bin/env bash
#PBS -N 'my job; rm -rf $HOME'
#PBS -S /bin/bash
#PBS -l walltime=01:00:00
#PBS -l nodes=1:ppn=3
#PBS -o '/scratch/it'"'"'s a "dir" $HOME `id` %j/my_job_rm_-rf_HOME-golden.log'
#PBS -j oe
# An hpc-toolkit cluster job for PBS, written by launchers.PBSSystem.
# Every value in this script was shell-quoted when it was filled in.
export HOSTILE='it'"'"'s $PATH
and `more`'
export HPC_JOB_DRAIN_AT=$(( $(date +%s) + 3480 ))
export HPC_JOB_DRAIN_SIGNAL=USR2
export HPC_JOB_RESTART=none
export HPC_JOB_MAX_RESTARTS=10
if [ -n "${PBS_O_WORKDIR:-}" ]; then cd -- "$PBS_O_WORKDIR"; fi
exec mpiexec -n 3 -disable-auto-cleanup '/opt/my python/bin/python'"'"'3' -m runtime.mpi --scheduler-file '/tmp/two
lines/sched.json' --nthreads 1 --note '$(reboot)' --script '/home/u/$(touch pwned)/my script.py' 'a b' 'c;d' '$HOME' ''"'"'q'"'"'' 'line
break' '*' ''
