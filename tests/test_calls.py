"""The one call lifecycle: setup failures, session errors in cancellation, drain deadline.

The SIP tests run the real :class:`~voxgate.transports.sip_endpoint.SipEndpoint`
and :class:`~voxgate.calls.Calls` in this process, called over UDP on
127.0.0.1 by the raw test phone (in a worker thread: it blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.harness.daemon import free_udp_port, reserve_port_range
from tests.harness.phone import Phone
from voxgate.admission import Admission, CallInfo, Queued, Refusal, limits_from_config
from voxgate.admission_desk import AdmissionDesk
from voxgate.agents.base import Agent
from voxgate.calls import CallHandle, CallRequest, Calls, Leg
from voxgate.config import Config, LimitsConfig, RecordsConfig, RtpConfig, SipConfig
from voxgate.pipeline.clock import MediaClock
from voxgate.records import Records
from voxgate.registry import Registry
from voxgate.session import Session, SessionCore
from voxgate.transports.sip_endpoint import SipEndpoint

MAX_SESSIONS = 2


@dataclass
class _Target:
    """What the test phone needs of a daemon: where its SIP listens."""

    sip_port: int

    @property
    def sip_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sip_port)


def sip_config(tmp_path: Path, first_rtp_port: int) -> Config:
    return Config(
        sip=SipConfig(listen=f"127.0.0.1:{free_udp_port()}"),
        rtp=RtpConfig(port_min=first_rtp_port, port_max=first_rtp_port + 19),
        limits=LimitsConfig(max_sessions=MAX_SESSIONS),
        records=RecordsConfig(path=str(tmp_path / "calls.sqlite3")),
    )


async def test_setup_failures_answer_500_and_free_every_slot(tmp_path, monkeypatch):
    def broken_agent(*args: object, **kwargs: object) -> Agent:
        raise ImportError("the integrator's plugin is broken")

    monkeypatch.setattr("voxgate.session.make_agent", broken_agent)
    rtp = reserve_port_range(20)
    try:
        config = sip_config(tmp_path, rtp.first)
        desk = AdmissionDesk(Admission(limits_from_config(config)), lambda task: None)
        records = Records(config.records.path, keep_days=0, max_rows=0, queue_size=1000)
        calls = Calls(config, desk, Registry(), MediaClock(), records=records)
        endpoint = SipEndpoint(config, calls)
        async with trio.open_nursery() as nursery:
            for service in (desk.run, records.run, calls.run, endpoint.run):
                await nursery.start(service)
            with Phone(_Target(config.sip.port)) as phone:  # type: ignore[arg-type]
                placed = [await trio.to_thread.run_sync(phone.call)
                          for _ in range(3 * MAX_SESSIONS)]
            assert [call.final_status for call in placed] == [500] * (3 * MAX_SESSIONS)
            assert desk.admission.statistics().active == 0
            assert len(calls.registry) == 0
            rows = await records.list_calls(limit=100)
            nursery.cancel_scope.cancel()
    finally:
        rtp.release()
    assert sorted(str(row["call_id"]) for row in rows) == sorted(c.call_id for c in placed)
    assert {(row["reason"], row["state"]) for row in rows} == {("error", "ended")}


class _Setup:
    """A transport that builds a leg on a fake medium and notes what it was told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def queued(self, decision: Queued) -> None:
        self.told.append("queued")

    def refused(self, refusal: Refusal) -> None:
        self.told.append(f"refused:{refusal.reason}")

    def build(self, ticket: str, core: SessionCore, now: float) -> Leg:
        return Leg(media=_Media(), signaling=self, codec="test", remote=lambda: None,
                   counters=dict)

    def started(self, session: Session) -> None:
        self.told.append("started")

    def failed(self, exc: Exception) -> None:
        self.told.append("failed")

    def ring(self) -> None: ...

    def answer(self) -> None: ...

    def refuse(self, reason: str) -> None:
        self.told.append(f"refuse:{reason}")

    def hangup(self, reason: str) -> None:
        self.told.append(f"hangup:{reason}")

    def release(self) -> None:
        self.told.append("release")


