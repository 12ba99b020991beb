"""The RTP port pool: even ports, random order, exhaustion, ports held by others."""

from __future__ import annotations

import socket

from voxgate.transports.rtp_ports import PortPool


def test_port_pool_even_ports_exhaustion_and_release():
    pool = PortPool("127.0.0.1", 41001, 41006)  # even ports 41002, 41004, 41006
    assert pool.capacity == 3
    socks = [pool.open_socket() for _ in range(3)]
    assert all(s is not None for s in socks)
    ports = sorted(s.getsockname()[1] for s in socks if s is not None)
    assert ports == [41002, 41004, 41006]
    assert pool.open_socket() is None
    assert pool.exhausted == 1
    first = socks[0]
    assert first is not None
    pool.release(first)
    again = pool.open_socket()
    assert again is not None
    for s in [again, *socks[1:]]:
        assert s is not None
        pool.release(s)
    assert pool.available == 3


def test_port_pool_skips_ports_held_by_others():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 41102))
    try:
        pool = PortPool("127.0.0.1", 41102, 41104)
        sock = pool.open_socket()
        assert sock is not None
        assert sock.getsockname()[1] == 41104
        pool.release(sock)
    finally:
        holder.close()


def test_port_pool_hands_out_ports_in_unpredictable_order():
    orders = set()
    for _ in range(5):
        pool = PortPool("127.0.0.1", 41200, 41240)
        socks = [pool.open_socket() for _ in range(4)]
        orders.add(tuple(s.getsockname()[1] for s in socks if s is not None))
        for s in socks:
            assert s is not None
            pool.release(s)
    assert len(orders) > 1  # not handed out in order from port_min
