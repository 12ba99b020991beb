"""RTP capture on loopback (tcpdump) and its analysis in pure Python.

:class:`Capture` runs ``tcpdump -i lo -w FILE -B 32768 udp portrange A-B``,
waits until it says it is listening and stops it with SIGINT by PID.
:func:`read_udp` reads classic pcap files (microsecond or nanosecond, either
byte order; link types NULL, EN10MB, LINUX_SLL, LINUX_SLL2) and yields the
UDP datagrams. :func:`flow_stats` and :func:`echo_latencies_s` turn RTP
(RFC 3550 §5.1) packets into gap, loss and echo-latency figures.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import socket
import struct
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

Address = tuple[str, int]
FlowKey = tuple[Address, Address]

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0

# Classic pcap global header: magic, version major/minor, thiszone, sigfigs, snaplen, linktype.
_PCAP_HEADER = struct.Struct("IHHiIII")
# Record header: ts_sec, ts_frac (µs or ns), captured length, original length.
_RECORD_HEADER = struct.Struct("IIII")
_MAGIC_US = 0xA1B2C3D4
_MAGIC_NS = 0xA1B23C4D
LINKTYPE_NULL = 0
LINKTYPE_EN10MB = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = 0x8100
_IPPROTO_UDP = 17
# RTP fixed header (RFC 3550 §5.1): V/P/X/CC, M/PT, sequence number, timestamp, SSRC.
_RTP_HEADER = struct.Struct("!BBHII")
RTP_HEADER_LENGTH = 12
_RTCP_TYPES = range(72, 77)  # RTCP packet types 200..204 seen through the RTP PT field
_DROPPED = re.compile(rb"(\d+) packets? dropped by kernel")
_CAPTURED = re.compile(rb"(\d+) packets? captured")


class PcapFormatError(Exception):
    """The capture file is not a classic pcap file this reader understands."""


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One captured UDP datagram; ``ts`` is the capture time in epoch seconds."""

    ts: float
    src: Address
    dst: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """The RTP header fields the analysis needs, plus capture time and flow."""

    ts: float
    src: Address
    dst: Address
    sequence_number: int
    timestamp: int
    ssrc: int
    payload_type: int
    payload: bytes

    def __repr__(self) -> str:
        return (
            f"RtpPacket(seq={self.sequence_number}, ts={self.timestamp}, "
            f"pt={self.payload_type}, {self.src}->{self.dst})"
        )


@dataclass(frozen=True, slots=True)
class FlowStats:
    """One direction of one RTP flow. Gaps are capture inter-arrival times."""

    src: Address
    dst: Address
    packets: int
    duration_s: float
    rate_pps: float
    gaps_s: tuple[float, ...]
    lost: int
    expected: int
    payload_types: frozenset[int]

    @property
    def loss_ratio(self) -> float:
        """Lost / expected packets, 0..1 (0 for an empty flow)."""
        return self.lost / self.expected if self.expected else 0.0


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """tcpdump's own closing counts."""

    captured: int
    dropped_by_kernel: int


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n·q/100), at least 1
    return ordered[min(len(ordered), int(rank)) - 1]


