"""A scripted UAC joined to a :class:`UasCore` over a fake link with a fake clock.

No sockets, no trio: the ``ConnectionPair`` idea of h11's tests. The UAC
builds requests as :class:`Request` objects (so tests can tweak them), the
link serializes them into the core from the UAC's address, and collects what
the core sends back: responses and requests addressed to the UAC, parsed, and
anything sent elsewhere in ``elsewhere``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from voxgate.sip.message import Headers, Request, Response, make_response
from voxgate.sip.parser import parse_message_untrusted
from voxgate.sip.uas import SipEvent, UasCore

Address = tuple[str, int]

UAS_ADDRESS: Address = ("127.0.0.1", 5060)
UAC_ADDRESS: Address = ("127.0.0.2", 5070)

SDP_OFFER = (
    b"v=0\r\no=uac 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\n"
    b"t=0 0\r\nm=audio 40000 RTP/AVP 0 8\r\n"
)
SDP_ANSWER = (
    b"v=0\r\no=voxgate 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\nm=audio 30000 RTP/AVP 0\r\n"
)


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start


class ScriptedUac:
    """Builds the requests of one call leg (§8.1.1) from ``address``."""

    def __init__(self, address: Address = UAC_ADDRESS, *, call_id: str = "call-1@uac") -> None:
        self.address = address
        self.call_id = call_id
        self.from_tag = "uactag"
        self.cseq = 1
        self.remote_tag: str | None = None
        self._branches = itertools.count(1)

    def new_branch(self) -> str:
        return f"z9hG4bKuac{next(self._branches)}"

    def request(
        self,
        method: str,
        *,
        uri: str = "sip:agent@127.0.0.1:5060",
        branch: str | None = None,
        cseq: int | None = None,
        cseq_method: str | None = None,
        to_tag: str | None = None,
        body: bytes = b"",
        extra: Iterable[tuple[str, str]] = (),
        via_params: str = ";rport",
    ) -> Request:
        """A request from this UAC; ``cseq`` defaults to the next number."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        host, port = self.address
        to = "<sip:agent@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        headers = Headers(
            [
                ("Via", f"SIP/2.0/UDP {host}:{port};branch={branch or self.new_branch()}"
                 f"{via_params}"),
                ("Max-Forwards", "70"),
                ("From", f'"Caller" <sip:caller@{host}>;tag={self.from_tag}'),
                ("To", to),
                ("Call-ID", self.call_id),
                ("CSeq", f"{cseq} {cseq_method or method}"),
                ("Contact", f"<sip:caller@{host}:{port}>"),
                *extra,
            ]
        )  # fmt: skip
        if body:
            headers.add("Content-Type", "application/sdp")
        return Request(method, uri, headers, body)

    def invite(
        self,
        *,
        body: bytes = SDP_OFFER,
        to_tag: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Request:
        return self.request("INVITE", body=body, to_tag=to_tag, extra=extra)

    def ack_for(self, invite: Request, response: Response, *, branch: str | None = None) -> Request:
        """The ACK for ``response`` to ``invite`` (§17.1.1.3 non-2xx: same branch; §13.2.2.4 2xx:
        new branch)."""
        cseq = int((invite.headers.get("CSeq") or "0").split()[0])
        if branch is None:
            branch = invite_branch(invite) if response.status >= 300 else self.new_branch()
        return self.request("ACK", branch=branch, cseq=cseq, to_tag=to_tag_of(response), body=b"")

    def cancel_for(self, invite: Request) -> Request:
        """The CANCEL of ``invite`` (§9.1: same branch, CSeq number, no To tag)."""
        cseq = int((invite.headers.get("CSeq") or "0").split()[0])
        return self.request("CANCEL", branch=invite_branch(invite), cseq=cseq)


def invite_branch(request: Request) -> str:
    via = request.headers.get("Via") or ""
    return via.split("branch=", 1)[1].split(";", 1)[0]


def to_tag_of(message: Request | Response) -> str | None:
    to = message.headers.get("To") or ""
    return to.split(";tag=", 1)[1].split(";", 1)[0] if ";tag=" in to else None


class FakeLink:
    """Joins a :class:`ScriptedUac` and a :class:`UasCore` (built with defaults if not given)."""

    def __init__(
        self,
        core: UasCore | None = None,
        uac: ScriptedUac | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        tokens = itertools.count(1)
        self.core = core or UasCore(
            local_host=UAS_ADDRESS[0],
            local_port=UAS_ADDRESS[1],
            random_token=lambda: f"tok{next(tokens):04d}",
        )
        self.uac = uac or ScriptedUac()
        self.responses: list[Response] = []
        self.requests: list[Request] = []
        self.elsewhere: list[tuple[bytes, Address]] = []
        self.events: list[SipEvent] = []

    def send(self, message: Request | Response | bytes, source: Address | None = None) -> None:
        """Deliver ``message`` to the core from the UAC (or ``source``), then collect output."""
        data = message if isinstance(message, bytes) else message.serialize()
        self.core.receive_datagram(data, source or self.uac.address, self.clock.now)
        self.pump()

    def pump(self) -> None:
        """Move the core's datagrams and events into the lists of this link."""
        for data, destination in self.core.datagrams_to_send():
            if destination != self.uac.address:
                self.elsewhere.append((data, destination))
                continue
            message = parse_message_untrusted(data)
            if isinstance(message, Response):
                self.responses.append(message)
            else:
                self.requests.append(message)
        while (event := self.core.next_event()) is not None:
            self.events.append(event)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every core timer at its deadline on the way."""
        target = self.clock.now + seconds
        while (deadline := self.core.next_deadline()) is not None and deadline <= target:
            self.clock.now = max(self.clock.now, deadline)
            self.core.handle_timer(self.clock.now)
            self.pump()
        self.clock.now = target

    def run_timers_out(self, limit_s: float = 3600.0) -> None:
        """Advance until no timer is left (at most ``limit_s``)."""
        self.advance(limit_s)

    def reply(self, request: Request, status: int) -> None:
        """The UAC answers a request the core sent it (e.g. our BYE)."""
        self.send(make_response(request, status))

    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def take_events(self) -> list[SipEvent]:
        events, self.events = self.events, []
        return events
