"""Authenticated, framed message batches over TCP.

Every connection between cluster processes (client, scheduler, workers) is a
:class:`Comm`. A comm carries *batches*: ``comm.write([msg, msg, ...])`` sends a list
of message dicts as one unit and ``await comm.read()`` returns the next list.

Life of a connection::

    connect()                                  listen() -> Listener
      |  TCP connect                             |  accept
      |<------- greeting: magic, version, server nonce (40 bytes)
      |-------> proof: magic, version, client nonce, HMAC(client) (72 bytes)
      |                                          |  verify, or refuse and close
      |<------- reply: status, HMAC(server) (33 bytes) + server hello (JSON)
      |  verify                                  |
      |-------> client hello (JSON)              |  handler(comm)
      |                                          |
      |<======= framed batches, both ways ======>|

Until both proofs are checked only fixed-size raw bytes and a bounded JSON document
are read: no pickle is touched before authentication. The HMACs (SHA-256, keyed by the
cluster secret) cover both nonces and a label per direction, so a proof can be neither
replayed nor reflected back at its sender. Traffic is not encrypted: like Dask without
TLS, this keeps out every process that does not know the secret, not an attacker who
can intercept and rewrite traffic on the network path.

Framing: ``[u32 nframes][u64 length] * nframes`` (little-endian), then the frames,
which come from ``runtime.serialize.dumps`` of the batch, so large buffers (NumPy
arrays) are written without being copied into a pickle. A header that declares too
many frames or more than ``distributed.comm.max-message-size`` bytes closes the
connection before anything is allocated.

State kept here, per comm (nothing is process-wide):

- one receive buffer (64 KiB, reused). A large batch is received straight into memory
  of its exact size (an anonymous mmap above 1 MiB), which its arrays then keep;
- received but unread batches, still as frames: they are unpickled by ``read()``, in
  the reader's task. Reading from the socket pauses when they exceed 64 MiB;
- large outgoing batches not yet handed to the transport: they are streamed a chunk at
  a time from the frames' own memory, so sending 256 MB copies at most a chunk of it.
  Small batches go to the transport at once, as one joined write.

:class:`BatchedSend` coalesces the messages produced during one event-loop iteration
into a single write, with no timer: a lone message leaves at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import mmap
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from runtime import config
from runtime.errors import (
    CommClosedError,
    CommError,
    ConfigError,
    HandshakeError,
)
from runtime.protocol import Role, versions
from runtime.rendezvous import read_scheduler_file as read_scheduler_file
from runtime.rendezvous import write_scheduler_file as write_scheduler_file
from runtime.serialize import dumps, loads
from runtime.units import parse_bytes, parse_timedelta

__all__ = [
    "BatchedSend",
    "Comm",
    "Listener",
    "PROTOCOL_VERSION",
    "connect",
    "format_address",
    "get_ip",
    "listen",
    "new_secret",
    "parse_address",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
"""Version of the wire protocol (handshake and framing); peers must match exactly."""

_MAGIC = b"HPCTK\x00"
_GREETING = struct.Struct("<6sH32s")  # magic, protocol version, server nonce
_PROOF = struct.Struct("<6sH32s32s")  # magic, protocol version, client nonce, client HMAC
_REPLY = struct.Struct("<B32s")  # status, server HMAC
_STATUS_OK = 1
_STATUS_BAD_SECRET = 2
_STATUS_BAD_VERSION = 3
_CLIENT_LABEL = b"hpc-toolkit comm v1 client"
_SERVER_LABEL = b"hpc-toolkit comm v1 server"
_NONCE_BYTES = 32
_SECRET_BYTES = 32

_HELLO_LENGTH = struct.Struct("<I")
_MAX_HELLO_BYTES = 64 * 1024

_NFRAMES = struct.Struct("<I")
_MAX_FRAMES = 1 << 20
_RECV_BUFFER = 64 * 1024  # reused receive buffer for small messages
_MIN_RECV = 4096  # make room in the receive buffer when less than this is free
_LARGE_BODY = 256 * 1024  # bodies above this are received into a buffer of their own
_MMAP_BODY = 1024 * 1024  # ... which is an anonymous mmap from this size on
_JOIN_LIMIT = 64 * 1024  # batches below this go out as one joined bytes object
_READ_HIGH_WATER = 64 * 1024 * 1024  # unread bytes queued before reading pauses
_STREAM_BODY = 1024 * 1024  # batches above this are streamed in chunks (see _Protocol.send)
_CHUNK = 1024 * 1024  # piece of a streamed batch handed to the transport at a time
_WRITE_HIGH_WATER = 1024 * 1024  # transport-buffered bytes above which streaming waits
_WRITE_LOW_WATER = 256 * 1024  # ... and below which it continues


def _seconds(value: float | str | None, key: str) -> float:
    seconds = parse_timedelta(config.get(key) if value is None else value)
    assert seconds is not None
    return seconds


def _nbytes(value: int | str | None, key: str) -> int:
    return parse_bytes(config.get(key) if value is None else value)


# --------------------------------------------------------------------------- addresses


def parse_address(address: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` into ``(host, port)``.

    Parameters
    ----------
    address
        ``tcp://host:port``; IPv6 hosts in brackets (``tcp://[::1]:8786``). The
        ``tcp://`` prefix may be omitted.

    Returns
    -------
    tuple
        ``(host, port)`` with IPv6 brackets removed.

    Raises
    ------
    CommError
        For another scheme, a missing or invalid port, or a malformed host.

    Examples
    --------
    >>> parse_address("tcp://127.0.0.1:8786")
    ('127.0.0.1', 8786)
    >>> parse_address("tcp://[::1]:0")
    ('::1', 0)
    """
    if not isinstance(address, str):
        raise CommError(f"address must be a string like 'tcp://host:port', not {address!r}")
    rest = address
    if "://" in address:
        scheme, rest = address.split("://", 1)
        if scheme != "tcp":
            raise CommError(
                f"unsupported address scheme {scheme!r} in {address!r}; use 'tcp://host:port'"
            )
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise CommError(f"malformed IPv6 address {address!r}; write 'tcp://[host]:port'")
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep or ":" in host:
            raise CommError(
                f"address {address!r} has no port; write 'tcp://host:port' (IPv6 hosts in brackets)"
            )
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535 or not host:
        raise CommError(f"invalid host or port in address {address!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """Return ``tcp://host:port``, bracketing IPv6 hosts.

    Examples
    --------
    >>> format_address("127.0.0.1", 8786)
    'tcp://127.0.0.1:8786'
    >>> format_address("::1", 8786)
    'tcp://[::1]:8786'
    """
    if ":" in host:
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def get_ip(interface: str | None = None) -> str:
    """Return an IP address of this host that peers can connect to.

    Parameters
    ----------
    interface
        A network interface name (``"ib0"``, ``"eth0"``, ``"lo"``): its IPv4 address,
        or its IPv6 address when it has none. None: the address of the interface that
        routes to the outside world (no packet is sent), or ``127.0.0.1`` on a host
        without a route.

    Raises
    ------
    ConfigError
        When the interface does not exist or has no IP address; the message lists the
        interfaces that do.
    """
    if interface is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                # UDP connect only selects a route; nothing goes on the wire.
                probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737)
                return str(probe.getsockname()[0])
            except OSError:
                return "127.0.0.1"
    import psutil

    interfaces = psutil.net_if_addrs()
    if interface not in interfaces:
        raise ConfigError(
            f"network interface {interface!r} not found on {socket.gethostname()}; "
            f"available: {', '.join(sorted(interfaces))}"
        )
    by_family: dict[int, str] = {}
    for snic in interfaces[interface]:
        if snic.family in (socket.AF_INET, socket.AF_INET6):
            by_family.setdefault(snic.family, snic.address.split("%", 1)[0])
    if not by_family:
        with_ip = sorted(
            name
            for name, addrs in interfaces.items()
            if any(a.family in (socket.AF_INET, socket.AF_INET6) for a in addrs)
        )
        raise ConfigError(
            f"network interface {interface!r} has no IP address; "
            f"interfaces with one: {', '.join(with_ip)}"
        )
    return by_family.get(socket.AF_INET) or by_family[socket.AF_INET6]


def new_secret() -> bytes:
    """Return a fresh cluster secret: 32 random bytes from the OS."""
    return secrets.token_bytes(_SECRET_BYTES)


def _coerce_secret(secret: bytes | bytearray | str | None) -> bytes:
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    elif isinstance(secret, str):
        try:
            key = bytes.fromhex(secret)
        except ValueError:
            raise HandshakeError(
                "the cluster secret must be bytes or a hex string (as in the scheduler file)"
            ) from None
    elif secret is None:
        raise HandshakeError(
            "no cluster secret given: pass the secret from the scheduler file "
            "(read_scheduler_file(path)['secret'])"
        )
    else:
        raise HandshakeError(f"the cluster secret must be bytes, not {type(secret).__name__}")
    if not key:
        raise HandshakeError("the cluster secret is empty")
    return key


def _peer_address(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return "tcp://<unknown>"


def _local_address(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("sockname")
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return "tcp://<unknown>"


# ------------------------------------------------------------------------ the protocol


def _receive_buffer(size: int) -> memoryview:
    """Return writable memory for one large incoming batch.

    Above a megabyte a private anonymous mmap: its pages come zeroed from the kernel
    on first touch, whereas ``bytearray(size)`` would first write zeros over all of
    it. Private (not shared) memory with the huge-page hint takes a fraction of the
    page faults, which bound the receive rate of large arrays. Arrays loaded from the
    batch share this memory and keep it alive.
    """
    if size >= _MMAP_BODY:
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        region = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
        hint = getattr(mmap, "MADV_HUGEPAGE", None)
        if hint is not None:
            with contextlib.suppress(OSError):
                region.madvise(hint)
        return memoryview(region)
    return memoryview(bytearray(size))


class _Protocol(asyncio.BufferedProtocol):
    """Both directions of one connection: raw bytes during the handshake, frames after.

    asyncio's transport calls :meth:`get_buffer` and the kernel writes straight into
    the returned memory, so large frames land in their final buffer without a copy.
    Frames are only *split* here; they are unpickled by :meth:`Comm.read`, and only
    once the handshake has switched this protocol to framed mode. Outgoing batches go
    through :meth:`send`.
    """

    def __init__(
        self,
        max_message_size: int,
        on_connection: Callable[[_Protocol], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._on_connection = on_connection
        self.compression = config.get("distributed.comm.compression")
        self.transport: asyncio.Transport | None = None
        self.max_message_size = max_message_size
        self.framed = False
        self.closed = False
        self.error: str | None = None  # why the connection ended, for CommClosedError
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte
        self._need = 0  # bytes wanted by the current raw read or partial header
        # a large message being received into its own buffer
        self._big_view: memoryview | None = None
        self._big_filled = 0
        self._big_lengths: tuple[int, ...] = ()
        self.messages: collections.deque[tuple[list[Any], int]] = collections.deque()
        self.queued_bytes = 0
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self.writing_paused = False  # the transport's buffer is above its high-water mark
        self._outgoing: collections.deque[memoryview] = collections.deque()
        self._close_when_sent = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost = self.loop.create_future()

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_connection is not None:
            self._on_connection(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big_view is not None:
            return self._big_view[self._big_filled :]
        if len(self._buf) - self._end < _MIN_RECV:
            self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big_view is not None:
            self._big_filled += nbytes
            if self._big_filled == len(self._big_view):
                self._finish_big()
                self._wake_reader()
            return
        self._end += nbytes
        if not self.framed:
            if self._read_waiter is not None and self._end - self._start >= self._need:
                self._wake_reader()
            if self._end == len(self._buf) and self._start == 0:
                # Full before the handshake consumed anything (a flood, or a peer
                # pipelining its first batch): stop reading until read_raw makes room.
                # Raw mode never grows the buffer.
                self._pause_reading()
            return
        if self._parse() and self._read_waiter is not None:
            self._wake_reader()

    def eof_received(self) -> bool:
        # The peer closed: no half-open connections. Batches already received stay
        # readable; unsent streamed data is dropped (see connection_lost).
        if not self.closed:
            self.closed = True
            self.error = "connection closed by the peer"
            self._close_when_sent = False
            self._wake_reader()
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        # Without an error the transport flushed its buffer before closing, so a
        # write is undelivered only if part of it never left _outgoing.
        delivered = exc is None and not self._outgoing
        self.closed = True
        if self.error is None:
            self.error = f"connection lost: {exc}" if exc else "connection closed by the peer"
        self._big_view = None
        self._outgoing.clear()
        self._close_when_sent = False
        if delivered:
            self.writing_paused = False
        self._wake_reader()
        self._wake_drainers()
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._outgoing:
            self._pump()
        if not self._outgoing:
            self._wake_drainers()

    # -- send side

    @property
    def backlogged(self) -> bool:
        """True while earlier writes still wait to reach the socket."""
        return self.writing_paused or bool(self._outgoing)

    def send(self, header: bytes, frames: list[Any], total: int) -> None:
        """Hand one framed batch to the transport, in order with earlier ones.

        Small batches are joined into one bytes object (one ``send`` syscall). Large
        ones are streamed from the frames' own memory a chunk at a time, while the
        transport's buffer is below its high-water mark: the transport then sends
        most of each chunk straight from it and copies at most a chunk, instead of
        copying (and repeatedly compacting) the whole batch.
        """
        transport = self.transport
        assert transport is not None
        if not self._outgoing and total <= _STREAM_BODY:
            if total <= _JOIN_LIMIT:
                transport.write(b"".join([header, *frames]))
            else:
                transport.write(header)
                for frame in frames:
                    transport.write(frame)
            return
        outgoing = self._outgoing
        outgoing.append(memoryview(header))
        for frame in frames:
            if len(frame):
                outgoing.append(memoryview(frame))
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        assert transport is not None
        outgoing = self._outgoing
        while outgoing and not self.writing_paused:
            if self.closed and not self._close_when_sent:
                outgoing.clear()
                return
            piece = outgoing[0]
            if len(piece) > _CHUNK:
                outgoing[0] = piece[_CHUNK:]
                piece = piece[:_CHUNK]
            else:
                outgoing.popleft()
            transport.write(piece)
        if not outgoing and self._close_when_sent:
            self._close_when_sent = False
            transport.close()

    # -- receive buffer management

    def _make_room(self) -> None:
        """Free space at the end of the receive buffer: compact it, or grow it."""
        start, end = self._start, self._end
        pending = end - start
        if start > 0 and (len(self._buf) - pending >= _MIN_RECV or not self.framed):
            # memoryview assignment copies overlapping ranges correctly (memmove) and,
            # being of equal length, never resizes the buffer the transport may still
            # hold a view of.
            self._view[:pending] = self._view[start:end]
            self._start, self._end = 0, pending
        elif self.framed:
            # A header or small body that does not fit: move to a bigger buffer. Raw
            # mode never grows; buffer_updated pauses reading instead.
            bigger = bytearray(max(2 * len(self._buf), self._need, pending + _MIN_RECV))
            bigger[:pending] = self._view[start:end]
            self._buf, self._view = bigger, memoryview(bigger)
            self._start, self._end = 0, pending

    def _parse(self) -> bool:
        """Split complete messages off the buffer; True when one or more were queued."""
        buf, view = self._buf, self._view
        start, end = self._start, self._end
        queued = False
        while end - start >= 4:
            (nframes,) = _NFRAMES.unpack_from(buf, start)
            if not 0 < nframes <= _MAX_FRAMES:
                self._malformed(f"a header announcing {nframes} frames")
                return queued
            header = 4 + 8 * nframes
            if end - start < header:
                self._need = header
                break
            lengths = struct.unpack_from(f"<{nframes}Q", buf, start + 4)
            total = sum(lengths)
            if total > self.max_message_size:
                self._malformed(
                    f"a message of {total} bytes, above distributed.comm.max-message-size "
                    f"({self.max_message_size})"
                )
                return queued
            body = start + header
            if end - body >= total:
                frames = []
                for length in lengths:
                    # A private writable copy: the buffer is reused, and arrays loaded
                    # from it must be writable whatever their size.
                    frames.append(bytearray(view[body : body + length]))
                    body += length
                start = body
                self._queue(frames, total)
                queued = True
                continue
            if total > _LARGE_BODY:
                have = end - body
                big = _receive_buffer(total)
                big[:have] = view[body:end]
                self._big_view = big
                self._big_filled, self._big_lengths = have, lengths
                start = end = 0
                break
            self._need = header + total
            break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return queued

    def _finish_big(self) -> None:
        view = self._big_view
        assert view is not None
        frames = []
        offset = 0
        for length in self._big_lengths:
            frames.append(view[offset : offset + length])
            offset += length
        self._queue(frames, offset)
        self._big_view = None
        self._big_filled, self._big_lengths = 0, ()

    def _queue(self, frames: list[Any], nbytes: int) -> None:
        self.messages.append((frames, nbytes))
        self.queued_bytes += nbytes
        if self.queued_bytes > _READ_HIGH_WATER:
            self._pause_reading()

    def _malformed(self, what: str) -> None:
        self.error = f"malformed frame header from the peer ({what}); connection closed"
        logger.warning("closing connection from %s: %s", self.peer, self.error)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_drained(self) -> None:
        """Wait until earlier writes reached the socket or the transport's buffer
        is below its high-water mark, or the connection closed."""
        while self.backlogged and not (self.closed and not self._close_when_sent):
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    async def _wait_readable(self) -> None:
        if self._read_waiter is not None:
            raise RuntimeError("another coroutine is already reading from this comm")
        self._read_waiter = self.loop.create_future()
        try:
            await self._read_waiter
        finally:
            self._read_waiter = None

    @property
    def peer(self) -> str:
        return _peer_address(self.transport) if self.transport is not None else "<unconnected>"

    # -- handshake (raw mode)

    async def read_raw(self, n: int) -> bytes:
        """Return exactly ``n`` raw bytes (handshake only)."""
        while self._end - self._start < n:
            if self.closed:
                raise CommClosedError(
                    f"{self.peer} closed the connection during the handshake"
                    f" ({self._end - self._start} of {n} bytes received)"
                )
            self._need = n
            self._resume_reading()
            await self._wait_readable()
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        self._resume_reading()
        return data

    def start_framing(self) -> None:
        """Leave raw mode: bytes already received are parsed as frames."""
        self.framed = True
        self._need = 0
        self._parse()
        self._resume_reading()


# ------------------------------------------------------------------------------ Comm


class _Drain:
    """What :meth:`Comm.write` returns: await it to wait until the send buffer drains.

    Creating it schedules nothing, so a caller that never awaits it (fire and forget)
    leaks nothing and triggers no "never awaited" warning.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    def __await__(self) -> Generator[Any, None, None]:
        protocol = self._protocol
        if not protocol.backlogged:
            return
        yield from protocol.wait_drained().__await__()
        if protocol.closed and protocol.backlogged:
            raise CommClosedError(
                f"{protocol.peer}: {protocol.error or 'closed'} before the write was sent"
            )


class Comm:
    """One authenticated connection carrying batches of messages.

    Made by :func:`connect` or handed to a :func:`listen` handler; not created
    directly. All methods must be called on the event loop that made the comm.

    Attributes
    ----------
    peer : str
        The remote address, ``tcp://host:port``.
    local_address : str
        This end's address.
    remote_info : dict
        The peer's hello: ``role``, ``versions``, ``pid``, ``host`` and any extra
        fields it passed as ``hello=``.
    """

    __slots__ = ("_protocol", "_transport", "local_address", "peer", "remote_info")

    def __init__(self, protocol: _Protocol, remote_info: dict[str, Any]) -> None:
        assert protocol.transport is not None
        self._protocol = protocol
        self._transport = protocol.transport
        self.peer = _peer_address(self._transport)
        self.local_address = _local_address(self._transport)
        self.remote_info = remote_info

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        role = self.remote_info.get("role", "?")
        return f"<Comm {self.local_address} -> {self.peer} ({role}), {state}>"

    @property
    def closed(self) -> bool:
        """True once the connection is closed on either side."""
        return self._protocol.closed

    @property
    def remote_role(self) -> str | None:
        """The peer's role from its hello (``"scheduler"``, ``"worker"``, ``"client"``)."""
        role = self.remote_info.get("role")
        return role if isinstance(role, str) else None

    def write(self, msgs: list[Any]) -> Awaitable[None]:
        """Send one batch of messages.

        Needs no ``await``: the batch is serialized and queued, in order, before this
        returns, and a small batch is already on its way. A large one (above 1 MiB) is
        streamed from its buffers' own memory as the socket drains, so do not modify
        arrays it contains until awaiting the result returns. Awaiting the result
        waits until the batch is handed over to the socket (back-pressure).

        Parameters
        ----------
        msgs
            A list of message dicts (see ``runtime.protocol``); serialized with
            ``runtime.serialize.dumps``, buffers out-of-band.

        Raises
        ------
        CommClosedError
            When the connection is closed.
        SerializationError
            When a message cannot be serialized (nothing is sent).
        CommError
            When the serialized batch exceeds ``distributed.comm.max-message-size``.
        """
        protocol = self._protocol
        if protocol.closed:
            raise CommClosedError(f"cannot write to {self.peer}: {protocol.error or 'closed'}")
        frames = dumps(msgs, compression=protocol.compression, context="a batch of messages")
        lengths = []
        for i, frame in enumerate(frames):
            if type(frame) is bytes:
                lengths.append(len(frame))
            else:
                view = memoryview(frame)
                if view.ndim != 1 or view.format != "B":
                    view = view.cast("B")
                    frames[i] = view
                lengths.append(view.nbytes)
        total = sum(lengths)
        if total > protocol.max_message_size:
            raise CommError(
                f"a batch of {total} bytes exceeds distributed.comm.max-message-size "
                f"({protocol.max_message_size}); send large data in pieces or raise the limit"
            )
        protocol.send(struct.pack(f"<I{len(frames)}Q", len(frames), *lengths), frames, total)
        return _Drain(protocol)

    async def read(self) -> list[Any]:
        """Wait for and return the next batch of messages.

        Batches already received are returned even after the peer closed.

        Raises
        ------
        CommClosedError
            When the connection is closed and nothing is left to read.
        SerializationError
            When a batch cannot be deserialized (the connection stays usable).
        """
        protocol = self._protocol
        while not protocol.messages:
            if protocol.closed:
                raise CommClosedError(f"{self.peer}: {protocol.error or 'closed'}")
            await protocol._wait_readable()
        frames, nbytes = protocol.messages.popleft()
        protocol.queued_bytes -= nbytes
        if protocol._reading_paused and protocol.queued_bytes <= _READ_HIGH_WATER // 2:
            protocol._resume_reading()
        msgs = loads(frames, context=f"a batch of messages from {self.peer}")
        if type(msgs) is not list:
            raise CommError(
                f"protocol violation by {self.peer}: expected a list of messages, "
                f"got {type(msgs).__name__}"
            )
        return msgs

    def close(self) -> Awaitable[None]:
        """Close the connection after sending what is buffered.

        Reads return batches already received, then raise :class:`CommClosedError`.
        Await the result to wait until the connection is fully closed.
        """
        protocol = self._protocol
        if not protocol.closed:
            protocol.closed = True
            protocol.error = "closed on this side"
            if protocol._outgoing:
                protocol._close_when_sent = True  # _pump closes after the last chunk
            else:
                self._transport.close()
            protocol._wake_reader()
        return asyncio.shield(protocol.lost)

    def abort(self) -> None:
        """Close the connection at once, dropping anything not yet sent."""
        protocol = self._protocol
        if not protocol.closed:
            protocol.closed = True
            protocol.error = "aborted on this side"
        protocol._outgoing.clear()
        protocol._close_when_sent = False
        self._transport.abort()
        protocol._wake_reader()
        protocol._wake_drainers()

    @property
    def backlogged(self) -> bool:
        """True while earlier writes still wait for the socket (a slow reader)."""
        return self._protocol.backlogged


# ------------------------------------------------------------------------- handshake


def _mac(key: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(key, label + server_nonce + client_nonce, hashlib.sha256).digest()


def _hello(role: Role | str, extra: dict[str, Any] | None) -> bytes:
    document: dict[str, Any] = {
        "role": str(role),
        "versions": versions(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    if extra:
        document.update(extra)
    data = json.dumps(document, separators=(",", ":")).encode()
    if len(data) > _MAX_HELLO_BYTES:
        raise CommError(f"hello of {len(data)} bytes is too large (limit {_MAX_HELLO_BYTES})")
    return _HELLO_LENGTH.pack(len(data)) + data


async def _read_hello(protocol: _Protocol) -> dict[str, Any]:
    (length,) = _HELLO_LENGTH.unpack(await protocol.read_raw(_HELLO_LENGTH.size))
    if length > _MAX_HELLO_BYTES:
        raise HandshakeError(f"hello of {length} bytes from {protocol.peer} is too large")
    try:
        document = json.loads(await protocol.read_raw(length))
    except ValueError as exc:
        raise HandshakeError(f"unreadable hello from {protocol.peer}: {exc}") from None
    if not isinstance(document, dict):
        raise HandshakeError(f"hello from {protocol.peer} is not a JSON object")
    return document


def _check_magic(data: bytes, magic: bytes, version: int, peer: str) -> None:
    if magic != _MAGIC:
        raise HandshakeError(
            f"{peer} does not speak the hpc-toolkit protocol (first bytes {data[:8]!r})"
        )
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"{peer} speaks wire protocol version {version}, this process "
            f"{PROTOCOL_VERSION}: install the same hpc-toolkit version everywhere"
        )


async def _client_handshake(protocol: _Protocol, key: bytes, hello: bytes) -> dict[str, Any]:
    transport = protocol.transport
    assert transport is not None
    peer = protocol.peer
    greeting = await protocol.read_raw(_GREETING.size)
    magic, version, server_nonce = _GREETING.unpack(greeting)
    _check_magic(greeting, magic, version, peer)
    client_nonce = secrets.token_bytes(_NONCE_BYTES)
    proof = _mac(key, _CLIENT_LABEL, server_nonce, client_nonce)
    transport.write(_PROOF.pack(_MAGIC, PROTOCOL_VERSION, client_nonce, proof))
    status, server_proof = _REPLY.unpack(await protocol.read_raw(_REPLY.size))
    if status == _STATUS_BAD_SECRET:
        raise HandshakeError(
            f"{peer} refused our cluster secret; use the secret from this cluster's scheduler file"
        )
    if status == _STATUS_BAD_VERSION:
        raise HandshakeError(
            f"{peer} refused our wire protocol version {PROTOCOL_VERSION}: install the "
            "same hpc-toolkit version everywhere"
        )
    if status != _STATUS_OK:
        raise HandshakeError(f"{peer} refused the handshake (status {status})")
    expected = _mac(key, _SERVER_LABEL, server_nonce, client_nonce)
    if not hmac.compare_digest(server_proof, expected):
        raise HandshakeError(
            f"{peer} did not prove knowledge of the cluster secret; it is not the "
            "scheduler or worker you meant to reach"
        )
    remote = await _read_hello(protocol)
    transport.write(hello)
    return remote


async def _server_handshake(protocol: _Protocol, key: bytes, hello: bytes) -> dict[str, Any]:
    transport = protocol.transport
    assert transport is not None
    server_nonce = secrets.token_bytes(_NONCE_BYTES)
    transport.write(_GREETING.pack(_MAGIC, PROTOCOL_VERSION, server_nonce))
    data = await protocol.read_raw(_PROOF.size)
    magic, version, client_nonce, proof = _PROOF.unpack(data)
    try:
        _check_magic(data, magic, version, protocol.peer)
    except HandshakeError:
        if magic == _MAGIC:
            transport.write(_REPLY.pack(_STATUS_BAD_VERSION, bytes(32)))
        raise
    expected = _mac(key, _CLIENT_LABEL, server_nonce, client_nonce)
    if not hmac.compare_digest(proof, expected):
        transport.write(_REPLY.pack(_STATUS_BAD_SECRET, bytes(32)))
        raise HandshakeError("wrong cluster secret")
    server_proof = _mac(key, _SERVER_LABEL, server_nonce, client_nonce)
    transport.write(_REPLY.pack(_STATUS_OK, server_proof) + hello)
    return await _read_hello(protocol)


# --------------------------------------------------------------------------- connect


async def connect(
    address: str,
    secret: bytes | str,
    *,
    timeout: float | str | None = None,
    role: Role | str = Role.CLIENT,
    hello: dict[str, Any] | None = None,
    handshake_timeout: float | str | None = None,
    max_message_size: int | str | None = None,
) -> Comm:
    """Open an authenticated connection to a scheduler or worker.

    Refused connections are retried with back-off until ``timeout`` (a scheduler may
    still be starting); a failed handshake is not retried.

    Parameters
    ----------
    address
        ``tcp://host:port``.
    secret
        The cluster secret: bytes, or the hex string stored in the scheduler file.
    timeout
        Seconds (or ``"30s"``) for the whole attempt; None reads
        ``distributed.comm.connect-timeout``.
    role
        This process's role, sent in the hello.
    hello
        Extra JSON-serializable fields for the hello (e.g. the worker's own address).
    handshake_timeout
        Deadline of one handshake; None reads ``distributed.comm.handshake-timeout``.
    max_message_size
        Largest batch accepted from the peer; None reads
        ``distributed.comm.max-message-size``.

    Returns
    -------
    Comm

    Raises
    ------
    HandshakeError
        The peer refused our secret, did not prove its own, or speaks another protocol.
    CommError
        Nothing accepted the connection before the timeout (the message says why).
    """
    key = _coerce_secret(secret)
    host, port = parse_address(address)
    total = _seconds(timeout, "distributed.comm.connect-timeout")
    handshake = _seconds(handshake_timeout, "distributed.comm.handshake-timeout")
    limit = _nbytes(max_message_size, "distributed.comm.max-message-size")
    hello_bytes = _hello(role, hello)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total
    backoff = 0.01
    last_error: BaseException | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(
                _connect_once(host, port, key, hello_bytes, limit, handshake), remaining
            )
        except HandshakeError:
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            last_error = exc
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(backoff, remaining))
        backoff = min(backoff * 2, 1.0)
    reason = f"{type(last_error).__name__}: {last_error}" if last_error else "timed out"
    raise CommError(
        f"could not connect to {address} within {total:g} s ({reason}); check that the "
        "scheduler/worker is running and reachable from this host"
    ) from last_error


async def _connect_once(
    host: str, port: int, key: bytes, hello: bytes, limit: int, handshake: float
) -> Comm:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: _Protocol(limit), host, port)
    try:
        remote = await asyncio.wait_for(_client_handshake(protocol, key, hello), handshake)
    except asyncio.TimeoutError:
        transport.abort()
        raise HandshakeError(
            f"{format_address(host, port)} did not complete the handshake within "
            f"{handshake:g} s (distributed.comm.handshake-timeout)"
        ) from None
    except BaseException:
        transport.abort()
        raise
    protocol.start_framing()
    return Comm(protocol, remote)


# ---------------------------------------------------------------------------- listen


class Listener:
    """A listening TCP socket that authenticates each connection, then calls a handler.

    Made by :func:`listen`. Connections that fail the handshake are closed and logged
    (with the peer's address); the listener keeps serving.

    Attributes
    ----------
    address : str
        The address peers should connect to (``tcp://host:port``, the bound port;
        a wildcard host is replaced by this host's IP from :func:`get_ip`).
    listen_address : str
        The address actually bound (may be ``0.0.0.0``).
    """

    def __init__(
        self,
        handler: Callable[[Comm], Any],
        key: bytes,
        hello: bytes,
        handshake_timeout: float,
        max_message_size: int,
    ) -> None:
        self._handler = handler
        self._key = key
        self._hello = hello
        self._handshake_timeout = handshake_timeout
        self._max_message_size = max_message_size
        self._server: asyncio.AbstractServer | None = None
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.address = ""
        self.listen_address = ""

    def __repr__(self) -> str:
        return f"<Listener {self.address}>"

    async def _start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_protocol, host or None, port, reuse_address=True, backlog=1024
        )
        bound = self._server.sockets[0].getsockname()
        bound_host = str(bound[0])
        self.listen_address = format_address(bound_host, int(bound[1]))
        if ipaddress.ip_address(bound_host).is_unspecified:
            bound_host = get_ip()
        self.address = format_address(bound_host, int(bound[1]))

    def _make_protocol(self) -> _Protocol:
        return _Protocol(self._max_message_size, self._connection_made)

    def _connection_made(self, protocol: _Protocol) -> None:
        task = asyncio.ensure_future(self._accept(protocol))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._handlers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, CommClosedError):
            logger.error("connection handler on %s failed", self.address, exc_info=exc)

    async def _accept(self, protocol: _Protocol) -> None:
        transport = protocol.transport
        assert transport is not None
        peer = protocol.peer
        try:
            remote = await asyncio.wait_for(
                _server_handshake(protocol, self._key, self._hello), self._handshake_timeout
            )
        except asyncio.TimeoutError:
            logger.warning(
                "refused connection from %s on %s: no handshake within %g s",
                peer,
                self.address,
                self._handshake_timeout,
            )
            transport.close()
            return
        except (OSError, ValueError) as exc:  # HandshakeError and CommClosedError too
            logger.warning("refused connection from %s on %s: %s", peer, self.address, exc)
            # close, not abort: a refusal status still in flight reaches the client
            # before the end of the stream, instead of being lost to a reset.
            transport.close()
            return
        except BaseException:
            transport.abort()
            raise
        protocol.start_framing()
        comm = Comm(protocol, remote)
        try:
            result = self._handler(comm)
        except Exception:
            logger.exception("connection handler on %s failed for %s", self.address, peer)
            comm.abort()
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    def close(self) -> None:
        """Stop accepting connections and drop those still in their handshake.

        Comms already handed to the handler stay open; their owner closes them.
        """
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the listening socket is closed."""
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def listen(
    address: str,
    handler: Callable[[Comm], Any],
    secret: bytes | str,
    *,
    role: Role | str = Role.SCHEDULER,
    hello: dict[str, Any] | None = None,
    handshake_timeout: float | str | None = None,
    max_message_size: int | str | None = None,
) -> Listener:
    """Listen on ``address`` and call ``handler(comm)`` for each authenticated peer.

    Parameters
    ----------
    address
        ``tcp://host:port``; port 0 picks a free port (see ``Listener.address``).
        Host ``0.0.0.0`` listens on every interface.
    handler
        Called with each :class:`Comm` once its handshake has succeeded; may be a
        coroutine function (it then runs as a task for the life of the connection,
        and an exception other than :class:`CommClosedError` is logged).
    secret
        The cluster secret: bytes or its hex string.
    role
        This process's role, sent in the hello.
    hello
        Extra JSON-serializable fields for the hello.
    handshake_timeout
        Seconds a peer has to finish the handshake; None reads
        ``distributed.comm.handshake-timeout``.
    max_message_size
        Largest batch accepted; None reads ``distributed.comm.max-message-size``.

    Returns
    -------
    Listener
        Already accepting. Close it with ``listener.close()`` (or ``async with``).
    """
    key = _coerce_secret(secret)
    host, port = parse_address(address)
    listener = Listener(
        handler,
        key,
        _hello(role, hello),
        _seconds(handshake_timeout, "distributed.comm.handshake-timeout"),
        _nbytes(max_message_size, "distributed.comm.max-message-size"),
    )
    await listener._start(host, port)
    return listener


# ------------------------------------------------------------------------ BatchedSend


class BatchedSend:
    """Coalesce messages sent during one loop iteration into a single write.

    ``send(msg)`` appends to a buffer and, if no flush is pending, schedules one with
    ``loop.call_soon``: everything sent before control returns to the event loop goes
    out as one batch, and a lone message leaves on the next loop iteration - there is
    no timer. While the comm's send buffer is full, messages accumulate and leave as
    one batch when it drains.

    Must be used from the loop that owns the comm.

    Parameters
    ----------
    comm
        The connection to send on.
    """

    __slots__ = ("_buffer", "_closed", "_comm", "_drain_task", "_loop", "_scheduled")

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self._loop = asyncio.get_running_loop()
        self._buffer: list[Any] = []
        self._scheduled = False
        self._drain_task: asyncio.Task[None] | None = None  # set while the comm is backlogged
        self._closed = False

    def __repr__(self) -> str:
        return f"<BatchedSend to {self._comm.peer}: {len(self._buffer)} pending>"

    @property
    def comm(self) -> Comm:
        """The connection messages go to."""
        return self._comm

    @property
    def closed(self) -> bool:
        """True once closed here or the comm is closed."""
        return self._closed or self._comm.closed

    def send(self, *msgs: Any) -> None:
        """Queue one or more messages for the next flush.

        Raises
        ------
        CommClosedError
            When this BatchedSend or its comm is closed.
        """
        if self._closed or self._comm.closed:
            raise CommClosedError(f"cannot send to {self._comm.peer}: connection closed")
        self._buffer.extend(msgs)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._buffer or self._drain_task is not None:
            return
        comm = self._comm
        if comm.closed:
            self._drop("connection closed")
            return
        if comm.backlogged:
            # Keep collecting: everything sent meanwhile leaves as one batch.
            self._drain_task = self._loop.create_task(self._after_drain())
            return
        batch, self._buffer = self._buffer, []
        try:
            comm.write(batch)
        except CommClosedError:
            self._buffer = batch
            self._drop("connection closed")
        except Exception:
            # One message that cannot be serialized must not take its batch-mates
            # down: send them one by one and drop (and log) only the culprit.
            self._write_one_by_one(batch)

    def _write_one_by_one(self, batch: list[Any]) -> None:
        comm = self._comm
        for i, msg in enumerate(batch):
            try:
                comm.write([msg])
            except CommClosedError:
                self._buffer = batch[i:]
                self._drop("connection closed")
                return
            except Exception:
                op = msg.get("op") if isinstance(msg, dict) else type(msg).__name__
                logger.exception("dropping a %r message to %s: cannot serialize it", op, comm.peer)

    async def _after_drain(self) -> None:
        try:
            await self._comm._protocol.wait_drained()
        finally:
            self._drain_task = None
            self._flush()

    def _drop(self, why: str) -> None:
        if self._buffer:
            logger.debug("dropping %d messages to %s: %s", len(self._buffer), self._comm.peer, why)
        self._buffer = []

    def flush(self) -> None:
        """Write pending messages now instead of on the next loop iteration."""
        if self._buffer and self._drain_task is None:
            self._flush()

    def close(self) -> None:
        """Flush what is pending, then refuse further sends. The comm stays open."""
        if self._buffer and not self._comm.closed:
            batch, self._buffer = self._buffer, []
            with contextlib.suppress(CommClosedError):
                self._comm.write(batch)
        self._closed = True

    def abort(self) -> None:
        """Drop pending messages and refuse further sends."""
        self._buffer = []
        self._closed = True
