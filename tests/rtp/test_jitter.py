import pytest

from voxgate.errors import LocalProtocolError
from voxgate.rtp.jitter import FrameState, JitterBuffer
from voxgate.rtp.packet import RtpPacket
from voxgate.rtp.seqnum import uint16_add, uint16_diff, uint32_add

PLAYED, LOST, IDLE = FrameState.PLAYED, FrameState.LOST, FrameState.IDLE


def pkt(sequence: int, payload: bytes | None = None) -> RtpPacket:
    """Frame `sequence` (20 ms, 160 samples); its timestamp wraps 32 bits where
    the sequence number wraps 16 bits (65535 -> 0xFFFFFF60, 0 -> 0)."""
    if payload is None:
        payload = sequence.to_bytes(2, "big") * 80
    return RtpPacket(0, sequence, uint32_add(0, uint16_diff(sequence, 0) * 160), 1234, payload)


def payload_of(sequence: int) -> bytes:
    return pkt(sequence).payload


def pop_all(buffer: JitterBuffer, count: int) -> list[tuple[FrameState, int | None]]:
    """Pop `count` frames; return (state, sequence-or-None) pairs."""
    out: list[tuple[FrameState, int | None]] = []
    for _ in range(count):
        state, payload = buffer.pop()
        out.append((state, None if payload is None else int.from_bytes(payload[:2], "big")))
    return out


def make(
    capacity: int = 10, prefetch: int = 1, max_gap: int = 50, silence_byte: int = 0xFF
) -> JitterBuffer:
    return JitterBuffer(capacity_frames=capacity, prefetch_frames=prefetch, max_gap_frames=max_gap,
                        silence_byte=silence_byte)


def test_in_order_playout():
    jb = make()
    assert jb.pop() == (IDLE, None)
    for seq in range(100, 105):
        jb.push(pkt(seq))
        assert jb.pop() == (PLAYED, payload_of(seq))
    assert jb.stats.received == 5
    assert jb.stats.played == 5
    assert jb.buffered_frames == 0
    assert jb.buffered_bytes == 0


def test_prefetch_holds_playout_back():
    jb = make(prefetch=3)
    jb.push(pkt(10))
    jb.push(pkt(11))
    assert jb.pop() == (IDLE, None)
    assert jb.buffered_frames == 2
    assert jb.buffered_bytes == 320
    jb.push(pkt(12))
    assert pop_all(jb, 4) == [(PLAYED, 10), (PLAYED, 11), (PLAYED, 12), (LOST, None)]


def test_reordering_is_undone():
    jb = make(prefetch=3)
    for seq in (1, 3, 2, 5, 4):
        jb.push(pkt(seq))
    assert pop_all(jb, 5) == [(PLAYED, s) for s in range(1, 6)]
    assert jb.stats.late == 0


def test_reordered_first_packet_during_prefetch_moves_start_back():
    jb = make(prefetch=2)
    jb.push(pkt(8))
    jb.push(pkt(7))
    assert pop_all(jb, 2) == [(PLAYED, 7), (PLAYED, 8)]


def test_reordered_packet_during_prefetch_that_does_not_fit_is_late():
    jb = make(capacity=3, prefetch=3)
    jb.push(pkt(10))
    jb.push(pkt(12))
    jb.push(pkt(9))  # 9..12 would span 4 frames
    assert jb.stats.late == 1
    jb.push(pkt(11))
    assert pop_all(jb, 3) == [(PLAYED, 10), (PLAYED, 11), (PLAYED, 12)]


def test_sequence_wrap():
    jb = make(prefetch=2)
    sequences = [65533, 65534, 65535, 0, 1, 2]
    jb.push(pkt(65533))
    jb.push(pkt(65535))
    jb.push(pkt(65534))
    jb.push(pkt(1))
    jb.push(pkt(0))
    jb.push(pkt(2))
    assert pop_all(jb, 6) == [(PLAYED, s) for s in sequences]
    assert jb.stats.late == jb.stats.resets == jb.stats.overflow == 0


def test_wrap_during_prefetch_rewind():
    jb = make(prefetch=2)
    jb.push(pkt(0))
    jb.push(pkt(65535))
    assert pop_all(jb, 2) == [(PLAYED, 65535), (PLAYED, 0)]


