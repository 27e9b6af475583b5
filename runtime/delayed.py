"""Lazy function calls that build a task graph: ``delayed`` and ``Delayed``.

State kept here: a :class:`Delayed` holds its own key, the one task that computes it
(``None`` for a value that is already known), and references to the ``Delayed``
objects it depends on. The full graph is only materialised when something is
computed, by walking those references once; building a graph of ``n`` calls is
therefore ``O(n)``, and a node shared by several results is one entry in the graph and
is computed once.

Tasks use the classic dict-graph spec of :mod:`runtime.graph`: a call ``f(a, b=c)``
becomes ``(f, a)`` or ``(apply, f, [a], (dict, [["b", c]]))`` with dependencies
replaced by their keys. Containers holding ``Delayed`` objects are rebuilt inside the
task (``(tuple, [...])``, ``(dict, [[k, v], ...])``) so their contents become
dependencies. Containers without ``Delayed`` objects are passed as quoted literals,
so a string that happens to equal a key is never mistaken for one.

Keys follow Dask: ``"<name>-<token>"``, where the token is a content hash
(:func:`runtime.tokenize.tokenize`) when the call is pure and a random UUID otherwise.

``Delayed`` implements the collection protocol Dask uses (``__dask_graph__``,
``__dask_keys__``, ``__dask_postcompute__``, ``__dask_postpersist__``,
``__dask_tokenize__``), so schedulers and tools that speak it accept our objects.
"""

from __future__ import annotations

import dataclasses
import operator
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from runtime import graph as _graph
from runtime.tokenize import tokenize

__all__ = ["Delayed", "delayed", "is_delayed", "unpack"]


def _random_token() -> str:
    return uuid.uuid4().hex


