"""The RTP leg's reads: one readiness check per tick, no read on a quiet socket,
early media left in the kernel until the first tick, the per-tick bound, DTMF
delivered on the leg's own tick, the jitter budget kept in step; SRTP legs
decode only what authenticates under the peer's key and send under ours."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from unittest import mock

import pylibsrtp
import pytest

from voxgate.budget import BufferCaps, SessionBudget
from voxgate.codec.g711 import codec_for
from voxgate.deadman import DeadmanConfig, SessionTimers
from voxgate.pipeline.playback import PlaybackTracker
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.rtp.stream import RtpStream
from voxgate.sip.sdes import Crypto
from voxgate.transports.rtp_leg import (
    LEGS_PER_CHECK,
    MAX_PACKETS_PER_TICK,
    RtpLeg,
    RtpReadiness,
)
from voxgate.transports.rtp_ports import PortPool
from voxgate.transports.srtp import SrtpContext

PCMU = 0
EVENT_PT = 101
SSRC = 0x1234


def rtp(sequence: int, *, payload_type: int = PCMU, payload: bytes = b"\xff" * 160,
        timestamp: int | None = None) -> bytes:
    timestamp = sequence * 160 if timestamp is None else timestamp
    return struct.pack("!BBHII", 0x80, payload_type, sequence, timestamp, SSRC) + payload


class Legs:
    """Legs on one readiness check, and a peer socket sending to them."""

    def __init__(self) -> None:
        self.pool = PortPool("127.0.0.1", 46000, 46200)
        self.readiness = RtpReadiness()
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.legs: list[RtpLeg] = []
        self.dtmf: list[DtmfEvent] = []
        self.budget = SessionBudget(BufferCaps.from_ms(
            {"jitter": 200, "playout": 200, "utterance": 200}, 1 << 20, 1000))

    def leg(self, srtp: SrtpContext | None = None) -> RtpLeg:
        sock = self.pool.open_socket()
        assert sock is not None
        stream = RtpStream(payload_type=PCMU, telephone_event_pt=EVENT_PT, ssrc=1,
                           initial_sequence=0, initial_timestamp=0,
                           remote_addr=self.peer.getsockname())
        timers = SessionTimers(DeadmanConfig(1, 1, 1, 0, 0, 60, 0), 0.0)
        leg = RtpLeg(pool=self.pool, readiness=self.readiness, sock=sock, stream=stream,
                     codec=codec_for("PCMU"), playback=PlaybackTracker(timers, lambda i, s: None),
                     on_dtmf=self.dtmf.append, budget=self.budget, playback_allowance_s=0.0,
                     srtp=srtp)
        self.legs.append(leg)
        return leg

    def send(self, leg: RtpLeg, datagram: bytes) -> None:
        self.peer.sendto(datagram, ("127.0.0.1", leg.local_port))

    def close(self) -> None:
        for leg in self.legs:
            leg.close()
        self.peer.close()


@pytest.fixture
def legs() -> Iterator[Legs]:
    fixture = Legs()
    yield fixture
    fixture.close()


def counting_reads(leg: RtpLeg) -> list[None]:
    """Count reads of ``leg``'s socket (wraps its datagram reads and writes)."""
    calls: list[None] = []
    real = leg._io
    wrapper = mock.Mock(wraps=real)

    def recv() -> tuple[bytes, tuple[str, int]] | None:
        calls.append(None)
        return real.recv()

    wrapper.recv.side_effect = recv
    leg._io = wrapper
    return calls


def test_first_tick_drains_what_waited_then_joins_the_readiness_check(legs: Legs) -> None:
    leg = legs.leg()
    legs.send(leg, rtp(1))  # early media: stays in the kernel until the first tick
    legs.readiness.read(0.0)
    assert leg.packets_in == 0
    arrived, frames = leg.receive(0.02, 1)
    assert arrived and frames == [codec_for("PCMU").decode(b"\xff" * 160)]
    legs.send(leg, rtp(2))
    arrived, frames = leg.receive(0.04, 1)
    assert arrived and len(frames) == 1


def test_a_quiet_leg_makes_no_read_and_one_check_serves_the_tick(legs: Legs) -> None:
    quiet, busy = legs.leg(), legs.leg()
    quiet.receive(0.0, 1)
    busy.receive(0.0, 1)
    quiet_reads, busy_reads = counting_reads(quiet), counting_reads(busy)
    legs.send(busy, rtp(1))
    real_epoll = legs.readiness._epoll
    # set and put back by hand: a mypyc-compiled RtpReadiness has no attribute to delete
    legs.readiness._epoll = epoll = mock.Mock(wraps=real_epoll)
    try:
        assert quiet.receive(0.02, 1) == (False, [])
        arrived, _ = busy.receive(0.02, 1)
        assert arrived
        # one round found the busy socket, the next found nothing: two checks per tick
        assert epoll.poll.call_count == 2
    finally:
        legs.readiness._epoll = real_epoll
    assert quiet_reads == [] and len(busy_reads) == 1
    legs.send(busy, rtp(2))  # same `now`: the tick's check is done, read on the next one
    assert busy.receive(0.02, 1)[0] is False
    assert busy.receive(0.04, 1)[0] is True


