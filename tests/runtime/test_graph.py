"""The task spec and the pure graph functions of ``runtime.graph``."""

from __future__ import annotations

import doctest
import operator
import pickle
import random
from operator import add, neg
from typing import Any

import pytest

from runtime import graph
from runtime.errors import CycleError, GraphError
from runtime.graph import (
    apply,
    cull,
    execute_task,
    flatten,
    fuse_linear,
    get_dependencies,
    get_deps,
    getcycle,
    iskey,
    istask,
    literal,
    order,
    quote,
    subs,
    toposort,
)


def inc(x):
    return x + 1


def run(dsk, key):
    """Reference executor: every key in topological order, nothing released."""
    cache: dict[Any, Any] = {}
    for k in toposort(dsk):
        cache[k] = execute_task(dsk[k], cache)
    return cache[key]


def tree_reduction(leaves):
    """A binary tree: ``leaves`` inc tasks summed pairwise; returns (dsk, root)."""
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


def chain(n):
    dsk: dict[Any, Any] = {"c0": 0}
    for i in range(1, n):
        dsk[f"c{i}"] = (inc, f"c{i - 1}")
    return dsk


def peak_held_in_order(dsk, priorities):
    """Results held at once when running one task at a time in priority order."""
    deps, dependents = get_deps(dsk)
    remaining = {k: len(v) for k, v in dependents.items()}
    held = set()
    peak = 0
    for key in sorted(dsk, key=priorities.__getitem__):
        held.add(key)
        for d in deps[key]:
            remaining[d] -= 1
            if not remaining[d]:
                held.discard(d)
        peak = max(peak, len(held))
    return peak


def test_doctests_pass():
    result = doctest.testmod(graph, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_names_are_sorted_and_exist():
    assert graph.__all__ == sorted(graph.__all__)
    for name in graph.__all__:
        assert hasattr(graph, name)


# ------------------------------------------------------------------------ the spec


def test_istask_needs_a_tuple_with_a_callable_first():
    assert istask((inc, 1))
    assert not istask((1, inc))
    assert not istask(())
    assert not istask([inc, 1])
    assert not istask(("x", 0))


def test_iskey_accepts_strings_and_tuples_starting_with_a_string():
    assert iskey("x")
    assert iskey(("x", 0, "a", 2))
    assert not iskey(("x", 0.5))
    assert not iskey((0, "x"))
    assert not iskey(3)
    assert not iskey(None)


def test_execute_task_substitutes_keys_in_args_lists_and_inner_tasks():
    cache = {"x": 1, ("y", 0): 2}
    assert execute_task((add, "x", ("y", 0)), cache) == 3
    assert execute_task((sum, ["x", ("y", 0), (inc, "x")]), cache) == 5
    assert execute_task(["x", ["x", 3]], cache) == [1, [1, 3]]
    assert execute_task("x", cache) == 1  # alias


def test_execute_task_passes_dicts_and_plain_tuples_through_as_literals():
    cache = {"x": 1}
    assert execute_task((lambda d: d, {"k": "x"}), cache) == {"k": "x"}
    assert execute_task((lambda t: t, (1, "x")), cache) == (1, "x")
    assert execute_task("not-a-key", cache) == "not-a-key"


def test_execute_task_evaluates_list_subclasses_like_lists():
    class MyList(list):
        pass

    assert execute_task((sum, MyList(["x", "x"])), {"x": 2}) == 4
    assert execute_task(MyList(["x"]), {"x": 2}) == [2]


def test_execute_task_leaves_unhashable_arguments_alone():
    arg = {"a": [1]}
    assert execute_task((len, arg), {}) == 1


def test_apply_passes_keyword_arguments_built_by_a_dict_task():
    task = (apply, round, [(add, "x", 0.0)], (dict, [["ndigits", "n"]]))
    assert execute_task(task, {"x": 3.14159, "n": 2}) == 3.14
    assert execute_task((apply, inc, [1]), {}) == 2


def test_quote_protects_tasks_lists_and_key_like_values():
    cache = {"x": 1}
    assert execute_task(quote("x"), cache) == "x"
    assert execute_task(quote(["x", "x"]), cache) == ["x", "x"]
    task = (inc, 1)
    assert execute_task(quote(task), cache) is task
    assert execute_task((len, quote(["x"])), cache) == 1


def test_literal_pickles_and_has_a_short_repr():
    lit = literal([1, 2])
    assert repr(lit) == "literal<type=list>"
    assert pickle.loads(pickle.dumps(lit))() == [1, 2]


# -------------------------------------------------------------------- dependencies


def test_get_dependencies_finds_keys_where_execution_would_substitute_them():
    dsk = {"x": 1, ("y", 0): 2, "z": (add, "x", [("y", 0), (inc, "x")])}
    assert get_dependencies(dsk, "z") == {"x", ("y", 0)}
    assert get_dependencies(dsk, "z", as_list=True) == ["x", ("y", 0)]
    assert get_dependencies(dsk, task=(len, {"x": "x"})) == set()
    assert get_dependencies(dsk, task="x") == {"x"}
    assert get_dependencies(dsk, task=("y", 0)) == {("y", 0)}


def test_get_dependencies_of_an_unknown_key_is_a_graph_error():
    with pytest.raises(GraphError, match=r"'yy' is not in the graph.*did you mean 'y'"):
        get_dependencies({"y": 1}, "yy")
    with pytest.raises(GraphError, match="needs a key or a task"):
        get_dependencies({"y": 1})


def test_get_deps_returns_dependencies_and_dependents():
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}
    deps, dependents = get_deps(dsk)
    assert deps == {"a": set(), "b": {"a"}, "c": {"a", "b"}}
    assert dependents == {"a": {"b", "c"}, "b": {"c"}, "c": set()}


