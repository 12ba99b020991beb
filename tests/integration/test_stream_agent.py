"""The stream agent against a real Pipecat bot, through real SIP calls.

The bot (``tests/bots/pipecat_bot.py``, Pipecat's ``FastAPIWebsocketTransport``
with its ``TwilioFrameSerializer``) echoes the caller and reacts to keys (see
:mod:`tests.harness.bot`). Callers are :class:`tests.harness.phone.Phone` calls
whose RTP peer streams the speech clip or silence and presses RFC 4733 keys.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.audio import SpeechClip, compare_echo, frame_energy_dbfs
from tests.harness.bot import PipecatBot
from tests.harness.daemon import Daemon, free_udp_port, options_request, status_code
from tests.harness.phone import Call, Phone, RtpPeer, offer_telephone_event, press_keys
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, health_json, wait_until
from tests.integration.test_recovery import session_id, ulaw_clip, wait_event

TONE_DBFS = -30.0
"""The bot's tones are loud; the silence the caller sends is not."""
STREAM = {"connect_timeout_s": 2.0, "unhealthy_after_errors": 2, "probe_interval_s": 0.5,
          "ramp_step_s": 2.0}


@pytest.fixture
def bot(tmp_path: Path) -> Iterator[PipecatBot]:
    with PipecatBot("twilio", workdir=tmp_path / "bot") as running:
        yield running


def stream_config(*urls: str, **extra: Any) -> dict[str, Any]:
    return {
        "agent": {"kind": "stream"},
        "agent.stream": STREAM,
        "agent.providers": [{"name": f"bot-{i + 1}", "url": url} for i, url in enumerate(urls)],
        "timers": {"agent_response_s": 30, "media_inactivity_s": 30, "recovery_window_s": 5},
        **extra,
    }


def dead_url() -> str:
    """A WebSocket URL nobody listens on."""
    return f"ws://127.0.0.1:{free_udp_port()}/ws"


def call_with_keys(phone: Phone, user: str = "bot", source: bytes | None = None,
                   ) -> tuple[Call, RtpPeer]:
    peer = phone.rtp_peer()
    if source is not None:
        peer.play(source, loop=True)
    call, invite = phone.prepare(user, media=peer)
    phone.send(offer_telephone_event(invite))
    phone.wait_final([call])
    assert call.final_status == 200, call.final
    peer.resume()
    return call, peer


def loud_seconds(peer: RtpPeer, since: float) -> float:
    """How much of what the caller heard since ``since`` was the bot's tone."""
    return sum(0.02 for db in frame_energy_dbfs(peer.audio(since)) if db > TONE_DBFS)


