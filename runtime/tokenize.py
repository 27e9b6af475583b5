"""Deterministic content hashes ("tokens") of Python objects.

``tokenize(*args, **kwargs)`` returns 32 hex characters that depend only on the
*content* of its arguments: equal inputs give equal tokens in every process and every
run, whatever ``PYTHONHASHSEED`` is. Keys of pure ``delayed`` calls are built from it,
and checkpoints find earlier results by those keys.

How a token is made: each argument is *normalized* into a tree built only from atoms
(``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``) and pairs
``(tag, payload)``, where ``tag`` is ``"module.qualname"`` of the object's type and
``payload`` is the normalized content. The ``repr`` of that tree is hashed with BLAKE2b.
``repr`` of such a tree is injective (it round-trips through ``ast.literal_eval``), and
the tag keeps values of different types apart: a ``__hpc_tokenize__`` hook that returns
``"abc"`` does not collide with the string ``"abc"``. Unordered containers are sorted by
the ``repr`` of their normalized elements, never by the elements themselves, so keys of
mixed, incomparable types are fine and hash randomisation does not leak in.

State kept here, and why:

- ``normalize_token``'s registry (type -> normalizer) and a per-type resolution cache,
  cleared on every registration. Resolving a type walks its MRO and checks for hooks;
  caching it keeps tokenizing small arguments at a few microseconds.
- Lazy registrations keyed by top-level package (``numpy``): they run the first time a
  type from that package is tokenized, so importing this module never imports numpy.
- A cache of code-object digests keyed by the (weakly referenced) code object: hashing
  bytecode and constants is most of the cost of tokenizing a function, and code objects
  are immutable.
- Per thread, the containers currently being normalized, so a cycle becomes a
  back-reference to the depth of the repeated container (deterministic) instead of
  infinite recursion.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import threading
import types
import uuid
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

from runtime import config
from runtime.errors import TokenizationError

__all__ = ["normalize_token", "tokenize"]

_F = TypeVar("_F", bound=Callable[[Any], object])

# Exact types whose repr is already deterministic and unambiguous: they are their own
# normalized form. Subclasses are normalized through the registry instead.
_ATOMS: frozenset[type] = frozenset({type(None), bool, int, float, complex, str, bytes})

# Buffers at least this large are replaced by a digest of their content.
_DIGEST_MIN = 1024

# Flags that change what a code object does; the others (nested, optimized, ...) depend
# on where the function was defined, not on what it computes.
_SEMANTIC_CO_FLAGS = (
    inspect.CO_VARARGS
    | inspect.CO_VARKEYWORDS
    | inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
)

# Markers use tags no type can have ("module.qualname" always contains a dot).
_EMPTY_CELL = ("<empty-cell>", None)
_MISSING_FIELD = ("<missing-field>", None)


def _digest(data: Any) -> str:
    """BLAKE2b-128 hex digest of a str or a C-contiguous buffer."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tokenize(*args: object, **kwargs: object) -> str:
    """Return a deterministic hex token of the arguments.

    Equal arguments give equal tokens in any process and any run; ``PYTHONHASHSEED``
    does not matter. Objects that cannot be normalized deterministically get a random
    token, or raise :class:`~runtime.errors.TokenizationError` when the
    ``tokenize.ensure-deterministic`` config value is true.

    Parameters
    ----------
    *args, **kwargs
        Objects to hash. Keyword names are part of the token; their order is not.

    Returns
    -------
    str
        32 lowercase hex characters.

    Examples
    --------
    >>> tokenize(1, "a", [2.5]) == tokenize(1, "a", [2.5])
    True
    >>> tokenize({"a": 1, "b": 2}) == tokenize({"b": 2, "a": 1})
    True
    >>> tokenize(1) == tokenize(1.0)
    False
    """
    token: object = _normalize_sequence(args)
    if kwargs:
        token = (token, _normalize_dict(kwargs))
    return _digest(repr(token))


class _TrackingState(threading.local):
    def __init__(self) -> None:
        # id(container) -> number of tracked containers open around it.
        self.active: dict[int, int] = {}


_state = _TrackingState()

# type -> (tag, normalizer, tracked)
_Resolved = tuple[str, Callable[[Any], object], bool]
_resolved: dict[type, _Resolved] = {}
_registry: dict[type, tuple[Callable[[Any], object], bool]] = {}
_lazy: dict[str, Callable[[], None]] = {}
_lock = threading.RLock()


def _normalize(obj: object) -> object:
    typ = type(obj)
    if typ in _ATOMS:
        return obj
    entry = _resolved.get(typ)
    if entry is None:
        entry = _resolve(typ)
    tag, func, tracked = entry
    if not tracked:
        return (tag, func(obj))
    active = _state.active
    key = id(obj)
    depth = active.get(key)
    if depth is not None:
        return ("<cycle>", depth)
    active[key] = len(active)
    try:
        return (tag, func(obj))
    finally:
        del active[key]


