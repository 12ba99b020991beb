import ipaddress
import random
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from voxgate.admission import (
    ADMISSION_STATES,
    DEFAULT_TENANT,
    REFUSAL_ANSWERS,
    Admission,
    AdmissionLimits,
    AdmissionStatistics,
    Admitted,
    CallInfo,
    ComponentHealth,
    Decision,
    Queued,
    Refusal,
    TenantRule,
    TenantStatistics,
)
from voxgate.errors import LocalProtocolError


def call(user: str | None = None, host: str | None = "pbx.example",
         headers: dict[str, str] | None = None, ip: str | None = "192.0.2.10") -> CallInfo:
    return CallInfo(ruri_user=user, ruri_host=host, headers=headers or {}, source_ip=ip)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# Tenants "a" and "b" match on the request-URI user of the same name.
A = TenantRule("a", ruri_user="a")
B = TenantRule("b", ruri_user="b")
C = TenantRule("c", ruri_user="c")


def make(max_sessions: int = 2, **kwargs: Any) -> Admission:
    return Admission(AdmissionLimits(max_sessions=max_sessions, **kwargs))


def refusal_reason(decision: Decision) -> str:
    assert isinstance(decision, Refusal), decision
    return decision.reason


def admitted_tickets(decisions: Iterable[Decision]) -> list[str]:
    return [d.ticket for d in decisions if isinstance(d, Admitted)]


# --- limits -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"max_sessions": -1},
    {"max_sessions": 1, "queue_size": -1},
    {"max_sessions": 1, "queue_timeout_s": 0.0},
    {"max_sessions": 1, "queue_timeout_s": float("inf")},
    {"max_sessions": 1, "queue_timeout_s": float("nan")},
    {"max_sessions": 1, "retry_after_s": -1},
    {"max_sessions": 1, "default_tenant_max_sessions": -1},
    {"max_sessions": 1, "tenants": (A, TenantRule("a", ruri_user="x"))},
])
def test_limits_rejects_inconsistent_values(kwargs):
    with pytest.raises(LocalProtocolError):
        AdmissionLimits(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"name": ""},
    {"name": DEFAULT_TENANT},
    {"name": "x", "max_sessions": -1},
])
def test_tenant_rule_rejects_bad_name_or_cap(kwargs):
    with pytest.raises(LocalProtocolError):
        TenantRule(**kwargs)


def test_refusal_answers_table():
    assert REFUSAL_ANSWERS == {
        "tenant-full": (486, False), "full": (503, True), "unhealthy": (503, True),
        "draining": (503, True), "memory": (503, True), "queue-timeout": (503, True),
    }


# --- classification ---------------------------------------------------------

def classify(rule: TenantRule, info: CallInfo) -> str:
    return make(tenants=(rule,)).classify(info)


def test_ruri_user_exact_and_case_sensitive():
    rule = TenantRule("t", ruri_user="Sales")
    assert classify(rule, call(user="Sales")) == "t"
    assert classify(rule, call(user="sales")) == DEFAULT_TENANT
    assert classify(rule, call(user="Sales1")) == DEFAULT_TENANT
    assert classify(rule, call(user=None)) == DEFAULT_TENANT


def test_ruri_host_case_insensitive():
    rule = TenantRule("t", ruri_host="Tenant.Example")
    assert classify(rule, call(host="tenant.example")) == "t"
    assert classify(rule, call(host="TENANT.EXAMPLE")) == "t"
    assert classify(rule, call(host="other.example")) == DEFAULT_TENANT
    assert classify(rule, call(host=None)) == DEFAULT_TENANT


def test_header_name_case_insensitive_value_exact():
    rule = TenantRule("t", header=("X-Tenant", "Acme"))
    assert classify(rule, call(headers={"x-tenant": "Acme"})) == "t"
    assert classify(rule, call(headers={"x-tenant": "acme"})) == DEFAULT_TENANT
    assert classify(rule, call(headers={"x-other": "Acme"})) == DEFAULT_TENANT
    assert classify(rule, call(headers={})) == DEFAULT_TENANT


