"""The scheduler's state machine, driven in-process without sockets.

Every test builds a ``SchedulerState(validate=True)``: the invariants are checked
after every stimulus, and most tests call ``validate()`` again themselves.
Workers and clients are just names here; a "worker finishing a task" is a call to
``task_finished``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from runtime.errors import KilledWorker, SchedulerError
from runtime.scheduler import SchedulerState, TaskState
from runtime.serialize import dumps, loads

W1, W2, W3, W4 = (f"tcp://10.0.0.{i}:4000" for i in range(1, 5))
C = "client-1"


def payload(key: Any) -> list[bytes]:
    """An opaque task payload: the scheduler must forward it untouched."""
    return [f"payload of {key}".encode()]


def make_state(*workers: str, nthreads: int = 1, **kwargs: Any) -> SchedulerState:
    kwargs.setdefault("root_task_lookahead", 0)
    state = SchedulerState(validate=True, **kwargs)
    for address in workers:
        state.add_worker(address, nthreads=nthreads, name=address[-6:])
    return state


def ops(out: dict, recipient: str, op: str) -> list[dict]:
    return [m for m in out.get(recipient, []) if m["op"] == op]


def computed(out: dict, worker: str) -> list[Any]:
    """Keys sent to ``worker`` in compute-task messages."""
    return [m["key"] for m in ops(out, worker, "compute-task")]


def freed(out: dict, worker: str) -> list[Any]:
    return [k for m in ops(out, worker, "free-keys") for k in m["keys"]]


def assignments(out: dict) -> dict[Any, str]:
    """``{key: worker}`` for every compute-task in ``out``."""
    return {
        m["key"]: recipient
        for recipient, msgs in out.items()
        for m in msgs
        if m["op"] == "compute-task"
    }


def submit(
    state: SchedulerState,
    graph: Mapping[Any, Iterable[Any]],
    keys: Iterable[Any],
    client: str = C,
    **kwargs: Any,
) -> dict:
    """Submit ``{key: [dependency keys]}``; return the outgoing messages."""
    return state.update_graph(
        client,
        {k: payload(k) for k in graph},
        dependencies={k: list(d) for k, d in graph.items() if d},
        keys=list(keys),
        **kwargs,
    )


def finish(state: SchedulerState, worker: str, key: Any, nbytes: int = 8, **kw: Any) -> dict:
    return state.task_finished(worker, key, nbytes=nbytes, type="int", **kw)


def decode_error(msg: dict) -> BaseException:
    exc = loads(msg["exception"])
    assert isinstance(exc, BaseException)
    return exc


# ----------------------------------------------------------------------- basic flow


def test_chain_runs_where_its_input_is_and_frees_intermediate_results() -> None:
    state = make_state(W1, W2)
    out = submit(state, {"a": [], "b": ["a"], "c": ["b"]}, keys=["c"])
    assert list(assignments(out).items()) == [("a", W1)]
    compute = ops(out, W1, "compute-task")[0]
    assert compute["task"] == payload("a") and compute["who_has"] == {}
    assert state.tasks["b"].state is TaskState.WAITING

    out = finish(state, W1, "a")
    assert assignments(out) == {"b": W1}
    assert ops(out, W1, "compute-task")[0]["who_has"] == {"a": [W1]}
    assert freed(out, W1) == []  # b still needs a

    out = finish(state, W1, "b")
    assert assignments(out) == {"c": W1}
    assert freed(out, W1) == ["a"]
    assert state.tasks["a"].state is TaskState.RELEASED  # kept to recompute from

    out = finish(state, W1, "c", nbytes=100)
    assert freed(out, W1) == ["b"]
    [msg] = ops(out, C, "key-in-memory")
    assert msg["key"] == "c" and msg["nbytes"] == 100 and msg["workers"] == [W1]

    out = state.release_keys(C, ["c"])
    assert freed(out, W1) == ["c"]
    assert state.tasks == {}
    state.validate()


def test_update_graph_forgets_tasks_that_nothing_wants() -> None:
    state = make_state(W1)
    out = submit(state, {"a": [], "unused": [], "b": ["a"]}, keys=["b"])
    assert set(state.tasks) == {"a", "b"}
    assert assignments(out) == {"a": W1}


def test_client_gets_key_in_memory_for_a_key_already_computed() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    finish(state, W1, "x", nbytes=3)
    out = submit(state, {"x": []}, keys=["x"], client="client-2")
    assert assignments(out) == {}
    [msg] = ops(out, "client-2", "key-in-memory")
    assert msg["key"] == "x" and msg["workers"] == [W1]
    state.release_keys(C, ["x"])
    assert state.tasks["x"].state is TaskState.MEMORY  # client-2 still holds it
    out = state.release_keys("client-2", ["x"])
    assert freed(out, W1) == ["x"] and not state.tasks


def test_remove_client_releases_everything_it_held() -> None:
    state = make_state(W1)
    submit(state, {"x": [], "y": ["x"]}, keys=["x", "y"])
    finish(state, W1, "x")
    out = state.remove_client(C)
    assert set(freed(out, W1)) == {"x", "y"}
    assert not state.tasks and not state.clients


def test_tasks_wait_for_a_worker_and_run_when_one_registers() -> None:
    state = make_state()
    submit(state, {"a": [], "b": []}, keys=["a", "b"])
    assert {ts.state for ts in state.tasks.values()} == {TaskState.QUEUED}
    out = state.add_worker(W1, nthreads=2)
    assert sorted(assignments(out)) == ["a", "b"]


def test_ready_task_with_inputs_waits_when_no_worker_is_left() -> None:
    state = make_state(W1)
    submit(state, {"a": [], "b": ["a"]}, keys=["a", "b"])
    finish(state, W1, "a")
    state.remove_worker(W1)
    # a was lost, so it is queued again; b waits for it.
    assert state.tasks["a"].state is TaskState.QUEUED
    assert state.tasks["b"].state is TaskState.WAITING
    out = state.add_worker(W2)
    assert assignments(out) == {"a": W2}


# ------------------------------------------------------------------------ placement


def test_placement_prefers_the_worker_holding_most_input_bytes() -> None:
    for big_on, small_on in ((W1, W2), (W2, W1)):
        state = make_state(W1, W2, nthreads=2)
        pin = {"big": [big_on], "small": [small_on]}
        submit(state, {"big": [], "small": []}, keys=["big", "small"], workers=pin)
        finish(state, small_on, "small", nbytes=10)
        finish(state, big_on, "big", nbytes=10_000)
        # small_on is idle and big_on is not: bytes still win.
        submit(state, {"busy": []}, keys=["busy"], workers={"busy": [big_on]})
        out = submit(state, {"z": ["big", "small"]}, keys=["z"])
        assert assignments(out) == {"z": big_on}
        [msg] = ops(out, big_on, "compute-task")
        assert msg["who_has"] == {"big": [big_on], "small": [small_on]}


def test_placement_ties_go_to_the_least_occupied_worker() -> None:
    state = make_state(W1, W2, nthreads=1, worker_saturation=math.inf)
    # x on W1, y on W2, equal sizes; W1 is kept busy with two other tasks.
    submit(state, {"x": []}, keys=["x"])
    finish(state, W1, "x", nbytes=50)
    submit(state, {"y": []}, keys=["y"], workers={"y": [W2]})
    finish(state, W2, "y", nbytes=50)
    out = submit(
        state,
        {"busy1": [], "busy2": []},
        keys=["busy1", "busy2"],
        workers={"busy1": [W1], "busy2": [W1]},
    )
    assert assignments(out) == {"busy1": W1, "busy2": W1}
    out = submit(state, {"z": ["x", "y"]}, keys=["z"])
    assert assignments(out) == {"z": W2}


def test_restricted_task_runs_only_where_allowed_and_waits_for_that_worker() -> None:
    state = make_state(W1)
    out = submit(state, {"r": []}, keys=["r"], workers={"r": ["gpu-node"]})
    assert assignments(out) == {}
    assert state.tasks["r"].state is TaskState.QUEUED
    out = state.add_worker(W2, name="gpu-node")
    assert assignments(out) == {"r": W2}


def test_root_tasks_start_in_priority_order() -> None:
    state = make_state(W1)
    keys = [f"t{i}" for i in range(5)]
    priority = {k: (0, -i) for i, k in enumerate(keys)}  # later keys first
    out = submit(state, dict.fromkeys(keys, ()), keys=keys, priority=priority)
    order = computed(out, W1)
    while True:
        out = finish(state, W1, order[-1])
        new = computed(out, W1)
        if not new:
            break
        order.extend(new)
    assert order == list(reversed(keys))


# ------------------------------------------------------------------ root-task queue


def test_100k_map_keeps_root_tasks_queued_bounded_by_worker_threads() -> None:
    n = 100_000
    state = make_state(W1, W2, nthreads=2, worker_saturation=1.1)
    state.validating = False  # validate() is O(tasks): run it every 1000 rounds below
    keys = [("map", i) for i in range(n)]
    out = state.update_graph(C, {k: payload(k) for k in keys}, keys=keys)
    state.validate()
    slots = math.ceil(2 * 1.1)  # per worker
    # Counted from the messages alone: sent and not yet finished, per worker.
    to_run = {W1: computed(out, W1), W2: computed(out, W2)}
    in_flight = {w: len(k) for w, k in to_run.items()}
    assert in_flight == {W1: slots, W2: slots}
    assert state.queued_count() == n - 2 * slots

    max_in_flight = max_held = finished = rounds = 0
    sent = 2 * slots
    held: list = []
    while finished < n:
        rounds += 1
        next_run: dict[str, list] = {W1: [], W2: []}
        for worker, keys_here in to_run.items():
            for key in keys_here:
                out = finish(state, worker, key)
                finished += 1
                in_flight[worker] -= 1
                held.extend(m["key"] for m in ops(out, C, "key-in-memory"))
                for new_key, where in assignments(out).items():
                    next_run[where].append(new_key)
                    in_flight[where] += 1
                    sent += 1
                max_in_flight = max(max_in_flight, *in_flight.values())
        to_run = next_run
        max_held = max(max_held, len(held))
        if rounds % 2 == 0:  # the client gathers and releases every other round
            state.release_keys(C, held)
            held = []
        if rounds % 1000 == 0:
            state.validate()
    state.release_keys(C, held)
    state.validate()
    assert sent == finished == n  # each task sent exactly once
    assert max_in_flight == slots  # never more than ceil(threads * saturation)
    assert max_held <= 2 * 2 * slots  # two rounds of results at most
    assert state.processing_count() == 0 and state.queued_count() == 0
    assert not state.tasks


def test_lookahead_sends_more_short_root_tasks_but_never_more_than_the_cap() -> None:
    state = make_state(W1, nthreads=2, root_task_lookahead=0.005)
    state.validating = False  # checked at each assertion instead
    keys = [("m", i) for i in range(5000)]
    out = state.update_graph(C, {k: payload(k) for k in keys}, keys=keys)
    first = computed(out, W1)
    assert len(first) == math.ceil(2 * 1.1)
    # Tasks measured at 1 ms each: 5 ms of look-ahead is 5 more per thread.
    out = finish(state, W1, first[0], start=10.0, stop=10.001)
    assert len(state.workers[W1].processing) == math.ceil(2 * 1.1) + 2 * 5
    state.validate()
    # Measured at 1 microsecond: capped at 256 per thread.
    for _ in range(200):
        key = next(iter(state.workers[W1].processing)).key
        finish(state, W1, key, start=1.0, stop=1.000001)
    assert len(state.workers[W1].processing) == math.ceil(2 * 1.1) + 2 * 256
    state.validate()
    # Long tasks again (1 s): back to threads * saturation as they finish.
    for _ in range(2000):
        key = next(iter(state.workers[W1].processing)).key
        finish(state, W1, key, start=1.0, stop=2.0)
    assert len(state.workers[W1].processing) == math.ceil(2 * 1.1)
    state.validate()


def test_many_tasks_fanning_out_of_one_input_are_queued_like_root_tasks() -> None:
    state = make_state(W1, W2)
    graph: dict[Any, list] = {"x": []}
    graph.update({("f", i): ["x"] for i in range(100)})
    out = submit(state, graph, keys=[k for k in graph if k != "x"])
    out = finish(state, W1, "x")
    assert len(assignments(out)) == 2 * math.ceil(1.1)  # not all 100 to W1
    assert state.queued_count() == 100 - 4


# ------------------------------------------------------------------ freeing memory


def test_results_are_freed_as_soon_as_no_dependent_needs_them() -> None:
    state = make_state(W1)
    # a feeds b and c; d needs b and c; the client wants d only.
    submit(state, {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, keys=["d"])
    finish(state, W1, "a")
    out = finish(state, W1, "b")
    assert freed(out, W1) == []  # c still needs a
    out = finish(state, W1, "c")
    assert freed(out, W1) == ["a"]
    out = finish(state, W1, "d")
    assert sorted(freed(out, W1)) == ["b", "c"]
    assert state.workers[W1].has_what == {state.tasks["d"]}


def test_a_released_key_stays_in_memory_while_a_dependent_needs_it() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    finish(state, W1, "x")
    submit(state, {"y": ["x"]}, keys=["y"])
    out = state.release_keys(C, ["x"])
    assert freed(out, W1) == []
    out = finish(state, W1, "y")
    assert freed(out, W1) == ["x"]


def test_releasing_a_processing_task_frees_it_on_the_worker_and_a_late_result_too() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    out = state.release_keys(C, ["x"])
    assert freed(out, W1) == ["x"] and not state.tasks
    out = finish(state, W1, "x")  # the worker finished before it saw free-keys
    assert freed(out, W1) == ["x"]
    state.validate()


def test_a_free_never_overtakes_a_later_compute_of_the_same_key() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    out = state.handle_client_messages(
        C,
        [
            {"op": "release-keys", "keys": ["x"], "client": C},
            {"op": "update-graph", "tasks": {"x": payload("x")}, "keys": ["x"], "client": C},
        ],
    )
    assert [m["op"] for m in out[W1]] == ["free-keys", "compute-task"]
    finish(state, W1, "x")
    submit(state, {"w": []}, keys=["w"])
    out = state.handle_client_messages(
        C,
        [
            {"op": "update-graph", "tasks": {"y": payload("y")}, "dependencies": {"y": ["x"]},
             "keys": ["y"]},
            {"op": "release-keys", "keys": ["y", "w"]},
        ],
    )  # fmt: skip
    compute, free = out[W1]  # consecutive frees share one message
    assert (compute["op"], compute["key"]) == ("compute-task", "y")
    assert (free["op"], sorted(free["keys"])) == ("free-keys", ["w", "y"])


# --------------------------------------------------------------------- worker loss


def test_worker_loss_reschedules_its_tasks_and_recomputes_lost_results() -> None:
    state = make_state(W1, W2)
    # a -> b -> c on W1; the client wants c. W1 dies with b in memory, c processing.
    submit(state, {"a": [], "b": ["a"], "c": ["b"]}, keys=["c"])
    finish(state, W1, "a")
    finish(state, W1, "b")
    assert state.tasks["c"].processing_on is state.workers[W1]
    assert state.tasks["a"].state is TaskState.RELEASED  # freed after b

    out = state.remove_worker(W1)
    # b was only on W1: recompute it, which needs a again (walk back).
    assert assignments(out) == {"a": W2}
    assert state.tasks["b"].state is TaskState.WAITING
    assert state.tasks["c"].state is TaskState.WAITING
    assert state.tasks["c"].suspicious == 1
    out = finish(state, W2, "a")
    assert assignments(out) == {"b": W2}
    out = finish(state, W2, "b")
    assert assignments(out) == {"c": W2}
    out = finish(state, W2, "c")
    assert [m["key"] for m in ops(out, C, "key-in-memory")] == ["c"]


def test_worker_loss_sends_back_tasks_elsewhere_that_needed_its_results() -> None:
    state = make_state(W1, W2, nthreads=2)
    submit(state, {"x": [], "y": []}, keys=["x", "y"], workers={"x": [W1], "y": [W2]})
    finish(state, W1, "x", nbytes=10)
    finish(state, W2, "y", nbytes=1000)
    out = submit(state, {"z": ["x", "y"]}, keys=["z"])
    assert assignments(out) == {"z": W2}
    out = state.remove_worker(W1)
    # z cannot run without x: W2 drops it, x is recomputed (restricted to W1: waits).
    assert freed(out, W2) == ["z"]
    assert state.tasks["z"].state is TaskState.WAITING
    assert [m["key"] for m in ops(out, C, "lost-data")] == ["x"]
    assert state.tasks["x"].state is TaskState.QUEUED
    out = state.add_worker(W3, name="w1-again")
    assert assignments(out) == {}  # restricted to W1's address or name
    out = state.add_worker(W1)
    assert assignments(out) == {"x": W1}
    out = finish(state, W1, "x", nbytes=10)
    assert assignments(out) == {"z": W2}
    assert [m["key"] for m in ops(out, C, "key-in-memory")] == ["x"]


def test_missing_data_report_removes_the_holder_and_recomputes_when_it_was_the_last() -> None:
    state = make_state(W1, W2, nthreads=2)
    submit(state, {"x": [], "y": []}, keys=["x", "y"], workers={"x": [W1], "y": [W2]})
    finish(state, W1, "x", nbytes=1)
    finish(state, W2, "y", nbytes=1000)
    submit(state, {"z": ["x", "y"]}, keys=["z"])
    assert state.tasks["z"].processing_on is state.workers[W2]
    out = state.missing_data(W2, "x", W1)
    assert freed(out, W1) == ["x"]  # W1 said it had x: make sure it does not
    assert freed(out, W2) == ["z"]
    assert assignments(out) == {"x": W1}
    assert state.tasks["z"].state is TaskState.WAITING


def test_missing_data_with_another_holder_left_resends_the_holders() -> None:
    state = make_state(W1, W2, W3, nthreads=2)
    submit(state, {"x": []}, keys=["x"], workers={"x": [W1]})
    finish(state, W1, "x", nbytes=1)
    finish(state, W2, "x", nbytes=1)  # a second copy (a stale result kept as replica)
    submit(state, {"z": ["x"]}, keys=["z"], workers={"z": [W3]})
    out = state.missing_data(W3, "x", W1)
    [msg] = ops(out, W3, "compute-task")
    assert msg["key"] == "z" and msg["who_has"] == {"x": [W2]}
    assert state.tasks["z"].processing_on is state.workers[W3]


def test_worker_dropping_its_only_copy_triggers_recompute() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    finish(state, W1, "x")
    out = state.release_worker_data(W1, ["x"])
    assert assignments(out) == {"x": W1}
    assert [m["key"] for m in ops(out, C, "lost-data")] == ["x"]


def test_task_that_kills_three_workers_errs_with_killed_worker() -> None:
    state = make_state(W1, W2, W3, W4)
    graph = {"bomb": [], "after": ["bomb"]}
    submit(state, graph, keys=["after"])
    lost = []
    for _ in range(3):
        [where] = [w for w, ws in state.workers.items() if ws.processing]
        lost.append(where)
        out = state.remove_worker(where)
    assert state.tasks["after"].state is TaskState.ERRED
    [msg] = ops(out, C, "task-erred")
    assert msg["key"] == "after" and msg["origin"] == "bomb"
    exc = decode_error(msg)
    assert isinstance(exc, KilledWorker)
    assert exc.key == "bomb" and exc.workers == lost
    assert "'bomb'" in str(exc) and all(w in str(exc) for w in lost)
    assert "allowed-failures" in str(exc)
    assert assignments(out) == {}  # never an endless loop


def test_killed_worker_threshold_follows_allowed_failures() -> None:
    state = make_state(W1, W2, allowed_failures=1)
    submit(state, {"bomb": []}, keys=["bomb"])
    out = state.remove_worker(W1)
    assert isinstance(decode_error(ops(out, C, "task-erred")[0]), KilledWorker)


def test_innocent_task_beside_a_worker_killer_is_not_blamed() -> None:
    # One thread and saturation 2: two tasks share each worker.
    workers = [f"tcp://10.0.1.{i}:4000" for i in range(6)]
    state = make_state(*workers[:1], worker_saturation=2.0)
    out = submit(state, {"bomb": [], "innocent": []}, keys=["bomb", "innocent"])
    assert sorted(assignments(out)) == ["bomb", "innocent"]
    dead = 0
    spare = iter(workers[1:])
    while state.tasks["bomb"].state is not TaskState.ERRED:
        state.add_worker(next(spare))
        bomb_on = state.tasks["bomb"].processing_on
        assert bomb_on is not None
        innocent = state.tasks["innocent"]
        elsewhere = innocent.processing_on
        if elsewhere is not None and elsewhere is not bomb_on:
            finish(state, elsewhere.address, "innocent")
        state.remove_worker(bomb_on.address)
        dead += 1
    assert dead == 3
    assert state.tasks["innocent"].state in (TaskState.PROCESSING, TaskState.MEMORY)
    if state.tasks["innocent"].state is TaskState.PROCESSING:
        ws = state.tasks["innocent"].processing_on
        assert ws is not None
        finish(state, ws.address, "innocent")
    assert state.tasks["innocent"].state is TaskState.MEMORY


def test_isolated_task_gets_an_empty_worker_even_when_the_queue_is_long() -> None:
    state = make_state(W1, W2, worker_saturation=2.0)
    keys = [("m", i) for i in range(50)]
    state.update_graph(C, {k: payload(k) for k in keys}, keys=keys)
    suspect = next(iter(state.workers[W1].processing))
    state.remove_worker(W1)
    state.add_worker(W3)
    assert suspect.processing_on is not None
    state.remove_worker(suspect.processing_on.address)  # second death: isolate it
    assert suspect.suspicious == 2 and suspect.state is TaskState.QUEUED
    state.add_worker(W4)
    for _ in range(200):
        if suspect.state is TaskState.PROCESSING:
            break
        for ws in list(state.workers.values()):
            for ts in list(ws.processing):
                finish(state, ws.address, ts.key)
                break
    assert suspect.state is TaskState.PROCESSING
    host = suspect.processing_on
    assert host is not None and host.processing == {suspect}
    finish(state, host.address, suspect.key)
    assert not host.blocked


# ----------------------------------------------------------------------- errors


def test_exception_fails_dependents_and_reaches_clients_with_the_original_frames() -> None:
    state = make_state(W1)
    submit(state, {"a": [], "b": ["a"], "c": ["b"]}, keys=["b", "c"])
    frames = dumps(ZeroDivisionError("boom"))
    out = state.task_erred(
        W1,
        "a",
        exception=frames,
        traceback="Traceback: ...",
        exc_type="builtins.ZeroDivisionError",
        retryable=False,
    )
    msgs = {m["key"]: m for m in ops(out, C, "task-erred")}
    assert set(msgs) == {"b", "c"}
    for msg in msgs.values():
        assert msg["exception"] is frames  # forwarded, never unpickled
        assert msg["origin"] == "a" and msg["worker"] == W1
        assert msg["traceback"] == "Traceback: ..."
    assert state.tasks["b"].state is TaskState.ERRED
    assert state.tasks["a"].state is TaskState.RELEASED  # nobody wants a itself
    # A new task on an erred key errs at once.
    out = submit(state, {"d": ["c"]}, keys=["d"])
    assert [m["key"] for m in ops(out, C, "task-erred")] == ["d"]
    state.release_keys(C, ["b", "c", "d"])
    assert not state.tasks


def test_retryable_errors_are_retried_up_to_the_retries_given() -> None:
    state = make_state(W1)
    submit(state, {"io": []}, keys=["io"], retries={"io": 2})
    for attempt in range(2):
        out = state.task_erred(W1, "io", exception=dumps(OSError("disk")), retryable=True)
        assert assignments(out) == {"io": W1}, attempt
        assert not ops(out, C, "task-erred")
    out = state.task_erred(W1, "io", exception=dumps(OSError("disk")), retryable=True)
    assert assignments(out) == {}
    assert isinstance(decode_error(ops(out, C, "task-erred")[0]), OSError)


def test_non_retryable_errors_are_not_retried_even_with_retries_left() -> None:
    state = make_state(W1)
    submit(state, {"bad": []}, keys=["bad"], retries={"bad": 5})
    out = state.task_erred(W1, "bad", exception=dumps(ValueError("no")), retryable=False)
    assert assignments(out) == {}
    assert ops(out, C, "task-erred")


def test_default_retries_apply_when_the_client_gives_none() -> None:
    state = make_state(W1, default_retries=1)
    submit(state, {"io": []}, keys=["io"])
    out = state.task_erred(W1, "io", exception=dumps(OSError("x")), retryable=True)
    assert assignments(out) == {"io": W1}
    out = state.task_erred(W1, "io", exception=dumps(OSError("x")), retryable=True)
    assert ops(out, C, "task-erred")


def test_stale_error_report_from_another_worker_is_ignored() -> None:
    state = make_state(W1, W2)
    submit(state, {"x": []}, keys=["x"], workers={"x": [W1]})
    out = state.task_erred(W2, "x", exception=dumps(ValueError()), retryable=False)
    assert out == {} and state.tasks["x"].state is TaskState.PROCESSING


def test_dependency_on_an_unknown_key_errs_with_a_clear_message() -> None:
    state = make_state(W1)
    out = state.update_graph(C, {"y": payload("y")}, dependencies={"y": ["ghost"]}, keys=["y"])
    [msg] = ops(out, C, "task-erred")
    exc = decode_error(msg)
    assert isinstance(exc, SchedulerError) and "'ghost'" in str(exc)


def test_scattered_data_lost_with_its_worker_cannot_be_recomputed() -> None:
    state = make_state(W1, W2)
    out = state.update_data(C, {"s": [W1]}, {"s": 80})
    assert [m["key"] for m in ops(out, C, "key-in-memory")] == ["s"]
    out = submit(state, {"f": ["s"]}, keys=["f"])
    assert assignments(out) == {"f": W1}
    out = state.remove_worker(W1)
    errors = {m["key"]: decode_error(m) for m in ops(out, C, "task-erred")}
    assert set(errors) == {"s", "f"}
    assert "scatter it again" in str(errors["s"])


# ---------------------------------------------------------------------- cancelling


def test_cancel_stops_the_task_and_its_dependents_and_tells_the_client() -> None:
    state = make_state(W1)
    submit(state, {"a": [], "b": ["a"], "other": []}, keys=["a", "b", "other"])
    out = state.cancel_keys(C, ["a"])
    assert sorted(m["key"] for m in ops(out, C, "task-cancelled")) == ["a", "b"]
    assert freed(out, W1) == ["a"]
    assert set(state.tasks) == {"other"}


def test_cancel_keeps_a_task_another_client_still_wants() -> None:
    state = make_state(W1)
    submit(state, {"a": []}, keys=["a"])
    submit(state, {"a": []}, keys=["a"], client="client-2")
    out = state.cancel_keys(C, ["a"])
    assert [m["key"] for m in ops(out, C, "task-cancelled")] == ["a"]
    assert freed(out, W1) == []
    assert state.tasks["a"].state is TaskState.PROCESSING


# ---------------------------------------------------------------- worker messages


def test_worker_batch_is_applied_in_order_as_one_step() -> None:
    state = make_state(W1, nthreads=4)
    submit(state, {"a": [], "b": [], "c": ["a", "b"]}, keys=["c"])
    out = state.handle_worker_messages(
        W1,
        [
            {"op": "task-finished", "key": "a", "nbytes": 1, "type": "int"},
            {"op": "heartbeat", "metrics": {"memory": 123}},
            {"op": "task-finished", "key": "b", "nbytes": 1, "type": "int"},
            {"op": "no-such-op"},
        ],
        now=42.0,
    )
    assert assignments(out) == {"c": W1}
    ws = state.workers[W1]
    assert ws.metrics == {"memory": 123} and ws.last_seen == 42.0


def test_stale_workers_are_those_silent_longer_than_the_ttl() -> None:
    state = make_state()
    state.add_worker(W1, now=100.0)
    state.add_worker(W2, now=100.0)
    state.heartbeat(W2, {"cpu": 1.0}, now=109.0)
    assert state.stale_workers(110.5, ttl=10.0) == [W1]
    assert state.stale_workers(109.5, ttl=10.0) == []


def test_retired_worker_is_not_blamed_on_its_tasks() -> None:
    state = make_state(W1, W2, allowed_failures=1)
    submit(state, {"x": []}, keys=["x"], workers={"x": [W1, W2]})
    out = state.remove_worker(W1, safe=True)
    assert assignments(out) == {"x": W2}
    assert state.tasks["x"].suspicious == 0


def test_messages_from_an_unknown_worker_change_nothing() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    assert state.task_finished(W2, "x") == {}
    assert state.handle_worker_messages(W2, [{"op": "task-finished", "key": "x"}]) == {}
    assert state.tasks["x"].state is TaskState.PROCESSING


def test_re_registering_an_address_replaces_the_old_worker() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    out = state.add_worker(W1, nthreads=1)
    assert assignments(out) == {"x": W1}
    assert state.tasks["x"].suspicious == 0  # it reconnected: nothing killed it


def test_client_requests_are_answered_in_order_with_their_id() -> None:
    state = make_state(W1)
    out = state.handle_client_messages(
        C,
        [
            {"op": "update-graph", "tasks": {"x": payload("x")}, "keys": ["x"]},
            {"op": "who-has", "keys": ["x", "nope"], "id": 7},
            {"op": "scheduler-info", "id": 8},
        ],
    )
    replies = out[C]
    assert replies[0] == {"op": "who-has", "who_has": {"x": [], "nope": []}, "id": 7}
    assert replies[1]["op"] == "scheduler-info" and replies[1]["id"] == 8
    assert replies[1]["workers"][W1]["nthreads"] == 1
    finish(state, W1, "x")
    assert state.who_has(["x"]) == {"x": [W1]}


def test_close_client_in_a_batch_keeps_the_messages_before_it() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    out = state.handle_client_messages(C, [{"op": "close-client"}])
    assert freed(out, W1) == ["x"] and not state.clients


# ----------------------------------------------------------------------- validate


def test_validate_reports_a_broken_invariant() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    ts = state.tasks["x"]
    state.workers[W1].processing.discard(ts)  # corrupt: processing on nobody
    with pytest.raises(AssertionError, match="processing on"):
        state.validate()


def test_validate_reports_an_unneeded_result_left_in_memory() -> None:
    state = make_state(W1)
    submit(state, {"x": []}, keys=["x"])
    finish(state, W1, "x")
    state.tasks["x"].who_wants = set()
    state.clients[C].wants.clear()
    with pytest.raises(AssertionError, match="neither wanted"):
        state.validate()


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(SchedulerError, match="allowed-failures"):
        SchedulerState(allowed_failures=0)
    with pytest.raises(SchedulerError, match="worker-saturation"):
        SchedulerState(worker_saturation=0)


def test_root_tasks_go_to_the_least_occupied_worker_first() -> None:
    # With saturation each 1-thread worker has a look-ahead slot; the second root task
    # must go to the empty worker, not queue behind the first one.
    state = make_state(W1, W2, worker_saturation=2.0)
    out = submit(state, {"slow": []}, keys=["slow"])
    (first,) = assignments(out).values()
    out = submit(state, {"quick": []}, keys=["quick"])
    assert assignments(out) == {"quick": W2 if first == W1 else W1}