def _type_tag(typ: type) -> str:
    return f"{getattr(typ, '__module__', None)}.{getattr(typ, '__qualname__', typ.__name__)}"


def _run_lazy(typ: type) -> None:
    """Run the lazy registration of the packages ``typ`` and its bases come from."""
    for base in typ.__mro__ if _lazy else ():
        register = _lazy.pop(str(base.__module__).partition(".")[0], None)
        if register is not None:
            register()


def _resolve(typ: type) -> _Resolved:
    """Find the normalizer for instances of ``typ`` and cache it."""
    with _lock:
        _run_lazy(typ)
        func: Callable[[Any], object]
        if getattr(typ, "__hpc_tokenize__", None) is not None:
            func, tracked = _normalize_hook, True
        elif typ in _registry:
            func, tracked = _registry[typ]
        elif getattr(typ, "__dask_tokenize__", None) is not None:
            func, tracked = _normalize_dask_hook, True
        elif issubclass(typ, enum.Enum):
            func, tracked = _normalize_enum, False
        elif dataclasses.is_dataclass(typ):
            func, tracked = _normalize_dataclass, True
        else:
            found = next((_registry[base] for base in typ.__mro__ if base in _registry), None)
            func, tracked = found if found is not None else (_normalize_object, True)
        entry = (_type_tag(typ), func, tracked)
        _resolved[typ] = entry
        return entry


