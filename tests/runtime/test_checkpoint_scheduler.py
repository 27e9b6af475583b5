"""Checkpoints in the scheduler's state machine, driven in-process without sockets.

The checkpoint lookup is a fake (a set of stored tokens), so these tests say what the
scheduler decides from what is stored; ``validate=True`` checks every invariant after
each stimulus.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from runtime.scheduler import SchedulerState, TaskState

W1, W2 = "tcp://10.0.0.1:4000", "tcp://10.0.0.2:4000"
C = "client-1"
DIR = "/shared/ckpt"


class Store:
    """A fake checkpoint directory: the set of stored tokens, and the lookups made."""

    def __init__(self, stored: Iterable[str] = ()) -> None:
        self.stored = set(stored)
        self.lookups: list[str] = []

    def __call__(self, directory: str, token: str) -> bool:
        assert directory == DIR
        self.lookups.append(token)
        return token in self.stored


def make_state(store: Store, *workers: str, nthreads: int = 1) -> SchedulerState:
    state = SchedulerState(validate=True, root_task_lookahead=0, checkpoint_lookup=store)
    for address in workers:
        state.add_worker(address, nthreads=nthreads)
    return state


def tok(key: str) -> str:
    return f"token-of-{key}"


def submit(
    state: SchedulerState,
    graph: Mapping[str, Iterable[str]],
    keys: Iterable[str],
    tokens: Iterable[str] | None = None,
) -> dict:
    """Submit ``{key: [dependencies]}`` with identity tokens for ``tokens`` (default: all)."""
    with_token = list(graph) if tokens is None else list(tokens)
    return state.update_graph(
        C,
        {k: [k.encode()] for k in graph},
        dependencies={k: list(d) for k, d in graph.items() if d},
        keys=list(keys),
        checkpoint={"directory": DIR, "tokens": {k: tok(k) for k in with_token}},
    )


def computes(out: dict) -> dict[str, dict]:
    """``{key: compute-task message}`` over every recipient."""
    return {m["key"]: m for msgs in out.values() for m in msgs if m["op"] == "compute-task"}


def where(out: dict, key: str) -> str:
    return next(r for r, msgs in out.items() for m in msgs if m.get("key") == key)


def finish(state: SchedulerState, worker: str, key: str) -> dict:
    return state.task_finished(worker, key, nbytes=8, type="int")


TREE = {"a": [], "b": [], "c": ["a", "b"], "d": [], "e": ["c", "d"]}


def test_without_checkpoints_nothing_is_looked_up() -> None:
    store = Store({tok("a")})
    state = make_state(store, W1)
    out = state.update_graph(C, {"a": [b"a"], "b": [b"b"]}, {"b": ["a"]}, keys=["b"])
    assert list(computes(out)) == ["a"] and "checkpoint" not in computes(out)["a"]
    assert store.lookups == []


def test_a_stored_result_cuts_the_graph_and_its_inputs_are_not_looked_up() -> None:
    store = Store({tok("c")})
    state = make_state(store, W1, W2)
    out = submit(state, TREE, keys=["e"])
    # c is stored: a and b are neither computed nor looked up; d and e are.
    assert set(store.lookups) == {tok("e"), tok("c"), tok("d")}
    assert list(computes(out)) == ["d"]
    assert state.tasks["c"].state is TaskState.MEMORY and not state.tasks["c"].who_has
    assert state.tasks["a"].state is TaskState.RELEASED

    on = where(out, "d")
    out = finish(state, on, "d")
    msg = computes(out)["e"]
    assert msg["who_has"] == {"c": [], "d": [on]}  # nobody holds c ...
    assert msg["stored"] == {"c": (DIR, tok("c"))}  # the worker loads c itself
    assert msg["checkpoint"] == (DIR, tok("e"))  # ... and writes e

    out = finish(state, where(out, "e"), "e")
    assert [m["op"] for m in out[C]] == ["key-in-memory"]
    assert state.tasks["c"].state is TaskState.RELEASED  # nobody needs it any more


def test_every_computed_task_is_sent_with_where_to_write_it() -> None:
    state = make_state(Store(), W1)
    out = submit(state, {"a": [], "b": ["a"]}, keys=["b"], tokens=["a"])
    assert computes(out)["a"]["checkpoint"] == (DIR, tok("a"))
    out = finish(state, W1, "a")
    assert "checkpoint" not in computes(out)["b"]  # no token: not checkpointed
    assert "stored" not in computes(out)["b"]


def test_a_stored_result_a_client_wants_is_loaded_by_a_worker() -> None:
    store = Store({tok("e")})
    state = make_state(store, W1)
    out = submit(state, TREE, keys=["e"])
    assert store.lookups == [tok("e")]
    msg = computes(out)["e"]
    assert msg["load"] is True and msg["task"] is None and msg["who_has"] == {}
    assert all(state.tasks[k].state is TaskState.RELEASED for k in "abcd")
    out = finish(state, W1, "e")
    assert out[C][0]["op"] == "key-in-memory" and out[C][0]["workers"] == [W1]


def test_a_failed_load_computes_the_task_from_its_inputs() -> None:
    store = Store({tok("c")})
    state = make_state(store, W1)
    out = state.update_graph(
        C,
        {"a": [b"a"], "c": [b"c"]},
        {"c": ["a"]},
        keys=["c"],
        checkpoint={"directory": DIR, "tokens": {"a": tok("a"), "c": tok("c")}},
    )
    assert computes(out)["c"]["load"] is True
    out = state.task_erred(W1, "c", exception=None, exc_type="runtime.errors.CheckpointError")
    assert C not in out  # not an error for the client
    assert list(computes(out)) == ["a"]
    out = finish(state, W1, "a")
    msg = computes(out)["c"]
    assert "load" not in msg and msg["task"] == [b"c"]
    out = finish(state, W1, "c")
    assert out[C][0]["op"] == "key-in-memory"


def test_an_input_that_cannot_be_loaded_is_computed_and_its_dependent_sent_again() -> None:
    store = Store({tok("c")})
    state = make_state(store, W1)
    out = submit(state, {"a": [], "c": ["a"], "e": ["c"]}, keys=["e"])
    assert list(computes(out)) == ["e"] and computes(out)["e"]["stored"]
    out = state.handle_worker_messages(
        W1, [{"op": "missing-data", "key": "c", "worker": None, "checkpoint": True}]
    )
    assert list(computes(out)) == ["a"]  # c is computed from its input now
    assert "e" in out[W1][0]["keys"]  # e is taken back from W1 (it dropped it)
    assert state.tasks["e"].state is TaskState.WAITING
    out = finish(state, W1, "a")
    out = finish(state, W1, "c")
    msg = computes(out)["e"]
    assert msg["who_has"] == {"c": [W1]} and "stored" not in msg
    assert store.lookups.count(tok("c")) == 1  # not looked up again after failing


def test_a_result_lost_with_its_worker_is_read_from_its_checkpoint() -> None:
    store = Store()
    state = make_state(store, W1)
    out = submit(state, {"a": [], "c": ["a"]}, keys=["c"])
    assert list(computes(out)) == ["a"]
    store.stored.add(tok("a"))  # W1 wrote a's checkpoint when it computed it
    out = finish(state, W1, "a")
    assert "stored" not in computes(out)["c"]  # W1 holds a: nothing to load
    state.add_worker(W2)
    out = state.remove_worker(W1)
    assert state.tasks["a"].state is TaskState.MEMORY and not state.tasks["a"].who_has
    assert "a" not in computes(out)  # not recomputed ...
    assert computes(out)["c"]["stored"] == {"a": (DIR, tok("a"))}  # ... c's worker loads it
    assert where(out, "c") == W2


def test_a_client_asking_for_a_result_only_the_store_holds_gets_it_loaded() -> None:
    store = Store({tok("c")})
    state = make_state(store, W1)
    out = submit(state, {"a": [], "c": ["a"], "e": ["c"]}, keys=["e"])
    assert state.tasks["c"].state is TaskState.MEMORY and not state.tasks["c"].who_has
    out = state.update_graph(C, {}, keys=["c"])
    assert [m for m in out.get(C, []) if m["op"] == "lost-data"] == []
    msgs = computes(out)
    assert msgs["c"]["load"] is True
    assert state.tasks["e"].state is TaskState.WAITING  # waits for c again
    out = finish(state, W1, "c")
    assert {m["op"] for m in out[C]} == {"key-in-memory"}
    assert computes(out)["e"]["who_has"] == {"c": [W1]}


def test_tasks_whose_inputs_are_all_stored_are_queued_like_root_tasks() -> None:
    graph: dict[str, list[str]] = {f"in{i}": [] for i in range(100)}
    graph.update({f"out{i}": [f"in{i}"] for i in range(100)})
    store = Store({tok(f"in{i}") for i in range(100)})
    state = make_state(store, W1, nthreads=1)
    out = submit(state, graph, keys=[f"out{i}" for i in range(100)])
    assert len(computes(out)) <= 2  # not all 100 at once
    assert all(m["stored"] for m in computes(out).values())
    assert state.queued_count() >= 98


def test_only_the_stored_result_is_loaded_when_the_whole_graph_is_stored() -> None:
    store = Store({tok(k) for k in TREE})
    state = make_state(store, W1)
    out = submit(state, TREE, keys=["e"])
    assert store.lookups == [tok("e")]
    assert list(computes(out)) == ["e"] and computes(out)["e"]["load"] is True


def test_message_with_tokens_for_known_tasks_only_sets_new_ones(monkeypatch: Any) -> None:
    state = make_state(Store(), W1)
    state.update_graph(C, {"a": [b"a"]}, keys=["a"])
    assert state.tasks["a"].checkpoint is None
    state.update_graph(
        C, {"b": [b"b"]}, keys=["b"], checkpoint={"directory": DIR, "tokens": {"b": "t"}}
    )
    assert state.tasks["b"].checkpoint == (DIR, "t")


def test_a_task_whose_worker_died_after_writing_its_checkpoint_is_not_run_again() -> None:
    store = Store()
    state = make_state(store, W1, W2)
    out = submit(state, {"a": [], "b": ["a"], "c": ["b"]}, keys=["c"])
    out = finish(state, where(out, "a"), "a")
    b_on = where(out, "b")
    store.stored.add(tok("b"))  # its worker wrote the checkpoint, then died unreported
    out = state.remove_worker(b_on)
    # b is read from the store by c's worker; a is no longer needed, nor recomputed.
    assert "b" not in computes(out) and "a" not in computes(out)
    assert computes(out)["c"]["stored"] == {"b": (DIR, tok("b"))}
    assert not state.tasks["a"].waiters
    state.validate()


def test_a_wanted_task_whose_worker_died_after_writing_its_checkpoint_is_loaded() -> None:
    store = Store()
    state = make_state(store, W1, W2)
    out = submit(state, {"a": [], "b": ["a"]}, keys=["b"])
    out = finish(state, where(out, "a"), "a")
    b_on = where(out, "b")
    store.stored.add(tok("b"))
    out = state.remove_worker(b_on)
    assert computes(out)["b"]["load"] is True
    assert state.tasks["a"].state is TaskState.RELEASED  # freed: b does not need it
    state.validate()


# ------------------------------------------------------- looking up ahead, in threads


def graph_message(graph: Mapping[str, Iterable[str]], keys: Iterable[str]) -> dict:
    return {
        "op": "update-graph",
        "tasks": {k: [k.encode()] for k in graph},
        "dependencies": {k: list(d) for k, d in graph.items() if d},
        "keys": list(keys),
        "checkpoint": {"directory": DIR, "tokens": {k: tok(k) for k in graph}},
    }


def test_lookup_ahead_walks_like_the_scheduler_does() -> None:
    from runtime.checkpoint import lookup_ahead

    # e is missing, c is stored: d and c are looked up, but not c's inputs a and b.
    store = Store({tok("c")})
    answers = lookup_ahead(graph_message(TREE, ["e"]), store)
    assert answers == {(DIR, tok("e")): False, (DIR, tok("c")): True, (DIR, tok("d")): False}
    # The state asks about the same checkpoints, and not the filesystem again.
    state = make_state(Store(), W1)
    state.prime_checkpoints(answers)
    out = submit(state, TREE, ["e"])
    state.unprime()
    assert sorted(computes(out)) == ["d"]  # c is loaded later, by e's worker
    assert state.tasks["c"].stored is True
    assert state.checkpoint_lookup.lookups == []  # type: ignore[union-attr]


def test_a_large_graph_is_looked_up_off_the_event_loop() -> None:
    import asyncio
    import threading

    from runtime.scheduler import Scheduler

    asked_in: set[int] = set()

    def lookup(directory: str, token: str) -> bool:
        asked_in.add(threading.get_ident())
        return token == tok("leaf-3")

    leaves = {f"leaf-{i}": [] for i in range(40)}
    graph = {**leaves, "total": list(leaves)}

    async def scenario() -> dict:
        async with Scheduler(host="127.0.0.1", validate=True) as s:
            s.state.checkpoint_lookup = lookup
            await s._client_batch(C, [graph_message(graph, ["total"])], None)
            assert not s.state._primed  # used, then forgotten
            return {k: ts.stored for k, ts in s.state.tasks.items()}

    stored = asyncio.run(scenario())  # the loop runs in this thread
    assert asked_in and threading.get_ident() not in asked_in
    assert stored["leaf-3"] is True and stored["leaf-4"] is None


def test_slow_lookups_overlap_in_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from runtime import checkpoint
    from runtime.checkpoint import lookup_ahead

    monkeypatch.setattr(checkpoint, "_SLOW_LOOKUP", -1.0)  # every lookup counts as slow
    names: set[str] = set()

    def slow(directory: str, token: str) -> bool:
        names.add(threading.current_thread().name)
        return False

    leaves = {f"leaf-{i}": [] for i in range(40)}
    answers = lookup_ahead(graph_message({**leaves, "total": list(leaves)}, ["total"]), slow)
    assert len(answers) == 41 and not any(answers.values())
    assert any(name.startswith("hpc-checkpoint-lookup") for name in names)
