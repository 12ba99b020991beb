"""WebSocket media streams against the real daemon.

A media-server client (:class:`tests.transports.test_websocket.Client`) streams
the speech clip as µ-law ``media`` messages on an absolute 20 ms schedule:
the echo comes back and correlates with the clip; with the ``silent`` agent
and a fallback prompt the daemon speaks an utterance, whose completion is
counted by ``mark`` when the client echoes the mark, by ``deadman`` when it
does not, and cut by ``clear`` when the caller talks over it. A dropped
stream resumes its session with the recovery token; a full daemon closes
with 1013. On the wire (raw TCP): refused handshakes are answered and closed,
handshakes count against the connection limit, and a frame that breaks
RFC 6455 gets its close frame; the daemon's own sockets are read from /proc.
"""

from __future__ import annotations

import contextlib
import json
import re
import wave
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from tests.harness.audio import SpeechClip, compare_echo, decode_g711, encode_ulaw
from tests.harness.daemon import Daemon, free_tcp_port
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_ok
from tests.transports.test_websocket import (
    HALF_REQUEST,
    SID,
    UPGRADE,
    Client,
    connect,
    open_upgraded,
    read_to_eof,
    server_frames,
    server_sockets,
    wait_until,
    ws_frame,
)
from voxgate.transports.media_stream import FRAME_BYTES, Stop

SILENCE = b"\xff" * FRAME_BYTES
TURN_S = 15.0
"""Upper bound for a caller turn plus the agent's fallback prompt to play out."""


def ws_daemon(start_daemon: StartDaemon, **sections: dict[str, Any]) -> tuple[Daemon, int]:
    """A daemon serving media streams on a free port; returns it and the port."""
    port = free_tcp_port()
    daemon = start_daemon({"websocket": {"listen": f"127.0.0.1:{port}"}, **sections})
    return daemon, port


def ulaw_frames(pcm16: bytes) -> list[bytes]:
    """The clip as whole 160-byte µ-law frames (the trailing partial frame dropped)."""
    data = encode_ulaw(pcm16)
    return [data[i:i + FRAME_BYTES] for i in range(0, len(data) - FRAME_BYTES + 1, FRAME_BYTES)]


