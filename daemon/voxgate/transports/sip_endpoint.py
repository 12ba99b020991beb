"""Trio driver for SIP over UDP: the socket, the timers and the calls.

The protocol lives in the sans-IO :class:`~voxgate.sip.uas.UasCore`; this
driver feeds it datagrams and clock ticks, sends what it produces, and hands
each ``IncomingCall`` whose SDP offer is acceptable to the call lifecycle
(:mod:`voxgate.calls`) with its answers: 180 while queued, the admission's
refusal, an RTP leg once admitted (503 ``no-rtp-port`` when none is free or
the process is out of descriptors, 500 when the session cannot be built). A
failure while handling one event is logged with its Call-ID and ends or
refuses only that call. ``[rtp] srtp`` decides whether an offer may (or
must) be SRTP with SDES keys; such a call's leg gets an
:class:`~voxgate.transports.srtp.SrtpContext` with a fresh key of ours,
which the answer carries. Running short of descriptors or kernel buffers while
receiving (the loop backs off) or sending (the datagram is dropped; the
transaction layer retransmits) is logged once per episode and counted.

The same socket registers ``[[sip.registrations]]`` (the sans-IO
:class:`~voxgate.sip.registration.RegistrationClient`; its REGISTERs run on the
UAS core's client transactions and their answers come back as
``RequestCompleted``) once it is bound; every change of a binding's state is
logged. Calls that a registrar sends to the registered contact are INVITEs
like any other.

Outbound calls (:meth:`SipEndpoint.place_call`, ``voxgatectl call``) go through
the same lifecycle: admission first (refused: :class:`OutboundRefused`, nothing
is sent), then the RTP leg, then the session, whose dialling task sends our
INVITE with an SDP offer (the first of ``[rtp] codecs`` and telephone-event,
plain RTP) and waits up to ``[sip] outbound_ring_timeout_s`` for the answer
(then CANCEL, reason ``ring-timeout``). A 3xx-6xx ends the call with
``callee-busy`` or ``callee-rejected``, no final response with
``callee-unreachable``; once answered the call runs like an inbound one.
Outcomes are counted in ``voxgate_sip_outbound_calls_total{outcome}``.

``[sip] listen_tcp`` and ``listen_tls`` add a
:class:`~voxgate.transports.sip_stream.StreamListener` each, with a UAS core of
their own (transport TCP or TLS); their calls are handled exactly like the
UDP ones, each call's actions going to the core it came from. Registrations
stay on UDP.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import math
import random
import secrets
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from prometheus_client import Counter

from voxgate import admission as adm
from voxgate.agents.factory import agent_kinds
from voxgate.agents.transfer import TransferFailure, TransferFailureReason
from voxgate.calls import CallRequest, Calls, Leg, SetupRefused
from voxgate.cidr import parse_networks
from voxgate.codec.g711 import codec_for
from voxgate.config import Config, split_host_port
from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError, RemoteProtocolError, is_resource_shortage
from voxgate.logging import SHORTAGE_BACKOFF_S, ResourceShortage, log_event
from voxgate.metrics import REGISTRY, SIP_OUTBOUND_CALLS
from voxgate.rtp.stream import RtpStream
from voxgate.session import Session, SessionCore
from voxgate.sip import uas
from voxgate.sip.headers import parse_name_addr
from voxgate.sip.ratelimit import FloodLimits
from voxgate.sip.registration import BindingSettings, BindingStatus, RegistrationClient
from voxgate.sip.sdes import KEY_SALT_BYTES, Crypto
from voxgate.sip.sdp import (
    DEFAULT_TELEPHONE_EVENT_PT,
    PTIME_MS,
    SUPPORTED_CODECS,
    Negotiated,
    SessionDescription,
    build_answer,
    build_offer,
    negotiate,
    parse_sdp_untrusted,
)
from voxgate.sip.uri import format_host_port, parse_uri_untrusted
from voxgate.transports.rtp_leg import RtpLeg, RtpReadiness
from voxgate.transports.rtp_ports import PortPool
from voxgate.transports.sip_stream import (
    StreamLimits,
    StreamListener,
    tls_client_context,
    tls_server_context,
)
from voxgate.transports.srtp import SrtpContext

HEARTBEAT_S = 1.0
"""The SIP loops check in with the watchdog at least this often, even when idle."""
MAX_SIP_DATAGRAM_BYTES = 65_535
MAX_DATAGRAMS_PER_WAKEUP = 64

SIP_SEND_FAILURES = Counter(
    "voxgate_sip_send_failures",
    "SIP datagrams the kernel did not take (dropped), by errno name",
    ["error"], registry=REGISTRY,
)

_Action = Callable[[uas.UasCore, float], None]

# Session end reason → SIP answer to a still-unanswered INVITE.
_REFUSAL_STATUS = {"shutdown": 503, "error": 500, "ack-timeout": 408, "ring-timeout": 480}


class NoRtpPort(SetupRefused):
    """Every port of ``[rtp] port_min..port_max`` is taken: the call gets 503."""


class OutboundRefused(Exception):
    """Admission refused an outbound call (``refusal``: its reason, e.g. full or
    draining); no INVITE was sent."""

    def __init__(self, refusal: adm.Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass
class _Call:
    """One INVITE handed to the lifecycle: its SDP state, then its leg and session.

    It is the call's :class:`~voxgate.calls.CallSetup` for the lifecycle.
    """

    endpoint: SipEndpoint
    ticket: str
    event: uas.IncomingCall
    offer: SessionDescription
    negotiated: Negotiated
    sdp_session_id: int
    sdp_version: int = 1
    leg: RtpLeg | None = None
    session: Session | None = None
    transfer_target: str = ""
    """The target of the call's latest REFER."""

    def queued(self, decision: adm.Queued) -> None:
        key = self.event.call_key
        self.endpoint.act(key, lambda core, now: core.send_provisional(key, 180, now))

    def refused(self, refusal: adm.Refusal) -> None:
        self.endpoint.refuse(self, refusal.sip_status, refusal.reason,
                             retry_after_s=refusal.retry_after_s)

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        return self.endpoint.build_leg(self, core)

    def started(self, session: Session) -> None:
        self.session = session
        assert self.leg is not None
        _apply_direction(self.leg, session, self.negotiated, trio.current_time())

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, NoRtpPort):
            self.endpoint.refuse(self, 503, "no-rtp-port",
                                 retry_after_s=self.endpoint.config.limits.retry_after_s)
        else:
            self.endpoint.refuse(self, 500, "error")

    @property
    def call_key(self) -> str:
        return self.event.call_key


