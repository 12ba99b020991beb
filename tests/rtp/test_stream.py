import struct
import subprocess
import sys

import pytest

from voxgate.errors import LocalProtocolError
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.rtp.jitter import FrameState
from voxgate.rtp.packet import RtpPacket, pack_rtp_datagram
from voxgate.rtp.stream import PROBATION_PACKETS, RtpStream

PEER = ("192.0.2.10", 40000)
NATTED = ("198.51.100.7", 61234)
PCMU = 0
TE = 101


def make_stream(
    *,
    payload_type: int = PCMU,
    telephone_event_pt: int | None = TE,
    initial_sequence: int = 65534,
    initial_timestamp: int = 0xFFFFFF00,
    remote_addr: tuple[str, int] | None = PEER,
    jitter_prefetch_frames: int = 1,
) -> RtpStream:
    return RtpStream(
        payload_type=payload_type,
        telephone_event_pt=telephone_event_pt,
        ssrc=0xCAFE,
        initial_sequence=initial_sequence,
        initial_timestamp=initial_timestamp,
        jitter_prefetch_frames=jitter_prefetch_frames,
        remote_addr=remote_addr,
    )


def audio(seq: int, ssrc: int = 0x1111, pt: int = PCMU) -> bytes:
    payload = bytes([seq & 0xFF]) * 160
    return pack_rtp_datagram(pt, seq, seq * 160, ssrc, payload, False)


def dtmf(
    event: int, timestamp: int, duration: int, end: bool, seq: int, ssrc: int = 0x1111
) -> bytes:
    payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
    return pack_rtp_datagram(TE, seq, timestamp, ssrc, payload, False)


def test_audio_goes_through_the_jitter_buffer():
    stream = make_stream()
    assert stream.pop_frame() == (FrameState.IDLE, None)
    assert stream.receive_datagram_untrusted(audio(7), PEER, 1.0) is None
    assert stream.receive_datagram_untrusted(audio(9), PEER, 1.02) is None
    assert stream.receive_datagram_untrusted(audio(8), PEER, 1.04) is None
    assert stream.pop_frame() == (FrameState.PLAYED, bytes([7]) * 160)
    assert stream.pop_frame() == (FrameState.PLAYED, bytes([8]) * 160)
    assert stream.pop_frame() == (FrameState.PLAYED, bytes([9]) * 160)
    assert stream.pop_frame() == (FrameState.LOST, None)
    assert stream.last_received_at == 1.04
    assert stream.stats.packets_in == 3
    assert stream.stats.bytes_in == 3 * 172
    assert stream.stats.jitter.played == 3
    assert stream.remote_ssrc == 0x1111
    assert stream.jitter_buffer.buffered_bytes == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", bytes(11), bytes.fromhex("40000001000000000000000a"), b"\x90" + bytes(12)],
)
def test_bad_datagrams_are_counted_never_raised(data):
    stream = make_stream()
    assert stream.receive_datagram_untrusted(data, PEER, 1.0) is None
    assert stream.stats.bad_packets == 1
    assert stream.stats.packets_in == 0
    assert stream.last_received_at is None


def test_rtcp_is_counted_and_ignored():
    stream = make_stream(remote_addr=None)
    rr = bytes.fromhex("80c9000100001111")
    assert stream.receive_datagram_untrusted(rr, NATTED, 1.0) is None
    assert stream.stats.rtcp_ignored == 1
    assert stream.stats.bad_packets == 0
    assert stream.remote_addr is None  # RTCP does not latch
    assert stream.last_received_at is None


def test_unknown_payload_type_is_counted():
    stream = make_stream()
    assert stream.receive_datagram_untrusted(audio(1, pt=8), NATTED, 1.0) is None
    assert stream.stats.unknown_payload_type == 1
    assert stream.remote_addr == PEER
    assert stream.pop_frame() == (FrameState.IDLE, None)


def test_without_telephone_event_pt_dtmf_is_unknown():
    stream = make_stream(telephone_event_pt=None)
    stream.receive_datagram_untrusted(dtmf(5, 100, 800, True, 1), PEER, 1.0)
    assert stream.stats.unknown_payload_type == 1


def test_symmetric_rtp_follows_a_new_source_after_probation():
    stream = make_stream()
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    assert stream.remote_addr == NATTED
    other = ("198.51.100.7", 61300)  # the NAT rebinds
    for seq in range(2, 2 + PROBATION_PACKETS - 1):
        stream.receive_datagram_untrusted(audio(seq), other, 1.0 + seq / 50)
        assert stream.remote_addr == NATTED
    stream.receive_datagram_untrusted(audio(9), other, 1.2)
    assert stream.remote_addr == other
    assert stream.stats.foreign_source == PROBATION_PACKETS - 1
    stream.receive_datagram_untrusted(b"\x00" * 20, NATTED, 1.22)  # bad: no latching
    assert stream.remote_addr == other


def test_spoofed_packets_interleaved_with_the_peer_never_take_over():
    stream = make_stream()
    attacker = ("203.0.113.66", 5004)
    for seq in range(1, 40):
        stream.receive_datagram_untrusted(audio(seq), PEER, seq / 50)
        stream.receive_datagram_untrusted(audio(seq, ssrc=0x6666), attacker, seq / 50)
    assert stream.remote_addr == PEER
    assert stream.remote_ssrc == 0x1111
    assert stream.stats.foreign_source == 39
    assert stream.stats.ssrc_changes == 0