class _Media:
    packets_in = packets_out = 0

    def receive(self, now: float, frames_elapsed: int) -> tuple[bool, list[bytes]]:
        return True, []

    def send(self, pcm: bytes | None, finished: Sequence[int], now: float) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


class _FailsWhenCancelled(Agent):
    async def run(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("agent cleanup failed")


def _request(n: int) -> CallRequest:
    info = CallInfo(ruri_user=None, ruri_host=None, headers={}, source_ip=None,
                    transport="test")
    return CallRequest(f"t{n}", f"call-{n}", info)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def run_calls(config: Config, body: object) -> tuple[Calls, AdmissionDesk]:
    desk = AdmissionDesk(Admission(limits_from_config(config)), lambda task: None)
    clock = MediaClock()
    calls = Calls(config, desk, Registry(), clock)
    async with trio.open_nursery() as outer:
        await outer.start(clock.run)
        await outer.start(desk.run)
        await outer.start(calls.run)
        await body(calls)  # type: ignore[operator]
        outer.cancel_scope.cancel()
    return calls, desk


async def test_drain_deadline_ends_sessions_and_a_failing_cleanup_stays_inside(
        autojump_clock, monkeypatch):
    monkeypatch.setattr("voxgate.session.make_agent",
                        lambda config, playout, budget, **_: _FailsWhenCancelled(playout))
    setups = [_Setup() for _ in range(3)]
    handles: list[CallHandle] = []

    async def body(calls: Calls) -> None:
        handles.extend(calls.start(_request(n), setup) for n, setup in enumerate(setups))
        await trio.sleep(1)
        calls.drain(trio.current_time() + 5)
        for handle in handles:
            await handle.ended.wait()

    config = replace(Config(), limits=LimitsConfig(max_sessions=10))
    calls, desk = await run_calls(config, body)
    assert [h.reason for h in handles] == ["drain-timeout"] * 3
    assert all("hangup:drain-timeout" in s.told and "release" in s.told for s in setups)
    assert desk.admission.statistics().active == 0
    assert len(calls.registry) == 0


async def test_queued_call_gives_up_its_place_and_refusal_needs_no_task(autojump_clock):
    queued, refused, admitted = _Setup(), _Setup(), _Setup()
    handles: list[CallHandle] = []

    async def body(calls: Calls) -> None:
        handles.append(calls.start(_request(0), admitted))
        handles.append(calls.start(_request(1), queued))
        handles.append(calls.start(_request(2), refused))
        await trio.sleep(0.5)
        assert calls.end("t1", "cancel")
        await handles[1].ended.wait()
        calls.end("t0", "bye")
        await handles[0].ended.wait()

    config = replace(Config(), limits=LimitsConfig(max_sessions=1, queue_size=1))
    _, desk = await run_calls(config, body)
    assert refused.told == ["refused:full"]
    assert handles[2].reason == "refused"
    assert queued.told == ["queued"] and handles[1].reason == "cancel"
    assert handles[0].reason == "bye"
    stats = desk.admission.statistics()
    assert (stats.active, stats.queued) == (0, 0)


async def test_caller_gone_before_the_session_was_built_frees_the_slot(autojump_clock):
    setup = _Setup()
    handles: list[CallHandle] = []

    async def body(calls: Calls) -> None:
        handles.append(calls.start(_request(0), setup))
        assert calls.end("t0", "cancel")  # before the call's task has run
        await handles[0].ended.wait()

    _, desk = await run_calls(replace(Config(), limits=LimitsConfig(max_sessions=1)), body)
    assert handles[0].reason == "cancel" and handles[0].session is None
    assert setup.told == []
    assert desk.admission.statistics().active == 0
