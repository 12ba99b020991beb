"""The local agent's webhook fails over, through real SIP calls.

``[agent.webhook] urls`` lists two webhooks served by the test (the helpers of
:mod:`tests.integration.test_local_agent`); the first is not listening at
first, so every turn is answered by the second and the first shows unhealthy
in ``voxgatectl providers``; once it listens, its probe brings it back and it
answers again.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from tests.harness import requires
from tests.harness.daemon import Daemon
from tests.harness.phone import Phone
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, ctl_ok, health_json, wait_until
from tests.integration.test_local_agent import (
    AGENT_RESPONSE_S,
    MAIN_PROMPT,
    MORE_PROMPT,
    WEBHOOK_SAY,
    Hook,
    _call,
    _heard,
    _say,
    _turns,
    _wait_reply,
    _webhook,
)

pytestmark = requires("espeak-ng")

HEALTH = {"unhealthy_after_errors": 2, "probe_interval_s": 0.5, "ramp_shares": [1.0]}
"""Out after two errors in a row, probed every 0.5 s, healthy again at once."""


class _late_webhook(_webhook):
    """test_local_agent's webhook, its port taken now but listened on only in ``with``
    (until then a connection to it is refused)."""

    def __init__(self, hook: Hook) -> None:
        super().__init__(hook)
        self._server.socket.close()

    def __enter__(self) -> None:
        server = self._server
        server.socket = socket.socket(server.address_family, server.socket_type)
        server.server_bind()
        server.server_activate()
        super().__enter__()


def _providers(daemon: Daemon) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in ctl_json(daemon, "providers")}


def _reload(daemon: Daemon, old: str, new: str) -> dict[str, dict[str, Any]]:
    """Edit the daemon's config file (``old`` → ``new``), reload: the providers after."""
    text = daemon.config_path.read_text()
    assert old in text, text
    daemon.config_path.write_text(text.replace(old, new, 1))
    ctl_ok(daemon, "reload")
    return _providers(daemon)


def test_turns_fail_over_to_the_second_url_and_the_first_comes_back(
        start_daemon: StartDaemon) -> None:
    first, second = Hook(), Hook()
    late = _late_webhook(first)
    with _webhook(second):
        daemon = start_daemon({
            "agent": {"kind": "local"},
            "agent.webhook": {"urls": [first.url, second.url]},
            "agent.stream": HEALTH,
            "timers": {"agent_response_s": AGENT_RESPONSE_S, "media_inactivity_s": 30},
            "vad": {"stop_ms": 500},
            "rtp": {"jitter_buffer_ms": 100},
        })
        with Phone(daemon) as phone:
            peer, call = _call(phone)
            _wait_reply(peer, call.final_at or 0.0)
            reply = _say(peer, "agent")
            _say(peer, "agent")
            providers = _providers(daemon)
            health = health_json(daemon)
            text = ctl_ok(daemon, "providers")
            metrics = ctl_json(daemon, "metrics")["text"]

            with late:
                wait_until(lambda: _providers(daemon)["webhook-1"]["state"] == "healthy",
                           "the probe of webhook-1", 10.0)
                posts_before = len(second.posts)
                _say(peer, "agent")
            phone.hang_up(call)
        kept = _reload(daemon, 'kind = "local"', 'kind = "local"\nrate_wpm = 170')
        replaced = _reload(daemon, f'"{first.url}", ', "")

    said = f"{WEBHOOK_SAY} {MAIN_PROMPT}"
    assert _heard(reply, [said, MAIN_PROMPT, MORE_PROMPT]) == said
    turns = _turns(daemon, call)
    assert [t.get("source") for t in turns[1:]] == ["webhook"] * 3, turns
    assert not any("integrator_error" in t for t in turns)

    # Both turns before the first webhook listened went to the second.
    assert len(second.posts) == posts_before == 2
    assert all(p["call"] == call.call_id for p in second.posts)
    # The webhook hears each turn's free-form transcript, as logged.
    assert [p["transcript"] for p in second.posts] == [t["transcript"] for t in turns[1:3]]
    one, two = providers["webhook-1"], providers["webhook-2"]
    assert (one["state"], two["state"]) == ("unhealthy", "healthy")
    assert one["sessions"] == {"failover": 2} and two["sessions"] == {"ok": 2}
    assert set(one["errors"]) <= {"connect", "probe"} and one["errors"]["connect"] == 2
    assert re.search(r"^webhook-1\s+unhealthy\b", text, re.M), text
    assert health["components"]["webhook"] == {"healthy": True, "detail": ""}
    assert health["healthy"] is True
    assert re.search(r'^voxgate_provider_up\{provider="webhook-1"\} 0', metrics, re.M)
    assert re.search(r'^voxgate_provider_up\{provider="webhook-2"\} 1', metrics, re.M)

    # Back after its probe: first in line again.
    assert [p["transcript"] for p in first.posts] == [turns[3]["transcript"]]
    assert len(second.posts) == 2
    changes = [(e["provider"], e["state"]) for e in daemon.events("provider_state")]
    assert changes == [("webhook-1", "unhealthy"), ("webhook-1", "healthy")], changes

    # A reload keeps the URLs' health unless it changes them (or the health keys).
    assert kept["webhook-1"]["sessions"] == {"failover": 2, "ok": 1}
    assert kept["webhook-2"]["sessions"] == {"ok": 2}
    assert list(replaced) == ["webhook-1"]
    assert (replaced["webhook-1"]["state"], replaced["webhook-1"]["sessions"]) == ("healthy", {})
