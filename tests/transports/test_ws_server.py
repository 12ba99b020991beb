"""ServerWebSocket's no-wait paths over a loopback TCP connection: writes the socket does not
take wait in the backlog and go out whole and in order; reads polled without a task."""

from __future__ import annotations

import socket

import trio
import wsproto
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from voxgate.transports.ws_server import ServerWebSocket, text_frame


async def opened() -> tuple[ServerWebSocket, socket.socket, wsproto.WSConnection]:
    """A server WebSocket after its handshake, and the client's blocking socket and wsproto."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(listener.getsockname())
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    ws = ServerWebSocket(stream, max_message_bytes=1 << 16, close_timeout_s=1.0)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    theirs.sendall(client.send(Request(host="localhost", target="/media")))
    await ws.receive_request()
    await ws.accept()
    client.receive_data(theirs.recv(65536))
    assert isinstance(next(client.events()), AcceptConnection)
    return ws, theirs, client


def read_texts(sock: socket.socket, client: wsproto.WSConnection, count: int) -> list[str]:
    """The next ``count`` whole text messages the server sends."""
    texts: list[str] = []
    part = ""
    sock.settimeout(5.0)
    while len(texts) < count:
        client.receive_data(sock.recv(65536))
        for event in client.events():
            if isinstance(event, TextMessage):
                part += event.data
                if event.message_finished:
                    texts.append(part)
                    part = ""
    return texts


async def test_a_frame_the_socket_does_not_take_waits_and_goes_out_whole_in_order():
    ws, theirs, client = await opened()
    messages = [f"{i:04d}".encode() * 2000 for i in range(20)]  # 8 kB each, far over the buffers
    sent = 0
    while sent < len(messages) and ws.send_nowait(text_frame(messages[sent])):
        sent += 1
    assert ws.backlogged and sent < len(messages)
    async with trio.open_nursery() as nursery:
        async def write_rest() -> None:
            await ws.flush()
            for message in messages[sent:]:
                await ws.send_frame(text_frame(message))
        nursery.start_soon(write_rest)
        texts = await trio.to_thread.run_sync(read_texts, theirs, client, len(messages))
    assert texts == [m.decode() for m in messages]
    assert not ws.backlogged
    await ws.aclose()
    theirs.close()


async def test_polled_reads_hand_out_whole_messages_and_leave_control_frames():
    ws, theirs, client = await opened()
    theirs.sendall(client.send(TextMessage(data="one")) + client.send(TextMessage(data="two"))
                   + client.send(Ping(b"hi")) + client.send(TextMessage(data="three")))
    await trio.sleep(0.05)
    ws.receive_nowait()
    assert [ws.message_nowait(), ws.message_nowait(), ws.message_nowait()] == ["one", "two", None]
    assert ws.needs_attention  # the ping: get_message answers it, then goes on
    assert await ws.get_message() == "three"
    client.receive_data(theirs.recv(65536))
    assert any(type(e).__name__ == "Pong" for e in client.events())
    await ws.aclose()
    theirs.close()
