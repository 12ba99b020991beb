"""Media deadman timers against the real daemon: pause and recovery, timeouts, re-INVITE, hold.

The caller is a :class:`~tests.harness.phone.Phone` with an RTP peer that
streams the looped speech clip (µ-law, 20 ms frames) over 127.0.0.1; the echo
agent sends every frame back, so "the call continues" means: frames we sent
after an event come back (:meth:`~tests.harness.phone.RtpPeer.echoed`). The
timers are short: ``first_media_s`` 2, ``media_inactivity_s`` 1 and
``recovery_window_s`` 3, so media that stops ends the call about 4 s later.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.harness.audio import SpeechClip, read_wav
from tests.harness.daemon import Daemon, parse_logfmt, status_code
from tests.harness.phone import Call, Phone, RtpPeer, body_of, headers_of, sdp_rtp_address
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, wait_until

FIRST_MEDIA_S = 2.0
INACTIVITY_S = 1.0
WINDOW_S = 3.0
TIMERS = {"first_media_s": FIRST_MEDIA_S, "media_inactivity_s": INACTIVITY_S,
          "recovery_window_s": WINDOW_S}
ECHO_FRAMES = 25
"""Echoed frames (0.5 s) that show the call's media flows."""
ECHO_TIMEOUT_S = 5.0
LATE_S = 2.0
"""How late a deadman's BYE may come on a busy two-core machine."""
SETTLE_S = 0.1
"""Longer than one media tick: what we sent before it has been read by the daemon."""


# --- helpers (also used by test_budget) ------------------------------------------------------

def ulaw_clip(clip: SpeechClip) -> bytes:
    """The clip as µ-law bytes, as the wire carries them."""
    return read_wav(clip.ulaw_wav).data


def session_id(daemon: Daemon, call: Call) -> str:
    """The daemon's session id for ``call`` (``voxgatectl sessions``)."""
    sessions = ctl_json(daemon, "sessions")
    ids = [s["id"] for s in sessions if s["call_id"] == call.call_id]
    assert len(ids) == 1, (call.call_id, sessions)
    found: str = ids[0]
    return found


def wait_echo(peer: RtpPeer, since: float, frames: int = ECHO_FRAMES) -> None:
    """Wait until ``frames`` frames we sent at or after ``since`` came back."""
    wait_until(lambda: len(peer.echoed(since)) >= frames,
               f"{frames} echoed frames on port {peer.port}", ECHO_TIMEOUT_S)


def live_call(phone: Phone, daemon: Daemon, source: bytes) -> tuple[Call, RtpPeer, str]:
    """An answered call whose peer streams ``source`` (looped) and whose echo flows."""
    peer = phone.rtp_peer()
    peer.play(source, loop=True)
    call = phone.call(media=peer)
    assert call.final_status == 200, call.final
    started = time.monotonic()
    peer.resume()
    wait_echo(peer, started)
    return call, peer, session_id(daemon, call)


def session_events(daemon: Daemon, event: str, sid: str) -> list[dict[str, str]]:
    """The logged ``event`` records of session ``sid``, in order."""
    return [e for e in daemon.events(event) if e.get("session_id") == sid]


def wait_event(daemon: Daemon, event: str, sid: str, timeout_s: float) -> dict[str, str]:
    """Wait for ``event`` of session ``sid`` in the log; returns its first record."""
    found: list[dict[str, str]] = wait_until(lambda: session_events(daemon, event, sid),
                                             f"{event} of session {sid}", timeout_s)
    return found[0]


def log_order(daemon: Daemon, sid: str) -> list[str]:
    """The events logged for session ``sid``, in order."""
    events = (parse_logfmt(line) for line in daemon.log_text().splitlines())
    return [e.get("event", "") for e in events if e.get("session_id") == sid]


def metric(daemon: Daemon, sample: str) -> float:
    """The value of one counter sample of ``voxgatectl metrics`` (``name{labels}`` as
    printed); 0 while the sample is not exposed (no call has counted anything yet)."""
    text: str = ctl_json(daemon, "metrics")["text"]
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return 0.0 if match is None else float(match.group(1))


def hang_up_with_bye(phone: Phone, daemon: Daemon, call: Call, sid: str) -> dict[str, str]:
    """Our BYE ends the call; its ``call_end`` says ``reason=bye``; returns that record."""
    phone.hang_up(call)
    end = wait_event(daemon, "call_end", sid, 5.0)
    assert end["reason"] == "bye", end
    assert call.bye is None, "the daemon hung up first"
    return end


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


# --- tests ---------------------------------------------------------------------------------------