class Capture:
    """tcpdump writing UDP traffic in a port range on an interface to ``path``.

    Use as a context manager; the process is always ended by its PID.
    """

    def __init__(
        self,
        path: Path,
        port_min: int,
        port_max: int,
        *,
        interface: str = "lo",
        buffer_kib: int = 32768,
        cpu: int | None = None,
    ) -> None:
        self.path = path
        self._argv = [
            "tcpdump", "-i", interface, "-n", "-w", str(path), "-B", str(buffer_kib),
        ]
        if os.geteuid() == 0:
            self._argv += ["-Z", "root"]  # keep writing into root-only temp dirs
        self._argv += ["udp", "portrange", f"{port_min}-{port_max}"]
        if cpu is not None:
            self._argv = ["taskset", "-c", str(cpu), *self._argv]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = b""
        self.stats: CaptureStats | None = None

    def start(self) -> None:
        """Start tcpdump and wait (10 s at most) until it reports listening.

        Raises:
            RuntimeError: tcpdump exited or did not start listening in time.
        """
        self._proc = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert self._proc.stderr is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        fd = self._proc.stderr.fileno()
        while b"listening on" not in self._stderr:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._proc.poll() is not None:
                self.stop()
                said = self._stderr.decode(errors="replace")
                raise RuntimeError(f"tcpdump did not start: {said}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                self._stderr += chunk

    def stop(self) -> CaptureStats:
        """SIGINT tcpdump by PID, wait for it to flush, parse its closing counts."""
        proc = self._proc
        if proc is None:
            return self.stats or CaptureStats(0, 0)
        self._proc = None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=_STOP_TIMEOUT_S)
            self._stderr += err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        captured = _CAPTURED.search(self._stderr)
        dropped = _DROPPED.search(self._stderr)
        self.stats = CaptureStats(
            captured=int(captured.group(1)) if captured else 0,
            dropped_by_kernel=int(dropped.group(1)) if dropped else 0,
        )
        return self.stats

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_udp(path: Path) -> Iterator[UdpDatagram]:
    """UDP datagrams of a classic pcap file, in file order.

    Non-UDP packets, IP fragments after the first and truncated records are
    skipped.

    Raises:
        PcapFormatError: a bad magic number or an unsupported link type.
    """
    blob = path.read_bytes()
    if len(blob) < _PCAP_HEADER.size:
        raise PcapFormatError(f"{path}: shorter than a pcap header")
    for order in ("<", ">"):
        magic = struct.unpack_from(order + "I", blob)[0]
        if magic in (_MAGIC_US, _MAGIC_NS):
            break
    else:
        raise PcapFormatError(f"{path}: not a classic pcap file")
    frac_scale = 1e-9 if magic == _MAGIC_NS else 1e-6
    header = struct.Struct(order + _PCAP_HEADER.format)
    record = struct.Struct(order + _RECORD_HEADER.format)
    linktype = header.unpack_from(blob)[6] & 0x0FFFFFFF
    offset = header.size
    while offset + record.size <= len(blob):
        ts_sec, ts_frac, caplen, _ = record.unpack_from(blob, offset)
        offset += record.size
        frame = blob[offset : offset + caplen]
        offset += caplen
        datagram = _udp_from_frame(frame, linktype, order)
        if datagram is not None:
            src, dst, payload = datagram
            yield UdpDatagram(ts_sec + ts_frac * frac_scale, src, dst, payload)


def _udp_from_frame(
    frame: bytes, linktype: int, order: str
) -> tuple[Address, Address, bytes] | None:
    """Strip the link layer and the IP header; None for anything but a whole UDP datagram."""
    if linktype == LINKTYPE_EN10MB:
        ethertype, start = _u16(frame, 12), 14
        if ethertype == _ETHERTYPE_VLAN:
            ethertype, start = _u16(frame, 16), 18
    elif linktype == LINKTYPE_LINUX_SLL:
        ethertype, start = _u16(frame, 14), 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        ethertype, start = _u16(frame, 0), 20
    elif linktype == LINKTYPE_NULL:
        if len(frame) < 4:
            return None
        family = struct.unpack_from(order + "I", frame)[0]
        ethertype = _ETHERTYPE_IPV4 if family == socket.AF_INET else _ETHERTYPE_IPV6
        start = 4
    else:
        raise PcapFormatError(f"unsupported link type {linktype}")
    ip = frame[start:]
    if ethertype == _ETHERTYPE_IPV4 and len(ip) >= 20 and ip[0] >> 4 == 4:
        header_len = (ip[0] & 0x0F) * 4
        fragment_offset = _u16(ip, 6) & 0x1FFF
        if ip[9] != _IPPROTO_UDP or fragment_offset or len(ip) < header_len + 8:
            return None
        src_ip, dst_ip = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(
            socket.AF_INET, ip[16:20]
        )
    elif ethertype == _ETHERTYPE_IPV6 and len(ip) >= 48 and ip[0] >> 4 == 6:
        header_len = 40
        if ip[6] != _IPPROTO_UDP:
            return None
        src_ip = socket.inet_ntop(socket.AF_INET6, ip[8:24])
        dst_ip = socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        return None
    udp = ip[header_len:]
    src_port, dst_port, udp_len = _u16(udp, 0), _u16(udp, 2), _u16(udp, 4)
    if udp_len < 8 or udp_len > len(udp):
        return None  # truncated by the snap length
    return (src_ip, src_port), (dst_ip, dst_port), udp[8:udp_len]


def _u16(data: bytes, offset: int) -> int:
    if offset + 2 > len(data):
        return -1
    return int.from_bytes(data[offset : offset + 2], "big")


def rtp_packets(datagrams: Iterable[UdpDatagram]) -> list[RtpPacket]:
    """The datagrams that look like RTP version 2 (RTCP and others left out)."""
    packets = []
    for d in datagrams:
        if len(d.payload) < RTP_HEADER_LENGTH:
            continue
        first, second, seq, timestamp, ssrc = _RTP_HEADER.unpack_from(d.payload)
        payload_type = second & 0x7F
        if first >> 6 != 2 or payload_type in _RTCP_TYPES:
            continue
        start = RTP_HEADER_LENGTH + 4 * (first & 0x0F)
        packets.append(
            RtpPacket(d.ts, d.src, d.dst, seq, timestamp, ssrc, payload_type, d.payload[start:])
        )
    return packets


