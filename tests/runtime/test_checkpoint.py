"""Checkpoints: the store, identity tokens, and resuming with the local schedulers.

The behaviour tests run on sync, threads and processes. Task executions are counted
with marker files (a task creates one file per run in a directory it is given), so
that they are counted the same way in worker processes.
"""

from __future__ import annotations

import doctest
import functools
import logging
import operator
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import hpc
from runtime import checkpoint as ck
from runtime import config, local
from runtime.checkpoint import CheckpointStore, identity_tokens
from runtime.errors import CheckpointError, ConfigError, SerializationError
from tests.runtime.conftest import SaveProbe

SCHEDULERS = ["sync", "threads", "processes"]
TOKEN = "0123456789abcdef0123456789abcdef"

# Worker processes import this module by name to find the task functions below.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture(scope="module", autouse=True)
def _shut_down_pools():
    yield
    local.shutdown_pools()


@pytest.fixture(params=SCHEDULERS)
def scheduler(request):
    """``compute`` keyword arguments selecting each local scheduler."""
    if request.param == "sync":
        return {"scheduler": "sync"}
    return {"scheduler": request.param, "num_workers": 2}


# ----------------------------------------------------------------- task functions


def mark(where: str, name: str) -> None:
    """Record one execution of task ``name`` (a file per execution)."""
    Path(where, f"{name}.{uuid.uuid4().hex}").touch()


def executions(where: Path, name: str | None = None) -> int:
    files = [p.name for p in where.iterdir()]
    if name is None:
        return len(files)
    return sum(1 for f in files if f.split(".")[0] == name)


def leaf(where: str, i: int) -> int:
    mark(where, f"leaf{i}")
    return i + 1


def combine(where: str, a: int, b: int) -> int:
    mark(where, "combine")
    return a + b


def scale(where: str, x: int, factor: int = 1) -> int:
    mark(where, "scale")
    return x * factor


def tree(where: Path, leaves: int = 8) -> Any:
    level = [hpc.delayed(leaf)(str(where), i) for i in range(leaves)]
    while len(level) > 1:
        level = [hpc.delayed(combine)(str(where), a, b) for a, b in zip(level[::2], level[1::2])]
    return level[0]


def tree_total(leaves: int = 8) -> int:
    return sum(range(1, leaves + 1))


class Unhashable:
    """An object runtime.tokenize can only give a random token (it cannot be reduced)."""

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError("no")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    where = tmp_path / "runs"
    where.mkdir()
    return where


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


# --------------------------------------------------------------------------- store


def test_save_then_load_round_trips_in_a_sharded_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    info = store.save(TOKEN, {"a": [1, 2.5, "x"]}, key=("x", 1))
    path = tmp_path / TOKEN[:2] / f"{TOKEN}.ckpt"
    assert info.path == str(path) and path.is_file()
    assert store.exists(TOKEN)
    assert store.load(TOKEN) == {"a": [1, 2.5, "x"]}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert info.key == "('x', 1)" and info.token == TOKEN


