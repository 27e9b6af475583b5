"""``hpc submit``, ``hpc script``, ``hpc status`` and ``hpc cancel``: batch jobs from a shell.

Jobs submitted by ``hpc submit`` are recorded (id and system) in
``$XDG_STATE_HOME/hpc/jobs.tsv`` (``~/.local/state/hpc/jobs.tsv``), so ``hpc status``
with no job ids shows them.

Batch mode runs a script as the client inside the job::

    hpc submit --profile slurm --nodes 2 --walltime 01:00:00 -- python analysis.py --year 2024

A cluster for a client on the login node writes a scheduler file and keeps running::

    hpc submit --profile slurm --scheduler-file ~/scheduler.json
    python -c "import hpc; c = hpc.Client(scheduler_file='~/scheduler.json')"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_job_commands"]


def _state_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "hpc" / "jobs.tsv"


def _record(job_id: str, system: str, what: str) -> None:
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{job_id}\t{system}\t{int(time.time())}\t{what}\n")


def _recorded(limit: int = 50) -> list[tuple[str, str]]:
    path = _state_file()
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [(r[0], r[1]) for r in rows[-limit:] if len(r) >= 2]


def _job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="site profile name or path (see configs/)")
    parser.add_argument("--system", choices=["slurm", "pbs", "local"], help="job system")
    parser.add_argument("--nodes", type=int, help="nodes per job")
    parser.add_argument("--tasks-per-node", type=int, help="MPI ranks per node")
    parser.add_argument("--cores-per-task", type=int, help="threads per worker rank")
    parser.add_argument("--walltime", help="HH:MM:SS")
    parser.add_argument("--queue", help="partition / queue")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--memory", help="memory per node, e.g. 64GiB")
    parser.add_argument("--scheduler-file", help="where the cluster job writes its rendezvous")
    parser.add_argument(
        "--restart",
        choices=["none", "requeue", "resubmit"],
        help="after draining before its walltime the job requeues itself, submits a "
        "successor, or ends (the default); a batch script then runs again and resumes "
        "from its checkpoints",
    )
    parser.add_argument("--drain-lead", help="drain this long before the walltime, e.g. 5min")
    parser.add_argument("--max-restarts", type=int, help="most restarts of one job")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- python script.py [args]")


def _cluster(args: argparse.Namespace) -> Any:
    import launchers

    settings = {
        name: getattr(args, name)
        for name in (
            "nodes",
            "tasks_per_node",
            "cores_per_task",
            "walltime",
            "queue",
            "account",
            "memory",
            "scheduler_file",
            "restart",
            "drain_lead",
            "max_restarts",
        )
        if getattr(args, name, None) is not None
    }
    resolved = launchers.resolve_settings(system=args.system, profile=args.profile)
    classes = {
        "slurm": launchers.SlurmCluster,
        "pbs": launchers.PBSCluster,
        "local": launchers.LocalMPICluster,
    }
    return classes[resolved.system](profile=args.profile, **settings)


def _script_and_args(command: list[str]) -> tuple[str | None, list[str]]:
    """Split ``-- python script.py a b`` into the script path and its arguments."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return None, []
    if os.path.basename(command[0]).startswith("python"):
        command = command[1:]
    if not command or not command[0].endswith(".py"):
        raise SystemExit(
            "hpc: error: the command after -- must be `python SCRIPT.py [ARGS]` "
            f"(got {' '.join(command) or 'nothing'})"
        )
    if not os.path.exists(command[0]):
        raise SystemExit(f"hpc: error: script {command[0]!r} not found")
    return command[0], command[1:]


def _submit(args: argparse.Namespace) -> int:
    script, script_args = _script_and_args(args.command)
    if script is None and args.scheduler_file is None:
        raise SystemExit(
            "hpc: error: give `-- python script.py` (batch mode) or --scheduler-file F "
            "(a cluster for a client on the login node)"
        )
    cluster = _cluster(args)
    try:
        if args.dry_run:
            sys.stdout.write(cluster.job_script("cluster", script=script, script_args=script_args))
            return 0
        system = cluster.system_name
        if script is not None:
            job = cluster.submit_batch(script, script_args)
            _record(job.job_id, system, f"batch {script}")
            print(f"submitted batch job {job.job_id} ({system}) running {script}")
            return 0
        cluster.start(wait=not args.no_wait)
        ids = cluster.detach()
        for job_id in ids:
            _record(job_id, system, f"cluster {args.scheduler_file}")
        where = cluster.scheduler_address if not args.no_wait else "(starting)"
        print(
            f"submitted cluster job {' '.join(ids)} ({system}); scheduler {where}; "
            f"scheduler file {args.scheduler_file}"
        )
        return 0
    finally:
        if args.dry_run:
            cluster.close()


def _script(args: argparse.Namespace) -> int:
    script, script_args = _script_and_args(args.command)
    cluster = _cluster(args)
    try:
        sys.stdout.write(cluster.job_script(args.kind, script=script, script_args=script_args))
    finally:
        cluster.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    import launchers

    if args.job_ids:
        groups = {args.system or launchers.resolve_settings().system: list(args.job_ids)}
    else:
        groups = {}
        for job_id, system in _recorded():
            groups.setdefault(system, []).append(job_id)
        if not groups:
            print("no jobs recorded; give job ids: hpc status JOBID ...")
            return 0
    print(f"{'JOBID':<14}{'SYSTEM':<8}{'STATE':<15}{'EXIT':<6}REASON")
    for system, ids in groups.items():
        statuses = launchers.make_system(system).query(ids)
        for job_id in ids:
            st = statuses.get(job_id)
            if st is None:
                print(f"{job_id:<14}{system:<8}{'UNKNOWN':<15}")
                continue
            code = "" if st.exit_code is None else str(st.exit_code)
            print(f"{job_id:<14}{system:<8}{st.state.name:<15}{code:<6}{st.reason or ''}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    import launchers

    system = args.system or launchers.resolve_settings().system
    launchers.make_system(system).cancel(args.job_ids)
    print(f"cancelled {' '.join(args.job_ids)} ({system})")
    return 0


def add_job_commands(subparsers: Any) -> None:
    """Add ``hpc submit``, ``hpc script``, ``hpc status`` and ``hpc cancel``."""
    submit = subparsers.add_parser(
        "submit",
        help="submit a batch job (-- python script.py) or a cluster job (--scheduler-file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _job_options(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    submit.add_argument(
        "--no-wait", action="store_true", help="return without waiting for the scheduler file"
    )
    submit.set_defaults(handler=_submit)

    script = subparsers.add_parser("script", help="print the job script that would be submitted")
    _job_options(script)
    script.add_argument("--kind", choices=["cluster", "worker"], default="cluster")
    script.set_defaults(handler=_script)

    status = subparsers.add_parser("status", help="show job states (default: jobs you submitted)")
    status.add_argument("--system", choices=["slurm", "pbs", "local"])
    status.add_argument("job_ids", nargs="*", metavar="JOBID")
    status.set_defaults(handler=_status)

    cancel = subparsers.add_parser("cancel", help="cancel jobs")
    cancel.add_argument("--system", choices=["slurm", "pbs", "local"])
    cancel.add_argument("job_ids", nargs="+", metavar="JOBID")
    cancel.set_defaults(handler=_cancel)
