"""Transfer to a human, as the agent sees it: the target check and the failure report.

An agent asks for a blind transfer with
:meth:`~voxgate.agents.base.AgentControls.transfer` (a ``sip:``/``sips:`` URI,
RFC 3261 §19.1.1). On a SIP call the session sends a REFER (RFC 3515 §2.4.1);
once the transferee's NOTIFY reports a 2xx (``message/sipfrag``, §2.4.5) the
call ends with reason ``transferred``. Anything else comes back to the agent as
one :class:`TransferFailure` through
:meth:`~voxgate.agents.base.Agent.transfer_failed`, and the call goes on.
Sans-IO: no trio here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from voxgate.errors import RemoteProtocolError
from voxgate.sip.uri import parse_uri_untrusted

MAX_TARGET_CHARS: Final = 512
"""The longest transfer target taken (it goes into a Refer-To header)."""

TransferFailureReason = Literal["bad-target", "not-supported", "refused", "failed", "timeout"]
"""Why a transfer failed:

* ``bad-target``: the target is not a ``sip:``/``sips:`` URI (nothing was sent);
* ``not-supported``: the call is not a SIP call (WebSocket, ALSA): status 501;
* ``refused``: the SIP layer would not send the REFER (call not answered yet, a
  transfer already running);
* ``failed``: the transferee refused the REFER (3xx-6xx), its NOTIFY reported a
  3xx-6xx (``status``), the REFER got no answer (Timer F) or the subscription
  ended without a final status;
* ``timeout``: no final NOTIFY within ``[sip] transfer_timeout_s``: status 408.
"""


@dataclass(frozen=True, slots=True)
class TransferFailure:
    """A transfer that did not happen; the call goes on.

    Attributes:
        target: the SIP URI asked for.
        status: the SIP status that says so (the REFER's or the sipfrag's
            3xx-6xx, 501 not supported, 400 bad target, 408 timeout), or None
            when there is none (Timer F, subscription ended without one).
        reason: see :data:`TransferFailureReason`.
    """

    target: str
    status: int | None
    reason: TransferFailureReason


def target_problem(target: str) -> str | None:
    """What is wrong with ``target`` as a transfer target, or None when it is a
    well-formed ``sip:``/``sips:`` URI (RFC 3261 §19.1.1) of at most
    :data:`MAX_TARGET_CHARS` characters without angle brackets or whitespace."""
    if len(target) > MAX_TARGET_CHARS:
        return f"longer than {MAX_TARGET_CHARS} characters"
    if any(c in target for c in "<> \t\r\n"):
        return "must be a bare sip:/sips: URI (no <>, no spaces)"
    try:
        parse_uri_untrusted(target)
    except RemoteProtocolError as exc:
        return f"not a sip:/sips: URI ({exc.reason})"
    return None
