"""UAS dialogs (RFC 3261 §12): creation from an INVITE, CSeq rules, our BYE."""

from __future__ import annotations

import pytest

from voxgate.errors import LocalProtocolError, RemoteProtocolError
from voxgate.sip.dialog import MAX_CSEQ, VIA_PLACEHOLDER, Dialog, DialogId
from voxgate.sip.message import Headers, Request

FROM = '"Caller" <sip:caller@127.0.0.2>;tag=remote1'
TO = "<sip:agent@127.0.0.1>"


def invite(*extra: tuple[str, str], to: str = TO, contact: str | None = None) -> Request:
    headers = [
        ("Via", "SIP/2.0/UDP 127.0.0.2:5070;branch=z9hG4bK1"),
        ("From", FROM),
        ("To", to),
        ("Call-ID", "call-9"),
        ("CSeq", "41 INVITE"),
        *extra,
    ]
    if contact is not None:
        headers.append(("Contact", contact))
    return Request("INVITE", "sip:agent@127.0.0.1", Headers(headers))


def test_dialog_from_invite() -> None:
    dialog = Dialog.from_invite_untrusted(
        invite(contact="<sip:caller@127.0.0.2:5070;transport=udp>"),
        local_tag="local1",
        local_cseq=7,
    )
    assert dialog.id == DialogId("call-9", "local1", "remote1")
    assert dialog.remote_target == "sip:caller@127.0.0.2:5070;transport=udp"
    assert dialog.remote_cseq == 41
    assert dialog.route_set == ()


def test_bye_with_loose_route_set() -> None:
    routes = ("<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>")
    dialog = Dialog.from_invite_untrusted(
        invite(*(("Record-Route", r) for r in routes), contact="<sip:caller@127.0.0.2:5070>"),
        local_tag="local1",
        local_cseq=7,
    )
    bye = dialog.build_request("BYE", 12.5)
    assert bye.method == "BYE"
    assert bye.uri == "sip:caller@127.0.0.2:5070"
    assert bye.headers.get_all("Route") == list(routes)  # UAS order: as in the request
    assert bye.headers.get("From") == f"{TO};tag=local1"
    assert bye.headers.get("To") == FROM
    assert bye.headers.get("Call-ID") == "call-9"
    assert bye.headers.get("CSeq") == "8 BYE"
    assert bye.headers.get("Max-Forwards") == "70"
    assert bye.headers.get("Via") == VIA_PLACEHOLDER
    assert dialog.last_request_at == 12.5
    assert dialog.next_hop_uri() == "sip:p1.example.com;lr"
    assert dialog.build_request("BYE", 13.0).headers.get("CSeq") == "9 BYE"


def test_bye_with_strict_route() -> None:
    dialog = Dialog.from_invite_untrusted(
        invite(
            ("Record-Route", "<sip:strict.example.com;maddr=10.0.0.1>"),
            ("Record-Route", "<sip:p2.example.com;lr>"),
            contact="<sip:caller@127.0.0.2>",
        ),
        local_tag="l",
        local_cseq=1,
    )
    bye = dialog.build_request("BYE", 0.0)
    assert bye.uri == "sip:strict.example.com;maddr=10.0.0.1"
    assert bye.headers.get_all("Route") == ["<sip:p2.example.com;lr>", "<sip:caller@127.0.0.2>"]


def test_rfc2543_invite_without_contact_or_from_tag() -> None:
    request = invite()
    request.headers.set("From", "<sip:+13035551111@ift.client.example.net;user=phone>")
    dialog = Dialog.from_invite_untrusted(request, local_tag="l", local_cseq=1)
    assert dialog.id.remote_tag == ""
    assert dialog.remote_target == "sip:+13035551111@ift.client.example.net;user=phone"


def test_to_tag_present_is_kept_as_local_tag() -> None:
    dialog = Dialog.from_invite_untrusted(
        invite(to=f"{TO};tag=theirs"), local_tag="unused", local_cseq=1
    )
    assert dialog.id.local_tag == "theirs"
    assert dialog.build_request("BYE", 0.0).headers.get("From") == f"{TO};tag=theirs"


def test_remote_cseq_must_not_go_down() -> None:
    dialog = Dialog.from_invite_untrusted(invite(), local_tag="l", local_cseq=1)
    dialog.update_remote_cseq(41)  # equal is fine (ACK, CANCEL share the number)
    dialog.update_remote_cseq(42)
    with pytest.raises(RemoteProtocolError) as info:
        dialog.update_remote_cseq(40)
    assert info.value.status_hint == 500
    assert dialog.remote_cseq == 42


def test_bad_contact_is_refused() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        Dialog.from_invite_untrusted(invite(contact="<sip:caller@"), local_tag="l", local_cseq=1)
    assert info.value.status_hint == 400


def test_local_cseq_bounds() -> None:
    with pytest.raises(LocalProtocolError):
        Dialog.from_invite_untrusted(invite(), local_tag="l", local_cseq=MAX_CSEQ)
    dialog = Dialog.from_invite_untrusted(invite(), local_tag="l", local_cseq=MAX_CSEQ - 1)
    assert dialog.build_request("BYE", 0.0).headers.get("CSeq") == f"{MAX_CSEQ} BYE"
    with pytest.raises(LocalProtocolError):
        dialog.build_request("BYE", 0.0)
