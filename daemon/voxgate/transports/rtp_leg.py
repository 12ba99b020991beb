"""One SIP call's media: a non-blocking UDP socket ticked by the media clock.

Each tick (20 ms): drain the socket into the :class:`~voxgate.rtp.stream.RtpStream`
(jitter buffer, DTMF, symmetric-RTP latching), decode one frame for the
pipeline, encode the pipeline's outbound frame (or G.711 silence) and send one
packet to where the peer's packets come from. No awaits, no task switches:
the work per call per tick is a few microseconds of C calls.
"""

from __future__ import annotations

import logging
import socket

from voxgate.budget import SessionBudget
from voxgate.codec.g711 import G711Codec
from voxgate.logging import log_event
from voxgate.pipeline.pipeline import Pipeline
from voxgate.rtp.jitter import FrameState
from voxgate.rtp.stream import RtpStream
from voxgate.transports.rtp_media import PortPool

MAX_DATAGRAM_BYTES = 2048
"""Largest RTP datagram read; G.711 at 20 ms is 172 bytes."""

MAX_PACKETS_PER_TICK = 32
"""A flood beyond this per 20 ms stays in the kernel buffer (and is dropped there)."""

SAMPLES_PER_FRAME = 160
"""8 kHz x 20 ms."""

_PCM_SILENCE = bytes(2 * SAMPLES_PER_FRAME)


class RtpLeg:
    """The RTP side of one session; implements :class:`~voxgate.session.SessionMedia`."""

    __slots__ = (
        "_allowance_s", "_budget", "_pool", "_silence", "_sock", "codec", "local_port",
        "pipeline", "send_errors", "sending", "stream",
    )

    def __init__(
        self,
        *,
        pool: PortPool,
        sock: socket.socket,
        stream: RtpStream,
        codec: G711Codec,
        pipeline: Pipeline,
        budget: SessionBudget,
        playback_allowance_s: float,
    ) -> None:
        self._pool = pool
        self._sock: socket.socket | None = sock
        self.local_port: int = sock.getsockname()[1]
        self.stream = stream
        self.codec = codec
        self.pipeline = pipeline
        self._budget = budget
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

    def tick(self, now: float, frames_elapsed: int) -> bool:
        """One 20 ms media step (see the module docstring).

        Returns whether valid RTP arrived since the last tick (the session's
        deadman timers watch it).
        """
        sock = self._sock
        if sock is None:
            return False
        stream = self.stream
        packets_before = stream.stats.packets_in
        for _ in range(MAX_PACKETS_PER_TICK):
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM_BYTES)
            except BlockingIOError:
                break
            except OSError:
                break
            dtmf = stream.receive_datagram_untrusted(data, source[:2], now)
            if dtmf is not None:
                self.pipeline.dtmf(dtmf)
        jitter_held = stream.jitter_buffer.buffered_bytes - self._budget.held_bytes["jitter"]
        if jitter_held > 0:
            self._budget.add("jitter", jitter_held)
        elif jitter_held < 0:
            self._budget.release("jitter", -jitter_held)
        pipeline = self.pipeline
        for _ in range(frames_elapsed):
            state, payload = stream.pop_frame()
            if state is FrameState.PLAYED and payload is not None:
                pipeline.inbound(self.codec.decode(payload), now)
            elif state is FrameState.LOST:
                pipeline.inbound(_PCM_SILENCE, now)
        out = pipeline.outbound(now)
        for utterance_id in pipeline.playout.take_sent():
            pipeline.playback.sent_paced(utterance_id, now, self._allowance_s)
        remote = stream.remote_addr
        if self.sending and remote is not None:
            payload = self._silence if out is None else self.codec.encode(out)
            try:
                sock.sendto(stream.build_outbound(payload, frames_elapsed=frames_elapsed), remote)
            except OSError as e:
                self.send_errors += 1
                if self.send_errors == 1:
                    log_event(logging.WARNING, "rtp_send_failed", str(e), remote=f"{remote}")
        return stream.stats.packets_in != packets_before

    def counters(self) -> dict[str, int]:
        """This leg's counters by name (packets, drops by cause, DTMF, speech turns);
        budget drops are the session's (:meth:`Session.counters`)."""
        st = self.stream.stats
        jitter = st.jitter
        return {
            "packets_in": st.packets_in,
            "packets_out": st.packets_out,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "drop_bad_packet": st.bad_packets,
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
            "dtmf_events": self.pipeline.dtmf_events,
            "speech_turns": self.pipeline.speech_turns,
        }

    def close(self) -> None:
        """Close the socket and return its port to the pool (idempotent)."""
        if self._sock is not None:
            self._pool.release(self._sock)
            self._sock = None
