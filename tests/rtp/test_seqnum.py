import pytest

from voxgate.rtp.seqnum import (
    uint16_add,
    uint16_diff,
    uint16_gt,
    uint32_add,
    uint32_diff,
    uint32_gt,
)


def test_uint16_add_wraps_both_ways():
    assert uint16_add(65535, 1) == 0
    assert uint16_add(65530, 10) == 4
    assert uint16_add(0, -1) == 65535
    assert uint16_add(100, 0) == 100


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (5, 3, 2),
        (3, 5, -2),
        (0, 65535, 1),
        (65535, 0, -1),
        (10, 65530, 16),
        (32767, 0, 32767),
        (32768, 0, -32768),
        (0, 32768, -32768),
    ],
)
def test_uint16_diff_is_signed_and_wrap_aware(a, b, expected):
    assert uint16_diff(a, b) == expected


def test_uint16_diff_stays_in_range():
    for a in range(0, 65536, 257):
        for b in range(0, 65536, 251):
            d = uint16_diff(a, b)
            assert -32768 <= d <= 32767
            assert uint16_add(b, d) == a


def test_uint16_gt():
    assert uint16_gt(1, 0)
    assert not uint16_gt(0, 1)
    assert uint16_gt(0, 65535)
    assert not uint16_gt(65535, 0)
    assert not uint16_gt(7, 7)
    # Exactly half the range apart: neither is after the other.
    assert not uint16_gt(32768, 0)
    assert not uint16_gt(0, 32768)


def test_uint32_helpers_wrap():
    top = 0xFFFFFFFF
    assert uint32_add(top, 1) == 0
    assert uint32_add(0, -160) == top - 159
    assert uint32_diff(0, top) == 1
    assert uint32_diff(top, 0) == -1
    assert uint32_diff(0x80000000, 0) == -(2**31)
    assert uint32_diff(0x7FFFFFFF, 0) == 2**31 - 1
    assert uint32_gt(160, top - 159)
    assert not uint32_gt(top - 159, 160)
    assert not uint32_gt(5, 5)
