import pytest

from voxgate.errors import LocalProtocolError
from voxgate.rtp.jitter import FrameState, JitterBuffer
from voxgate.rtp.packet import RtpPacket
from voxgate.rtp.seqnum import uint16_add

PLAYED, LOST, IDLE = FrameState.PLAYED, FrameState.LOST, FrameState.IDLE


def pkt(sequence: int, payload: bytes | None = None) -> RtpPacket:
    if payload is None:
        payload = sequence.to_bytes(2, "big") * 80
    return RtpPacket(0, sequence, sequence * 160 & 0xFFFFFFFF, 1234, payload)


def payload_of(sequence: int) -> bytes:
    return pkt(sequence).payload


def pop_all(buffer: JitterBuffer, count: int) -> list[tuple[FrameState, int | None]]:
    """Pop `count` frames; return (state, sequence-or-None) pairs."""
    out: list[tuple[FrameState, int | None]] = []
    for _ in range(count):
        state, payload = buffer.pop()
        out.append((state, None if payload is None else int.from_bytes(payload[:2], "big")))
    return out


def make(capacity: int = 10, prefetch: int = 1, max_gap: int = 50) -> JitterBuffer:
    return JitterBuffer(capacity_frames=capacity, prefetch_frames=prefetch, max_gap_frames=max_gap)


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
