"""Tests for runtime.rendezvous: writing, waiting for and reading the scheduler file."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

from runtime import rendezvous
from runtime.errors import SchedulerError
from runtime.rendezvous import (
    current_job_id,
    read_scheduler_file,
    remove_scheduler_file,
    write_scheduler_file,
)

SECRET = bytes(range(32))
ADDRESS = "tcp://127.0.0.1:8786"
HOSTILE_NAMES = ["scheduler.json", "with space.json", "quo'te\"s.json", "new\nline.json"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_written_file_reads_back_with_the_secret_as_bytes(tmp_path, name):
    path = tmp_path / name
    written = write_scheduler_file(path, ADDRESS, SECRET, job_id="77", dashboard=None)
    info = read_scheduler_file(path)
    assert info["address"] == ADDRESS
    assert info["secret"] == SECRET
    assert info["pid"] == os.getpid()
    assert info["job_id"] == "77"
    assert info["dashboard"] is None
    assert info["version"] == written["version"]
    assert isinstance(info["started"], float)
    assert json.loads(path.read_text())["secret"] == SECRET.hex()


def test_file_is_private_to_its_owner(tmp_path):
    path = tmp_path / "scheduler.json"
    old_umask = os.umask(0)  # the most permissive umask must not matter
    try:
        write_scheduler_file(path, ADDRESS, SECRET)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rewriting_replaces_the_file_and_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, ADDRESS, SECRET)
    write_scheduler_file(path, "tcp://127.0.0.1:9999", SECRET)
    assert read_scheduler_file(path)["address"] == "tcp://127.0.0.1:9999"
    assert os.listdir(tmp_path) == ["scheduler.json"]


def test_readers_never_see_a_partial_file_while_it_is_rewritten(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, ADDRESS, SECRET)
    stop = threading.Event()
    failures: list[BaseException] = []

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            # Varying sizes: a non-atomic writer would expose short or mixed content.
            write_scheduler_file(path, ADDRESS, SECRET, dashboard="x" * (i % 5000))
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(2000):
            try:
                assert read_scheduler_file(path)["secret"] == SECRET
            except SchedulerError as exc:
                failures.append(exc)
    finally:
        stop.set()
        writer.join()
    assert not failures


def test_job_id_comes_from_the_batch_system_environment(tmp_path, monkeypatch):
    assert current_job_id({"SLURM_JOB_ID": "123"}) == "123"
    assert current_job_id({"PBS_JOBID": "456.pbs01"}) == "456.pbs01"
    assert current_job_id({"HOME": "/x"}) is None
    monkeypatch.setenv("SLURM_JOB_ID", "987")
    monkeypatch.delenv("PBS_JOBID", raising=False)
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, ADDRESS, SECRET)
    assert read_scheduler_file(path)["job_id"] == "987"


def test_missing_file_error_names_the_path_and_the_fix(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(SchedulerError) as info:
        read_scheduler_file(path)
    assert str(path) in str(info.value)
    assert "hpc scheduler --scheduler-file" in str(info.value)


def test_waiting_for_a_missing_file_gives_up_at_the_deadline(tmp_path):
    path = tmp_path / "late.json"
    with pytest.raises(SchedulerError, match=r"does not exist within 0\.2 s"):
        read_scheduler_file(path, timeout=0.2)


def test_reader_waits_for_the_file_to_appear(tmp_path, monkeypatch):
    path = tmp_path / "scheduler.json"
    polled = threading.Event()
    real_sleep = rendezvous._sleep

    def observed_sleep(seconds: float) -> None:
        polled.set()  # the reader found no file and is about to wait
        real_sleep(seconds)

    monkeypatch.setattr(rendezvous, "_sleep", observed_sleep)
    result: dict = {}

    def reader() -> None:
        try:
            result["info"] = read_scheduler_file(path, timeout="30s")
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert polled.wait(10)
        write_scheduler_file(path, ADDRESS, SECRET)
    finally:
        thread.join(30)
    assert "error" not in result
    assert result["info"]["address"] == ADDRESS


def test_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, ADDRESS, SECRET)
    path.chmod(0o644)
    with pytest.raises(SchedulerError, match=r"mode 0644.*chmod 600"):
        read_scheduler_file(path)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"", "not JSON"),
        (b'{"address": "tcp://127.0.0.1:1", "sec', "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"address": "tcp://127.0.0.1:1"}', "missing secret"),
        (b'{"secret": "00ff"}', "missing address"),
        (b'{"address": "tcp://127.0.0.1:1", "secret": "xyz"}', "not hex"),
        (b'{"address": "tcp://127.0.0.1:1", "secret": ""}', "empty"),
        (b'{"address": "127.0.0.1:1", "secret": "00"}', "not tcp://"),
    ],
    ids=["empty", "truncated", "binary", "list", "no-secret", "no-address", "bad-hex",
         "empty-secret", "bad-address"],
)  # fmt: skip
def test_corrupt_file_error_says_what_is_wrong_and_how_to_fix(tmp_path, content, complaint):
    path = tmp_path / "scheduler.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SchedulerError) as info:
        read_scheduler_file(path)
    message = str(info.value)
    assert complaint in message
    assert str(path) in message and "restart the scheduler" in message


def test_writing_into_a_missing_directory_names_it(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "scheduler.json"
    with pytest.raises(SchedulerError, match="does not exist"):
        write_scheduler_file(path, ADDRESS, SECRET)


def test_remove_deletes_only_a_file_that_still_names_our_address(tmp_path):
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, "tcp://127.0.0.1:2222", SECRET)  # a newer scheduler's
    assert not remove_scheduler_file(path, address=ADDRESS)
    assert path.exists()
    assert remove_scheduler_file(path, address="tcp://127.0.0.1:2222")
    assert not path.exists()
    assert not remove_scheduler_file(path)


def test_public_surface_is_sorted_and_complete():
    assert rendezvous.__all__ == sorted(rendezvous.__all__)
    assert all(hasattr(rendezvous, name) for name in rendezvous.__all__)


def test_a_client_waits_for_a_successor_to_rewrite_the_scheduler_file(tmp_path):
    from runtime.client import _await_scheduler_file

    path = tmp_path / "scheduler.json"
    old = write_scheduler_file(path, "tcp://127.0.0.1:1111", b"old", pid=1, started=1.0)
    assert _await_scheduler_file(str(path), old, timeout=0.6) is None  # unchanged: not it

    found: list = []
    waiter = threading.Thread(
        target=lambda: found.append(_await_scheduler_file(str(path), old, timeout=60))
    )
    waiter.start()
    write_scheduler_file(path, "tcp://127.0.0.1:2222", b"new", pid=2, started=2.0)
    waiter.join(timeout=60)
    assert found and found[0]["address"] == "tcp://127.0.0.1:2222"
    assert found[0]["secret"] == b"new"


def test_successor_records_the_job_it_replaces(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_JOB_RESTART_OF", "41")
    monkeypatch.setenv("HPC_JOB_RESTARTS", "2")
    path = tmp_path / "scheduler.json"
    write_scheduler_file(path, "tcp://127.0.0.1:1", b"s", job_id="42")
    info = read_scheduler_file(path)
    assert (info["job_id"], info["restart_of"], info["restarts"]) == ("42", "41", 2)


def test_a_closed_mark_sits_beside_the_scheduler_file_and_says_why(tmp_path):
    path = tmp_path / "sched.json"
    assert rendezvous.closed_reason(path) is None
    rendezvous.mark_closed(path, "the cluster was closed")
    assert rendezvous.closed_path(path) == f"{path}.closed"
    assert rendezvous.closed_reason(path) == "the cluster was closed"
