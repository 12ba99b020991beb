import struct
import subprocess
import sys

import pytest

from voxgate.errors import LocalProtocolError
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.rtp.jitter import FrameState
from voxgate.rtp.packet import RtpPacket, pack_rtp_datagram
from voxgate.rtp.stream import (
    MAX_PACKET_FRAMES,
    PROBATION_PACKETS,
    RELATCH_AFTER_SILENCE_S,
    RtpStream,
)

PEER = ("192.0.2.10", 40000)
NATTED = ("198.51.100.7", 61234)
ATTACKER = ("203.0.113.66", 5004)
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
    jitter_capacity_frames: int = 10,
) -> RtpStream:
    return RtpStream(
        payload_type=payload_type,
        telephone_event_pt=telephone_event_pt,
        ssrc=0xCAFE,
        initial_sequence=initial_sequence,
        initial_timestamp=initial_timestamp,
        jitter_prefetch_frames=jitter_prefetch_frames,
        jitter_capacity_frames=jitter_capacity_frames,
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


@pytest.mark.parametrize("datagram", [
    bytes.fromhex("80c8000600001111") + bytes(20),  # SR, no report block: parses as RTP PT 72
    bytes.fromhex("81c9000700001111") + bytes(24),  # RR, one block: CC=1 as RTP
    bytes.fromhex("81ca000300001111") + bytes(4),  # SDES: as RTP, its "CSRC" runs past the end
])
def test_rtcp_is_ignored_whether_or_not_it_parses_as_rtp(datagram: bytes):
    stream = make_stream()
    assert stream.receive_datagram_untrusted(datagram, NATTED, 1.0) is None
    assert stream.stats.rtcp_ignored == 1
    assert stream.stats.bad_packets == stream.stats.unknown_payload_type == 0
    assert stream.stats.packets_in == 0


def test_an_audio_payload_type_in_the_rtcp_range_is_refused():
    with pytest.raises(LocalProtocolError, match="RTCP"):
        make_stream(payload_type=72)


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


def test_symmetric_rtp_follows_a_new_source_after_silence_and_probation():
    # Changed with issue 16: a new source used to take over after 4 packets even
    # while the latched one kept sending.
    stream = make_stream(remote_addr=None)
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    assert stream.remote_addr == NATTED
    other = ("198.51.100.7", 61300)  # the NAT rebinds: the old mapping falls silent
    followed_at = None
    for seq in range(2, 60):
        now = 1.0 + (seq - 1) / 50
        stream.receive_datagram_untrusted(audio(seq), other, now)
        if followed_at is None and stream.remote_addr == other:
            followed_at = now
    assert followed_at is not None
    assert followed_at - 1.0 >= RELATCH_AFTER_SILENCE_S
    assert followed_at - 1.0 < RELATCH_AFTER_SILENCE_S + 0.03
    assert stream.stats.relatches == 1
    assert stream.stats.foreign_source == round((followed_at - 1.0) * 50) - 1
    stream.receive_datagram_untrusted(b"\x00" * 20, NATTED, 2.3)  # bad: no latching
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


def test_hold_keeps_the_latch_and_stops_sending_until_resumed():
    # Changed with issue 16: on hold, packets from any source used to be played.
    stream = make_stream()
    stream.set_remote_addr(None)
    assert stream.remote_addr is None
    stream.receive_datagram_untrusted(audio(1), PEER, 1.0)
    assert stream.remote_addr is None
    assert stream.stats.packets_in == 1  # still received and played
    stream.receive_datagram_untrusted(audio(2, ssrc=0x6666), ATTACKER, 1.02)
    assert stream.stats.foreign_source == 1
    stream.set_remote_addr(PEER)
    assert stream.remote_addr == PEER
    stream.receive_datagram_untrusted(audio(2), PEER, 1.02)
    for seq in range(3, 3 + PROBATION_PACKETS):  # PEER is still talking: no takeover
        stream.receive_datagram_untrusted(audio(seq), NATTED, 1.02 + seq / 50)
    assert stream.remote_addr == PEER
    for seq in range(7, 40):  # PEER fell silent: the peer is NATed after all
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


# --- issue 16, item 1: any payload length, always 160-byte frames ---------------


def audio_samples(seq: int, timestamp: int, samples: int, ssrc: int = 0x1111) -> bytes:
    return pack_rtp_datagram(PCMU, seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc,
                             bytes([seq & 0xFF]) * samples, False)


@pytest.mark.parametrize("ptime_ms", [10, 30, 40])
def test_any_ptime_pops_whole_160_byte_frames(ptime_ms):
    stream = make_stream(jitter_prefetch_frames=3, jitter_capacity_frames=12)
    samples = ptime_ms * 8
    packets = 1920 // samples  # 240 ms
    for seq in range(packets):
        stream.receive_datagram_untrusted(audio_samples(seq, 0xFFFFFF00 + seq * samples, samples),
                                          PEER, 1.0 + seq * ptime_ms / 1000)
    popped = [stream.pop_frame() for _ in range(12)]
    assert [state for state, _ in popped] == [FrameState.PLAYED] * 12
    assert {len(payload) for _, payload in popped if payload is not None} == {160}
    sent = b"".join(bytes([seq]) * samples for seq in range(packets))
    assert b"".join(payload for _, payload in popped if payload is not None) == sent
    assert stream.jitter_buffer.buffered_bytes == 0


def test_header_only_packet_keeps_media_alive_without_audio():
    stream = make_stream(remote_addr=None)
    assert stream.receive_datagram_untrusted(audio_samples(1, 160, 0), NATTED, 1.0) is None
    assert stream.stats.empty_payloads == 1
    assert stream.stats.packets_in == 1
    assert stream.last_received_at == 1.0
    assert stream.remote_addr == NATTED  # it may latch
    assert stream.pop_frame() == (FrameState.IDLE, None)
    stream.receive_datagram_untrusted(audio_samples(2, 320, 160), NATTED, 1.02)
    assert stream.pop_frame() == (FrameState.PLAYED, bytes([2]) * 160)


def test_oversize_packet_is_dropped_and_counted():
    stream = make_stream(remote_addr=None)
    too_long = audio_samples(1, 0, (MAX_PACKET_FRAMES * 160) + 1)
    assert stream.receive_datagram_untrusted(too_long, NATTED, 1.0) is None
    assert stream.stats.oversize == 1
    assert stream.stats.packets_in == 0
    assert stream.remote_addr is None  # garbage does not latch
    assert stream.pop_frame() == (FrameState.IDLE, None)


def test_a_packet_of_max_packet_frames_is_played_whole():
    stream = make_stream()
    stream.receive_datagram_untrusted(audio_samples(1, 0, MAX_PACKET_FRAMES * 160), PEER, 1.0)
    frames = [stream.pop_frame() for _ in range(MAX_PACKET_FRAMES)]
    assert frames == [(FrameState.PLAYED, b"\x01" * 160)] * MAX_PACKET_FRAMES


def test_random_payload_lengths_never_raise_and_pop_whole_frames():
    import random

    rng = random.Random(1616)
    stream = make_stream()
    timestamp = 0
    for seq in range(3000):
        samples = rng.choice([0, 1, 7, 80, 160, 160, 240, 1599, 1600, 1601, 1900])
        stream.receive_datagram_untrusted(audio_samples(seq, timestamp, samples), PEER, seq / 50)
        timestamp += rng.choice([samples, samples, 160, 80, -160, 5000])
        state, payload = stream.pop_frame()
        if state is FrameState.PLAYED:
            assert payload is not None and len(payload) == 160
        else:
            assert payload is None
        assert stream.jitter_buffer.buffered_bytes <= 10 * 160
    assert stream.stats.oversize and stream.stats.empty_payloads


# --- issue 16, item 2: strict RTP -------------------------------------------------


def test_first_packet_from_a_foreign_source_does_not_latch_when_the_sdp_named_one():
    stream = make_stream()
    for seq in range(1, 1 + PROBATION_PACKETS):
        stream.receive_datagram_untrusted(audio(seq, ssrc=0x6666), ATTACKER, 1.0 + seq / 50)
    assert stream.remote_addr == PEER
    assert stream.stats.foreign_source == PROBATION_PACKETS
    assert stream.stats.packets_in == 0
    assert stream.pop_frame() == (FrameState.IDLE, None)


def test_bursts_from_a_foreign_source_never_take_over_a_talking_call():
    stream = make_stream()
    played = []
    attacker_seq = 30000
    for tick in range(250):  # 5 s of the peer talking, a 4-packet burst every 80 ms
        now = 1.0 + tick / 50
        stream.receive_datagram_untrusted(audio(tick), PEER, now)
        if tick % 4 == 0:
            for _ in range(PROBATION_PACKETS):
                attacker_seq += 1
                stream.receive_datagram_untrusted(audio(attacker_seq, ssrc=0x6666), ATTACKER,
                                                  now + 0.001)
        assert stream.remote_addr == PEER
        state, payload = stream.pop_frame()
        played.append(payload)
    assert played == [bytes([tick & 0xFF]) * 160 for tick in range(250)]
    assert stream.remote_ssrc == 0x1111
    assert stream.stats.ssrc_changes == stream.stats.relatches == 0
    assert stream.stats.foreign_source == 63 * PROBATION_PACKETS
    assert stream.stats.jitter.resets == 0


def test_the_sdp_address_takes_the_latch_back_from_a_leftover_sender():
    # The port was reused after a restart: a caller of the old process still sends.
    stream = make_stream()
    for seq in range(1, 60):  # the new caller is ringing, silent; the old one takes over
        stream.receive_datagram_untrusted(audio(seq, ssrc=0x6666), ATTACKER, 1.0 + seq / 50)
    assert stream.remote_addr == ATTACKER
    assert stream.stats.relatches == 1
    stream.receive_datagram_untrusted(audio(500), PEER, 2.2)  # the new caller answers
    assert stream.remote_addr == PEER
    assert stream.remote_ssrc == 0x1111
    for seq in range(61, 200):  # both keep sending: the SDP's caller keeps the call
        stream.receive_datagram_untrusted(audio(seq, ssrc=0x6666), ATTACKER, 1.0 + seq / 50)
        stream.receive_datagram_untrusted(audio(seq + 440), PEER, 1.0 + seq / 50)
    assert stream.remote_addr == PEER
    assert stream.remote_ssrc == 0x1111


def test_a_pbx_behind_nat_is_followed_once_its_advertised_address_is_silent():
    private = ("10.1.2.3", 16000)
    stream = make_stream(remote_addr=private)
    assert stream.remote_addr == private
    for seq in range(1, 40):
        stream.receive_datagram_untrusted(audio(seq), NATTED, 1.0 + seq / 50)
    assert stream.remote_addr == NATTED
    assert stream.stats.relatches == 1
    stream.set_remote_addr(private)  # a session refresh with the same offer: the latch stays
    assert stream.remote_addr == NATTED
    stream.set_remote_addr(None)  # hold
    assert stream.remote_addr is None
    stream.set_remote_addr(private)  # resume at the same address
    assert stream.remote_addr == NATTED
    stream.receive_datagram_untrusted(audio(40), NATTED, 1.8)
    # dropped: from the first packet (silence counted from there) for the silence time
    assert abs(stream.stats.foreign_source - RELATCH_AFTER_SILENCE_S * 50) <= 1


def test_a_foreign_source_alternating_ssrcs_never_passes_probation():
    stream = make_stream(remote_addr=None)
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    for seq in range(2, 200):
        stream.receive_datagram_untrusted(audio(seq, ssrc=seq % 2), ATTACKER, 1.0 + seq / 50)
    assert stream.remote_addr == NATTED
    assert stream.stats.relatches == 0


def test_a_foreign_packet_interrupts_no_probation_of_the_latched_source():
    stream = make_stream(remote_addr=None)
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    other = ("198.51.100.7", 61300)
    for seq in range(2, 60):  # the latched source sends a packet every 0.4 s: never silent
        now = 1.0 + seq / 50
        if seq % 20 == 0:
            stream.receive_datagram_untrusted(audio(seq), NATTED, now)
        else:
            stream.receive_datagram_untrusted(audio(seq, ssrc=0x7777), other, now)
    assert stream.remote_addr == NATTED
    assert stream.stats.relatches == 0


def test_reinvite_to_a_new_address_latches_it_at_once():
    stream = make_stream()
    stream.receive_datagram_untrusted(audio(1), PEER, 1.0)
    stream.set_remote_addr(NATTED)
    assert stream.remote_addr == NATTED
    stream.receive_datagram_untrusted(audio(2, ssrc=0x2222), NATTED, 1.02)
    assert stream.stats.foreign_source == 0
    assert stream.remote_ssrc == 0x2222
    stream.receive_datagram_untrusted(audio(2), PEER, 1.04)  # the old address is foreign now
    assert stream.stats.foreign_source == 1


@pytest.mark.parametrize("unspecified", [("0.0.0.0", 4000), ("::", 4000), ("192.0.2.1", 0)])
def test_an_unusable_sdp_address_is_learned_from_the_first_packet(unspecified):
    stream = make_stream(remote_addr=unspecified)
    assert stream.remote_addr is None
    stream.receive_datagram_untrusted(audio(1), NATTED, 1.0)
    assert stream.remote_addr == NATTED


def test_a_host_name_as_address_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        make_stream(remote_addr=("pbx.example", 4000))


def test_the_sdp_address_is_matched_in_canonical_form():
    stream = make_stream(remote_addr=("2001:0db8:0:0::0001", 4000))
    assert stream.remote_addr == ("2001:db8::1", 4000)
    stream.receive_datagram_untrusted(audio(1), ("2001:db8::1", 4000), 1.0)
    assert stream.stats.foreign_source == 0
    assert stream.stats.packets_in == 1