def test_duplicates_are_counted_once_stored():
    jb = make(prefetch=2)
    jb.push(pkt(5))
    jb.push(pkt(5))
    assert jb.stats.duplicates == 1
    assert jb.buffered_frames == 1
    assert jb.pop() == (IDLE, None)
    jb.push(pkt(6))
    assert pop_all(jb, 2) == [(PLAYED, 5), (PLAYED, 6)]


def test_loss_is_reported_and_playout_continues():
    jb = make()
    jb.push(pkt(1))
    assert pop_all(jb, 1) == [(PLAYED, 1)]
    jb.push(pkt(3))
    assert pop_all(jb, 2) == [(LOST, None), (PLAYED, 3)]
    assert jb.stats.lost == 1


def test_late_packet_is_dropped():
    jb = make()
    jb.push(pkt(1))
    jb.push(pkt(3))
    assert pop_all(jb, 3) == [(PLAYED, 1), (LOST, None), (PLAYED, 3)]
    jb.push(pkt(2))  # arrives after its slot was concealed
    jb.push(pkt(3))  # a duplicate of a played frame is late too
    assert jb.stats.late == 2
    assert jb.buffered_frames == 0


def test_overflow_skips_forward_dropping_oldest():
    jb = make(capacity=4, prefetch=4)
    for seq in range(10, 14):
        jb.push(pkt(seq))
    jb.push(pkt(15))  # 15 - 10 = 5 frames: keep 12..15
    assert jb.stats.overflow == 2
    assert jb.buffered_frames == 3
    assert jb.buffered_bytes == 3 * 160
    assert pop_all(jb, 4) == [(PLAYED, 12), (PLAYED, 13), (LOST, None), (PLAYED, 15)]


def test_overflow_across_wrap():
    jb = make(capacity=3, prefetch=3)
    for seq in (65534, 65535, 0):
        jb.push(pkt(seq))
    jb.push(pkt(1))
    assert jb.stats.overflow == 1
    assert pop_all(jb, 3) == [(PLAYED, 65535), (PLAYED, 0), (PLAYED, 1)]


def test_large_jump_resets_and_prefetches_again():
    jb = make(prefetch=2, max_gap=50)
    jb.push(pkt(100))
    jb.push(pkt(101))
    assert pop_all(jb, 1) == [(PLAYED, 100)]
    jb.push(pkt(30000))
    assert jb.stats.resets == 1
    assert jb.buffered_frames == 1  # 101 was dropped with the reset
    assert jb.pop() == (IDLE, None)
    jb.push(pkt(30001))
    assert pop_all(jb, 2) == [(PLAYED, 30000), (PLAYED, 30001)]


def test_large_backward_jump_resets_too():
    jb = make(max_gap=50)
    jb.push(pkt(5000))
    jb.pop()
    jb.push(pkt(100))
    assert jb.stats.resets == 1
    assert jb.stats.late == 0
    assert pop_all(jb, 1) == [(PLAYED, 100)]


def test_stream_stop_goes_idle_after_max_gap_lost_frames():
    jb = make(max_gap=5)
    jb.push(pkt(1))
    assert pop_all(jb, 1) == [(PLAYED, 1)]
    assert pop_all(jb, 5) == [(LOST, None)] * 5
    assert jb.pop() == (IDLE, None)
    # The sender resumes where it left off (sequence numbers count packets, not time).
    jb.push(pkt(2))
    assert jb.stats.late == 0
    assert pop_all(jb, 1) == [(PLAYED, 2)]


def test_reset_forgets_everything():
    jb = make(prefetch=2)
    jb.push(pkt(1))
    jb.push(pkt(2))
    jb.reset()
    assert jb.buffered_frames == 0
    assert jb.buffered_bytes == 0
    assert jb.pop() == (IDLE, None)
    assert jb.stats.resets == 0
    jb.push(pkt(40000))
    jb.push(pkt(40001))
    assert pop_all(jb, 2) == [(PLAYED, 40000), (PLAYED, 40001)]


def test_memory_stays_bounded_under_random_traffic():
    import random

    rng = random.Random(7)
    jb = make(capacity=8, prefetch=3, max_gap=40)
    seq = 65000
    for _ in range(5000):
        seq = uint16_add(seq, rng.choice([-3, -1, 0, 1, 1, 1, 2, 5, 60]))
        jb.push(pkt(seq))
        assert jb.buffered_frames <= 8
        if rng.random() < 0.8:
            jb.pop()
    s = jb.stats
    assert s.received == 5000
    assert s.late and s.duplicates and s.overflow and s.resets and s.lost and s.played
    assert jb.buffered_bytes == 160 * jb.buffered_frames