def test_source_cidr_v4():
    rule = TenantRule("t", source_cidrs=(net("10.1.0.0/16"), net("192.0.2.7/32")))
    assert classify(rule, call(ip="10.1.200.3")) == "t"
    assert classify(rule, call(ip="192.0.2.7")) == "t"
    assert classify(rule, call(ip="10.2.0.1")) == DEFAULT_TENANT
    assert classify(rule, call(ip="192.0.2.8")) == DEFAULT_TENANT


def test_source_cidr_v6_and_mapped_v4():
    rule = TenantRule("t", source_cidrs=(net("2001:db8:1::/48"), net("10.0.0.0/8")))
    assert classify(rule, call(ip="2001:db8:1:ffff::1")) == "t"
    assert classify(rule, call(ip="2001:db8:2::1")) == DEFAULT_TENANT
    assert classify(rule, call(ip="::ffff:10.9.8.7")) == "t"
    assert classify(rule, call(ip="::ffff:11.9.8.7")) == DEFAULT_TENANT


@pytest.mark.parametrize("ip", [None, "", "not-an-address", "10.0.0.300"])
def test_source_cidr_missing_or_bad_address_never_matches(ip):
    rule = TenantRule("t", source_cidrs=(net("0.0.0.0/0"), net("::/0")))
    assert classify(rule, call(ip=ip)) == DEFAULT_TENANT


def test_all_given_rules_must_match():
    rule = TenantRule("t", ruri_user="u", ruri_host="h.example", header=("x-k", "v"),
                      source_cidrs=(net("10.0.0.0/8"),))
    good = call(user="u", host="h.example", headers={"x-k": "v"}, ip="10.0.0.1")
    assert classify(rule, good) == "t"
    for spoiled in (replace(good, ruri_user="w"), replace(good, ruri_host="g.example"),
                    replace(good, headers={"x-k": "w"}), replace(good, source_ip="11.0.0.1")):
        assert classify(rule, spoiled) == DEFAULT_TENANT


def test_tenant_without_rules_never_matches():
    assert classify(TenantRule("t", max_sessions=3), call(user="anything")) == DEFAULT_TENANT


def test_first_matching_tenant_in_config_order_wins():
    wide = TenantRule("wide", ruri_host="h.example")
    narrow = TenantRule("narrow", ruri_user="u", ruri_host="h.example")
    info = call(user="u", host="h.example")
    assert make(tenants=(wide, narrow)).classify(info) == "wide"
    assert make(tenants=(narrow, wide)).classify(info) == "narrow"


# --- gates and caps ----------------------------------------------------------

def test_admit_below_caps():
    adm = make()
    assert adm.request("s1", call(), 0.0) == Admitted("s1", DEFAULT_TENANT, 0.0)
    assert adm.statistics().active == 1


def test_gate_order_health_then_draining_then_memory_then_caps():
    adm = make(max_sessions=0, retry_after_s=7)
    adm.set_health("agent", False, "provider down")
    adm.set_draining(True)
    adm.set_memory_ok(False, "rss above soft watermark")
    expected = Refusal("s1", DEFAULT_TENANT, "unhealthy", 503, 7, 0.0)
    assert adm.request("s1", call(), 0.0) == expected
    adm.set_health("agent", True)
    assert refusal_reason(adm.request("s2", call(), 0.0)) == "draining"
    adm.set_draining(False)
    assert refusal_reason(adm.request("s3", call(), 0.0)) == "memory"
    adm.set_memory_ok(True)
    assert refusal_reason(adm.request("s4", call(), 0.0)) == "full"


def test_any_unhealthy_component_closes_the_gate():
    adm = make()
    adm.set_health("sip", True)
    adm.set_health("agent", False)
    assert refusal_reason(adm.request("s1", call(), 0.0)) == "unhealthy"
    adm.set_health("agent", True)
    assert isinstance(adm.request("s2", call(), 0.0), Admitted)