# ---------------------------------------------------------------- cycles and order


def test_toposort_puts_dependencies_first():
    dsk, _ = tree_reduction(16)
    position = {k: i for i, k in enumerate(toposort(dsk))}
    assert len(position) == len(dsk)
    deps, _ = get_deps(dsk)
    for k, ds in deps.items():
        assert all(position[d] < position[k] for d in ds)


def test_toposort_keeps_graph_order_among_independent_keys():
    dsk = {"b": 1, "a": 2, "c": 3}
    assert toposort(dsk) == ["b", "a", "c"]


def test_toposort_reports_a_cycle_as_a_path():
    dsk = {"a": (inc, "b"), "b": (inc, "c"), "c": (inc, "a"), "d": 1, "e": (inc, "d")}
    with pytest.raises(CycleError) as info:
        toposort(dsk)
    assert "'a' -> 'b' -> 'c' -> 'a'" in str(info.value)
    assert info.value.cycle == ["a", "b", "c", "a"]


def test_toposort_names_the_task_and_the_missing_dependency():
    with pytest.raises(GraphError, match=r"task 'b' depends on 'a', which is not in the graph"):
        toposort({"b": (inc, "a")}, dependencies={"b": ["a"]})


def test_getcycle_finds_self_loops_and_returns_nothing_for_a_dag():
    assert getcycle({"a": (inc, "a")}, "a") == ["a", "a"]
    assert getcycle({"a": 1, "b": (inc, "a")}, None) == []
    dsk = {"x": (inc, "y"), "y": (inc, "x"), "z": 1}
    assert getcycle(dsk, ["z"]) == []
    assert getcycle(dsk, None) == ["x", "y", "x"]


def test_functions_handle_a_100k_chain_without_recursion():
    dsk = chain(100_000)
    assert toposort(dsk)[-1] == "c99999"
    assert order(dsk)["c99999"] == 99_999
    assert getcycle(dsk, "c99999") == []
    culled, _ = cull(dsk, "c99999")
    assert len(culled) == 100_000


def test_order_is_a_topological_order_on_random_dags():
    rng = random.Random(1234)
    for _ in range(20):
        n = rng.randint(1, 60)
        dsk: dict[Any, Any] = {}
        for i in range(n):
            picked = rng.sample(range(i), k=min(i, rng.randint(0, 3)))
            dsk[f"k{i}"] = (sum, [f"k{d}" for d in picked])
        priorities = order(dsk)
        assert sorted(priorities.values()) == list(range(n))
        deps, _ = get_deps(dsk)
        for k, ds in deps.items():
            assert all(priorities[d] < priorities[k] for d in ds)


def test_order_finishes_a_branch_before_starting_another():
    dsk = {
        "a": 1,
        "b": 2,
        "c": 3,
        "d": 4,
        "ab": (add, "a", "b"),
        "cd": (add, "c", "d"),
        "abcd": (add, "ab", "cd"),
    }
    assert sorted(dsk, key=order(dsk).__getitem__) == ["a", "b", "ab", "c", "d", "cd", "abcd"]


def test_order_holds_depth_not_width_on_a_tree_reduction():
    dsk, _ = tree_reduction(4096)
    assert peak_held_in_order(dsk, order(dsk)) <= 13  # depth 12, plus the result


def test_order_runs_the_most_demanding_dependency_first():
    # 'big' needs three results at once, 'small' one: doing 'big' first means
    # holding one result ('big') while 'small' runs, instead of 'small' during 'big'.
    dsk, root = tree_reduction(4)
    dsk["small"] = (inc, 0)
    dsk["top"] = (add, "small", root)
    priorities = order(dsk)
    assert priorities[root] < priorities["small"]
    assert peak_held_in_order(dsk, priorities) == 3


def test_order_consumes_a_shared_result_as_soon_as_possible():
    # x_i feeds y_i and z_i; running z_i right after y_i lets x_i go at once.
    n = 50
    dsk: dict[Any, Any] = {}
    for i in range(n):
        dsk[f"x{i}"] = (inc, i)
        dsk[f"y{i}"] = (inc, f"x{i}")
        dsk[f"z{i}"] = (neg, f"x{i}")
    dsk["total"] = (sum, [f"y{i}" for i in range(n)] + [f"z{i}" for i in range(n)])
    priorities = order(dsk)
    for i in range(n):
        assert priorities[f"z{i}"] - priorities[f"x{i}"] <= 2
    assert peak_held_in_order(dsk, priorities) <= 2 * n + 2


