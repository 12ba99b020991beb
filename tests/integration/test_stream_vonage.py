"""The stream agent's ``vonage`` protocol against a real Pipecat bot, through real SIP calls.

The bot (``tests/bots/pipecat_bot.py --protocol vonage``: Pipecat's
``FastAPIWebsocketTransport`` with its ``VonageFrameSerializer``) runs its pipeline at the
provider's ``sample_rate_hz``, 8000 or 16000 (every test runs at both), echoes the caller
and reacts to keys as in :mod:`tests.integration.test_stream_agent`, whose helpers these
tests share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.audio import SpeechClip, compare_echo
from tests.harness.bot import PipecatBot
from tests.harness.phone import Phone, press_keys
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json
from tests.integration.test_recovery import session_id, ulaw_clip, wait_event
from tests.integration.test_stream_agent import (
    _wait_bye,
    call_with_keys,
    loud_seconds,
    metric,
    stream_config,
)

RESAMPLING_S = 0.3
"""What the 16 kHz resamplers add to the echo's round trip, with margin."""


@pytest.fixture(params=[8000, 16000], ids=["8khz", "16khz"])
def bot(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PipecatBot]:
    with PipecatBot("vonage", sample_rate=request.param, workdir=tmp_path / "bot") as running:
        yield running


def vonage_config(bot: PipecatBot) -> dict[str, Any]:
    """:func:`stream_config` with the bot as a ``vonage`` provider at its rate."""
    config = stream_config(bot.url)
    config["agent.providers"][0].update(protocol="vonage", sample_rate_hz=bot.sample_rate)
    return config


def test_the_caller_talks_to_a_pipecat_vonage_bot(start_daemon: StartDaemon, bot: PipecatBot,
                                                  clip: SpeechClip) -> None:
    daemon = start_daemon(vonage_config(bot))
    with Phone(daemon) as phone:
        started = time.monotonic()
        call, peer = call_with_keys(phone, source=ulaw_clip(clip))
        sid = session_id(daemon, call)
        connected = bot.wait_event("connected")
        assert connected["content_type"] == f"audio/l16;rate={bot.sample_rate}"
        assert connected["rate_ok"] is True
        fields = bot.wait_event(lambda e: e["event"] == "raw"
                                and e.get("kind") == "websocket:connected")
        assert fields["call_id"] == call.call_id and fields["session_id"] == sid
        assert fields["transport"] == "sip" and fields["tenant"] == "default"
        assert fields["from"].startswith("sip:") and fields["to"].startswith("sip:bot@")
        time.sleep(clip.duration_s + 1.5 + RESAMPLING_S)
        match = compare_echo(peer.audio(started), clip.pcm16)
        # Not the envelope at one lag: a frame the jitter buffer inserts or drops
        # under load moves the rest of the echo (EchoMatch).
        assert match.segments_matched >= 0.7, match
        audio = bot.events(lambda e: e["event"] == "raw" and e.get("kind") == "audio")
        assert len(audio) >= 50
        assert {m["bytes"] for m in audio} == {bot.sample_rate * 2 // 50}  # 20 ms of PCM16
        phone.hang_up(call)
        end = wait_event(daemon, "call_end", sid, 5.0)
        assert end["reason"] == "bye"
    closed = bot.wait_event("closed")
    assert closed["by"] == "peer", closed
    assert metric(daemon, r'voxgate_provider_up\{provider="bot-1"\}') == 1


def test_keys_notify_clear_and_the_bot_hanging_up(start_daemon: StartDaemon,
                                                  bot: PipecatBot) -> None:
    daemon = start_daemon(vonage_config(bot))
    with Phone(daemon) as phone:
        call, peer = call_with_keys(phone)
        sid = session_id(daemon, call)
        bot.wait_event("connected")
        press_keys(peer, "5")
        assert bot.wait_event("dtmf")["digit"] == "5"
        raw = bot.wait_event(lambda e: e["event"] == "raw" and e.get("kind") == "websocket:dtmf")
        assert raw["digit"] == "5" and isinstance(raw["duration"], int)
        # #: three seconds of tone, cleared by the bot after half a second (first, as in
        # the Twilio test: Pipecat's echo queues behind its own tones).
        since = time.monotonic()
        press_keys(peer, "#")
        bot.wait_event("interrupt")
        time.sleep(3.5)
        heard = loud_seconds(peer, since)
        assert 0.2 <= heard <= 1.5, heard
        # 1: a second of tone, then a notify that comes back once the tone has played.
        press_keys(peer, "1")
        bot.wait_event("mark_queued")
        echoed = bot.wait_event(lambda e: e["event"] == "raw"
                                and e.get("kind") == "websocket:notify")
        assert echoed["payload"] == {"name": "m1"}
        shown = ctl_json(daemon, "show", sid)["agent"]
        assert shown["marks_received"] == shown["marks_acknowledged"] == 1, shown
        assert shown["messages_dropped"] == {}, shown
        # *: the bot ends its pipeline and closes the socket: the call is hung up.
        press_keys(peer, "*")
        end = wait_event(daemon, "call_end", sid, 10.0)
        assert end["reason"] == "agent-hangup", end
        _wait_bye(call)
    assert metric(daemon, r'voxgate_provider_sessions_total\{provider="bot-1",result="ok"\}') == 1
