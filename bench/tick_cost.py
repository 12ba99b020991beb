"""The media tick's own cost per call, without the network and the event loop around it.

Run from the repository root as ``python -m bench.tick_cost``. It builds
``--calls`` SIP sessions' media the way the daemon does (a
:class:`~voxgate.session.SessionCore` from the embedded default config, an
:class:`~voxgate.transports.rtp_leg.RtpLeg` on a loopback UDP socket of a
:class:`~voxgate.transports.rtp_ports.PortPool`, one shared
:class:`~voxgate.transports.rtp_leg.RtpReadiness`, the echo agent), feeds each
one 20 ms µ-law RTP packet per tick from a peer socket (speech-like noise
bursts and silence, one second each, so VAD starts and stops turns), and runs
``--ticks`` media ticks, :meth:`~voxgate.session.Session.tick` for every call
in turn (answered sessions that are not run: no signaling, no event loop). It
prints the thread CPU per call-tick (mean, median and p10 tick), which still
moves with the machine's other work.

``--instructions`` runs the same twice under valgrind's cachegrind (Debian
``valgrind``; about 50 times slower, so keep it small: ``--calls 50 --ticks
200``), once without ticking, and prints the difference per call-tick: user-
space instructions, which no other work on the machine changes. That is the
figure to compare two trees with (``PYTHONPATH=OTHER/daemon``) while
optimising; the load benchmarks (``bench.rtp_load``) give the figures that count.
It never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.harness.daemon import reserve_port_range

from voxgate.codec.g711 import PCMU
from voxgate.config import parse_config
from voxgate.pipeline.clock import MediaClock
from voxgate.pipeline.frames import FRAME_S, SAMPLES_PER_FRAME
from voxgate.rtp.packet import pack_rtp_datagram
from voxgate.rtp.stream import RtpStream
from voxgate.session import Session, SessionCore
from voxgate.transports.rtp_leg import RtpLeg, RtpReadiness
from voxgate.transports.rtp_ports import PortPool

_NO_TICK_ENV = "VOXGATE_TICK_COST_NO_TICK"
"""Set: send and drain as usual but tick nothing (the baseline of ``--instructions``)."""


class _NoSignaling:
    """The sessions here are never run: nothing to signal."""

    def ring(self) -> None: ...
    def answer(self) -> None: ...
    def refuse(self, reason: str) -> None: ...
    def hangup(self, reason: str) -> None: ...
    def release(self) -> None: ...


@dataclass
class Call:
    """One call's session as the daemon holds it, and the peer that sends to it."""

    session: Session
    leg: RtpLeg
    peer: socket.socket


def clip(frames: int) -> list[bytes]:
    """µ-law payloads: one second of noise (speech to the VAD), one of silence, …"""
    rng = random.Random(1)
    silence = PCMU.silence(SAMPLES_PER_FRAME)
    return [bytes(rng.randrange(256) for _ in range(SAMPLES_PER_FRAME))
            if (i // 50) % 2 == 0 else silence for i in range(frames)]


def open_calls(count: int, pool: PortPool, readiness: RtpReadiness, now: float) -> list[Call]:
    """``count`` answered calls' sessions and RTP legs, each with a connected peer socket."""
    config = parse_config({}, "bench.tick_cost")
    clock = MediaClock()
    calls = []
    for index in range(count):
        core = SessionCore.build(config, "sip", now)
        core.timers.answered(now)
        sock = pool.open_socket()
        if sock is None:
            raise RuntimeError("no free RTP port")
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        stream = RtpStream(payload_type=PCMU.payload_type, telephone_event_pt=101, ssrc=1,
                           initial_sequence=1, initial_timestamp=1, jitter_capacity_frames=10,
                           jitter_prefetch_frames=3, remote_addr=peer.getsockname())
        leg = RtpLeg(pool=pool, readiness=readiness, sock=sock, stream=stream, codec=PCMU,
                     playback=core.pipeline.playback, on_dtmf=core.pipeline.dtmf,
                     budget=core.budget, playback_allowance_s=0.2)
        peer.connect(sock.getsockname())
        session = Session(session_id=f"bench{index}", call_id=f"bench{index}", transport="sip",
                          codec=PCMU.name, signaling=_NoSignaling(), media=leg, core=core,
                          clock=clock, answer_delay_s=0.0)
        calls.append(Call(session, leg, peer))
    return calls


def run(calls_n: int, ticks: int) -> None:
    """Tick ``calls_n`` calls ``ticks`` times; print the thread CPU per call-tick."""
    # Below the ephemeral range, where the peers' sockets take their ports.
    ports = reserve_port_range(2 * calls_n + 2)
    pool = PortPool("127.0.0.1", ports.first, ports.last)
    readiness = RtpReadiness()
    now = 1000.0
    calls = open_calls(calls_n, pool, readiness, now)
    payloads = clip(200)
    tick = not os.environ.get(_NO_TICK_ENV)
    gc.freeze()
    per_tick_s = []
    for t in range(ticks):
        packet = pack_rtp_datagram(PCMU.payload_type, t & 0xFFFF,
                                   (t * SAMPLES_PER_FRAME) & 0xFFFFFFFF, 42,
                                   payloads[t % len(payloads)], False)
        for call in calls:
            call.peer.send(packet)
            try:
                while True:
                    call.peer.recv(2048)
            except BlockingIOError:
                pass
        now += FRAME_S
        if tick:
            started_s = time.thread_time()
            for call in calls:
                call.session.tick(now, 1)
            per_tick_s.append(time.thread_time() - started_s)
    for call in calls:
        call.leg.close()
        call.peer.close()
    ports.release()
    if tick:
        per_tick_s.sort()
        scale = 1e6 / calls_n
        print(f"{calls_n} calls x {ticks} ticks: thread CPU per call-tick "
              f"{sum(per_tick_s) / ticks * scale:.2f} us (median tick "
              f"{per_tick_s[ticks // 2] * scale:.2f}, p10 {per_tick_s[ticks // 10] * scale:.2f})")


def instructions(calls_n: int, ticks: int) -> None:
    """Print user-space instructions per call-tick: cachegrind's count of a run that
    ticks less one that does not."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    counts = []
    for no_tick in (False, True):
        env = dict(os.environ)
        if no_tick:
            env[_NO_TICK_ENV] = "1"
        done = subprocess.run(
            [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
             sys.executable, "-m", "bench.tick_cost", "--calls", str(calls_n),
             "--ticks", str(ticks)],
            capture_output=True, text=True, env=env, check=True, timeout=3600)
        match = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if match is None:
            raise RuntimeError(f"no instruction count from cachegrind:\n{done.stderr[-2000:]}")
        counts.append(int(match[1].replace(",", "")))
    print(f"{calls_n} calls x {ticks} ticks: "
          f"{(counts[0] - counts[1]) / (calls_n * ticks):,.0f} instructions per call-tick")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tick_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="calls ticked (default: 500)")
    parser.add_argument("--ticks", type=int, default=400, help="ticks (default: 400)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions under valgrind instead of timing")
    args = parser.parse_args(argv)
    if args.instructions:
        instructions(args.calls, args.ticks)
    else:
        run(args.calls, args.ticks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
