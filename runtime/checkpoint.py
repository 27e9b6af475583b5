"""Checkpoints: task results kept on a shared filesystem, found again by identity.

A computation run with ``checkpoint=DIR`` (or the ``checkpoint.directory`` config
value) writes the result of every task it runs to ``DIR``; a later run of the same
code, after a crash, a lost scheduler or a requeued job, reads the results it still
needs from there instead of computing them again.

Where it plugs in:

- local schedulers (:meth:`CheckpointSpec.run_local`): before running, the graph is
  walked down from the requested keys; a task with a valid checkpoint becomes a load
  and what only it needed is left out, so only checkpoints that something still needs
  are read. Every other task saves its result where it ran (worker thread or
  process). A checkpoint found damaged while loading is set aside and the graph run
  again, reusing what finished meanwhile.
- the distributed runtime: the client sends the identity tokens with the graph; the
  scheduler looks a task up before computing it (a header read, see
  :mod:`runtime.scheduler`); workers load the inputs they need and write what they
  compute (:mod:`runtime.worker`).
- :func:`checkpoint` (``hpc.checkpoint(obj, DIR)``): computes ``obj``, writes only its
  result, and returns it as a one-task graph that loads it, cutting the lineage.
- ``hpc checkpoints list|clean DIR`` on the command line.

Identity
--------
Keys are often random (``delayed`` calls are impure by default), so checkpoints are
found by an *identity token* instead (:func:`identity_tokens`), computed bottom-up:
the token of a task hashes its function and literal arguments (with
:mod:`runtime.tokenize`) and the identity tokens of the tasks it depends on, never
their keys. Running the same script again gives the same tokens; changing a function
(its code, defaults or closure) or an argument changes the token of that task and of
everything downstream of it. Graphs computed with checkpoints are not fused: every
task keeps its key and its result is a checkpoint of its own, so a graph extended
later still finds each of them.

What the token cannot see:

- anything a function reads besides its arguments: global variables, files, the
  clock, environment variables, unseeded random numbers, and the code of other
  functions it calls (only the calling function's own code is hashed);
- objects that cannot be tokenized deterministically (the task then gets no identity
  and is neither checkpointed nor reused, nor is anything downstream of it).

**The rule for impure tasks.** A task whose result depends on anything but its
arguments is impure. Either pass what it depends on as an argument (``load(path,
mtime=os.path.getmtime(path))``: a changed file then gets a new identity), or opt the
task out with ``hpc.delayed(f, checkpoint=False)`` (or set ``f.__hpc_checkpoint__ =
False``): it then runs every time, is never stored or read, and nothing downstream of
it is checkpointed either, since what it computes from an impure value has no
identity.

Files
-----
One file per result, ``DIR/<token[:2]>/<token>.ckpt`` (256 shard directories keep
directories small on parallel filesystems)::

    b"HPC-CKPT"  u32 format version  u32 header length      (little-endian)
    header       JSON: token, key, payload size, frame sizes, checksum of the
                 payload (CRC-32, named in "checksum-algorithm"; files without that
                 field carry BLAKE2b-256), producer host/pid/job id (SLURM_JOB_ID or
                 PBS_JOBID), creation time, Python version
    16 bytes     BLAKE2b digest of the header
    payload      the frames of runtime.serialize.dumps(result), back to back

A file is written to a temporary name in its shard directory, fsynced, renamed into
place and the directory fsynced (``checkpoint.fsync``), so a reader never sees half a
file and a written file survives a node crash. :meth:`CheckpointStore.exists` checks
only the header and the file size (cheap: the scheduler calls it); loading verifies
the checksum. A truncated or corrupted file is logged, renamed to ``*.corrupt`` (or
deleted), and treated as missing: the task is computed again.

State kept here: a cache of :class:`CheckpointStore` objects by directory (they hold
only their path and settings) and the directories whose write failures were already
logged, so that a full disk produces one warning per process rather than one per
task. Nothing else; the files are the state.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from runtime import config
from runtime import graph as _graph
from runtime.errors import CheckpointError, ConfigError, TokenizationError
from runtime.tokenize import normalize_token

__all__ = [
    "FORMAT_VERSION",
    "CheckpointInfo",
    "CheckpointSpec",
    "CheckpointStore",
    "CheckpointWriter",
    "CleanResult",
    "checkpoint",
    "checkpoint_spec",
    "checkpoint_target",
    "get_store",
    "identity_tokens",
    "resolve_directory",
    "uncheckpointed",
]

logger = logging.getLogger(__name__)

Key = Any

FORMAT_VERSION = 1
# The payload checksum: CRC-32 catches truncation and damage (what it is for) at a
# quarter of BLAKE2b's cost per megabyte; BLAKE2b-256 is what files without a
# "checksum-algorithm" field carry, and they stay readable.
_CHECKSUM = "crc32"
"""Version of the file layout; files of another version are treated as missing."""

_MAGIC = b"HPC-CKPT"
_PREFIX = struct.Struct("<8sII")
_HEADER_DIGEST = 16
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; more means a corrupt length
_SUFFIX = ".ckpt"
_CORRUPT = ".corrupt"
_TOKEN = re.compile(r"[0-9a-f]{16,128}\Z")
_SHARD = re.compile(r"[0-9a-f]{2}\Z")
_FILE = re.compile(r"([0-9a-f]{16,128})\.ckpt\Z")
# Temporary files younger than this may belong to a writer still running.
_TEMP_GRACE = 3600.0
# Bumped when the identity rule changes, so old checkpoints are not misread as current.
_IDENTITY_SALT = "hpc-checkpoint-identity-1"
_RANDOM_MARK = "'<random>'"


# ----------------------------------------------------------------------------- store


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What the header of one checkpoint file says (see :meth:`CheckpointStore.list`).

    Attributes
    ----------
    token
        The identity token (also the file name).
    key
        ``repr`` of the key of the task that produced it.
    nbytes
        Size of the serialized result.
    created
        Unix time of writing.
    host, pid, job_id
        Where it was written (``job_id`` from ``SLURM_JOB_ID`` or ``PBS_JOBID``).
    path
        The file.
    valid
        False when the file could not be read or failed a check; ``problem`` says why.
    problem
        Why the file is not valid, or ``None``.
    """

    token: str
    key: str
    nbytes: int
    created: float
    host: str | None
    pid: int | None
    job_id: str | None
    path: str
    valid: bool = True
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class CleanResult:
    """What :meth:`CheckpointStore.clean` removed (or would remove, with ``dry_run``)."""

    removed: int
    nbytes: int
    paths: tuple[str, ...]


