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


#: Builders of the subcommands, in the order ``hpc --help`` lists them.
SUBCOMMANDS: list[SubcommandBuilder] = [
    add_config_command,
    add_runtime_commands,
    add_job_commands,
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
