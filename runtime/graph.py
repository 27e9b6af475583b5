"""The task spec, and pure functions over task graphs.

No state is kept: every function takes plain data (dicts, tuples, lists) and returns
new plain data, so the local schedulers, the distributed scheduler and the
optimizations can share them and tests can call them directly.

The spec is Dask's classic dict form, so existing Dask graphs run unchanged:

- A graph is a dict ``{key: value}``. Keys are strings, or tuples that start with a
  string followed by ints or strings, such as ``('x', 0)`` or ``('x', 1, 2)``.
- A value is a *task*, a *key* (an alias for that key's value), or a literal.
- A task is a tuple whose first element is callable: ``(func, arg1, arg2, ...)``.
  Keyword arguments go through :func:`apply`: ``(apply, func, [args...], kwargs)``,
  where ``kwargs`` is a dict (passed as it is) or the task
  ``(dict, [[name, value], ...])`` (whose names and values are evaluated).
- Arguments are evaluated recursively: a task is run inline, a list is evaluated
  element-wise and stays a list, a hashable argument that is a key of the graph is
  replaced by that key's value, and anything else (including dicts and tuples that
  are not tasks) is passed as it is. Wrap a value with :func:`quote` when it would
  otherwise be read as a task, a list of keys, or a key: any string argument equal
  to a key is that key's value, whatever was meant.

These functions run on every compute, on graphs of 10,000 to 100,000 tasks. Walks
over the graph are iterative, so long chains and deep trees hit no recursion limit
(only the nesting inside one task is walked recursively), and they avoid per-task
work they do not need.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

from runtime.errors import CycleError, GraphError

__all__ = [
    "Key",
    "apply",
    "cull",
    "execute_task",
    "flatten",
    "fuse_linear",
    "get_dependencies",
    "get_deps",
    "getcycle",
    "iskey",
    "istask",
    "literal",
    "order",
    "quote",
    "subs",
    "toposort",
]

Key: TypeAlias = Any
"""A graph key: ``'x'`` or ``('x', 0)``; any hashable is accepted where a key is.

Typed as ``Any`` rather than ``Hashable`` because containers are invariant: a
``dict[str, ...]`` graph must be accepted where a ``Mapping[Key, ...]`` is expected.
"""

_NO_TASK = object()


# --------------------------------------------------------------------------- the spec


def istask(x: Any) -> bool:
    """Return whether ``x`` is a task: a tuple whose first element is callable.

    Examples
    --------
    >>> from operator import add
    >>> istask((add, 1, 2))
    True
    >>> istask(('x', 0))
    False
    >>> istask([add, 1, 2])
    False
    """
    return type(x) is tuple and bool(x) and callable(x[0])


def iskey(x: Any) -> bool:
    """Return whether ``x`` has the shape of a key: a str, or a tuple of a str then ints/strs.

    Examples
    --------
    >>> iskey('x'), iskey(('x', 0)), iskey(('x', 1, 'a'))
    (True, True, True)
    >>> iskey(1), iskey((0, 'x')), iskey(['x'])
    (False, False, False)
    """
    typ = type(x)
    if typ is str:
        return True
    if typ is tuple and x and type(x[0]) is str:
        return all(type(part) is str or (type(part) is int) for part in x[1:])
    return False


class literal:
    """A value the executor must return as it is, never read as a task or a key.

    Calling it returns the value, so ``(literal(value),)`` is a task that produces
    ``value``; :func:`quote` builds exactly that.
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __call__(self) -> Any:
        return self.data

    def __repr__(self) -> str:
        return f"literal<type={type(self.data).__name__}>"

    def __reduce__(self) -> tuple:
        return (literal, (self.data,))


def quote(x: Any) -> tuple:
    """Wrap ``x`` so that running it yields ``x`` itself.

    Use it for values that would otherwise be misread: tuples whose first element is
    callable, lists (evaluated element-wise), and values equal to a key of the graph.

    Examples
    --------
    >>> from operator import add
    >>> quote((add, 1, 2))
    (literal<type=tuple>,)
    >>> execute_task(quote((add, 1, 2)), {})[1:]
    (1, 2)
    >>> execute_task(quote('x'), {'x': 10})
    'x'
    """
    return (literal(x),)


