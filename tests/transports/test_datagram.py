"""Tests for voxgate.transports.datagram: an RTP leg's UDP reads and writes, the C
extension (compiled build) and the socket module's (pure build) alike."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from voxgate.transports.datagram import Datagrams, SocketDatagrams, datagrams_for

MAX_BYTES = 64


def _implementations() -> list[str]:
    try:
        import voxgate.transports._datagram  # noqa: F401
    except ImportError:
        return ["socket"]
    return ["socket", "c"]


Make = Callable[[socket.socket], Datagrams]


@pytest.fixture(params=_implementations())
def make(request: pytest.FixtureRequest) -> Make:
    if request.param == "socket":
        return lambda sock: SocketDatagrams(sock, MAX_BYTES)
    return lambda sock: datagrams_for(sock, MAX_BYTES)


def _udp(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = _udp(socket.AF_INET, "127.0.0.1"), _udp(socket.AF_INET, "127.0.0.1")
    yield ours, peer
    ours.close()
    peer.close()


@pytest.fixture
def other() -> Iterator[socket.socket]:
    sock = _udp(socket.AF_INET, "127.0.0.1")
    yield sock
    sock.close()


def _arrive(io: Datagrams) -> tuple[bytes, tuple[str, int]]:
    for _ in range(1000):  # loopback delivers at once; a bounded wait all the same
        got = io.recv()
        if got is not None:
            return got
        time.sleep(0.001)
    raise AssertionError("no datagram arrived")


def test_receives_with_the_source_and_none_when_empty(
    make: Make, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    io = make(ours)
    assert io.recv() is None
    peer.sendto(b"one", ours.getsockname())
    peer.sendto(b"two", ours.getsockname())
    first, second = _arrive(io), _arrive(io)
    assert first == (b"one", peer.getsockname()) and second == (b"two", peer.getsockname())
    assert io.recv() is None


def test_a_new_source_gets_its_own_address(
    make: Make, pair: tuple[socket.socket, socket.socket], other: socket.socket
) -> None:
    ours, peer = pair
    io = make(ours)
    peer.sendto(b"a", ours.getsockname())
    other.sendto(b"b", ours.getsockname())
    peer.sendto(b"c", ours.getsockname())
    sources = [_arrive(io)[1] for _ in range(3)]
    assert sources == [peer.getsockname(), other.getsockname(), peer.getsockname()]


def test_a_longer_datagram_is_truncated_as_recvfrom_does(
    make: Make, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    io = make(ours)
    peer.sendto(bytes(range(100)), ours.getsockname())
    assert _arrive(io)[0] == bytes(range(MAX_BYTES))


def test_sends_to_the_address_and_follows_a_new_one(
    make: Make, pair: tuple[socket.socket, socket.socket], other: socket.socket
) -> None:
    ours, peer = pair
    io = make(ours)
    to_peer = peer.getsockname()
    io.send(b"x", to_peer)
    io.send(b"y", to_peer)
    io.send(b"z", other.getsockname())
    assert _arrive(SocketDatagrams(peer, MAX_BYTES)) == (b"x", ours.getsockname())
    assert _arrive(SocketDatagrams(peer, MAX_BYTES))[0] == b"y"
    assert _arrive(SocketDatagrams(other, MAX_BYTES))[0] == b"z"


def test_an_equal_new_tuple_goes_to_the_same_place_and_a_new_port_moves_it(
    make: Make, pair: tuple[socket.socket, socket.socket], other: socket.socket
) -> None:
    """Compiled callers box a new (host, port) tuple per send: the destination
    is followed by value, the host string alone does not pin it."""
    ours, peer = pair
    io = make(ours)
    host = "127.0.0.1"
    peer_port, other_port = peer.getsockname()[1], other.getsockname()[1]
    io.send(b"a", (host, peer_port))
    io.send(b"b", (host, int(str(peer_port))))  # equal, not the same objects
    io.send(b"c", (host, other_port))  # the same host str, another port
    io.send(b"d", ("127.0.0." + "1", peer_port))  # an equal host str, not the same one
    from_peer = SocketDatagrams(peer, MAX_BYTES)
    assert [_arrive(from_peer)[0] for _ in range(3)] == [b"a", b"b", b"d"]
    assert _arrive(SocketDatagrams(other, MAX_BYTES))[0] == b"c"
    with pytest.raises(OverflowError):  # a bad port after a good one still raises
        io.send(b"e", (host, 70000))
    io.send(b"f", (host, peer_port))
    assert _arrive(from_peer)[0] == b"f"


def test_a_bad_destination_raises(make: Make, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    io = make(ours)
    with pytest.raises(OSError):
        io.send(b"x", ("::1", 4000))  # not of the socket's family
    with pytest.raises(OverflowError):
        io.send(b"x", ("127.0.0.1", 70000))


def test_an_icmp_error_is_a_read_that_found_nothing(make: Make) -> None:
    ours, gone = _udp(socket.AF_INET, "127.0.0.1"), _udp(socket.AF_INET, "127.0.0.1")
    closed_port = gone.getsockname()
    gone.close()
    ours.connect(closed_port)  # only a connected UDP socket is told of ICMP errors
    io = make(ours)
    try:
        ours.send(b"x")  # ECONNREFUSED comes back on the socket
        assert io.recv() is None
        assert io.recv() is None
    finally:
        ours.close()


def test_ipv6(make: Make) -> None:
    try:
        ours, peer = _udp(socket.AF_INET6, "::1"), _udp(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    io = make(ours)
    try:
        peer.sendto(b"six", ours.getsockname())
        assert _arrive(io) == (b"six", peer.getsockname()[:2])
        io.send(b"back", peer.getsockname()[:2])
        assert _arrive(SocketDatagrams(peer, MAX_BYTES)) == (b"back", ours.getsockname()[:2])
        with pytest.raises(OSError):
            io.send(b"x", ("127.0.0.1", 4000))
    finally:
        ours.close()
        peer.close()


def test_the_compiled_build_reads_in_c() -> None:
    pytest.importorskip("voxgate.transports._datagram")
    sock = _udp(socket.AF_INET, "127.0.0.1")
    try:
        assert type(datagrams_for(sock, MAX_BYTES)).__name__ == "DatagramIo"
    finally:
        sock.close()