def _funcname(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name is None:
        inner = getattr(func, "func", None)  # functools.partial
        name = getattr(inner, "__name__", None) if inner is not None else None
    if name is None:
        name = type(func).__name__
    if name == "<lambda>":
        return "lambda"
    return str(name).lower() if name.isupper() else str(name)


def is_delayed(obj: object) -> bool:
    """Return whether ``obj`` is a :class:`Delayed`."""
    return isinstance(obj, Delayed)


def unpack(expr: Any) -> tuple[Any, list[Delayed]]:
    """Turn a value that may contain ``Delayed`` objects into a task argument.

    Parameters
    ----------
    expr
        Any value; lists, tuples, sets, dicts and dataclass instances are searched
        for ``Delayed`` objects.

    Returns
    -------
    task, dependencies
        ``task`` is the argument as it should appear in a task (literals quoted);
        ``dependencies`` the ``Delayed`` objects it references, in order of first
        appearance.

    Examples
    --------
    >>> unpack(1)
    (1, [])
    >>> x = delayed(1, name="x")
    >>> unpack([x, 2])
    (['x', 2], [Delayed('x')])
    """
    deps: list[Delayed] = []
    task = _to_task_arg(expr, deps, set())
    return task, deps


def _unpack(expr: Any, deps: list[Delayed], seen: set, found: list[bool] | None = None) -> Any:
    """Rebuild ``expr`` as a task argument, appending ``Delayed`` objects to ``deps``.

    ``found[0]`` is set when any ``Delayed`` occurs in ``expr`` (also one already seen).
    """
    if found is None:
        found = [False]
    if isinstance(expr, Delayed):
        found[0] = True
        if expr._key not in seen:
            seen.add(expr._key)
            deps.append(expr)
        return expr._key
    typ = type(expr)
    if typ is list:
        return [_unpack(e, deps, seen, found) for e in expr]
    if typ is tuple:
        return (tuple, [_unpack(e, deps, seen, found) for e in expr])
    if typ in (set, frozenset):
        return (typ, [_unpack(e, deps, seen, found) for e in expr])
    if typ is dict:
        return (
            dict,
            [
                [_unpack(k, deps, seen, found), _unpack(v, deps, seen, found)]
                for k, v in expr.items()
            ],
        )
    if dataclasses.is_dataclass(expr) and not isinstance(expr, type):
        fields = [f.name for f in dataclasses.fields(expr) if f.init]
        kwargs = (dict, [[f, _unpack(getattr(expr, f), deps, seen, found)] for f in fields])
        return (_graph.apply, typ, [], kwargs)
    if typ is str:
        # Inside a rebuilt container a string is data, never a reference to a key.
        return _graph.quote(expr)
    return expr


def _to_task_arg(value: Any, deps: list[Delayed], seen: set) -> Any:
    if isinstance(value, Delayed):
        if value._key not in seen:
            seen.add(value._key)
            deps.append(value)
        return value._key
    if type(value) in (int, float, bool, type(None), bytes):
        return value
    found = [False]
    task = _unpack(value, deps, seen, found)
    if found[0]:
        return task
    # Literal data: quote anything the task spec could misread (strings equal to a
    # key, tuples that look like tasks or keys, containers holding either).
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        return _graph.quote(value)
    return value


def _make_call(
    func: Callable,
    args: tuple,
    kwargs: dict,
    *,
    pure: bool | None,
    key: Any = None,
    name: str | None = None,
    nout: int | None = None,
) -> Delayed:
    deps: list[Delayed] = []
    seen: set = set()
    targs = [_to_task_arg(a, deps, seen) for a in args]
    if key is None:
        prefix = name or _funcname(func)
        token = tokenize(func, args, kwargs) if pure else _random_token()
        key = f"{prefix}-{token}"
    task: tuple
    if kwargs:
        tkw = (dict, [[k, _to_task_arg(v, deps, seen)] for k, v in kwargs.items()])
        task = (_graph.apply, func, targs, tkw)
    else:
        task = (func, *targs)
    return Delayed(key, task, tuple(deps), length=nout)


class Delayed:
    """A lazy value: the result of a task in a graph.

    Operations on it (calls, attribute access, indexing, arithmetic) build new
    ``Delayed`` objects; nothing runs until :meth:`compute` (or
    :func:`runtime.compute.compute`) is called.

    Parameters
    ----------
    key
        The key of this value in the graph.
    task
        The task that computes it, or ``None`` when ``value`` holds it.
    deps
        The ``Delayed`` objects the task refers to by key.
    length
        The number of outputs when built with ``nout=``; enables iteration and
        unpacking.
    """

    __slots__ = ("_key", "_task", "_deps", "_length", "__weakref__")

    def __init__(
        self,
        key: Any,
        task: Any,
        deps: tuple[Delayed, ...] = (),
        length: int | None = None,
    ) -> None:
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_deps", deps)
        object.__setattr__(self, "_length", length)

    # -- collection protocol ------------------------------------------------------
    @property
    def key(self) -> Any:
        """The key of this value in its graph."""
        return self._key

    @property
    def dask(self) -> dict:
        """The graph that computes this value (alias of ``__dask_graph__()``)."""
        return self.__dask_graph__()

    def __dask_graph__(self) -> dict:
        return collect_graph([self])

    def __dask_keys__(self) -> list:
        return [self._key]

    def __dask_layers__(self) -> tuple:
        return (self._key,)

    def __dask_tokenize__(self) -> Any:
        return self._key

    def __hpc_tokenize__(self) -> Any:
        return ("Delayed", self._key)

    def __dask_postcompute__(self) -> tuple[Callable, tuple]:
        return _first, ()

    def __dask_postpersist__(self) -> tuple[Callable, tuple]:
        return _rebuild_persisted, (self._key, self._length)

    # -- computing ------------------------------------------------------------------
    def compute(self, **kwargs: Any) -> Any:
        """Compute this value; keyword arguments as for ``hpc.compute``."""
        from runtime.compute import compute

        (result,) = compute(self, **kwargs)
        return result

    def persist(self, **kwargs: Any) -> Delayed:
        """Compute this value and return a ``Delayed`` holding the result."""
        from runtime.compute import persist

        (result,) = persist(self, **kwargs)
        return result

    def visualize(self, filename: str | None = "mydask", **kwargs: Any) -> Any:
        """Draw this value's graph; see ``hpc.visualize``."""
        from runtime.visualize import visualize

        return visualize(self, filename=filename, **kwargs)

    # -- building -------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"Delayed({self._key!r})"

    def __hash__(self) -> int:
        return hash(self._key)

    def __bool__(self) -> bool:
        raise TypeError(
            "The truth value of a Delayed object is not known until it is computed; "
            "call .compute() first, or move the condition inside a delayed function"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("Delayed objects are immutable; build a new one with a delayed call")

    def __setitem__(self, index: Any, value: Any) -> None:
        raise TypeError("Delayed objects are immutable; build a new one with a delayed call")

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(f"Delayed has no attribute {attr!r}")
        return DelayedAttr(self, attr)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(type(self))) | {"key", "dask"})

    def __iter__(self) -> Iterator[Delayed]:
        if self._length is None:
            raise TypeError(
                "Delayed objects of unspecified length are not iterable; "
                "pass nout= to delayed(...) to unpack its results"
            )
        return iter([operator.getitem(self, i) for i in range(self._length)])

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError(
                "Delayed objects of unspecified length have no len(); pass nout= to delayed"
            )
        return self._length

    def __call__(self, *args: Any, pure: bool | None = None, **kwargs: Any) -> Delayed:
        name = kwargs.pop("dask_key_name", None)
        return _make_call(_call_value, (self, *args), kwargs, pure=pure, key=name)