def _start_of_connection(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "start" and e["conn"] == n


def _wait_bye(call: Call) -> None:
    wait_until(lambda: call.bye is not None, "the daemon's BYE", 10.0)


def _states(daemon: Daemon) -> dict[str, str]:
    return {p["name"]: p["state"] for p in ctl_json(daemon, "providers")}


def metric(daemon: Daemon, pattern: str) -> float:
    text: str = ctl_json(daemon, "metrics")["text"]
    match = re.search(rf"^{pattern} (\S+)$", text, re.M)
    return 0.0 if match is None else float(match.group(1))


def test_the_caller_talks_to_a_real_pipecat_bot(start_daemon: StartDaemon, bot: PipecatBot,
                                                clip: SpeechClip) -> None:
    daemon = start_daemon(stream_config(bot.url))
    with Phone(daemon) as phone:
        started = time.monotonic()
        call, peer = call_with_keys(phone, source=ulaw_clip(clip))
        sid = session_id(daemon, call)
        start = bot.wait_event("start")
        params = start["custom_parameters"]
        assert params["call_id"] == call.call_id and params["session_id"] == sid
        assert params["transport"] == "sip" and params["tenant"] == "default"
        assert params["from"].startswith("sip:") and params["to"].startswith("sip:bot@")
        assert start["media_format"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                         "channels": 1}
        time.sleep(clip.duration_s + 1.5)
        match = compare_echo(peer.audio(started), clip.pcm16)
        # Not the envelope at one lag: a frame the jitter buffer inserts or drops
        # under load moves the rest of the echo (EchoMatch).
        assert match.segments_matched >= 0.7, match
        media = bot.events(lambda e: e["event"] == "raw" and e.get("kind") == "media")
        assert media and all(m["bytes"] == 160 and m["track"] == "inbound" for m in media[:50])
        chunks = [int(m["chunk"]) for m in media[:50]]
        assert chunks == list(range(chunks[0], chunks[0] + len(chunks)))
        phone.hang_up(call)
        end = wait_event(daemon, "call_end", sid, 5.0)
        assert end["reason"] == "bye"
    bot.wait_event(lambda e: e["event"] == "raw" and e.get("kind") == "stop")
    assert metric(daemon, r'voxgate_provider_sessions_total\{provider="bot-1",result="ok"\}') \
        == 0  # the caller hung up, not the bot
    assert metric(daemon, r'voxgate_provider_up\{provider="bot-1"\}') == 1


def test_keys_marks_clear_and_the_bot_hanging_up(start_daemon: StartDaemon,
                                                 bot: PipecatBot) -> None:
    daemon = start_daemon(stream_config(bot.url))
    with Phone(daemon) as phone:
        call, peer = call_with_keys(phone)
        sid = session_id(daemon, call)
        bot.wait_event("start")
        press_keys(peer, "5")
        assert bot.wait_event("dtmf")["digit"] == "5"
        # #: three seconds of tone, cleared by the bot after half a second. (First: Pipecat
        # queues its echo of the caller behind its own tones, so after the mark's second of
        # tone its output runs a second behind and a later tone would be cleared unsent.)
        since = time.monotonic()
        press_keys(peer, "#")
        bot.wait_event("interrupt")
        time.sleep(3.5)
        heard = loud_seconds(peer, since)
        assert 0.2 <= heard <= 1.5, heard
        # 1: a second of tone, then a mark that comes back once the tone has played.
        press_keys(peer, "1")
        bot.wait_event("mark_queued")
        echoed = bot.wait_event(lambda e: e["event"] == "raw" and e.get("kind") == "mark")
        assert echoed["name"] == "m1"
        shown = ctl_json(daemon, "show", sid)["agent"]
        assert shown["provider"] == "bot-1" and shown["marks_acknowledged"] == 1, shown
        # *: the bot ends its pipeline and closes the socket: the call is hung up.
        press_keys(peer, "*")
        end = wait_event(daemon, "call_end", sid, 10.0)
        assert end["reason"] == "agent-hangup", end
        _wait_bye(call)
    assert metric(daemon, r'voxgate_provider_sessions_total\{provider="bot-1",result="ok"\}') == 1


def test_failover_to_the_second_provider_and_health(start_daemon: StartDaemon,
                                                    bot: PipecatBot) -> None:
    daemon = start_daemon(stream_config(dead_url(), bot.url))
    with Phone(daemon) as phone:
        for n in range(3):
            call, _ = call_with_keys(phone)
            start = bot.wait_event(_start_of_connection(n + 1))
            assert start["custom_parameters"]["call_id"] == call.call_id
            phone.hang_up(call)
    providers = {p["name"]: p for p in ctl_json(daemon, "providers")}
    assert providers["bot-1"]["state"] == "unhealthy", providers
    assert providers["bot-2"]["state"] == "healthy", providers
    assert metric(daemon, r'voxgate_provider_up\{provider="bot-1"\}') == 0
    assert metric(daemon, r'voxgate_provider_errors_total\{kind="connect",provider="bot-1"\}') >= 2
    health = health_json(daemon)
    assert health["components"]["providers"]["healthy"] is True


def test_a_lost_bot_is_replaced_mid_call_with_a_resumed_start(
        start_daemon: StartDaemon, tmp_path: Path) -> None:
    with PipecatBot("twilio", workdir=tmp_path / "a") as first, \
            PipecatBot("twilio", workdir=tmp_path / "b") as second:
        daemon = start_daemon(stream_config(first.url, second.url))
        with Phone(daemon) as phone:
            call, peer = call_with_keys(phone)
            sid = session_id(daemon, call)
            first.wait_event("start")
            first.kill()
            resumed = second.wait_event("start", timeout_s=10)
            assert resumed["custom_parameters"]["resumed"] == "true"
            assert resumed["custom_parameters"]["call_id"] == call.call_id
            press_keys(peer, "5")
            assert second.wait_event("dtmf")["digit"] == "5"
            assert ctl_json(daemon, "show", sid)["agent"]["resumes"] == 1
            phone.hang_up(call)
            assert wait_event(daemon, "call_end", sid, 5.0)["reason"] == "bye"


def test_every_provider_down_refuses_calls_and_options_then_ramps_back(
        start_daemon: StartDaemon, tmp_path: Path) -> None:
    port = free_udp_port()
    daemon = start_daemon(stream_config(f"ws://127.0.0.1:{port}/ws"))
    with Phone(daemon) as phone:
        for _ in range(2):  # unhealthy_after_errors
            answered = phone.call("bot")
            assert answered.final_status == 200, answered.final
            _wait_bye(answered)
        wait_until(lambda: health_json(daemon)["components"]["providers"]["healthy"]
                   is False, "providers unhealthy", 10.0)
        refused = phone.call("bot")
        assert refused.final_status == 503, refused.final
        port_out = free_udp_port()
        (options,) = daemon.exchange(options_request(daemon.sip_port, port_out, "stream-opt-1"),
                                     source_port=port_out)
        assert status_code(options) == 503 and b"unhealthy" in options, options
        with PipecatBot("twilio", port=port, workdir=tmp_path / "bot"):
            wait_until(lambda: _states(daemon)["bot-1"] in ("ramping", "healthy"),
                       "the probe sees the bot", 10.0)
            back = phone.call("bot")
            assert back.final_status == 200, back.final
            phone.hang_up(back)


def test_each_tenant_reaches_its_own_bot(start_daemon: StartDaemon, tmp_path: Path) -> None:
    with PipecatBot("twilio", workdir=tmp_path / "a") as acme_bot, \
            PipecatBot("twilio", workdir=tmp_path / "b") as other_bot:
        config = stream_config(acme_bot.url, other_bot.url)
        config["tenants"] = [{"name": "acme", "ruri_user": "acme", "providers": ["bot-1"]},
                             {"name": "globex", "ruri_user": "globex", "providers": ["bot-2"]},
                             {"name": "echoes", "ruri_user": "echo", "agent": "echo"}]
        daemon = start_daemon(config)
        with Phone(daemon) as phone:
            for user, bot in (("acme", acme_bot), ("globex", other_bot)):
                call, _ = call_with_keys(phone, user)
                start = bot.wait_event("start")
                assert start["custom_parameters"]["tenant"] == user
                phone.hang_up(call)
            echo, peer = call_with_keys(phone, "echo", source=bytes(range(1, 161)) * 50)
            wait_until(lambda: len(peer.echoed()) > 10, "the echo tenant's echo", 5.0)
            phone.hang_up(echo)
        assert len(acme_bot.events("start")) == 1 and len(other_bot.events("start")) == 1
