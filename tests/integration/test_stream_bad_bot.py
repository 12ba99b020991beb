"""The stream agent against a bot that breaks the protocol, through real SIP calls.

The bot is :class:`tests.harness.hostile_bot.HostileBot` (``tests/bots/hostile_bot.py``):
a call to ``sip:MODE@…`` makes it misbehave in that mode once the stream has started,
then echo the caller. The caller is a :class:`tests.harness.phone.Phone` call streaming
the looped speech clip, so "the call goes on" means: frames sent after the misbehaviour
come back through voxgate and the bot (:meth:`~tests.harness.phone.RtpPeer.echoed`).

What these tests prove, against ``[agent.stream]`` and ``[budget]`` (see
:mod:`voxgate.agents.stream`):

- malformed JSON, unknown events, bad base64 and a flood over ``max_messages_per_s`` are
  dropped and counted (``voxgate_bot_messages_dropped_total{reason}``: ``malformed`` or
  ``rate``), the ``bot_message_dropped`` warning is logged once per call with its Call-ID,
  and the call goes on;
- a message over ``max_message_bytes`` ends that connection (1009) and the agent
  reconnects with a resumed ``start``; the call goes on;
- a bot that sends audio without end is bounded: with the default budget the call's
  total crosses ``session_bytes`` and the call ends with reason ``budget`` after the
  grace; with a playout cap below ``session_bytes`` the queue drops its oldest audio and
  the call goes on at a flat RSS;
- afterwards the same daemon serves a normal call to a real Pipecat bot.

A bot that breaks *every* connection is reconnected at most every ``RECONNECT_PAUSE_S``
and the call ends ``provider-lost`` when the recovery window runs out (no storm, no
``error``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.audio import SpeechClip
from tests.harness.bot import PipecatBot
from tests.harness.daemon import Daemon
from tests.harness.hostile_bot import HostileBot, Mode
from tests.harness.phone import Call, Phone, RtpPeer
from tests.integration.conftest import StartDaemon
from tests.integration.test_budget import MIB, rss_bytes
from tests.integration.test_control import ctl_json, health_json, wait_until
from tests.integration.test_recovery import (
    LATE_S,
    hang_up_with_bye,
    session_id,
    ulaw_clip,
    wait_echo,
    wait_event,
)
from tests.integration.test_recovery import metric as sample
from tests.integration.test_stream_agent import call_with_keys, loud_seconds, stream_config
from voxgate.agents.stream import RECONNECT_PAUSE_S

BURST = 20
"""Messages per malformed/unknown/bad-media burst."""
FLOOD = 1000
"""Messages the flood sends at once."""
RATE = 200
"""``[agent.stream] max_messages_per_s`` (the default, set explicitly)."""
MAX_MESSAGE_BYTES = 65_536
"""``[agent.stream] max_message_bytes`` (the default, set explicitly)."""
SESSION_BYTES = 256 * 1024
"""``[budget] session_bytes`` (the default, set explicitly)."""
GRACE_MS = 2000
PLAYOUT_MS = 30_000
"""``[budget] playout_ms`` (the default, set explicitly): its cap is above ``session_bytes``."""
PLAYOUT_CAP_MS = 2000
"""The capped-playout case: 32 KiB of PCM16, well below ``session_bytes``."""
PCM_BYTES_PER_MS = 16
JITTER_CAP_BYTES = 200 * 8
"""The harness's ``[rtp] jitter_buffer_max_ms`` of G.711."""
ENDLESS_RUN_S = 8.0
"""How long the capped-playout call takes endless audio (80 s of it at ten times real time)."""
RSS_GROWTH_LIMIT_BYTES = 4 * MIB
"""How far the daemon's RSS may rise while one call takes endless audio."""
PROVIDER = "bot-1"
STORM_WATCH_S = 3.0
"""How long a bot that breaks every connection is watched."""


def dropped(daemon: Daemon, reason: str) -> float:
    """``voxgate_bot_messages_dropped_total`` of the hostile bot's provider for ``reason``."""
    return sample(daemon, "voxgate_bot_messages_dropped_total"
                          f'{{provider="{PROVIDER}",reason="{reason}"}}')


def bad_bot_config(url: str, **extra: Any) -> dict[str, Any]:
    """The stream agent towards ``url`` with the bounds above written out."""
    config = stream_config(url, **extra)
    config["agent.stream"] = {**config["agent.stream"], "max_messages_per_s": RATE,
                              "max_message_bytes": MAX_MESSAGE_BYTES}
    return config


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileBot]:
    with HostileBot(count=BURST, flood_count=FLOOD, max_message_bytes=MAX_MESSAGE_BYTES,
                    workdir=tmp_path / "hostile") as running:
        yield running


