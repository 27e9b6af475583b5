"""The ``hpc`` command line.

Each subcommand is built by one function listed in `SUBCOMMANDS`: it receives the
top-level parser's subparsers, adds its own parser, and sets ``handler`` on it, the
function that runs the command and returns the exit status. To add ``hpc worker``,
write ``add_worker_command(subparsers)`` (in a module of its own if it is large) and
list it in `SUBCOMMANDS`. Handlers import what they need when they run, so that
``hpc --help`` and every other command stay quick.

An `HPCError` from a handler is printed as ``hpc: error: ...`` with exit status 1;
usage errors exit with status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from runtime.errors import HPCError

__all__ = [
    "SUBCOMMANDS",
    "add_checkpoint_commands",
    "add_config_command",
    "add_job_commands",
    "add_runtime_commands",
    "build_parser",
    "main",
]

#: A builder receives the ``argparse._SubParsersAction`` of the ``hpc`` parser.
SubcommandBuilder = Callable[[Any], None]


def _config_show(args: argparse.Namespace) -> int:
    from hpc import config

    sys.stdout.write(config.show(args.key))
    return 0


def _config_get(args: argparse.Namespace) -> int:
    from hpc import config

    value = config.get(args.key)
    if isinstance(value, dict):
        sys.stdout.write(config.show(args.key))
    else:
        # Inline YAML, so that `$(hpc config get scheduler)` gives `null`, not `None`.
        dumped = yaml.safe_dump([value], default_flow_style=True, width=float("inf"))
        print(dumped.strip()[1:-1])
    return 0


def _config_validate(args: argparse.Namespace) -> int:
    from hpc import config

    config.validate()
    print("configuration is valid")
    return 0


def add_config_command(subparsers: Any) -> None:
    """Add ``hpc config show|get|validate`` to ``subparsers``."""
    parser = subparsers.add_parser(
        "config",
        help="show or query the configuration",
        description="Show or query the configuration, and where each value comes from.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    show = actions.add_parser("show", help="print values with the source of each")
    show.add_argument("key", nargs="?", help="only this section or key, e.g. serialize")
    show.set_defaults(handler=_config_show)

    get = actions.add_parser("get", help="print one value")
    get.add_argument("key", help="dotted key, e.g. serialize.compression")
    get.set_defaults(handler=_config_get)

    validate = actions.add_parser(
        "validate", help="fail if a config section belongs to no installed package"
    )
    validate.set_defaults(handler=_config_validate)


def _delegate(module: str, prog: str) -> Callable[[argparse.Namespace], int]:
    """Return a handler passing the remaining arguments to ``module.main(argv)``."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        main = importlib.import_module(module).main
        saved = sys.argv[0]
        sys.argv[0] = prog  # so the delegated parser's usage says `hpc scheduler ...`
        try:
            return int(main(args.rest))
        finally:
            sys.argv[0] = saved

    return handler


def add_runtime_commands(subparsers: Any) -> None:
    """Add ``hpc scheduler`` and ``hpc worker`` (the runtime's own entry points)."""
    for name, module, text in (
        ("scheduler", "runtime.scheduler", "run a scheduler that writes a scheduler file"),
        ("worker", "runtime.worker", "run a worker joining a scheduler"),
    ):
        parser = subparsers.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(handler=_delegate(module, f"hpc {name}"))


def add_job_commands(subparsers: Any) -> None:
    """Add ``hpc submit``, ``hpc script``, ``hpc status`` and ``hpc cancel``."""
    from hpc.cli_jobs import add_job_commands as add

    add(subparsers)


def _checkpoint_store(directory: str) -> Any:
    import os

    from runtime.checkpoint import CheckpointStore

    if not os.path.isdir(directory):
        raise HPCError(f"{directory} is not a directory; give the checkpoint directory")
    return CheckpointStore(directory)


def _checkpoints_list(args: argparse.Namespace) -> int:
    import time

    from runtime.units import format_bytes

    store = _checkpoint_store(args.directory)
    found = store.list(verify=args.verify)
    print(f"{'TOKEN':<34}{'SIZE':>10}  {'CREATED':<19}  {'HOST':<16}{'JOB':<12}KEY")
    total = bad = 0
    for info in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
        line = (
            f"{info.token:<34}{format_bytes(info.nbytes):>10}  {created:<19}  "
            f"{str(info.host or '-'):<16}{str(info.job_id or '-'):<12}{info.key}"
        )
        if not info.valid:
            line += f"  DAMAGED: {info.problem}"
            bad += 1
        print(line)
        total += info.nbytes
    damaged = f", {bad} damaged" if bad else ""
    print(f"{len(found)} checkpoints ({format_bytes(total)}{damaged}) in {store.directory}")
    return 1 if bad else 0


def _checkpoints_clean(args: argparse.Namespace) -> int:
    from runtime.units import format_bytes, parse_timedelta

    store = _checkpoint_store(args.directory)
    older_than = parse_timedelta(args.older_than) if args.older_than is not None else None
    result = store.clean(older_than, dry_run=args.dry_run)
    if args.dry_run:
        for path in result.paths:
            print(path)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.removed} files ({format_bytes(result.nbytes)}) from {store.directory}")
    return 0


def add_checkpoint_commands(subparsers: Any) -> None:
    """Add ``hpc checkpoints list|clean DIR``."""
    parser = subparsers.add_parser(
        "checkpoints",
        help="list or clean a checkpoint directory",
        description="List or delete the task results checkpointed in a directory.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="show each checkpoint's token, size and origin")
    listing.add_argument("directory", help="the checkpoint directory")
    listing.add_argument(
        "--verify",
        action="store_true",
        help="also verify every checksum (reads every file; exit status 1 if any is damaged)",
    )
    listing.set_defaults(handler=_checkpoints_list)

    clean = actions.add_parser(
        "clean", help="delete checkpoints (all, or those older than --older-than)"
    )
    clean.add_argument("directory", help="the checkpoint directory")
    clean.add_argument(
        "--older-than",
        metavar="AGE",
        default=None,
        help="only files last written longer ago than this, e.g. 7d, 12h (default: all)",
    )
    clean.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; remove nothing"
    )
    clean.set_defaults(handler=_checkpoints_clean)


#: Builders of the subcommands, in the order ``hpc --help`` lists them.
SUBCOMMANDS: list[SubcommandBuilder] = [
    add_config_command,
    add_runtime_commands,
    add_job_commands,
    add_checkpoint_commands,
]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``hpc`` command, with every subcommand in `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="hpc", description="Run Python task graphs on HPC clusters."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for build in SUBCOMMANDS:
        build(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hpc`` command line.

    Parameters
    ----------
    argv
        Arguments after the program name; by default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 1 when the command failed.

    Raises
    ------
    SystemExit
        On a usage error (status 2) or ``--help`` (status 0), from argparse.
    """
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except HPCError as exc:
        print(f"hpc: error: {exc}", file=sys.stderr)
        return 1
    return status
