import struct

import pytest

from voxgate.errors import BadPacket, LocalProtocolError
from voxgate.rtp.packet import (
    RTP_HEADER_LENGTH,
    RtpPacket,
    is_rtcp_untrusted,
    pack_rtp_datagram,
)

# A PCMU packet as captured: V=2, M=1, PT=0, seq 0x1a2b, ts 0x00000a00, SSRC 0xdeadbeef.
PCMU_MARKED = bytes.fromhex("80801a2b00000a00deadbeef") + b"\xff" * 160
# PT 101 telephone-event, digit 5, E bit, volume 10, duration 800.
TELEPHONE_EVENT = bytes.fromhex("80650001000000a012345678058a0320")
# Two CSRCs, PCMA.
WITH_CSRCS = bytes.fromhex("82080002000001400000000100000002000000037777")
# An RTCP receiver report (PT 201) with one empty report block count.
RTCP_RR = bytes.fromhex("80c9000100000001")


def test_header_length_constant():
    assert RTP_HEADER_LENGTH == 12


def test_parse_plain_packet():
    packet = RtpPacket.parse_untrusted(PCMU_MARKED)
    assert packet.payload_type == 0
    assert packet.marker is True
    assert packet.sequence == 0x1A2B
    assert packet.timestamp == 0xA00
    assert packet.ssrc == 0xDEADBEEF
    assert packet.csrcs == ()
    assert packet.payload == b"\xff" * 160


def test_parse_csrcs():
    packet = RtpPacket.parse_untrusted(WITH_CSRCS)
    assert packet.payload_type == 8
    assert packet.marker is False
    assert packet.csrcs == (2, 3)
    assert packet.payload == b"\x77\x77"


@pytest.mark.parametrize("data", [PCMU_MARKED, TELEPHONE_EVENT, WITH_CSRCS, PCMU_MARKED[:12]])
def test_round_trip(data):
    assert RtpPacket.parse_untrusted(data).serialize() == data


def test_header_extension_is_skipped():
    # X bit, profile 0xBEDE, 2 words of extension, then payload.
    data = (
        bytes.fromhex("9000000500000000000000aa")
        + struct.pack("!HH", 0xBEDE, 2)
        + b"\x01" * 8
        + b"payload"
    )
    packet = RtpPacket.parse_untrusted(data)
    assert packet.payload == b"payload"
    assert packet.sequence == 5
    # Serializing drops the extension.
    assert packet.serialize() == bytes.fromhex("8000000500000000000000aa") + b"payload"


def test_padding_is_removed():
    data = bytes.fromhex("a000000500000000000000aa") + b"abcd" + b"\x00\x00\x03"
    assert RtpPacket.parse_untrusted(data).payload == b"abcd"


def test_padding_with_extension_and_csrc():
    data = (
        bytes.fromhex("b100000500000000000000aa")
        + struct.pack("!I", 9)
        + struct.pack("!HH", 1, 1)
        + b"\x00" * 4
        + b"xy"
        + b"\x02"
    )
    packet = RtpPacket.parse_untrusted(data)
    assert packet.csrcs == (9,)
    assert packet.payload == b"x"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter"),
        (PCMU_MARKED[:11], "shorter"),
        (bytes.fromhex("40000001000000000000000a"), "version"),
        (bytes.fromhex("00000001000000000000000a"), "version"),
        (bytes.fromhex("c0000001000000000000000a"), "version"),
        # CC=3 but only one CSRC present.
        (bytes.fromhex("83000001000000000000000a00000001"), "CSRC"),
        # CC=15 on a bare header.
        (bytes.fromhex("8f000001000000000000000a"), "CSRC"),
        # X set, no room for the preamble.
        (bytes.fromhex("90000001000000000000000a0001"), "preamble"),
        # X set, extension claims 4 words, has 1.
        (bytes.fromhex("90000001000000000000000a0001000400000000"), "extension"),
        # P set, padding count 0.
        (bytes.fromhex("a0000001000000000000000a0000"), "padding"),
        # P set, padding count larger than the payload.
        (bytes.fromhex("a0000001000000000000000a0009"), "padding"),
    ],
)
def test_invalid_packets_raise_bad_packet(data, reason):
    with pytest.raises(BadPacket, match=reason) as info:
        RtpPacket.parse_untrusted(data)
    assert info.value.status_hint is None


def test_every_truncation_of_a_complex_packet_raises_or_parses():
    data = (
        bytes.fromhex("b200000500000000000000aa")
        + struct.pack("!II", 1, 2)
        + struct.pack("!HH", 1, 1)
        + b"\x00" * 4
        + b"xyz"
        + b"\x01"
    )
    assert RtpPacket.parse_untrusted(data).payload == b"xyz"
    for cut in range(len(data)):
        try:
            packet = RtpPacket.parse_untrusted(data[:cut])
        except BadPacket:
            continue
        # A cut that still parses got past the CSRC list and kept its payload inside.
        assert packet.csrcs == (1, 2)
        assert len(packet.payload) < cut


def test_serialize_rejects_out_of_range_fields():
    with pytest.raises(LocalProtocolError):
        RtpPacket(128, 1, 1, 1, b"").serialize()
    with pytest.raises(LocalProtocolError):
        RtpPacket(0, 70000, 1, 1, b"").serialize()
    with pytest.raises(LocalProtocolError):
        RtpPacket(0, 1, 1, 1, b"", csrcs=tuple(range(16))).serialize()


def test_pack_rtp_datagram_matches_serialize():
    for marker in (False, True):
        packet = RtpPacket(8, 65535, 0xFFFFFFFF, 42, b"\xd5" * 160, marker)
        datagram = pack_rtp_datagram(8, 65535, 0xFFFFFFFF, 42, b"\xd5" * 160, marker)
        assert datagram == packet.serialize()
        assert RtpPacket.parse_untrusted(datagram) == packet


def test_repr_shows_header_fields():
    text = repr(RtpPacket.parse_untrusted(PCMU_MARKED))
    assert "seq=6699" in text
    assert "ts=2560" in text
    assert "marker=True" in text
    assert "pt=0" in text


def test_packets_are_frozen():
    packet = RtpPacket.parse_untrusted(PCMU_MARKED)
    with pytest.raises(AttributeError):
        packet.sequence = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (RTCP_RR, True),
        (bytes.fromhex("80c8"), True),  # SR
        (bytes.fromhex("81ca0000"), True),  # SDES
        (bytes.fromhex("80cb0000"), True),  # BYE
        (bytes.fromhex("80cc0000"), True),  # APP
        (PCMU_MARKED, False),
        (TELEPHONE_EVENT, False),
        (bytes.fromhex("80e5"), False),  # PT 101 with marker: RTP
        (bytes.fromhex("80"), False),
        (b"", False),
    ],
)
def test_is_rtcp_untrusted(data, expected):
    assert is_rtcp_untrusted(data) is expected
