"""Build hook: the media cores compiled with mypyc (README, "Native media cores").

The modules in :data:`NATIVE_MODULES` run once per call every 20 ms; mypyc
compiles them (they are ``mypy --strict`` already) into C extensions that
Python imports instead of the ``.py`` files beside them. Everything else, and
the whole daemon when ``VOXGATE_PURE_PYTHON=1`` is set at build time, stays
pure Python; both ways pass the same tests (``make test``).

Two small C extensions (:data:`C_EXTENSIONS`) do what the profile showed
costs more in Python than the media work around it: G.711 by table lookup and
an RTP leg's UDP reads and writes. Their pure-Python counterparts
(``codec/g711.py``, ``transports/datagram.py``) are what the pure build runs.

Their module constants are ``Final``: mypyc inlines those or keeps them in C
statics, where reading a plain module global is a dict lookup (measured with
callgrind: 28 lookups per call-tick, 7 % of its instructions).
"""

import os

from setuptools import Extension, setup

NATIVE_MODULES = (
    "voxgate/agents/echo.py",
    "voxgate/budget.py",
    "voxgate/codec/g711.py",
    "voxgate/deadman.py",
    "voxgate/pipeline/pipeline.py",
    "voxgate/pipeline/playback.py",
    "voxgate/pipeline/playout.py",
    "voxgate/pipeline/vad.py",
    "voxgate/rtp/dtmf.py",
    "voxgate/rtp/jitter.py",
    "voxgate/rtp/packet.py",
    "voxgate/rtp/seqnum.py",
    "voxgate/rtp/stream.py",
    "voxgate/transports/media_stream.py",
    "voxgate/transports/rtp_leg.py",
    "voxgate/transports/websocket.py",
    "voxgate/transports/ws_server.py",
)
"""Paths under ``daemon/``: the per-call media tick (RTP, jitter buffer, VAD,
playout, budget, deadman), the WebSocket media-stream messages, and the WebSocket
endpoint and connection whose reads and writes the tick drives (interpreted, they
were half the daemon's CPU at 300 streams: py-spy)."""

C_EXTENSIONS = (
    Extension("voxgate.codec._g711", ["daemon/voxgate/codec/_g711.c"]),
    Extension("voxgate.transports._datagram", ["daemon/voxgate/transports/_datagram.c"]),
)
"""C sources for the per-call tick (built with Python's own compiler flags): see their headers."""

if os.environ.get("VOXGATE_PURE_PYTHON"):
    setup()
else:
    from mypyc.build import mypycify

    setup(ext_modules=[
        *mypycify([f"daemon/{path}" for path in NATIVE_MODULES], opt_level="3"),
        *C_EXTENSIONS,
    ])
