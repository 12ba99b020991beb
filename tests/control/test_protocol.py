"""The control protocol core: framing, validation, replies (no sockets)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from voxgate.control.protocol import (
    BAD_JSON,
    BAD_REQUEST,
    TOO_LARGE,
    TOO_MANY_REQUESTS,
    UNKNOWN_COMMAND,
    ControlConnection,
    ControlProtocolError,
    ProtocolError,
    Reply,
    Request,
    decode_reply,
    encode_reply,
    encode_request,
    parse_request_untrusted,
)
from voxgate.errors import LocalProtocolError, RemoteProtocolError

COMMANDS = ("hello", "status", "show")


def conn(**kwargs) -> ControlConnection:
    return ControlConnection(COMMANDS, **kwargs)


def drain_events(c: ControlConnection) -> list[Request | ProtocolError]:
    events = []
    while (event := c.next_request()) is not None:
        events.append(event)
    return events


def test_request_split_across_chunks():
    c = conn()
    line = encode_request(1, "status", {"verbose": True})
    for i in range(len(line) - 1):
        c.receive_data(line[i:i + 1])
        assert c.next_request() is None
    c.receive_data(line[-1:])
    assert c.next_request() == Request(1, "status", {"verbose": True})
    assert c.next_request() is None


def test_several_requests_in_one_chunk_come_out_in_order():
    c = conn()
    c.receive_data(encode_request("a", "hello", {}) + encode_request(2, "status", {})
                   + b'{"id": 3, "cmd": "show", "args": {"id": "s1"}}\n{"id": 4')
    events = drain_events(c)
    assert events == [Request("a", "hello", {}), Request(2, "status", {}),
                      Request(3, "show", {"id": "s1"})]
    c.receive_data(b', "cmd": "hello"}\n')
    assert c.next_request() == Request(4, "hello", {})
    assert c.stats.requests == 4


def test_args_may_be_left_out():
    c = conn()
    c.receive_data(b'{"cmd": "status"}\n')
    assert c.next_request() == Request(None, "status", {})


def test_oversized_line_is_fatal_and_the_rest_is_discarded():
    c = conn(max_line_bytes=32)
    c.receive_data(encode_request(1, "hello", {}))
    c.receive_data(b'{"id": 2, "cmd": "status", "args": {"pad": "')
    c.receive_data(b"x" * 1000)
    assert c.closed
    first, second = drain_events(c)
    assert first == Request(1, "hello", {})
    assert isinstance(second, ProtocolError)
    assert (second.id, second.code, second.fatal) == (None, TOO_LARGE, True)
    c.receive_data(b'"}}\n' + encode_request(3, "hello", {}))
    assert c.next_request() is None
    assert c.stats.discarded_bytes > 1000


def test_oversized_complete_line_in_one_chunk():
    c = conn(max_line_bytes=20)
    c.receive_data(b'{"id": 1, "cmd": "status"}\n' + encode_request(2, "hello", {}))
    (event,) = drain_events(c)
    assert isinstance(event, ProtocolError)
    assert event.code == TOO_LARGE
    assert c.closed


def test_line_of_exactly_the_limit_is_accepted():
    line = b'{"cmd":"hello"}'
    c = conn(max_line_bytes=len(line))
    c.receive_data(line)
    c.receive_data(b"\n")
    assert c.next_request() == Request(None, "hello", {})


@pytest.mark.parametrize(("line", "code", "request_id"), [
    (b"{not json", BAD_JSON, None),
    (b"\xff\xfe", BAD_JSON, None),
    (b'{"id": 1, "cmd": "status", "args": {"x": NaN}}', BAD_JSON, None),
    (b"[" * 100_000, BAD_JSON, None),
    (b'["status"]', BAD_REQUEST, None),
    (b'"status"', BAD_REQUEST, None),
    (b'{"id": 7}', BAD_REQUEST, 7),
    (b'{"id": "x", "cmd": 5}', BAD_REQUEST, "x"),
    (b'{"id": 8, "cmd": "status", "args": []}', BAD_REQUEST, 8),
    (b'{"id": true, "cmd": "status"}', BAD_REQUEST, None),
    (b'{"id": {"a": 1}, "cmd": "status"}', BAD_REQUEST, None),
    (b'{"id": 2.5, "cmd": "reboot"}', UNKNOWN_COMMAND, 2.5),
])
def test_bad_lines_become_errors_with_the_id_echoed(line, code, request_id):
    c = conn(max_line_bytes=200_000)
    c.receive_data(line + b"\n" + encode_request(9, "hello", {}))
    error, after = drain_events(c)
    assert isinstance(error, ProtocolError)
    assert (error.code, error.id, error.fatal) == (code, request_id, False)
    assert after == Request(9, "hello", {}), "a bad line does not end the connection"
    assert c.stats.errors == 1


@pytest.mark.parametrize(("line", "code"), [
    (b'{"id": 1e400, "cmd": "status"}', BAD_JSON),
    (b'{"id": -1e400, "cmd": "reboot"}', BAD_JSON),
    (b'{"id": 1' + b"0" * 5000 + b', "cmd": "status"}', BAD_JSON),
    (b'{"id": "\\ud800", "cmd": "status"}', BAD_JSON),
    (b'{"id": 1, "cmd": "status", "args": {"n": 1e999}}', BAD_JSON),
    (b'{"id": 1, "cmd": "status", "args": ' + b"[" * 40 + b"]" * 40 + b"}", BAD_JSON),
    (b'{"id": [1e3], "cmd": "status"}', BAD_REQUEST),
    (b'{"id": {}, "cmd": "hello"}', BAD_REQUEST),
])
def test_unusable_ids_are_answered_with_id_null_and_the_next_request_too(line, code):
    c = conn()
    c.receive_data(line + b"\n" + encode_request(9, "hello", {}))
    error, after = drain_events(c)
    assert isinstance(error, ProtocolError)
    assert (error.code, error.id, error.fatal) == (code, None, False)
    reply = json.loads(c.send_reply(Reply.failure(error.id, error.code, error.message)))
    assert reply == {"id": None, "ok": False,
                     "error": {"code": code, "message": error.message}}
    assert after == Request(9, "hello", {})
    assert json.loads(c.send_reply(Reply.success(after.id, None)))["id"] == 9


def test_every_id_a_request_can_carry_can_be_echoed():
    c = conn()
    c.receive_data(b'{"id": 1.7976931348623157e308, "cmd": "hello"}\n'
                   b'{"id": -12345678901234567890, "cmd": "hello"}\n'
                   b'{"id": "\\ud83d\\ude00", "cmd": "hello"}\n')
    events = drain_events(c)
    assert [e.id for e in events] == [1.7976931348623157e308, -12345678901234567890,
                                      "\U0001f600"]
    for event in events:
        assert isinstance(event, Request)
        assert decode_reply(c.send_reply(Reply.success(event.id, None))).id == event.id


def test_parse_raises_one_remote_error_type():
    with pytest.raises(RemoteProtocolError) as info:
        parse_request_untrusted(b'{"id": 1, "cmd": "nope"}', COMMANDS)
    assert isinstance(info.value, ControlProtocolError)
    assert info.value.code == UNKNOWN_COMMAND
    assert info.value.request_id == 1
    assert info.value.status_hint is None


def test_replies_round_trip_through_decode():
    c = conn()
    c.receive_data(encode_request(1, "status", {}) + encode_request("b", "hello", {}))
    drain_events(c)
    ok = c.send_reply(Reply.success(1, {"state": "running"}))
    err = c.send_reply(Reply.failure("b", "busy", "full"))
    assert ok.endswith(b"\n") and ok.count(b"\n") == 1
    assert json.loads(ok) == {"id": 1, "ok": True, "result": {"state": "running"}}
    assert json.loads(err) == {"id": "b", "ok": False,
                               "error": {"code": "busy", "message": "full"}}
    assert decode_reply(ok) == Reply.success(1, {"state": "running"})
    assert decode_reply(err) == Reply.failure("b", "busy", "full")


def test_send_reply_needs_a_pending_request():
    c = conn()
    with pytest.raises(LocalProtocolError):
        c.send_reply(Reply.success(1, None))


def test_unserializable_result_leaves_the_request_pending():
    c = conn()
    c.receive_data(encode_request(1, "status", {}))
    drain_events(c)
    with pytest.raises(LocalProtocolError):
        c.send_reply(Reply.success(1, object()))
    assert json.loads(c.send_reply(Reply.failure(1, "internal", "bug")))["ok"] is False


def test_pending_requests_are_capped():
    c = conn(max_pending_requests=2)
    c.receive_data(encode_request(1, "hello", {}) * 5)
    events = drain_events(c)
    assert events[:2] == [Request(1, "hello", {})] * 2
    assert isinstance(events[2], ProtocolError)
    assert events[2].code == TOO_MANY_REQUESTS and events[2].fatal
    assert len(events) == 3
    assert c.closed


def test_answered_requests_free_their_slot():
    c = conn(max_pending_requests=1)
    for i in range(5):
        c.receive_data(encode_request(i, "hello", {}))
        assert c.next_request() == Request(i, "hello", {})
        c.send_reply(Reply.success(i, None))
    assert not c.closed


def test_eof_discards_an_unterminated_line():
    c = conn()
    c.receive_data(encode_request(1, "hello", {}) + b'{"cmd": "status"}')
    c.receive_data(b"")
    assert c.closed
    assert drain_events(c) == [Request(1, "hello", {})]
    assert c.stats.discarded_bytes == len(b'{"cmd": "status"}')


def test_limits_must_be_positive():
    with pytest.raises(LocalProtocolError):
        ControlConnection(COMMANDS, max_line_bytes=0)
    with pytest.raises(LocalProtocolError):
        ControlConnection(COMMANDS, max_pending_requests=0)


@pytest.mark.parametrize("line", [
    b"nope",
    b"[]",
    b'{"id": 1}',
    b'{"id": 1, "ok": false}',
    b'{"id": 1, "ok": false, "error": {"message": "x"}}',
    b'{"id": [1], "ok": true}',
    b'{"id": 1e400, "ok": true}',
    b'{"id": 1, "ok": true, "result": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
])
def test_decode_reply_rejects_non_replies(line):
    with pytest.raises(ControlProtocolError):
        decode_reply(line)


def test_encode_reply_and_request_reject_non_json():
    with pytest.raises(LocalProtocolError):
        encode_reply(Reply.success(1, float("nan")))
    with pytest.raises(LocalProtocolError):
        encode_request(1, "status", {"x": {1, 2}})


def test_core_imports_no_io():
    code = ("import sys, voxgate.control.protocol\n"
            "print(','.join(m for m in ('trio', 'asyncio', 'socket', 'threading') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
