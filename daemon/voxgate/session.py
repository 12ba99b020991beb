"""A session: one call, living in its own Trio nursery.

The session owns its lifecycle (``ringing → active → ending → ended``), its
deadman timers (``[timers] max_duration_s`` as the nursery's deadline; media
inactivity checked by the media leg on each tick) and its agent's task. The
transport plugs in through two small interfaces: :class:`CallSignaling`
(answer, refuse, hang up) and a media leg that the shared media clock ticks.

Whatever ends the call (BYE from either side, CANCEL, a timer, shutdown, an
error in its own code) ends only this session: :meth:`Session.run` is the
error boundary; it always detaches the media, releases the port, tells the
signaling layer and writes exactly one ``call_end`` log line with the reason.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio

from voxgate.agents.base import Agent
from voxgate.logging import log_event
from voxgate.metrics import SESSION_DURATION, SESSIONS_ENDED
from voxgate.transports.rtp_media import MediaClock

# End reasons after which the peer is already gone: no BYE from us.
_PEER_ENDED = frozenset({"bye", "cancel"})


class CallSignaling(Protocol):
    """The session's view of its call's signaling (SIP dialog, WebSocket …)."""

    def ring(self) -> None:
        """Tell the caller we are alerting (SIP 180 Ringing)."""

    def answer(self) -> None:
        """Answer the call (SIP 200 OK with our SDP answer)."""

    def refuse(self, reason: str) -> None:
        """End an unanswered call (e.g. 503 on shutdown, 500 on error)."""

    def hangup(self, reason: str) -> None:
        """End an answered call from our side (SIP BYE)."""

    def release(self) -> None:
        """The session is gone: forget the call's state."""


class SessionMedia(Protocol):
    """A session's media transport, ticked every 20 ms by the media clock."""

    @property
    def packets_in(self) -> int: ...

    @property
    def packets_out(self) -> int: ...

    def tick(self, now: float, frames_elapsed: int) -> str | None:
        """Receive, process one frame, send one frame; never blocks.

        Returns an end reason (e.g. ``media-timeout``) or None.
        """

    def close(self) -> None:
        """Release the leg's socket/device (idempotent)."""


class Session:
    """One call. Create it, then ``nursery.start_soon(session.run)``."""

    def __init__(
        self,
        *,
        session_id: str,
        call_id: str,
        transport: str,
        codec: str,
        signaling: CallSignaling,
        media: SessionMedia,
        agent: Agent,
        clock: MediaClock,
        answer_delay_s: float,
        max_duration_s: float,
    ) -> None:
        self.session_id = session_id
        self.call_id = call_id
        self.transport = transport
        self.codec = codec
        self.signaling = signaling
        self.media = media
        self.agent = agent
        self._clock = clock
        self._answer_delay_s = answer_delay_s
        self._max_duration_s = max_duration_s
        self.state = "ringing"
        self.end_reason: str | None = None
        self.started_at = math.nan
        self.answered_at: float | None = None
        self._end_requested = trio.Event()

    def end(self, reason: str) -> None:
        """Ask the session to end with ``reason``; the first reason given wins."""
        if self.end_reason is None:
            self.end_reason = reason
        self._end_requested.set()

    def tick(self, now: float, frames_elapsed: int) -> None:
        """The media clock's 20 ms tick (see :class:`~voxgate.transports.rtp_media.MediaLeg`)."""
        reason = self.media.tick(now, frames_elapsed)
        if reason is not None:
            self.end(reason)

    def fail(self, exc: BaseException) -> None:
        """The media path raised: log it with the Call-ID and end the session."""
        log_event(logging.ERROR, "session_error", f"session failed: {exc!r}",
                  session_id=self.session_id, call_id=self.call_id, exc_info=exc)
        self.end("error")

    async def run(self) -> None:
        """Run the call to its end. Never raises (but Cancelled); always cleans up."""
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._lifecycle, nursery.cancel_scope)
                nursery.start_soon(self.agent.run)
        except Exception as exc:
            self.fail(exc)
        finally:
            self._finish()

    async def _lifecycle(self, scope: trio.CancelScope) -> None:
        if self._answer_delay_s > 0:
            self.signaling.ring()
            with trio.move_on_after(self._answer_delay_s):
                await self._end_requested.wait()
        if self.end_reason is None:
            self.signaling.answer()
            self.answered_at = trio.current_time()
            self.state = "active"
            self._clock.attach(self)
            with trio.move_on_at(self.answered_at + self._max_duration_s):
                await self._end_requested.wait()
            self.end("max-duration")
        scope.cancel()

    def _finish(self) -> None:
        self.state = "ending"
        self._clock.detach(self)
        self.media.close()
        reason = self.end_reason or "error"
        try:
            if reason not in _PEER_ENDED:
                if self.answered_at is not None:
                    self.signaling.hangup(reason)
                else:
                    self.signaling.refuse(reason)
        finally:
            self.signaling.release()
            self.state = "ended"
            now = trio.current_time()
            SESSIONS_ENDED.labels(self.transport, reason).inc()
            SESSION_DURATION.labels(self.transport).observe(now - self.started_at)
            log_event(
                logging.INFO, "call_end", "call ended",
                session_id=self.session_id, call_id=self.call_id, transport=self.transport,
                reason=reason, duration_s=now - self.started_at,
                talk_s=None if self.answered_at is None else now - self.answered_at,
                packets_in=self.media.packets_in, packets_out=self.media.packets_out,
                codec=self.codec,
            )