def test_tenant_cap_refuses_486_without_retry_after():
    adm = make(max_sessions=10, tenants=(replace(A, max_sessions=1),))
    assert isinstance(adm.request("a1", call("a"), 0.0), Admitted)
    assert adm.request("a2", call("a"), 0.0) == Refusal("a2", "a", "tenant-full", 486, None, 0.0)
    assert isinstance(adm.request("x1", call("x"), 0.0), Admitted)


def test_global_cap_refuses_503_with_retry_after():
    adm = make(max_sessions=1, retry_after_s=9)
    adm.request("s1", call(), 0.0)
    assert adm.request("s2", call(), 0.0) == Refusal("s2", DEFAULT_TENANT, "full", 503, 9, 0.0)


def test_tenant_caps_above_global_cap_both_hold():
    adm = make(max_sessions=3, tenants=(replace(A, max_sessions=2), replace(B, max_sessions=2)))
    decisions = [adm.request(f"{t}{i}", call(t), 0.0) for t in "ab" for i in range(3)]
    assert [(d.ticket, getattr(d, "reason", None)) for d in decisions] == [
        ("a0", None), ("a1", None), ("a2", "tenant-full"),
        ("b0", None), ("b1", "full"), ("b2", "full"),
    ]


def test_default_tenant_cap():
    adm = make(max_sessions=5, default_tenant_max_sessions=1, tenants=(A,))
    adm.request("d1", call(), 0.0)
    assert refusal_reason(adm.request("d2", call(), 0.0)) == "tenant-full"
    assert isinstance(adm.request("a1", call("a"), 0.0), Admitted)


def test_duplicate_ticket_raises_whether_admitted_or_queued():
    adm = make(max_sessions=1, queue_size=1)
    adm.request("s1", call(), 0.0)
    adm.request("s2", call(), 0.0)
    for ticket in ("s1", "s2"):
        with pytest.raises(LocalProtocolError):
            adm.request(ticket, call(), 0.0)


def test_refused_ticket_may_be_reused():
    adm = make(max_sessions=0)
    adm.request("s1", call(), 0.0)
    assert refusal_reason(adm.request("s1", call(), 0.0)) == "full"


def test_release_of_unknown_or_queued_ticket_raises():
    adm = make(max_sessions=1, queue_size=1)
    adm.request("s1", call(), 0.0)
    adm.request("s2", call(), 0.0)
    for ticket in ("nope", "s2"):
        with pytest.raises(LocalProtocolError):
            adm.release(ticket, 0.0)
    adm.release("s1", 0.0)
    with pytest.raises(LocalProtocolError):
        adm.release("s1", 0.0)


# --- queue ----------------------------------------------------------------

def test_queue_bounded_by_queue_size_over_all_tenants():
    adm = make(max_sessions=1, queue_size=2, tenants=(A, B))
    adm.request("s0", call(), 0.0)
    assert adm.request("a1", call("a"), 0.0) == Queued("a1", "a", 1)
    assert adm.request("b1", call("b"), 0.0) == Queued("b1", "b", 1)
    assert refusal_reason(adm.request("a2", call("a"), 0.0)) == "full"
    assert adm.statistics().queued == 2


def test_queue_size_zero_means_no_queue():
    adm = make(max_sessions=1, queue_size=0)
    adm.request("s0", call(), 0.0)
    assert isinstance(adm.request("s1", call(), 0.0), Refusal)
    assert adm.next_deadline() is None


def test_queue_fifo_within_tenant_and_position():
    adm = make(max_sessions=1, queue_size=5)
    adm.request("s0", call(), 0.0)
    queued = [adm.request(f"s{i}", call(), float(i)) for i in range(1, 4)]
    assert queued == [Queued(f"s{i}", DEFAULT_TENANT, i) for i in range(1, 4)]
    assert adm.release("s0", 10.0) == [Admitted("s1", DEFAULT_TENANT, 9.0)]
    assert adm.release("s1", 11.0) == [Admitted("s2", DEFAULT_TENANT, 9.0)]
    assert adm.release("s2", 12.0) == [Admitted("s3", DEFAULT_TENANT, 9.0)]
    assert adm.release("s3", 13.0) == []


