"""The local schedulers: one behaviour suite run on sync, threads and processes."""

from __future__ import annotations

import doctest
import functools
import operator
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from operator import add
from pathlib import Path
from typing import Any

import pytest

from runtime import local
from runtime.errors import (
    ConfigError,
    CycleError,
    GraphError,
    SerializationError,
    WorkerDiedError,
)
from runtime.graph import apply, quote
from runtime.local import (
    Callback,
    RemoteTraceback,
    get,
    get_async,
    get_processes,
    get_sync,
    get_threads,
)

SCHEDULERS = ["sync", "threads", "processes"]

# Worker processes import this module by name to find the task functions below, so
# its root must be on their path however pytest was started (spawned workers copy
# this process's sys.path when they start).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture(scope="module", autouse=True)
def _shut_down_pools():
    """Pools are reused across the tests of this module, then shut down."""
    yield
    local.shutdown_pools()


@pytest.fixture(params=SCHEDULERS)
def scheduler(request):
    """A ``get(dsk, keys, **kw)`` for each backend; processes use the spawn context."""
    name = request.param
    if name == "sync":
        run = get_sync
    elif name == "threads":
        run = functools.partial(get_threads, num_workers=2)
    else:
        run = functools.partial(get_processes, num_workers=2, context="spawn")
    run.name = name  # type: ignore[attr-defined]
    return run


# Task functions live at module level so that worker processes can import them.


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def kwargs_sum(a, b=0, *, c=0):
    return a + b + c


def fail(x):
    raise KeyError(f"no such thing: {x}")


def record_call(path, value):
    """Append a line to ``path`` (visible to threads and processes) and return value."""
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


def calls(path):
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


