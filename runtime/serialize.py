"""Turn objects into frames that can reach another process, and back.

``dumps(obj)`` returns a list of frames; ``loads(frames)`` rebuilds the object. The
layout::

    frames[0]   header: b"HS", format version (1 byte), flags (1 byte, 0), the number
                n of frames that follow (uint32), then n codec ids (uint8 each) and
                n uncompressed lengths (uint64 each); all little-endian
    frames[1]   the pickle stream (protocol 5)
    frames[2:]  out-of-band buffers: NumPy arrays' memory, frames of registered
                serializers; each is sent as it is, never copied into the stream

Pickling tries the standard pickler first (fast) and switches to cloudpickle when that
fails or when the stream refers to ``__main__``: functions and classes defined in a
script or interactively are then sent by value, so a spawned process without that
``__main__`` can load them. Both picklers share one ``reducer_override`` that applies
the serializers registered here to objects of their type wherever they are nested.

On the way back, buffer frames reach NumPy untouched: an array loaded from a
``bytearray`` or writable ``memoryview`` frame shares its memory and is writable; one
loaded from ``bytes`` shares it read-only. Decompressed frames are private, writable
copies.

State kept here, and why:

- the serializer registry (type -> reducer) and its per-type resolution cache, so the
  ``reducer_override`` hook costs one dict lookup per object; NumPy's reducer is
  registered lazily, the first time a NumPy object is pickled, so importing this module
  never imports NumPy;
- which optional compressors (lz4, zstandard) are importable, checked once;
- two bounded LRU caches for :func:`dumps_function` / :func:`loads_function`, because
  the same function is shipped with every task of a graph.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import importlib
import io
import pickle
import struct
import threading
import types
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal

import cloudpickle

from runtime import config
from runtime.errors import ConfigError, SerializationError
from runtime.units import format_bytes, parse_bytes

__all__ = [
    "Compression",
    "LargePayloadWarning",
    "describe_unserializable",
    "dumps",
    "dumps_function",
    "dumps_task",
    "loads",
    "loads_function",
    "loads_task",
    "nbytes",
    "register_generic",
    "register_serializer",
    "unregister_serializer",
]

Compression = Literal["none", "zlib", "lz4", "zstd", "auto"]
"""Names accepted by ``compression=`` and the ``serialize.compression`` config value."""

_Frame = bytes | bytearray | memoryview

_MAGIC = b"HS"
_VERSION = 1
_HEAD = struct.Struct("<2sBBI")

# Buffers smaller than this travel inside the pickle stream: a frame of its own costs
# more than copying a few hundred bytes.
_INLINE_MAX = 1024

# Incompressibility test: compress a few samples first, and keep a frame as it is
# unless compression saves at least 10%.
_SAMPLE_SIZE = 10_000
_SAMPLES = 5
_MAX_RATIO = 0.9

# Fixes offered whenever something cannot be serialized.
_FIXES = (
    "Objects tied to this process (sockets, locks, open files, generators, database "
    "connections, ...) cannot be sent to another process. To fix it, either:\n"
    "  - create the {leaf} inside the task instead (pass what is needed to make it: a "
    "path, an address, parameters);\n"
    "  - implement __getstate__/__setstate__ on {owner} so that the {leaf} is left out "
    "and recreated after loading;\n"
    "  - or tell hpc-toolkit how to send it: "
    "runtime.serialize.register_serializer({leaf}, dumps, loads)."
)


class LargePayloadWarning(UserWarning):
    """A task's serialized function and arguments exceed ``serialize.large-payload-warning``.

    Large payloads are pickled, sent and unpickled with every execution of the task;
    loading the data inside the task, or scattering it once, avoids that.
    """


# --- registry -------------------------------------------------------------------------

_Reducer = Callable[[Any], Any]
_registry: dict[type, _Reducer] = {}
_reducers: dict[type, _Reducer | None] = {}
_lazy: dict[str, Callable[[], None]] = {}
_registry_lock = threading.RLock()


def _run_lazy(cls: type) -> None:
    """Run the lazy registration of the packages ``cls`` and its bases come from."""
    for base in cls.__mro__ if _lazy else ():
        register = _lazy.pop(str(base.__module__).partition(".")[0], None)
        if register is not None:
            register()


def _resolve_reducer(cls: type) -> _Reducer | None:
    with _registry_lock:
        _run_lazy(cls)
        reducer = next((_registry[base] for base in cls.__mro__ if base in _registry), None)
        _reducers[cls] = reducer
        return reducer


def _set_reducer(cls: type, reducer: _Reducer | None) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"expected a class, got {cls!r}")
    with _registry_lock:
        _run_lazy(cls)  # so that a lazy registration never replaces this one later
        if reducer is None:
            _registry.pop(cls, None)
        else:
            _registry[cls] = reducer
        _reducers.clear()


def _as_pickle_buffer(frame: Any) -> pickle.PickleBuffer:
    view = memoryview(frame)
    if not view.contiguous:
        view = memoryview(view.tobytes())
    return pickle.PickleBuffer(view)


def _rebuild_custom(
    loads: Callable[[dict, list[memoryview]], Any], header: dict, frames: list
) -> Any:
    return loads(header, [memoryview(frame) for frame in frames])


def register_serializer(
    cls: type,
    dumps: Callable[[Any], tuple[dict, Sequence[Any]]],
    loads: Callable[[dict, list[memoryview]], Any],
) -> None:
    """Serialize objects of ``cls`` (and subclasses) with your own functions.

    Applies wherever such an object appears, however deeply nested. ``dumps(obj)``
    returns ``(header, frames)``: a small picklable dict and a list of bytes-like
    objects, which travel as separate frames without being copied into the pickle
    stream. ``loads(header, frames)`` gets the header back and the frames as
    ``memoryview`` objects. ``loads`` is pickled by reference, so it must be importable
    where the data is loaded.

    Parameters
    ----------
    cls
        The class to handle.
    dumps, loads
        The two halves of the serializer.

    Examples
    --------
    >>> import socket
    >>> def dump_address(sock):
    ...     return {"family": int(sock.family)}, []
    >>> def load_address(header, frames):
    ...     return socket.socket(socket.AddressFamily(header["family"]))
    >>> register_serializer(socket.socket, dump_address, load_address)
    >>> unregister_serializer(socket.socket)
    """

    def reduce(obj: Any) -> Any:
        header, frames = dumps(obj)
        return _rebuild_custom, (loads, header, [_as_pickle_buffer(f) for f in frames])

    _set_reducer(cls, reduce)


def _new_instance(cls: Any) -> Any:
    return object.__new__(cls) if cls.__new__ is object.__new__ else cls.__new__(cls)


def _set_generic_state(obj: Any, state: tuple[dict | None, dict | None]) -> None:
    attributes, slots = state
    if attributes:
        obj.__dict__.update(attributes)
    for name, value in (slots or {}).items():
        object.__setattr__(obj, name, value)


def _slot_names(cls: type) -> list[str]:
    names = []
    for base in cls.__mro__:
        slots = base.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def register_generic(cls: type) -> type:
    """Serialize instances of a plain class by their attributes.

    Each attribute goes through this serializer (so arrays among them stay
    out-of-band); ``__init__``, ``__reduce__`` and ``__getstate__`` are bypassed.
    Usable as a class decorator.

    Parameters
    ----------
    cls
        A class whose state is its ``__dict__`` (and ``__slots__``, if any).

    Returns
    -------
    type
        ``cls``, unchanged.
    """
    slot_names = _slot_names(cls)

    def reduce(obj: Any) -> Any:
        attributes = getattr(obj, "__dict__", None)
        slots = {n: getattr(obj, n) for n in slot_names if hasattr(obj, n)} or None
        return _new_instance, (type(obj),), (attributes, slots), None, None, _set_generic_state

    _set_reducer(cls, reduce)
    return cls


def unregister_serializer(cls: type) -> None:
    """Forget what :func:`register_serializer` or :func:`register_generic` set for ``cls``."""
    _set_reducer(cls, None)


def _register_numpy() -> None:
    import numpy as np

    def reduce_ndarray(arr: Any) -> Any:
        # NumPy sends contiguous arrays out-of-band itself but pickles the others
        # in-band; one contiguous copy keeps those out of the stream too.
        if (
            type(arr) is not np.ndarray
            or arr.flags.c_contiguous
            or arr.flags.f_contiguous
            or arr.dtype.hasobject
            or arr.dtype.kind == "T"
        ):
            return NotImplemented
        return np.ascontiguousarray(arr).__reduce_ex__(5)

    _registry[np.ndarray] = reduce_ndarray


_lazy["numpy"] = _register_numpy


# --- pickling ----------------------------------------------------------------------------


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        try:
            reducer = _reducers[type(obj)]
        except KeyError:
            reducer = _resolve_reducer(type(obj))
        if reducer is None:
            return NotImplemented
        return reducer(obj)


class _CloudPickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        try:
            reducer = _reducers[type(obj)]
        except KeyError:
            reducer = _resolve_reducer(type(obj))
        if reducer is not None:
            reduced = reducer(obj)
            if reduced is not NotImplemented:
                return reduced
        return super().reducer_override(obj)


def _pickle(
    pickler: type[pickle.Pickler], obj: Any, callback: Callable[[pickle.PickleBuffer], Any] | None
) -> bytes:
    file = io.BytesIO()
    pickler(file, protocol=5, buffer_callback=callback).dump(obj)
    return file.getvalue()


def _pickle_any(
    obj: Any, callback: Callable[[pickle.PickleBuffer], Any] | None, reset: Callable[[], None]
) -> tuple[bytes, bool]:
    """Pickle with the standard pickler, else cloudpickle; return (stream, by_value)."""
    try:
        stream = _pickle(_Pickler, obj, callback)
        if b"__main__" not in stream:
            return stream, False
    except Exception:
        pass
    reset()
    return _pickle(_CloudPickler, obj, callback), True


# Exact types that need neither our reducers nor cloudpickle: flat containers of these
# are pickled by the C pickler directly.
_FLAT = frozenset({type(None), bool, int, float, complex, str, bytes})

# A reused pickler whose stream grew beyond this is replaced, to give the memory back.
_REUSE_MAX = 1 << 20


class _ThreadPickler(threading.local):
    """This thread's standard pickler, reused: making one costs more than most pickles."""

    def __init__(self) -> None:
        self.busy = False
        self.buffers: list[Any] = []
        self._fresh()

    def _fresh(self) -> None:
        self.file = io.BytesIO()
        self.pickler = _Pickler(self.file, protocol=5, buffer_callback=self.collect)

    def collect(self, buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < _INLINE_MAX:
            return True  # small: in-band
        self.buffers.append(raw)
        return False

    def dump(self, obj: Any) -> list[Any] | None:
        """[stream, *buffers], or None if cloudpickle is needed."""
        self.busy = True
        self.buffers = []
        try:
            self.pickler.dump(obj)
            stream = self.file.getvalue()
            if b"__main__" in stream:
                return None
            return [stream, *self.buffers]
        except Exception:
            return None
        finally:
            self.buffers = []  # do not keep the caller's arrays alive
            self.pickler.clear_memo()  # the memo holds references to what was pickled
            if self.file.tell() > _REUSE_MAX:
                self._fresh()
            else:
                self.file.seek(0)
                self.file.truncate()
            self.busy = False


_thread_pickler = _ThreadPickler()


def _is_flat(obj: Any) -> bool:
    cls = type(obj)
    if cls in _FLAT:
        return True
    if cls is tuple or cls is list:
        return set(map(type, obj)) <= _FLAT
    if cls is dict:
        return set(map(type, obj)) <= _FLAT and set(map(type, obj.values())) <= _FLAT
    return False


def _serialize(obj: Any) -> list[Any]:
    """Pickle ``obj`` into [stream, *buffers]; raise whatever pickling raised."""
    if _is_flat(obj):
        return [pickle.dumps(obj, protocol=5)]
    reusable = _thread_pickler
    if not reusable.busy:  # busy: a registered serializer is calling dumps
        frames = reusable.dump(obj)
        if frames is not None:
            return frames
    buffers: list[Any] = []

    def callback(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < _INLINE_MAX:
            return True
        buffers.append(raw)
        return False

    if reusable.busy:
        stream, _ = _pickle_any(obj, callback, buffers.clear)
    else:
        stream = _pickle(_CloudPickler, obj, callback)
    return [stream, *buffers]


# --- compression -------------------------------------------------------------------------


class _Codec(enum.IntEnum):
    NONE = 0
    ZLIB = 1
    LZ4 = 2
    ZSTD = 3


_CODEC_NAMES: dict[str, _Codec] = {
    "none": _Codec.NONE,
    "zlib": _Codec.ZLIB,
    "lz4": _Codec.LZ4,
    "zstd": _Codec.ZSTD,
}
_AUTO_ORDER = (_Codec.LZ4, _Codec.ZSTD, _Codec.ZLIB)
_MODULES = {_Codec.ZLIB: "zlib", _Codec.LZ4: "lz4.block", _Codec.ZSTD: "zstandard"}
_PACKAGES = {_Codec.LZ4: "lz4", _Codec.ZSTD: "zstandard"}

# codec -> module, or None when it cannot be imported; filled on first use.
_codec_modules: dict[_Codec, Any] = {}


def _codec_module(codec: _Codec) -> Any:
    module = _codec_modules.get(codec, _codec_modules)
    if module is not _codec_modules:
        return module
    try:
        module = importlib.import_module(_MODULES[codec])
    except ImportError:
        module = None
    _codec_modules[codec] = module
    return module


def _missing_package(name: str, codec: _Codec) -> ConfigError:
    package = _PACKAGES[codec]
    return ConfigError(
        f"Compression {name!r} needs the {package} package, which is not installed: "
        f"pip install {package} (or pip install 'hpc-toolkit[compression]'), or choose "
        "compression 'auto' to use whatever is installed."
    )


def _choose_codec(compression: str | None) -> _Codec:
    name = config.get("serialize.compression") if compression is None else compression
    if name == "auto":
        for codec in _AUTO_ORDER:
            if _codec_module(codec) is not None:
                return codec
    try:
        codec = _CODEC_NAMES[name]
    except (KeyError, TypeError):
        if name is None:
            return _Codec.NONE
        valid = ", ".join(sorted([*_CODEC_NAMES, "auto"]))
        raise ConfigError(
            f"Unknown compression {name!r}: use one of {valid} "
            "(the compression= argument or the serialize.compression config value)."
        ) from None
    if codec is not _Codec.NONE and _codec_module(codec) is None:
        raise _missing_package(name, codec)
    return codec


def _compress_with(codec: _Codec, data: Any) -> bytes:
    module = _codec_module(codec)
    if codec is _Codec.LZ4:
        return bytes(module.compress(data, store_size=False))
    if codec is _Codec.ZSTD:
        return bytes(module.ZstdCompressor(level=1).compress(data))
    return bytes(module.compress(data, 1))


def _decompress(codec: _Codec, data: Any, size: int) -> bytearray:
    module = _codec_module(codec)
    if module is None:
        package = _PACKAGES.get(codec, str(codec.name).lower())
        raise SerializationError(
            f"These frames are compressed with {codec.name.lower()}, but the {package} "
            f"package is not installed in this process: pip install {package}."
        )
    if codec is _Codec.LZ4:
        out = module.decompress(data, uncompressed_size=size, return_bytearray=True)
    elif codec is _Codec.ZSTD:
        out = bytearray(module.ZstdDecompressor().decompress(data, max_output_size=size))
    else:
        out = bytearray(module.decompress(data))
    if len(out) != size:
        raise SerializationError(
            f"A {codec.name.lower()} frame decompressed to {len(out)} bytes instead of {size}: "
            "the frames were truncated or corrupted in transit."
        )
    return out


def _maybe_compress(codec: _Codec, frame: Any, size: int) -> bytes | None:
    """Return the compressed frame, or None when compression does not pay."""
    view = memoryview(frame)
    if size > _SAMPLES * _SAMPLE_SIZE * 2:
        step = (size - _SAMPLE_SIZE) // (_SAMPLES - 1)
        sample = b"".join(view[i * step : i * step + _SAMPLE_SIZE] for i in range(_SAMPLES))
        if len(_compress_with(codec, sample)) > _MAX_RATIO * len(sample):
            return None
    compressed = _compress_with(codec, view)
    if len(compressed) > _MAX_RATIO * size:
        return None
    return compressed


@functools.lru_cache(maxsize=64)
def _byte_size(value: Any) -> int:
    return parse_bytes(value)


def _frame_nbytes(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(frame).nbytes


def nbytes(frames: Sequence[Any]) -> int:
    """Return the total size in bytes of a list of frames (any bytes-like objects).

    Examples
    --------
    >>> nbytes([b"abc", bytearray(2), memoryview(b"12345")])
    10
    """
    return sum(_frame_nbytes(frame) for frame in frames)


_HEAD_ONE = struct.Struct("<2sBBIBQ")


def _pack(payload: list[Any], compression: str | None) -> tuple[list[Any], int]:
    """Compress what pays off and prepend the header; return (frames, raw size)."""
    codec = _choose_codec(compression)
    if len(payload) == 1 and type(payload[0]) is bytes:
        size = len(payload[0])
        if codec is _Codec.NONE or size < _byte_size(config.get("serialize.compression-min-size")):
            return [_HEAD_ONE.pack(_MAGIC, _VERSION, 0, 1, 0, size), payload[0]], size
    sizes = [_frame_nbytes(frame) for frame in payload]
    count = len(payload)
    codecs = [0] * count
    if codec is not _Codec.NONE:
        min_size = _byte_size(config.get("serialize.compression-min-size"))
        for i, size in enumerate(sizes):
            if size >= min_size and size > 0:
                compressed = _maybe_compress(codec, payload[i], size)
                if compressed is not None:
                    payload[i] = compressed
                    codecs[i] = codec
    header = _HEAD.pack(_MAGIC, _VERSION, 0, count) + struct.pack(
        f"<{count}B{count}Q", *codecs, *sizes
    )
    return [header, *payload], sum(sizes)


def _read_header(header: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(header) == _HEAD_ONE.size:  # the common case: one frame
        magic, version, _flags, count, codec, size = _HEAD_ONE.unpack_from(header)
        if magic == _MAGIC and version == _VERSION and count == 1:
            return (codec,), (size,)
    view = memoryview(header)
    if view.nbytes < _HEAD.size or view[:2].tobytes() != _MAGIC:
        raise SerializationError(
            "These frames were not made by runtime.serialize.dumps (bad header frame): "
            "pass the whole list dumps() returned, in order."
        )
    _, version, _flags, count = _HEAD.unpack_from(view)
    if version != _VERSION:
        raise SerializationError(
            f"These frames use serialization format version {version}, but this process "
            f"reads version {_VERSION}: the sending and receiving processes run different "
            "hpc-toolkit versions; install the same version everywhere."
        )
    if view.nbytes != _HEAD.size + 9 * count:
        raise SerializationError("The header frame is truncated or corrupted.")
    fields = struct.unpack_from(f"<{count}B{count}Q", view, _HEAD.size)
    return fields[:count], fields[count:]


# --- public dumps / loads ----------------------------------------------------------------


def dumps(
    obj: Any, *, compression: Compression | None = None, context: str | None = None
) -> list[bytes | memoryview]:
    """Serialize ``obj`` into frames for another process.

    Parameters
    ----------
    obj
        Anything picklable by pickle or cloudpickle, or handled by a registered
        serializer.
    compression
        ``"none"``, ``"zlib"``, ``"lz4"``, ``"zstd"`` or ``"auto"``; default the
        ``serialize.compression`` config value. Frames smaller than
        ``serialize.compression-min-size`` and frames that do not compress are sent as
        they are.
    context
        What ``obj`` is, for error messages (e.g. ``"the result of 'sum-3f2a'"``).

    Returns
    -------
    list of bytes or memoryview
        The header, the pickle stream, then out-of-band buffers. Buffers may share
        memory with ``obj`` (no copy): do not modify ``obj`` until the frames are sent.

    Raises
    ------
    SerializationError
        Something inside ``obj`` cannot be serialized; the message says what, where
        and how to fix it.
    ConfigError
        Unknown compression, or its package is not installed.

    Examples
    --------
    >>> loads(dumps({"a": [1, 2, 3]}))
    {'a': [1, 2, 3]}
    """
    try:
        payload = _serialize(obj)
    except Exception as exc:
        raise _serialization_error(exc, context or "object", [("obj", "the object", obj)]) from exc
    return _pack(payload, compression)[0]


def loads(frames: Sequence[_Frame], *, context: str | None = None) -> Any:
    """Rebuild an object from the frames :func:`dumps` made.

    Parameters
    ----------
    frames
        The frames, in order; each may be ``bytes``, ``bytearray`` or ``memoryview``
        (e.g. as received from a socket). Uncompressed buffer frames are used in place:
        arrays share their memory, and are writable when the frame is.
    context
        What is being loaded, for error messages.

    Raises
    ------
    SerializationError
        The frames are not from :func:`dumps`, come from an incompatible version, are
        truncated, or the object cannot be rebuilt here (e.g. its module is missing).
    """
    if not frames:
        raise SerializationError("No frames to load: pass the list dumps() returned.")
    codecs, sizes = _read_header(frames[0])
    payload = list(frames[1:])
    if len(payload) != len(codecs):
        raise SerializationError(
            f"Expected {len(codecs)} frames after the header, got {len(payload)}: pass "
            "the whole list dumps() returned, in order."
        )
    for i, codec in enumerate(codecs):
        if codec:
            payload[i] = _decompress(_Codec(codec), payload[i], sizes[i])
        elif _frame_nbytes(payload[i]) != sizes[i]:
            raise SerializationError(
                f"Frame {i + 1} has {_frame_nbytes(payload[i])} bytes instead of "
                f"{sizes[i]}: the frames were truncated or corrupted in transit."
            )
    try:
        return pickle.loads(payload[0], buffers=payload[1:])
    except Exception as exc:
        what = context or "object"
        hint = ""
        if isinstance(exc, ModuleNotFoundError):
            hint = (
                f" The module {exc.name!r} must be importable in this process too: "
                "install it in the workers' environment or put it on their PYTHONPATH."
            )
        elif isinstance(exc, AttributeError):
            hint = (
                " A class or function it refers to does not exist here: are both sides "
                "running the same version of your code?"
            )
        raise SerializationError(
            f"Cannot deserialize {what}: {type(exc).__name__}: {exc}.{hint}"
        ) from exc


def _task_roots(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list:
    roots = [("func", "the function", func)]
    roots += [(f"args[{i}]", f"argument {i}", a) for i, a in enumerate(args)]
    roots += [(f"kwargs[{k!r}]", f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    return roots


def dumps_task(
    key: Hashable | None,
    func: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    compression: Compression | None = None,
) -> list[bytes | memoryview]:
    """Serialize the call ``func(*args, **kwargs)`` of task ``key`` into frames.

    Like :func:`dumps` of ``(func, tuple(args), dict(kwargs))`` (load it back with
    :func:`loads_task`), with two additions: errors name the task and the argument at
    fault (``Cannot serialize task 'load-3f2a': argument 1 (args[1]) is a
    socket.socket ...``), and a :class:`LargePayloadWarning` is emitted when the
    serialized call exceeds ``serialize.large-payload-warning``.

    Parameters
    ----------
    key
        The task's key, for messages; ``None`` if it has none.
    func, args, kwargs
        The call.
    compression
        As for :func:`dumps`.

    Returns
    -------
    list of bytes or memoryview
    """
    args = tuple(args)
    kwargs = dict(kwargs or {})
    subject = "task" if key is None else f"task {key!r}"
    try:
        payload = _serialize((func, args, kwargs))
    except Exception as exc:
        raise _serialization_error(exc, subject, _task_roots(func, args, kwargs)) from exc
    frames, size = _pack(payload, compression)
    limit = config.get("serialize.large-payload-warning")
    if limit is not None and size > _byte_size(limit):
        warnings.warn(
            f"{subject[0].upper()}{subject[1:]} is {format_bytes(size)} once serialized "
            f"(function and arguments), more than serialize.large-payload-warning "
            f"({format_bytes(_byte_size(limit))}); it is sent and unpickled with every "
            "execution. Load the data inside the task instead (pass a path or "
            "parameters), or scatter it once (client.scatter(data)) and pass the future.",
            LargePayloadWarning,
            stacklevel=2,
        )
    return frames


def loads_task(
    frames: Sequence[_Frame], key: Hashable | None = None
) -> tuple[Callable[..., Any], tuple, dict[str, Any]]:
    """Load ``(func, args, kwargs)`` from frames made by :func:`dumps_task`.

    Parameters
    ----------
    frames
        As for :func:`loads`.
    key
        The task's key, for error messages.
    """
    func, args, kwargs = loads(frames, context="task" if key is None else f"task {key!r}")
    return func, args, kwargs


# --- functions, cached -------------------------------------------------------------------

_FUNCTION_CACHE_SIZE = 256
_FUNCTION_CACHE_MAX_BYTES = 1_000_000
_dumped_functions: collections.OrderedDict[Any, tuple[bytes, tuple]] = collections.OrderedDict()
_loaded_functions: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_function_cache_lock = threading.Lock()
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis))


def _by_reference(obj: Any) -> bool:
    """Whether cloudpickle sends ``obj`` (a function or class) by its import path."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    return module not in (None, "__main__") and "<" not in qualname


def _stable(value: Any) -> bool:
    """Whether ``value`` pickles the same for as long as it is the same object."""
    if isinstance(value, (*_IMMUTABLE, types.ModuleType)):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_stable(v) for v in value)
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return _by_reference(value)
    return False


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _snapshot(func: Any) -> tuple | None:
    """What a function sent by value depends on, or None if that may change unseen."""
    if not isinstance(func, types.FunctionType):
        return None
    namespace = func.__globals__
    refs: list[Any] = [func.__code__, func.__defaults__]
    refs += [namespace[n] for n in dict.fromkeys(_global_names(func.__code__)) if n in namespace]
    refs += list((func.__kwdefaults__ or {}).values())
    for cell in func.__closure__ or ():
        try:
            refs.append(cell.cell_contents)
        except ValueError:
            return None
    if not all(_stable(ref) for ref in refs[1:]):
        return None
    return tuple(refs)


def dumps_function(func: Callable[..., Any]) -> bytes:
    """Pickle a function into bytes, reusing the bytes when ``func`` is sent again.

    Functions importable by name are cached outright. Lambdas, closures and functions
    from ``__main__`` are sent by value and cached only while everything they refer to
    (globals, closure variables, defaults) is immutable and still the same object;
    otherwise they are pickled anew each time, so a changed global is never missed.

    Parameters
    ----------
    func
        The callable to send.

    Returns
    -------
    bytes
        A pickle (any out-of-band data is kept in-band); load it with
        :func:`loads_function`.
    """
    try:
        with _function_cache_lock:
            cached = _dumped_functions.get(func)
    except TypeError:  # unhashable callable
        cached = None
    if cached is not None:
        data, snapshot = cached
        current = _snapshot(func) if snapshot else ()
        if (
            current is not None
            and len(current) == len(snapshot)
            and all(a is b for a, b in zip(current, snapshot, strict=True))
        ):
            with _function_cache_lock:
                if func in _dumped_functions:
                    _dumped_functions.move_to_end(func)
            return data
    try:
        data, by_value = _pickle_any(func, None, lambda: None)
    except Exception as exc:
        raise _serialization_error(exc, "function", [("func", "the function", func)]) from exc
    snapshot_now = _snapshot(func) if by_value else ()
    if snapshot_now is not None and len(data) <= _FUNCTION_CACHE_MAX_BYTES:
        try:
            with _function_cache_lock:
                _dumped_functions[func] = (data, snapshot_now)
                _dumped_functions.move_to_end(func)
                while len(_dumped_functions) > _FUNCTION_CACHE_SIZE:
                    _dumped_functions.popitem(last=False)
        except TypeError:
            pass
    return data


def loads_function(data: bytes | bytearray | memoryview) -> Callable[..., Any]:
    """Load a function pickled by :func:`dumps_function`; equal bytes load once.

    Raises
    ------
    SerializationError
        The function cannot be rebuilt here (e.g. its module is missing).
    """
    key = data if isinstance(data, bytes) else bytes(data)
    with _function_cache_lock:
        func = _loaded_functions.get(key)
        if func is not None:
            _loaded_functions.move_to_end(key)
            return func
    try:
        func = pickle.loads(key)
    except Exception as exc:
        raise SerializationError(
            f"Cannot deserialize function: {type(exc).__name__}: {exc}"
        ) from exc
    if len(key) <= _FUNCTION_CACHE_MAX_BYTES:
        with _function_cache_lock:
            _loaded_functions[key] = func
            while len(_loaded_functions) > _FUNCTION_CACHE_SIZE:
                _loaded_functions.popitem(last=False)
    return func


# --- explaining what cannot be serialized ---------------------------------------------------

_MAX_DEPTH = 64


@dataclasses.dataclass
class _Culprit:
    path: str
    leaf: Any
    owner: Any
    error: BaseException


def _pickle_error(obj: Any) -> BaseException | None:
    try:
        _pickle(_CloudPickler, obj, lambda buffer: False)
    except Exception as exc:
        return exc
    return None


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, child, owner) for what pickling ``obj`` pickles; owner holds the child."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{key!r}]", value, None
        for key in obj:
            yield f"{path} (key {key!r})", key, None
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"{path}[{i}]", value, None
    elif isinstance(obj, (set, frozenset)):
        for i, value in enumerate(obj):
            yield f"{path}<element {i}>", value, None
    elif isinstance(obj, types.MethodType):
        yield f"{path}.__self__", obj.__self__, None
        yield f"{path}.__func__", obj.__func__, None
        return
    elif isinstance(obj, functools.partial):
        yield f"{path}.func", obj.func, None
        for i, value in enumerate(obj.args):
            yield f"{path}.args[{i}]", value, None
        for key, value in obj.keywords.items():
            yield f"{path}.keywords[{key!r}]", value, None
        return
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f"{path}<closure {name!r}>", cell.cell_contents, None
            except ValueError:
                continue
        for name in dict.fromkeys(_global_names(obj.__code__)):
            if name in obj.__globals__:
                yield f"{path}<global {name!r}>", obj.__globals__[name], None
        for i, value in enumerate(obj.__defaults__ or ()):
            yield f"{path}.__defaults__[{i}]", value, None
        return
    if type(obj) in (dict, list, tuple, set, frozenset):
        return
    try:
        reduced = obj.__reduce_ex__(5)
    except Exception:
        return
    if not isinstance(reduced, tuple):
        return
    args = reduced[1] if len(reduced) > 1 else ()
    state = reduced[2] if len(reduced) > 2 else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        attributes, slots = state
        state = {**(attributes or {}), **slots}
    if isinstance(state, dict):
        for name, value in state.items():
            where = f"{path}.{name}" if isinstance(name, str) and name.isidentifier() else None
            yield where or f"{path}.__dict__[{name!r}]", value, obj
    elif state is not None:
        yield f"{path}.__getstate__()", state, obj
    for i, value in enumerate(args if isinstance(args, tuple) else ()):
        yield f"{path}<reduce argument {i}>", value, obj


def _find_unpicklable(
    obj: Any, path: str, owner: Any = None, seen: set[int] | None = None, depth: int = 0
) -> _Culprit | None:
    """The first part of ``obj`` that cannot be pickled, depth first; None if all can."""
    error = _pickle_error(obj)
    if error is None:
        return None
    seen = set() if seen is None else seen
    seen.add(id(obj))
    if depth < _MAX_DEPTH:
        for child_path, child, child_owner in _children(obj, path):
            if id(child) in seen or type(child) in _IMMUTABLE:
                continue
            found = _find_unpicklable(child, child_path, child_owner or owner, seen, depth + 1)
            if found is not None:
                return found
    return _Culprit(path, obj, owner, error)


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _locate(roots: list[tuple[str, str, Any]]) -> tuple[str, _Culprit] | None:
    """Find the culprit among named roots; return (where, culprit)."""
    for root_path, label, value in roots:
        culprit = _find_unpicklable(value, root_path)
        if culprit is None:
            continue
        if culprit.path == root_path:
            where = f"{label} ({root_path})" if label != "the object" else "the object"
        else:
            where = f"{culprit.path}" if label == "the object" else f"{culprit.path} (in {label})"
        return where, culprit
    return None


def _describe(where: str, culprit: _Culprit) -> str:
    reason = str(culprit.error) or type(culprit.error).__name__
    return f"{where} is a {_type_name(type(culprit.leaf))}, which cannot be pickled ({reason})"


def _serialization_error(
    exc: Exception, subject: str, roots: list[tuple[str, str, Any]]
) -> SerializationError:
    try:
        found = _locate(roots)
    except Exception:  # never let the diagnosis hide the original error
        found = None
    if found is None:
        fixes = _FIXES.format(leaf="object", owner="the class that holds it")
        return SerializationError(
            f"Cannot serialize {subject}: {type(exc).__name__}: {exc}.\n{fixes}"
        )
    where, culprit = found
    owner = (
        type(culprit.owner).__qualname__ if culprit.owner is not None else "the class that holds it"
    )
    fixes = _FIXES.format(leaf=_type_name(type(culprit.leaf)), owner=owner)
    return SerializationError(f"Cannot serialize {subject}: {_describe(where, culprit)}.\n{fixes}")


def describe_unserializable(obj: Any) -> str | None:
    """Say which part of ``obj`` cannot be serialized, or return None if all of it can.

    Parameters
    ----------
    obj
        Anything.

    Returns
    -------
    str or None
        E.g. ``"obj['conn'] is a socket.socket, which cannot be pickled (cannot pickle
        'socket' object)"``; paths start at ``obj`` and follow items, attributes
        (``.name``) and closure variables (``<closure 'name'>``).

    Examples
    --------
    >>> describe_unserializable({"a": [1, 2]}) is None
    True
    >>> import threading
    >>> print(describe_unserializable({"a": [1, threading.Lock()]}))
    obj['a'][1] is a _thread.lock, which cannot be pickled (cannot pickle '_thread.lock' object)
    """
    try:
        _serialize(obj)
    except Exception as exc:
        found = _locate([("obj", "the object", obj)])
        if found is None:
            return f"the object cannot be pickled ({type(exc).__name__}: {exc})"
        return _describe(*found)
    return None