def apply(func: Callable, args: Iterable[Any], kwargs: Mapping[str, Any] | None = None) -> Any:
    """Call ``func(*args, **kwargs)``: the task form of a call with keyword arguments.

    Examples
    --------
    >>> execute_task((apply, round, [3.14159], (dict, [['ndigits', 2]])), {})
    3.14
    """
    if kwargs:
        return func(*args, **kwargs)
    return func(*args)


def execute_task(task: Any, cache: Mapping[Key, Any]) -> Any:
    """Evaluate ``task`` with the values of other keys taken from ``cache``.

    Parameters
    ----------
    task
        A task, a list, a key or a literal (see the module docstring).
    cache
        Values of the keys the task refers to.

    Returns
    -------
    object
        The value of the task.

    Examples
    --------
    >>> from operator import add
    >>> execute_task((add, 'x', 10), {'x': 1})
    11
    >>> execute_task([(add, 'x', 1), 'y', 'z'], {'x': 1, 'y': 2})
    [2, 2, 'z']
    >>> execute_task({'x': 'x'}, {'x': 1})  # dicts are literals
    {'x': 'x'}
    """
    if type(task) is tuple and task and callable(task[0]):
        args = []
        for arg in task[1:]:
            typ = type(arg)
            if typ is tuple:
                if arg and callable(arg[0]):
                    args.append(execute_task(arg, cache))
                    continue
            elif typ is list:
                args.append([execute_task(a, cache) for a in arg])
                continue
            try:
                args.append(cache.get(arg, arg))
            except TypeError:  # unhashable: a literal, unless a list subclass
                args.append(execute_task(arg, cache) if isinstance(arg, list) else arg)
        return task[0](*args)
    if type(task) is list:
        return [execute_task(a, cache) for a in task]
    try:
        return cache.get(task, task)
    except TypeError:  # unhashable: a literal, unless a list subclass
        if isinstance(task, list):
            return [execute_task(a, cache) for a in task]
        return task


# ---------------------------------------------------------------------- dependencies


def _keys_in(value: Any, keys: Collection[Key]) -> list[Key]:
    """Return the keys of ``keys`` that ``value`` refers to, in order of first use.

    This is the one definition of "refers to": exactly the arguments that
    :func:`execute_task` would replace by a value from its cache. A key used twice
    is listed twice (callers that count edges count it twice on both ends, which
    stays consistent, and deduplicating every task costs more than it saves).
    """
    typ = type(value)
    if typ is tuple and value and callable(value[0]):
        args: Iterable[Any] = value[1:]
    elif typ is list:
        args = value
    else:
        try:
            return [value] if value in keys else []
        except TypeError:  # unhashable: a literal, unless a list subclass
            if not isinstance(value, list):
                return []
            args = value
    found: list[Key] = []
    nested: list[Any] = []
    for w in args:
        typ = type(w)
        if typ is str:
            if w in keys:
                found.append(w)
        elif typ is tuple and w and callable(w[0]) or typ is list:
            nested.append(w)
        else:
            try:
                if w in keys:
                    found.append(w)
            except TypeError:  # unhashable: a literal, unless a list subclass
                if isinstance(w, list):
                    nested.append(w)
    for w in nested:
        found.extend(_keys_in(w, keys))
    return found