def misbehaving_call(phone: Phone, daemon: Daemon, bot: HostileBot, mode: Mode,
                     clip: SpeechClip) -> tuple[Call, RtpPeer, str]:
    """A call that makes ``bot`` misbehave in ``mode``, once the bot says it has sent its
    burst (has started, for ``endless``); returns the call, its peer (streaming the looped
    clip) and its session id."""
    call, peer = call_with_keys(phone, mode, source=ulaw_clip(clip))
    sid = session_id(daemon, call)
    start = bot.wait_event(lambda e: e["event"] == "start"
                           and e["custom_parameters"].get("call_id") == call.call_id)
    assert start["mode"] == mode, start
    if mode not in ("endless", "echo"):
        bot.wait_event(lambda e: e["event"] == "burst_done" and e["conn"] == start["conn"])
    return call, peer, sid


def test_garbage_is_dropped_counted_and_logged_once_per_call(
        start_daemon: StartDaemon, hostile: HostileBot, clip: SpeechClip) -> None:
    daemon = start_daemon(bad_bot_config(hostile.url))
    modes: tuple[Mode, ...] = ("malformed", "unknown", "badmedia", "flood")
    calls: dict[Mode, Call] = {}
    with Phone(daemon) as phone:
        for mode in modes:
            call, peer, sid = misbehaving_call(phone, daemon, hostile, mode, clip)
            after = time.monotonic()
            wait_echo(peer, after)  # the bot's echo still reaches the caller
            assert [s["id"] for s in ctl_json(daemon, "sessions")] == [sid]
            agent = ctl_json(daemon, "show", sid)["agent"]
            assert agent["resumes"] == 0 and sum(agent["messages_dropped"].values()) > 0, agent
            hang_up_with_bye(phone, daemon, call, sid)
            calls[mode] = call
    assert dropped(daemon, "malformed") == 3 * BURST
    # The flood lands in one or two of the agent's one-second rate windows.
    assert FLOOD - 2 * RATE <= dropped(daemon, "rate") <= FLOOD, dropped(daemon, "rate")
    warnings = daemon.events("bot_message_dropped")
    assert sorted(w["call_id"] for w in warnings) == sorted(c.call_id for c in calls.values())
    by_call = {w["call_id"]: w for w in warnings}
    for mode, call in calls.items():
        warning = by_call[call.call_id]
        assert warning["provider"] == PROVIDER, warning
        assert ("(rate)" if mode == "flood" else "(malformed)") in warning["msg"], warning
    assert {e["reason"] for e in daemon.events("call_end")} == {"bye"}


def test_an_oversized_message_ends_the_connection_and_the_call_resumes(
        start_daemon: StartDaemon, hostile: HostileBot, clip: SpeechClip) -> None:
    daemon = start_daemon(bad_bot_config(hostile.url))
    with Phone(daemon) as phone:
        call, peer, sid = misbehaving_call(phone, daemon, hostile, "oversize", clip)
        closed = hostile.wait_event(lambda e: e["event"] == "closed" and e["conn"] == 1)
        assert closed["code"] == 1009, closed
        resumed = hostile.wait_event(lambda e: e["event"] == "start" and e["conn"] == 2)
        assert resumed["resumed"] is True and resumed["mode"] == "echo", resumed
        assert resumed["custom_parameters"]["call_id"] == call.call_id
        wait_echo(peer, time.monotonic())
        agent = ctl_json(daemon, "show", sid)["agent"]
        assert agent["resumes"] == 1 and agent["provider"] == PROVIDER, agent
        hang_up_with_bye(phone, daemon, call, sid)
    assert sample(daemon, "voxgate_provider_sessions_total"
                          f'{{provider="{PROVIDER}",result="dropped"}}') == 1
    assert dropped(daemon, "malformed") == 0 and dropped(daemon, "rate") == 0


def test_endless_audio_ends_the_call_by_its_budget(
        start_daemon: StartDaemon, hostile: HostileBot, clip: SpeechClip) -> None:
    daemon = start_daemon(bad_bot_config(hostile.url, budget={
        "session_bytes": SESSION_BYTES, "budget_grace_ms": GRACE_MS, "playout_ms": PLAYOUT_MS}))
    time.sleep(1.0)  # the daemon settles after READY
    rss_before = rss_bytes(daemon)
    with Phone(daemon) as phone:
        call, _, sid = misbehaving_call(phone, daemon, hostile, "endless", clip)
        hostile.wait_event("endless_started")
        bye = phone.wait_bye(call, GRACE_MS / 1000 + 3 * LATE_S)
        assert b"X-Voxgate-Reason: budget" in bye, bye
        assert call.bye_at is not None and call.final_at is not None
        assert GRACE_MS / 1000 <= call.bye_at - call.final_at <= GRACE_MS / 1000 + 2 * LATE_S
        end = wait_event(daemon, "call_end", sid, LATE_S)
        closed = hostile.wait_event("closed")
    assert end["reason"] == "budget", end
    peak_limit = PLAYOUT_MS * PCM_BYTES_PER_MS + JITTER_CAP_BYTES + 2 * PCM_BYTES_PER_MS * 20
    assert SESSION_BYTES < int(end["peak_bytes"]) <= peak_limit, end
    sent_bytes = closed["messages_out"] * hostile.chunk_s * 1000 * PCM_BYTES_PER_MS
    assert sent_bytes > 2 * SESSION_BYTES, closed  # far more than the session may hold
    assert rss_bytes(daemon) - rss_before <= RSS_GROWTH_LIMIT_BYTES


