"""Tests for runtime.serialize: frames, out-of-band buffers, registry, compression."""

from __future__ import annotations

import importlib
import pickle
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime import config, serialize
from runtime.errors import ConfigError, SerializationError
from runtime.serialize import (
    Compression,
    LargePayloadWarning,
    describe_unserializable,
    dumps,
    dumps_function,
    dumps_task,
    loads,
    loads_function,
    loads_task,
    nbytes,
    register_generic,
    register_serializer,
    unregister_serializer,
)

REPO = Path(__file__).resolve().parents[2]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _shares(array: np.ndarray, frame: object) -> bool:
    return np.shares_memory(array, np.frombuffer(frame, dtype=np.uint8))  # type: ignore[call-overload]


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None,
        1,
        -(2**80),
        3.5,
        "text",
        b"bytes",
        [1, "a", (2.5, None)],
        {"a": [1, {"b": (2, 3)}], 4: {5, 6}},
        ("a", "b", "c"),
        [list(range(1000)), {"x": "y" * 5000}],
    ],
)
def test_plain_objects_round_trip(obj: object) -> None:
    assert loads(dumps(obj)) == obj


def test_frames_start_with_a_header_then_the_pickle_stream() -> None:
    frames = dumps([1, 2, 3])
    assert len(frames) == 2
    assert bytes(frames[0])[:2] == b"HS"
    assert pickle.loads(frames[1]) == [1, 2, 3]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(100_000, dtype="f8"),
        np.arange(60_000, dtype="i4").reshape(200, 300),
        np.asfortranarray(np.arange(60_000, dtype="i2").reshape(300, 200)),
        np.arange(600_000, dtype="f8").reshape(600, 1000)[::3, ::7],
        np.array(3.5),
        np.zeros((0, 5)),
        np.array(["a", None, 3], dtype=object),
        np.arange(10, dtype="u1"),
    ],
    ids=["1d", "2d", "fortran", "strided", "0d", "empty", "object", "tiny"],
)
def test_numpy_arrays_round_trip(array: np.ndarray) -> None:
    result = loads(dumps(array))
    assert result.dtype == array.dtype
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_non_contiguous_arrays_travel_out_of_band() -> None:
    strided = np.arange(600_000, dtype="f8").reshape(600, 1000)[::3, ::7]
    frames = dumps(strided, compression="none")
    assert len(frames) == 3
    assert nbytes(frames[2:]) == strided.nbytes
    assert len(frames[1]) < 1000


def test_big_arrays_are_sent_without_copies_and_loaded_in_place() -> None:
    array = np.arange(1_000_000, dtype="f8")
    frames = dumps(array, compression="none")
    assert len(frames) == 3
    assert _shares(array, frames[2])  # no copy on the way out

    # As received from a socket: bytes for small frames, a bytearray read into for big ones.
    received: list[bytes | bytearray] = [bytes(frames[0]), bytes(frames[1]), bytearray(frames[2])]
    loaded = loads(received)
    assert _shares(loaded, received[2])
    assert loaded.flags.writeable
    loaded[0] = -1.0
    assert received[2][:8] == np.float64(-1.0).tobytes()

    readonly = loads([frames[0], frames[1], bytes(frames[2])])
    assert not readonly.flags.writeable
    np.testing.assert_array_equal(readonly, array)


def test_loads_accepts_memoryview_frames_into_a_larger_buffer() -> None:
    array = np.arange(50_000, dtype="i8")
    frames = dumps({"a": array}, compression="none")
    # One receive buffer holding all frames back to back, as comm might read them.
    whole = bytearray(b"".join(bytes(f) for f in frames))
    views: list[memoryview] = []
    offset = 0
    for frame in frames:
        size = nbytes([frame])
        views.append(memoryview(whole)[offset : offset + size])
        offset += size
    loaded = loads(views)["a"]
    np.testing.assert_array_equal(loaded, array)
    assert _shares(loaded, whole)
    assert loaded.flags.writeable


_FACTOR = 3


def test_lambdas_and_closures_round_trip() -> None:
    offset = 10

    def add_offset(x):
        return x + offset + _FACTOR

    loaded = loads(dumps({"lambda": lambda x: x * 2, "closure": add_offset}))
    assert loaded["lambda"](4) == 8
    assert loaded["closure"](1) == 14


