"""The control command ``devices``: the sound devices of the daemon's machine.

Lists what PortAudio (through ``sounddevice``) sees, with the ALSA PCM names
to put in ``[[alsa.lines]]`` ``capture``/``playback``: ``hw:CARD,DEV`` (the
device as it is: its own rates and channels) and ``plughw:CARD,DEV`` (ALSA
converts to the line's 8 or 16 kHz mono), using the card's stable id rather
than its number. Then the PCMs that ALSA's configuration defines
(``pyalsaaudio.pcms()``: ``null``, ``default``, plugins, an asoundrc's own).

PortAudio is probed in a child process (``python -m voxgate.control.devices``,
bounded by :data:`PROBE_TIMEOUT_S`): its initialisation walks every card and
ALSA plugin, can take seconds, and aborts the whole process on some ALSA
configurations, none of which may touch the daemon. ``sounddevice`` needs the
PortAudio library (Debian package ``libportaudio2``); pyalsaaudio is imported
when the command runs. What cannot be listed becomes a row of kind ``error``.

Result: a list of dicts, each with ``kind``:

- ``device``: ``index``, ``name``, ``hostapi``, ``inputs``, ``outputs``
  (channels), ``default_rate_hz``, ``alsa`` and ``alsa_plug`` (None when the
  device is not an ALSA hardware device);
- ``pcm``: ``name`` (an ALSA PCM name usable as is), ``capture`` and
  ``playback`` (whether it has that direction);
- ``error``: ``name`` (what failed), ``detail``.
"""

from __future__ import annotations

import importlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import trio

PROBE_TIMEOUT_S = 15.0
"""The PortAudio probe is given this long, then killed."""

# PortAudio's ALSA host API names a hardware device "… (hw:CARD_INDEX,DEVICE)".
_HW_SUFFIX = re.compile(r"\(hw:(\d+),(\d+)\)\s*$")

_LOCK = trio.Lock()


async def devices_command(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``devices`` command (no args); one listing at a time."""
    async with _LOCK:
        cards, pcms = await trio.to_thread.run_sync(alsa_cards_and_pcms)
        devices = await _probe_portaudio()
    for row in devices:
        if row["kind"] == "device":
            row["alsa"], row["alsa_plug"] = alsa_names(row["name"], cards)
    return [*devices, *pcms]


def alsa_names(device_name: str, cards: Mapping[int, str]) -> tuple[str | None, str | None]:
    """``("hw:PCH,0", "plughw:PCH,0")`` for a PortAudio name ending ``(hw:0,0)``, with
    card 0's id from ``cards`` (index → id; the number when unknown); Nones otherwise."""
    match = _HW_SUFFIX.search(device_name)
    if match is None:
        return None, None
    index, device = int(match.group(1)), match.group(2)
    card = cards.get(index, str(index))
    return f"hw:{card},{device}", f"plughw:{card},{device}"


def alsa_cards_and_pcms() -> tuple[dict[int, str], list[dict[str, Any]]]:
    """ALSA's cards (index → id) and its PCM rows, through pyalsaaudio. Blocking."""
    try:
        alsaaudio: Any = importlib.import_module("alsaaudio")
    except ImportError as e:
        return {}, [_error("pyalsaaudio", str(e))]
    try:
        cards = dict(zip(alsaaudio.card_indexes(), alsaaudio.cards(), strict=True))
        capture = alsaaudio.pcms(alsaaudio.PCM_CAPTURE)
        playback = alsaaudio.pcms(alsaaudio.PCM_PLAYBACK)
    except alsaaudio.ALSAAudioError as e:
        return {}, [_error("pyalsaaudio", str(e))]
    names = dict.fromkeys([*capture, *playback])
    return cards, [{"kind": "pcm", "name": name, "capture": name in capture,
                    "playback": name in playback} for name in names]


def portaudio_devices() -> list[dict[str, Any]]:
    """PortAudio's devices as rows (``alsa`` names left None). Blocking; may abort
    the process on a broken ALSA configuration: run it in the probe process."""
    try:
        sd: Any = importlib.import_module("sounddevice")
    except (ImportError, OSError) as e:  # OSError: the PortAudio library is missing
        return [_error("sounddevice", str(e))]
    hostapis = sd.query_hostapis()
    return [{
        "kind": "device", "index": index, "name": device["name"],
        "hostapi": hostapis[device["hostapi"]]["name"],
        "inputs": device["max_input_channels"], "outputs": device["max_output_channels"],
        "default_rate_hz": int(device["default_samplerate"]), "alsa": None, "alsa_plug": None,
    } for index, device in enumerate(sd.query_devices())]


async def _probe_portaudio() -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "voxgate.control.devices"]
    with trio.move_on_after(PROBE_TIMEOUT_S):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL)
        if done.returncode == 0:
            try:
                rows: list[dict[str, Any]] = json.loads(done.stdout)
            except ValueError as e:
                return [_error("sounddevice", f"bad probe output: {e}")]
            return rows
        status = (signal.Signals(-done.returncode).name if done.returncode < 0
                  else f"exit {done.returncode}")
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return [_error("sounddevice", f"PortAudio probe failed ({status}) {' '.join(tail)}")]
    return [_error("sounddevice", f"PortAudio probe took over {PROBE_TIMEOUT_S:g} s")]


def _error(name: str, detail: str) -> dict[str, Any]:
    return {"kind": "error", "name": name, "detail": detail.strip()}


def main() -> None:
    """The probe process: PortAudio's devices as JSON on stdout."""
    print(json.dumps(portaudio_devices()))


if __name__ == "__main__":
    main()
