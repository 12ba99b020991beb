"""Run baresip 1.0 headless as a caller that plays the clip and records the answer.

A config directory (``-f DIR``) is generated per run: ``aufile`` is the audio
source (the 16-bit clip; baresip hangs up at its end), ALSA's ``null`` device
the player, ``sndfile`` dumps what was sent (``*-enc.wav``) and the decoded
audio received (``*-dec.wav``) into a directory, ``g711`` is the only codec,
``menu`` executes the ``-e "/dial URI"`` command, and the single account
(``regint=0``) never registers. ``-t`` bounds the whole run. With
``mediaenc="srtp-mand"`` the ``srtp`` module is loaded and the account offers
only RTP/SAVP with SDES keys (RFC 4568 ``a=crypto``). As a callee
(:func:`start_callee`) the account answers every call at once
(``answermode=auto``) and plays and records the same way.
only RTP/SAVP with SDES keys (RFC 4568 ``a=crypto``). With ``transport="tls"``
(or ``"tcp"``) the account and the dialled URI carry ``;transport=…`` and
``cafile`` (``sip_cafile``) is what the server's certificate is checked against.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.audio import (
    SAMPLE_RATE_HZ,
    SpeechClip,
    active_ratio,
    compare_echo,
    read_wav,
)

MODULE_PATH = Path("/usr/lib/baresip/modules")
_KILL_TIMEOUT_S = 10.0
_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class BaresipResult:
    """Exit code, console output and the decoded-audio recording (if any)."""

    returncode: int
    output: str
    received_wav: Path | None
    sent_wav: Path | None


def write_config(
    config_dir: Path,
    *,
    clip: SpeechClip,
    sip_port: int,
    rtp_first: int,
    rtp_last: int,
    record_dir: Path,
    mediaenc: str | None = None,
    max_calls: int = 1,
    auto_answer: bool = False,
    transport: str | None = None,
    cafile: Path | None = None,
) -> None:
    """Write ``config`` and ``accounts`` for one headless PCMU/PCMA caller
    (``mediaenc``: the account's media encryption, e.g. ``srtp-mand``;
    ``max_calls`` calls at once: 2 lets it follow a REFER, RFC 3515;
    ``auto_answer``: it answers incoming calls at once; ``transport``,
    ``cafile``: see the module docstring)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    record_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        ("poll_method", "epoll"),
        ("sip_listen", f"127.0.0.1:{sip_port}"),
        ("call_local_timeout", "30"),
        ("call_max_calls", str(max_calls)),
        ("audio_source", f"aufile,{clip.pcm16_wav}"),
        ("audio_player", "alsa,null"),
        ("audio_alert", "alsa,null"),
        ("ausrc_srate", str(SAMPLE_RATE_HZ)),
        ("auplay_srate", str(SAMPLE_RATE_HZ)),
        ("ausrc_channels", "1"),
        ("auplay_channels", "1"),
        ("audio_buffer", "20-160"),
        ("rtp_ports", f"{rtp_first}-{rtp_last}"),
        ("rtcp_mux", "no"),
        ("jitter_buffer_delay", "5-10"),
        ("module_path", str(MODULE_PATH)),
        ("module", "g711.so"),
        ("module", "aufile.so"),
        ("module", "alsa.so"),
        ("module", "sndfile.so"),
        *([("module", "srtp.so")] if mediaenc else []),
        ("module_tmp", "account.so"),
        ("module_app", "menu.so"),
        ("snd_path", str(record_dir)),
        *([("sip_cafile", str(cafile))] if cafile else []),
    ]
    (config_dir / "config").write_text("".join(f"{k}\t{v}\n" for k, v in settings))
    account = f"<sip:caller@127.0.0.1:{sip_port}>;regint=0;audio_codecs=PCMU,PCMA"
    if mediaenc:
        account += f";mediaenc={mediaenc}"
    if auto_answer:
        account += ";answermode=auto"
    if transport:
        account += f";transport={transport}"
    (config_dir / "accounts").write_text(account + "\n")