def get_dependencies(
    dsk: Mapping[Key, Any],
    key: Key | None = None,
    task: Any = _NO_TASK,
    as_list: bool = False,
) -> set[Key] | list[Key]:
    """Return the keys of ``dsk`` that a key's value (or a given task) refers to.

    Parameters
    ----------
    dsk
        The graph.
    key
        Look at ``dsk[key]``.
    task
        Look at this value instead of a key's.
    as_list
        Return a list in order of first use instead of a set.

    Returns
    -------
    set or list
        The dependencies.

    Examples
    --------
    >>> from operator import add
    >>> dsk = {'x': 1, 'y': (add, 'x', 'x'), 'z': (add, 'y', [('x', 0), 'y'])}
    >>> sorted(get_dependencies(dsk, 'y'))
    ['x']
    >>> get_dependencies(dsk, task=(add, 'z', {'x': 'x'}), as_list=True)
    ['z']
    """
    if key is not None:
        try:
            task = dsk[key]
        except KeyError:
            raise GraphError(f"key {key!r} is not in the graph{_did_you_mean(key, dsk)}") from None
    elif task is _NO_TASK:
        raise GraphError("get_dependencies needs a key or a task= to look at")
    found = _keys_in(task, dsk)
    return list(dict.fromkeys(found)) if as_list else set(found)


def get_deps(dsk: Mapping[Key, Any]) -> tuple[dict[Key, set[Key]], dict[Key, set[Key]]]:
    """Return ``(dependencies, dependents)`` of every key of ``dsk``.

    Examples
    --------
    >>> from operator import add
    >>> deps, dependents = get_deps({'a': 1, 'b': (add, 'a', 1), 'c': (add, 'b', 'a')})
    >>> sorted(deps['c']), sorted(dependents['a'])
    (['a', 'b'], ['b', 'c'])
    """
    dependencies = {k: set(_keys_in(v, dsk)) for k, v in dsk.items()}
    dependents: dict[Key, set[Key]] = {k: set() for k in dsk}
    for k, deps in dependencies.items():
        for d in deps:
            dependents[d].add(k)
    return dependencies, dependents


def _reverse(
    dependencies: Mapping[Key, Collection[Key]],
) -> dict[Key, list[Key]]:
    """Return the dependents of every key, checking each dependency is a key."""
    dependents: dict[Key, list[Key]] = {k: [] for k in dependencies}
    for k, deps in dependencies.items():
        for d in deps:
            try:
                dependents[d].append(k)
            except KeyError:
                raise _missing_dependency(k, d, dependencies) from None
    return dependents


def _missing_dependency(key: Key, dep: Key, known: Collection[Key]) -> GraphError:
    return GraphError(
        f"task {key!r} depends on {dep!r}, which is not in the graph{_did_you_mean(dep, known)}; "
        "add it to the graph or pass its value in the cache"
    )


def _did_you_mean(key: Key, known: Iterable[Key], limit: int = 2_000) -> str:
    """Suggest close keys, on the error path only (bounded so huge graphs stay quick)."""
    names: dict[str, Key] = {}
    for i, k in enumerate(known):
        if i >= limit:
            break
        names.setdefault(str(k), k)
    close = difflib.get_close_matches(str(key), list(names), n=3)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(names[c]) for c in close) + "?)"


# ----------------------------------------------------------------- order and cycles


def _format_cycle(cycle: list[Key]) -> str:
    return " -> ".join(repr(k) for k in cycle)


def _cycle_error(cycle: list[Key]) -> CycleError:
    return CycleError(
        f"the task graph has a cycle: {_format_cycle(cycle)} (each key needs the next), "
        "so none of these tasks can ever run; break the cycle by removing one of "
        "these dependencies",
        cycle,
    )