MAIN_SCRIPT = """
import pickle
import sys

from runtime.serialize import dumps


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm2(self):
        return self.x**2 + self.y**2


def scale(k):
    return lambda v: v * k


def triple(x):
    return 3 * x


# Plain pickle handles these by reference to __main__, which a new process lacks.
by_reference = dumps({"point": Point(3, 4), "cls": Point, "function": triple})
# Plain pickle cannot handle these at all.
by_value_only = dumps({"lambda": lambda x: x + 1, "closure": scale(10)})
with open(sys.argv[1], "wb") as f:
    pickle.dump([bytes(frame) for frame in by_reference], f)
    pickle.dump([bytes(frame) for frame in by_value_only], f)
    pickle.dump(pickle.dumps(Point(1, 2)), f)  # what plain pickle would send
"""


def test_objects_defined_in_main_load_in_another_process(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(MAIN_SCRIPT)
    out = tmp_path / "frames.pkl"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    with out.open("rb") as f:
        by_reference = pickle.load(f)
        by_value_only = pickle.load(f)
        plain = pickle.load(f)
    with pytest.raises(AttributeError):  # plain pickle refers to the script's __main__
        pickle.loads(plain)

    loaded = loads(by_reference)
    assert loaded["point"].norm2() == 25
    assert isinstance(loaded["point"], loaded["cls"])
    assert loaded["function"](5) == 15
    loaded = loads(by_value_only)
    assert loaded["lambda"](1) == 2
    assert loaded["closure"](2) == 20


class _Stateful:
    def __init__(self, name):
        self.name = name
        self.values = [1, 2]


def test_task_round_trip_through_dumps_task_and_loads_task() -> None:
    frames = dumps_task("sum-1", sum, ([1, 2, 3],), {"start": 10})
    func, args, kwargs = loads_task(frames, "sum-1")
    assert func(*args, **kwargs) == 16


# --- registry --------------------------------------------------------------------------


class Blob:
    """A type with its own serializer (module level: loads is pickled by reference)."""

    def __init__(self, name: str, payload: bytes) -> None:
        self.name = name
        self.payload = payload


_blob_dumps_calls: list[Blob] = []


def dump_blob(blob: Blob) -> tuple[dict, list]:
    _blob_dumps_calls.append(blob)
    return {"name": blob.name}, [blob.payload]


def load_blob(header: dict, frames: list) -> Blob:
    assert all(isinstance(frame, memoryview) for frame in frames)
    return Blob(header["name"], bytes(frames[0]))


class Envelope:
    """A type whose serializer calls dumps itself (re-entrant use)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner


def dump_envelope(env: Envelope) -> tuple[dict, list]:
    frames = dumps(env.inner, compression="none")
    return {"count": len(frames)}, frames


def load_envelope(header: dict, frames: list) -> Envelope:
    return Envelope(loads(frames))


@pytest.fixture
def registered():
    registered_types: list[type] = []

    def register(cls: type, dump=None, load=None) -> None:
        if dump is None:
            register_generic(cls)
        else:
            register_serializer(cls, dump, load)
        registered_types.append(cls)

    yield register
    for cls in registered_types:
        unregister_serializer(cls)


def test_registered_serializer_applies_to_nested_objects(registered) -> None:
    registered(Blob, dump_blob, load_blob)
    _blob_dumps_calls.clear()
    payload = bytes(range(256)) * 40
    obj = {"items": [1, (Blob("first", payload),)]}
    frames = dumps(obj, compression="none")
    assert len(_blob_dumps_calls) == 1
    assert len(frames) == 3  # the blob's payload is its own frame ...
    assert bytes(frames[2]) == payload  # ... untouched
    loaded = loads(frames)["items"][1][0]
    assert isinstance(loaded, Blob)
    assert (loaded.name, loaded.payload) == ("first", payload)


def test_unregistered_type_falls_back_to_pickle(registered) -> None:
    registered(Blob, dump_blob, load_blob)
    unregister_serializer(Blob)
    _blob_dumps_calls.clear()
    loaded = loads(dumps(Blob("x", b"abc")))
    assert loaded.payload == b"abc"
    assert _blob_dumps_calls == []


def test_registered_serializer_may_call_dumps_itself(registered) -> None:
    registered(Envelope, dump_envelope, load_envelope)
    array = np.arange(10_000.0)
    loaded = loads(dumps([Envelope({"a": array}), Envelope("b")]))
    np.testing.assert_array_equal(loaded[0].inner["a"], array)
    assert loaded[1].inner == "b"


class Holder:
    init_calls = 0

    def __init__(self, array: np.ndarray, label: str) -> None:
        Holder.init_calls += 1
        self.array = array
        self.label = label


def test_register_generic_sends_attributes_and_keeps_arrays_out_of_band(registered) -> None:
    registered(Holder)
    array = np.arange(100_000, dtype="f8")
    frames = dumps(Holder(array, "h"), compression="none")
    assert len(frames) == 3
    received = [frames[0], frames[1], bytearray(frames[2])]
    calls = Holder.init_calls
    loaded = loads(received)
    assert Holder.init_calls == calls  # rebuilt from attributes, not __init__
    assert loaded.label == "h"
    np.testing.assert_array_equal(loaded.array, array)
    assert _shares(loaded.array, received[2])


class Connection:
    """Holds a socket but drops it when pickled, and reopens it lazily."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock: socket.socket | None = socket.socket()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["sock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class BareConnection:
    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket()


def test_getstate_and_setstate_are_honoured() -> None:
    conn = Connection("db:5432")
    try:
        loaded = loads(dumps({"conn": conn}))["conn"]
    finally:
        conn.close()
    assert loaded.address == "db:5432"
    assert loaded.sock is None


def test_class_without_getstate_holding_a_socket_names_attribute_and_fix() -> None:
    conn = BareConnection("db:5432")
    try:
        with pytest.raises(SerializationError) as info:
            dumps({"conn": conn})
    finally:
        conn.sock.close()
    message = str(info.value)
    assert "obj['conn'].sock is a socket.socket" in message
    assert "__getstate__/__setstate__ on BareConnection" in message


# --- errors ------------------------------------------------------------------------------


def test_socket_in_task_arguments_names_task_argument_path_type_and_fixes() -> None:
    sock = socket.socket()
    try:
        with pytest.raises(SerializationError) as info:
            dumps_task("load-3f2a", len, ("path", {"conn": sock}))
    finally:
        sock.close()
    message = str(info.value)
    assert message.startswith("Cannot serialize task 'load-3f2a': ")
    assert "args[1]['conn'] (in argument 1) is a socket.socket" in message
    assert "inside the task" in message
    assert "__getstate__/__setstate__" in message
    assert "register_serializer(socket.socket, dumps, loads)" in message
    assert isinstance(info.value, TypeError)


def test_unserializable_argument_itself_is_named_as_the_argument() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        dumps_task("step-1", print, (1, 2), {"guard": lock})
    assert "keyword argument 'guard' (kwargs['guard']) is a _thread.lock" in str(info.value)


def test_lock_nested_in_an_object_gives_its_path_and_type() -> None:
    holder = _Stateful("s")
    holder.values = [1, threading.Lock()]  # type: ignore[list-item]
    with pytest.raises(SerializationError) as info:
        dumps({"jobs": [holder]}, context="the result of 'x-1'")
    message = str(info.value)
    assert message.startswith("Cannot serialize the result of 'x-1': ")
    assert "obj['jobs'][0].values[1] is a _thread.lock" in message


def test_describe_unserializable_locates_the_first_bad_leaf() -> None:
    assert describe_unserializable({"a": [1, 2], "f": len}) is None
    generator = (i for i in range(3))
    description = describe_unserializable({"ok": [1], "gen": generator})
    assert description is not None
    assert description.startswith("obj['gen'] is a generator")
    lock = threading.Lock()

    def uses_lock():
        return lock

    closure_description = describe_unserializable(uses_lock)
    assert closure_description is not None
    assert closure_description.startswith("obj<closure 'lock'> is a _thread.lock")


def test_loads_rejects_frames_not_made_by_dumps() -> None:
    frames = dumps([1, 2])
    with pytest.raises(SerializationError, match="not made by runtime.serialize.dumps"):
        loads([b"garbage-header", frames[1]])
    with pytest.raises(SerializationError, match="Expected 1 frames"):
        loads(frames[:1])
    with pytest.raises(SerializationError, match="truncated"):
        loads([frames[0], bytes(frames[1])[:-1]])


def test_loads_names_a_format_version_mismatch() -> None:
    frames = dumps("x")
    header = bytearray(frames[0])
    header[2] = 99
    with pytest.raises(SerializationError, match="format version 99.*same version"):
        loads([header, frames[1]])


def test_loads_explains_a_missing_module(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "only_here.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("only_here")
    frames = dumps(module.Thing())
    monkeypatch.delitem(sys.modules, "only_here")
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(SerializationError, match="'only_here' must be importable"):
        loads(frames, context="task 'thing-1'")


# --- compression ---------------------------------------------------------------------------

COMPRESSIBLE = b"all work and no play " * 20_000  # 420 kB


def _uncompressed(obj: object) -> list:
    return dumps(obj, compression="none")


def test_compression_none_leaves_frames_as_they_are() -> None:
    frames = dumps(COMPRESSIBLE, compression="none")
    assert nbytes(frames[1:]) > len(COMPRESSIBLE)
    assert loads(frames) == COMPRESSIBLE


@pytest.mark.parametrize("name", ["zlib", "lz4", "zstd"])
def test_each_codec_compresses_and_round_trips(name: Compression) -> None:
    frames = dumps(COMPRESSIBLE, compression=name)
    assert nbytes(frames[1:]) < len(COMPRESSIBLE) / 10
    assert loads(frames) == COMPRESSIBLE


def test_codecs_write_their_own_formats() -> None:
    import lz4.block

    raw = _uncompressed(COMPRESSIBLE)[1]
    assert bytes(dumps(COMPRESSIBLE, compression="zstd")[1]).startswith(ZSTD_MAGIC)
    assert bytes(dumps(COMPRESSIBLE, compression="zlib")[1])[:1] == b"\x78"
    lz4_frame = dumps(COMPRESSIBLE, compression="lz4")[1]
    assert lz4.block.decompress(lz4_frame, uncompressed_size=len(raw)) == raw


def _hide_modules(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    monkeypatch.setattr(serialize, "_codec_modules", {})


def test_auto_prefers_lz4_then_zstd_then_zlib(monkeypatch) -> None:
    lz4_frames = dumps(COMPRESSIBLE, compression="lz4")
    assert bytes(dumps(COMPRESSIBLE, compression="auto")[1]) == bytes(lz4_frames[1])
    _hide_modules(monkeypatch, "lz4", "lz4.block")
    assert bytes(dumps(COMPRESSIBLE, compression="auto")[1]).startswith(ZSTD_MAGIC)
    _hide_modules(monkeypatch, "zstandard")
    assert bytes(dumps(COMPRESSIBLE, compression="auto")[1])[:1] == b"\x78"
    assert loads(dumps(COMPRESSIBLE, compression="auto")) == COMPRESSIBLE


def test_compression_comes_from_config_when_not_given() -> None:
    with config.set({"serialize.compression": "zstd"}):
        assert bytes(dumps(COMPRESSIBLE)[1]).startswith(ZSTD_MAGIC)
    with config.set({"serialize.compression": "none"}):
        assert nbytes(dumps(COMPRESSIBLE)) > len(COMPRESSIBLE)


def test_frames_below_the_minimum_size_are_not_compressed() -> None:
    small = b"ab" * 2_000  # 4 kB, very compressible
    raw = bytes(_uncompressed(small)[1])
    assert bytes(dumps(small, compression="zlib")[1]) == raw  # default minimum: 10kB
    with config.set({"serialize.compression-min-size": "1kB"}):
        assert len(dumps(small, compression="zlib")[1]) < len(raw) / 10
        assert loads(dumps(small, compression="zlib")) == small


@pytest.mark.parametrize("size", [50_000, 2_000_000], ids=["whole-frame-tried", "sampled"])
def test_incompressible_frames_are_sent_as_they_are(size: int, monkeypatch) -> None:
    compressed_sizes: list[int] = []
    real_compress = serialize._compress_with

    def spy(codec, data):
        compressed_sizes.append(nbytes([data]))
        return real_compress(codec, data)

    monkeypatch.setattr(serialize, "_compress_with", spy)
    noise = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    frames = dumps(noise, compression="zstd")
    assert len(frames) == 3
    assert _shares(noise, frames[2])  # not even copied
    np.testing.assert_array_equal(loads(frames), noise)
    if size > 1_000_000:  # big frames: a sample showed it does not pay, the rest is skipped
        assert compressed_sizes and max(compressed_sizes) < size / 10


def test_decompressed_arrays_are_writable() -> None:
    zeros = np.zeros(500_000)
    for name in ("zlib", "lz4", "zstd"):
        frames = dumps(zeros, compression=name)
        assert nbytes(frames) < zeros.nbytes / 10
        loaded = loads(frames)
        assert loaded.flags.writeable
        np.testing.assert_array_equal(loaded, zeros)


def test_unknown_compression_is_a_config_error_listing_valid_names() -> None:
    with pytest.raises(ConfigError, match="auto, lz4, none, zlib, zstd"):
        dumps(1, compression="snappy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "modules", "package"),
    [("lz4", ("lz4", "lz4.block"), "lz4"), ("zstd", ("zstandard",), "zstandard")],
)
def test_compression_without_its_package_names_what_to_install(
    monkeypatch, name: str, modules: tuple, package: str
) -> None:
    _hide_modules(monkeypatch, *modules)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        dumps(1, compression=name)  # type: ignore[arg-type]


# --- large payloads, sizes ------------------------------------------------------------------


def test_large_task_payload_warns_with_size_and_task() -> None:
    big = np.ones(250_000)  # 2 MB, compresses to almost nothing: the raw size counts
    with (
        config.set({"serialize.large-payload-warning": "1MB"}),
        pytest.warns(LargePayloadWarning) as record,
    ):
        dumps_task("big-1", np.sum, (big,))
    message = str(record[0].message)
    assert message.startswith("Task 'big-1' is 1.9")
    assert "MiB once serialized" in message
    assert "inside the task" in message
    assert "scatter" in message
    assert issubclass(LargePayloadWarning, UserWarning)


def test_small_task_payload_does_not_warn() -> None:
    with config.set({"serialize.large-payload-warning": "1MB"}), warnings.catch_warnings():
        warnings.simplefilter("error")
        dumps_task("small-1", np.sum, (np.ones(1000),))


def test_nbytes_counts_every_kind_of_frame() -> None:
    assert nbytes([b"abc", bytearray(4), memoryview(b"12345"), np.zeros(2).data]) == 28
    frames = dumps(np.zeros(10_000), compression="none")
    assert nbytes(frames) == sum(len(memoryview(f).cast("B")) for f in frames)


# --- functions -------------------------------------------------------------------------------

_SCALE = [2]
_OFFSET = 1


def module_level(x):
    return x + 1


def test_dumps_function_caches_functions_importable_by_name() -> None:
    first = dumps_function(module_level)
    assert dumps_function(module_level) is first
    assert loads_function(first)(1) == 2
    assert loads_function(bytes(first)) is loads_function(first)


def test_dumps_function_notices_changed_globals_of_lambdas() -> None:
    global _OFFSET
    add = lambda x: x + _OFFSET  # noqa: E731
    scale = lambda x: x * _SCALE[0]  # noqa: E731
    cached = dumps_function(add)
    assert dumps_function(add) is cached  # only immutable globals: cached
    try:
        _OFFSET = 5
        assert loads_function(dumps_function(add))(1) == 6  # rebound global: re-pickled
        assert pickle.loads(dumps_function(scale))(3) == 6
        _SCALE[0] = 10  # mutated in place: never cached, so never stale
        assert pickle.loads(dumps_function(scale))(3) == 30
    finally:
        _OFFSET = 1
        _SCALE[0] = 2


def test_dumps_function_of_unpicklable_function_raises_serialization_error() -> None:
    lock = threading.Lock()

    def locked():
        with lock:
            return 1

    with pytest.raises(SerializationError, match="closure 'lock'"):
        dumps_function(locked)


def test_serializing_from_many_threads_is_safe() -> None:
    values = [{"i": i, "data": np.full(2_000, i), "f": module_level} for i in range(8)]
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(values))

    def work(value: dict) -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(100):
                loaded = loads(dumps(value))
                assert loaded["i"] == value["i"]
                np.testing.assert_array_equal(loaded["data"], value["data"])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures


def test_registration_for_a_numpy_type_before_first_use_is_kept() -> None:
    code = (
        "import numpy as np\n"
        "from runtime.serialize import dumps, loads, register_serializer\n"
        "def dump(arr):\n"
        "    return {'shape': arr.shape}, []\n"
        "def load(header, frames):\n"
        "    return ('custom', header['shape'])\n"
        "register_serializer(np.ndarray, dump, load)\n"
        "print(loads(dumps([np.zeros(3)])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[('custom', (3,))]"