class _Normalizer:
    """Turn an object into deterministic, hashable data; dispatches on type.

    ``normalize_token(obj)`` returns a tree of atoms (``None``, ``bool``, ``int``,
    ``float``, ``complex``, ``str``, ``bytes``) and ``(type tag, payload)`` pairs whose
    ``repr`` is the same in every process for equal objects.

    Resolution order for ``type(obj)``: a ``__hpc_tokenize__()`` method (highest
    priority); a normalizer registered for exactly that type; a ``__dask_tokenize__()``
    method; Enum members (by name and value); dataclasses (by field values); a
    normalizer registered for a base class; finally the generic fallback, which
    normalizes the object's ``__reduce_ex__(4)`` output (so ``__dict__``,
    ``__getstate__`` and ``__slots__`` all count) and, when that fails, gives a random
    token or raises :class:`~runtime.errors.TokenizationError`.

    Examples
    --------
    >>> class Interval:
    ...     def __init__(self, lo, hi):
    ...         self.lo, self.hi = lo, hi
    >>> @normalize_token.register(Interval)
    ... def _(iv):
    ...     return (iv.lo, iv.hi)
    >>> tokenize(Interval(1, 2)) == tokenize(Interval(1, 2))
    True
    """

    def __call__(self, obj: object) -> object:
        return _normalize(obj)

    @overload
    def register(self, cls: type | tuple[type, ...]) -> Callable[[_F], _F]: ...

    @overload
    def register(self, cls: type | tuple[type, ...], func: _F) -> _F: ...

    def register(
        self, cls: type | tuple[type, ...], func: _F | None = None
    ) -> Callable[[_F], _F] | _F:
        """Register ``func(obj)`` as the normalizer of ``cls`` (and its subclasses).

        Usable as a decorator. The function may return any value made of the object's
        defining data; its result is normalized again, so plain containers of fields
        are enough.

        Parameters
        ----------
        cls
            A type or a tuple of types.
        func
            The normalizer; omit it to use ``register`` as a decorator.
        """
        classes = cls if isinstance(cls, tuple) else (cls,)

        def decorator(func: _F) -> _F:
            def normalizer(obj: Any) -> object:
                return _normalize(func(obj))

            _add(classes, normalizer, tracked=True)
            return func

        return decorator(func) if func is not None else decorator

    def register_lazy(self, toplevel: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
        """Run the decorated function the first time a type from ``toplevel`` is seen.

        The function registers normalizers for that package; it runs at most once,
        so the package is only imported when its objects are actually tokenized.

        Parameters
        ----------
        toplevel
            A top-level package name, e.g. ``"numpy"``.
        """

        def decorator(func: Callable[[], None]) -> Callable[[], None]:
            with _lock:
                _lazy[toplevel] = func
                _resolved.clear()
            return func

        return decorator

    def dispatch(self, cls: type) -> Callable[[Any], object]:
        """Return the normalizer used for instances of ``cls``."""
        return (_resolved.get(cls) or _resolve(cls))[1]


def _add(classes: tuple[type, ...], func: Callable[[Any], object], *, tracked: bool) -> None:
    with _lock:
        for cls in classes:
            _run_lazy(cls)  # so that a lazy registration never replaces this one later
            _registry[cls] = (func, tracked)
        _resolved.clear()


def _builtin(*classes: type, tracked: bool = False) -> Callable[[_F], _F]:
    """Register one of our own normalizers (they return normalized payloads)."""

    def decorator(func: _F) -> _F:
        _add(classes, func, tracked=tracked)
        return func

    return decorator


normalize_token = _Normalizer()


def _nondeterministic(obj: object, reason: str) -> object:
    if config.get("tokenize.ensure-deterministic"):
        name = _type_tag(type(obj))
        raise TokenizationError(
            f"Cannot tokenize an object of type {name} deterministically ({reason}). "
            f"Give {type(obj).__qualname__} a __hpc_tokenize__(self) method that returns "
            "the data defining it (e.g. a tuple of its fields), or register a "
            f"normalizer with @runtime.tokenize.normalize_token.register({name}); or set "
            "tokenize.ensure-deterministic to false to accept a random token."
        )
    return ("<random>", uuid.uuid4().hex)


# --- containers and atoms' subclasses -------------------------------------------------


def _normalize_sequence(obj: Any) -> tuple:
    if set(map(type, obj)) <= _ATOMS:
        return tuple(obj)
    return tuple(map(_normalize, obj))


def _sort_key(item: object) -> str:
    return repr(item)


def _normalize_dict(obj: Any) -> tuple:
    if not obj:
        return ()
    if set(map(type, obj)) == {str}:
        return tuple([(k, _normalize(obj[k])) for k in sorted(obj)])
    items = [(_normalize(k), _normalize(v)) for k, v in obj.items()]
    items.sort(key=_sort_key)
    return tuple(items)


def _normalize_set(obj: Any) -> tuple:
    kinds = set(map(type, obj))
    if kinds == {str} or kinds == {int} or kinds == {bytes}:
        return tuple(sorted(obj))
    return tuple(sorted(map(_normalize, obj), key=_sort_key))


_builtin(tuple)(_normalize_sequence)
_builtin(list, tracked=True)(_normalize_sequence)
_builtin(dict, tracked=True)(_normalize_dict)
_builtin(set, frozenset, tracked=True)(_normalize_set)


@_builtin(str, bytes, int, float, complex)
def _normalize_atom_subclass(obj: Any) -> object:
    base: Any = next(b for b in (str, bytes, int, float, complex) if isinstance(obj, b))
    return base(obj)


def _normalize_buffer(view: memoryview) -> object:
    if view.nbytes < _DIGEST_MIN:
        return view.tobytes()
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return _digest(view)


@_builtin(bytearray)
def _normalize_bytearray(obj: bytearray) -> object:
    return _normalize_buffer(memoryview(obj))


@_builtin(memoryview)
def _normalize_memoryview(obj: memoryview) -> object:
    return (obj.format, obj.shape, _normalize_buffer(obj))


@_builtin(slice)
def _normalize_slice(obj: slice) -> object:
    return (_normalize(obj.start), _normalize(obj.stop), _normalize(obj.step))


@_builtin(range)
def _normalize_range(obj: range) -> object:
    return (obj.start, obj.stop, obj.step)


@_builtin(type(Ellipsis), type(NotImplemented))
def _normalize_singleton(obj: object) -> object:
    return None


@_builtin(types.ModuleType)
def _normalize_module(obj: types.ModuleType) -> object:
    return obj.__name__


@_builtin(type)
def _normalize_class(obj: type) -> object:
    return (obj.__module__, obj.__qualname__)


# --- hooks, enums, dataclasses, arbitrary objects --------------------------------------


def _normalize_hook(obj: Any) -> object:
    return _normalize(obj.__hpc_tokenize__())


def _normalize_dask_hook(obj: Any) -> object:
    return _normalize(obj.__dask_tokenize__())


def _normalize_enum(obj: enum.Enum) -> object:
    return (obj.name, _normalize(obj.value))


@functools.cache
def _dataclass_fields(cls: Any) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


def _normalize_dataclass(obj: Any) -> object:
    return tuple(
        (name, _normalize(getattr(obj, name, _MISSING_FIELD)))
        for name in _dataclass_fields(obj.__class__)
    )


def _normalize_object(obj: Any) -> object:
    try:
        reduced = obj.__reduce_ex__(4)
    except Exception as exc:
        return _nondeterministic(obj, f"it cannot be reduced: {exc}")
    if isinstance(reduced, str):
        return reduced  # a global singleton, named by the reduce protocol
    if not isinstance(reduced, tuple) or not 2 <= len(reduced) <= 6:
        return _nondeterministic(obj, "its __reduce_ex__ returned an unexpected value")
    func, args, state, listitems, dictitems = (reduced + (None, None, None))[:5]
    return (
        _normalize(func),
        _normalize(args),
        _normalize(state),
        None if listitems is None else _normalize(list(listitems)),
        None if dictitems is None else _normalize(dict(dictitems)),
    )


# --- functions and other callables ------------------------------------------------------

_code_tokens: dict[int, tuple[weakref.ref, str]] = {}


@_builtin(types.CodeType)
def _code_token(code: types.CodeType) -> str:
    """Digest of what a code object computes (not where it was defined)."""
    key = id(code)
    cached = _code_tokens.get(key)
    if cached is not None and cached[0]() is code:
        return cached[1]
    normalized = (
        code.co_name,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags & _SEMANTIC_CO_FLAGS,
        code.co_code,
        _normalize(code.co_consts),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        getattr(code, "co_exceptiontable", b""),
    )
    token = _digest(repr(normalized))

    def forget(_ref: weakref.ref, key: int = key) -> None:
        _code_tokens.pop(key, None)

    _code_tokens[key] = (weakref.ref(code, forget), token)
    return token


def _normalize_cell(cell: types.CellType) -> object:
    try:
        contents = cell.cell_contents
    except ValueError:  # the variable is not assigned yet
        return _EMPTY_CELL
    return _normalize(contents)


@_builtin(types.FunctionType, tracked=True)
def _normalize_function(func: types.FunctionType) -> object:
    # Lambdas and nested functions are identified by what they compute only, so equal
    # code gives equal tokens wherever it was defined; module-level functions also by
    # the name they are imported under.
    named = "<" not in func.__qualname__
    closure = func.__closure__
    return (
        func.__module__ if named else None,
        func.__qualname__ if named else None,
        _code_token(func.__code__),
        None if func.__defaults__ is None else _normalize_sequence(func.__defaults__),
        None if func.__kwdefaults__ is None else _normalize_dict(func.__kwdefaults__),
        None if closure is None else tuple(map(_normalize_cell, closure)),
    )


@_builtin(types.MethodType, tracked=True)
def _normalize_method(method: types.MethodType) -> object:
    return (_normalize(method.__func__), _normalize(method.__self__))


@_builtin(types.BuiltinFunctionType)
def _normalize_builtin(func: types.BuiltinFunctionType) -> object:
    owner = func.__self__
    if owner is None or isinstance(owner, types.ModuleType):
        module = func.__module__ or getattr(owner, "__name__", None)
        return (module, func.__qualname__)
    return (_normalize(owner), func.__name__)


@_builtin(
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
def _normalize_descriptor(obj: Any) -> object:
    return (_normalize(obj.__objclass__), obj.__name__)


@_builtin(types.MethodWrapperType, tracked=True)
def _normalize_method_wrapper(obj: Any) -> object:
    return (_normalize(obj.__self__), obj.__name__)


@_builtin(functools.partial, tracked=True)
def _normalize_partial(obj: functools.partial) -> object:
    return (_normalize(obj.func), _normalize_sequence(obj.args), _normalize_dict(obj.keywords))


# --- numpy (registered on first use) ---------------------------------------------------


@normalize_token.register_lazy("numpy")
def _register_numpy() -> None:
    import numpy as np

    def dtype_token(dtype: Any) -> object:
        if dtype.fields is not None or dtype.subdtype is not None:
            return (dtype.str, _normalize(dtype.descr))
        return dtype.str

    @_builtin(np.ndarray, tracked=True)
    def _normalize_ndarray(arr: Any) -> object:
        # Object and variable-width string arrays hold pointers: hash their elements.
        if arr.dtype.hasobject or arr.dtype.kind == "T":
            return (dtype_token(arr.dtype), arr.shape, _normalize(arr.ravel().tolist()))
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return (dtype_token(arr.dtype), arr.shape, _digest(data))

    @_builtin(np.ma.MaskedArray, tracked=True)
    def _normalize_masked_array(arr: Any) -> object:
        return (
            _normalize(np.asarray(arr.data)),
            _normalize(np.ma.getmaskarray(arr)),
            _normalize(arr.fill_value),
        )

    @_builtin(np.generic)
    def _normalize_numpy_scalar(obj: Any) -> object:
        if obj.dtype.hasobject:
            return _normalize(obj.item())
        return (dtype_token(obj.dtype), obj.tobytes())

    @_builtin(np.dtype)
    def _normalize_dtype(obj: Any) -> object:
        return dtype_token(obj)

    @_builtin(np.ufunc)
    def _normalize_ufunc(obj: Any) -> object:
        return obj.__name__
