"""Tests for runtime.comm: addresses, handshake, framing, hostile peers, BatchedSend.

Every test runs its own event loop (``asyncio.run``) and listens on 127.0.0.1 only.
Hostile peers are plain sockets driven by hand; "the server dealt with it" is observed
as the server closing that socket, never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime.comm as comm_module
from runtime import config, testing
from runtime.comm import (
    PROTOCOL_VERSION,
    BatchedSend,
    Comm,
    Listener,
    connect,
    format_address,
    get_ip,
    listen,
    new_secret,
    parse_address,
)
from runtime.errors import CommClosedError, CommError, ConfigError, HandshakeError

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
LOOPBACK = "tcp://127.0.0.1:0"
DEADLINE = 10.0  # generous bound for anything that should happen "soon"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Server:
    """A listener whose handler echoes batches and records every comm it got."""

    def __init__(self, echo: bool = True) -> None:
        self.comms: list[Comm] = []
        self.received: list[list[Any]] = []
        self.ended: list[BaseException] = []
        self.connected = asyncio.Event()
        self.echo = echo
        self.listener: Listener | None = None

    async def handler(self, comm: Comm) -> None:
        self.comms.append(comm)
        self.connected.set()
        try:
            while True:
                msgs = await comm.read()
                self.received.append(msgs)
                if self.echo:
                    comm.write(msgs)
        except CommClosedError as exc:
            self.ended.append(exc)

    async def start(self, secret: bytes | str = SECRET, **kwargs: Any) -> Server:
        self.listener = await listen(LOOPBACK, self.handler, secret, **kwargs)
        return self

    @property
    def address(self) -> str:
        assert self.listener is not None
        return self.listener.address

    async def close(self) -> None:
        for comm in self.comms:
            comm.abort()
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()


async def raw_connection(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = parse_address(address)
    return await asyncio.open_connection(host, port)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes the connection; return everything it sent."""
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), DEADLINE)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


async def echo_works(address: str, secret: bytes | str = SECRET) -> None:
    comm = await connect(address, secret, timeout=DEADLINE)
    try:
        comm.write([{"op": "ping", "n": 1}])
        assert await asyncio.wait_for(comm.read(), DEADLINE) == [{"op": "ping", "n": 1}]
    finally:
        await comm.close()


