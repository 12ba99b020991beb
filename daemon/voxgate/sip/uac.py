"""Our outbound calls' requests (RFC 3261 §8.1.1, §9.1, §13.2.1), sans-IO.

The UAS core (:class:`voxgate.sip.uas.UasCore`, ``invite``) runs an outbound
call: it sends the INVITE built here on a client INVITE transaction
(:class:`~voxgate.sip.transaction.ClientInviteTransaction`), answers a 401/407
once with credentials (:class:`~voxgate.sip.digest.ChallengeAnswerer`, a new
INVITE with the next CSeq), cancels with the CANCEL built here (§9.1: only
once a provisional response came), and on the 2xx builds the dialog
(:meth:`~voxgate.sip.dialog.Dialog.from_2xx_untrusted`) and ACKs every 2xx
(§13.2.2.4). :class:`Outbound` is that call's UAC state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voxgate.sip.digest import ChallengeAnswerer, Credential
from voxgate.sip.headers import parse_cseq, parse_via
from voxgate.sip.message import Headers, Request
from voxgate.sip.transaction import MAGIC_COOKIE, ClientInviteTransaction

Address = tuple[str, int]

MAX_AUTH_FOLLOW_UPS = 2
"""INVITEs one outbound call may send after its first to answer challenges (a
server that keeps answering ``stale=true`` fails the call)."""


@dataclass
class Outbound:
    """One outbound call's UAC state in the UAS core.

    ``request``/``txn``: the INVITE in flight (the latest, after a challenge);
    ``ack``/``ack_destination``: the ACK of the 2xx, sent again for each
    retransmitted 2xx; ``cancel_wanted``: we hung up before the answer (a
    CANCEL goes out with the first provisional response, or went out already:
    ``cancel_sent``).
    """

    request: Request
    txn: ClientInviteTransaction
    credentials: tuple[Credential, ...]
    challenges: ChallengeAnswerer = field(default_factory=ChallengeAnswerer)
    auth_follow_ups: int = 0
    cancel_wanted: bool = False
    cancel_sent: bool = False
    ack: bytes | None = None
    ack_destination: Address | None = None


def build_invite(
    target: str,
    *,
    from_uri: str,
    local_tag: str,
    call_id: str,
    cseq: int,
    via_host_port: str,
    branch: str,
    contact: str,
    user_agent: str,
    allow: str,
    sdp_offer: bytes,
) -> Request:
    """A new INVITE to ``target`` (§8.1.1, §13.2.1) with our SDP offer: To
    ``<target>`` without tag, From ``<from_uri>`` with ``local_tag``, our
    Contact (``contact``, a name-addr) and Via (``via_host_port``, ``branch``,
    ``rport``)."""
    headers = Headers([
        ("Via", f"SIP/2.0/UDP {via_host_port};branch={branch};rport"),
        ("Max-Forwards", "70"),
        ("From", f"<{from_uri}>;tag={local_tag}"),
        ("To", f"<{target}>"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} INVITE"),
        ("Contact", contact),
        ("Allow", allow),
        ("User-Agent", user_agent),
        ("Content-Type", "application/sdp"),
    ])
    return Request("INVITE", target, headers, sdp_offer)


def follow_up_invite(invite: Request, branch: str, authorization: tuple[str, str]) -> Request:
    """``invite`` again after a challenge (§22.2): same Call-ID, From and To, the
    next CSeq number, a new Via branch, and ``authorization`` (header name, value)
    in place of any earlier credentials."""
    cseq = parse_cseq(invite.headers.get("CSeq") or "").number
    via = parse_via(invite.headers.get("Via") or "")
    items = []
    for name, value in invite.headers:
        lower = name.lower()
        if lower in ("authorization", "proxy-authorization"):
            continue
        if lower == "via":
            value = via.with_params(branch=branch).serialize()
        elif lower == "cseq":
            value = f"{cseq + 1} INVITE"
        items.append((name, value))
    items.append(authorization)
    return Request("INVITE", invite.uri, Headers(items), invite.body)


def build_cancel(invite: Request) -> Request:
    """The CANCEL of our ``invite`` (§9.1): its Request-URI, top Via (same
    branch), Route, From, To, Call-ID and CSeq number, method CANCEL."""
    cseq = parse_cseq(invite.headers.get("CSeq") or "").number
    headers = Headers([
        ("Via", invite.headers.get("Via") or ""),
        ("Max-Forwards", "70"),
        *(("Route", r) for r in invite.headers.get_all("Route")),
        ("From", invite.headers.get("From") or ""),
        ("To", invite.headers.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{cseq} CANCEL"),
    ])
    return Request("CANCEL", invite.uri, headers)


def new_branch(token: str) -> str:
    """An RFC 3261 branch (§8.1.1.7) from a random ``token``."""
    return MAGIC_COOKIE + token