def test_numpy_results_load_writable_without_a_copy_per_frame(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    store = CheckpointStore(tmp_path)
    array = np.arange(100_000, dtype="float64")
    store.save(TOKEN, array)
    loaded = store.load(TOKEN)
    assert loaded.dtype == array.dtype and (loaded == array).all()
    loaded[0] = -1.0  # backed by the bytearray the file was read into
    assert loaded[0] == -1.0


def test_header_records_key_size_producer_and_job(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    store = CheckpointStore(tmp_path)
    before = time.time()
    store.save(TOKEN, b"x" * 5000, key="load-data")
    info = store.info(TOKEN)
    assert info is not None
    assert info.key == "'load-data'" and info.nbytes > 5000
    assert info.pid == os.getpid() and info.host and info.job_id == "4242"
    assert before <= info.created <= time.time()


def test_missing_checkpoint_does_not_exist_and_does_not_load(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "not-yet")
    assert not store.exists(TOKEN)
    with pytest.raises(CheckpointError, match="no checkpoint") as info:
        store.load(TOKEN)
    assert info.value.token == TOKEN


@pytest.mark.parametrize("token", ["../../etc/passwd", "ABCDEF0123456789", "12", 7])
def test_tokens_that_are_not_hex_are_refused(tmp_path: Path, token: Any) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint token"):
        CheckpointStore(tmp_path).path(token)


def test_truncated_file_is_logged_set_aside_and_missing(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path)
    path = Path(store.save(TOKEN, list(range(1000))).path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with caplog.at_level(logging.WARNING, logger="runtime.checkpoint"):
        assert not store.exists(TOKEN)
    assert "damaged" in caplog.text and "truncated" in caplog.text
    assert not path.exists() and Path(str(path) + ".corrupt").exists()
    with pytest.raises(CheckpointError):
        store.load(TOKEN)


def test_flipped_payload_byte_fails_the_checksum_when_loading(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path)
    path = Path(store.save(TOKEN, list(range(1000))).path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.exists(TOKEN)  # the header is intact: only loading reads the payload
    with (
        caplog.at_level(logging.WARNING, logger="runtime.checkpoint"),
        pytest.raises(CheckpointError, match="checksum"),
    ):
        store.load(TOKEN)
    assert "payload checksum mismatch" in caplog.text
    assert not store.exists(TOKEN) and Path(str(path) + ".corrupt").exists()


def _rewrite_header(path: Path, change: Any) -> None:
    """Rewrite a checkpoint's header (and its digest) with ``change(header, payload)``."""
    import hashlib
    import json
    import struct

    data = path.read_bytes()
    magic, version, size = struct.unpack_from("<8sII", data)
    start = struct.calcsize("<8sII")
    header = json.loads(data[start : start + size])
    payload = data[start + size + 16 :]
    change(header, payload)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.blake2b(text, digest_size=16).digest()
    path.write_bytes(struct.pack("<8sII", magic, version, len(text)) + text + digest + payload)


def test_files_with_the_earlier_blake2b_checksum_still_load_and_are_verified(
    tmp_path: Path,
) -> None:
    import hashlib

    store = CheckpointStore(tmp_path)
    path = Path(store.save(TOKEN, list(range(1000))).path)

    def earlier_format(header: dict, payload: bytes) -> None:
        assert header.pop("checksum-algorithm") == "crc32"
        header["checksum"] = hashlib.blake2b(payload, digest_size=32).hexdigest()

    _rewrite_header(path, earlier_format)
    assert store.load(TOKEN) == list(range(1000))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        store.load(TOKEN)


def test_an_unknown_checksum_algorithm_is_a_damaged_file_not_a_crash(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = Path(store.save(TOKEN, 7).path)
    _rewrite_header(path, lambda header, payload: header.update({"checksum-algorithm": "md9"}))
    with pytest.raises(CheckpointError, match="unknown checksum algorithm 'md9'"):
        store.load(TOKEN)


def test_damaged_header_and_foreign_files_are_not_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    path = Path(store.save(TOKEN, 1).path)
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(data))
    assert not store.exists(TOKEN)
    other = "f" * 32
    Path(store.path(other)).parent.mkdir(parents=True, exist_ok=True)
    Path(store.path(other)).write_bytes(b"not a checkpoint at all")
    assert not store.exists(other)


def test_a_file_renamed_to_another_token_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    other = "a" * 32
    path = Path(store.save(TOKEN, 1).path)
    target = Path(store.path(other))
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    assert not store.exists(other)


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path, fsync=True)
    with pytest.raises(SerializationError):
        store.save(TOKEN, threading.Lock())

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save(TOKEN, list(range(10)))
    assert not store.exists(TOKEN)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_interrupted_write_is_invisible_to_readers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    shard = tmp_path / TOKEN[:2]
    shard.mkdir()
    (shard / f".{TOKEN}.123.1.abcd.tmp").write_bytes(b"HPC-CKPT half a file")
    assert not store.exists(TOKEN)
    assert store.list() == []


def test_fsync_of_file_and_directory_follows_config(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    CheckpointStore(tmp_path, fsync=True).save(TOKEN, 1)
    assert len(calls) == 2  # the file, then its directory
    calls.clear()
    with config.set({"checkpoint.fsync": False}):
        CheckpointStore(tmp_path).save(TOKEN, 1)
    assert calls == []


def test_concurrent_writers_of_one_token_leave_one_valid_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, fsync=False)
    barrier = threading.Barrier(8)

    def write() -> None:
        barrier.wait()
        for _ in range(20):
            store.save(TOKEN, list(range(5000)))
            assert store.load(TOKEN) == list(range(5000))

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in (tmp_path / TOKEN[:2]).iterdir()] == [f"{TOKEN}.ckpt"]


def test_list_shows_every_checkpoint_and_flags_damaged_ones(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    tokens = [f"{i:032x}" for i in range(1, 4)]
    for t in tokens:
        store.save(t, t, key=f"k{t[-1]}")
    (tmp_path / "README").write_text("not ours")
    path = Path(store.path(tokens[1]))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    found = {i.token: i for i in store.list()}
    assert sorted(found) == tokens and all(i.valid for i in found.values())
    verified = {i.token: i for i in store.list(verify=True)}
    assert not verified[tokens[1]].valid and "checksum" in str(verified[tokens[1]].problem)
    assert verified[tokens[0]].valid and verified[tokens[2]].valid


def test_clean_removes_old_files_only_and_never_foreign_ones(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    old, new = "1" * 32, "2" * 32
    store.save(old, 1)
    store.save(new, 2)
    week = time.time() - 8 * 86400
    os.utime(store.path(old), (week, week))
    temp = tmp_path / new[:2] / f".{new}.1.1.x.tmp"
    temp.write_bytes(b"")  # a write in progress: too young to touch
    foreign = tmp_path / "notes.txt"
    foreign.write_text("keep me")

    dry = store.clean(7 * 86400, dry_run=True)
    assert dry.removed == 1 and store.exists(old)
    result = store.clean(7 * 86400)
    assert result.paths == (store.path(old),) and result.nbytes > 0
    assert not store.exists(old) and store.exists(new)
    everything = store.clean()
    assert everything.removed == 1 and not store.exists(new)
    assert temp.exists() and foreign.read_text() == "keep me"
    os.utime(temp, (week, week))
    assert store.clean().paths == (str(temp),)


def test_module_doctests_pass() -> None:
    failures, _ = doctest.testmod(ck, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# -------------------------------------------------------------------------- writer


def _tokens(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def test_writer_writes_in_its_thread_then_calls_back_and_close_waits(tmp_path: Path) -> None:
    writer = ck.CheckpointWriter(backlog=4)
    store = CheckpointStore(tmp_path)
    seen: list[tuple[str, bool, str]] = []
    for i, token in enumerate(_tokens(3)):

        def then(token: str = token) -> None:
            seen.append((token, store.exists(token), threading.current_thread().name))

        assert writer.submit(str(tmp_path), token, {"i": i}, f"k{i}", then)
    assert writer.close(timeout=30) == 0
    # In order, each file in place before its callback, all in the writer's thread.
    assert [t for t, _, _ in seen] == _tokens(3)
    assert all(exists for _, exists, _ in seen)
    assert {name for _, _, name in seen} == {"hpc-checkpoint-writer"}
    assert [store.load(t) for t in _tokens(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert writer.pending() == 0 and writer.closed
    assert not writer.submit(str(tmp_path), TOKEN, 1, "late", lambda: None)  # closed


def test_writer_refuses_beyond_its_backlog_so_the_caller_writes_itself(
    tmp_path: Path, checkpoint_saves: SaveProbe
) -> None:
    started, release = checkpoint_saves.hold().started, checkpoint_saves.release
    writer = ck.CheckpointWriter(backlog=2)
    first, second, third, fourth = _tokens(4)
    assert writer.submit(str(tmp_path), first, 1, "a", lambda: None)
    assert started.wait(60)  # the writer holds the first; two more may wait
    assert writer.submit(str(tmp_path), second, 2, "b", lambda: None)
    assert writer.submit(str(tmp_path), third, 3, "c", lambda: None)
    assert writer.pending() == 3
    assert not writer.submit(str(tmp_path), fourth, 4, "d", lambda: None)
    assert writer.close(timeout=0) == 3  # timed out with all three still there
    release.set()
    assert writer.close(timeout=30) == 0
    assert [CheckpointStore(tmp_path).exists(t) for t in (first, second, third, fourth)] == [
        True,
        True,
        True,
        False,
    ]


def test_writer_calls_back_after_a_failed_write_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    writer = ck.CheckpointWriter(backlog=2)
    called: list[str] = []
    first, second = _tokens(2)
    with caplog.at_level(logging.WARNING, logger="runtime.checkpoint"):
        assert writer.submit(str(blocked), first, 1, "bad", lambda: called.append("bad"))
        assert writer.submit(str(tmp_path), second, 2, "good", lambda: called.append("good"))
        assert writer.close(timeout=30) == 0
    assert called == ["bad", "good"]
    assert "cannot write the checkpoint of 'bad'" in caplog.text
    assert CheckpointStore(tmp_path).load(second) == 2


# ------------------------------------------------------------------------ identity


def test_identity_ignores_key_names_but_not_functions_or_arguments() -> None:
    a = identity_tokens({"x": 1, "y": (operator.add, "x", 10), "z": (operator.neg, "y")})
    b = identity_tokens({"p": 1, "q": (operator.add, "p", 10), "r": (operator.neg, "q")})
    assert (a["x"], a["y"], a["z"]) == (b["p"], b["q"], b["r"])
    other_arg = identity_tokens({"x": 1, "y": (operator.add, "x", 11), "z": (operator.neg, "y")})
    assert other_arg["x"] == a["x"]  # upstream: unchanged
    assert other_arg["y"] != a["y"] and other_arg["z"] != a["z"]  # the task and downstream
    other_func = identity_tokens({"x": 1, "y": (operator.sub, "x", 10), "z": (operator.neg, "y")})
    assert other_func["y"] != a["y"] and other_func["z"] != a["z"]


def test_identity_of_delayed_graphs_is_stable_across_random_keys(runs: Path) -> None:
    first, second = tree(runs), tree(runs)
    assert first.key != second.key
    t1 = identity_tokens(first.dask, first.key)
    t2 = identity_tokens(second.dask, second.key)
    assert t1[first.key] == t2[second.key]
    assert sorted(t1.values()) == sorted(t2.values())


def test_changing_a_functions_code_changes_its_identity() -> None:
    def f(x):
        return x + 1

    def g(x):
        return x + 2

    g.__name__ = g.__qualname__ = f.__qualname__
    assert identity_tokens({"a": (f, 1)})["a"] != identity_tokens({"a": (g, 1)})["a"]


def test_opted_out_tasks_and_everything_downstream_have_no_identity(runs: Path) -> None:
    impure = hpc.delayed(leaf, checkpoint=False)(str(runs), 1)
    pure = hpc.delayed(leaf)(str(runs), 2)
    down = hpc.delayed(combine)(str(runs), impure, 3)
    top = hpc.delayed(combine)(str(runs), down, pure)
    tokens = identity_tokens(top.dask, top.key)
    assert impure.key not in tokens and down.key not in tokens and top.key not in tokens
    assert pure.key in tokens


def test_functions_marked_impure_by_attribute_are_opted_out() -> None:
    def now():
        return time.time()

    now.__hpc_checkpoint__ = False  # type: ignore[attr-defined]
    tokens = identity_tokens({"t": (now,), "u": (operator.neg, "t"), "v": (operator.neg, 1)})
    assert set(tokens) == {"v"}


def test_arguments_without_a_deterministic_token_give_no_identity() -> None:
    tokens = identity_tokens({"a": (repr, Unhashable()), "b": (str, "a"), "c": (str, 1)})
    assert set(tokens) == {"c"}


def test_identity_follows_keyword_arguments_and_nested_tasks() -> None:
    base = {"x": 1, "y": (hpc.delayed(scale).func, "dir", (operator.add, "x", 1))}
    again = {"q": 1, "y2": (hpc.delayed(scale).func, "dir", (operator.add, "q", 1))}
    assert identity_tokens(base)["y"] == identity_tokens(again)["y2"]
    kw = hpc.delayed(scale)("dir", 2, factor=3)
    kw2 = hpc.delayed(scale)("dir", 2, factor=4)
    assert identity_tokens(kw.dask)[kw.key] != identity_tokens(kw2.dask)[kw2.key]


def test_identity_is_the_same_in_another_process() -> None:
    code = (
        "import operator, sys; sys.path.append(sys.argv[1]);"
        "from runtime.checkpoint import identity_tokens;"
        "from tests.runtime.test_checkpoint import leaf;"
        "print(identity_tokens({'x': (leaf, '/d', 3), 'y': (operator.add, 'x', 2)})['y'])"
    )
    here = identity_tokens({"x": (leaf, "/d", 3), "y": (operator.add, "x", 2)})["y"]
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run(
        [sys.executable, "-c", code, _ROOT],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert out == here


# ----------------------------------------------------------- local schedulers


def test_second_run_executes_nothing_and_gives_the_same_answer(
    scheduler: dict, runs: Path, store_dir: Path
) -> None:
    assert hpc.compute(tree(runs), checkpoint=store_dir, **scheduler) == (tree_total(),)
    assert executions(runs) == 15
    assert len(CheckpointStore(store_dir).list()) == 15
    assert hpc.compute(tree(runs), checkpoint=store_dir, **scheduler) == (tree_total(),)
    assert executions(runs) == 15


def test_extended_graph_runs_only_its_new_tasks(
    scheduler: dict, runs: Path, store_dir: Path
) -> None:
    hpc.compute(tree(runs), checkpoint=store_dir, **scheduler)
    top = hpc.delayed(scale)(str(runs), tree(runs), factor=2)
    assert top.compute(checkpoint=store_dir, **scheduler) == 2 * tree_total()
    assert executions(runs, "scale") == 1 and executions(runs) == 16


def test_changed_argument_recomputes_that_branch_and_downstream_only(
    scheduler: dict, runs: Path, store_dir: Path
) -> None:
    hpc.compute(tree(runs), checkpoint=store_dir, **scheduler)
    level = [hpc.delayed(leaf)(str(runs), i if i != 5 else 50) for i in range(8)]
    while len(level) > 1:
        level = [hpc.delayed(combine)(str(runs), a, b) for a, b in zip(level[::2], level[1::2])]
    assert level[0].compute(checkpoint=store_dir, **scheduler) == tree_total() + 45
    assert executions(runs, "leaf50") == 1
    assert executions(runs, "combine") == 7 + 3  # the path from leaf 50 to the root
    assert executions(runs) == 15 + 4


@pytest.mark.parametrize("name", ["sync", "threads"])
def test_in_process_schedulers_compute_on_while_the_writer_thread_writes(
    name: str, store_dir: Path, checkpoint_saves: SaveProbe
) -> None:
    release = checkpoint_saves.hold().release
    stored_meanwhile: list[int] = []

    def second(x: int) -> int:
        stored_meanwhile.append(len(CheckpointStore(store_dir).list()))
        release.set()  # only now may the first result's write go on
        return x + 1

    first = hpc.delayed(operator.add)(1, 2)
    assert hpc.delayed(second)(first).compute(checkpoint=store_dir, scheduler=name) == 4
    assert stored_meanwhile == [0]  # second ran while first's checkpoint was written
    # Written before compute returned (second has no identity: its closure holds an Event).
    assert len(CheckpointStore(store_dir).list()) == 1


def test_local_writes_stay_in_the_task_thread_when_background_writes_are_off(
    store_dir: Path, checkpoint_saves: SaveProbe
) -> None:
    threads = checkpoint_saves.threads
    total = hpc.delayed(sum)([hpc.delayed(operator.add)(i, 1) for i in range(4)])
    with config.set({"checkpoint.background-writes": False}):
        assert total.compute(checkpoint=store_dir, scheduler="sync") == 10
    assert threads == [threading.current_thread().name] * 5
    threads.clear()
    assert total.compute(checkpoint=store_dir / "again", scheduler="sync") == 10
    # The first result surely goes to the idle writer; later ones may find its backlog
    # full (before its thread even started) and be written by the task thread.
    assert "hpc-checkpoint-writer" in threads and len(threads) == 5


def test_only_checkpoints_still_needed_are_read(runs: Path, store_dir: Path, monkeypatch) -> None:
    hpc.compute(tree(runs), checkpoint=store_dir, scheduler="sync")
    loaded: list[str] = []
    real = ck.load
    monkeypatch.setattr(ck, "load", lambda d, t: loaded.append(t) or real(d, t))
    top = tree(runs)
    assert top.compute(checkpoint=store_dir, scheduler="sync") == tree_total()
    assert loaded == [identity_tokens(top.dask, top.key)[top.key]]

    # Half of the tree is gone: the other half's top is read, not its leaves.
    tokens = identity_tokens(top.dask, top.key)
    left = top.dask[top.key][2]  # (combine, where, left, right)
    for key, token in tokens.items():
        if key == top.key or key == left or _under(top.dask, left, key):
            os.unlink(CheckpointStore(store_dir).path(token))
    loaded.clear()
    assert tree(runs).compute(checkpoint=store_dir, scheduler="sync") == tree_total()
    assert len(loaded) == 1  # the right subtree's root
    assert executions(runs) == 15 + 7 + 1  # left subtree (7) and the root again


def _under(dsk: dict, top: Any, key: Any) -> bool:
    """Whether ``key`` is upstream of ``top``."""
    from runtime.graph import get_dependencies

    stack = [top]
    while stack:
        k = stack.pop()
        for d in get_dependencies(dsk, k):
            if d == key:
                return True
            stack.append(d)
    return False


def test_corrupted_checkpoint_is_recomputed_with_the_right_answer(
    scheduler: dict, runs: Path, store_dir: Path, caplog
) -> None:
    top = tree(runs)
    hpc.compute(top, checkpoint=store_dir, **scheduler)
    root_token = identity_tokens(top.dask, top.key)[top.key]
    path = Path(CheckpointStore(store_dir).path(root_token))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="runtime.checkpoint"):
        assert tree(runs).compute(checkpoint=store_dir, **scheduler) == tree_total()
    assert "checksum" in caplog.text
    assert executions(runs, "combine") == 7 + 1  # only the root, from its stored inputs
    assert CheckpointStore(store_dir).load(root_token) == tree_total()  # rewritten


def test_opted_out_tasks_run_every_time_with_everything_downstream(
    scheduler: dict, runs: Path, store_dir: Path
) -> None:
    def build() -> Any:
        a = hpc.delayed(leaf, checkpoint=False)(str(runs), 1)
        b = hpc.delayed(leaf)(str(runs), 2)
        return hpc.delayed(combine)(str(runs), a, b)

    for _ in range(2):
        assert build().compute(checkpoint=store_dir, **scheduler) == 5
    assert executions(runs, "leaf1") == 2 and executions(runs, "combine") == 2
    assert executions(runs, "leaf2") == 1


def test_config_directory_turns_checkpoints_on_and_false_turns_them_off(
    runs: Path, store_dir: Path
) -> None:
    with config.set({"checkpoint.directory": str(store_dir)}):
        tree(runs).compute(scheduler="sync")
        tree(runs).compute(scheduler="sync")
        assert executions(runs) == 15
        tree(runs).compute(scheduler="sync", checkpoint=False)
        assert executions(runs) == 30
    tree(runs).compute(scheduler="sync")  # no directory configured: nothing reused
    assert executions(runs) == 45


def test_checkpoint_true_without_a_directory_is_a_config_error(runs: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint.directory"):
        tree(runs).compute(scheduler="sync", checkpoint=True)


def test_chains_are_not_fused_so_every_step_is_a_checkpoint(runs: Path, store_dir: Path) -> None:
    def chain(steps: int) -> Any:
        x = hpc.delayed(leaf)(str(runs), 0)
        for _ in range(steps):
            x = hpc.delayed(scale)(str(runs), x, factor=2)
        return x

    with config.set({"optimization.fuse": True}):
        assert chain(3).compute(checkpoint=store_dir, scheduler="sync") == 8
        assert len(CheckpointStore(store_dir).list()) == 4
        assert chain(4).compute(checkpoint=store_dir, scheduler="sync") == 16
    assert executions(runs, "scale") == 4


def test_persist_reuses_and_writes_checkpoints(runs: Path, store_dir: Path) -> None:
    (persisted,) = hpc.persist(tree(runs), checkpoint=store_dir, scheduler="sync")
    assert persisted.compute(scheduler="sync") == tree_total()
    (again,) = hpc.persist(tree(runs), checkpoint=store_dir, scheduler="sync")
    assert again.compute(scheduler="sync") == tree_total()
    assert executions(runs) == 15


def test_unwritable_directory_logs_once_and_the_computation_succeeds(
    runs: Path, tmp_path: Path, caplog
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    ck._failed_directories.discard(str(blocker))
    with caplog.at_level(logging.WARNING, logger="runtime.checkpoint"):
        assert tree(runs).compute(checkpoint=blocker, scheduler="sync") == tree_total()
    warnings = [r for r in caplog.records if "cannot write the checkpoint" in r.getMessage()]
    assert len(warnings) == 1


# ----------------------------------------------------------------- hpc.checkpoint


def test_checkpoint_returns_a_load_that_cuts_the_lineage(
    scheduler: dict, runs: Path, store_dir: Path
) -> None:
    x = hpc.checkpoint(tree(runs), store_dir, **scheduler)
    assert len(x.dask) == 1
    assert (x * 2).compute(**scheduler) == 2 * tree_total()
    assert executions(runs) == 15
    assert len(CheckpointStore(store_dir).list()) == 1  # only the result, not the lineage


def test_checkpoint_of_a_stored_result_computes_nothing(runs: Path, store_dir: Path) -> None:
    first = hpc.checkpoint(tree(runs), store_dir, scheduler="sync")
    second = hpc.checkpoint(tree(runs), store_dir, scheduler="sync")
    assert executions(runs) == 15
    assert first.key == second.key
    assert second.compute(scheduler="sync") == tree_total()


def test_iterative_algorithm_keeps_a_constant_graph_and_resumes(
    runs: Path, store_dir: Path
) -> None:
    def iterate(steps: int) -> Any:
        x = hpc.delayed(leaf)(str(runs), 0)
        for _ in range(steps):
            x = hpc.checkpoint(hpc.delayed(scale)(str(runs), x, factor=2), store_dir)
            assert len(x.dask) == 1
        return x

    with config.set(scheduler="sync"):
        assert iterate(5).compute() == 32
        assert executions(runs, "scale") == 5
        assert iterate(7).compute() == 128  # resumes after step 5
    assert executions(runs, "scale") == 7


def test_checkpoint_shapes_and_refusals(runs: Path, store_dir: Path) -> None:
    a, b = hpc.delayed(leaf)(str(runs), 1), hpc.delayed(leaf)(str(runs), 2)
    pair = hpc.checkpoint((a, b), store_dir, scheduler="sync")
    assert isinstance(pair, tuple) and hpc.compute(*pair, scheduler="sync") == (2, 3)
    with pytest.raises(TypeError, match="Delayed"):
        hpc.checkpoint(42, store_dir)
    impure = hpc.delayed(leaf, checkpoint=False)(str(runs), 3)
    with pytest.raises(CheckpointError, match="no identity"):
        hpc.checkpoint(impure, store_dir, scheduler="sync")


def test_uncheckpointed_functions_behave_like_the_original() -> None:
    wrapped = ck.uncheckpointed(functools.partial(operator.add, 1))
    assert wrapped(2) == 3 and ck.uncheckpointed(wrapped) is wrapped
    import pickle

    assert pickle.loads(pickle.dumps(ck.uncheckpointed(abs)))(-2) == 2
    assert hpc.delayed(abs, checkpoint=False).__name__ == "abs"