def start_callee(
    workdir: Path, *, clip: SpeechClip, sip_port: int, rtp_first: int, rtp_last: int,
    run_s: int,
) -> subprocess.Popen[bytes]:
    """Start baresip answering calls to ``sip:…@127.0.0.1:sip_port`` at once, playing the
    clip (it hangs up at the clip's end) and recording what it hears; quits after
    ``run_s`` seconds. End it with :func:`finish_call`."""
    config_dir = workdir / "baresip"
    write_config(config_dir, clip=clip, sip_port=sip_port, rtp_first=rtp_first,
                 rtp_last=rtp_last, record_dir=workdir / "recordings", auto_answer=True)
    argv = ["baresip", "-f", str(config_dir), "-t", str(run_s)]
    with (workdir / "baresip.log").open("wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def call_and_record(
    target: tuple[str, int],
    workdir: Path,
    *,
    clip: SpeechClip,
    sip_port: int,
    rtp_first: int,
    rtp_last: int,
    run_s: int,
    mediaenc: str | None = None,
    max_calls: int = 1,
    transport: str | None = None,
    cafile: Path | None = None,
) -> BaresipResult:
    """Dial ``sip:echo@HOST:PORT``, play the clip, quit after ``run_s`` seconds
    (``mediaenc``, ``transport``, ``cafile``: see :func:`write_config`).

    Raises:
        subprocess.TimeoutExpired: baresip outlived ``run_s`` plus a grace period
            (it is killed first).
    """
    proc = start_call(target, workdir, clip=clip, sip_port=sip_port, rtp_first=rtp_first,
                      rtp_last=rtp_last, run_s=run_s, mediaenc=mediaenc, max_calls=max_calls,
                      transport=transport, cafile=cafile)
    return finish_call(proc, workdir, run_s)


def start_call(
    target: tuple[str, int],
    workdir: Path,
    *,
    clip: SpeechClip,
    sip_port: int,
    rtp_first: int,
    rtp_last: int,
    run_s: int,
    mediaenc: str | None = None,
    max_calls: int = 1,
    transport: str | None = None,
    cafile: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start baresip dialing ``sip:echo@HOST:PORT`` (quits after ``run_s`` seconds);
    console output to ``workdir/baresip.log``. End it with :func:`finish_call`
    (``mediaenc``, ``max_calls``, ``transport``, ``cafile``: see :func:`write_config`)."""
    config_dir = workdir / "baresip"
    write_config(
        config_dir, clip=clip, sip_port=sip_port, rtp_first=rtp_first, rtp_last=rtp_last,
        record_dir=workdir / "recordings", mediaenc=mediaenc, max_calls=max_calls,
        transport=transport, cafile=cafile,
    )
    uri = f"sip:echo@{target[0]}:{target[1]}" + (f";transport={transport}" if transport else "")
    argv = [
        "baresip", "-f", str(config_dir),
        "-e", f"/dial {uri}", "-t", str(run_s),
    ]
    with (workdir / "baresip.log").open("wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def finish_call(proc: subprocess.Popen[bytes], workdir: Path, run_s: int) -> BaresipResult:
    """Wait for baresip started by :func:`start_call` (``run_s`` plus a grace period,
    then it is killed) and collect its output and recordings.

    Raises:
        subprocess.TimeoutExpired: baresip outlived ``run_s`` plus the grace period.
    """
    record_dir = workdir / "recordings"
    log_path = workdir / "baresip.log"
    try:
        returncode = proc.wait(timeout=run_s + _GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=_KILL_TIMEOUT_S)
    return BaresipResult(
        returncode=returncode,
        output=log_path.read_text(errors="replace"),
        received_wav=_newest(record_dir, "*-dec.wav"),
        sent_wav=_newest(record_dir, "*-enc.wav"),
    )


def _newest(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def assert_echoed(result: BaresipResult, clip: SpeechClip) -> None:
    """Assert that baresip's recording of the call holds the echo of ``clip``: long
    enough, not silence, and its voiced segments found in order (see
    :func:`tests.harness.audio.compare_echo`)."""
    assert result.received_wav is not None, result.output[-3000:]
    received = read_wav(result.received_wav).to_pcm16()
    assert len(received) / 2 / 8000 >= clip.duration_s * 0.8, result.output[-3000:]
    assert active_ratio(received) >= 0.3, "the recording is (nearly) silence"
    match = compare_echo(received, clip.pcm16)
    assert match.segments_matched >= 0.7, match
    assert match.overlap_s >= clip.duration_s * 0.7, match