def _call_value(func: Callable, *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


def _call_method(obj: Any, attr: str, *args: Any, **kwargs: Any) -> Any:
    return getattr(obj, attr)(*args, **kwargs)


def _first(results: Any) -> Any:
    return results[0]


def _rebuild_persisted(dsk: dict, key: Any, length: int | None) -> Delayed:
    value = dsk[key]
    return Delayed(key, _Value(value), (), length=length)


class _Value:
    """Marks a Delayed whose task is a known value (a literal or a persisted result)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class DelayedAttr(Delayed):
    """``obj.attr`` on a Delayed: a getattr task, or one method-call task when called."""

    __slots__ = ("_obj", "_attr")

    def __init__(self, obj: Delayed, attr: str) -> None:
        key = f"getattr-{tokenize(obj._key, attr)}"
        super().__init__(key, (getattr, obj._key, attr), (obj,))
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_attr", attr)

    def __call__(self, *args: Any, pure: bool | None = None, **kwargs: Any) -> Delayed:
        name = kwargs.pop("dask_key_name", None)
        return _make_call(
            _call_method,
            (self._obj, self._attr, *args),
            kwargs,
            pure=pure,
            key=name,
            name=self._attr,
        )


def _bind_operator(op: Callable) -> None:
    name = op.__name__.strip("_")

    def binary(self: Delayed, other: Any) -> Delayed:
        return _make_call(op, (self, other), {}, pure=True, name=name)

    def reflected(self: Delayed, other: Any) -> Delayed:
        return _make_call(op, (other, self), {}, pure=True, name=name)

    def unary(self: Delayed) -> Delayed:
        return _make_call(op, (self,), {}, pure=True, name=name)

    dunder = f"__{name}__"
    if op in (operator.neg, operator.pos, operator.invert, operator.abs):
        setattr(Delayed, dunder, unary)
    else:
        setattr(Delayed, dunder, binary)
        if op not in _NO_REFLECTION:
            setattr(Delayed, f"__r{name}__", reflected)


_NO_REFLECTION = {
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.getitem,
}

for _op in (
    operator.add,
    operator.sub,
    operator.mul,
    operator.matmul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.lshift,
    operator.rshift,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.getitem,
    operator.neg,
    operator.pos,
    operator.invert,
    operator.abs,
):
    _bind_operator(_op)

# Comparison dunders make Delayed unhashable unless __hash__ is restated.
Delayed.__hash__ = Delayed.__hash__  # type: ignore[method-assign]


class DelayedFunction:
    """A function wrapped by :func:`delayed`: calling it returns a :class:`Delayed`.

    Per-call keyword arguments ``dask_key_name=`` (or ``key=``... reserved only when
    the function itself has no such parameter) and ``pure=`` override the wrapper's.
    """

    __slots__ = ("func", "pure", "name", "nout", "__dict__")

    def __init__(
        self, func: Callable, pure: bool | None, name: str | None, nout: int | None
    ) -> None:
        self.func = func
        self.pure = pure
        self.name = name
        self.nout = nout
        self.__doc__ = getattr(func, "__doc__", None)
        self.__name__ = getattr(func, "__name__", _funcname(func))
        self.__wrapped__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Delayed:
        key = kwargs.pop("dask_key_name", None)
        pure = kwargs.pop("pure", self.pure)
        return _make_call(
            self.func, args, kwargs, pure=pure, key=key, name=self.name, nout=self.nout
        )

    def __repr__(self) -> str:
        return f"delayed({self.func!r})"

    def __reduce__(self) -> tuple:
        return DelayedFunction, (self.func, self.pure, self.name, self.nout)

    def __hpc_tokenize__(self) -> Any:
        return ("DelayedFunction", tokenize(self.func), self.pure, self.name, self.nout)


def delayed(
    obj: Any = None,
    name: str | None = None,
    pure: bool | None = None,
    nout: int | None = None,
    key: Any = None,
    traverse: bool = True,
    checkpoint: bool = True,
) -> Any:
    """Wrap a function or a value so that using it builds a task graph.

    Parameters
    ----------
    obj
        A function (calls become tasks) or any value (becomes a graph node).
        Omit it to use ``delayed(...)`` as a decorator with options.
    name
        Key prefix for calls of a function; for a value, its full key.
    pure
        When true, keys are content hashes of the function and its arguments, so
        equal calls share one node and repeated runs produce the same keys. The
        default (``None``/``False``) gives every call a unique key, as Dask does.
    nout
        Number of outputs of each call, so results can be unpacked
        (``a, b = f(x)``).
    key
        Exact key for a wrapped value (same as ``name`` for values).
    traverse
        Search containers given as ``obj`` for ``Delayed`` objects.
    checkpoint
        ``False`` marks the function impure for checkpoints: its calls are never
        checkpointed nor read from checkpoints, and neither is anything computed from
        their results (see :mod:`runtime.checkpoint`).

    Returns
    -------
    DelayedFunction or Delayed

    Examples
    --------
    >>> @delayed
    ... def inc(x):
    ...     return x + 1
    >>> inc(inc(1)).compute(scheduler="sync")
    3
    >>> total = delayed(sum)([inc(i) for i in range(3)])
    >>> total.compute(scheduler="sync")
    6
    """
    if obj is None:

        def decorator(func: Callable) -> Any:
            return delayed(
                func,
                name=name,
                pure=pure,
                nout=nout,
                key=key,
                traverse=traverse,
                checkpoint=checkpoint,
            )

        return decorator
    if isinstance(obj, Delayed):
        return obj
    if isinstance(obj, DelayedFunction):
        return obj
    if callable(obj) and not isinstance(obj, type) or isinstance(obj, type):
        if nout is not None and (not isinstance(nout, int) or nout < 0):
            raise ValueError(f"nout must be a non-negative int, got {nout!r}")
        if not checkpoint:
            from runtime.checkpoint import uncheckpointed

            obj = uncheckpointed(obj)
        return DelayedFunction(obj, pure=pure, name=name, nout=nout)
    # A plain value (possibly a container holding Delayed objects).
    deps: list[Delayed] = []
    task = _unpack(obj, deps, set()) if traverse else obj
    vkey = key if key is not None else name
    if vkey is None:
        vkey = f"{type(obj).__name__}-{tokenize(obj)}" if not deps else None
    if deps:
        if vkey is None:
            vkey = f"{type(obj).__name__}-{tokenize(*[d._key for d in deps], _random_token())}"
        return Delayed(vkey, task, tuple(deps), length=nout)
    return Delayed(vkey, _Value(obj), (), length=nout)


def collect_graph(objs: list[Delayed]) -> dict:
    """Materialise the graph of several ``Delayed`` objects into one dict.

    Shared dependencies appear once. Known values (literals, persisted results) are
    stored quoted so the executor returns them as they are.
    """
    dsk: dict = {}
    stack = list(objs)
    while stack:
        d = stack.pop()
        k = d._key
        if k in dsk:
            continue
        task = d._task
        if isinstance(task, _Value):
            value = task.value
            dsk[k] = _graph.quote(value) if _needs_quote(value) else value
        else:
            dsk[k] = task
        for dep in d._deps:
            if dep._key not in dsk:
                stack.append(dep)
    return dsk


def _needs_quote(value: Any) -> bool:
    if isinstance(value, (list, tuple, dict, set, frozenset, str)):
        return True
    return callable(value)