def unwrap_sequence(numbers: Iterable[int]) -> list[int]:
    """Extend 16-bit sequence numbers to unbounded ints, wrap-aware (RFC 3550 A.1)."""
    extended: list[int] = []
    for seq in numbers:
        if not extended:
            extended.append(seq)
            continue
        delta = (seq - extended[-1]) & 0xFFFF
        extended.append(extended[-1] + (delta if delta < 0x8000 else delta - 0x10000))
    return extended


def flow_stats(packets: Iterable[RtpPacket]) -> dict[FlowKey, FlowStats]:
    """Per (src, dst): count, rate, inter-arrival gaps and sequence-number loss.

    Loss is summed per SSRC: highest minus lowest extended sequence number
    plus one, less the distinct numbers seen.
    """
    flows: dict[FlowKey, list[RtpPacket]] = defaultdict(list)
    for p in packets:
        flows[(p.src, p.dst)].append(p)
    result = {}
    for key, flow in flows.items():
        flow.sort(key=lambda p: p.ts)
        gaps = tuple(b.ts - a.ts for a, b in itertools.pairwise(flow))
        lost = expected = 0
        by_ssrc: dict[int, list[int]] = defaultdict(list)
        for p in flow:
            by_ssrc[p.ssrc].append(p.sequence_number)
        for numbers in by_ssrc.values():
            extended = unwrap_sequence(numbers)
            span = max(extended) - min(extended) + 1
            expected += span
            lost += span - len(set(extended))
        duration = flow[-1].ts - flow[0].ts
        result[key] = FlowStats(
            src=key[0],
            dst=key[1],
            packets=len(flow),
            duration_s=duration,
            rate_pps=(len(flow) - 1) / duration if duration > 0 else 0.0,
            gaps_s=gaps,
            lost=lost,
            expected=expected,
            payload_types=frozenset(p.payload_type for p in flow),
        )
    return result


def _ulaw_canonical(payload: bytes) -> bytes:
    """µ-law has two zeros (0x7F, 0xFF); a decode/encode round trip may swap them."""
    return payload.replace(b"\x7f", b"\xff")


def echo_latencies_s(packets: Iterable[RtpPacket], caller: Address) -> list[float]:
    """Echo delay of every daemon→caller packet whose payload the caller sent once.

    For each flow pair (caller→daemon, daemon→caller) the payloads the caller
    sent exactly once are indexed; every echoed packet carrying one of them
    gives ``t_out - t_in``. ``caller`` is the caller's address; with several
    callers (a load test) pass each in turn, or use :func:`all_echo_latencies_s`.
    """
    sent: dict[bytes, list[float]] = defaultdict(list)
    echoed: list[RtpPacket] = []
    for p in packets:
        if p.src == caller:
            sent[_ulaw_canonical(p.payload)].append(p.ts)
        elif p.dst == caller:
            echoed.append(p)
    unique = {payload: times[0] for payload, times in sent.items() if len(times) == 1}
    latencies = []
    for p in echoed:
        t_in = unique.get(_ulaw_canonical(p.payload))
        if t_in is not None and p.ts >= t_in:
            latencies.append(p.ts - t_in)
    return latencies


def all_echo_latencies_s(packets: Sequence[RtpPacket], callers: Iterable[Address]) -> list[float]:
    """:func:`echo_latencies_s` over several callers, packets grouped once."""
    by_caller: dict[Address, list[RtpPacket]] = defaultdict(list)
    wanted = set(callers)
    for p in packets:
        for end in (p.src, p.dst):
            if end in wanted:
                by_caller[end].append(p)
    latencies: list[float] = []
    for caller, mine in by_caller.items():
        latencies += echo_latencies_s(mine, caller)
    return latencies


def flow_payload(packets: Iterable[RtpPacket], src: Address, dst: Address) -> bytes:
    """The payloads of one flow joined in sequence-number order (duplicates once)."""
    flow = sorted((p for p in packets if p.src == src and p.dst == dst), key=lambda p: p.ts)
    extended = unwrap_sequence(p.sequence_number for p in flow)
    by_seq = dict(zip(extended, (p.payload for p in flow), strict=True))
    return b"".join(by_seq[seq] for seq in sorted(by_seq))