def test_round_robin_across_tenants():
    adm = make(max_sessions=1, queue_size=10, tenants=(A, B, C))
    adm.request("x", call(), 0.0)
    for ticket in ("a1", "a2", "a3", "b1", "b2", "c1"):
        assert isinstance(adm.request(ticket, call(ticket[0]), 0.0), Queued)
    order = []
    current = "x"
    while True:
        got = adm.release(current, 1.0)
        if not got:
            break
        (one,) = got
        order.append(one.ticket)
        current = one.ticket
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_round_robin_skips_tenant_at_its_cap():
    adm = make(max_sessions=2, queue_size=5, tenants=(replace(A, max_sessions=1), B))
    adm.request("a0", call("a"), 0.0)
    adm.request("b0", call("b"), 0.0)
    assert adm.request("a1", call("a"), 0.0) == Queued("a1", "a", 1)
    assert adm.request("b1", call("b"), 0.0) == Queued("b1", "b", 1)
    assert admitted_tickets(adm.release("b0", 1.0)) == ["b1"]
    assert admitted_tickets(adm.release("a0", 2.0)) == ["a1"]


def test_release_admits_several_after_raise_only_one_per_slot():
    adm = make(max_sessions=1, queue_size=3)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 0.0)
    adm.request("s2", call(), 0.0)
    assert admitted_tickets(adm.release("s0", 1.0)) == ["s1"]
    assert adm.statistics().active == 1
    assert adm.statistics().queued == 1


def test_new_call_does_not_jump_the_queue():
    adm = make(max_sessions=1, queue_size=3)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 0.0)
    assert admitted_tickets(adm.release("s0", 1.0)) == ["s1"]
    assert isinstance(adm.request("s2", call(), 1.0), Queued)


def test_timeout_at_global_cap_is_queue_timeout_503():
    adm = make(max_sessions=1, queue_size=1, queue_timeout_s=2.0, retry_after_s=4)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 1.0)
    assert adm.next_deadline() == 3.0
    assert adm.handle_timer(2.99) == []
    assert adm.handle_timer(3.5) == [
        Refusal("s1", DEFAULT_TENANT, "queue-timeout", 503, 4, 2.5)]
    assert adm.next_deadline() is None
    assert adm.release("s0", 4.0) == []


def test_timeout_at_tenant_cap_is_tenant_full_486():
    adm = make(max_sessions=5, queue_size=1, queue_timeout_s=2.0,
               tenants=(replace(A, max_sessions=1),))
    adm.request("a0", call("a"), 0.0)
    assert adm.request("a1", call("a"), 0.0) == Queued("a1", "a", 1)
    assert adm.handle_timer(2.0) == [Refusal("a1", "a", "tenant-full", 486, None, 2.0)]


def test_next_deadline_is_earliest_and_timers_refuse_in_arrival_order():
    adm = make(max_sessions=1, queue_size=3, queue_timeout_s=5.0, tenants=(A,))
    adm.request("s0", call(), 0.0)
    adm.request("q1", call("a"), 1.0)
    adm.request("q2", call(), 2.0)
    adm.request("q3", call("a"), 3.0)
    assert adm.next_deadline() == 6.0
    assert [r.ticket for r in adm.handle_timer(7.0)] == ["q1", "q2"]
    assert adm.next_deadline() == 8.0


def test_cancel_removes_queued_call():
    adm = make(max_sessions=1, queue_size=2, queue_timeout_s=5.0)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 1.0)
    adm.request("s2", call(), 2.0)
    assert adm.cancel("s1", 2.5) is True
    assert adm.cancel("s1", 2.5) is False
    assert adm.next_deadline() == 7.0
    assert adm.cancel("s0", 3.0) is False  # admitted: CANCEL lost the race
    assert adm.cancel("unknown", 3.0) is False
    assert admitted_tickets(adm.release("s0", 4.0)) == ["s2"]
    assert adm.counters[("cancelled", "cancel", DEFAULT_TENANT)] == 1


