"""One SIP call's media leg: a non-blocking UDP socket, I/O only.

Each tick (20 ms, :meth:`~voxgate.pipeline.pipeline.Pipeline.step`): drain the
socket into the :class:`~voxgate.rtp.stream.RtpStream` (jitter buffer, DTMF,
symmetric-RTP latching) and decode the frames due; then encode the pipeline's
outbound frame (or G.711 silence) and send one packet to where the peer's
packets come from. No awaits, no task switches: the work per call per tick is
a few microseconds of C calls.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from voxgate.budget import SessionBudget
from voxgate.codec.g711 import G711Codec
from voxgate.logging import log_event
from voxgate.pipeline.frames import PCM_SILENCE, SAMPLES_PER_FRAME
from voxgate.pipeline.playback import PlaybackTracker
from voxgate.rtp.dtmf import DtmfEvent
from voxgate.rtp.jitter import FrameState
from voxgate.rtp.stream import RtpStream
from voxgate.transports.rtp_ports import PortPool

MAX_DATAGRAM_BYTES = 2048
"""Largest RTP datagram read; G.711 at 20 ms is 172 bytes."""

MAX_PACKETS_PER_TICK = 32
"""A flood beyond this per 20 ms stays in the kernel buffer (and is dropped there)."""


class RtpLeg:
    """The RTP side of one session; a :class:`~voxgate.pipeline.pipeline.MediaLeg`."""

    __slots__ = (
        "_allowance_s", "_budget", "_frames_elapsed", "_on_dtmf", "_playback", "_pool",
        "_silence", "_sock", "codec", "local_port", "send_errors", "sending", "stream",
    )

    def __init__(
        self,
        *,
        pool: PortPool,
        sock: socket.socket,
        stream: RtpStream,
        codec: G711Codec,
        playback: PlaybackTracker,
        on_dtmf: Callable[[DtmfEvent], None],
        budget: SessionBudget,
        playback_allowance_s: float,
    ) -> None:
        self._pool = pool
        self._sock: socket.socket | None = sock
        self.local_port: int = sock.getsockname()[1]
        self.stream = stream
        self.codec = codec
        self._playback = playback
        self._on_dtmf = on_dtmf
        self._budget = budget
        self._frames_elapsed = 1
        self._allowance_s = playback_allowance_s
        self._silence = codec.silence(SAMPLES_PER_FRAME)
        self.sending = True
        self.send_errors = 0

    @property
    def packets_in(self) -> int:
        return self.stream.stats.packets_in

    @property
    def packets_out(self) -> int:
        return self.stream.stats.packets_out

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        """Drain the socket into the stream; the frames due now, decoded (a lost
        frame is concealed as silence). True when valid RTP arrived."""
        sock = self._sock
        if sock is None:
            return False, []
        stream = self.stream
        self._frames_elapsed = frames_elapsed
        packets_before = stream.stats.packets_in
        for _ in range(MAX_PACKETS_PER_TICK):
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM_BYTES)
            except OSError:  # BlockingIOError: drained; others: retried next tick
                break
            dtmf = stream.receive_datagram_untrusted(data, source[:2], now)
            if dtmf is not None:
                self._on_dtmf(dtmf)
        budget = self._budget
        jitter_held = stream.jitter_buffer.buffered_bytes - budget.held_bytes["jitter"]
        if jitter_held > 0:
            budget.add("jitter", jitter_held)
        elif jitter_held < 0:
            budget.release("jitter", -jitter_held)
        frames = []
        for _ in range(frames_elapsed):
            state, payload = stream.pop_frame()
            if state is FrameState.PLAYED and payload is not None:
                frames.append(self.codec.decode(payload))
            elif state is FrameState.LOST:
                frames.append(PCM_SILENCE)
        return stream.stats.packets_in != packets_before, frames

    def send(self, pcm: bytes | None, finished: list[int], now: float) -> None:
        """Encode and send one packet to where the peer's media comes from; the
        finished utterances complete once paced out plus the playback allowance."""
        for utterance_id in finished:
            self._playback.sent_paced(utterance_id, now, self._allowance_s)
        sock, stream = self._sock, self.stream
        remote = stream.remote_addr
        if sock is None or not self.sending or remote is None:
            return
        payload = self._silence if pcm is None else self.codec.encode(pcm)
        try:
            sock.sendto(stream.build_outbound(payload, frames_elapsed=self._frames_elapsed),
                        remote)
        except OSError as e:
            self.send_errors += 1
            if self.send_errors == 1:
                log_event(logging.WARNING, "rtp_send_failed", str(e), remote=f"{remote}")

    def clear(self) -> None:
        """Nothing to take back: RTP audio already sent is on the wire."""

    def counters(self) -> dict[str, int]:
        """This leg's counters by name (packets, drops by cause); DTMF, speech turns
        and budget drops are the session's (:meth:`Session.counters`)."""
        st = self.stream.stats
        jitter = st.jitter
        return {
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
        """Close the socket and return its port to the pool (idempotent)."""
        if self._sock is not None:
            self._pool.release(self._sock)
            self._sock = None