def test_order_is_deterministic():
    dsk, _ = tree_reduction(64)
    assert order(dsk) == order(dict(dsk))


def test_order_raises_cycle_error():
    with pytest.raises(CycleError, match="'a' -> 'b' -> 'a'"):
        order({"a": (inc, "b"), "b": (inc, "a"), "c": 1})


# ---------------------------------------------------------------- optimizations


def test_flatten_walks_nested_lists_and_keeps_tuple_keys_whole():
    assert list(flatten([["a", ("b", 1)], [], [["c"]], "d"])) == ["a", ("b", 1), "c", "d"]
    assert list(flatten("a")) == ["a"]
    assert list(flatten(("b", 1))) == [("b", 1)]


def test_subs_replaces_references_but_not_dict_contents():
    task = (add, "x", [("x", 0), "x", (inc, "x")], {"x": "x"})
    assert subs(task, "x", 5) == (add, 5, [("x", 0), 5, (inc, 5)], {"x": "x"})
    assert subs(("x", 0), ("x", 0), 7) == 7
    assert subs((len, ("x", [1])), ("x", 0), 7) == (len, ("x", [1]))


def test_cull_keeps_only_what_the_keys_need():
    dsk = {"a": 1, "b": (inc, "a"), "c": (inc, "b"), "unused": (inc, "a")}
    culled, deps = cull(dsk, [["c"]])
    assert set(culled) == {"a", "b", "c"}
    assert deps == {"c": ["b"], "b": ["a"], "a": []}


def test_cull_rejects_a_missing_key_and_suggests_close_ones():
    with pytest.raises(GraphError, match=r"requested key 'sum-1' is not in the graph.*'sum-2'"):
        cull({"sum-2": 1}, "sum-1")
    with pytest.raises(GraphError, match="unhashable"):
        cull({"a": 1}, [["a"], {"x": 1}])


def test_fuse_linear_merges_a_chain_into_its_last_key():
    dsk = {"a": 1, "b": (inc, "a"), "c": (neg, "b"), "d": (inc, "c")}
    fused, deps = fuse_linear(dsk, keys=["d"])
    assert list(fused) == ["d"]
    assert deps == {"d": set()}
    assert run(fused, "d") == run(dsk, "d") == -1


def test_fuse_linear_never_fuses_away_a_requested_key():
    dsk = {"a": 1, "b": (inc, "a"), "c": (neg, "b"), "d": (inc, "c")}
    fused, deps = fuse_linear(dsk, keys=["b", "d"])
    assert set(fused) == {"b", "d"}
    assert deps["d"] == {"b"}
    assert run(fused, "b") == 2
    assert run(fused, "d") == -1


def test_fuse_linear_leaves_shared_results_and_joins_alone():
    dsk = {"a": 1, "b": (inc, "a"), "c": (neg, "a"), "d": (add, "b", "c")}
    fused, _ = fuse_linear(dsk, keys=["d"])
    assert fused == dsk
    dsk2 = {"a": 1, "b": 2, "c": (add, "a", "b"), "d": (inc, "c")}
    fused2, deps2 = fuse_linear(dsk2, keys=["d"])
    assert set(fused2) == {"a", "b", "d"}
    assert deps2["d"] == {"a", "b"}
    assert run(fused2, "d") == 4


def test_fuse_linear_does_not_duplicate_work_referenced_twice():
    dsk = {"a": (inc, 1), "b": (add, "a", "a")}
    fused, _ = fuse_linear(dsk, keys=["b"])
    assert fused == dsk


def test_fuse_linear_inlines_aliases_and_literals_without_changing_meaning():
    dsk = {"a": ["x-literal"], "b": "a", "c": (len, "b"), "d": {"k": "v"}, "e": (len, "d")}
    fused, _ = fuse_linear(dsk, keys=["c", "e"])
    assert set(fused) == {"c", "e"}
    assert run(fused, "c") == run(dsk, "c") == 1
    assert run(fused, "e") == run(dsk, "e") == 1


def test_fuse_linear_splits_long_chains_so_fused_tasks_stay_shallow():
    dsk = chain(5000)
    fused, deps = fuse_linear(dsk, keys=["c4999"], max_length=50)
    assert len(fused) == 100
    assert all(len(v) <= 1 for v in deps.values())
    assert run(fused, "c4999") == 4999
    unfused, _ = fuse_linear(dsk, keys=["c4999"], max_length=1)
    assert unfused == dsk


def test_fuse_linear_names_a_missing_dependency():
    with pytest.raises(GraphError, match="task 'b' depends on 'zz'"):
        fuse_linear({"b": (inc, 1)}, dependencies={"b": ["zz"]})


def test_fuse_then_order_still_runs_tree_reductions_correctly():
    dsk, root = tree_reduction(64)
    dsk["final"] = (operator.neg, root)
    fused, deps = fuse_linear(dsk, keys=["final"])
    assert root not in fused
    assert run(fused, "final") == -sum(range(1, 65))
    assert set(order(fused, deps)) == set(fused)
