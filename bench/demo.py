"""``make demo``: the daemon plus real calls from SIPp and baresip, in under a minute.

Starts ``voxgated`` (echo agent) on free loopback ports, synthesises a speech
clip with espeak-ng, then places one SIPp call (streaming the clip as µ-law
RTP, captured with tcpdump) and one baresip call (playing the clip from a
file and recording what it hears). For each call it prints what was sent and
what came back: duration, packets, and how closely the returned audio
matches the caller's speech.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from tests.harness import missing_tools
from tests.harness.audio import SpeechClip, compare_echo, decode_g711, make_speech_clip, read_wav
from tests.harness.baresip import call_and_record
from tests.harness.daemon import Daemon, free_udp_port, reserve_port_range, running_daemon
from tests.harness.pcap import (
    Capture,
    echo_latencies_s,
    flow_payload,
    flow_stats,
    percentile,
    read_udp,
    rtp_packets,
)
from tests.harness.sipp import Sipp


def _sipp_call(daemon: Daemon, clip: SpeechClip, workdir: Path) -> None:
    media = reserve_port_range(4)
    caller = ("127.0.0.1", media.first)
    pcap_path = workdir / "sipp.pcap"
    try:
        with Capture(pcap_path, daemon.rtp.first, daemon.rtp.last):
            result = Sipp(
                "uac_echo", daemon.sip_address, workdir=workdir / "sipp",
                local_port=free_udp_port(), media_port=media.first, clip=clip,
                duration_ms=round(clip.duration_s * 1000) + 1500, timeout_s=40.0,
            ).run()
    finally:
        media.release()
    print(f"\nSIPp call: exit {result.returncode}, {result.successful_calls} successful")
    packets = rtp_packets(read_udp(pcap_path))
    for (src, dst), flow in sorted(flow_stats(packets).items()):
        direction = "sent    " if src == caller else "received"
        print(f"  {direction} {flow.packets:4d} RTP packets {src[0]}:{src[1]} -> "
              f"{dst[0]}:{dst[1]}, {flow.rate_pps:.1f} packets/s, loss {flow.loss_ratio:.2%}")
    outbound = [(src, dst) for (src, dst) in flow_stats(packets) if dst == caller]
    if outbound:
        echoed = decode_g711(flow_payload(packets, outbound[0][0], caller), "PCMU")
        _print_match("  came back", echoed, clip)
        latencies = echo_latencies_s(packets, caller)
        if latencies:
            print(f"  echo latency p50 {percentile(latencies, 50) * 1000:.1f} ms, "
                  f"p99 {percentile(latencies, 99) * 1000:.1f} ms")


def _baresip_call(daemon: Daemon, clip: SpeechClip, workdir: Path) -> None:
    rtp = reserve_port_range(10)
    try:
        result = call_and_record(
            daemon.sip_address, workdir / "baresip", clip=clip, sip_port=free_udp_port(),
            rtp_first=rtp.first, rtp_last=rtp.last, run_s=math.ceil(clip.duration_s) + 6,
        )
    finally:
        rtp.release()
    print(f"\nbaresip call: exit {result.returncode}; sent {clip.duration_s:.1f} s of speech "
          f"from {clip.pcm16_wav.name}")
    if result.received_wav is None:
        print("  nothing recorded")
        return
    _print_match("  recorded", read_wav(result.received_wav).to_pcm16(), clip)


def _print_match(label: str, pcm16: bytes, clip: SpeechClip) -> None:
    match = compare_echo(pcm16, clip.pcm16)
    print(f"{label} {len(pcm16) / 16000:.1f} s of audio: correlation with the caller's speech "
          f"{match.ncc:.2f} (energy envelope {match.envelope_corr:.2f}), "
          f"delay {match.lag_s * 1000:.0f} ms")


def main() -> int:
    missing = missing_tools("sipp", "baresip", "tcpdump", "espeak-ng", "sox")
    if missing:
        print(f"demo: missing {', '.join(missing)}: run `make setup` as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="voxgate-demo-") as tmp:
        workdir = Path(tmp)
        clip = make_speech_clip(workdir / "clip")
        print(f"speech clip: {clip.duration_s:.1f} s, espeak-ng + sox, 8 kHz")
        with running_daemon(workdir / "daemon") as daemon:
            print(f"voxgated pid {daemon.pid}: SIP {daemon.sip_address[0]}:{daemon.sip_port}, "
                  f"RTP {daemon.rtp.first}-{daemon.rtp.last}, echo agent")
            _sipp_call(daemon, clip, workdir)
            _baresip_call(daemon, clip, workdir)
            print("\ndaemon log (calls):")
            for event in ("call_start", "call_end"):
                for fields in daemon.events(event):
                    print(f"  {event}: " + " ".join(
                        f"{k}={fields[k]}" for k in ("call_id", "codec", "reason", "duration_s",
                                                     "packets_in", "packets_out") if k in fields))
            print(f"\nstopping voxgated: exit {daemon.terminate()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
