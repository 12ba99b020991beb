"""The agent protocol: what a session's voice agent sees and how it speaks.

The session's media tick calls the ``on_*`` hooks synchronously, so they must
return within microseconds: they may only update state or hand work to the
agent's own task through a bounded channel. An agent speaks by pushing 20 ms
PCM16 frames onto its :class:`~voxgate.pipeline.playout.Playout`. Agents with
slow work (recognition, synthesis, webhooks) override :meth:`Agent.run`, which
the session starts in its own nursery and cancels when the call ends.
"""

from __future__ import annotations

from typing import Protocol

from voxgate.agents.transfer import TransferFailure
from voxgate.end_reasons import EndReason
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped
from voxgate.rtp.dtmf import DtmfEvent


class AgentControls(Protocol):
    """What an agent may know of and do to its session."""

    session_id: str
    call_id: str
    tenant: str
    transport: str
    from_uri: str
    """The caller (SIP From URI, the stream's ``from`` parameter; "" when unknown)."""
    to_uri: str
    """Who was called (SIP To URI or the line's name; "" when unknown)."""
    answered_at: float | None
    """When the call was answered (monotonic seconds, the media clock's); None before."""

    def hangup(self, reason: EndReason) -> None:
        """End the call (e.g. after "goodbye"); ``reason`` goes to the call record."""

    def set_barge_in(self, enabled: bool) -> None:
        """Whether caller speech may cut the agent's speech (default on)."""

    def fallback(self) -> None:
        """Play ``[agent] fallback_prompt`` now (e.g. while a lost bot reconnects)."""

    def clear_playout(self) -> None:
        """Drop the agent's speech not played yet, here and at the far end."""

    def caller_turn_ended(self) -> None:
        """The caller finished a turn the VAD cannot see (keys pressed): the
        agent-response deadman (``[timers] agent_response_s``) starts as after speech."""

    def transfer(self, target: str) -> None:
        """Blind-transfer the caller to the SIP URI ``target`` (REFER, RFC 3515).

        Returns at once. Success ends the call with reason ``transferred``;
        any failure, including an invalid ``target`` or a call that cannot be
        transferred (not SIP), comes back as :meth:`Agent.transfer_failed`,
        possibly before this returns, and the call goes on.
        """


class Agent:
    """Base class: every hook does nothing; :meth:`run` returns at once."""

    controls: AgentControls
    """Set by the session before :meth:`run` starts."""

    def __init__(self, playout: Playout) -> None:
        self.playout = playout

    def on_frame(self, pcm: bytes, now: float) -> None:
        """One inbound 20 ms frame of 16-bit signed little-endian mono PCM."""

    def on_speech(self, event: SpeechStarted | SpeechStopped) -> None:
        """The caller started or stopped speaking (VAD with hysteresis)."""

    def endpoint(self, paused_at: float, now: float) -> int | None:
        """Each frame of a pause in the caller's speech (since ``paused_at``): the
        silence in ms that ends their turn this time, or None for ``[vad] stop_ms``
        (see :meth:`~voxgate.pipeline.vad.VoiceActivityDetector.end_pause_after`)."""
        return None

    def on_dtmf(self, event: DtmfEvent) -> None:
        """The caller pressed a key (RFC 4733 telephone-event)."""

    def on_barge_in(self) -> None:
        """The caller spoke over the agent: its queued speech was discarded."""

    def on_playback_done(self, utterance_id: int, signal: str) -> None:
        """An utterance from ``playout.say`` finished playing; ``signal`` says how we
        know (``paced``, ``mark``, ``drained``, ``deadman`` or ``cleared``)."""

    def transfer_failed(self, failure: TransferFailure) -> None:
        """A transfer this call asked for (by the agent or ``voxgatectl transfer``)
        did not happen; the call goes on. Called from the session's event loop:
        must not block."""

    async def run(self) -> None:
        """Long-running work in the session's nursery; cancelled at call end."""

    def describe(self) -> dict[str, object]:
        """What ``voxgatectl show ID`` shows of the agent (e.g. its turns); JSON-ready."""
        return {}