def test_learns_the_remote_address_from_the_first_packet():
    stream = make_stream(remote_addr=None)
    assert stream.remote_addr is None
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    assert stream.remote_addr == NATTED


def test_hold_suspends_latching_until_a_new_address():
    stream = make_stream()
    stream.set_remote_addr(None)
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    assert stream.remote_addr is None
    assert stream.stats.packets_in == 1  # still received and played
    stream.set_remote_addr(PEER)
    assert stream.remote_addr == PEER
    stream.receive_datagram_untrusted(audio(2), PEER, 1.02)
    assert stream.remote_addr == PEER
    for seq in range(3, 3 + PROBATION_PACKETS):  # the peer is NATed after all
        stream.receive_datagram_untrusted(audio(seq), NATTED, 1.02 + seq / 50)
    assert stream.remote_addr == NATTED


def test_ssrc_change_resets_the_jitter_buffer():
    stream = make_stream(jitter_prefetch_frames=2)
    stream.receive_datagram_untrusted(audio(100, ssrc=1), PEER, 1.0)
    stream.receive_datagram_untrusted(audio(101, ssrc=1), PEER, 1.02)
    assert stream.pop_frame()[0] is FrameState.PLAYED
    stream.receive_datagram_untrusted(audio(5, ssrc=2), PEER, 1.04)  # the peer restarted
    assert stream.stats.ssrc_changes == 1
    assert stream.remote_ssrc == 2
    assert stream.remote_addr == PEER
    assert stream.jitter_buffer.buffered_frames == 1  # 101 went with the old source
    assert stream.pop_frame() == (FrameState.IDLE, None)
    stream.receive_datagram_untrusted(audio(6, ssrc=2), PEER, 1.06)
    assert stream.pop_frame() == (FrameState.PLAYED, bytes([5]) * 160)
    assert stream.stats.jitter.late == 0
    assert stream.stats.jitter.resets == 0


def test_dtmf_press_is_returned_once():
    stream = make_stream()
    packets = [dtmf(5, 8000, d, False, s) for s, d in ((10, 160), (11, 320))]
    packets += [dtmf(5, 8000, 480, True, s) for s in (12, 13, 14)]
    events = [
        stream.receive_datagram_untrusted(p, PEER, 2.0 + i / 50) for i, p in enumerate(packets)
    ]
    assert events == [None, None, DtmfEvent("5", 60, 2.0), None, None]
    assert stream.stats.dtmf.events == 1
    assert stream.stats.packets_in == 5


def test_dtmf_with_lost_end_packets_across_an_ssrc_change_is_dropped():
    stream = make_stream()
    stream.receive_datagram_untrusted(dtmf(5, 8000, 160, False, 1, ssrc=1), PEER, 2.0)
    assert stream.receive_datagram_untrusted(dtmf(6, 100, 160, False, 9, ssrc=2), PEER, 3.0) is None
    assert stream.stats.dtmf.lost_ends == 0


def test_truncated_telephone_event_is_a_bad_packet():
    stream = make_stream()
    short = pack_rtp_datagram(TE, 1, 1, 0x1111, b"\x05\x80", False)
    assert stream.receive_datagram_untrusted(short, PEER, 1.0) is None
    assert stream.stats.bad_packets == 1


def test_build_outbound_numbers_packets_and_wraps():
    stream = make_stream()
    packets = [RtpPacket.parse_untrusted(stream.build_outbound(b"\xff" * 160)) for _ in range(3)]
    assert [p.sequence for p in packets] == [65534, 65535, 0]
    assert [p.timestamp for p in packets] == [0xFFFFFF00, 0xFFFFFFA0, 0x40]
    assert [p.marker for p in packets] == [True, False, False]
    assert {p.ssrc for p in packets} == {0xCAFE}
    assert {p.payload_type for p in packets} == {PCMU}
    assert stream.stats.packets_out == 3
    assert stream.stats.bytes_out == 3 * 172


def test_build_outbound_skipped_ticks_and_talkspurt_marker():
    stream = make_stream(initial_sequence=10, initial_timestamp=1000, payload_type=8)
    first = RtpPacket.parse_untrusted(stream.build_outbound(b"a", frames_elapsed=5))
    second = RtpPacket.parse_untrusted(stream.build_outbound(b"b", frames_elapsed=3))
    stream.mark_next()
    third = RtpPacket.parse_untrusted(stream.build_outbound(b"c"))
    fourth = RtpPacket.parse_untrusted(stream.build_outbound(b"d"))
    assert (first.sequence, first.timestamp, first.marker) == (10, 1000, True)
    assert (second.sequence, second.timestamp, second.marker) == (11, 1480, False)
    assert (third.sequence, third.timestamp, third.marker) == (12, 1640, True)
    assert (fourth.sequence, fourth.timestamp, fourth.marker) == (13, 1800, False)
    assert fourth.payload_type == 8
    with pytest.raises(LocalProtocolError):
        stream.build_outbound(b"e", frames_elapsed=0)


def test_invalid_payload_types_are_rejected():
    with pytest.raises(LocalProtocolError):
        make_stream(payload_type=128)
    with pytest.raises(LocalProtocolError):
        make_stream(telephone_event_pt=-1)


def test_rtp_modules_do_no_io():
    code = (
        "import sys\n"
        "import voxgate.rtp.stream, voxgate.rtp.seqnum\n"
        "bad = {'trio', 'socket', 'asyncio', 'threading', 'selectors'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