def test_media_back_within_the_window_keeps_the_session(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        paused_at = time.monotonic()
        peer.pause()
        wait_event(daemon, "session_paused", sid, INACTIVITY_S + LATE_S)
        assert ctl_json(daemon, "show", sid)["state"] == "paused"
        _sleep_until(paused_at + INACTIVITY_S + WINDOW_S / 2)
        resumed_at = time.monotonic()
        peer.resume()
        recovered = wait_event(daemon, "session_recovered", sid, LATE_S)
        assert INACTIVITY_S / 2 <= float(recovered["paused_s"]) <= WINDOW_S, recovered
        wait_echo(peer, resumed_at)
        assert [(s["id"], s["state"]) for s in ctl_json(daemon, "sessions")] == [(sid, "active")]
        assert ctl_json(daemon, "show", sid)["stats"]["session_recoveries"] == 1
        hang_up_with_bye(phone, daemon, call, sid)
    order = [e for e in log_order(daemon, sid) if e.startswith(("session_", "call_"))]
    assert order == ["call_start", "session_paused", "session_recovered", "call_end"], order
    assert metric(daemon, "voxgate_session_pauses_total") == 1
    assert metric(daemon, "voxgate_session_recoveries_total") == 1


def test_recovery_with_a_new_ssrc_from_a_new_port(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        old_port, old_ssrc = peer.port, peer.ssrc
        assert ctl_json(daemon, "show", sid)["remote"] == f"127.0.0.1:{old_port}"
        peer.pause()
        wait_event(daemon, "session_paused", sid, INACTIVITY_S + LATE_S)
        assert peer.new_ssrc() != old_ssrc
        new_port = peer.move()
        assert new_port != old_port
        resumed_at = time.monotonic()
        peer.resume()
        wait_event(daemon, "session_recovered", sid, LATE_S)
        wait_echo(peer, resumed_at)
        assert {packet.port for packet in peer.echoed(resumed_at)} == {new_port}
        info = ctl_json(daemon, "show", sid)
        assert info["remote"] == f"127.0.0.1:{new_port}", info  # symmetric RTP followed us
        assert info["stats"]["ssrc_changes"] == 1, info["stats"]
        hang_up_with_bye(phone, daemon, call, sid)


def test_media_that_stops_for_good_ends_after_inactivity_and_window(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        stopped_at = time.monotonic()
        peer.pause()
        bye = phone.wait_bye(call, INACTIVITY_S + WINDOW_S + LATE_S)
        assert call.bye_at is not None
        waited_s = call.bye_at - stopped_at
        assert INACTIVITY_S + WINDOW_S - 0.3 <= waited_s <= INACTIVITY_S + WINDOW_S + LATE_S
        assert headers_of(bye)["x-voxgate-reason"] == ["media-timeout"], bye
        end = wait_event(daemon, "call_end", sid, LATE_S)
    assert end["reason"] == "media-timeout", end
    assert session_events(daemon, "session_paused", sid)
    assert not session_events(daemon, "session_recovered", sid)


def test_no_media_after_the_answer_ends_with_no_media(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        peer = phone.rtp_peer()  # never sends
        call = phone.call(media=peer)
        assert call.final_status == 200 and call.final_at is not None, call.final
        sid = session_id(daemon, call)
        bye = phone.wait_bye(call, FIRST_MEDIA_S + LATE_S)
        assert call.bye_at is not None
        assert FIRST_MEDIA_S - 0.3 <= call.bye_at - call.final_at <= FIRST_MEDIA_S + LATE_S
        assert headers_of(bye)["x-voxgate-reason"] == ["no-media"], bye
        end = wait_event(daemon, "call_end", sid, LATE_S)
    assert end["reason"] == "no-media", end
    assert end["packets_in"] == "0", end
    assert not session_events(daemon, "session_paused", sid)


def test_reinvite_to_a_new_port_keeps_the_call(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        daemon_rtp = sdp_rtp_address(body_of(call.final or b""))
        assert daemon_rtp is not None and peer.remote == daemon_rtp
        peer.pause()
        time.sleep(SETTLE_S)  # our last packet from the old port is read before the re-INVITE
        new_port = peer.move()
        moved_at = time.monotonic()
        answer = phone.reinvite(call)
        assert status_code(answer) == 200, answer
        assert sdp_rtp_address(body_of(answer)) == daemon_rtp, answer
        assert b"a=sendrecv" in body_of(answer), answer
        # The daemon sends to the new port before anything came from it: the re-INVITE moved it.
        arrived = wait_until(lambda: peer.received(moved_at), f"RTP on new port {new_port}",
                             ECHO_TIMEOUT_S)
        assert {(p.port, p.source) for p in arrived} == {(new_port, daemon_rtp)}
        resumed_at = time.monotonic()
        peer.resume()
        wait_echo(peer, resumed_at)
        reinvite = daemon.events("call_reinvite")
        assert [e["remote"] for e in reinvite] == [f"127.0.0.1:{new_port}"], reinvite
        assert [s["id"] for s in ctl_json(daemon, "sessions")] == [sid]
        hang_up_with_bye(phone, daemon, call, sid)
    assert not session_events(daemon, "session_paused", sid)


@pytest.mark.parametrize(("hold", "answered"), [("sendonly", "recvonly"),
                                                ("inactive", "inactive")])
def test_hold_suspends_the_media_timers(
    start_daemon: StartDaemon, clip: SpeechClip, hold: str, answered: str
) -> None:
    daemon = start_daemon({"timers": TIMERS})
    with Phone(daemon) as phone:
        call, peer, sid = live_call(phone, daemon, ulaw_clip(clip))
        peer.pause()  # a held caller sends nothing here
        answer = phone.reinvite(call, direction=hold)
        assert status_code(answer) == 200, answer
        assert f"a={answered}".encode() in body_of(answer), answer
        held_at = time.monotonic()
        time.sleep(INACTIVITY_S + WINDOW_S + LATE_S)  # an unheld call would have ended by now
        assert not session_events(daemon, "session_paused", sid), log_order(daemon, sid)
        assert call.bye is None, call.bye
        held: dict[str, Any] = ctl_json(daemon, "show", sid)
        assert held["state"] == "active", held
        assert peer.received(held_at + SETTLE_S) == []  # and the daemon sends nothing to us

        answer = phone.reinvite(call)
        assert status_code(answer) == 200 and b"a=sendrecv" in body_of(answer), answer
        resumed_at = time.monotonic()
        peer.resume()
        wait_echo(peer, resumed_at)
        hang_up_with_bye(phone, daemon, call, sid)