@dataclass
class _OutboundCall:
    """One call we place: its :class:`~voxgate.calls.CallSetup`, then its dialling.

    ``negotiated`` is our offer's until the answer, then the answer's; ``offer``
    is the last SDP the peer sent (its answer, a re-INVITE's offer).
    """

    endpoint: SipEndpoint
    ticket: str
    call_id: str
    target: str
    negotiated: Negotiated
    sdp_session_id: int
    offer: SessionDescription | None = None
    sdp_version: int = 1
    call_key: str = ""  # once the INVITE is sent
    leg: RtpLeg | None = None
    session: Session | None = None
    refusal: adm.Refusal | None = None
    transfer_target: str = ""
    """The target of the call's latest REFER."""
    outcome: uas.OutboundAnswered | uas.OutboundFailed | None = None
    decided: trio.Event = field(default_factory=trio.Event)

    def queued(self, decision: adm.Queued) -> None:
        """Nothing to tell anyone: the INVITE goes out once admitted."""

    def refused(self, refusal: adm.Refusal) -> None:
        self.refusal = refusal
        SIP_OUTBOUND_CALLS.labels("refused").inc()

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        return self.endpoint.build_outbound_leg(self, core)

    def started(self, session: Session) -> None:
        self.session = session

    def failed(self, exc: Exception) -> None:
        SIP_OUTBOUND_CALLS.labels("failed").inc()  # the lifecycle logged it

    async def connect(self) -> EndReason | None:
        """Send the INVITE and wait for its outcome (see the module docstring):
        ``None`` once answered and the media set up, else the end reason.
        Cancelled when the session ends first (the hangup then cancels the INVITE)."""
        endpoint = self.endpoint
        try:
            endpoint.place_invite(self)
        except LocalProtocolError as e:
            SIP_OUTBOUND_CALLS.labels("failed").inc()
            log_event(logging.WARNING, "sip_outbound_failed", f"INVITE not sent: {e}",
                      call=self.session, target=self.target)
            return "error"
        with trio.move_on_after(endpoint.config.sip.outbound_ring_timeout_s):
            await self.decided.wait()
        outcome = self.outcome
        if outcome is None:
            SIP_OUTBOUND_CALLS.labels("ring-timeout").inc()
            return "ring-timeout"
        if isinstance(outcome, uas.OutboundFailed):
            reason = _outbound_failure(outcome.status)
            SIP_OUTBOUND_CALLS.labels(reason.removeprefix("callee-")).inc()
            log_event(logging.INFO, "sip_outbound_failed", outcome.reason, call=self.session,
                      target=self.target, status=outcome.status, reason=reason)
            return reason
        SIP_OUTBOUND_CALLS.labels("answered").inc()
        return endpoint.take_answer(self, outcome.sdp_answer)


class _OutboundSignaling:
    """:class:`~voxgate.session.CallSignaling` of a call we place: answered by the
    callee, so only ending it does anything (CANCEL before the answer, BYE after)."""

    def __init__(self, endpoint: SipEndpoint, call: _OutboundCall) -> None:
        self._endpoint = endpoint
        self._call = call

    def ring(self) -> None:
        """The callee rings, not us."""

    def answer(self) -> None:
        """The callee answered already (the session answers after ``connect``)."""

    def refuse(self, reason: str) -> None:
        if self._call.outcome is None:
            SIP_OUTBOUND_CALLS.labels("ended").inc()
        self.hangup(reason)

    def hangup(self, reason: str) -> None:
        if self._call.call_key:
            self._endpoint.hangup(self._call.call_key, reason)

    def release(self) -> None:
        if self._call.call_key:
            self._endpoint.release(self._call.call_key)


