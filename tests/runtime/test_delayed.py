"""Behaviour of ``delayed``, ``compute`` and ``persist`` on every local scheduler."""

from __future__ import annotations

import dataclasses
import operator
import os
import socket
from pathlib import Path

import pytest

import hpc
from runtime import graph
from runtime.delayed import Delayed, delayed
from runtime.errors import ConfigError, SerializationError

SCHEDULERS = ["sync", "threads", "processes"]


@pytest.fixture(params=SCHEDULERS)
def scheduler(request):
    with hpc.config.set(scheduler=request.param):
        yield request.param


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def record_call(path: str, value):
    """Append a line to ``path`` (shared by threads and processes) and return value."""
    with open(path, "a") as f:
        f.write(f"{value}\n")
    return value


# -- building graphs ---------------------------------------------------------------------


def test_delayed_call_builds_a_task_and_does_not_run():
    calls = []

    def f(x):
        calls.append(x)
        return x

    d = delayed(f)(1)
    assert isinstance(d, Delayed)
    assert calls == []
    dsk = d.__dask_graph__()
    assert d.key in dsk
    assert graph.istask(dsk[d.key])


def test_decorator_with_and_without_options():
    @delayed
    def a(x):
        return x * 2

    @delayed(pure=True, name="bee")
    def b(x):
        return x * 3

    assert a(2).compute(scheduler="sync") == 4
    assert b(2).key.startswith("bee-")
    assert b(2).compute(scheduler="sync") == 6


def test_default_keys_are_unique_and_pure_keys_are_content_hashes():
    assert delayed(inc)(1).key != delayed(inc)(1).key
    assert delayed(inc, pure=True)(1).key == delayed(inc, pure=True)(1).key
    assert delayed(inc, pure=True)(1).key != delayed(inc, pure=True)(2).key
    assert delayed(inc)(1, pure=True).key == delayed(inc)(1, pure=True).key
    assert delayed(inc, pure=True)(1).key.startswith("inc-")


def test_explicit_key_name():
    d = delayed(inc)(1, dask_key_name="my-key")
    assert d.key == "my-key"
    assert d.compute(scheduler="sync") == 2
    assert delayed(5, name="five").key == "five"
    assert delayed(5, key=("five", 0)).key == ("five", 0)


def test_delayed_on_values_and_nested_containers(scheduler):
    x = delayed(1)
    y = delayed([x, 2, {"a": x}])
    assert y.compute() == [1, 2, {"a": 1}]
    assert delayed(inc)(x).compute() == 2


def test_containers_of_delayed_become_dependencies(scheduler):
    a = delayed(inc)(1)
    b = delayed(inc)(2)
    out = delayed(lambda lst, tup, d, s: (lst, tup, d, s))([a, b], (a, 3), {"k": b}, {a, b})
    assert out.compute() == ([2, 3], (2, 3), {"k": 3}, {2, 3})


def test_string_arguments_equal_to_keys_are_not_substituted(scheduler):
    x = delayed(10, name="x")
    out = delayed(lambda v, s, t: (v, s, t))(x, "x", ("x",))
    assert out.compute() == (10, "x", ("x",))


def test_dataclass_arguments_holding_delayed_values(scheduler):
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    p = Point(delayed(inc)(1), 5)
    assert delayed(lambda pt: pt.x + pt.y)(p).compute() == 7


def test_kwargs_are_passed_and_may_be_delayed(scheduler):
    def f(a, b=0, *, c=1):
        return a + b * c

    b = delayed(inc)(1)
    assert delayed(f)(1, b=b, c=10).compute() == 21


def test_nout_allows_unpacking(scheduler):
    def pair(x):
        return x, x * 10

    a, b = delayed(pair, nout=2)(3)
    assert hpc.compute(a, b) == (3, 30)
    assert len(delayed(pair, nout=2)(1)) == 2
    with pytest.raises(TypeError, match="nout"):
        iter(delayed(pair)(1))


def test_attribute_access_indexing_and_method_calls(scheduler):
    class Box:
        def __init__(self, v):
            self.value = v

        def scaled(self, k, offset=0):
            return self.value * k + offset

    box = delayed(Box)(4)
    assert box.value.compute() == 4
    assert box.scaled(3, offset=1).compute() == 13
    seq = delayed(list)(range(5))
    assert seq[2].compute() == 2
    assert delayed({"a": 1})["a"].compute() == 1
    assert delayed("a,b").split(",").compute() == ["a", "b"]