def getcycle(
    dsk: Mapping[Key, Any],
    keys: Key | list | None,
    *,
    dependencies: Mapping[Key, Collection[Key]] | None = None,
) -> list[Key]:
    """Return a cycle reachable from ``keys`` as a path, or ``[]`` if there is none.

    The path starts and ends with the same key; each key needs the next one.

    Parameters
    ----------
    dsk
        The graph.
    keys
        A key, a (nested) list of keys to start from, or ``None`` for every key.
    dependencies
        Precomputed dependencies of ``dsk``'s keys, if you have them.

    Examples
    --------
    >>> from operator import add
    >>> dsk = {'a': (add, 'b', 1), 'b': (add, 'c', 1), 'c': (add, 'a', 1), 'd': 1}
    >>> getcycle(dsk, 'a')
    ['a', 'b', 'c', 'a']
    >>> getcycle(dsk, 'd')
    []
    """
    if keys is None:
        starts: list[Key] = list(dsk)
    else:
        starts = list(flatten(keys))

    def deps_of(k: Key) -> Collection[Key]:
        if dependencies is not None:
            return dependencies.get(k, ())
        return _keys_in(dsk[k], dsk) if k in dsk else ()

    done: set[Key] = set()
    for start in starts:
        if start in done or start not in dsk:
            continue
        path = [start]
        on_path = {start: 0}
        iters = [iter(deps_of(start))]
        while path:
            for d in iters[-1]:
                if d in on_path:
                    return path[on_path[d] :] + [d]
                if d not in done:
                    on_path[d] = len(path)
                    path.append(d)
                    iters.append(iter(deps_of(d)))
                    break
            else:
                k = path.pop()
                iters.pop()
                del on_path[k]
                done.add(k)
    return []


def toposort(
    dsk: Mapping[Key, Any],
    dependencies: Mapping[Key, Collection[Key]] | None = None,
) -> list[Key]:
    """Return the keys of ``dsk`` so that every key comes after its dependencies.

    Raises
    ------
    CycleError
        If the graph has a cycle; the message shows it as a path.
    GraphError
        If ``dependencies`` names a key that is not in the graph.

    Examples
    --------
    >>> from operator import add
    >>> toposort({'c': (add, 'b', 1), 'b': (add, 'a', 1), 'a': 1})
    ['a', 'b', 'c']
    >>> toposort({'a': (add, 'b', 1), 'b': (add, 'a', 1)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    runtime.errors.CycleError: the task graph has a cycle: 'a' -> 'b' -> 'a' ...
    """
    if dependencies is None:
        dependencies = {k: _keys_in(v, dsk) for k, v in dsk.items()}
    dependents = _reverse(dependencies)
    waiting = {k: len(v) for k, v in dependencies.items()}
    # Reversed so that, among independent keys, graph order is kept.
    stack = [k for k, n in waiting.items() if not n]
    stack.reverse()
    out: list[Key] = []
    while stack:
        k = stack.pop()
        out.append(k)
        for child in reversed(dependents[k]):
            n = waiting[child] - 1
            waiting[child] = n
            if not n:
                stack.append(child)
    if len(out) < len(dependencies):
        raise _cycle_error(_find_cycle(dsk, dependencies, waiting))
    return out


def _find_cycle(
    dsk: Mapping[Key, Any],
    dependencies: Mapping[Key, Collection[Key]],
    waiting: Mapping[Key, int],
) -> list[Key]:
    """Return a cycle among the keys a topological pass could not reach."""
    stuck = [k for k, n in waiting.items() if n]
    return getcycle(dsk, stuck, dependencies=dependencies)


