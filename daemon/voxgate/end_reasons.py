"""Why a call ended: every reason a session can end with.

The reason is in the ``call_end`` log record (``REASON=`` in the journal), the
call record (``voxgatectl calls --reason``) and the ``reason`` label of
``voxgate_sessions_ended_total``. Whatever ends a session names one of
:data:`EndReason` (mypy checks every ``Session.end``, ``AgentControls.hangup``
and ``Calls.end``), and the README's list of end reasons is this one (a test
compares them). No I/O, no trio: the protocol cores use it too.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

EndReason = Literal[
    "bye",                   # the caller hung up (SIP BYE, a stream's stop)
    "cancel",                # the caller gave up before the answer (SIP CANCEL)
    "ack-timeout",           # no ACK for our 200 OK
    "ring-timeout",          # [timers] ring_timeout_s, unanswered
    "max-duration",          # [timers] max_duration_s
    "no-media",              # [timers] first_media_s without media
    "media-timeout",         # media_inactivity_s + recovery_window_s without media
    "budget",                # the session's buffers stayed over [budget] session_bytes
    "memory-shed",           # the newest sessions, above [budget] rss_hard_bytes
    "agent-hangup",          # the agent ended the call (the local agent's hangup, the bot's close)
    "provider-unavailable",  # no stream provider could be reached
    "provider-lost",         # the bot's connection was lost and did not come back
    "device-lost",           # an ALSA line's device failed
    "operator",              # voxgatectl hangup, voxgatectl line stop
    "transferred",           # a blind transfer (SIP REFER) succeeded: the caller is elsewhere
    "callee-busy",           # our outbound INVITE was answered 486, 600 or 603
    "callee-rejected",       # our outbound INVITE got another 3xx-6xx (or a 401/407 not passed)
    "callee-unreachable",    # our outbound INVITE got no final response (Timer B)
    "drain-timeout",         # still up at [limits] drain_timeout_s after SIGTERM
    "shutdown",              # a second SIGTERM, or SIGINT
    "error",                 # a fault in this call's own handling
]
"""Every reason a session can end with."""

END_REASONS: Final[tuple[EndReason, ...]] = get_args(EndReason)
"""The reasons of :data:`EndReason`, in its order."""