@pytest.mark.parametrize(
    ("capacity", "prefetch", "max_gap"),
    [(0, 1, 5), (4, 0, 5), (4, 5, 5), (4, 2, 0)],
)
def test_inconsistent_sizes_are_rejected(capacity, prefetch, max_gap):
    with pytest.raises(LocalProtocolError):
        make(capacity, prefetch, max_gap)


def test_a_phase_shift_grows_the_delay_instead_of_dropping_everything_late():
    buffer = make(prefetch=1)
    for seq in range(5):  # in phase: each packet arrives just before its tick
        buffer.push(pkt(seq))
        assert buffer.pop()[0] is FrameState.PLAYED
    # The sender slips: frame 5 misses its tick, then every packet is one tick later.
    assert buffer.pop()[0] is FrameState.LOST
    played = []
    for seq in range(5, 30):
        buffer.push(pkt(seq))
        state, payload = buffer.pop()
        played.append(state)
    assert buffer.stats.grown == 1
    assert buffer.stats.late == 0
    assert played.count(FrameState.PLAYED) >= 24


def test_one_late_packet_grows_the_delay_and_a_calm_second_gives_it_back():
    from voxgate.rtp.jitter import SHRINK_AFTER_FRAMES

    buffer = make(prefetch=1)
    for seq in range(5):  # in phase: each packet arrives just before its tick
        buffer.push(pkt(seq))
        assert buffer.pop() == (PLAYED, payload_of(seq))
    assert buffer.pop()[0] is LOST  # frame 5 is late once ...
    buffer.push(pkt(5))
    seq = 6
    lags = []  # ticks between a packet's arrival and its playout
    for _ in range(SHRINK_AFTER_FRAMES + 5):  # ... then the network is calm again
        buffer.push(pkt(seq))
        state, payload = buffer.pop()
        assert state is PLAYED and payload is not None
        lags.append(seq - int.from_bytes(payload[:2], "big"))
        seq += 1
    assert buffer.stats.grown == 1 and buffer.stats.shrunk == 1
    assert lags[0] == 1 and lags[-1] == 0  # one frame more delay, then none again
    assert buffer.buffered_frames == 0


def test_sustained_surplus_gives_delay_back():
    from voxgate.rtp.jitter import SHRINK_AFTER_FRAMES

    buffer = make(capacity=10, prefetch=1)
    for seq in range(4):  # a burst: three frames beyond the prefetch
        buffer.push(pkt(seq))
    seq = 4
    for _ in range(2 * SHRINK_AFTER_FRAMES + 2):
        buffer.pop()
        buffer.push(pkt(seq))
        seq += 1
    assert buffer.stats.shrunk == 2
    assert buffer.buffered_frames <= 2


class InPhaseSender:
    """A sender whose packet ``n`` arrives just before tick ``n``, or just after it."""

    def __init__(self, buffer: JitterBuffer) -> None:
        self.buffer = buffer
        self.seq = 0

    def on_time(self, ticks: int) -> None:
        for _ in range(ticks):
            self.buffer.push(pkt(self.seq))
            assert self.buffer.pop()[0] is PLAYED
            self.seq += 1

    def late(self) -> None:
        """This tick's packet comes just after the tick: concealed, then played next."""
        assert self.buffer.pop()[0] is LOST
        self.buffer.push(pkt(self.seq))
        self.seq += 1


def test_delay_needed_again_soon_after_it_was_given_back_is_kept_twice_as_long():
    from voxgate.rtp.jitter import SHRINK_AFTER_FRAMES

    buffer = make(capacity=10, prefetch=1)
    sender = InPhaseSender(buffer)
    sender.on_time(5)
    sender.late()  # grown ...
    sender.on_time(SHRINK_AFTER_FRAMES + 2)  # ... given back after a calm second
    assert (buffer.stats.grown, buffer.stats.shrunk) == (1, 1)
    sender.on_time(SHRINK_AFTER_FRAMES)
    sender.late()  # needed again within two seconds: the next give-back waits two
    sender.on_time(SHRINK_AFTER_FRAMES + 10)
    assert (buffer.stats.grown, buffer.stats.shrunk) == (2, 1)
    sender.on_time(SHRINK_AFTER_FRAMES)
    assert (buffer.stats.grown, buffer.stats.shrunk) == (2, 2)
    assert buffer.buffered_frames == 0