class _Signaling:
    """:class:`~voxgate.session.CallSignaling` for one SIP call."""

    def __init__(self, endpoint: SipEndpoint, call_key: str) -> None:
        self._endpoint = endpoint
        self._call_key = call_key

    def ring(self) -> None:
        key = self._call_key
        self._endpoint.act(key, lambda core, now: core.send_provisional(key, 180, now))

    def answer(self) -> None:
        self._endpoint.answer(self._call_key)

    def refuse(self, reason: str) -> None:
        status = _REFUSAL_STATUS.get(reason, 480)
        key = self._call_key
        self._endpoint.act(key, lambda core, now: core.reject(key, status, now, reason=reason))

    def hangup(self, reason: str) -> None:
        self._endpoint.hangup(self._call_key, reason)

    def release(self) -> None:
        self._endpoint.release(self._call_key)


class SipEndpoint:
    """The UAS on ``[sip] listen``; owns every SIP call's session."""

    def __init__(
        self,
        config: Config,
        calls: Calls,
        check_in: Callable[[str], None] = lambda task: None,
    ) -> None:
        self.config = config
        self.calls = calls
        self.admission = calls.desk.admission
        self._check_in = check_in
        host, port = config.sip.advertised_host_port
        self.core = _build_core(config, "UDP", port)
        self.streams = [
            StreamListener(_build_core(config, transport, split_host_port(listen)[1]),
                           split_host_port(listen), StreamLimits.from_config(config),
                           self._pump, tls_context=tls, tls_client_context=client)
            for transport, listen, tls, client in (
                ("TCP", config.sip.listen_tcp, None, None),
                ("TLS", config.sip.listen_tls, tls_server_context(config),
                 tls_client_context(config)))
            if listen]
        self._cores = [self.core, *(stream.core for stream in self.streams)]
        self._core_of_call: dict[str, uas.UasCore] = {}  # call key → its core, if not UDP
        self.registrations = RegistrationClient(_binding_settings(config),
                                                via_host_port=format_host_port(host, port))
        self._registration_states = [r.state for r in self.registrations.statuses(0.0)]
        self._registrations_settled = trio.Event()
        self.ports = PortPool(config.rtp.address, config.rtp.port_min, config.rtp.port_max)
        self.rtp_readiness = RtpReadiness()  # one readiness check per tick for all legs
        self._sock: socket.socket | None = None
        # call key → call; bounded by the UAS's max_dialogs
        self._calls: dict[str, _Call | _OutboundCall] = {}
        self._hangups_pending: set[str] = set()
        self._timers_changed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._receive_shortage = ResourceShortage("sip", "receiving SIP datagrams")
        self._send_shortage = ResourceShortage("sip", "sending SIP datagrams")

    # -- life cycle -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the SIP socket, report started, then serve until cancelled.

        Raises OSError when ``[sip] listen`` (``listen_tcp``, ``listen_tls``) cannot be
        bound.
        """
        host, port = self.config.sip.host, self.config.sip.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
            self._sock = sock
            async with trio.open_nursery() as nursery:
                for stream in self.streams:
                    await nursery.start(stream.run)
                nursery.start_soon(self._timer_loop)
                self.registrations.start(trio.current_time())
                self._pump()
                task_status.started()
                await self._receive_loop(sock)
        finally:
            sock.close()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is left and our BYEs are answered; False on timeout."""
        with trio.move_on_after(timeout_s):
            await self._idle.wait()
            return True
        return False

    def registration_statuses(self) -> list[BindingStatus]:
        """Each ``[[sip.registrations]]`` binding now, in config order."""
        return self.registrations.statuses(trio.current_time())

    def stop_registrations(self) -> None:
        """Remove every registered binding (REGISTER with Expires: 0); see
        :meth:`wait_registrations`."""
        self.registrations.stop(trio.current_time())
        self._pump()

    async def wait_registrations(self, timeout_s: float) -> bool:
        """Wait until no REGISTER is in flight (after :meth:`stop_registrations`: the
        removals are answered or timed out); False on timeout."""
        with trio.move_on_after(timeout_s):
            while self.registrations.pending:
                self._registrations_settled = trio.Event()
                await self._registrations_settled.wait()
            return True
        return False

    def apply_config(self, config: Config) -> None:
        """Take a reloaded config: for new calls; calls in progress keep their settings."""
        self.config = config
        for core in self._cores:
            _configure_core(core, config)
        for stream in self.streams:
            stream.set_limits(StreamLimits.from_config(config))
        self._pump()

    @property
    def stats(self) -> uas.UasStats:
        """The UAS counters of every transport's core, summed."""
        totals = [sum(values) for values in zip(
            *(dataclasses.astuple(core.stats) for core in self._cores), strict=True)]
        return uas.UasStats(*totals)

    def poke(self) -> None:
        """Admission changed: refresh OPTIONS availability and timers soon (not re-entrant)."""
        self._timers_changed.set()

    # -- actions from sessions -------------------------------------------

    def act(self, call_key: str, action: _Action) -> None:
        """Run one UAS action on the core of call ``call_key`` now and send what it
        produced."""
        action(self._core(call_key), trio.current_time())
        self._pump()

    def answer(self, call_key: str) -> None:
        """Answer an inbound call 200 with our SDP answer."""
        call = self._calls[call_key]
        assert isinstance(call, _Call) and call.leg is not None
        srtp = call.leg.srtp
        sdp = build_answer(
            call.offer, call.negotiated,
            local_address=self.config.rtp.sdp_address, local_port=call.leg.local_port,
            session_id=call.sdp_session_id, session_version=call.sdp_version,
            local_crypto=None if srtp is None else srtp.local,
        )
        self.act(call_key, lambda core, now: core.accept(call_key, sdp, now))

    def hangup(self, call_key: str, reason: str) -> None:
        self._hangups_pending.add(call_key)
        self.act(call_key, lambda core, now: core.hangup(call_key, now, reason=reason))

    def transfer(self, session_id: str, target: str) -> None:
        """Blind-transfer the SIP call of session ``session_id`` to the SIP URI ``target``
        (a REFER, RFC 3515); the session ends with ``transferred`` once the transferee
        reports success, a failure is logged and the call goes on. Raises
        LookupError for no such SIP call, LocalProtocolError when the UAS refuses
        (malformed URI, call not answered, a transfer already running; counted)."""
        call = next((c for c in self._calls.values() if c.ticket == session_id), None)
        if call is None:
            raise LookupError(session_id)
        self._refer(call, target)

    def _refer(self, call: _Call | _OutboundCall, target: str) -> None:
        """Send the call's REFER to ``target``; raises as :meth:`transfer`."""
        key = call.call_key
        self.act(key, lambda core, now: core.refer(key, target, now))
        call.transfer_target = target
        log_event(logging.INFO, "sip_transfer_started", f"REFER to {target}",
                  call=call.session)

    def place_call(self, target: str, *, tenant: str | None = None,
                   agent: str | None = None) -> str:
        """Place an outbound call to the SIP URI ``target`` (``sip:`` with an IP
        address) in ``tenant`` (None: the tenant rules decide, on the target's
        user and host), running ``agent`` (a kind the config runs; None: the
        tenant's); returns its session id at once, the INVITE goes out once
        admitted (see the module docstring). Raises ValueError for a bad
        ``target`` or ``agent``, :class:`OutboundRefused` when admission refuses
        the call."""
        try:
            uri = parse_uri_untrusted(target)
            ipaddress.ip_address(uri.host)
        except (RemoteProtocolError, ValueError):
            raise ValueError(f"{target[:80]!r} is not a sip: URI with an IP address") from None
        if uri.scheme != "sip":
            raise ValueError(f"{target[:80]!r} is not a sip: URI")
        kinds = agent_kinds(self.config)
        if agent is not None and agent not in kinds:
            raise ValueError(f"agent {agent[:20]!r} is not one the config runs "
                             f"({', '.join(sorted(kinds))})")
        codec = SUPPORTED_CODECS[self.config.rtp.codecs[0].upper()]
        offered = Negotiated(codec=codec, telephone_event_pt=DEFAULT_TELEPHONE_EVENT_PT,
                             remote_rtp=None, direction="sendrecv", ptime_ms=PTIME_MS,
                             media_index=0)
        ticket = uuid.uuid4().hex[:12]
        call = _OutboundCall(self, ticket, f"{uuid.uuid4().hex}@voxgate", target, offered,
                             sdp_session_id=random.getrandbits(31))
        host_port = format_host_port(*self.config.sip.advertised_host_port)
        info = adm.CallInfo(ruri_user=uri.user_unescaped, ruri_host=uri.host, headers={},
                            source_ip=None, transport="sip", tenant_hint=tenant)
        self.calls.start(CallRequest(
            ticket, call.call_id, info, to_uri=target, peer=f"{uri.host}:{uri.port or 5060}",
            from_uri=f"sip:{self.config.sip.outbound_from_user}@{host_port}",
            direction="outbound", agent=agent), call)
        if call.refusal is not None:
            raise OutboundRefused(call.refusal)
        return ticket

    def build_outbound_leg(self, call: _OutboundCall, core: SessionCore) -> Leg:
        """The RTP leg of an admitted outbound call (no remote address until the
        answer); raises NoRtpPort when no port is free."""
        leg, details = self._rtp_leg(call.negotiated, core)
        call.leg = leg
        details["target"] = call.target
        return Leg(media=leg, signaling=_OutboundSignaling(self, call), codec=leg.codec.name,
                   remote=lambda: _fmt(leg.stream.remote_addr), counters=leg.counters,
                   details=details, connect=call.connect,
                   transfer=lambda target: self._refer(call, target))

    def place_invite(self, call: _OutboundCall) -> None:
        """Send the outbound call's INVITE with our offer; raises LocalProtocolError
        when the UAS core refuses (its dialog or transaction limits)."""
        assert call.leg is not None
        cfg = self.config
        offer = build_offer(call.negotiated.codec.name, local_address=cfg.rtp.sdp_address,
                            local_port=call.leg.local_port, session_id=call.sdp_session_id,
                            session_version=call.sdp_version)
        call.call_key = self.core.invite(
            call.target, offer, trio.current_time(), from_user=cfg.sip.outbound_from_user,
            credentials=cfg.outbound_credentials, call_id=call.call_id)
        self._calls[call.call_key] = call
        self._idle = trio.Event()
        self._pump()

    def take_answer(self, call: _OutboundCall, sdp_answer: bytes) -> EndReason | None:
        """Apply the callee's SDP answer to the leg (RFC 3264 §7): ``None``, or
        ``error`` when it does not accept our offer (the call is then ended by BYE)."""
        assert call.leg is not None and call.session is not None
        try:
            answer = parse_sdp_untrusted(sdp_answer)
            negotiated = negotiate(answer, preference=(call.negotiated.codec.name,))
        except RemoteProtocolError as e:
            log_event(logging.WARNING, "sip_outbound_bad_answer", f"SDP answer: {e.reason}",
                      call=call.session)
            return "error"
        call.offer, call.negotiated = answer, negotiated
        call.leg.stream.set_remote_addr(negotiated.remote_rtp)
        _apply_direction(call.leg, call.session, negotiated, trio.current_time())
        log_event(logging.INFO, "sip_outbound_answered", "callee answered", call=call.session,
                  target=call.target, remote=_fmt(negotiated.remote_rtp))
        return None

    def release(self, call_key: str) -> None:
        """The session is gone: forget the call and, unless our BYE is still in
        flight (then at HangupCompleted), its dialog state."""
        if call_key not in self._hangups_pending:
            self._forget(call_key)
        self._calls.pop(call_key, None)
        self._update_idle()
        self._pump()

    def refuse(self, call: _Call, status: int, reason: str, *,
               retry_after_s: int | None = None) -> None:
        """Answer a call that never got a session, and forget it."""
        self._calls.pop(call.event.call_key, None)
        self._refuse(call.event, status, reason, retry_after_s=retry_after_s)
        self._update_idle()
        self._pump()

    def build_leg(self, call: _Call, core: SessionCore) -> Leg:
        """The RTP leg of an admitted call; raises NoRtpPort when no port is free."""
        leg, details = self._rtp_leg(call.negotiated, core)
        call.leg = leg
        details["source"] = _fmt(call.event.source)
        sip_transport = self._core(call.event.call_key).transport
        if sip_transport != "UDP":
            details["sip_transport"] = sip_transport
        stream = leg.stream
        return Leg(media=leg, signaling=_Signaling(self, call.event.call_key),
                   codec=leg.codec.name, remote=lambda: _fmt(stream.remote_addr),
                   counters=leg.counters,
                   answer_delay_s=self.config.sip.answer_delay_ms / 1000, details=details,
                   transfer=lambda target: self._refer(call, target))

    def _rtp_leg(self, negotiated: Negotiated, core: SessionCore
                 ) -> tuple[RtpLeg, dict[str, str | int | None]]:
        """An RTP leg for ``negotiated`` (SRTP when it carries the peer's key) and
        its ``call_start`` details; raises NoRtpPort when no port is free."""
        cfg = self.config
        sock = self.ports.open_socket()
        if sock is None:
            raise NoRtpPort("no free RTP port")
        codec = codec_for(negotiated.codec.name)
        stream = RtpStream(
            payload_type=negotiated.codec.payload_type,
            telephone_event_pt=negotiated.telephone_event_pt,
            ssrc=random.getrandbits(32),
            initial_sequence=random.getrandbits(16),
            initial_timestamp=random.getrandbits(32),
            jitter_capacity_frames=max(2, cfg.rtp.jitter_buffer_max_ms // 20),
            jitter_prefetch_frames=max(1, cfg.rtp.jitter_buffer_ms // 20),
            remote_addr=negotiated.remote_rtp,
            silence_byte=codec.silence(1)[0],
        )
        offered = negotiated.crypto
        srtp = None if offered is None else SrtpContext(offered, _our_crypto(offered))
        leg = RtpLeg(pool=self.ports, readiness=self.rtp_readiness, sock=sock, stream=stream,
                     codec=codec,
                     playback=core.pipeline.playback, on_dtmf=core.pipeline.dtmf,
                     budget=core.budget,
                     playback_allowance_s=cfg.rtp.playback_allowance_ms / 1000, srtp=srtp)
        details: dict[str, str | int | None] = {"local_rtp_port": leg.local_port}
        if offered is not None:
            details["srtp"] = offered.suite
        return leg, details

    # -- the loops --------------------------------------------------------

    async def _receive_loop(self, sock: socket.socket) -> None:
        """Read datagrams into the core until cancelled; ENOBUFS/ENOMEM back off."""
        while True:
            self._check_in("sip")
            with trio.move_on_after(HEARTBEAT_S):
                await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            short = False
            for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
                try:
                    data, source = sock.recvfrom(MAX_SIP_DATAGRAM_BYTES)
                except BlockingIOError:
                    break
                except OSError as e:
                    short = is_resource_shortage(e)
                    if short:
                        self._receive_shortage.failed(e)
                    else:
                        log_event(logging.WARNING, "sip_receive_error", str(e))
                    break
                self._receive_shortage.recovered()
                try:
                    self.core.receive_datagram(data, (source[0], source[1]), now)
                except Exception as exc:
                    log_event(logging.ERROR, "sip_core_error", f"UAS core failed: {exc!r}",
                              source=f"{source[0]}:{source[1]}", exc_info=exc)
            self._pump()
            if short:
                await trio.sleep(SHORTAGE_BACKOFF_S)

    async def _timer_loop(self) -> None:
        while True:
            deadlines = (*(core.next_deadline() for core in self._cores),
                         self.registrations.next_deadline())
            deadline = min((d for d in deadlines if d is not None), default=math.inf)
            with trio.move_on_at(deadline), trio.move_on_after(HEARTBEAT_S):
                await self._timers_changed.wait()
            now = trio.current_time()
            for core in self._cores:
                core.handle_timer(now)
            self.registrations.handle_timer(now)
            self._pump()
            # Re-arm after our own pump: its wake-up is for the other tasks' changes.
            self._timers_changed = trio.Event()

    def _pump(self) -> None:
        """Handle every queued event, send every queued message, re-arm timers."""
        for core in self._cores:
            while (event := core.next_event()) is not None:
                if isinstance(event, uas.IncomingCall) and core is not self.core:
                    self._core_of_call[event.call_key] = core
                self._handle_safely(event)
        self._start_registers()
        available, why = self.admission.availability()
        for core in self._cores:
            core.available = available
            core.unavailable_reason = why or ""
            core.retry_after_s = self.admission.limits.retry_after_s
        for data, addr in self.core.datagrams_to_send():
            self._send(data, addr)
        for stream in self.streams:
            stream.flush()
        self._timers_changed.set()

    def _handle_safely(self, event: uas.SipEvent) -> None:
        """Handle one event; a failure is logged and ends only that event's call."""
        try:
            self._handle(event)
        except Exception as exc:
            call_key = getattr(event, "call_key", None)
            log_event(logging.ERROR, "sip_event_error", f"handling {type(event).__name__} "
                      f"failed: {exc!r}", call_id=getattr(event, "call_id", None),
                      exc_info=exc)
            call = self._calls.get(call_key) if call_key is not None else None
            if call is not None:
                self.calls.end(call.ticket, "error")

    def _core(self, call_key: str) -> uas.UasCore:
        """The UAS core (transport) call ``call_key`` came on."""
        return self._core_of_call.get(call_key, self.core)

    def _forget(self, call_key: str) -> None:
        """Drop the call's dialog state in its core (see UasCore.forget)."""
        self._core_of_call.pop(call_key, self.core).forget(call_key)

    def _start_registers(self) -> None:
        """Start a client transaction for each queued REGISTER (none free: it failed),
        log binding state changes, wake :meth:`wait_registrations`."""
        now = trio.current_time()
        for out in self.registrations.requests_to_send():
            if not self.core.send_request(out.request, out.destination, now):
                self.registrations.receive_response(out.branch, None, now)
        statuses = self.registrations.statuses(now)
        for i, status in enumerate(statuses):
            if status.state != self._registration_states[i]:
                self._registration_states[i] = status.state
                failed = status.state == "failed"
                log_event(logging.WARNING if failed else logging.INFO, "sip_registration",
                          f"{status.aor} at {status.registrar}: {status.state}",
                          aor=status.aor, registrar=status.registrar, state=status.state,
                          status=status.last_status, error=status.last_error or None,
                          expires_in_s=status.expires_in_s, next_try_in_s=status.next_try_in_s)
        if not self.registrations.pending:
            self._registrations_settled.set()

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        """One datagram; one the kernel does not take is dropped and counted (a full
        send buffer or a descriptor/buffer shortage as an episode)."""
        sock = self._sock
        if sock is None or not _is_ip(addr[0]):
            return
        try:
            sock.sendto(data, addr)
        except OSError as e:
            SIP_SEND_FAILURES.labels(errno.errorcode.get(e.errno or 0, "unknown")).inc()
            if isinstance(e, BlockingIOError) or is_resource_shortage(e):
                self._send_shortage.failed(e)
            else:
                log_event(logging.WARNING, "sip_send_failed", str(e),
                          dest=f"{addr[0]}:{addr[1]}", size_bytes=len(data))
            return
        self._send_shortage.recovered()

    # -- events -------------------------------------------------------------

    def _handle(self, event: uas.SipEvent) -> None:
        if isinstance(event, uas.IncomingCall):
            self._incoming_call(event)
        elif isinstance(event, uas.CallAcked):
            pass
        elif isinstance(event, uas.CallCancelled):
            self._cancel(event.call_key)
        elif isinstance(event, uas.CallEnded):
            self._end(event.call_key, event.reason)
        elif isinstance(event, uas.ReInvite):
            self._reinvite(event)
        elif isinstance(event, uas.HangupCompleted):
            self._hangups_pending.discard(event.call_key)
            if event.call_key not in self._calls:
                self._forget(event.call_key)
            self._update_idle()
        elif isinstance(event, uas.RequestCompleted):
            self.registrations.receive_response(event.branch, event.response,
                                                trio.current_time())
        elif isinstance(event, uas.TransferEnded):
            self._transfer_ended(event)
        elif isinstance(event, uas.OutboundProgress):
            outbound = self._calls.get(event.call_key)
            log_event(logging.INFO, "sip_outbound_progress", f"callee answered {event.status}",
                      call=None if outbound is None else outbound.session, status=event.status)
        elif isinstance(event, uas.OutboundAnswered | uas.OutboundFailed):
            outbound = self._calls.get(event.call_key)
            if isinstance(outbound, _OutboundCall):
                outbound.outcome = event
                outbound.decided.set()
        elif isinstance(event, uas.BadMessageReceived):
            log_event(logging.WARNING, "sip_bad_message", event.reason, call_id=event.call_id,
                      source=f"{event.source[0]}:{event.source[1]}")

    def _end(self, call_key: str, reason: EndReason) -> None:
        call = self._calls.get(call_key)
        if call is None:
            return
        self.calls.end(call.ticket, reason)
        if call.session is None:  # cancelled while queued: the UAS answered 487
            del self._calls[call_key]
            self._forget(call_key)
            self._update_idle()

    def _transfer_ended(self, event: uas.TransferEnded) -> None:
        call = self._calls.get(event.call_key)
        if call is None:
            return
        if event.succeeded:
            log_event(logging.INFO, "sip_transfer_succeeded", "transferee reached the target",
                      call=call.session, status=event.status)
            self.calls.end(call.ticket, "transferred")
        else:
            log_event(logging.WARNING, "sip_transfer_failed", "transfer failed; call goes on",
                      call=call.session, status=event.status)
            if call.session is not None:
                reason: TransferFailureReason = "timeout" if event.timed_out else "failed"
                call.session.transfer_failed(
                    TransferFailure(call.transfer_target, event.status, reason),
                    "no final NOTIFY within [sip] transfer_timeout_s" if event.timed_out
                    else "the transferee reported failure" if event.status
                    else "no final status")

    def _cancel(self, call_key: str) -> None:
        self._end(call_key, "cancel")

    def _refuse(self, event: uas.IncomingCall, status: int, reason: str, *,
                retry_after_s: int | None = None) -> None:
        self._core(event.call_key).reject(event.call_key, status, trio.current_time(),
                                          reason=reason, retry_after_s=retry_after_s)
        self._forget(event.call_key)

    def _incoming_call(self, event: uas.IncomingCall) -> None:
        try:
            offer = parse_sdp_untrusted(event.sdp_offer)
            negotiated = negotiate(offer, preference=self.config.rtp.codecs,
                                   srtp=self.config.rtp.srtp)
        except RemoteProtocolError as e:
            status = e.status_hint or 400
            log_event(logging.INFO, "call_refused", f"refused with {status}",
                      call_id=event.call_id, status=status, reason=e.reason)
            self._refuse(event, status, e.reason)
            return
        call = _Call(self, uuid.uuid4().hex[:12], event, offer, negotiated,
                     sdp_session_id=random.getrandbits(31))
        self._calls[event.call_key] = call
        self._idle = trio.Event()
        info = _call_info(event)
        self.calls.start(CallRequest(call.ticket, event.call_id, info,
                                     from_uri=_uri_of(info.headers.get("from", "")),
                                     to_uri=_uri_of(info.headers.get("to", "")),
                                     peer=f"{event.source[0]}:{event.source[1]}"), call)

    def _reinvite(self, event: uas.ReInvite) -> None:
        call = self._calls.get(event.call_key)
        now = trio.current_time()
        core = self._core(event.call_key)
        if call is None or call.leg is None or call.session is None:
            core.answer_reinvite(event.call_key, None, 481, now)
            return
        srtp = call.leg.srtp
        try:
            offer = parse_sdp_untrusted(event.sdp_offer)
            # The call keeps its media protection: SRTP stays SRTP, plain stays plain.
            negotiated = negotiate(offer, preference=(call.negotiated.codec.name,),
                                   srtp="off" if srtp is None else "required")
        except RemoteProtocolError as e:
            core.answer_reinvite(event.call_key, None, e.status_hint or 488, now)
            return
        local_crypto = None
        if srtp is not None:
            offered = negotiated.crypto
            assert offered is not None  # srtp="required"
            if (offered.suite, offered.key_salt) != (srtp.remote.suite, srtp.remote.key_salt):
                srtp.rekey(offered, _our_crypto(offered))  # RFC 4568 §7.1.4: new keys
            local_crypto = offered.answer(srtp.local.key_salt)
        call.offer, call.negotiated = offer, negotiated
        call.sdp_version += 1
        call.leg.stream.set_remote_addr(negotiated.remote_rtp)
        _apply_direction(call.leg, call.session, negotiated, now)
        sdp = build_answer(offer, negotiated, local_address=self.config.rtp.sdp_address,
                           local_port=call.leg.local_port, session_id=call.sdp_session_id,
                           session_version=call.sdp_version, local_crypto=local_crypto)
        core.answer_reinvite(event.call_key, sdp, 200, now)
        log_event(logging.INFO, "call_reinvite", "media updated", call=call.session,
                  direction=negotiated.direction, remote=_fmt(negotiated.remote_rtp))

    def _update_idle(self) -> None:
        if not self._calls and not self._hangups_pending:
            self._idle.set()


def _apply_direction(leg: RtpLeg, session: Session, negotiated: Negotiated, now: float) -> None:
    """Hold/resume (RFC 3264 §8.4): what we send, and whether media is expected."""
    direction = negotiated.direction
    leg.sending = negotiated.remote_rtp is not None and direction in ("sendrecv", "sendonly")
    # A caller that holds (sendonly, inactive, 0.0.0.0) may well send nothing.
    session.media_changed(direction == "sendrecv", now)


def _our_crypto(offered: Crypto) -> Crypto:
    """Our answer to the peer's ``a=crypto`` line with a fresh random key (RFC 4568 §7.1.2)."""
    return offered.answer(secrets.token_bytes(KEY_SALT_BYTES))


def _outbound_failure(status: int | None) -> EndReason:
    """The end reason of an outbound call whose INVITE got ``status`` (3xx-6xx, or
    ``None``: no final response)."""
    if status is None:
        return "callee-unreachable"
    return "callee-busy" if status in (486, 600, 603) else "callee-rejected"


def _build_core(config: Config, transport: str, port: int) -> uas.UasCore:
    """A UAS core for ``transport`` whose Via and Contact name the advertised host
    and ``port`` (UDP: the advertised port)."""
    host, udp_port = config.sip.advertised_host_port
    core = uas.UasCore(local_host=host, local_port=udp_port if transport == "UDP" else port,
                       transport=transport, max_dialogs=_max_dialogs(config))
    _configure_core(core, config)
    return core


def _configure_core(core: uas.UasCore, config: Config) -> None:
    """The reloadable settings of a core: limits, trusted sources, digest."""
    core.max_dialogs = _max_dialogs(config)
    core.flood_limits = FloodLimits.from_settings(config.sip)
    core.transfer_timeout_s = config.sip.transfer_timeout_s
    core.trusted_networks = parse_networks(config.sip.trusted_cidrs)
    _configure_digest(core, config)


def _configure_digest(core: uas.UasCore, config: Config) -> None:
    """INVITE authentication from ``[sip] auth_*`` (no credentials: off)."""
    core.digest.configure(config.sip_credentials, realm=config.sip.auth_realm,
                          nonce_ttl_s=config.sip.auth_nonce_ttl_s,
                          max_nonces=config.sip.auth_replay_table_size,
                          algorithms=config.sip.auth_algorithms)


def _binding_settings(config: Config) -> list[BindingSettings]:
    """``[[sip.registrations]]`` as the registration core's bindings: our Contact is
    ``sip:USER@`` the advertised SIP address (restart-only, like ``[sip] advertise``)."""
    contact_host_port = format_host_port(*config.sip.advertised_host_port)
    bindings = []
    for reg, credentials in zip(config.sip.registrations, config.registration_credentials,
                                strict=True):
        registrar = parse_uri_untrusted(reg.registrar)  # checked when loading
        bindings.append(BindingSettings(
            registrar_uri=reg.registrar, registrar=(registrar.host, registrar.port or 5060),
            aor=reg.aor, contact_uri=f"sip:{reg.contact_user_or_aor}@{contact_host_port}",
            credentials=credentials, expires_s=reg.expires_s,
            retry_initial_s=reg.retry_initial_s, retry_max_s=reg.retry_max_s))
    return bindings


def _max_dialogs(config: Config) -> int:
    """SIP calls the UAS core may hold: the admitted and queued ones, plus room for
    the INVITEs being refused and the dialogs whose BYE is still in flight."""
    return 2 * (config.limits.max_sessions + config.limits.queue_size) + 64


def _call_info(event: uas.IncomingCall) -> adm.CallInfo:
    """What admission's tenant rules match on: Request-URI, headers, source."""
    try:
        uri = parse_uri_untrusted(event.request.uri)
        user, host = uri.user_unescaped, uri.host
    except RemoteProtocolError:
        user = host = None
    headers: dict[str, str] = {}
    for name, value in event.request.headers:
        headers.setdefault(name.lower(), value)
    return adm.CallInfo(ruri_user=user, ruri_host=host, headers=headers,
                        source_ip=event.source[0], transport="sip")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _fmt(addr: tuple[str, int] | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def _uri_of(name_addr: str) -> str:
    """The URI of a From/To value (the UAS parsed it already; "" if it cannot be read)."""
    try:
        return parse_name_addr(name_addr).uri
    except RemoteProtocolError:
        return ""