def test_endless_audio_under_a_playout_cap_is_dropped_at_a_flat_rss(
        start_daemon: StartDaemon, hostile: HostileBot, clip: SpeechClip) -> None:
    daemon = start_daemon(bad_bot_config(hostile.url, budget={"playout_ms": PLAYOUT_CAP_MS}))
    cap_bytes = PLAYOUT_CAP_MS * PCM_BYTES_PER_MS
    time.sleep(1.0)
    rss_before = rss_bytes(daemon)
    with Phone(daemon) as phone:
        call, peer, sid = misbehaving_call(phone, daemon, hostile, "endless", clip)
        hostile.wait_event("endless_started")
        since = time.monotonic()
        rss_peak = rss_before
        until = time.monotonic() + ENDLESS_RUN_S
        while time.monotonic() < until:
            rss_peak = max(rss_peak, rss_bytes(daemon))
            time.sleep(0.2)
        info = ctl_json(daemon, "show", sid)
        playout = info["budget"]["buffers"]["playout"]
        assert call.bye is None, "the call goes on"
        assert 0 < playout["held_bytes"] <= cap_bytes, playout
        # Ten times real time in, once out: about nine tenths are dropped, surely half.
        assert playout["drops_frames"] >= ENDLESS_RUN_S / 0.02 * 10 / 2, playout
        assert loud_seconds(peer, since) >= ENDLESS_RUN_S / 2, "the caller hears the tone"
        hang_up_with_bye(phone, daemon, call, sid)
    assert sample(daemon, 'voxgate_budget_drops_total{buffer="playout"}') > 0
    assert rss_peak - rss_before <= RSS_GROWTH_LIMIT_BYTES, (rss_before, rss_peak)


def test_the_daemon_serves_a_normal_bot_after_a_hostile_one(
        start_daemon: StartDaemon, hostile: HostileBot, clip: SpeechClip,
        tmp_path: Path) -> None:
    with PipecatBot("twilio", workdir=tmp_path / "pipecat") as pipecat:
        config = bad_bot_config(hostile.url)
        config["agent.providers"] = [{"name": PROVIDER, "url": hostile.url},
                                     {"name": "pipecat", "url": pipecat.url}]
        config["tenants"] = [{"name": "normal", "ruri_user": "normal",
                              "providers": ["pipecat"]}]
        daemon = start_daemon(config)
        with Phone(daemon) as phone:
            for mode in ("malformed", "flood", "oversize"):
                call, _, sid = misbehaving_call(phone, daemon, hostile, mode, clip)
                phone.hang_up(call)
                wait_event(daemon, "call_end", sid, 5.0)
            call, peer = call_with_keys(phone, "normal", source=ulaw_clip(clip))
            sid = session_id(daemon, call)
            start = pipecat.wait_event("start")
            assert start["custom_parameters"]["call_id"] == call.call_id
            wait_echo(peer, time.monotonic())
            hang_up_with_bye(phone, daemon, call, sid)
        assert daemon.alive()
        assert health_json(daemon)["components"]["providers"]["healthy"] is True
        wait_until(lambda: not ctl_json(daemon, "sessions"), "no session left", 5.0)


def test_a_bot_that_breaks_every_connection_is_reconnected_at_a_paced_rate(
        start_daemon: StartDaemon, clip: SpeechClip, tmp_path: Path) -> None:
    with HostileBot(resumed_mode="oversize", max_message_bytes=MAX_MESSAGE_BYTES,
                    workdir=tmp_path / "hostile") as bot:
        daemon = start_daemon(bad_bot_config(bot.url))
        with Phone(daemon) as phone:
            call, _ = call_with_keys(phone, "oversize", source=ulaw_clip(clip))
            bot.wait_event("start")
            time.sleep(STORM_WATCH_S)
            connections = len(bot.events("start"))
            ended = [e["reason"] for e in daemon.events("call_end")
                     if e["call_id"] == call.call_id]
            if call.bye is None:
                phone.hang_up(call)
    assert connections <= STORM_WATCH_S / RECONNECT_PAUSE_S + 2, connections
    assert ended in ([], ["provider-lost"]), ended