def test_at_most_max_packets_per_tick_are_read_the_rest_next_tick(legs: Legs) -> None:
    leg = legs.leg()
    leg.receive(0.0, 1)
    for sequence in range(1, MAX_PACKETS_PER_TICK + 6):
        legs.send(leg, rtp(sequence))
    leg.receive(0.02, 1)
    assert leg.packets_in == MAX_PACKETS_PER_TICK
    leg.receive(0.04, 1)
    assert leg.packets_in == MAX_PACKETS_PER_TICK + 5


def test_dtmf_read_for_another_legs_tick_is_delivered_on_its_own(legs: Legs) -> None:
    first, second = legs.leg(), legs.leg()
    first.receive(0.0, 1)
    second.receive(0.0, 1)
    event = struct.pack("!BBH", 5, 0x80 | 10, 800)  # key 5, end, 800 samples
    for sequence in (10, 11, 12):
        legs.send(second, rtp(sequence, payload_type=EVENT_PT, payload=event, timestamp=1600))
    first.receive(0.02, 1)  # the tick's check reads the second leg's socket too
    assert legs.dtmf == []
    second.receive(0.02, 1)
    assert [e.digit for e in legs.dtmf] == ["5"]


def test_the_jitter_budget_follows_the_jitter_buffer(legs: Legs) -> None:
    leg = legs.leg()
    leg.receive(0.0, 1)
    for sequence in (1, 2, 3):
        legs.send(leg, rtp(sequence))
    leg.receive(0.02, 1)
    held = leg.stream.jitter_buffer.buffered_bytes
    assert legs.budget.held_bytes["jitter"] == 3 * 160 and held == 2 * 160
    leg.receive(0.04, 1)
    assert legs.budget.held_bytes["jitter"] == held
    assert leg.stream.jitter_buffer.buffered_bytes == 160


def test_close_leaves_the_readiness_check(legs: Legs) -> None:
    leg, other = legs.leg(), legs.leg()
    leg.receive(0.0, 1)
    other.receive(0.0, 1)
    leg.close()
    leg.close()
    legs.send(other, rtp(1))
    assert other.receive(0.02, 1)[0] is True
    assert leg.receive(0.04, 1) == (False, [])


def test_later_legs_in_a_long_tick_get_a_fresh_check(legs: Legs) -> None:
    many = [legs.leg() for _ in range(LEGS_PER_CHECK + 1)]
    for leg in many:
        leg.receive(0.0, 1)
    last = many[-1]
    many[0].receive(0.02, 1)  # the tick's first check
    legs.send(last, rtp(1))  # arrives while the legs before the last one run
    for leg in many[1:-1]:
        leg.receive(0.02, 1)
    assert last.packets_in == 0
    assert last.receive(0.02, 1)[0] is True  # the LEGS_PER_CHECK-th call checked again


# --- SRTP (RFC 3711) ----------------------------------------------------------

PEER_KEY, OUR_KEY, WRONG_KEY = b"\x01" * 30, b"\x02" * 30, b"\x03" * 30


def srtp_session(key: bytes, direction: int) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=direction))


def test_an_srtp_leg_decodes_the_peers_key_and_drops_the_rest_counted(legs: Legs) -> None:
    offered = Crypto(1, "AES_CM_128_HMAC_SHA1_80", PEER_KEY)
    leg = legs.leg(SrtpContext(offered, offered.answer(OUR_KEY)))
    leg.receive(0.0, 1)
    peer = srtp_session(PEER_KEY, pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    wrong = srtp_session(WRONG_KEY, pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    good = peer.protect(rtp(1))
    legs.send(leg, wrong.protect(rtp(1, payload=b"\x00" * 160)))  # a wrong key
    legs.send(leg, rtp(2, payload=b"\x00" * 170))  # plain RTP (its last bytes as a tag)
    legs.send(leg, good)
    legs.send(leg, good)  # replayed
    arrived, frames = leg.receive(0.02, 1)
    assert arrived and frames == [codec_for("PCMU").decode(b"\xff" * 160)]
    assert leg.packets_in == 1
    counters = leg.counters()
    assert (counters["srtp_drop_auth"], counters["srtp_drop_replay"]) == (2, 1)
    assert counters["drop_bad_packet"] == 0  # never reached the RTP parser

    leg.send(None, [], 0.04)  # our packet: protected with our key, the peer can read it
    datagram, _ = legs.peer.recvfrom(2048)
    plain = srtp_session(OUR_KEY, pylibsrtp.Policy.SSRC_ANY_INBOUND).unprotect(datagram)
    assert len(datagram) == len(plain) + 10 and plain[12:] == b"\xff" * 160


def test_a_plain_leg_reports_no_srtp_counters(legs: Legs) -> None:
    assert not any(name.startswith("srtp_") for name in legs.leg().counters())