class _Invalid(Exception):
    """A file that exists but fails a check (internal: becomes CheckpointError)."""


def _payload_digest(header: Mapping[str, Any], payload: Any) -> str:
    """The checksum of ``payload`` by the algorithm ``header`` names."""
    algorithm = header.get("checksum-algorithm", "blake2b")
    if algorithm == "crc32":
        return f"{zlib.crc32(payload):08x}"
    if algorithm == "blake2b":
        return hashlib.blake2b(payload, digest_size=32).hexdigest()
    raise _Invalid(f"unknown checksum algorithm {algorithm!r} (written by a newer version?)")


def _check_token(token: str) -> str:
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise CheckpointError(
            f"{token!r} is not a checkpoint token (16 to 128 lowercase hex digits)", token
        )
    return token


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or None


def _read_exact(fd: int, n: int) -> bytes:
    data = os.read(fd, n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _parse_header(fd: int, size: int, token: str) -> tuple[dict[str, Any], int]:
    """Read and check the header of an open checkpoint file of ``size`` bytes.

    Returns the header and the offset of the payload. Raises ``_Invalid``.
    """
    prefix = _read_exact(fd, _PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise _Invalid(f"truncated: {size} bytes, shorter than the file prefix")
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != _MAGIC:
        raise _Invalid("not a checkpoint file (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise _Invalid(f"format version {version}, this process reads {FORMAT_VERSION}")
    if length > _MAX_HEADER:
        raise _Invalid(f"implausible header length {length}")
    raw = _read_exact(fd, length + _HEADER_DIGEST)
    if len(raw) < length + _HEADER_DIGEST:
        raise _Invalid("truncated inside the header")
    text, digest = raw[:length], raw[length:]
    if hashlib.blake2b(text, digest_size=_HEADER_DIGEST).digest() != digest:
        raise _Invalid("header checksum mismatch")
    try:
        header = json.loads(text)
        nbytes = int(header["nbytes"])
        frames = [int(n) for n in header["frames"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise _Invalid(f"unreadable header: {exc}") from None
    if header.get("token") != token:
        raise _Invalid(f"holds token {header.get('token')!r}, not {token!r}")
    offset = _PREFIX.size + length + _HEADER_DIGEST
    if sum(frames) != nbytes or offset + nbytes != size:
        raise _Invalid(
            f"truncated or padded: {size} bytes on disk, the header announces {offset + nbytes}"
        )
    return header, offset


class CheckpointStore:
    """The checkpoints in one directory: look up, save, load, list and clean them.

    Safe to use from several threads and processes, also on several hosts sharing the
    directory: files are only ever created by renaming a complete temporary file into
    place, and writers of the same token write the same result.

    Parameters
    ----------
    directory
        Where the checkpoints are (created on the first save).
    fsync
        fsync every file and its directory before the rename counts; default: the
        ``checkpoint.fsync`` config value.
    compression
        Compression of payloads (as for ``runtime.serialize.dumps``); default: the
        ``checkpoint.compression`` config value.

    Examples
    --------
    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp())
    >>> token = "0123456789abcdef0123456789abcdef"
    >>> store.exists(token)
    False
    >>> _ = store.save(token, {"answer": 42}, key="x")
    >>> store.exists(token), store.load(token)
    (True, {'answer': 42})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool | None = None,
        compression: str | None = None,
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.fsync = bool(config.get("checkpoint.fsync", True)) if fsync is None else fsync
        self.compression = (
            config.get("checkpoint.compression", "none") if compression is None else compression
        )

    def __repr__(self) -> str:
        return f"CheckpointStore({self.directory!r})"

    def path(self, token: str) -> str:
        """Return the file that holds (or would hold) the checkpoint ``token``."""
        _check_token(token)
        return os.path.join(self.directory, token[:2], token + _SUFFIX)

    # -- looking up ------------------------------------------------------------------

    def exists(self, token: str) -> bool:
        """Return whether a checkpoint for ``token`` is there and looks complete.

        Checks the header and the file size only (no checksum: that is verified when
        the checkpoint is loaded). A file failing the checks is moved aside and
        reported missing.
        """
        return self.info(token) is not None

    def info(self, token: str) -> CheckpointInfo | None:
        """Return the header of checkpoint ``token``, or ``None`` when it is missing or bad."""
        path = self.path(token)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("checkpoint %s cannot be opened: %s", path, exc)
            return None
        try:
            st = os.fstat(fd)
            header, _ = _parse_header(fd, st.st_size, token)
        except _Invalid as exc:
            self._set_aside(path, st.st_ino, str(exc))
            return None
        except OSError as exc:
            logger.warning("checkpoint %s cannot be read: %s", path, exc)
            return None
        finally:
            os.close(fd)
        return _info(header, path)

    # -- writing -----------------------------------------------------------------------

    def save(self, token: str, value: Any, *, key: Key = None) -> CheckpointInfo:
        """Write ``value`` as the checkpoint ``token``, atomically.

        Parameters
        ----------
        token
            The identity token of the task that computed ``value``.
        value
            The result; anything ``runtime.serialize`` can serialize.
        key
            The task's key, recorded in the header for people (``hpc checkpoints list``).

        Raises
        ------
        SerializationError
            ``value`` cannot be serialized.
        OSError
            The directory cannot be written.
        """
        from runtime import serialize

        path = self.path(token)
        frames = serialize.dumps(
            value,
            compression=self.compression,  # type: ignore[arg-type]  # checked by config
            context=f"the checkpoint of {key!r}",
        )
        crc = 0
        sizes = []
        for frame in frames:
            crc = zlib.crc32(frame, crc)
            sizes.append(memoryview(frame).nbytes)
        header: dict[str, Any] = {
            "token": token,
            "key": repr(key),
            "nbytes": sum(sizes),
            "frames": sizes,
            "checksum": f"{crc:08x}",
            "checksum-algorithm": _CHECKSUM,
            "created": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": _job_id(),
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
        }
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        shard = os.path.dirname(path)
        os.makedirs(shard, exist_ok=True)
        temp = os.path.join(
            shard, f".{token}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        )
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX.pack(_MAGIC, FORMAT_VERSION, len(text)))
                f.write(text)
                f.write(hashlib.blake2b(text, digest_size=_HEADER_DIGEST).digest())
                for frame in frames:
                    f.write(frame)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if self.fsync:
            _fsync_directory(shard)
        return _info(header, path)

    # -- reading -----------------------------------------------------------------------

    def load(self, token: str) -> Any:
        """Return the value stored as checkpoint ``token``, after verifying its checksum.

        Raises
        ------
        CheckpointError
            The checkpoint is missing, truncated or corrupted (then it is logged and
            moved aside), or cannot be deserialized in this process. Either way the
            caller should compute the task instead.
        """
        from runtime import serialize

        path = self.path(token)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(
                f"no checkpoint {token} in {self.directory}", token, path
            ) from None
        except OSError as exc:
            raise CheckpointError(
                f"checkpoint {path} cannot be opened: {exc}", token, path
            ) from exc
        try:
            st = os.fstat(fd)
            try:
                header, _ = _parse_header(fd, st.st_size, token)
                buffer = bytearray(header["nbytes"])
                view = memoryview(buffer)
                got = 0
                while got < len(buffer):
                    n = os.readv(fd, [view[got:]])
                    if not n:
                        break
                    got += n
                if got != len(buffer):
                    raise _Invalid(f"truncated: payload ends after {got} of {len(buffer)} bytes")
                if _payload_digest(header, buffer) != header.get("checksum"):
                    raise _Invalid("payload checksum mismatch")
            except _Invalid as exc:
                self._set_aside(path, st.st_ino, str(exc))
                raise CheckpointError(
                    f"checkpoint {path} is damaged ({exc}); it was set aside and the task "
                    "will be computed again",
                    token,
                    path,
                ) from None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read: {exc}", token, path) from exc
        finally:
            os.close(fd)
        frames = []
        start = 0
        for size in header["frames"]:
            frames.append(view[start : start + size])
            start += size
        try:
            return serialize.loads(frames, context=f"checkpoint {path}")
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded here: {exc}; it is left in place and "
                "the task will be computed again",
                token,
                path,
            ) from exc

    # -- listing and cleaning ------------------------------------------------------------

    def _files(self) -> Iterator[tuple[os.DirEntry[str], str]]:
        """Yield ``(entry, kind)`` for our files: kind is ckpt, corrupt or temp."""
        try:
            shards = sorted(
                (e for e in os.scandir(self.directory) if e.is_dir() and _SHARD.match(e.name)),
                key=lambda e: e.name,
            )
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = sorted(os.scandir(shard.path), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                if _FILE.match(name):
                    yield entry, "ckpt"
                elif name.endswith(_SUFFIX + _CORRUPT) and _FILE.match(name[: -len(_CORRUPT)]):
                    yield entry, "corrupt"
                elif name.startswith(".") and name.endswith(".tmp"):
                    yield entry, "temp"

    def list(self, *, verify: bool = False) -> list[CheckpointInfo]:
        """Return every checkpoint in the directory, by token.

        Parameters
        ----------
        verify
            Also verify each payload's checksum (reads every file completely).
            Without it, files are checked like :meth:`exists` does, but bad ones are
            listed (``valid=False``) rather than moved aside.
        """
        found = []
        for entry, kind in self._files():
            if kind != "ckpt":
                continue
            token = entry.name[: -len(_SUFFIX)]
            found.append(self._describe(entry.path, token, verify))
        return found

    def _describe(self, path: str, token: str, verify: bool) -> CheckpointInfo:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            return _broken(path, token, str(exc))
        try:
            st = os.fstat(fd)
            header, _ = _parse_header(fd, st.st_size, token)
        except (_Invalid, OSError) as exc:
            return _broken(path, token, str(exc), mtime=_mtime(path))
        finally:
            os.close(fd)
        if verify:
            try:
                self.load(token)
            except CheckpointError as exc:
                return _broken(path, token, str(exc), mtime=header.get("created", 0.0))
        return _info(header, path)

    def clean(self, older_than: float | None = None, *, dry_run: bool = False) -> CleanResult:
        """Delete checkpoints (and leftovers) last modified more than ``older_than`` s ago.

        Parameters
        ----------
        older_than
            Age in seconds; ``None`` removes every checkpoint.
        dry_run
            Only report what would be removed.

        Notes
        -----
        Files set aside as corrupt follow the same age rule. Temporary files of
        interrupted writes are removed only when older than both ``older_than`` and an
        hour, so that a write in progress elsewhere is never cut short. Only files named
        like ours are touched; anything else in the directory is left alone.
        """
        now = time.time()
        limit = None if older_than is None else now - older_than
        temp_limit = now - max(_TEMP_GRACE, older_than or 0.0)
        removed = []
        nbytes = 0
        for entry, kind in self._files():
            try:
                st = entry.stat()
            except OSError:
                continue
            if kind == "temp":
                if st.st_mtime >= temp_limit:
                    continue
            elif limit is not None and st.st_mtime >= limit:
                continue
            if not dry_run:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
            removed.append(entry.path)
            nbytes += st.st_size
        return CleanResult(len(removed), nbytes, tuple(removed))

    def _set_aside(self, path: str, inode: int, reason: str) -> None:
        """Move a bad file out of the way (unless a writer replaced it meanwhile)."""
        try:
            if os.stat(path).st_ino != inode:
                return  # rewritten since we opened it: the new file is someone else's
            os.replace(path, path + _CORRUPT)
            logger.warning(
                "checkpoint %s is damaged (%s); moved to %s", path, reason, path + _CORRUPT
            )
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "checkpoint %s is damaged (%s) and cannot be moved: %s", path, reason, exc
            )
            with contextlib.suppress(OSError):
                os.unlink(path)


def _info(header: Mapping[str, Any], path: str) -> CheckpointInfo:
    return CheckpointInfo(
        token=str(header.get("token")),
        key=str(header.get("key")),
        nbytes=int(header.get("nbytes") or 0),
        created=float(header.get("created") or 0.0),
        host=header.get("host"),
        pid=header.get("pid"),
        job_id=header.get("job_id"),
        path=path,
    )


def _broken(path: str, token: str, problem: str, mtime: float = 0.0) -> CheckpointInfo:
    return CheckpointInfo(token, "?", 0, mtime, None, None, None, path, False, problem)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _fsync_directory(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=64)
def _cached_store(directory: str, fsync: bool, compression: str) -> CheckpointStore:
    return CheckpointStore(directory, fsync=fsync, compression=compression)


def get_store(directory: str | os.PathLike[str]) -> CheckpointStore:
    """Return a (cached) :class:`CheckpointStore` for ``directory`` with the current config."""
    return _cached_store(
        os.path.abspath(os.fspath(directory)),
        bool(config.get("checkpoint.fsync", True)),
        str(config.get("checkpoint.compression", "none")),
    )


# The scheduler and the workers call these three with what travels in messages: a
# directory and a token. None of them raises for a bad or missing checkpoint.


def stored(directory: str, token: str) -> bool:
    """Whether checkpoint ``token`` exists in ``directory`` and looks complete (never raises).

    What the scheduler asks before it runs a task: reads the file's header, never its
    payload, and never unpickles anything.
    """
    try:
        return get_store(directory).exists(token)
    except Exception as exc:  # a bad token, an unreadable directory: treat as missing
        logger.warning("cannot look up checkpoint %s in %s: %s", token, directory, exc)
        return False


_LOOKUP_THREADS = 16
# Lookups slower than this (a parallel filesystem's metadata round trip) run in
# _LOOKUP_THREADS threads; faster ones (a local disk) run one after another.
_SLOW_LOOKUP = 200e-6
_LOOKUP_SAMPLE = 8
_lookup_pool: Any = None
_lookup_pool_lock = threading.Lock()


def lookup_ahead(
    msg: Mapping[str, Any], lookup: Callable[[str, str], bool] | None = None
) -> dict[tuple[str, str], bool]:
    """Look up the checkpoints a scheduler will ask about, ahead of it (in a thread).

    ``msg`` is an ``update-graph``. The walk is the scheduler's: the wanted keys
    first; the inputs of a task whose checkpoint is missing next; and so on - so only
    checkpoints something still needs are looked at, as when the scheduler asks one
    by one, but none of them blocks the scheduler's event loop, and when lookups are
    slow (a parallel filesystem's metadata round trip: more than 0.2 ms each, judged
    on the first few) a level's lookups overlap in threads.

    Returns
    -------
    dict
        ``{(directory, token): stored}`` for every checkpoint looked up.
    """
    global _lookup_pool
    ask = stored if lookup is None else lookup
    where: dict[Key, tuple[str, str]] = {}
    field = msg.get("checkpoint")
    for part in field if isinstance(field, list) else [field] if field else []:
        directory = part.get("directory")
        if directory:
            for key, token in (part.get("tokens") or {}).items():
                where[key] = (str(directory), str(token))
    if not where:
        return {}
    with _lookup_pool_lock:
        if _lookup_pool is None:
            import concurrent.futures

            _lookup_pool = concurrent.futures.ThreadPoolExecutor(
                _LOOKUP_THREADS, thread_name_prefix="hpc-checkpoint-lookup"
            )
        pool = _lookup_pool
    dependencies = msg.get("dependencies") or {}
    level = list(dict.fromkeys(k for k in msg.get("keys") or () if k in where))
    seen = set(level)
    found: dict[tuple[str, str], bool] = {}
    slow = None  # whether lookups take long enough for threads to pay off
    while level:
        answers: list[bool] = []
        if slow is None:
            sample = level[:_LOOKUP_SAMPLE]
            start = time.perf_counter()
            answers = [bool(ask(*where[k])) for k in sample]
            slow = (time.perf_counter() - start) / len(sample) > _SLOW_LOOKUP
        rest = level[len(answers) :]
        if slow and len(rest) > 1:
            answers += pool.map(lambda k: bool(ask(*where[k])), rest)
        else:  # a local disk answers in microseconds: threads would only contend
            answers += [bool(ask(*where[k])) for k in rest]
        following: list[Key] = []
        for key, ok in zip(level, answers, strict=True):
            found[where[key]] = ok
            if not ok:
                for dep in dependencies.get(key) or ():
                    if dep in where and dep not in seen:
                        seen.add(dep)
                        following.append(dep)
        level = following
    return found


def load(directory: str, token: str) -> Any:
    """Load checkpoint ``token`` from ``directory``; :class:`CheckpointError` if unusable."""
    return get_store(directory).load(token)


_failed_directories: set[str] = set()
_failed_lock = threading.Lock()


def save_quietly(directory: str, token: str, value: Any, key: Key = None) -> bool:
    """Save a checkpoint; on failure log it (once per directory) and return False.

    A result that cannot be checkpointed is still a result: the computation goes on.
    """
    try:
        get_store(directory).save(token, value, key=key)
    except Exception as exc:
        with _failed_lock:
            first = directory not in _failed_directories
            _failed_directories.add(directory)
        log = logger.warning if first else logger.debug
        log(
            "cannot write the checkpoint of %r to %s: %s: %s%s",
            key,
            directory,
            type(exc).__name__,
            exc,
            " (further failures in this directory are logged at debug level)" if first else "",
        )
        return False
    return True


class CheckpointWriter:
    """One thread that writes checkpoints for the threads that computed the results.

    A pool thread that finished a task hands its result here and starts its next task
    while the file is written, so the fsyncs overlap with computing instead of adding
    to it. ``then`` runs in the writer thread once the file is written (or the write
    failed, which :func:`save_quietly` logs): the caller reports the task there, so a
    task reported finished still has its checkpoint on disk.

    At most ``backlog`` results wait; beyond that :meth:`submit` returns ``False`` and
    the caller writes the file itself, which holds computing back to the pace of the
    disk rather than letting results pile up in memory.
    """

    def __init__(self, backlog: int, name: str = "hpc-checkpoint-writer") -> None:
        if backlog < 1:
            raise ValueError(f"backlog must be at least 1, not {backlog}")
        self.backlog = backlog
        self.name = name
        self._queue: collections.deque[tuple[str, str, Any, Key, Callable[[], object]]]
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False

    def submit(
        self, directory: str, token: str, value: Any, key: Key, then: Callable[[], object]
    ) -> bool:
        """Queue a write; ``False`` (nothing queued) when the backlog is full or closed."""
        with self._cond:
            if self._closed or len(self._queue) >= self.backlog:
                return False
            self._queue.append((directory, token, value, key, then))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no more writes are taken)."""
        return self._closed

    def pending(self) -> int:
        """Writes queued or in progress."""
        with self._cond:
            return len(self._queue) + self._busy

    def _run(self) -> None:
        cond = self._cond
        queue = self._queue
        while True:
            with cond:
                self._busy = False
                cond.notify_all()  # for close()
                while not queue and not self._closed:
                    cond.wait()
                if not queue:
                    return
                directory, token, value, key, then = queue.popleft()
                self._busy = True
            save_quietly(directory, token, value, key)
            del value
            try:
                then()
            except Exception:  # a reporting bug must not stop later writes
                logger.exception("reporting the checkpoint of %r failed", key)

    def close(self, timeout: float | None = None) -> int:
        """Take no more writes and wait up to ``timeout`` s for the queued ones.

        Returns how many were still queued or in progress at the timeout (0: all done).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return len(self._queue) + self._busy


# -------------------------------------------------------------------------- identity


class Uncheckpointed:
    """A function whose tasks are never checkpointed: see :func:`uncheckpointed`."""

    __slots__ = ("__name__", "func")
    __hpc_checkpoint__ = False

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"uncheckpointed({self.func!r})"

    def __reduce__(self) -> tuple:
        return (Uncheckpointed, (self.func,))

    def __hpc_tokenize__(self) -> Any:
        return ("uncheckpointed", normalize_token(self.func))


def uncheckpointed(func: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``func`` impure: its tasks, and everything computed from them, are not checkpointed.

    ``hpc.delayed(func, checkpoint=False)`` does this. The returned callable behaves
    like ``func``.
    """
    if getattr(func, "__hpc_checkpoint__", True) is False:
        return func
    return Uncheckpointed(func)


class _Opaque(Exception):
    """A task has no identity (internal)."""


_client_future: list[Any] = []


def _future_type() -> Any:
    """The distributed ``Future`` class, if that module is loaded (no import otherwise)."""
    if not _client_future:
        module = sys.modules.get("runtime.client")
        if module is None:
            return None
        _client_future.append(module.Future)
    return _client_future[0]


def _shape(value: Any, dsk: Mapping[Key, Any], tokens: Mapping[Key, str | None]) -> Any:
    """``value`` with every reference to a key replaced by that key's identity.

    Walks a task exactly as :func:`runtime.graph.execute_task` evaluates it, so a
    reference here is a reference there.
    """
    typ = type(value)
    if typ is tuple and value and callable(value[0]):
        head = value[0]
        if getattr(head, "__hpc_checkpoint__", True) is False:
            raise _Opaque
        return ("task", head, [_shape(a, dsk, tokens) for a in value[1:]])
    if typ is list:
        return ("list", [_shape(a, dsk, tokens) for a in value])
    try:
        is_key = value in dsk or value in tokens
    except TypeError:  # unhashable: a literal, unless a list subclass
        if isinstance(value, list):
            return ("list", [_shape(a, dsk, tokens) for a in value])
        is_key = False
    if is_key:
        token = tokens.get(value)
        if token is None:
            raise _Opaque
        return ("key", token)
    future = _future_type()
    if future is not None and isinstance(value, future):
        raise _Opaque  # data held by a cluster: its content has no identity here
    return ("value", value)


def _identity(value: Any, dsk: Mapping[Key, Any], tokens: Mapping[Key, str | None]) -> str | None:
    try:
        normalized = normalize_token((_IDENTITY_SALT, _shape(value, dsk, tokens)))
    except (_Opaque, TokenizationError):
        return None
    text = repr(normalized)
    if _RANDOM_MARK in text:
        return None  # something was tokenized at random: the identity would never recur
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def identity_tokens(
    dsk: Mapping[Key, Any],
    keys: Iterable[Key] | None = None,
    *,
    inputs: Mapping[Key, str | None] | None = None,
) -> dict[Key, str]:
    """Return the identity token of every key ``keys`` need, computed bottom-up.

    The token of a task hashes its function, its literal arguments and the tokens of
    its dependencies (never their keys): see the module docstring for the rule and
    what it cannot see.

    Parameters
    ----------
    dsk
        The graph (before fusing linear chains, so that fusion changes nothing).
    keys
        A key or (nested) list of keys; default: every key of ``dsk``.
    inputs
        Identities of keys referred to but not in ``dsk`` (e.g. results held by a
        cluster); ``None`` for an unknown identity.

    Returns
    -------
    dict
        ``{key: token}`` for the keys with an identity. Keys left out are not
        checkpointed: tasks opted out with ``checkpoint=False``, tasks whose
        arguments cannot be tokenized deterministically, and everything downstream of
        either.

    Examples
    --------
    >>> from operator import add
    >>> a = identity_tokens({'x': 1, 'y': (add, 'x', 10)})
    >>> b = identity_tokens({'p': 1, 'q': (add, 'p', 10)})
    >>> a['y'] == b['q']  # the same computation under other names
    True
    >>> c = identity_tokens({'x': 2, 'y': (add, 'x', 10)})
    >>> a['y'] == c['y']  # another input
    False
    """
    if keys is None:
        wanted: list[Key] = list(dsk)
    else:
        wanted = list(_graph.flatten(keys)) if isinstance(keys, list) else [keys]
    known: dict[Key, str | None] = dict(inputs or {})
    found, deps = _graph._index_graph(dsk, wanted, known or None)
    state = [0] * len(found)  # 0 new, 1 dependencies pushed, 2 done
    for root in range(len(found)):
        if state[root]:
            continue
        stack = [root]
        while stack:
            i = stack[-1]
            if state[i] == 2:
                stack.pop()
                continue
            if state[i] == 0:
                state[i] = 1
                stack.extend(j for j in deps[i] if state[j] == 0)
                continue
            stack.pop()
            state[i] = 2
            key = found[i]
            if key in known:
                continue  # an input given by the caller
            known[key] = _identity(dsk[key], dsk, known)
    return {k: t for k, t in known.items() if t is not None and k in dsk}


def _storable(value: Any) -> bool:
    """Whether ``value`` is a computation worth storing (not a literal, alias or load)."""
    if type(value) is not tuple or not value or not callable(value[0]):
        return False
    head = value[0]
    return not isinstance(head, (_graph.literal, _Load))


# ------------------------------------------------------------- running with checkpoints


def _nothing() -> None:
    pass


class _Load:
    """Task head: load a checkpoint (``(_Load(directory, token, key),)``)."""

    __slots__ = ("directory", "key", "token")

    def __init__(self, directory: str, token: str, key: str = "") -> None:
        self.directory = directory
        self.token = token
        self.key = key

    def __call__(self) -> Any:
        return load(self.directory, self.token)

    def __repr__(self) -> str:
        return f"<load checkpoint {self.token} of {self.key}>"

    def __reduce__(self) -> tuple:
        return (_Load, (self.directory, self.token, self.key))

    def __hpc_tokenize__(self) -> Any:
        # What is loaded, wherever the directory is: moving it keeps identities.
        return ("checkpoint", self.token)


class _Save:
    """Task head: return its argument, after saving it as a checkpoint.

    With a ``writer`` (in-process schedulers only: it is not pickled) the value is
    returned at once and written by the writer's thread, unless its backlog is full.
    """

    __slots__ = ("directory", "key", "token", "writer")

    def __init__(
        self, directory: str, token: str, key: Key = None, writer: CheckpointWriter | None = None
    ) -> None:
        self.directory = directory
        self.token = token
        self.key = key
        self.writer = writer

    def __call__(self, value: Any) -> Any:
        writer = self.writer
        if writer is None or not writer.submit(
            self.directory, self.token, value, self.key, _nothing
        ):
            save_quietly(self.directory, self.token, value, self.key)
        return value

    def __repr__(self) -> str:
        return f"<save checkpoint {self.token} of {self.key!r}>"

    def __reduce__(self) -> tuple:
        return (_Save, (self.directory, self.token, self.key))


def resolve_directory(checkpoint: Any = None) -> str | None:
    """Return the checkpoint directory a computation should use, or ``None`` for none.

    Parameters
    ----------
    checkpoint
        A directory (str or path), ``False`` for no checkpoints, ``True`` for the
        ``checkpoint.directory`` config value (which must then be set), or ``None``
        for that config value if it is set and no checkpoints otherwise.

    Raises
    ------
    ConfigError
        ``checkpoint=True`` without a configured directory, or a value of another type.
    """
    if checkpoint is None or checkpoint is True:
        directory = config.get("checkpoint.directory", None)
        if directory is None:
            if checkpoint is True:
                raise ConfigError(
                    "checkpoint=True needs a directory: pass checkpoint='/shared/path' or "
                    "set the checkpoint.directory config value"
                )
            return None
        return os.path.abspath(os.path.expanduser(str(directory)))
    if checkpoint is False:
        return None
    if isinstance(checkpoint, CheckpointSpec):
        return checkpoint.directory
    if isinstance(checkpoint, (str, os.PathLike)):
        return os.path.abspath(os.path.expanduser(os.fspath(checkpoint)))
    raise ConfigError(f"checkpoint={checkpoint!r}: expected a directory, True, False or None")


class CheckpointSpec:
    """How one graph is checkpointed: the directory and each storable task's identity.

    Built by :func:`checkpoint_spec` before the graph is optimized; then handed to a
    local scheduler (:meth:`run_local`) or sent along with the graph to the
    distributed scheduler (:meth:`message`).

    Attributes
    ----------
    directory : str
        Where the checkpoints are.
    tokens : dict
        ``{key: identity token}`` of the tasks to look up and save.
    """

    __slots__ = ("directory", "tokens")

    def __init__(self, directory: str, tokens: Mapping[Key, str]) -> None:
        self.directory = directory
        self.tokens = dict(tokens)

    def __repr__(self) -> str:
        return f"<CheckpointSpec {self.directory!r}: {len(self.tokens)} tasks>"

    def message(self, keys: Iterable[Key]) -> dict[str, Any]:
        """The ``checkpoint`` field of an ``update-graph`` message sending ``keys``."""
        tokens = self.tokens
        return {
            "directory": self.directory,
            "tokens": {k: tokens[k] for k in keys if k in tokens},
        }

    def plan(
        self,
        dsk: Mapping[Key, Any],
        keys: Any,
        store: CheckpointStore,
        skip: Iterable[str] = (),
        writer: CheckpointWriter | None = None,
    ) -> tuple[dict[Key, Any], dict[str, Key]]:
        """Cut ``dsk`` at valid checkpoints and make every other storable task save.

        Walks down from ``keys``: a needed task with a checkpoint becomes a load, and
        what only it needed is left out (so only checkpoints something still needs
        are read); every other task with an identity saves its result (through
        ``writer`` when given: only for schedulers that run tasks in this process).

        Returns
        -------
        graph, loads
            The graph to run, and ``{token: key}`` of the checkpoints it loads.
        """
        tokens = self.tokens
        bad = set(skip)
        out: dict[Key, Any] = {}
        loads: dict[str, Key] = {}
        stack = list(_graph.flatten(keys)) if isinstance(keys, list) else [keys]
        directory = self.directory
        while stack:
            key = stack.pop()
            if key in out:
                continue
            task = dsk[key]
            token = tokens.get(key)
            if token is not None and _storable(task):
                if token not in bad and store.exists(token):
                    out[key] = (_Load(directory, token, repr(key)),)
                    loads[token] = key
                    continue
                out[key] = (_Save(directory, token, key, writer), task)
            else:
                out[key] = task
            stack.extend(d for d in _graph.get_dependencies(dsk, key) if d not in out)
        return out, loads

    def run_local(
        self, get: Callable[..., Any], dsk: Mapping[Key, Any], keys: Any, **kwargs: Any
    ) -> Any:
        """Run ``dsk`` with a local ``get``, reusing and writing checkpoints.

        A checkpoint found damaged while loading is set aside and the graph planned and
        run again: tasks finished meanwhile are then loaded, the damaged one computed.
        """
        store = get_store(self.directory)
        skip: set[str] = set()
        writer = _in_process_writer(get, kwargs)
        try:
            while True:
                graph, loads = self.plan(dsk, keys, store, skip, writer)
                if loads:
                    logger.info("reusing %d checkpoints from %s", len(loads), self.directory)
                try:
                    return get(graph, keys, **kwargs)
                except CheckpointError as exc:
                    if exc.token not in loads or exc.token in skip:
                        raise
                    logger.warning("%s; computing %r again", exc, loads[exc.token])
                    skip.add(exc.token)
        finally:
            if writer is not None:
                writer.close()  # every checkpoint is written when the results return


def _in_process_writer(
    get: Callable[..., Any], kwargs: Mapping[str, Any]
) -> CheckpointWriter | None:
    """A writer thread for a local scheduler running tasks in this process, else ``None``.

    The threads and sync schedulers go on to the next task while a result is written;
    the process pool writes in its workers, which nobody could wait for here.
    """
    from runtime import local

    if get not in (local.get_sync, local.get_threads):
        return None
    if not config.get("checkpoint.background-writes", True):
        return None
    threads = kwargs.get("num_workers") or os.cpu_count() or 1
    return CheckpointWriter(max(2, int(threads)))


def checkpoint_target(checkpoint: Any) -> CheckpointSpec | str | None:
    """Resolve a ``checkpoint=`` argument without looking at any graph.

    Returns the :class:`CheckpointSpec` given, else the directory (see
    :func:`resolve_directory`), or ``None`` when the computation is not checkpointed.
    """
    if isinstance(checkpoint, CheckpointSpec):
        return checkpoint
    return resolve_directory(checkpoint)


def checkpoint_spec(
    checkpoint: Any,
    dsk: Mapping[Key, Any],
    keys: Any,
    *,
    inputs: Mapping[Key, str | None] | None = None,
) -> CheckpointSpec | None:
    """Return how to checkpoint ``dsk`` (computing ``keys``), or ``None`` for not at all.

    Parameters
    ----------
    checkpoint
        As for :func:`resolve_directory`; a :class:`CheckpointSpec` is returned as is.
    dsk
        The graph, before fusion.
    keys
        The keys to compute.
    inputs
        Identities of keys outside ``dsk``, as for :func:`identity_tokens`.
    """
    if isinstance(checkpoint, CheckpointSpec):
        return checkpoint
    directory = resolve_directory(checkpoint)
    if directory is None:
        return None
    tokens = identity_tokens(dsk, keys, inputs=inputs)
    return CheckpointSpec(directory, {k: t for k, t in tokens.items() if _storable(dsk[k])})


# --------------------------------------------------------------------- explicit form


def checkpoint(obj: Any, directory: Any = None, **compute_kwargs: Any) -> Any:
    """Compute ``obj``, write its result to ``directory``, return it as a lazy load.

    The returned object's graph is one task that loads the stored result, so the
    lineage that computed it is cut: the cure for graphs that grow with every step of
    an iterative algorithm. When the result is already stored (the same computation
    checkpointed before, e.g. by an earlier run of the script), nothing is computed.

    Parameters
    ----------
    obj
        A ``Delayed``, or a list or tuple of them (returned in the same shape).
    directory
        Where to write; default: the ``checkpoint.directory`` config value.
    **compute_kwargs
        Passed to ``hpc.compute`` (``scheduler=``...). Only the results of ``obj``
        are written, not those of the tasks leading to them.

    Returns
    -------
    Delayed, or a list/tuple of them
        Equal in value to ``obj``; their identities (for later checkpoints) are those
        of the stored results.

    Raises
    ------
    CheckpointError
        ``obj`` has no identity (it depends on a task opted out with
        ``checkpoint=False`` or on objects without a deterministic token), or its
        result could not be written.

    Examples
    --------
    >>> import tempfile
    >>> from runtime.delayed import delayed
    >>> x = delayed(sum)([1, 2, 3])
    >>> y = checkpoint(x, tempfile.mkdtemp(), scheduler="sync")
    >>> (y + 1).compute(scheduler="sync")
    7
    """
    from runtime.compute import compute, get_scheduler
    from runtime.delayed import Delayed, collect_graph

    where = resolve_directory(True if directory is None else directory)
    assert where is not None
    single = isinstance(obj, Delayed)
    objs = [obj] if single else list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if not all(isinstance(o, Delayed) for o in objs):
        raise TypeError(
            f"hpc.checkpoint takes a Delayed or a list/tuple of them, not {type(obj).__name__}"
        )
    keys = [o.key for o in objs]
    tokens = identity_tokens(collect_graph(objs), keys)
    missing = [k for k in keys if k not in tokens]
    if missing:
        raise CheckpointError(
            f"cannot checkpoint {missing[0]!r}: it has no identity, because it depends on a "
            "task marked checkpoint=False or on an argument that cannot be tokenized "
            "deterministically (give its type a __hpc_tokenize__ method)"
        )
    store = get_store(where)
    todo = [o for o in objs if not store.exists(tokens[o.key])]
    if todo:
        spec = CheckpointSpec(where, {o.key: tokens[o.key] for o in todo})
        get = get_scheduler(compute_kwargs.get("scheduler"))
        client = getattr(get, "__self__", None)
        futures: list[Any] = []
        values: Any = None
        if client is not None and hasattr(client, "gather"):
            # On a cluster the workers write the results; they need not reach us.
            from runtime.client import wait

            kwargs = {k: v for k, v in compute_kwargs.items() if k != "scheduler"}
            futures = client.compute(todo, checkpoint=spec, **kwargs)
            wait(futures)
            for future in futures:
                error = future.exception()
                if error is not None:
                    raise error
        else:
            values = compute(*todo, checkpoint=spec, **compute_kwargs)
        for i, o in enumerate(todo):
            token = tokens[o.key]
            if store.exists(token):
                continue
            # The writer failed (it logged why): write it from here, or give up.
            value = values[i] if values is not None else futures[i].result()
            try:
                store.save(token, value, key=o.key)
            except Exception as exc:
                raise CheckpointError(
                    f"cannot write the checkpoint of {o.key!r} to {where}: {exc}", token
                ) from exc
    loaded = [
        Delayed(f"checkpoint-{tokens[k]}", (_Load(where, tokens[k], repr(k)),), length=o._length)
        for o, k in zip(objs, keys)
    ]
    if single:
        return loaded[0]
    return type(obj)(loaded) if isinstance(obj, tuple) else loaded
