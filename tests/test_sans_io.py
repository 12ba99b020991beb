"""The protocol cores import no trio, no sockets and no clock (STYLE.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SANS_IO_MODULES = [
    "voxgate.sip.message",
    "voxgate.sip.grammar",
    "voxgate.sip.uri",
    "voxgate.sip.headers",
    "voxgate.sip.parser",
    "voxgate.sip.framing",
    "voxgate.sip.transaction",
    "voxgate.sip.dialog",
    "voxgate.sip.uas",
    "voxgate.sip.sdp",
    "voxgate.sip.sdes",
    "voxgate.sip.ratelimit",
    "voxgate.sip.digest",
    "voxgate.sip.registration",
    "voxgate.sip.uac",
    "voxgate.rtp.packet",
    "voxgate.rtp.jitter",
    "voxgate.rtp.dtmf",
    "voxgate.rtp.stream",
    "voxgate.codec.g711",
    "voxgate.pipeline.vad",
    "voxgate.pipeline.playout",
    "voxgate.pipeline.pipeline",
    "voxgate.pipeline.frames",
    "voxgate.pipeline.media_load",
    "voxgate.jsonbounds",
    "voxgate.control.protocol",
    "voxgate.admission",
    "voxgate.budget",
    "voxgate.transports.media_stream",
    "voxgate.deadman",
    "voxgate.end_reasons",
    "voxgate.agents.providers",
    "voxgate.agents.bot_wire",
    "voxgate.agents.transfer",
    "voxgate.agents.dialogue",
]

# webrtcvad's import pulls in socket/threading through importlib.metadata, so
# the check is on the event-loop libraries a core must never touch.
FORBIDDEN = ("trio", "asyncio")


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_core_imports_no_io(module):
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