@pytest.mark.parametrize(("close", "reason"), [
    (lambda adm: adm.set_health("agent", False), "unhealthy"),
    (lambda adm: adm.set_draining(True), "draining"),
    (lambda adm: adm.set_memory_ok(False), "memory"),
])
def test_closing_gate_makes_queued_calls_due_with_its_reason(close, reason):
    adm = make(max_sessions=1, queue_size=3, queue_timeout_s=30.0, retry_after_s=3)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 1.0)
    adm.request("s2", call(), 2.0)
    close(adm)
    assert adm.next_deadline() == 1.0
    assert adm.statistics().queued == 0
    assert adm.cancel("s2", 4.0) is True
    assert adm.release("s0", 4.5) == []
    assert adm.handle_timer(5.0) == [Refusal("s1", DEFAULT_TENANT, reason, 503, 3, 4.0)]
    assert adm.next_deadline() is None


def test_gate_reopened_before_timer_still_refuses_due_calls():
    adm = make(max_sessions=1, queue_size=1)
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 0.0)
    adm.set_draining(True)
    adm.set_draining(False)
    with pytest.raises(LocalProtocolError):
        adm.request("s1", call(), 0.5)
    assert [r.reason for r in adm.handle_timer(1.0)] == ["draining"]


# --- reload -------------------------------------------------------------------

def test_lowering_cap_ends_nobody_and_admits_nobody_until_below():
    adm = make(max_sessions=3, queue_size=2)
    for ticket in ("s1", "s2", "s3"):
        adm.request(ticket, call(), 0.0)
    adm.request("q1", call(), 0.0)
    assert adm.update_limits(AdmissionLimits(max_sessions=1, queue_size=2), 1.0) == []
    assert adm.statistics().active == 3
    assert adm.request("n1", call(), 1.0) == Queued("n1", DEFAULT_TENANT, 2)
    assert adm.release("s1", 2.0) == []
    assert adm.release("s2", 3.0) == []
    assert adm.release("s3", 4.0) == [Admitted("q1", DEFAULT_TENANT, 4.0)]


def test_raising_cap_admits_queued_at_once():
    adm = make(max_sessions=1, queue_size=3)
    adm.request("s0", call(), 0.0)
    adm.request("q1", call(), 1.0)
    adm.request("q2", call(), 1.0)
    got = adm.update_limits(AdmissionLimits(max_sessions=2, queue_size=3), 3.0)
    assert got == [Admitted("q1", DEFAULT_TENANT, 2.0)]
    got = adm.update_limits(AdmissionLimits(max_sessions=5, queue_size=3), 4.0)
    assert got == [Admitted("q2", DEFAULT_TENANT, 3.0)]
    assert adm.limits.max_sessions == 5


def test_reload_keeps_tenant_of_admitted_calls_and_reclassifies_queued():
    adm = make(max_sessions=2, queue_size=2, tenants=(A,))
    adm.request("a0", call("a"), 0.0)
    adm.request("a1", call("a"), 0.0)
    adm.request("a2", call("a"), 0.0)
    renamed = TenantRule("alpha", ruri_user="a", max_sessions=1)
    adm.update_limits(AdmissionLimits(max_sessions=2, queue_size=2, tenants=(renamed,)), 1.0)
    stats = adm.statistics()
    assert stats.by_tenant["a"] == TenantStatistics(active=2, queued=0, max_sessions=None)
    assert stats.by_tenant["alpha"] == TenantStatistics(active=0, queued=1, max_sessions=1)
    assert adm.release("a0", 2.0) == [Admitted("a2", "alpha", 2.0)]
    adm.release("a1", 3.0)
    assert "a" not in adm.statistics().by_tenant


def test_lowering_queue_size_keeps_queued_calls():
    adm = make(max_sessions=1, queue_size=2)
    adm.request("s0", call(), 0.0)
    adm.request("q1", call(), 0.0)
    adm.request("q2", call(), 0.0)
    adm.update_limits(AdmissionLimits(max_sessions=1, queue_size=1), 1.0)
    assert adm.statistics().queued == 2
    assert refusal_reason(adm.request("q3", call(), 1.0)) == "full"


# --- availability, statistics, counters ----------------------------------------

