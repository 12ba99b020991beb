"""Behind a NAT: [sip] advertise goes into our Via and Contact, [rtp] advertise into the SDP.

A :class:`~tests.harness.phone.Phone` places the call to the daemon's real
socket (the advertised addresses are documentation prefixes, RFC 5737, that
route nowhere); the daemon's answer and its BYE must name them.
"""

from __future__ import annotations

from tests.harness.phone import Phone, headers_of
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok
from tests.integration.test_recovery import session_id


def test_answer_and_bye_carry_the_advertised_addresses(start_daemon: StartDaemon) -> None:
    daemon = start_daemon({"sip": {"advertise": "192.0.2.10:5080"},
                           "rtp": {"advertise": "198.51.100.7"}})
    with Phone(daemon) as phone:
        call = phone.call()
        assert call.final_status == 200 and call.final is not None, call.final
        assert call.header("Contact") == "<sip:192.0.2.10:5080>", call.final
        sdp = call.final.split(b"\r\n\r\n", 1)[1].decode()
        assert "\r\nc=IN IP4 198.51.100.7\r\n" in sdp, sdp
        assert " IN IP4 198.51.100.7\r\n" in sdp.split("\r\n")[1] + "\r\n", sdp  # o=
        ctl_ok(daemon, "hangup", session_id(daemon, call))
        bye = phone.wait_bye(call, 10)
    (via,) = headers_of(bye)["via"]
    assert via.startswith("SIP/2.0/UDP 192.0.2.10:5080;"), via
