"""Tests for the ``hpc`` command line: ``hpc config show|get|validate``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.config
from hpc import cli

RUNTIME_DEFAULTS = Path(runtime.config.__file__).parent / "runtime.yaml"


@pytest.fixture
def restore_global_config():
    """Put the process-wide configuration back as it was after the test."""
    store = runtime.config._STORE
    layers, overrides = store._layers, dict(store._overrides)
    yield
    store._rebuild(layers=layers, overrides=overrides)


@pytest.fixture
def clean_config(restore_global_config):
    """The process-wide configuration with no user files or environment variables."""
    runtime.config.refresh(paths=[], env={})


def test_config_show_prints_every_value_with_its_source(clean_config, capsys):
    with runtime.config.set(scheduler="sync"):
        assert cli.main(["config", "show"]) == 0
        expected = runtime.config.show()
    out = capsys.readouterr().out
    assert out == expected
    assert "scheduler: sync  # set()\n" in out
    assert f"  context: spawn  # default {RUNTIME_DEFAULTS}\n" in out


def test_config_show_of_one_section(clean_config, capsys):
    assert cli.main(["config", "show", "multiprocessing"]) == 0
    assert (
        capsys.readouterr().out
        == f"multiprocessing:\n  context: spawn  # default {RUNTIME_DEFAULTS}\n"
    )


def test_config_get_prints_the_value_as_yaml(clean_config, capsys):
    assert cli.main(["config", "get", "serialize.compression_min_size"]) == 0
    assert cli.main(["config", "get", "scheduler"]) == 0
    assert capsys.readouterr().out == "10kB\nnull\n"


def test_config_get_of_a_section_shows_it(clean_config, capsys):
    assert cli.main(["config", "get", "optimization"]) == 0
    assert capsys.readouterr().out.startswith("optimization:\n  fuse: true  # default ")


def test_config_get_of_an_unknown_key_fails_naming_it(clean_config, capsys):
    assert cli.main(["config", "get", "serialize.compresion"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hpc: error: no config key 'serialize.compresion'")
    assert "Did you mean 'serialize.compression'" in captured.err


def test_config_validate_fails_on_a_section_no_package_registers(clean_config, capsys):
    assert cli.main(["config", "validate"]) == 0
    with runtime.config.set({"nosuchpackage.option": 1}):
        assert cli.main(["config", "validate"]) == 1
    assert "'nosuchpackage' (from set())" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["config"], ["config", "frobnicate"], ["nosuch"]])
def test_usage_errors_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    assert "usage: hpc" in capsys.readouterr().err


def test_subcommands_come_from_the_builder_registry(monkeypatch, capsys):
    def add_hello_command(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("hello")
        parser.add_argument("name")
        parser.set_defaults(handler=lambda args: print(f"hello {args.name}") or 3)

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, add_hello_command])
    assert cli.main(["hello", "world"]) == 3
    assert capsys.readouterr().out == "hello world\n"


def _hpc_command() -> Path:
    command = Path(sys.executable).parent / "hpc"
    assert command.exists(), f"{command} missing: run `pip install -e .` to create the script"
    return command


def _isolated_env(home: Path, **variables: str) -> dict[str, str]:
    """The current environment minus HPC_* variables, with its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPC_")}
    env.update(HOME=str(home), **variables)
    return env


def test_installed_hpc_script_shows_an_environment_override_and_its_source(tmp_path):
    user_file = tmp_path / ".config" / "hpc" / "site.yaml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("num-workers: 3\n")
    result = subprocess.run(
        [str(_hpc_command()), "config", "show"],
        env=_isolated_env(tmp_path, HPC_SCHEDULER="processes"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "scheduler: processes  # $HPC_SCHEDULER\n" in result.stdout
    assert f"num-workers: 3  # {user_file}\n" in result.stdout


def test_installed_hpc_script_fails_on_an_unknown_environment_key(tmp_path):
    result = subprocess.run(
        [str(_hpc_command()), "config", "get", "scheduler"],
        env=_isolated_env(tmp_path, HPC_SCHEDULR="sync"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "$HPC_SCHEDULR" in result.stderr
    assert "Did you mean 'scheduler'?" in result.stderr