def test_availability():
    adm = make(max_sessions=1, queue_size=1)
    assert adm.availability() == (True, None)
    adm.request("s0", call(), 0.0)
    assert adm.availability() == (True, None)  # queue has room
    adm.request("s1", call(), 0.0)
    assert adm.availability() == (False, "full")
    adm.set_memory_ok(False)
    assert adm.availability() == (False, "memory")
    adm.set_draining(True)
    assert adm.availability() == (False, "draining")
    adm.set_health("sip", False)
    assert adm.availability() == (False, "unhealthy")


def test_availability_without_queue_and_ignoring_tenant_caps():
    adm = make(max_sessions=2, tenants=(replace(A, max_sessions=1),))
    adm.request("a0", call("a"), 0.0)
    assert adm.availability() == (True, None)
    adm.request("s1", call(), 0.0)
    assert adm.availability() == (False, "full")


def test_state_follows_availability_and_draining_wins():
    adm = make(max_sessions=1, queue_size=1)
    states = [adm.state()]
    adm.request("s0", call(), 0.0)
    adm.request("s1", call(), 0.0)  # queued: the queue is now full
    states.append(adm.state())
    adm.release("s0", 1.0)  # s1 takes the slot; the queue has room again
    adm.set_memory_ok(False)
    states.append(adm.state())
    adm.set_memory_ok(True)
    adm.set_health("records", False)
    states.append(adm.state())
    adm.set_draining(True)
    states.append(adm.state())
    adm.set_draining(False)
    adm.set_health("records", True)
    states.append(adm.state())
    assert states == ["admitting", "full", "full", "unhealthy", "draining", "admitting"]
    assert set(states) == set(ADMISSION_STATES)


def test_statistics_shape():
    adm = make(max_sessions=2, queue_size=4, tenants=(replace(A, max_sessions=1), B))
    adm.set_health("agent", True, "ok")
    adm.set_memory_ok(True, "rss 40 MiB")
    adm.request("a0", call("a"), 0.0)
    adm.request("a1", call("a"), 0.0)
    stats = adm.statistics()
    assert stats == AdmissionStatistics(
        active=1, queued=1, max_sessions=2, queue_size=4, draining=False,
        health={"agent": ComponentHealth(True, "ok")},
        memory_ok=True, memory_detail="rss 40 MiB",
        by_tenant={
            "a": TenantStatistics(active=1, queued=1, max_sessions=1),
            "b": TenantStatistics(active=0, queued=0, max_sessions=None),
            DEFAULT_TENANT: TenantStatistics(active=0, queued=0, max_sessions=None),
        },
        counters={("admitted", "ok", "a"): 1, ("queued", "tenant-full", "a"): 1},
    )
    adm.request("b0", call("b"), 0.0)
    assert stats.counters == {("admitted", "ok", "a"): 1, ("queued", "tenant-full", "a"): 1}


def test_every_decision_is_counted():
    adm = make(max_sessions=1, queue_size=2, queue_timeout_s=1.0)
    adm.request("s0", call(), 0.0)  # admitted
    adm.request("s1", call(), 0.0)  # queued
    adm.request("s2", call(), 0.0)  # queued
    adm.release("s0", 0.5)          # s1 dequeued
    adm.cancel("s2", 0.6)           # cancelled
    adm.request("s3", call(), 0.7)  # queued, then times out
    adm.handle_timer(2.0)
    adm.set_draining(True)
    adm.request("s4", call(), 2.0)
    d = DEFAULT_TENANT
    assert dict(adm.counters) == {
        ("admitted", "ok", d): 1, ("queued", "full", d): 3, ("dequeued", "ok", d): 1,
        ("cancelled", "cancel", d): 1, ("refused", "queue-timeout", d): 1,
        ("refused", "draining", d): 1,
    }


# --- property: never more than the caps, every call answered once ------------

TENANTS = (replace(A, max_sessions=3), replace(B, max_sessions=6), C)


