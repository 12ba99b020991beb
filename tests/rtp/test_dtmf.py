import struct

import pytest

from voxgate.errors import BadPacket
from voxgate.rtp.dtmf import (
    DtmfEvent,
    DtmfReceiver,
    TelephoneEvent,
    parse_telephone_event_untrusted,
)
from voxgate.rtp.packet import RtpPacket

_seq = iter(range(1_000_000))


def te_packet(
    event: int, timestamp: int, duration: int, end: bool = False, volume: int = 10
) -> RtpPacket:
    payload = struct.pack("!BBH", event, (0x80 if end else 0) | volume, duration)
    return RtpPacket(101, next(_seq) & 0xFFFF, timestamp, 99, payload)


def press(event: int, timestamp: int, steps: int = 3, step: int = 400) -> list[RtpPacket]:
    """Packets of one key press as RFC 4733 §2.5.1 senders emit them: growing duration,
    then the final packet three times with E set."""
    packets = [te_packet(event, timestamp, step * i) for i in range(1, steps + 1)]
    final = step * (steps + 1)
    packets += [te_packet(event, timestamp, final, end=True) for _ in range(3)]
    return packets


def feed(receiver: DtmfReceiver, packets: list[RtpPacket], now: float = 10.0) -> list[DtmfEvent]:
    events = []
    for i, packet in enumerate(packets):
        event = receiver.receive(packet, now + i * 0.05)
        if event is not None:
            events.append(event)
    return events


def test_parse_telephone_event():
    assert parse_telephone_event_untrusted(bytes.fromhex("058a0320")) == TelephoneEvent(
        event=5, end=True, volume=10, duration=800
    )
    assert parse_telephone_event_untrusted(bytes.fromhex("0b3f0000")) == TelephoneEvent(
        event=11, end=False, volume=63, duration=0
    )


def test_parse_ignores_reserved_bit_and_trailing_blocks():
    parsed = parse_telephone_event_untrusted(bytes.fromhex("01400064") + b"\x02\x00\x00\x00")
    assert parsed == TelephoneEvent(event=1, end=False, volume=0, duration=100)


@pytest.mark.parametrize("payload", [b"", b"\x05", b"\x05\x8a\x03"])
def test_parse_short_payload_raises(payload):
    with pytest.raises(BadPacket):
        parse_telephone_event_untrusted(payload)


def test_one_event_per_press_despite_retransmitted_ends():
    receiver = DtmfReceiver()
    events = feed(receiver, press(5, timestamp=1000))
    assert events == [DtmfEvent(digit="5", duration_ms=200, at=10.0)]
    assert receiver.stats.events == 1


def test_sequence_of_digits():
    receiver = DtmfReceiver()
    packets = press(1, 1000) + press(10, 3000) + press(11, 5000) + press(15, 7000)
    assert [e.digit for e in feed(receiver, packets)] == ["1", "*", "#", "D"]


def test_same_digit_twice_is_two_presses():
    receiver = DtmfReceiver()
    assert [e.digit for e in feed(receiver, press(7, 1000) + press(7, 2600))] == ["7", "7"]


def test_lost_end_packets_emitted_when_next_event_starts():
    receiver = DtmfReceiver()
    first = press(3, 1000)[:3]  # all three E packets lost
    assert feed(receiver, first, now=20.0) == []
    second = press(4, 4000)
    events = feed(receiver, second, now=21.0)
    assert events == [
        DtmfEvent(digit="3", duration_ms=150, at=20.0),
        DtmfEvent(digit="4", duration_ms=200, at=21.0),
    ]
    assert receiver.stats.lost_ends == 1


def test_short_press_whose_first_packet_is_an_end_after_a_lost_end():
    receiver = DtmfReceiver()
    feed(receiver, press(2, 1000)[:2])
    ends = [te_packet(9, 3000, 400, end=True) for _ in range(3)]
    events = feed(receiver, ends, now=30.0)
    assert [e.digit for e in events] == ["2", "9"]
    assert events[1].at == 30.0


def test_only_end_packets_arrive():
    receiver = DtmfReceiver()
    events = feed(receiver, press(0, 1000)[-3:])
    assert [e.digit for e in events] == ["0"]
    assert events[0].duration_ms == 200


def test_stale_packet_of_previous_event_is_ignored():
    receiver = DtmfReceiver()
    first = press(1, 1000)
    second = press(2, 3000)
    # The last E retransmission of "1" arrives after "2" started.
    packets = first[:-1] + second[:2] + [first[-1]] + second[2:]
    assert [e.digit for e in feed(receiver, packets)] == ["1", "2"]
    assert receiver.stats.stale == 1
    assert receiver.stats.lost_ends == 0


def test_timestamp_wrap_starts_a_new_event():
    receiver = DtmfReceiver()
    packets = press(6, 0xFFFFFF00) + press(8, 0x100)
    assert [e.digit for e in feed(receiver, packets)] == ["6", "8"]
    assert receiver.stats.stale == 0


def test_non_dtmf_events_are_counted_not_emitted():
    receiver = DtmfReceiver()
    packets = press(16, 1000) + press(5, 3000)  # 16 = flash
    assert [e.digit for e in feed(receiver, packets)] == ["5"]
    assert receiver.stats.ignored_events == 1
    assert receiver.stats.events == 1


def test_duration_follows_the_clock_rate():
    receiver = DtmfReceiver(clock_rate_hz=16000)
    (event,) = feed(receiver, press(5, 1000, steps=1, step=800))
    assert event.duration_ms == 100


def test_duration_keeps_the_longest_seen():
    receiver = DtmfReceiver()
    packets = [te_packet(4, 500, 800), te_packet(4, 500, 400), te_packet(4, 500, 640, end=True)]
    (event,) = feed(receiver, packets)
    assert event.duration_ms == 100


def test_reset_drops_the_pending_event():
    receiver = DtmfReceiver()
    feed(receiver, press(3, 1000)[:2])
    receiver.reset()
    assert feed(receiver, press(4, 500)) == [DtmfEvent("4", 200, 10.0)]
    assert receiver.stats.lost_ends == 0


def test_bad_payload_raises_bad_packet():
    receiver = DtmfReceiver()
    with pytest.raises(BadPacket):
        receiver.receive(RtpPacket(101, 1, 1, 1, b"\x01"), 0.0)