class UnrebuildableError(Exception):
    """Pickles, but cannot be rebuilt from its args (two required arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_unrebuildable():
    raise UnrebuildableError(1, 2)


def return_lock():
    return threading.Lock()


def get_pid(_=None):
    return os.getpid()


def writable_array(n):
    import numpy as np

    return np.arange(n, dtype="float64")


class Recorder(Callback):
    """Records every hook call, in order."""

    def __init__(self):
        self.events = []
        self.states = []

    def start(self, dsk):
        self.events.append(("start", len(dsk)))

    def pretask(self, key, dsk, state):
        self.events.append(("pretask", key))

    def posttask(self, key, result, dsk, state, worker_id):
        self.events.append(("posttask", key, result))
        self.states.append((state.finished, state.total, state.held))

    def finish(self, dsk, state, errored):
        self.events.append(("finish", errored))
        self.final = (state.finished, state.total, state.peak_held)


class PeakHeld(Callback):
    def finish(self, dsk, state, errored):
        self.peak = state.peak_held


def tree_reduction(leaves):
    dsk: dict[Any, Any] = {}
    level: list[Any] = []
    for i in range(leaves):
        dsk[("leaf", i)] = (inc, i)
        level.append(("leaf", i))
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), 2):
            key = ("sum", depth, j // 2)
            dsk[key] = (add, level[j], level[j + 1])
            nxt.append(key)
        level = nxt
    return dsk, level[0]


# ------------------------------------------------------------------- the module


def test_doctests_pass():
    result = doctest.testmod(local, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_names_are_sorted_and_exist():
    assert local.__all__ == sorted(local.__all__)
    for name in local.__all__:
        assert hasattr(local, name)


# ---------------------------------------------------------- the behaviour suite


def test_classic_dask_graph(scheduler):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", 10)}
    assert scheduler(dsk, "z") == 12
    assert scheduler(dsk, ["x", "y", "z"]) == [1, 2, 12]


def test_tuple_keys_and_nested_lists_of_keys(scheduler):
    dsk = {("x", 0): 1, ("x", 1): 2, ("y", 0, "a"): (add, ("x", 0), ("x", 1))}
    result = scheduler(dsk, [[("x", 0), ("y", 0, "a")], [], [[("x", 1)]]])
    assert result == [[1, 3], [], [[2]]]


def test_aliases_lists_and_literals(scheduler):
    dsk = {
        "x": 1,
        "alias": "x",
        "alias2": "alias",
        "lst": ["x", (inc, "x"), [("y", 0)]],
        ("y", 0): (double, "alias2"),
        "d": {"k": "x"},
        "t": (1, "x"),
    }
    assert scheduler(dsk, ["alias2", "lst", "d", "t"]) == [1, [1, 2, [2]], {"k": "x"}, (1, "x")]


def test_keyword_arguments_through_apply(scheduler):
    # Argument names are strings too: one equal to a key would be replaced by that
    # key's value, so the keys here are named differently (or names are quoted).
    dsk = {
        "x": 1,
        "y": 2,
        "call": (apply, kwargs_sum, ["x"], (dict, [["b", "y"], ["c", (inc, "y")]])),
        "plain": (apply, kwargs_sum, ["x", "y"]),
        "quoted": (apply, kwargs_sum, ["x"], (dict, [[quote("y"), "y"]])),
    }
    with pytest.raises(TypeError):
        scheduler(dsk, "quoted")  # kwargs_sum has no argument 'y': the name stayed a name
    assert scheduler(dsk, ["call", "plain"]) == [6, 3]


def test_quoted_values_are_not_read_as_keys(scheduler):
    dsk = {"x": 1, "y": (len, quote(["x", "x", "x"])), "s": (str.upper, quote("x"))}
    assert scheduler(dsk, ["y", "s"]) == [3, "X"]


def test_unrelated_tasks_are_culled_not_run(scheduler, tmp_path):
    log = str(tmp_path / "calls")
    dsk = {"x": 1, "y": (inc, "x"), "unrelated": (record_call, log, "ran"), "bad": (fail, 1)}
    assert scheduler(dsk, "y") == 2
    assert calls(log) == []


def test_shared_node_is_computed_once(scheduler, tmp_path):
    log = str(tmp_path / "calls")
    dsk = {
        "shared": (record_call, log, 5),
        "a": (inc, "shared"),
        "b": (double, "shared"),
        "c": (add, "a", "b"),
        "d": (add, "c", "shared"),
    }
    assert scheduler(dsk, ["d", "c"]) == [21, 16]
    assert calls(log) == ["5"]


def test_task_error_keeps_its_type_and_names_the_task(scheduler):
    dsk = {"x": 1, ("bad", 3): (fail, "x"), "after": (inc, ("bad", 3))}
    with pytest.raises(KeyError, match="no such thing: 1") as info:
        scheduler(dsk, "after")
    notes = getattr(info.value, "__notes__", [])
    assert any("('bad', 3)" in note for note in notes), notes


def test_task_error_from_a_process_chains_the_remote_traceback(scheduler):
    if scheduler.name != "processes":
        pytest.skip("only processes have a remote traceback")
    with pytest.raises(KeyError) as info:
        scheduler({"x": 1, "boom": (fail, "x")}, "boom")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.key == "boom"
    assert cause.pid != os.getpid()
    text = str(cause)
    assert "'boom'" in text and str(cause.pid) in text
    assert "in fail" in text and "KeyError" in text


def test_task_error_in_this_process_keeps_the_original_traceback(scheduler):
    if scheduler.name == "processes":
        pytest.skip("a traceback cannot cross a process boundary")
    with pytest.raises(KeyError) as info:
        scheduler({"boom": (fail, 1)}, "boom")
    assert info.value.__cause__ is None
    assert info.traceback[-1].name == "fail"


def test_cycle_is_reported_as_a_path(scheduler):
    dsk = {"a": (inc, "b"), "b": (inc, "c"), "c": (inc, "a"), "top": (inc, "a")}
    with pytest.raises(CycleError, match="'a' -> 'b' -> 'c' -> 'a'"):
        scheduler(dsk, "top")


def test_missing_requested_key_is_a_graph_error(scheduler):
    with pytest.raises(GraphError, match=r"requested key 'zz' is not in the graph"):
        scheduler({"z": 1}, ["z", "zz"])


def test_peak_held_results_stay_small_on_a_tree_reduction(scheduler):
    dsk, root = tree_reduction(4096)
    peak = PeakHeld()
    assert scheduler(dsk, root, callbacks=[peak]) == sum(range(1, 4097))
    # Width 4096, depth 12: what is held is O(depth + workers * batch), not O(width).
    assert peak.peak <= 100


def test_peak_held_results_stay_small_on_a_long_chain(scheduler):
    dsk: dict[Any, Any] = {"c0": 0}
    for i in range(1, 2000):
        dsk[f"c{i}"] = (inc, f"c{i - 1}")
    peak = PeakHeld()
    assert scheduler(dsk, "c1999", callbacks=[peak]) == 1999
    assert peak.peak <= 2


def test_requested_intermediate_results_are_kept(scheduler):
    dsk = {"a": 1, "b": (inc, "a"), "c": (inc, "b")}
    assert scheduler(dsk, ["a", "b", "c"]) == [1, 2, 3]


def test_cache_values_are_used_and_not_recomputed(scheduler, tmp_path):
    log = str(tmp_path / "calls")
    dsk = {"a": (record_call, log, 1), "b": (inc, "a"), "c": (add, "b", "extra")}
    assert scheduler(dsk, "c", cache={"a": 10, "extra": 100}) == 111
    assert calls(log) == []


def test_callbacks_see_every_task_in_order(scheduler):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", 10)}
    rec = Recorder()
    assert scheduler(dsk, "z", callbacks=[rec]) == 12
    assert rec.events[0] == ("start", 3)
    assert rec.events[-1] == ("finish", False)
    middle = rec.events[1:-1]
    assert middle == [
        ("pretask", "y"),
        ("posttask", "y", 2),
        ("pretask", "z"),
        ("posttask", "z", 12),
    ]
    # After 'y', 'x' is released (only 'y' needed it); 'y' goes once 'z' is done.
    assert rec.states == [(2, 3, 1), (3, 3, 1)]
    assert rec.final == (3, 3, 2)


def test_callback_finish_reports_an_error(scheduler):
    rec = Recorder()
    with pytest.raises(KeyError):
        scheduler({"boom": (fail, 1)}, "boom", callbacks=[rec])
    assert rec.events[-1] == ("finish", True)


def test_callback_as_context_manager_applies_to_every_computation(scheduler):
    rec = Recorder()
    with rec:
        scheduler({"x": (inc, 1)}, "x")
        get({"y": (inc, 1)}, "y", scheduler="sync")
    scheduler({"z": (inc, 1)}, "z")
    posted = [e[1] for e in rec.events if e[0] == "posttask"]
    assert posted == ["x", "y"]


def test_posttask_reports_which_worker_ran_the_task(scheduler):
    ids = []

    class Ids(Callback):
        def posttask(self, key, result, dsk, state, worker_id):
            ids.append((worker_id, result))

    scheduler({"pid": (get_pid, None)}, "pid", callbacks=[Ids()])
    ((worker_id, pid),) = ids
    if scheduler.name == "processes":
        assert worker_id == pid != os.getpid()
    else:
        assert pid == os.getpid()
        assert isinstance(worker_id, int)


# ------------------------------------------------------------------- processes


def test_processes_run_in_other_processes_and_reuse_the_pool():
    first = get_processes({"pid": (get_pid,)}, "pid", num_workers=2, context="spawn")
    assert first != os.getpid()
    pool = local._process_pools[(2, "spawn")]
    dsk = {f"p{i}": (get_pid, i) for i in range(20)}
    pids = get_processes(dsk, list(dsk), num_workers=2, context="spawn")
    assert local._process_pools[(2, "spawn")] is pool
    assert os.getpid() not in pids


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_processes_with_other_start_methods(context):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", 10), "pid": (get_pid, "z")}
    z, pid = get_processes(dsk, ["z", "pid"], num_workers=2, context=context)
    assert z == 12
    assert pid != os.getpid()


def test_processes_default_start_method_comes_from_config():
    from runtime import config

    with config.set({"multiprocessing.context": "forkserver"}):
        assert get_processes({"x": (inc, 1)}, "x", num_workers=1) == 2
        assert (1, "forkserver") in local._process_pools


def test_unknown_start_method_is_a_config_error():
    with pytest.raises(ConfigError, match="'spawn', 'fork', 'forkserver'"):
        get_processes({"x": 1}, "x", context="thread")  # type: ignore[arg-type]


def test_worker_process_that_exits_is_an_error_naming_the_task():
    dsk = {"x": 1, "dies": (os._exit, 3), "after": (inc, "dies")}
    with pytest.raises(WorkerDiedError, match="died while running task 'dies'") as info:
        get_processes(dsk, "after", num_workers=1, context="spawn")
    assert info.value.keys == ["dies"]
    # The broken pool was replaced: the next computation works.
    assert get_processes({"y": (inc, 1)}, "y", num_workers=1, context="spawn") == 2


def test_unserializable_argument_is_a_serialization_error_naming_the_task():
    dsk = {"x": 1, "locked": (len, [threading.Lock(), "x"])}
    with pytest.raises(SerializationError, match=r"task 'locked' cannot be sent.*_thread.lock"):
        get_processes(dsk, "locked", num_workers=1, context="spawn")


def test_unserializable_input_value_names_the_input():
    dsk = {"lock": threading.Lock(), "uses": (str, "lock")}
    with pytest.raises(SerializationError, match=r"task 'uses'.*its input 'lock'"):
        get_processes(dsk, "uses", num_workers=1, context="spawn")


def test_unserializable_result_is_a_serialization_error_naming_the_task():
    with pytest.raises(SerializationError, match=r"result of task 'lock'") as info:
        get_processes({"lock": (return_lock,)}, "lock", num_workers=1, context="spawn")
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_exception_that_cannot_be_rebuilt_still_reports_type_message_and_traceback():
    with pytest.raises(RuntimeError, match="UnrebuildableError: 1-2") as info:
        get_processes({"e": (raise_unrebuildable,)}, "e", num_workers=1, context="spawn")
    assert "raise_unrebuildable" in str(info.value.__cause__)


def test_array_results_from_processes_are_writable():
    pytest.importorskip("numpy")
    arr = get_processes({"a": (writable_array, 100_000)}, "a", num_workers=1, context="spawn")
    arr[0] = 42.0
    assert arr[0] == 42.0 and arr[-1] == 99_999.0


# ----------------------------------------------------------------- the dispatcher


@pytest.mark.parametrize("name", ["sync", "synchronous", "single-threaded", "threads", "threading"])
def test_get_accepts_every_local_name(name):
    assert get({"x": 1, "y": (inc, "x")}, "y", scheduler=name) == 2


def test_get_accepts_a_get_function():
    assert get({"x": (inc, 1)}, "x", scheduler=get_sync) == 2


def test_get_default_scheduler_comes_from_config():
    from runtime import config

    rec = Recorder()
    with config.set(scheduler="sync"):
        get({"tid": (threading.get_ident,)}, "tid", callbacks=[rec])
    (posted,) = [e for e in rec.events if e[0] == "posttask"]
    assert posted[2] == threading.get_ident()


def test_unknown_scheduler_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown local scheduler 'dask'.*'sync'.*'processes'"):
        get({"x": 1}, "x", scheduler="dask")  # type: ignore[arg-type]


# ------------------------------------------------------------------ the one loop


def test_get_async_runs_on_any_executor_submit():
    dsk, root = tree_reduction(64)
    with ThreadPoolExecutor(3) as pool:
        assert get_async(pool.submit, 3, dsk, root, chunksize=1) == sum(range(1, 65))
        assert get_async(pool.submit, 3, dsk, [root, [("leaf", 0)]], chunksize=7) == [
            sum(range(1, 65)),
            [1],
        ]


def test_get_async_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="num_workers"):
        get_async(local._inline.submit, 0, {"x": 1}, "x")
    with pytest.raises(ConfigError, match="chunksize"):
        get_async(local._inline.submit, 1, {"x": 1}, "x", chunksize=0)
    with pytest.raises(ConfigError, match="both dumps and loads"):
        get_async(local._inline.submit, 1, {"x": 1}, "x", dumps=lambda obj: [obj])


def test_first_error_wins_and_later_tasks_do_not_start(tmp_path):
    log = str(tmp_path / "calls")
    dsk = {"boom": (fail, 1), "later": (record_call, log, "ran"), "top": (add, "boom", "later")}
    with pytest.raises(KeyError):
        get_sync(dsk, "top", chunksize=1)
    # Priorities run 'boom' first (graph order breaks the tie); the sync loop stops
    # there instead of running the rest of the graph.
    assert calls(log) == []


def test_nested_compute_from_a_pool_thread_does_not_deadlock():
    def inner(x):
        return get_threads({"a": (inc, x)}, "a", num_workers=1)

    assert get_threads({"outer": (inner, 1)}, "outer", num_workers=1) == 2


def test_threads_share_one_pool_per_worker_count():
    get_threads({"x": 1}, "x", num_workers=3)
    pool = local._thread_pools[3]
    get_threads({"x": 1}, "x", num_workers=3)
    assert local._thread_pools[3] is pool


def test_note_fallback_for_python_3_10_uses_dunder_notes():
    class Old:
        """Stands in for an exception without add_note (Python 3.10)."""

    exc = Old()
    local._add_note(exc, "raised by task 'k'")  # type: ignore[arg-type]
    local._add_note(exc, "raised by task 'k'")  # type: ignore[arg-type]
    assert exc.__notes__ == ["raised by task 'k'"]  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="add_note is 3.11+")
def test_note_is_not_added_twice():
    exc = ValueError("x")
    local._add_note(exc, "raised by task 'k'")
    local._add_note(exc, "raised by task 'k'")
    assert exc.__notes__ == ["raised by task 'k'"]  # type: ignore[attr-defined]


def test_operator_tasks_run_unchanged_from_dask_graphs(scheduler):
    # A graph as dask.delayed would build it, with operator functions and aliases.
    dsk = {
        "a": 2,
        "b": 3,
        "mul-1": (operator.mul, "a", "b"),
        "neg-1": (operator.neg, "mul-1"),
        "result": "neg-1",
    }
    assert scheduler(dsk, ["result"]) == [-6]