def write_prompt(path: Path, pcm16: bytes) -> str:
    """An 8 kHz mono 16-bit WAV (the fallback prompt's format)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(pcm16)
    return str(path)


def prompt_daemon(start_daemon: StartDaemon, tmp_path: Path, prompt_pcm16: bytes,
                  **timers: float) -> tuple[Daemon, int]:
    """A daemon whose silent agent plays the fallback prompt 1 s after each caller turn."""
    prompt = write_prompt(tmp_path / "prompt.wav", prompt_pcm16)
    return ws_daemon(start_daemon, agent={"kind": "silent", "fallback_prompt": prompt},
                     timers={"agent_response_s": 1, **timers})


async def metric(daemon: Daemon, name: str, *labels: str) -> float:
    """Sample ``name`` (``_total`` included) whose labels include ``labels``
    (``'key="value"'`` each), via voxgatectl; 0 when absent."""
    text = await trio.to_thread.run_sync(ctl_ok, daemon, "metrics")
    for line in text.splitlines():
        head, _, value = line.partition("} ")
        if head.startswith(name + "{") and all(label in head for label in labels):
            return float(value)
    return 0.0


async def completions(daemon: Daemon, signal: str) -> float:
    """``voxgate_playback_completion_total{signal=…,transport="websocket"}`` via voxgatectl."""
    return await metric(daemon, "voxgate_playback_completion_total", 'transport="websocket"',
                        f'signal="{signal}"')


async def handshakes_failed(daemon: Daemon, reason: str) -> float:
    """``voxgate_websocket_handshakes_failed_total{reason=…}`` via voxgatectl."""
    return await metric(daemon, "voxgate_websocket_handshakes_failed_total", f'reason="{reason}"')


async def wait_completions(daemon: Daemon, signal: str, count: float) -> None:
    with trio.fail_after(10):
        while await completions(daemon, signal) < count:  # noqa: ASYNC110 - polls voxgatectl
            await trio.sleep(0.2)


async def wait_log(daemon: Daemon, pattern: str, count: int = 1) -> re.Match[str]:
    return await trio.to_thread.run_sync(lambda: daemon.wait_log(pattern, count=count))


async def test_echo_correlates_with_the_clip_and_stop_ends_with_bye(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon, port = ws_daemon(start_daemon)
    frames = ulaw_frames(clip.pcm16)
    async with connect(port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)
        await client.stream([*frames, *[SILENCE] * 10])
        await wait_until(lambda: frames[-1] in client.media)
        received = b"".join(decode_g711(payload, "PCMU") for payload in client.media)
        await client.send(Stop(SID))
        await wait_until(lambda: client.closed is not None)
    match = compare_echo(received, clip.pcm16)
    assert match.segments_matched >= 0.7, match
    assert 0.0 <= match.lag_s < 0.5, match
    await wait_log(daemon, r"event=call_end .*transport=websocket.*reason=bye")
    (start,) = daemon.events("call_start")
    assert start["transport"] == "websocket" and start["call_id"] == "CA1"
    (record,) = json.loads(ctl_ok(daemon, "--json", "calls"))
    assert (record["transport"], record["call_id"], record["reason"], record["state"]) == (
        "websocket", "CA1", "bye", "ended")


async def test_prompt_completes_by_the_echoed_mark(
    start_daemon: StartDaemon, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon, port = prompt_daemon(start_daemon, tmp_path, clip.pcm16[:16000])  # 1 s prompt
    async with connect(port) as client:
        await client.start()
        await client.stream(ulaw_frames(clip.pcm16))
        with trio.fail_after(TURN_S):
            while not client.marks:
                await client.stream([SILENCE] * 5)
        assert client.marks == ["1"]
        await wait_completions(daemon, "mark", 1)
    assert await completions(daemon, "deadman") == 0


async def test_prompt_without_mark_echo_completes_by_deadman(
    start_daemon: StartDaemon, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon, port = prompt_daemon(start_daemon, tmp_path, clip.pcm16[:16000],
                                 playback_deadman_ms=300)
    async with connect(port, echo_marks=False) as client:
        await client.start()
        await client.stream(ulaw_frames(clip.pcm16))
        with trio.fail_after(TURN_S):
            while not client.marks:
                await client.stream([SILENCE] * 5)
        await wait_completions(daemon, "deadman", 1)
    assert await completions(daemon, "mark") == 0
    await wait_log(daemon, r"event=playback_deadman .*no websocket playback-completion signal")


async def test_caller_speaking_over_the_prompt_gets_clear(
    start_daemon: StartDaemon, clip: SpeechClip, tmp_path: Path
) -> None:
    daemon, port = prompt_daemon(start_daemon, tmp_path, clip.pcm16)  # the whole clip
    frames = ulaw_frames(clip.pcm16)
    async with connect(port) as client:
        await client.start()
        await client.stream(frames)
        with trio.fail_after(TURN_S):  # wait for the prompt's first audio …
            while not any(payload != SILENCE for payload in client.media):
                await client.stream([SILENCE] * 5)
        await client.stream(frames[:75])  # … then talk over it for 1.5 s
        await wait_until(lambda: "Clear" in client.events)
        assert client.marks == []
    await wait_completions(daemon, "cleared", 1)
    await wait_log(daemon, r"event=call_start")


async def test_dropped_stream_resumes_its_session_with_the_token(
    start_daemon: StartDaemon, clip: SpeechClip
) -> None:
    daemon, port = ws_daemon(start_daemon, timers={"media_inactivity_s": 0.5,
                                                   "recovery_window_s": 20})
    frames = ulaw_frames(clip.pcm16)
    async with connect(port) as first:
        await first.start()
        await first.stream(frames[:25])
        await wait_until(lambda: first.tokens)
    await wait_log(daemon, r"event=stream_dropped")
    await wait_log(daemon, r"event=session_paused")
    async with connect(port) as second:
        await second.start(recoveryToken=first.tokens[0])
        await wait_until(lambda: second.tokens)
        later = frames[25:100]
        await second.stream(later)
        await wait_until(lambda: later[-1] in second.media)
        assert sum(payload in second.media for payload in later) >= len(later) - 2
        await second.send(Stop(SID))
        await wait_until(lambda: second.closed is not None)
    await wait_log(daemon, r"event=call_end .*reason=bye")
    (start,) = daemon.events("call_start")
    (resumed,) = daemon.events("stream_resumed")
    (recovered,) = daemon.events("session_recovered")
    assert start["session_id"] == resumed["session_id"] == recovered["session_id"]


async def test_refusal_at_capacity_closes_with_1013(start_daemon: StartDaemon) -> None:
    daemon, port = ws_daemon(start_daemon, limits={"max_sessions": 1})
    async with connect(port) as first:
        await first.start()
        await wait_until(lambda: first.tokens)
        async with connect(port) as second:
            await second.start()
            await wait_until(lambda: second.closed is not None)
        assert second.closed == (1013, "full")
        assert isinstance(second, Client) and second.tokens == []
    await wait_log(daemon, r"event=call_refused .*reason=full")


async def test_a_flood_of_wrong_paths_is_answered_closed_and_counted(
    start_daemon: StartDaemon,
) -> None:
    daemon, port = ws_daemon(start_daemon, limits={"max_sessions": 1})  # 66 connections
    flood = 100
    async with contextlib.AsyncExitStack() as held:
        answers: list[bytes] = []

        async def knock() -> None:  # the client keeps its end open
            stream = await held.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port))
            await stream.send_all(UPGRADE.format(path="/nope").encode())
            answers.append(await read_to_eof(stream))

        async with trio.open_nursery() as nursery:
            for _ in range(flood):
                nursery.start_soon(knock)
        statuses = Counter(answer[:12] for answer in answers)
        assert set(statuses) <= {b"HTTP/1.1 404", b"HTTP/1.1 503"} and statuses.total() == flood
        await wait_until(lambda: server_sockets(port, daemon.pid) == 0)
        assert await handshakes_failed(daemon, "path") == statuses[b"HTTP/1.1 404"]
        assert await handshakes_failed(daemon, "busy") == statuses[b"HTTP/1.1 503"]
        async with connect(port) as client:
            await client.start()
            await wait_until(lambda: client.tokens)


async def test_handshakes_count_against_the_connection_limit(start_daemon: StartDaemon) -> None:
    daemon, port = ws_daemon(start_daemon, limits={"max_sessions": 1, "retry_after_s": 5})
    limit = 2 * 1 + 64  # 2 * (max_sessions + queue_size) + 64
    async with contextlib.AsyncExitStack() as held:
        for _ in range(limit):
            stream = await held.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port))
            await stream.send_all(HALF_REQUEST)
        await wait_until(lambda: server_sockets(port, daemon.pid) == limit)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        async with extra:
            await extra.send_all(UPGRADE.format(path="/media").encode())
            answer = await read_to_eof(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5\r\n" in answer
        assert server_sockets(port, daemon.pid) == limit
        assert await handshakes_failed(daemon, "busy") == 1
    await wait_until(lambda: server_sockets(port, daemon.pid) == 0)
    async with connect(port) as client:
        await client.start()
        await wait_until(lambda: client.tokens)


async def test_a_broken_frame_gets_a_1002_close_frame(start_daemon: StartDaemon) -> None:
    daemon, port = ws_daemon(start_daemon)
    stream, _ = await open_upgraded(port)
    async with stream:
        await stream.send_all(ws_frame(0x3, b""))  # a reserved opcode
        frames = server_frames(await read_to_eof(stream))
    ((opcode, payload),) = frames  # nothing but the close frame
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1002
    assert await metric(daemon, "voxgate_websocket_bad_messages_total",
                        'close_code="1002"') == 1
