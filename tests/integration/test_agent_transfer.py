"""Transfer to a human started by the agent: a local menu's ``transfer`` choice, a
webhook's ``transfer`` reply, a stream bot's ``transfer`` message.

SIPp calls voxgated (``[agent] kind = "local"``), presses 1 (RFC 4733) and,
as the transferee, answers the agent's REFER 202 and reports the outcome by
one NOTIFY (``message/sipfrag``, RFC 3515 §2.4.5): a 200 ends the call with
reason ``transferred``; a 486 is told to the menu, which speaks its
``transfer_failed_say`` and the step's prompt again while the call goes on.
The real Pipecat bot (:mod:`tests.harness.bot`) asks for the transfer on key 1
and gets voxgate's ``transfer_failed`` event when it fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import requires
from tests.harness.bot import PipecatBot
from tests.harness.daemon import Daemon, PortRange, free_udp_port
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, ctl_ok, wait_until
from tests.integration.test_local_agent import Hook, _webhook
from tests.integration.test_stream_agent import stream_config

pytestmark = requires("sipp", "espeak-ng")

HUMAN = "sip:human@127.0.0.1:5999"
FAILED_SAY = "Nobody is free."
PROMPT = "Press one for a human."
MENU: dict[str, Any] = {
    "agent": {"kind": "local"},
    "agent.menu": {"greeting": "Hello.", "start": "main", "transfer_failed_say": FAILED_SAY},
    "agent.menu.steps": [{"name": "main", "prompt": PROMPT}],
    "agent.menu.steps.choices": [
        {"dtmf": "1", "say": "Connecting you.", "transfer": HUMAN},
        {"dtmf": "9", "say": "Goodbye.", "hangup": True},
    ],
    "timers": {"media_inactivity_s": 60},
}
RUN_S = 40


def call(start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
         sipfrag: str, config: dict[str, Any] = MENU,
         substate: str = "terminated;reason=noresource") -> tuple[Daemon, Sipp]:
    """The daemon with ``config``, and SIPp calling it (press 1, NOTIFY ``sipfrag`` with
    ``Subscription-State: substate``)."""
    daemon = start_daemon(config)
    caller = Sipp("uac_transferee_dtmf.xml", daemon.sip_address, workdir=tmp_path / "caller",
                  local_port=free_udp_port(), media_port=reserve_ports(4).first,
                  timeout_s=RUN_S,
                  extra_args=["-key", "sipfrag", sipfrag, "-key", "substate", substate])
    caller.start()
    return daemon, caller


def test_menu_choice_transfers_the_caller(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon, caller = call(start_daemon, reserve_ports, tmp_path, "200 OK")
    turn = daemon.wait_log(r"event=agent_turn\b.*\bdtmf=1\b.*", timeout_s=30)
    assert f"transfer={HUMAN}" in turn.group(0), turn.group(0)
    daemon.wait_log(r"event=sip_transfer_started\b", timeout_s=15)
    daemon.wait_log(r"event=sip_transfer_succeeded\b.*\bstatus=200\b", timeout_s=15)
    daemon.wait_log(r"event=call_end\b.*\breason=transferred\b", timeout_s=10)
    sipp = caller.wait()
    assert sipp.successful_calls == 1, sipp.describe()
    metrics = ctl_ok(daemon, "metrics")
    assert 'voxgate_sip_transfers_total{outcome="succeeded"} 1' in metrics


def test_a_webhook_reply_transfers_the_caller(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    hook = Hook(always={"say": "One moment please.", "transfer": HUMAN})
    menu = {**MENU, "agent.menu.steps.choices": [{"dtmf": "1", "say": "You pressed one."}]}
    with _webhook(hook):
        daemon, caller = call(start_daemon, reserve_ports, tmp_path, "200 OK",
                              {**menu, "agent.webhook": {"url": hook.url}})
        turn = daemon.wait_log(r"event=agent_turn\b.*\bdtmf=1\b.*", timeout_s=30)
        assert "source=webhook" in turn.group(0) and f"transfer={HUMAN}" in turn.group(0), (
            turn.group(0))
        daemon.wait_log(r"event=call_end\b.*\breason=transferred\b", timeout_s=15)
        sipp = caller.wait()
    assert sipp.successful_calls == 1, sipp.describe()
    assert hook.posts and hook.posts[0]["dtmf"] == "1"


def test_failed_transfer_is_told_to_the_menu_and_the_call_goes_on(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    daemon, caller = call(start_daemon, reserve_ports, tmp_path, "486 Busy Here")
    daemon.wait_log(r"event=transfer_failed\b.*\breason=failed\b.*\bstatus=486\b",
                    timeout_s=40)
    turn = daemon.wait_log(r"event=agent_turn\b.*\binput=transfer\b.*", timeout_s=15)
    assert re.search(rf'\bsay="{FAILED_SAY} {PROMPT}"', turn.group(0)), turn.group(0)
    assert "intent=transfer-failed" in turn.group(0)
    (session,) = wait_until(lambda: ctl_json(daemon, "sessions"), "the call")
    shown = ctl_json(daemon, "show", session["id"])
    assert shown["state"] == "active"
    assert shown["agent"]["stats"]["transfer_failures"] == 1
    ctl_ok(daemon, "hangup", session["id"])
    daemon.wait_log(r"event=call_end\b.*\breason=operator\b", timeout_s=10)
    sipp = caller.wait()
    assert sipp.successful_calls == 1, sipp.describe()
    metrics = ctl_ok(daemon, "metrics")
    assert 'voxgate_sip_transfers_total{outcome="failed"} 1' in metrics
    assert re.search(r'^voxgate_agent_transfer_failures_total\{reason="failed",'
                     r'transport="sip"\} 1', metrics, re.M), metrics


def test_a_stream_bot_asks_for_a_transfer_and_is_told_it_failed(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    with PipecatBot("twilio", workdir=tmp_path / "bot", transfer=("1", HUMAN)) as bot:
        daemon, caller = call(start_daemon, reserve_ports, tmp_path, "486 Busy Here",
                              stream_config(bot.url))
        bot.wait_event("transfer_asked", timeout_s=30)
        told = bot.wait_event(lambda e: e["event"] == "raw"
                              and e.get("kind") == "transfer_failed", timeout_s=30)
        assert told["transfer"] == {"target": HUMAN, "status": 486, "reason": "failed"}, told
        assert told["stream_sid_ok"], told
        (session,) = wait_until(lambda: ctl_json(daemon, "sessions"), "the call")
        assert ctl_json(daemon, "show", session["id"])["state"] == "active"
        ctl_ok(daemon, "hangup", session["id"])
        daemon.wait_log(r"event=call_end\b.*\breason=operator\b", timeout_s=10)
        sipp = caller.wait()
        assert sipp.successful_calls == 1, sipp.describe()


def test_no_final_notify_within_transfer_timeout_s_is_a_timeout_told_to_the_menu(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], tmp_path: Path,
) -> None:
    config = {**MENU, "sip": {"transfer_timeout_s": 2}}
    daemon, caller = call(start_daemon, reserve_ports, tmp_path, "100 Trying", config,
                          substate="active;expires=60")
    daemon.wait_log(r"event=transfer_failed\b.*\breason=timeout\b.*\bstatus=408\b",
                    timeout_s=40)
    turn = daemon.wait_log(r"event=agent_turn\b.*\binput=transfer\b.*", timeout_s=15)
    assert "reason=timeout" in turn.group(0), turn.group(0)
    (session,) = wait_until(lambda: ctl_json(daemon, "sessions"), "the call")
    ctl_ok(daemon, "hangup", session["id"])
    sipp = caller.wait()
    assert sipp.successful_calls == 1, sipp.describe()
    metrics = ctl_ok(daemon, "metrics")
    assert 'voxgate_sip_transfers_total{outcome="timeout"} 1' in metrics
