"""Drawing task graphs: DOT text always, SVG/PNG/PDF through Graphviz's ``dot``.

No state is kept. Tasks are drawn as circles labelled with the function name, data
(the results) as boxes labelled with the key's name, as Dask draws them, so a user who
knows one picture can read the other. Rendering formats other than DOT run the
``dot`` program from Graphviz; when it is missing the error says how to install it
and where the DOT text was written.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from runtime import graph as _graph
from runtime.errors import HPCError

__all__ = ["GraphvizNotFoundError", "to_dot", "visualize"]

_FORMATS = ("dot", "svg", "png", "pdf")


class GraphvizNotFoundError(HPCError, RuntimeError):
    """Rendering a graph needs Graphviz's ``dot`` program, which is not installed."""


def _label(key: Any) -> str:
    name = key[0] if isinstance(key, tuple) and key else key
    text = str(name)
    head, sep, tail = text.rpartition("-")
    if sep and len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail):
        text = head
    if isinstance(key, tuple) and len(key) > 1:
        text += ", " + ", ".join(str(k) for k in key[1:])
    return text


def _funcname(task: Any) -> str:
    func = task[0]
    if func is _graph.apply and len(task) > 1:
        func = task[1]
    name = getattr(func, "__name__", type(func).__name__)
    return "lambda" if name == "<lambda>" else str(name)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(dsk: dict, rankdir: str = "BT") -> str:
    """Return the DOT source drawing a graph.

    Examples
    --------
    >>> from operator import add
    >>> print(to_dot({"x": 1, "y": (add, "x", 1)}))  # doctest: +ELLIPSIS
    digraph {
      rankdir=BT;
    ...
    }
    """
    names: dict[Any, str] = {}

    def node_id(key: Any) -> str:
        if key not in names:
            names[key] = f"n{len(names)}"
        return names[key]

    lines = ["digraph {", f"  rankdir={rankdir};"]
    deps, _ = _graph.get_deps(dsk)
    for key in _graph.toposort(dsk, dependencies=deps):
        task = dsk[key]
        data = node_id(key)
        lines.append(f"  {data} [label={_quote(_label(key))}, shape=box];")
        if _graph.istask(task):
            func = node_id(("__task__", key))
            lines.append(f"  {func} [label={_quote(_funcname(task))}, shape=circle];")
            lines.append(f"  {func} -> {data};")
            for dep in deps[key]:
                lines.append(f"  {node_id(dep)} -> {func};")
        else:
            for dep in deps[key]:
                lines.append(f"  {node_id(dep)} -> {data};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def visualize(
    *objs: Any,
    filename: str | None = "mydask",
    format: str | None = None,
    optimize_graph: bool = False,
    rankdir: str = "BT",
) -> str:
    """Draw one combined graph for several lazy objects (or graph dicts).

    Parameters
    ----------
    *objs
        ``Delayed`` objects, other collections, or graph dicts.
    filename
        Output path without or with an extension; ``None`` writes nothing and
        returns the DOT text.
    format
        ``"dot"``, ``"svg"``, ``"png"`` or ``"pdf"``; by default taken from the
        filename's extension, else ``"dot"``.
    optimize_graph
        Draw the graph after culling and fusion, as it would run.
    rankdir
        Graphviz layout direction (``"BT"``: inputs at the bottom).

    Returns
    -------
    str
        The DOT text when ``filename`` is ``None``, else the path written.

    Raises
    ------
    GraphvizNotFoundError
        An image format was asked for and Graphviz's ``dot`` is not installed.
    """
    from runtime.compute import _collections_to_graph, _optimize, is_collection

    dsk: dict = {}
    collections = []
    for obj in objs:
        if isinstance(obj, dict):
            dsk.update(obj)
        elif is_collection(obj):
            collections.append(obj)
        else:
            raise TypeError(f"cannot visualize {type(obj).__name__}; pass Delayed objects")
    if collections:
        cdsk, keys = _collections_to_graph(collections)
        if optimize_graph:
            cdsk = _optimize(cdsk, keys)
        dsk.update(cdsk)
    text = to_dot(dsk, rankdir=rankdir)
    if filename is None:
        return text
    path = Path(filename)
    fmt = (format or path.suffix.lstrip(".") or "dot").lower()
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {list(_FORMATS)}")
    if path.suffix.lstrip(".").lower() != fmt:
        path = path.with_name(path.name + "." + fmt)
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(text)
    if fmt == "dot":
        return str(dot_path)
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFoundError(
            f"rendering {fmt.upper()} needs Graphviz's `dot` program, which was not found "
            "on PATH; install the Graphviz package (Debian/Ubuntu: `apt-get install "
            "graphviz`, conda: `conda install graphviz`), or ask for format='dot'. "
            f"The DOT text was written to {dot_path}"
        )
    proc = subprocess.run(
        [exe, f"-T{fmt}", "-o", str(path), str(dot_path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise HPCError(f"Graphviz `dot` failed on {dot_path}: {proc.stderr.strip()}")
    return str(path)