def random_limits(rng: random.Random) -> AdmissionLimits:
    tenants = tuple(replace(t, max_sessions=rng.choice([None, 0, 1, 2, 4])) for t in TENANTS)
    return AdmissionLimits(
        max_sessions=rng.randint(0, 8), queue_size=rng.randint(0, 6),
        queue_timeout_s=rng.choice([0.5, 2.0, 5.0]),
        default_tenant_max_sessions=rng.choice([None, 1, 3]),
        tenants=tuple(t for t in tenants if rng.random() < 0.8),
    )


def check_invariants(adm: Admission, active: set[str], waiting: set[str], before_active: int,
                     before_by_tenant: dict[str, int]) -> None:
    """The caps hold (unless a reload lowered them: then no growth), the model matches."""
    stats = adm.statistics()
    limits = adm.limits
    assert stats.active == len(active)
    assert stats.queued <= len(waiting)  # the rest are due after a gate closed
    if len(active) > before_active:
        assert len(active) <= limits.max_sessions
    assert len(active) <= max(limits.max_sessions, before_active)
    assert sum(t.active for t in stats.by_tenant.values()) == len(active)
    for name, tenant in stats.by_tenant.items():
        if tenant.max_sessions is not None and before_by_tenant.get(name, 0) < tenant.active:
            assert tenant.active <= tenant.max_sessions
        # No queued call is left behind while it could be admitted.
        if tenant.queued and adm.availability()[1] not in ("unhealthy", "draining", "memory"):
            assert (len(active) >= limits.max_sessions
                    or (tenant.max_sessions is not None
                        and tenant.active >= tenant.max_sessions))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_interleaving_respects_caps(seed):
    rng = random.Random(seed)
    adm = Admission(AdmissionLimits(max_sessions=4, queue_size=4, queue_timeout_s=2.0,
                                    tenants=TENANTS))
    active: set[str] = set()
    waiting: set[str] = set()
    now = 0.0
    for step in range(4000):
        now += rng.choice([0.0, 0.01, 0.3])
        before_active = len(active)
        before_by_tenant = {n: t.active for n, t in adm.statistics().by_tenant.items()}
        op = rng.random()
        later: list[Decision] = []  # answers to calls that were queued
        if op < 0.4:
            ticket = f"t{step}"
            decision = adm.request(ticket, call(rng.choice("abcx")), now)
            if isinstance(decision, Queued):
                waiting.add(ticket)
                assert adm.statistics().queued <= adm.limits.queue_size
            elif isinstance(decision, Admitted):
                active.add(ticket)
        elif op < 0.65 and active:
            ticket = rng.choice(sorted(active))
            active.remove(ticket)
            later.extend(adm.release(ticket, now))
        elif op < 0.75 and waiting:
            ticket = rng.choice(sorted(waiting))
            assert adm.cancel(ticket, now) is True
            waiting.remove(ticket)
        elif op < 0.85:
            deadline = adm.next_deadline()
            later.extend(adm.handle_timer(now))
            assert not later or (deadline is not None and deadline <= now)
        elif op < 0.9:
            later.extend(adm.update_limits(random_limits(rng), now))
        else:
            gate = rng.choice(["health", "draining", "memory"])
            flag = rng.random() < 0.9  # gate open
            if gate == "health":
                adm.set_health(rng.choice(["sip", "agent"]), flag)
            elif gate == "draining":
                adm.set_draining(not flag)
            else:
                adm.set_memory_ok(flag)
        for answer in later:
            waiting.remove(answer.ticket)  # each queued call is answered once
            assert isinstance(answer, Admitted | Refusal) and answer.waited_s >= 0
            if isinstance(answer, Admitted):
                active.add(answer.ticket)
        # Tenants may only exceed their cap if they already did before this step.
        check_invariants(adm, active, waiting, before_active, before_by_tenant)
    # Every queued call gets exactly one answer in the end.
    leftover = {r.ticket for r in adm.handle_timer(now + 10.0)}
    assert leftover == waiting
    assert adm.next_deadline() is None
    for ticket in sorted(active):
        assert adm.release(ticket, now) == []
    assert adm.statistics().active == 0
    counters = adm.counters
    assert sum(v for (result, _, _), v in counters.items() if result == "admitted") > 100
    assert sum(v for (result, _, _), v in counters.items() if result == "dequeued") > 50
