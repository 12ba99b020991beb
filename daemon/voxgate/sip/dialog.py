"""UAS dialog state (RFC 3261 §12), sans-IO.

A :class:`Dialog` is created from an INVITE we answer (§12.1.1) or from the
2xx to an INVITE we sent (§12.1.2) and builds the requests we send inside
it, i.e. our BYE (§12.2.1.1) and the ACK for a 2xx (§13.2.2.4). Header values of
the peer are kept as it sent them (already unfolded by the parser), so
From/To/Route come back byte-identical.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.sip.headers import parse_cseq, parse_name_addr
from voxgate.sip.message import Headers, Request, Response
from voxgate.sip.uri import parse_uri_untrusted

VIA_PLACEHOLDER = "SIP/2.0/UDP voxgate.invalid"
"""The Via :meth:`Dialog.build_request` leaves for the core to replace (its host and branch)."""

MAX_CSEQ = 2**31 - 1
"""§8.1.1.5: CSeq numbers are below 2**31."""

MAX_FORWARDS = 70


class DialogState(enum.Enum):
    EARLY = "early"  # INVITE received or sent, no final response yet
    CONFIRMED = "confirmed"  # 2xx sent or received
    TERMINATED = "terminated"  # rejected, cancelled or BYE sent/received


@dataclass(frozen=True, slots=True)
class DialogId:
    """§12: Call-ID plus local and remote tag (``""`` for an RFC 2543 peer without tag)."""

    call_id: str
    local_tag: str
    remote_tag: str


class Dialog:
    """One UAS dialog (§12.1.1).

    ``remote_cseq`` is the highest CSeq number seen from the peer;
    ``local_cseq`` the number of our last request (the first request uses
    ``local_cseq + 1``). ``route_set`` holds Record-Route values in request
    order; ``remote_target`` is the URI of the peer's Contact (the From URI
    when an RFC 2543 peer sent none).
    """

    def __init__(
        self,
        *,
        dialog_id: DialogId,
        local_party: str,
        remote_party: str,
        remote_target: str,
        route_set: tuple[str, ...],
        strict_route: bool,
        remote_cseq: int,
        local_cseq: int,
    ) -> None:
        if not 0 <= local_cseq < MAX_CSEQ:
            raise LocalProtocolError(f"local CSeq {local_cseq} out of range")
        self.id = dialog_id
        self.local_party = local_party
        self.remote_party = remote_party
        self.remote_target = remote_target
        self.route_set = route_set
        self.strict_route = strict_route
        self.remote_cseq = remote_cseq
        self.local_cseq = local_cseq
        self.state = DialogState.EARLY
        self.last_request_at: float | None = None

    @classmethod
    def from_invite_untrusted(cls, invite: Request, *, local_tag: str, local_cseq: int) -> Dialog:
        """Build the dialog an INVITE creates (§12.1.1).

        ``local_tag`` is used unless the To header already carries a tag (a
        request re-creating a dialog we lost, §12.2.2). Raises
        RemoteProtocolError(400) when From, To, CSeq, Contact or
        Record-Route does not parse; nothing is kept from a failed call.
        """
        headers = invite.headers
        to_value = headers.get("To") or ""
        from_value = headers.get("From") or ""
        to = parse_name_addr(to_value)
        remote = parse_name_addr(from_value)
        cseq = parse_cseq(headers.get("CSeq") or "")
        contact = headers.get("Contact")
        target = parse_name_addr(contact).uri if contact and contact.strip() != "*" else remote.uri
        route_set = tuple(headers.get_all("Record-Route"))
        strict = _strict_route(route_set)
        if to.tag is None:
            to_value = f"{to_value};tag={local_tag}"
        return cls(
            dialog_id=DialogId(invite.call_id, to.tag or local_tag, remote.tag or ""),
            local_party=to_value,
            remote_party=from_value,
            remote_target=target,
            route_set=route_set,
            strict_route=strict,
            remote_cseq=cseq.number,
            local_cseq=local_cseq,
        )

    @classmethod
    def from_2xx_untrusted(cls, invite: Request, response: Response) -> Dialog:
        """Build the dialog the 2xx to our ``invite`` creates (§12.1.2, we are the UAC).

        Route set: the response's Record-Route values reversed; remote target:
        its Contact (the Request-URI when it has none); remote CSeq empty (0);
        local CSeq the INVITE's. Raises RemoteProtocolError(400) when To has
        no tag, or To, Contact or Record-Route does not parse.
        """
        to_value = response.headers.get("To") or ""
        to = parse_name_addr(to_value)
        if to.tag is None:
            raise RemoteProtocolError("2xx to our INVITE without a To tag", 400)
        from_value = invite.headers.get("From") or ""
        contact = response.headers.get("Contact")
        target = parse_name_addr(contact).uri if contact else invite.uri
        route_set = tuple(reversed(response.headers.get_all("Record-Route")))
        return cls(
            dialog_id=DialogId(invite.call_id, parse_name_addr(from_value).tag or "", to.tag),
            local_party=from_value,
            remote_party=to_value,
            remote_target=target,
            route_set=route_set,
            strict_route=_strict_route(route_set),
            remote_cseq=0,
            local_cseq=parse_cseq(invite.headers.get("CSeq") or "").number,
        )

    def update_remote_cseq(self, number: int) -> None:
        """Check and record the CSeq of a request inside the dialog (§12.2.2).

        Raises RemoteProtocolError(500) for a number lower than the last
        one; the recorded number is unchanged then.
        """
        if number < self.remote_cseq:
            raise RemoteProtocolError(
                f"CSeq {number} lower than {self.remote_cseq}: out of order", 500
            )
        self.remote_cseq = number

    def next_hop_uri(self) -> str:
        """The URI our requests go to first (§12.2.1.1, §8.1.2): the first route or the target."""
        if self.route_set:
            return parse_name_addr(self.route_set[0]).uri
        return self.remote_target

    def build_request(self, method: str, now: float) -> Request:
        """A new request inside the dialog (§12.2.1.1), e.g. our BYE.

        Request-URI is the remote target with loose routing, or the first
        route with a strict (no ``lr``) route set, the route set then ending
        with the remote target. From/To are swapped relative to the INVITE
        and carry both tags; the CSeq number is one above the last.
        ``now`` (monotonic seconds) is kept in ``last_request_at``. The Via
        is :data:`VIA_PLACEHOLDER`. Raises LocalProtocolError when the CSeq
        space is used up.
        """
        if self.local_cseq + 1 > MAX_CSEQ:
            raise LocalProtocolError("local CSeq space exhausted")
        self.local_cseq += 1
        self.last_request_at = now
        return self._build(method, self.local_cseq)

    def build_ack(self, invite_cseq: int) -> Request:
        """The ACK for a 2xx to our INVITE with CSeq number ``invite_cseq``
        (§13.2.2.4): built like any request in the dialog but with the INVITE's
        CSeq number (method ACK); the Via is :data:`VIA_PLACEHOLDER`."""
        return self._build("ACK", invite_cseq)

    def _build(self, method: str, cseq: int) -> Request:
        routes = list(self.route_set)
        uri = self.remote_target
        if self.strict_route:
            uri = parse_name_addr(routes.pop(0)).uri
            routes.append(f"<{self.remote_target}>")
        headers = Headers(
            [
                ("Via", VIA_PLACEHOLDER),
                ("Max-Forwards", str(MAX_FORWARDS)),
                *(("Route", r) for r in routes),
                ("From", self.local_party),
                ("To", self.remote_party),
                ("Call-ID", self.id.call_id),
                ("CSeq", f"{cseq} {method}"),
            ]
        )
        return Request(method, _strip_uri_headers(uri), headers)


def _strict_route(route_set: tuple[str, ...]) -> bool:
    """Whether the first route is a strict router (no ``lr``, §12.1.1, §12.1.2)."""
    if not route_set:
        return False
    return "lr" not in parse_uri_untrusted(parse_name_addr(route_set[0]).uri).params


def _strip_uri_headers(uri: str) -> str:
    """§12.2.1.1: headers are not allowed in a Request-URI taken from a route."""
    return uri.split("?", 1)[0]