def order(
    dsk: Mapping[Key, Any],
    dependencies: Mapping[Key, Collection[Key]] | None = None,
    dependents: Mapping[Key, Collection[Key]] | None = None,
) -> dict[Key, int]:
    """Return a priority for each key (lower runs first) that keeps memory use low.

    The policy: walk depth-first from the results, finishing one branch before
    starting another, so a tree reduction holds ``O(depth)`` intermediate results
    rather than ``O(width)``.

    - Among a task's dependencies, the one whose subgraph needs to hold the most
      results at once goes first (Sethi-Ullman order); ties keep graph order.
    - As soon as every dependency of a task has a priority, the task gets the next
      one, so a result with several dependents is consumed, and can be released,
      as early as possible.

    Priorities are a topological order: every key's dependencies come before it.

    Parameters
    ----------
    dsk
        The graph.
    dependencies
        Its dependencies, if already known (for instance from :func:`cull`).
    dependents
        Accepted for symmetry with the other functions; derived from
        ``dependencies``.

    Returns
    -------
    dict
        ``{key: priority}``, the priorities being ``0..len(dsk) - 1``.

    Raises
    ------
    CycleError
        If the graph has a cycle.
    GraphError
        If ``dependencies`` names a key that is not in the graph.

    Examples
    --------
    >>> from operator import add
    >>> dsk = {'a': 1, 'b': 2, 'c': 3, 'd': 4,
    ...        'ab': (add, 'a', 'b'), 'cd': (add, 'c', 'd'), 'abcd': (add, 'ab', 'cd')}
    >>> o = order(dsk)
    >>> sorted(dsk, key=o.__getitem__)
    ['a', 'b', 'ab', 'c', 'd', 'cd', 'abcd']
    """
    if dependencies is None:
        dependencies = {k: _keys_in(v, dsk) for k, v in dsk.items()}
    keys = list(dependencies)
    index = {k: i for i, k in enumerate(keys)}
    deps: list[list[int]] = []
    for k in keys:
        try:
            deps.append([index[d] for d in dependencies[k]])
        except KeyError:
            missing = next(d for d in dependencies[k] if d not in index)
            raise _missing_dependency(k, missing, keys) from None
    priorities, stuck = _priorities(deps, _dependents_of(deps))
    if stuck:
        cycle = getcycle(dsk, [keys[i] for i in stuck], dependencies=dependencies)
        raise _cycle_error(cycle)
    return dict(zip(keys, priorities, strict=True))