async def authenticated_raw(address: str, secret: bytes = SECRET) -> tuple[Any, Any]:
    """Complete the handshake by hand; return the raw (reader, writer) after it."""
    reader, writer = await raw_connection(address)
    greeting = await reader.readexactly(comm_module._GREETING.size)
    _, _, server_nonce = comm_module._GREETING.unpack(greeting)
    client_nonce = os.urandom(32)
    mac = comm_module._mac(secret, comm_module._CLIENT_LABEL, server_nonce, client_nonce)
    writer.write(comm_module._PROOF.pack(comm_module._MAGIC, PROTOCOL_VERSION, client_nonce, mac))
    status, _ = comm_module._REPLY.unpack(await reader.readexactly(comm_module._REPLY.size))
    assert status == comm_module._STATUS_OK
    (length,) = struct.unpack("<I", await reader.readexactly(4))
    await reader.readexactly(length)
    hello = b'{"role": "client"}'
    writer.write(struct.pack("<I", len(hello)) + hello)
    return reader, writer


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is unpickled."""

    class CreatesFile:
        def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
            return (open, (str(marker), "w"))

    return pickle.dumps(CreatesFile(), protocol=5)


# ------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("tcp://[::1]:8786", ("::1", 8786)),
        ("tcp://node-01.cluster:65535", ("node-01.cluster", 65535)),
    ],
)
def test_parse_address_splits_host_and_port(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "udp://1.2.3.4:5",
        "tcp://1.2.3.4",
        "tcp://1.2.3.4:x",
        "tcp://:80",
        "tcp://::1:80",
        "tcp://[::1]",
        "tcp://h:65536",
        8786,
    ],
)
def test_parse_address_rejects_malformed_addresses(address):
    with pytest.raises(CommError, match="address|scheme|port"):
        parse_address(address)


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 1), ("::1", 8786), ("node", 0)])
def test_format_address_round_trips_through_parse(host, port):
    assert parse_address(format_address(host, port)) == (host, port)


def test_get_ip_of_loopback_interface_is_127_0_0_1():
    import psutil

    name = next(
        (
            n
            for n, addrs in psutil.net_if_addrs().items()
            if any(a.address == "127.0.0.1" for a in addrs)
        ),
        None,
    )
    if name is None:
        pytest.skip("no interface carries 127.0.0.1")
    assert get_ip(name) == "127.0.0.1"


def test_get_ip_of_unknown_interface_lists_the_real_ones():
    with pytest.raises(ConfigError, match="not found.*available:"):
        get_ip("no-such-interface0")


def test_get_ip_without_interface_returns_an_address_of_this_host():
    import ipaddress

    ipaddress.ip_address(get_ip())


def test_new_secret_is_32_random_bytes():
    first, second = new_secret(), new_secret()
    assert len(first) == 32 and first != second


# --------------------------------------------------------------------- basic traffic


def test_batches_round_trip_in_order():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batches = [
                [{"op": "compute-task", "key": ("x", i), "n": j} for j in range(i)]
                for i in range(1, 50)
            ]
            for batch in batches:
                comm.write(batch)
            received = [await comm.read() for _ in batches]
            assert received == batches
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_hello_tells_each_side_who_the_peer_is():
    async def main():
        server = await Server().start(hello={"name": "sched"})
        try:
            comm = await connect(
                server.address, SECRET, role="worker", hello={"nthreads": 2}, timeout=DEADLINE
            )
            await asyncio.wait_for(server.connected.wait(), DEADLINE)
            assert comm.remote_role == "scheduler"
            assert comm.remote_info["name"] == "sched"
            assert comm.remote_info["versions"]["python"]
            theirs = server.comms[0]
            assert theirs.remote_role == "worker"
            assert theirs.remote_info["nthreads"] == 2
            assert theirs.remote_info["pid"] == os.getpid()
            assert theirs.peer == comm.local_address
            assert comm.peer == server.address
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_secret_may_be_given_as_hex_string():
    async def main():
        server = await Server().start(secret=SECRET.hex())
        try:
            await echo_works(server.address, SECRET.hex())
        finally:
            await server.close()

    run(main())


def test_numpy_arrays_arrive_intact_and_writable():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            small = np.arange(1000, dtype="i4")
            medium = np.arange(100_000, dtype="f8")  # 800 kB: own receive buffer
            large = np.random.default_rng(0).random(1_000_000)  # 8 MB: streamed, mmap
            comm.write([{"op": "data", "data": {"s": small, "m": medium, "l": large}}])
            [reply] = await asyncio.wait_for(comm.read(), DEADLINE)
            for name, original in [("s", small), ("m", medium), ("l", large)]:
                got = reply["data"][name]
                np.testing.assert_array_equal(got, original)
                assert got.flags.writeable, name
                got[0] = -1  # really writable
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_many_large_batches_written_back_to_back_arrive_in_order():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            arrays = [np.full(300_000, i, dtype="f8") for i in range(6)]
            for i, array in enumerate(arrays):
                comm.write([{"op": "data", "i": i, "a": array}])
                comm.write([{"op": "small", "i": i}])  # queued behind the streamed batch
            for i in range(6):
                [big] = await asyncio.wait_for(comm.read(), DEADLINE)
                [small] = await asyncio.wait_for(comm.read(), DEADLINE)
                assert big["i"] == small["i"] == i
                np.testing.assert_array_equal(big["a"], arrays[i])
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_medium_batch_between_join_and_stream_limits_round_trips():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            payload = np.arange(60_000, dtype="f8")  # 480 kB: written frame by frame
            comm.write([{"op": "data", "a": payload}])
            [reply] = await asyncio.wait_for(comm.read(), DEADLINE)
            np.testing.assert_array_equal(reply["a"], payload)
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_reader_that_falls_behind_pauses_the_socket_then_catches_up():
    async def main():
        got_comm: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        listener = await listen(LOOPBACK, got_comm.set_result, SECRET)
        try:
            sender = await connect(listener.address, SECRET, timeout=DEADLINE)
            receiver = await asyncio.wait_for(got_comm, DEADLINE)
            chunk = np.ones(3_500_000)  # 28 MB per batch; nobody reads yet
            for i in range(3):
                sender.write([{"op": "data", "i": i, "a": chunk}])
            await testing.async_wait_until(
                lambda: receiver._protocol._reading_paused,
                "receiver._protocol._reading_paused",
                DEADLINE,
            )  # bounded unread memory
            assert receiver._protocol.queued_bytes <= 2 * 64 * 1024 * 1024
            for i in range(3):
                [msg] = await asyncio.wait_for(receiver.read(), DEADLINE)
                assert msg["i"] == i and msg["a"].sum() == 3_500_000
            await asyncio.wait_for(sender.write([]), DEADLINE)  # the backlog drained
            await sender.close()
            receiver.abort()
        finally:
            listener.close()

    run(main())


def test_awaiting_write_raises_when_the_peer_vanishes_mid_transfer():
    async def main():
        got_comm: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        listener = await listen(LOOPBACK, got_comm.set_result, SECRET)
        try:
            sender = await connect(listener.address, SECRET, timeout=DEADLINE)
            receiver = await asyncio.wait_for(got_comm, DEADLINE)
            drained = sender.write([{"op": "data", "a": np.ones(6_000_000)}])  # 48 MB
            assert sender.backlogged
            receiver.abort()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(drained, DEADLINE)
            assert sender.closed
        finally:
            listener.close()

    run(main())


def test_awaiting_write_waits_until_a_large_batch_left():
    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            payload = np.ones(4_000_000)  # 32 MB, far above the send buffer
            await asyncio.wait_for(comm.write([{"op": "data", "a": payload}]), DEADLINE)
            assert not comm.backlogged
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_close_sends_what_was_written_before_it():
    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            payload = np.arange(2_000_000, dtype="f8")
            comm.write([{"op": "data", "a": payload}])
            comm.write([{"op": "last"}])
            await asyncio.wait_for(comm.close(), DEADLINE)
            await testing.async_wait_until(lambda: server.ended, "server.ended", DEADLINE)
            assert server.received[-1] == [{"op": "last"}]
            np.testing.assert_array_equal(server.received[0][0]["a"], payload)
        finally:
            await server.close()

    run(main())


def test_read_returns_buffered_batches_after_peer_closed_then_raises():
    async def main():
        got_comm: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        listener = await listen(LOOPBACK, got_comm.set_result, SECRET)
        try:
            client = await connect(listener.address, SECRET, timeout=DEADLINE)
            server_comm = await asyncio.wait_for(got_comm, DEADLINE)
            client.write([{"op": "a"}])
            client.write([{"op": "b"}])
            await client.close()
            assert await server_comm.read() == [{"op": "a"}]
            assert await server_comm.read() == [{"op": "b"}]
            with pytest.raises(CommClosedError, match="closed"):
                await server_comm.read()
            assert server_comm.closed
        finally:
            listener.close()

    run(main())


def test_write_after_close_raises_comm_closed_error():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            await comm.close()
            assert comm.closed
            with pytest.raises(CommClosedError):
                comm.write([{"op": "x"}])
            with pytest.raises(CommClosedError):
                await comm.read()
        finally:
            await server.close()

    run(main())


def test_two_concurrent_reads_are_refused():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            first = asyncio.ensure_future(comm.read())
            await testing.async_wait_until(
                lambda: comm._protocol._read_waiter is not None, "the first read to wait"
            )
            with pytest.raises(RuntimeError, match="already reading"):
                await comm.read()
            comm.write([{"op": "x"}])
            assert await asyncio.wait_for(first, DEADLINE) == [{"op": "x"}]
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_writing_more_than_max_message_size_raises_and_sends_nothing():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            with config.set({"distributed.comm.max-message-size": "1MB"}):
                limited = await connect(server.address, SECRET, timeout=DEADLINE)
            with pytest.raises(CommError, match="max-message-size"):
                limited.write([{"op": "data", "a": np.ones(200_000)}])
            limited.write([{"op": "ok"}])
            assert await limited.read() == [{"op": "ok"}]
            await limited.close()
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_unserializable_message_raises_and_connection_stays_usable():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            with pytest.raises(Exception, match="lock|pickle|serializ"):
                comm.write([{"op": "x", "lock": __import__("threading").Lock()}])
            comm.write([{"op": "fine"}])
            assert await asyncio.wait_for(comm.read(), DEADLINE) == [{"op": "fine"}]
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_ipv6_loopback_works_when_available():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def main():
        listener = await listen("tcp://[::1]:0", lambda comm: None, SECRET)
        try:
            assert listener.address.startswith("tcp://[::1]:")
            comm = await connect(listener.address, SECRET, timeout=DEADLINE)
            assert comm.peer == listener.address
            await comm.close()
        finally:
            listener.close()

    run(main())


# ------------------------------------------------------------------------ connecting


def test_connect_retries_until_the_listener_appears(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = format_address("127.0.0.1", port)
    real_connect_once = comm_module._connect_once

    async def main():
        refused = asyncio.Event()

        async def counting(*args: Any) -> Comm:
            try:
                return await real_connect_once(*args)
            except ConnectionRefusedError:
                refused.set()
                raise

        monkeypatch.setattr(comm_module, "_connect_once", counting)
        attempt = asyncio.ensure_future(connect(address, SECRET, timeout=DEADLINE))
        await asyncio.wait_for(refused.wait(), DEADLINE)
        assert not attempt.done()
        listener = await listen(address, lambda comm: None, SECRET)
        try:
            comm = await asyncio.wait_for(attempt, DEADLINE)
            await comm.close()
        finally:
            listener.close()

    run(main())


def test_connect_gives_up_after_timeout_naming_the_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = format_address("127.0.0.1", probe.getsockname()[1])

    async def main():
        with pytest.raises(CommError, match=r"could not connect to tcp://127\.0\.0\.1:\d+ within"):
            await connect(address, SECRET, timeout=0.2)

    run(main())


def test_connect_without_secret_is_refused_before_touching_the_network():
    async def main():
        with pytest.raises(HandshakeError, match="no cluster secret"):
            await connect("tcp://127.0.0.1:9", None, timeout=1)  # type: ignore[arg-type]
        with pytest.raises(HandshakeError, match="empty"):
            await connect("tcp://127.0.0.1:9", b"", timeout=1)

    run(main())


# ------------------------------------------------------------------------- security


def test_wrong_secret_is_refused_and_the_listener_keeps_serving(caplog):
    async def main():
        server = await Server().start()
        try:
            with (
                caplog.at_level(logging.WARNING, logger="runtime.comm"),
                pytest.raises(HandshakeError, match="refused our cluster secret"),
            ):
                await connect(server.address, OTHER_SECRET, timeout=DEADLINE)
            assert not server.comms  # the handler never saw the intruder
            assert any(
                "wrong cluster secret" in r.getMessage() and "127.0.0.1" in r.getMessage()
                for r in caplog.records
            )
            await echo_works(server.address)
        finally:
            await server.close()

    run(main())


def test_client_refuses_a_server_that_cannot_prove_the_secret():
    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Accepts any proof and answers "OK" with a made-up MAC.
        writer.write(comm_module._GREETING.pack(comm_module._MAGIC, PROTOCOL_VERSION, bytes(32)))
        await reader.readexactly(comm_module._PROOF.size)
        writer.write(comm_module._REPLY.pack(comm_module._STATUS_OK, os.urandom(32)))
        hello = b"{}"
        writer.write(struct.pack("<I", len(hello)) + hello)
        await reader.read()
        writer.close()

    async def main():
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        try:
            address = format_address("127.0.0.1", server.sockets[0].getsockname()[1])
            with pytest.raises(HandshakeError, match="did not prove"):
                await connect(address, SECRET, timeout=DEADLINE)
        finally:
            server.close()

    run(main())


def test_client_refuses_a_server_speaking_another_protocol_version():
    async def future_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            comm_module._GREETING.pack(comm_module._MAGIC, PROTOCOL_VERSION + 1, bytes(32))
        )
        await reader.read()
        writer.close()

    async def main():
        server = await asyncio.start_server(future_server, "127.0.0.1", 0)
        try:
            address = format_address("127.0.0.1", server.sockets[0].getsockname()[1])
            with pytest.raises(HandshakeError, match=f"version {PROTOCOL_VERSION + 1}"):
                await connect(address, SECRET, timeout=DEADLINE)
        finally:
            server.close()

    run(main())


def test_server_refuses_a_client_speaking_another_protocol_version(caplog):
    async def main():
        server = await Server().start()
        try:
            reader, writer = await raw_connection(server.address)
            await reader.readexactly(comm_module._GREETING.size)
            writer.write(
                comm_module._PROOF.pack(
                    comm_module._MAGIC, PROTOCOL_VERSION + 1, bytes(32), bytes(32)
                )
            )
            with caplog.at_level(logging.WARNING, logger="runtime.comm"):
                reply = await closed_by_server(reader)
            assert reply[:1] == bytes([comm_module._STATUS_BAD_VERSION])
            assert not server.comms
            await echo_works(server.address)
        finally:
            await server.close()

    run(main())


def test_client_that_never_speaks_is_dropped_after_handshake_timeout(caplog):
    async def main():
        server = await Server().start(handshake_timeout=0.2)
        try:
            with caplog.at_level(logging.WARNING, logger="runtime.comm"):
                reader, writer = await raw_connection(server.address)
                greeting = await closed_by_server(reader)
            assert greeting[:6] == comm_module._MAGIC
            assert any("no handshake within" in r.getMessage() for r in caplog.records)
            await echo_works(server.address)
            writer.close()
        finally:
            await server.close()

    run(main())


def test_silent_clients_do_not_block_others_from_connecting():
    async def main():
        server = await Server().start(handshake_timeout=DEADLINE)
        silent = [await raw_connection(server.address) for _ in range(20)]
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            await echo_works(server.address)
            assert loop.time() - start < DEADLINE / 2  # not queued behind the silent ones
        finally:
            for _, writer in silent:
                writer.close()
            await server.close()

    run(main())


def test_server_that_never_speaks_fails_the_handshake():
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main():
        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        try:
            address = format_address("127.0.0.1", server.sockets[0].getsockname()[1])
            with pytest.raises(HandshakeError, match="did not complete the handshake"):
                await connect(address, SECRET, timeout=DEADLINE, handshake_timeout=0.2)
        finally:
            server.close()

    run(main())


@pytest.mark.parametrize("size", [1, 39, 72, 1000, 300_000])
def test_random_bytes_are_refused_and_the_listener_keeps_serving(size, caplog):
    payload = random.Random(size).randbytes(size)

    async def main():
        server = await Server().start()
        try:
            with caplog.at_level(logging.WARNING, logger="runtime.comm"):
                reader, writer = await raw_connection(server.address)
                writer.write(payload)
                if size < comm_module._PROOF.size:
                    writer.write_eof()  # truncated: the server sees the end of the stream
                await closed_by_server(reader)
                writer.close()
            assert not server.comms
            assert any(
                "refused connection from tcp://127.0.0.1" in r.getMessage() for r in caplog.records
            )
            await echo_works(server.address)
        finally:
            await server.close()

    run(main())


@pytest.mark.parametrize("first_bytes", ["bare pickle", "framed pickle", "header then pickle"])
def test_no_pickle_is_loaded_before_the_handshake(first_bytes, tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_pickle(marker)
    if first_bytes == "framed pickle":
        evil = struct.pack("<IQ", 1, len(evil)) + evil
    elif first_bytes == "header then pickle":
        # A well-formed proof with a wrong MAC, then a framed pickle right behind it.
        framed = struct.pack("<IQ", 1, len(evil)) + evil
        evil = (
            comm_module._PROOF.pack(comm_module._MAGIC, PROTOCOL_VERSION, bytes(32), bytes(32))
            + framed
        )

    async def main():
        server = await Server().start()
        try:
            reader, writer = await raw_connection(server.address)
            writer.write(evil)
            await closed_by_server(reader)
            writer.close()
            assert not marker.exists()
            assert not server.comms
            await echo_works(server.address)
        finally:
            await server.close()

    run(main())
    assert not marker.exists()


def test_the_evil_pickle_used_above_really_creates_its_file(tmp_path):
    # Guards the test above: its payload must be one that would do harm if loaded.
    marker = tmp_path / "control"
    pickle.loads(evil_pickle(marker)).close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        (struct.pack("<I", 0), "0 frames"),
        (struct.pack("<I", 0xFFFFFFFF), "4294967295 frames"),
        (struct.pack("<IQ", 1, 2**62), "max-message-size"),
        (struct.pack("<IQQ", 2, 2**63, 2**63), "max-message-size"),
    ],
    ids=["no-frames", "4G-frames", "huge-length", "lengths-overflow"],
)
def test_malformed_frame_header_closes_only_that_connection(header, complaint, caplog):
    async def main():
        server = await Server().start()
        try:
            with caplog.at_level(logging.WARNING, logger="runtime.comm"):
                reader, writer = await authenticated_raw(server.address)
                writer.write(header)
                await closed_by_server(reader)
                writer.close()
            assert any(complaint in r.getMessage() for r in caplog.records)
            assert len(server.ended) == 1  # the handler saw its comm closed, nothing else
            await echo_works(server.address)
        finally:
            await server.close()

    run(main())


def test_truncated_frame_ends_that_connection_and_the_listener_keeps_serving():
    async def main():
        server = await Server().start()
        try:
            reader, writer = await authenticated_raw(server.address)
            writer.write(struct.pack("<IQ", 1, 1000) + b"x" * 10)
            writer.write_eof()
            await closed_by_server(reader)
            writer.close()
            await echo_works(server.address)
            assert server.received == [[{"op": "ping", "n": 1}]]
        finally:
            await server.close()

    run(main())


def test_oversized_hello_after_authentication_is_refused(caplog):
    async def main():
        server = await Server().start()
        try:
            reader, writer = await raw_connection(server.address)
            greeting = await reader.readexactly(comm_module._GREETING.size)
            _, _, server_nonce = comm_module._GREETING.unpack(greeting)
            nonce = os.urandom(32)
            mac = comm_module._mac(SECRET, comm_module._CLIENT_LABEL, server_nonce, nonce)
            writer.write(comm_module._PROOF.pack(comm_module._MAGIC, PROTOCOL_VERSION, nonce, mac))
            writer.write(struct.pack("<I", 2**31))
            with caplog.at_level(logging.WARNING, logger="runtime.comm"):
                await closed_by_server(reader)
            writer.close()
            assert any("too large" in r.getMessage() for r in caplog.records)
            assert not server.comms
        finally:
            await server.close()

    run(main())


def test_frames_split_at_every_byte_boundary_are_reassembled():
    async def main():
        server = await Server().start()
        try:
            reader, writer = await authenticated_raw(server.address)
            frames = comm_module.dumps([{"op": "x", "data": list(range(50))}])
            lengths = [len(f) for f in frames]
            message = struct.pack(f"<I{len(frames)}Q", len(frames), *lengths) + b"".join(frames)
            for i in range(len(message)):
                writer.write(message[i : i + 1])
                await writer.drain()
            await asyncio.wait_for(server.connected.wait(), DEADLINE)
            await testing.async_wait_until(lambda: server.received, "server.received", DEADLINE)
            assert server.received == [[{"op": "x", "data": list(range(50))}]]
            writer.close()
        finally:
            await server.close()

    run(main())


def test_handler_exception_is_logged_and_the_listener_keeps_serving(caplog):
    async def main():
        calls = []

        async def failing(comm: Comm) -> None:
            calls.append(comm)
            if len(calls) == 1:
                raise ValueError("handler bug")
            msgs = await comm.read()
            comm.write(msgs)

        listener = await listen(LOOPBACK, failing, SECRET)
        try:
            with caplog.at_level(logging.ERROR, logger="runtime.comm"):
                first = await connect(listener.address, SECRET, timeout=DEADLINE)
                await echo_works(listener.address)
            assert any("handler" in r.getMessage() and r.exc_info for r in caplog.records)
            first.abort()
        finally:
            listener.close()

    run(main())


def test_listener_works_as_async_context_manager():
    async def main():
        async with await listen(LOOPBACK, lambda comm: None, SECRET) as listener:
            assert repr(listener) == f"<Listener {listener.address}>"
            comm = await connect(listener.address, SECRET, timeout=DEADLINE)
            assert listener.address in repr(comm) and "open" in repr(comm)
            await comm.close()
            assert "closed" in repr(comm)
        with pytest.raises(CommError):
            await connect(listener.address, SECRET, timeout=0.2)

    run(main())


def test_listener_close_stops_accepting():
    async def main():
        listener = await listen(LOOPBACK, lambda comm: None, SECRET)
        address = listener.address
        listener.close()
        await listener.wait_closed()
        with pytest.raises(CommError):
            await connect(address, SECRET, timeout=0.2)

    run(main())


# ----------------------------------------------------------------------- BatchedSend


def test_batched_send_coalesces_one_loop_iteration_into_one_batch():
    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            for i in range(100):
                batched.send({"op": "task-finished", "key": i})
            batched.send({"op": "a"}, {"op": "b"})
            # Nothing is written before control returns to the loop ...
            assert not server.received
            await testing.async_wait_until(lambda: server.received, "server.received", DEADLINE)
            # ... then everything goes as one batch, in order.
            assert len(server.received) == 1
            assert [m.get("key", m["op"]) for m in server.received[0]] == [*range(100), "a", "b"]
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_batched_send_sends_a_lone_message_without_waiting_for_more():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            loop = asyncio.get_running_loop()
            for i in range(20):  # a chain of dependent round trips
                start = loop.time()
                batched.send({"op": "ping", "i": i})
                assert await asyncio.wait_for(comm.read(), DEADLINE) == [{"op": "ping", "i": i}]
                assert loop.time() - start < 1.0  # no batching interval on the path
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_batched_send_flush_writes_now_and_abort_drops_pending():
    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            batched.send({"op": "now"})
            batched.flush()
            batched.send({"op": "dropped"})
            batched.abort()
            with pytest.raises(CommClosedError):
                batched.send({"op": "after-abort"})
            comm.write([{"op": "marker"}])
            await testing.async_wait_until(
                lambda: len(server.received) >= 2, "len(server.received) >= 2", DEADLINE
            )
            assert server.received == [[{"op": "now"}], [{"op": "marker"}]]
            await comm.close()
        finally:
            await server.close()

    run(main())


def test_batched_send_refuses_messages_once_the_comm_is_closed():
    async def main():
        server = await Server().start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            await comm.close()
            assert batched.closed
            with pytest.raises(CommClosedError):
                batched.send({"op": "x"})
        finally:
            await server.close()

    run(main())


def test_batched_send_close_flushes_pending_messages():
    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            batched.send({"op": "last-words"})
            batched.close()
            with pytest.raises(CommClosedError):
                batched.send({"op": "too-late"})
            await comm.close()
            await testing.async_wait_until(lambda: server.ended, "server.ended", DEADLINE)
            assert server.received == [[{"op": "last-words"}]]
        finally:
            await server.close()

    run(main())


def test_batched_send_holds_messages_while_the_peer_is_slow_and_sends_them_later():
    async def main():
        got_comm: asyncio.Future[Comm] = asyncio.get_running_loop().create_future()
        listener = await listen(LOOPBACK, got_comm.set_result, SECRET)
        try:
            comm = await connect(listener.address, SECRET, timeout=DEADLINE)
            peer = await asyncio.wait_for(got_comm, DEADLINE)
            comm.write([{"op": "big", "a": np.ones(8_000_000)}])  # 64 MB: backlog
            assert comm.backlogged
            batched = BatchedSend(comm)
            for i in range(10):
                batched.send({"op": "small", "i": i})
            await testing.async_wait_until(
                lambda: batched._drain_task is not None, "the batch to wait for the backlog"
            )
            [big] = await asyncio.wait_for(peer.read(), DEADLINE)
            assert big["a"].sum() == 8_000_000
            rest: list[Any] = []
            while len(rest) < 10:
                rest += await asyncio.wait_for(peer.read(), DEADLINE)
            assert [m["i"] for m in rest] == list(range(10))
            await comm.close()
            peer.abort()
        finally:
            listener.close()

    run(main())


# ------------------------------------------------------- receive buffer, in isolation


class FakeTransport(asyncio.Transport):
    """Just enough of an asyncio transport to drive a _Protocol by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True


