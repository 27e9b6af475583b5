"""``hpc checkpoints list|clean DIR``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import cli
from runtime.checkpoint import CheckpointStore

OLD, NEW = "1" * 32, "2" * 32


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    s = CheckpointStore(tmp_path / "ckpt", fsync=False)
    s.save(OLD, list(range(100)), key=("load", 1))
    s.save(NEW, "fresh", key="train-abc")
    ten_days_ago = time.time() - 10 * 86400
    os.utime(s.path(OLD), (ten_days_ago, ten_days_ago))
    return s


def test_list_shows_each_checkpoint_with_its_key_and_a_total(store, capsys) -> None:
    assert cli.main(["checkpoints", "list", store.directory]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TOKEN", "SIZE", "CREATED", "HOST", "JOB", "KEY"]
    assert out[1].startswith(OLD) and out[1].endswith("('load', 1)")
    assert out[2].startswith(NEW) and out[2].endswith("'train-abc'")
    assert out[3].startswith("2 checkpoints (") and out[3].endswith(store.directory)


def test_list_verify_reports_damage_with_exit_status_1(store, capsys) -> None:
    path = Path(store.path(NEW))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main(["checkpoints", "list", store.directory]) == 0  # headers are fine
    capsys.readouterr()
    assert cli.main(["checkpoints", "list", "--verify", store.directory]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "checksum" in out and "1 damaged" in out


def test_clean_older_than_removes_only_old_checkpoints(store, capsys) -> None:
    assert cli.main(["checkpoints", "clean", store.directory, "--older-than", "7d"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 files (")
    assert not store.exists(OLD) and store.exists(NEW)


def test_clean_dry_run_lists_and_keeps_everything(store, capsys) -> None:
    assert cli.main(["checkpoints", "clean", store.directory, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:2]) == sorted([store.path(OLD), store.path(NEW)])
    assert out[2].startswith("would remove 2 files")
    assert store.exists(OLD) and store.exists(NEW)


def test_clean_without_age_removes_all(store) -> None:
    assert cli.main(["checkpoints", "clean", store.directory]) == 0
    assert store.list() == []


def test_missing_directory_and_bad_age_are_errors(tmp_path: Path, capsys) -> None:
    assert cli.main(["checkpoints", "list", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["checkpoints", "clean", str(tmp_path), "--older-than", "soon"]) == 1
    assert "not a duration" in capsys.readouterr().err


def test_the_hpc_command_runs_it(store) -> None:
    command = Path(sys.executable).parent / "hpc"  # the console script
    if not command.exists():
        pytest.skip("hpc is not installed in this environment")
    result = subprocess.run(
        [str(command), "checkpoints", "list", store.directory],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "2 checkpoints" in result.stdout