def _dependents_of(deps: list[list[int]]) -> list[list[int]]:
    """Invert integer dependency lists."""
    dependents: list[list[int]] = [[] for _ in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(i)
    return dependents


def _priorities(deps: list[list[int]], dependents: list[list[int]]) -> tuple[list[int], list[int]]:
    """Compute :func:`order` on a graph whose keys are ``0..n-1``.

    Lower numbers are preferred on ties (the caller numbers keys in graph order).
    Returns ``(priorities, [])``, or ``([], stuck)`` with the keys that a cycle
    keeps from ever running.
    """
    n = len(deps)
    # Bottom-up pass: how many results each key's subgraph must hold at once (its
    # Sethi-Ullman number, approximated on shared nodes), and the order in which to
    # visit its dependencies: most demanding first. Also proves the graph acyclic.
    need = [0] * n
    rank = [0] * n  # sorts by need (descending), then key number
    visit: list[list[int] | None] = [None] * n
    waiting = [len(ds) for ds in deps]
    stack = [i for i in range(n) if not waiting[i]]
    seen = 0
    while stack:
        i = stack.pop()
        seen += 1
        ds = deps[i]
        if not ds:
            need_i = 1
        elif len(ds) == 1:
            need_i = need[ds[0]]
        else:
            ds = visit[i] = sorted(ds, key=rank.__getitem__)
            need_i = max([need[d] + j for j, d in enumerate(ds)])
        need[i] = need_i
        rank[i] = i - need_i * n
        for c in dependents[i]:
            waiting[c] -= 1
            if not waiting[c]:
                stack.append(c)
    if seen < n:
        return [], [i for i in range(n) if waiting[i]]

    # Top-down pass: depth-first from the results; a key is numbered as soon as all
    # of its dependencies are, so a shared result is consumed as early as possible.
    priority = [-1] * n
    count = 0
    unnumbered = [len(ds) for ds in deps]
    roots = sorted((i for i in range(n) if not dependents[i]), key=rank.__getitem__)
    for root in roots:
        if priority[root] >= 0:
            continue
        path = [root]
        iters = [iter(visit[root] or deps[root])]
        while path:
            for d in iters[-1]:
                if priority[d] < 0:
                    path.append(d)
                    iters.append(iter(visit[d] or deps[d]))
                    break
            else:
                k = path.pop()
                iters.pop()
                if priority[k] >= 0:
                    continue
                todo = [k]
                while todo:
                    k = todo.pop()
                    priority[k] = count
                    count += 1
                    for c in dependents[k]:
                        unnumbered[c] -= 1
                        if not unnumbered[c] and priority[c] < 0:
                            todo.append(c)
    return priority, []


# ------------------------------------------------------------------- optimizations


def flatten(nested_keys: Any) -> Iterator[Key]:
    """Yield the keys of a key or a nested list of keys, depth-first, left to right.

    Examples
    --------
    >>> list(flatten([['a', ('b', 0)], [], 'c']))
    ['a', ('b', 0), 'c']
    >>> list(flatten(('x', 1)))
    [('x', 1)]
    """
    if not isinstance(nested_keys, list):
        yield nested_keys
        return
    stack = [iter(nested_keys)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def subs(task: Any, key: Key, val: Any) -> Any:
    """Return ``task`` with every reference to ``key`` replaced by ``val``.

    References are what :func:`execute_task` would look up: arguments of tasks and
    items of lists, not the contents of dicts or of tuples that are not tasks.

    Examples
    --------
    >>> from operator import add
    >>> subs((add, 'x', ['x', {'x': 1}]), 'x', 5)  # doctest: +ELLIPSIS
    (<built-in function add>, 5, [5, {'x': 1}])
    """
    typ = type(task)
    if typ is tuple and task and callable(task[0]):
        return (task[0], *[subs(arg, key, val) for arg in task[1:]])
    if typ is list or isinstance(task, list):
        return [subs(arg, key, val) for arg in task]
    if typ is type(key):
        try:
            if hash(task) == hash(key) and task == key:
                return val
        except TypeError:  # unhashable: a literal
            pass
    return task


def _count_refs(task: Any, key: Key) -> int:
    """Return how many times ``task`` refers to ``key`` (see :func:`subs`)."""
    typ = type(task)
    if typ is tuple and task and callable(task[0]):
        return sum(_count_refs(arg, key) for arg in task[1:])
    if typ is list or isinstance(task, list):
        return sum(_count_refs(arg, key) for arg in task)
    if typ is type(key):
        try:
            return 1 if hash(task) == hash(key) and task == key else 0
        except TypeError:
            return 0
    return 0


def _index_graph(
    dsk: Mapping[Key, Any],
    keys: Iterable[Key],
    done: Mapping[Key, Any] | None = None,
) -> tuple[list[Key], list[list[int]]]:
    """Number the keys needed for ``keys``; return them and their dependencies as numbers.

    Keys are numbered in the order they are found: the requested keys, then
    depth-first through dependencies, first argument first. Keys in ``done`` count
    as computed: they may be referred to and are not traversed (no dependencies).

    Raises
    ------
    GraphError
        If a requested key is not in the graph (nor in ``done``).
    """
    known: Collection[Key] = dsk
    if done:
        known = dsk.keys() | done.keys()
    index: dict[Key, int] = {}
    found: list[Key] = []
    for k in keys:
        try:
            present = k in known
        except TypeError:
            raise GraphError(f"requested key {k!r} is not a valid key (it is unhashable)") from None
        if not present:
            raise GraphError(
                f"requested key {k!r} is not in the graph{_did_you_mean(k, dsk)}; "
                "ask for a key of the graph"
            )
        if k not in index:
            index[k] = len(found)
            found.append(k)
    deps: list[list[int]] = [[] for _ in found]
    stack = list(range(len(found) - 1, -1, -1))
    while stack:
        i = stack.pop()
        k = found[i]
        if done and k in done:
            continue
        ids = []
        new = []
        for d in _keys_in(dsk[k], known):
            j = index.get(d)
            if j is None:
                j = index[d] = len(found)
                found.append(d)
                deps.append([])
                new.append(j)
            ids.append(j)
        deps[i] = ids
        new.reverse()
        stack.extend(new)
    return found, deps


def cull(dsk: Mapping[Key, Any], keys: Key | list) -> tuple[dict[Key, Any], dict[Key, list[Key]]]:
    """Return the part of ``dsk`` needed to compute ``keys``, and its dependencies.

    Parameters
    ----------
    dsk
        The graph.
    keys
        A key or a (nested) list of keys.

    Returns
    -------
    culled : dict
        The needed keys: the requested ones first, then their dependencies
        depth-first.
    dependencies : dict
        For each needed key, the list of keys it depends on.

    Raises
    ------
    GraphError
        If a requested key is not in the graph.

    Examples
    --------
    >>> from operator import add
    >>> dsk = {'x': 1, 'y': (add, 'x', 1), 'unused': (add, 'x', 2)}
    >>> culled, deps = cull(dsk, 'y')
    >>> list(culled), deps['y']
    (['y', 'x'], ['x'])
    """
    found, deps = _index_graph(dsk, flatten(keys))
    culled = {k: dsk[k] for k in found}
    dependencies = {
        k: [found[j] for j in (dict.fromkeys(ds) if len(ds) > 1 else ds)]
        for k, ds in zip(found, deps, strict=True)
    }
    return culled, dependencies


def fuse_linear(
    dsk: Mapping[Key, Any],
    keys: Key | list | None = None,
    dependencies: Mapping[Key, Collection[Key]] | None = None,
    *,
    max_length: int = 64,
) -> tuple[dict[Key, Any], dict[Key, set[Key]]]:
    """Merge linear chains of tasks into single tasks.

    A link ``a -> b`` (``b`` uses ``a``) is fused when ``a`` has ``b`` as its only
    dependent, ``b`` has ``a`` as its only dependency and refers to it once, and
    ``a`` is not in ``keys``. ``a``'s task is inlined into ``b``'s, so a chain
    ``a -> b -> c`` becomes one task under the last key, ``'c'``, and results are
    found where they were.

    Parameters
    ----------
    dsk
        The graph.
    keys
        Keys that must survive (the requested results); never fused away.
    dependencies
        Dependencies of ``dsk``, if already known (for instance from :func:`cull`).
    max_length
        Most tasks folded into one. Longer chains are fused in pieces, which keeps
        fused tasks shallow enough to run and pickle without hitting Python's
        recursion limit.

    Returns
    -------
    dsk : dict
        The fused graph.
    dependencies : dict
        Its dependencies.

    Examples
    --------
    >>> from operator import add, neg
    >>> dsk = {'a': 1, 'b': (add, 'a', 1), 'c': (neg, 'b'), 'd': (add, 'c', 'c')}
    >>> fused, deps = fuse_linear(dsk, keys=['d'])
    >>> sorted(fused), execute_task(fused['c'], {})
    (['c', 'd'], -2)
    """
    if dependencies is None:
        dependencies = {k: _keys_in(v, dsk) for k, v in dsk.items()}
    keep = set(flatten(keys)) if keys is not None else set()

    n_dependents = dict.fromkeys(dependencies, 0)
    for k, deps in dependencies.items():
        for d in deps:
            if d not in n_dependents:
                raise _missing_dependency(k, d, dependencies)
            n_dependents[d] += 1

    parent_of: dict[Key, Key] = {}
    for child, deps in dependencies.items():
        if len(deps) == 1:
            (parent,) = deps
            if (
                n_dependents[parent] == 1
                and parent not in keep
                and _count_refs(dsk[child], parent) == 1
            ):
                parent_of[child] = parent

    fused = dict(dsk)
    new_deps = {k: set(v) for k, v in dependencies.items()}
    parents = set(parent_of.values())
    for end in parent_of:
        if end in parents:
            continue  # not the end of its chain
        chain = [end]
        while chain[-1] in parent_of:
            chain.append(parent_of[chain[-1]])
        chain.reverse()
        for start in range(0, len(chain), max(max_length, 1)):
            piece = chain[start : start + max_length]
            if len(piece) < 2:
                continue
            task = dsk[piece[0]]
            for i in range(1, len(piece)):
                task = subs(dsk[piece[i]], piece[i - 1], task)
            last = piece[-1]
            fused[last] = task
            new_deps[last] = new_deps[piece[0]]
            for k in piece[:-1]:
                del fused[k]
                del new_deps[k]
    return fused, new_deps