def test_arithmetic_and_comparison_operators(scheduler):
    x = delayed(6)
    y = delayed(3)
    exprs = [x + y, x - y, x * y, x / y, x // y, x % y, x**y, -x, abs(-x), x > y, x == 6]
    assert list(hpc.compute(*exprs)) == [9, 3, 18, 2.0, 2, 0, 216, -6, 6, True, True]
    assert (1 + x).compute() == 7
    assert (10 - x).compute() == 4


def test_delayed_is_immutable_and_has_no_truth_value():
    x = delayed(1)
    with pytest.raises(TypeError, match="immutable"):
        x.foo = 1
    with pytest.raises(TypeError, match="truth value"):
        bool(x)
    assert hash(x) == hash(x.key)


def test_shared_nodes_are_computed_once(scheduler, tmp_path: Path):
    log = tmp_path / "calls.txt"
    shared = delayed(record_call, pure=True)(str(log), 5)
    a = delayed(inc)(shared)
    b = delayed(add)(shared, 10)
    c = delayed(add)(a, b)
    assert hpc.compute(a, b, c) == (6, 15, 21)
    assert log.read_text().splitlines() == ["5"]


def test_compute_passes_plain_values_through_and_traverses_containers():
    x = delayed(inc)(1)
    assert hpc.compute(1, "s", x, [x, x], scheduler="sync") == (1, "s", 2, [2, 2])
    assert hpc.compute(scheduler="sync") == ()


def test_task_dependencies_between_delayed_calls(scheduler, tmp_path: Path):
    order_file = tmp_path / "order.txt"

    def step(name, *deps):
        with open(order_file, "a") as f:
            f.write(name + "\n")
        return name

    load = delayed(step)("load")
    clean = delayed(step)("clean", load)
    train = delayed(step)("train", clean)
    report = delayed(step)("report", train, clean)
    assert report.compute() == "report"
    assert order_file.read_text().split() == ["load", "clean", "train", "report"]


def test_configure_the_scheduler_globally_and_per_call():
    x = delayed(os.getpid)()
    assert x.compute(scheduler="sync") == os.getpid()
    with hpc.config.set(scheduler="processes"):
        assert delayed(os.getpid)().compute() != os.getpid()
    with hpc.config.set(scheduler="sync"):
        assert delayed(os.getpid)().compute() == os.getpid()


def test_unknown_scheduler_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="threads"):
        delayed(inc)(1).compute(scheduler="nope")


def test_forkserver_context_runs_tasks():
    with hpc.config.set({"multiprocessing.context": "forkserver"}):
        assert delayed(inc)(1).compute(scheduler="processes") == 2


def test_exceptions_keep_their_type(scheduler):
    def boom(x):
        raise KeyError(f"missing {x}")

    with pytest.raises(KeyError, match="missing 3"):
        delayed(boom)(3).compute()


class Connection:
    """Stands for a database connection: holds a socket, which cannot be pickled."""

    def __init__(self):
        self.sock = socket.socket()
        self.host = "localhost"

    def query(self, x):
        return x * 2


class PicklableConnection(Connection):
    """The same connection, reopened on the other side after unpickling."""

    def __getstate__(self):
        return {"host": self.host}

    def __setstate__(self, state):
        self.host = state["host"]
        self.sock = socket.socket()


def test_unserializable_connection_then_getstate_fix():
    conn = Connection()
    try:
        with pytest.raises(SerializationError, match="socket"):
            delayed(lambda c, x: c.query(x))(conn, 2).compute(scheduler="processes")
    finally:
        conn.sock.close()
    conn2 = PicklableConnection()
    try:
        assert delayed(lambda c, x: c.query(x))(conn2, 2).compute(scheduler="processes") == 4
    finally:
        conn2.sock.close()


def test_several_outputs_computed_together_share_a_node(scheduler, tmp_path: Path):
    log = tmp_path / "calls.txt"
    base = delayed(record_call)(str(log), 1)
    outs = [delayed(add)(base, i) for i in range(4)]
    assert hpc.compute(*outs) == (1, 2, 3, 4)
    assert log.read_text().splitlines() == ["1"]


def test_persist_returns_a_delayed_holding_the_result(scheduler, tmp_path: Path):
    log = tmp_path / "calls.txt"
    x = delayed(record_call)(str(log), 7)
    (px,) = hpc.persist(x)
    assert isinstance(px, Delayed)
    assert px.key == x.key
    assert delayed(inc)(px).compute() == 8
    assert px.compute() == 7
    assert log.read_text().splitlines() == ["7"]


def test_optimize_graph_fuses_chains_without_changing_results():
    x = delayed(1, name="start")
    for _ in range(50):
        x = delayed(inc)(x)
    assert hpc.compute(x, scheduler="sync", optimize_graph=True) == (51,)
    assert hpc.compute(x, scheduler="sync", optimize_graph=False) == (51,)


def test_dask_classic_graphs_run_through_get(scheduler):
    dsk = {"x": 1, "y": (inc, "x"), "z": (add, "y", 10), ("w", 0): (operator.mul, "z", 2)}
    assert hpc.get(dsk, "z", scheduler=scheduler) == 12
    # Nested lists of keys give the same nesting of values.
    assert hpc.get(dsk, [("w", 0), ["x", "y"]], scheduler=scheduler) == [24, [1, 2]]
