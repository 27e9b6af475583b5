"""Computing lazy collections: ``compute``, ``persist`` and scheduler selection.

No state is kept here. :func:`compute` gathers the graphs of every collection it is
given into one dict (so shared nodes run once), optionally optimises it (culling to
the requested keys, fusing linear chains), hands it to a scheduler function
``get(dsk, keys)`` and finishes each collection with its ``__dask_postcompute__``.

Which scheduler runs the graph, first match wins:

1. the ``scheduler=`` argument: a name (``"sync"``, ``"threads"``, ``"processes"``,
   ``"distributed"``), a ``get``-style callable, or an object with a ``get`` method
   (a ``Client``);
2. the ``scheduler`` config value (``hpc.config.set(scheduler="processes")``);
3. the active distributed ``Client``, if any;
4. the threaded scheduler.

Collections are any objects implementing Dask's collection protocol
(``__dask_graph__``, ``__dask_keys__``, ``__dask_postcompute__``); other arguments
are passed through unchanged.

With ``checkpoint=DIR`` (or the ``checkpoint.directory`` config value) task results
are checkpointed (:mod:`runtime.checkpoint`): the graph is culled but not fused (so
that every task's result is a checkpoint of its own), identity tokens are computed,
then a local scheduler runs the graph cut at the valid checkpoints (saving every
other result), or a ``Client`` sends the tokens along with the graph for its
scheduler and workers to do the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from runtime import config, local
from runtime import graph as _graph
from runtime.delayed import Delayed, collect_graph
from runtime.errors import ConfigError

__all__ = ["compute", "get_scheduler", "is_collection", "persist"]

_LOCAL = {
    "sync": local.get_sync,
    "synchronous": local.get_sync,
    "single-threaded": local.get_sync,
    "threads": local.get_threads,
    "threading": local.get_threads,
    "processes": local.get_processes,
    "multiprocessing": local.get_processes,
}
_DISTRIBUTED = ("distributed", "dask.distributed", "client")


def is_collection(obj: object) -> bool:
    """Return whether ``obj`` implements the task-graph collection protocol."""
    if isinstance(obj, type):
        return False
    try:
        method = obj.__dask_graph__  # type: ignore[attr-defined]
    except AttributeError:
        return False
    return callable(method)


def _default_client() -> Any:
    try:
        from runtime.client import get_default_client
    except ImportError:
        return None
    return get_default_client()


def get_scheduler(scheduler: Any = None) -> Callable[..., Any]:
    """Return the ``get(dsk, keys, **kwargs)`` function that should run a graph.

    Parameters
    ----------
    scheduler
        A scheduler name, a ``get`` callable, an object with a ``get`` method, or
        ``None`` to use config, then the active client, then threads.

    Raises
    ------
    ConfigError
        For an unknown scheduler name (the message lists the valid names), or
        ``"distributed"`` without an active client.
    """
    if scheduler is None:
        scheduler = config.get("scheduler", None)
        if scheduler is None:
            client = _default_client()
            return client.get if client is not None else local.get_threads
    if isinstance(scheduler, str):
        name = scheduler.lower()
        if name in _LOCAL:
            return _LOCAL[name]
        if name in _DISTRIBUTED:
            client = _default_client()
            if client is None:
                raise ConfigError(
                    f"scheduler={scheduler!r} needs an active hpc.Client; create one "
                    "(e.g. `client = hpc.Client(scheduler_file=...)`) or choose one of "
                    f"{sorted(set(_LOCAL))}"
                )
            return client.get
        raise ConfigError(
            f"unknown scheduler {scheduler!r}; valid names are "
            f"{sorted(set(_LOCAL) | {'distributed'})}"
        )
    get = getattr(scheduler, "get", None)
    if callable(get) and not isinstance(scheduler, Mapping):
        return get
    if callable(scheduler):
        return scheduler
    raise ConfigError(
        f"scheduler={scheduler!r} is neither a scheduler name, a get function nor a Client"
    )


def _collections_to_graph(collections: list[Any]) -> tuple[dict, list[list[Any]]]:
    delayeds = [c for c in collections if type(c) is Delayed or isinstance(c, Delayed)]
    dsk: dict = collect_graph(delayeds) if delayeds else {}
    keys = []
    for c in collections:
        if not isinstance(c, Delayed):
            dsk.update(dict(c.__dask_graph__()))
        keys.append(c.__dask_keys__())
    return dsk, keys


def _is_client_get(get: Callable[..., Any]) -> bool:
    """Whether ``get`` is a distributed ``Client.get`` (it then takes ``checkpoint=``)."""
    client = getattr(get, "__self__", None)
    return client is not None and hasattr(client, "persist") and hasattr(client, "gather")


def _run(get: Callable[..., Any], dsk: dict, keys: list, spec: Any, kwargs: dict) -> Any:
    """``get(dsk, keys, **kwargs)``, with checkpoints when ``spec`` is given."""
    if spec is None:
        return get(dsk, keys, **kwargs)
    if _is_client_get(get):
        return get(dsk, keys, checkpoint=spec, **kwargs)
    return spec.run_local(get, dsk, keys, **kwargs)


def _checkpoint_spec(checkpoint: Any, dsk: dict, keys: list) -> Any:
    if checkpoint is False:
        return None
    from runtime.checkpoint import checkpoint_spec

    return checkpoint_spec(checkpoint, dsk, keys)


def _optimize(dsk: dict, keys: list, fuse: bool = True) -> dict:
    flat = list(_graph.flatten(keys))
    dsk, deps = _graph.cull(dsk, flat)
    if fuse and config.get("optimization.fuse", True):
        dsk, _ = _graph.fuse_linear(dsk, flat, dependencies=deps)
    return dsk


def compute(
    *args: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    traverse: bool = True,
    checkpoint: Any = None,
    **kwargs: Any,
) -> tuple:
    """Compute several lazy objects in one pass, sharing their common nodes.

    Parameters
    ----------
    *args
        Collections (``Delayed`` objects, or anything with Dask's collection
        protocol) and plain values, which are returned unchanged. With
        ``traverse=True`` collections inside lists, tuples and dicts are computed too.
    scheduler
        ``"sync"``, ``"threads"``, ``"processes"``, ``"distributed"``, a ``Client``,
        or a ``get`` function. See the module docstring for the default.
    optimize_graph
        Cull the graph to what is needed and fuse linear chains before running.
    checkpoint
        A directory shared by every process of the computation: reuse the task
        results checkpointed there and checkpoint the others (see
        :mod:`runtime.checkpoint`). ``False`` disables checkpoints; the default,
        ``None``, uses the ``checkpoint.directory`` config value (if set).
    **kwargs
        Passed to the scheduler function (e.g. ``num_workers=4``).

    Returns
    -------
    tuple
        One result per argument, in order.

    Examples
    --------
    >>> from runtime.delayed import delayed
    >>> a = delayed(1, name="a")
    >>> compute(a + 1, a * 10, "plain", scheduler="sync")
    (2, 10, 'plain')
    """
    from runtime.delayed import delayed

    items = list(args)
    if traverse:
        items = [
            delayed(a) if isinstance(a, (list, tuple, dict, set)) and _contains_delayed(a) else a
            for a in items
        ]
    positions = [i for i, a in enumerate(items) if is_collection(a)]
    if not positions:
        return tuple(args)
    collections = [items[i] for i in positions]
    dsk, keys = _collections_to_graph(collections)
    spec = _checkpoint_spec(checkpoint, dsk, keys)
    if optimize_graph:
        # With checkpoints, chains are not fused: each task's result is a checkpoint.
        dsk = _optimize(dsk, keys, fuse=spec is None)
    get = get_scheduler(scheduler)
    results = _run(get, dsk, keys, spec, kwargs)
    out = list(args)
    for pos, coll, res in zip(positions, collections, results):
        finish, extra = coll.__dask_postcompute__()
        out[pos] = finish(res, *extra)
    return tuple(out)


def _contains_delayed(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Delayed):
            return True
        if isinstance(v, (list, tuple, set)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return False


def persist(
    *args: Any,
    scheduler: Any = None,
    optimize_graph: bool = True,
    checkpoint: Any = None,
    **kwargs: Any,
) -> tuple:
    """Compute lazy objects and return equivalent objects that hold their results.

    With the local schedulers the results are held in this process; with a
    distributed ``Client`` they stay in cluster memory (as futures) until the returned
    objects are released. ``checkpoint`` is as for :func:`compute`.

    Returns
    -------
    tuple
        One object per argument; plain values are returned unchanged.
    """
    get = get_scheduler(scheduler)
    client = getattr(get, "__self__", None)
    if client is not None and hasattr(client, "persist"):
        if checkpoint is not None:
            kwargs["checkpoint"] = checkpoint
        persisted = client.persist(list(args), optimize_graph=optimize_graph, **kwargs)
        return tuple(persisted)
    positions = [i for i, a in enumerate(args) if is_collection(a)]
    if not positions:
        return tuple(args)
    collections = [args[i] for i in positions]
    dsk, keys = _collections_to_graph(collections)
    spec = _checkpoint_spec(checkpoint, dsk, keys)
    if optimize_graph:
        # With checkpoints, chains are not fused: each task's result is a checkpoint.
        dsk = _optimize(dsk, keys, fuse=spec is None)
    flat = list(_graph.flatten(keys))
    values = _run(get, dsk, flat, spec, kwargs)
    results = dict(zip(flat, values))
    out = list(args)
    for pos, coll in zip(positions, collections):
        rebuild, extra = coll.__dask_postpersist__()
        out[pos] = rebuild(results, *extra)
    return tuple(out)