def test_backoff_is_capped_and_a_late_packet_long_after_starts_from_one_second():
    from voxgate.rtp.jitter import SHRINK_AFTER_FRAMES, SHRINK_AFTER_MAX_FRAMES

    buffer = make(capacity=10, prefetch=1)
    sender = InPhaseSender(buffer)
    sender.on_time(5)
    calm = SHRINK_AFTER_FRAMES
    for shrunk in range(1, 8):  # late again each time right after the give-back
        sender.late()
        sender.on_time(calm - 1)
        assert buffer.stats.shrunk == shrunk - 1
        sender.on_time(2)
        assert buffer.stats.shrunk == shrunk
        calm = min(2 * calm, SHRINK_AFTER_MAX_FRAMES)
    assert calm == SHRINK_AFTER_MAX_FRAMES
    sender.on_time(2 * SHRINK_AFTER_MAX_FRAMES)  # calm for longer than twice the wait
    sender.late()
    sender.on_time(SHRINK_AFTER_FRAMES + 2)
    assert buffer.stats.shrunk == 8


def audio_at(timestamp: int, samples: int, value: int) -> RtpPacket:
    """A packet of `samples` samples, all `value`, at `timestamp` (mod 2**32)."""
    return RtpPacket(0, 0, timestamp & 0xFFFFFFFF, 1234, bytes([value % 256]) * samples)


