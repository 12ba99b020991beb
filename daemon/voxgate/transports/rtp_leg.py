"""One SIP call's media leg: a non-blocking UDP socket, I/O only.

Each tick (20 ms, :meth:`~voxgate.pipeline.pipeline.Pipeline.step`): take what
arrived into the :class:`~voxgate.rtp.stream.RtpStream` (jitter buffer, DTMF,
symmetric-RTP latching) and decode the frames due; then encode the pipeline's
outbound frame (or G.711 silence) and send one packet to where the peer's
packets come from. No awaits, no task switches. The socket's reads and writes
are :mod:`voxgate.transports.datagram`'s (C in the compiled build).

Reading (measured, ``bench/sip_load.py``): a speculative ``recvfrom`` per call
per tick that only says "no data" costs a syscall and a raised exception, more
than the packet's own work. So every answered leg's socket is registered with
one :class:`RtpReadiness` (an epoll set) per endpoint, and the first leg ticked
in a tick asks it, with timeout 0, which sockets are readable; it reads one
datagram from each of those and asks again, until none is left readable or
:data:`MAX_PACKETS_PER_TICK` rounds are done. Every :data:`LEGS_PER_CHECK`
legs later in the same tick it asks once more (one round), so a leg ticked
late in a long tick still gets what arrived while the legs before it ran, as
a read at its own turn would. A quiet leg makes no syscall; a leg with one
packet makes one ``recvfrom``; a tick of N legs makes about N / 32 + 1
``epoll_wait`` calls.

SRTP (RFC 3711): a leg whose call negotiated it has :attr:`RtpLeg.srtp` set;
every datagram read is unprotected before the stream sees it (failures are
dropped and counted there) and every packet sent is protected. A plain RTP
leg pays one ``is None`` test per packet each way.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable, Sequence
from typing import Final

from voxgate.budget import SessionBudget
from voxgate.codec.g711 import G711Codec
from voxgate.logging import log_event
from voxgate.pipeline.frames import PCM_SILENCE, SAMPLES_PER_FRAME
from voxgate.pipeline.playback import PlaybackTracker
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.rtp.jitter import LOST, PLAYED
from voxgate.rtp.stream import RtpStream
from voxgate.transports.datagram import Datagrams, datagrams_for
from voxgate.transports.rtp_ports import PortPool
from voxgate.transports.srtp import SrtpContext

MAX_DATAGRAM_BYTES: Final = 2048
"""Largest RTP datagram read; G.711 at 20 ms is 172 bytes."""

MAX_PACKETS_PER_TICK: Final = 32
"""Rounds of reads at a tick's first readiness check (each later check in the tick
reads one more datagram per socket); a flood beyond that stays in the kernel
buffer (and is dropped there)."""

LEGS_PER_CHECK: Final = 32
"""Legs ticked between two readiness checks within one tick (about 1 ms of work)."""


class RtpReadiness:
    """One readiness check per media tick for the RTP sockets of many legs.

    The media clock hands every session the same ``now`` in one tick
    (:class:`~voxgate.pipeline.clock.MediaClock`), so :meth:`read` knows a
    new tick by a new ``now``. Level-triggered: a socket left readable (a
    flood, a read error) is reported again at the next check.
    """

    __slots__ = ("_asked", "_epoll", "_legs", "_read_at")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._legs: dict[int, RtpLeg] = {}  # socket fd -> its leg
        self._read_at: float | None = None
        self._asked = 0  # read() calls since the last check

    def register(self, fd: int, leg: RtpLeg) -> None:
        """Watch ``fd`` (``leg``'s socket) for datagrams from now on."""
        self._epoll.register(fd, select.EPOLLIN)
        self._legs[fd] = leg

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing the socket (idempotent)."""
        if self._legs.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def read(self, now: float) -> None:
        """A leg's tick begins: on the first call with a new ``now``, read every
        readable registered socket into its leg, one datagram per socket per
        round, at most :data:`MAX_PACKETS_PER_TICK` rounds; then one round on
        every :data:`LEGS_PER_CHECK`-th call with the same ``now``."""
        if now == self._read_at:
            self._asked += 1
            if self._asked < LEGS_PER_CHECK:
                return
            rounds = 1
        else:
            self._read_at = now
            rounds = MAX_PACKETS_PER_TICK
        self._asked = 0
        legs = self._legs
        if not legs:
            return
        poll, max_events = self._epoll.poll, len(legs)
        for _ in range(rounds):
            events = poll(0, max_events)
            if not events:
                return
            for fd, _events in events:
                legs[fd].read_one(now)


class RtpLeg:
    """The RTP side of one session; a :class:`~voxgate.pipeline.pipeline.MediaLeg`.

    Its socket joins ``readiness`` on the first :meth:`receive` (the call is
    answered and ticked): until then datagrams wait in the kernel, as early
    media must not fill the jitter buffer of a call still ringing. ``srtp``
    is the call's SRTP state, ``None`` for plain RTP (a re-INVITE that
    changes the keys re-keys it, :meth:`SrtpContext.rekey`). ``datagrams``
    reads and writes ``sock`` (default: :func:`datagrams_for` it).
    """

    __slots__ = (
        "_allowance_s", "_budget", "_dtmf_pending", "_fd", "_frames_elapsed", "_io", "_jitter",
        "_jitter_held_bytes", "_on_dtmf", "_packets_seen", "_playback", "_pool", "_readiness",
        "_silence", "_sock", "_stats",
        "codec", "local_port", "send_errors", "sending", "srtp", "stream",
    )

    def __init__(
        self,
        *,
        pool: PortPool,
        readiness: RtpReadiness,
        sock: socket.socket,
        stream: RtpStream,
        codec: G711Codec,
        playback: PlaybackTracker,
        on_dtmf: Callable[[DtmfEvent], None],
        budget: SessionBudget,
        playback_allowance_s: float,
        srtp: SrtpContext | None = None,
        datagrams: Datagrams | None = None,
    ) -> None:
        self._pool = pool
        self._readiness = readiness
        self._sock: socket.socket | None = sock
        self._io = datagrams_for(sock, MAX_DATAGRAM_BYTES) if datagrams is None else datagrams
        self._fd: int | None = None  # set once registered with readiness
        self.local_port: int = sock.getsockname()[1]
        self.stream = stream
        self._jitter = stream.jitter_buffer
        self._stats = stream.stats
        self.codec = codec
        self._playback = playback
        self._on_dtmf = on_dtmf
        self._dtmf_pending: list[DtmfEvent] = []
        self._budget = budget
        self._jitter_held_bytes = 0  # what the budget's "jitter" buffer holds for us
        self._packets_seen = 0
        self._frames_elapsed = 1
        self._allowance_s = playback_allowance_s
        self._silence = codec.silence(SAMPLES_PER_FRAME)
        self.sending = True
        self.send_errors = 0
        self.srtp = srtp

    @property
    def packets_in(self) -> int:
        return self.stream.stats.packets_in

    @property
    def packets_out(self) -> int:
        return self.stream.stats.packets_out

    def read_one(self, now: float) -> bool:
        """Read one datagram into the stream (:class:`RtpReadiness` calls it);
        False when none was there or the read failed (retried next tick)."""
        if self._sock is None:
            return False
        got = self._io.recv()
        if got is None:  # drained; or a read error (ICMP): retried next tick
            return False
        data, source = got
        if self.srtp is not None:
            unprotected = self.srtp.unprotect_untrusted(data)
            if unprotected is None:  # counted by the SRTP context
                return True
            data = unprotected
        dtmf = self.stream.receive_datagram_untrusted(data, source, now)
        if dtmf is not None:
            self._dtmf_pending.append(dtmf)
        return True

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        """What arrived since the last tick into the stream; the frames due now,
        decoded (a lost frame is concealed as silence). True when valid RTP arrived."""
        sock = self._sock
        if sock is None:
            return False, []
        if self._fd is None:  # the first tick: drain what waited, then join the poll
            for _ in range(MAX_PACKETS_PER_TICK):
                if not self.read_one(now):
                    break
            self._fd = sock.fileno()
            self._readiness.register(self._fd, self)
        else:
            self._readiness.read(now)
        self._frames_elapsed = frames_elapsed
        if self._dtmf_pending:
            pending, self._dtmf_pending = self._dtmf_pending, []
            for dtmf in pending:
                self._on_dtmf(dtmf)
        jitter = self._jitter
        jitter_bytes = jitter.buffered_bytes
        if jitter_bytes != self._jitter_held_bytes:
            budget = self._budget
            if jitter_bytes > self._jitter_held_bytes:
                budget.add("jitter", jitter_bytes - self._jitter_held_bytes)
            else:
                budget.release("jitter", self._jitter_held_bytes - jitter_bytes)
            self._jitter_held_bytes = jitter_bytes
        frames = []
        for _ in range(frames_elapsed):
            state, payload = jitter.pop()
            if state is PLAYED and payload is not None:
                frames.append(self.codec.decode(payload))
            elif state is LOST:
                frames.append(PCM_SILENCE)
        packets_in = self._stats.packets_in
        arrived = packets_in != self._packets_seen
        self._packets_seen = packets_in
        return arrived, frames

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None:
        """Encode and send one packet to where the peer's media comes from; the
        finished utterances complete once paced out plus the playback allowance."""
        for utterance_id in finished:
            self._playback.sent_paced(utterance_id, now, self._allowance_s)
        stream = self.stream
        remote = stream.remote_addr
        if self._sock is None or not self.sending or remote is None:
            return
        payload = self._silence if pcm is None else self.codec.encode(pcm)
        datagram = stream.build_outbound(payload, frames_elapsed=self._frames_elapsed)
        if self.srtp is not None:
            protected = self.srtp.protect(datagram)
            if protected is None:  # counted by the SRTP context
                return
            datagram = protected
        try:
            self._io.send(datagram, remote)
        except OSError as e:
            self.send_errors += 1
            if self.send_errors == 1:
                log_event(logging.WARNING, "rtp_send_failed", str(e), remote=f"{remote}")

    def clear(self) -> None:
        """Nothing to take back: RTP audio already sent is on the wire."""

    def counters(self) -> dict[str, int]:
        """This leg's counters by name (packets, drops by cause, SRTP drops when
        the call uses SRTP); DTMF, speech turns and budget drops are the
        session's (:meth:`Session.counters`)."""
        st = self.stream.stats
        jitter = st.jitter
        srtp = {} if self.srtp is None else self.srtp.counters()
        return {
            **srtp,
            "packets_in": st.packets_in,
            "packets_out": st.packets_out,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "drop_bad_packet": st.bad_packets,
            "drop_oversize": st.oversize,
            "empty_payloads": st.empty_payloads,
            "relatches": st.relatches,
            "frames_partial": jitter.partial,
            "drop_unknown_payload_type": st.unknown_payload_type,
            "drop_foreign_source": st.foreign_source,
            "drop_late": jitter.late,
            "drop_duplicate": jitter.duplicates,
            "drop_jitter_overflow": jitter.overflow,
            "drop_send_error": self.send_errors,
            "rtcp_ignored": st.rtcp_ignored,
            "ssrc_changes": st.ssrc_changes,
            "frames_concealed": jitter.lost,
            "jitter_grown": jitter.grown,
            "jitter_shrunk": jitter.shrunk,
        }

    def close(self) -> None:
        """Leave the readiness check, close the socket and return its port to the
        pool (idempotent)."""
        if self._sock is not None:
            if self._fd is not None:
                self._readiness.unregister(self._fd)
            self._pool.release(self._sock)
            self._sock = None