def framed(batch: list[Any]) -> bytes:
    frames = comm_module.dumps(batch, compression="none")
    lengths = [memoryview(f).nbytes for f in frames]
    return struct.pack(f"<I{len(frames)}Q", len(frames), *lengths) + b"".join(
        bytes(memoryview(f).cast("B")) for f in frames
    )


@pytest.mark.parametrize("seed", range(6))
def test_receive_buffer_reassembles_any_chunking_of_mixed_batches(seed):
    rng = random.Random(seed)
    batches: list[list[Any]] = []
    for i in range(40):
        kind = rng.choice(["tiny", "many", "medium", "large", "wide"])
        if kind == "tiny":
            batch = [{"op": "x", "i": i}]
        elif kind == "many":
            batch = [{"op": "task-finished", "key": ("k", i, j)} for j in range(rng.randrange(500))]
        elif kind == "medium":  # fits the grown small buffer
            batch = [{"op": "d", "i": i, "a": np.full(rng.randrange(10_000, 30_000), i, "f8")}]
        elif kind == "large":  # its own buffer (bytearray or mmap)
            batch = [{"op": "d", "i": i, "a": np.full(rng.randrange(40_000, 300_000), i, "f8")}]
        else:  # a long frame header: many out-of-band buffers
            batch = [{"op": "w", "i": i, "parts": [np.full(70_000, j, "i1") for j in range(30)]}]
        batches.append(batch)
    stream = b"".join(framed(batch) for batch in batches)

    async def main() -> list[list[Any]]:
        protocol = comm_module._Protocol(max_message_size=2**32)
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.start_framing()
        comm = Comm(protocol, {})
        received = []
        pos = 0
        while pos < len(stream):
            buffer = protocol.get_buffer(-1)
            assert len(buffer) > 0
            n = min(len(buffer), rng.choice([1, 7, 100, 4096, 65536, 1 << 20]), len(stream) - pos)
            buffer[:n] = stream[pos : pos + n]
            pos += n
            protocol.buffer_updated(n)
            while protocol.messages:
                received.append(await comm.read())
        assert not transport.aborted
        return received

    received = asyncio.run(main())
    assert_same(received, batches)


def assert_same(got: Any, expected: Any) -> None:
    """Equality that looks inside lists and dicts and compares arrays by value."""
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for got_item, expected_item in zip(got, expected, strict=True):
            assert_same(got_item, expected_item)
    else:
        assert got == expected


def test_batched_send_drops_only_the_message_that_cannot_be_serialized(caplog):
    import threading

    async def main():
        server = await Server(echo=False).start()
        try:
            comm = await connect(server.address, SECRET, timeout=DEADLINE)
            batched = BatchedSend(comm)
            with caplog.at_level(logging.ERROR, logger="runtime.comm"):
                batched.send({"op": "before"}, {"op": "bad", "lock": threading.Lock()})
                batched.send({"op": "after"})
                await testing.async_wait_until(
                    lambda: len(server.received) >= 2, "len(server.received) >= 2", DEADLINE
                )
            assert server.received == [[{"op": "before"}], [{"op": "after"}]]
            assert any("'bad' message" in r.getMessage() for r in caplog.records)
            await comm.close()
        finally:
            await server.close()

    run(main())