def play_timeline(
    jb: JitterBuffer, packet_samples: int, packets: int, phase_ms: float, *,
    first_timestamp: int = 0, skip: frozenset[int] = frozenset(),
) -> list[tuple[FrameState, bytes | None]]:
    """Packets of `packet_samples` (8 kHz) sent on time, one pop every 20 ms
    starting `phase_ms` after the first packet; the pops' results in order."""
    packet_ms = packet_samples / 8
    events = [(k * packet_ms, 0, k) for k in range(packets) if k not in skip]
    end_ms = packets * packet_ms + 200  # room for the playout delay
    events += [(phase_ms + 20 * k, 1, k) for k in range(int((end_ms - phase_ms) // 20))]
    popped = []
    for _, kind, k in sorted(events):
        if kind == 0:
            jb.push(audio_at(first_timestamp + k * packet_samples, packet_samples, k))
        else:
            popped.append(jb.pop())
    return popped


@pytest.mark.parametrize("packet_samples", [40, 80, 160, 240, 320, 400])
@pytest.mark.parametrize("phase_ms", [1, 5, 9, 11, 15, 19])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_any_packet_duration_is_reframed_into_whole_20ms_frames(
    packet_samples, phase_ms, prefetch
):
    jb = make(prefetch=prefetch)
    packets = 4800 // packet_samples  # 600 ms of audio
    popped = play_timeline(jb, packet_samples, packets, phase_ms, first_timestamp=2**32 - 1000)
    played = [payload for state, payload in popped if state is PLAYED]
    assert all(payload is not None and len(payload) == 160 for payload in played)
    sent = b"".join(bytes([k]) * packet_samples for k in range(packets))
    assert b"".join(p for p in played if p is not None) == sent[:160 * len(played)]
    assert len(played) == packets * packet_samples // 160
    assert jb.stats.partial == 0
    assert jb.stats.late == jb.stats.duplicates == jb.stats.overflow == 0
    first_played = next(i for i, (state, _) in enumerate(popped) if state is PLAYED)
    lost_while_playing = [s for s, _ in popped[first_played:first_played + len(played)]
                          if s is LOST]
    assert len(lost_while_playing) <= 1  # at most one slip for packets longer than a frame


def test_two_10ms_packets_make_one_frame():
    jb = make()
    jb.push(audio_at(1000, 80, 1))
    assert jb.pop() == (IDLE, None)  # half a frame is not a prefetch
    jb.push(audio_at(1080, 80, 2))
    assert jb.pop() == (PLAYED, b"\x01" * 80 + b"\x02" * 80)
    assert jb.buffered_bytes == 0


def test_30ms_packet_is_split_and_its_tail_joined_with_the_next():
    jb = make()
    jb.push(audio_at(0, 240, 1))
    assert jb.buffered_frames == 2
    assert jb.buffered_bytes == 240
    assert jb.pop() == (PLAYED, b"\x01" * 160)
    assert jb.pop() == (LOST, None)  # the frame's second half is still in flight: wait once
    assert jb.stats.grown == 1
    jb.push(audio_at(240, 240, 2))
    assert pop_all_payloads(jb, 3) == [b"\x01" * 80 + b"\x02" * 80, b"\x02" * 160, None]


def pop_all_payloads(jb: JitterBuffer, count: int) -> list[bytes | None]:
    return [jb.pop()[1] for _ in range(count)]


def test_a_lost_10ms_packet_is_concealed_with_the_silence_byte():
    jb = make(prefetch=2, silence_byte=0xD5)
    for k in (0, 1, 3, 4, 5):  # 10 ms packets, the one at 240 is lost
        jb.push(audio_at(k * 80, 80, k + 1))
    assert pop_all_payloads(jb, 3) == [
        b"\x01" * 80 + b"\x02" * 80,
        b"\xd5" * 80 + b"\x04" * 80,
        b"\x05" * 80 + b"\x06" * 80,
    ]
    assert jb.stats.partial == 1
    assert jb.stats.played == 3
    assert jb.buffered_bytes == 0


def test_a_partial_frame_plays_after_one_wait_when_nothing_follows():
    jb = make()
    jb.push(audio_at(0, 240, 1))
    jb.pop()
    assert jb.pop() == (LOST, None)
    assert jb.pop() == (PLAYED, b"\x01" * 80 + b"\xff" * 80)
    assert jb.stats.partial == 1


def test_a_packet_longer_than_the_buffer_keeps_its_newest_frames():
    jb = make(capacity=2, prefetch=1)
    jb.push(audio_at(0, 160, 9))
    jb.push(RtpPacket(0, 1, 160, 1234, b"".join(bytes([k]) * 160 for k in range(5))))
    assert jb.buffered_frames == 2
    assert jb.buffered_bytes == 320
    assert jb.stats.overflow == 2  # frame 0 of the buffer and the packet's first three frames
    assert pop_all_payloads(jb, 2) == [b"\x03" * 160, b"\x04" * 160]


def test_an_empty_payload_stores_nothing():
    jb = make()
    jb.push(audio_at(0, 0, 0))
    assert jb.stats.received == 1
    assert jb.buffered_frames == 0
    assert jb.pop() == (IDLE, None)


def test_misaligned_overlap_is_a_duplicate_and_leaves_held_audio_alone():
    jb = make(prefetch=2)
    jb.push(audio_at(0, 160, 1))
    jb.push(audio_at(80, 160, 2))  # overlaps the held frame by half
    assert jb.stats.duplicates == 1
    jb.push(audio_at(160, 80, 3))
    jb.push(audio_at(200, 80, 4))  # overlaps the held 10 ms by half
    assert jb.stats.duplicates == 2
    jb.push(audio_at(240, 80, 5))
    assert pop_all_payloads(jb, 2) == [b"\x01" * 160, b"\x03" * 80 + b"\x05" * 80]


def test_the_late_head_of_a_straddling_packet_is_dropped_its_tail_kept():
    jb = make()
    jb.push(audio_at(0, 160, 1))
    assert jb.pop() == (PLAYED, b"\x01" * 160)
    jb.push(audio_at(100, 100, 2))  # 100..160 was played: 160..200 is kept
    assert jb.stats.late == 1
    jb.push(audio_at(80, 160, 3))  # late head, and 160..200 is held: a duplicate
    assert (jb.stats.late, jb.stats.duplicates) == (2, 1)
    jb.push(audio_at(200, 80, 4))
    assert jb.pop() == (LOST, None)  # the newest frame, partial: its rest may be in flight
    assert jb.pop() == (PLAYED, b"\x02" * 40 + b"\x04" * 80 + b"\xff" * 40)
    assert jb.stats.partial == 1


def test_random_lengths_and_timestamps_keep_bounds_and_frame_size():
    import random

    rng = random.Random(16)
    jb = make(capacity=6, prefetch=2, max_gap=20)
    timestamp = 2**32 - 5000
    for _ in range(4000):
        samples = rng.choice([0, 1, 80, 160, 160, 240, 333, 1600, 1700])
        timestamp += rng.choice([-400, -80, 0, 80, 160, 160, 160, 240, 7, 9000])
        jb.push(audio_at(timestamp, samples, 1))
        timestamp += samples
        assert jb.buffered_frames <= 6
        assert 0 <= jb.buffered_bytes <= 6 * 160
        if rng.random() < 0.7:
            state, payload = jb.pop()
            if state is PLAYED:
                assert payload is not None and len(payload) == 160
            else:
                assert payload is None
    s = jb.stats
    assert s.late and s.duplicates and s.overflow and s.resets and s.lost and s.partial
