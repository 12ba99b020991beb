"""One recognition worker process: pocketsphinx off the daemon's event loop.

Run as ``python -m voxgate.agents.recognizer_worker --memory-bytes N`` by
:class:`voxgate.agents.recognizer.RecognizerPool`. The worker limits its own
address space (``RLIMIT_AS``), lowers its CPU priority below the daemon's
(``SCHED_IDLE``, else nice 19: the event loop's media tick always preempts a
decode), builds its decoders once and then answers requests on stdin/stdout
until stdin reaches EOF, which is also how it ends when the daemon dies (the
pipe closes with it). Not ``PR_SET_PDEATHSIG``: it fires when the *thread*
that forked the worker ends, and Trio forks from a cached worker thread that
exits after 10 s idle.

Wire format, both directions (:func:`encode_message`, :class:`MessageReader`)::

    0       4       8
    +-------+-------+--------------------+-------------------+
    | hlen  | plen  | header (JSON, hlen) | payload (plen)   |
    +-------+-------+--------------------+-------------------+
    hlen, plen: unsigned 32-bit big-endian

Requests: ``{"grammar": JSGF text, "free_form": bool}`` + 8 kHz PCM16 mono;
the first message is ``{"init": true}`` (no payload), answered by
``{"ready": true, "pid": …}`` once the decoders are built. Replies:
``{"transcript", "matched", "confidence", "decode_s"}``, no payload; a request
the worker cannot handle is answered ``{"error": "…"}``.

:class:`Engine` holds two pocketsphinx decoders, built once: the grammar
decoder (en-us acoustic model and dictionary, one JSGF search per grammar
text seen, at most :data:`MAX_GRAMMARS`, least recently used dropped) and the
free-form decoder (the same plus the en-us language model, with narrower
beams: :data:`FREE_FORM_BEAMS`). Audio is trimmed of leading and trailing
quiet (:func:`trim_silence`) and resampled to the model's 16 kHz. Rejection
and confidence: see :func:`grammar_fit` and :func:`fit_confidence`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import signal
import struct
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from pocketsphinx import Decoder

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

HEADER = struct.Struct("!II")
"""Each message's prefix: the JSON header's length, the payload's length."""
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 16000 * 600
"""Ten minutes of 8 kHz PCM16: the most ``[budget] utterance_ms`` allows."""
RATE_HZ = 8000
MODEL_RATE_HZ = 16000
MAX_GRAMMARS = 64
"""JSGF searches a worker keeps (one per distinct grammar text)."""
_FILLERS = frozenset({"<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "(NULL)"})
"""Segments that are not words: silence, noise, the grammar's null transitions."""

FIT_CENTRE = 17.0
"""Mean acoustic deficit per frame (see :func:`grammar_fit`) that maps to confidence 0.5."""
FIT_SCALE = 2.0
"""Deficit units per e-fold of the confidence's odds."""
TRIM_BELOW_DB = 30
TRIM_MARGIN_MS = 300
FREE_FORM_BEAMS = {"beam": 1e-40, "wbeam": 1e-30, "pbeam": 1e-40, "maxhmmpf": 3000}
"""Narrower than pocketsphinx's defaults: half the time, much the same transcripts."""
REJECT_BELOW = 0.2
"""The grammar's words are a no-match below this confidence, whatever the menu's
thresholds (``[agent.menu] min_confidence`` and the others apply above it)."""


class BadMessage(ValueError):
    """Bytes that are not a well-formed message (lengths out of range, bad JSON)."""


def encode_message(header: Mapping[str, object], payload: bytes = b"") -> bytes:
    """One message: the length prefix, ``header`` as JSON, ``payload``."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return HEADER.pack(len(text), len(payload)) + text + payload


class MessageReader:
    """Bytes in, messages out; sans-IO (h11 style): :meth:`feed`, then :meth:`next`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        """Append bytes received."""
        self._buffer += data

    def next_untrusted(self) -> tuple[dict[str, object], bytes] | None:
        """The next complete message, or None until more bytes are fed.

        Raises:
            BadMessage: a length above its maximum or a header that is not a JSON object.
        """
        if len(self._buffer) < HEADER.size:
            return None
        header_len, payload_len = HEADER.unpack_from(self._buffer)
        if header_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
            raise BadMessage(f"message too long: header {header_len}, payload {payload_len}")
        end = HEADER.size + header_len + payload_len
        if len(self._buffer) < end:
            return None
        raw = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        try:
            header = json.loads(raw[:header_len])
        except ValueError as e:
            raise BadMessage(f"header is not JSON: {e}") from e
        if not isinstance(header, dict):
            raise BadMessage("header is not a JSON object")
        return header, raw[header_len:]


@dataclass(frozen=True, slots=True)
class Decoded:
    """What :meth:`Engine.decode` found.

    Attributes:
        words: the grammar path's words ("" when it found none).
        matched: ``words`` when the rejection accepts them, else "".
        confidence: 0..1 (see :func:`grammar_fit`); 0.0 when ``matched`` is "".
        fit: the grammar path's mean acoustic deficit per frame (lower fits better).
        transcript: the free-form transcript ("" when not asked for or nothing heard).
        decode_s: seconds spent decoding.
    """

    words: str
    matched: str
    confidence: float
    fit: float
    transcript: str
    decode_s: float

    def reply(self) -> dict[str, object]:
        """The reply message's header."""
        return {"transcript": self.transcript, "matched": self.matched,
                "confidence": self.confidence, "decode_s": self.decode_s}


def fit_confidence(fit: float) -> float:
    """The calibrated confidence 0..1 of a grammar path with mean deficit ``fit``:
    a logistic curve, 0.5 at :data:`FIT_CENTRE`."""
    return 1.0 / (1.0 + math.exp((fit - FIT_CENTRE) / FIT_SCALE))


class Engine:
    """The grammar and free-form decoders of one worker (in-process for the benchmark).

    Args:
        min_confidence: below this the grammar's words are rejected (``matched`` "").
    """

    def __init__(self, *, min_confidence: float) -> None:
        # bestpath=False: no lattice pass, which costs seconds on long digit strings.
        self._grammars = Decoder(loglevel="FATAL", samprate=MODEL_RATE_HZ, bestpath=False,
                                 lm=None)
        self._free_form = Decoder(loglevel="FATAL", samprate=MODEL_RATE_HZ, bestpath=False,
                                  **FREE_FORM_BEAMS)
        self._logmath = self._grammars.get_logmath()
        self._searches: OrderedDict[str, str] = OrderedDict()
        self.min_confidence = min_confidence

    def decode(self, pcm: bytes, grammar: str, *, free_form: bool) -> Decoded:
        """Decode ``pcm`` (8 kHz PCM16 mono) with the JSGF ``grammar`` and, when
        ``free_form``, with the language model too.

        Raises:
            RuntimeError: pocketsphinx cannot parse ``grammar``.
        """
        started = time.perf_counter()
        audio, _ = audioop.ratecv(trim_silence(pcm), 2, 1, RATE_HZ, MODEL_RATE_HZ, None)
        heard, deficit, frames = self._run(self._grammars, self._search(grammar), audio)
        words = " ".join(heard)
        fit = grammar_fit(deficit, frames)
        confidence = fit_confidence(fit) if words else 0.0
        accepted = bool(words) and confidence >= self.min_confidence
        transcript = ""
        if free_form:
            transcript = " ".join(self._run(self._free_form, None, audio)[0])
        return Decoded(words, words if accepted else "", confidence if accepted else 0.0,
                       fit, transcript, time.perf_counter() - started)

    def _search(self, grammar: str) -> str:
        """The name of the JSGF search for ``grammar``, added on first use."""
        name = "g" + hashlib.sha1(grammar.encode()).hexdigest()[:16]
        if name in self._searches:
            self._searches.move_to_end(name)
            return name
        self._grammars.add_jsgf_string(name, grammar)
        self._searches[name] = grammar
        if len(self._searches) > MAX_GRAMMARS:
            old, _ = self._searches.popitem(last=False)
            self._grammars.remove_search(old)
        return name

    def _run(self, decoder: Decoder, search: str | None,
             audio: bytes) -> tuple[list[str], int, int]:
        """Decode with ``decoder`` (``search`` activated, when given): the words, the
        path's acoustic deficit, the frames."""
        if search is not None:
            decoder.activate_search(search)
        decoder.start_utt()
        decoder.process_raw(audio, full_utt=True)  # batch CMN: the model's feature setup
        decoder.end_utt()
        words: list[str] = []
        deficit = 0
        for segment in decoder.seg() or ():  # None: nothing decoded
            if segment.ascore > 0:
                # The binding hands out exp(score); scores are relative to the best
                # senone of each frame, so -log is how far the path is from the best.
                deficit -= self._logmath.log(segment.ascore)
            if segment.word not in _FILLERS:
                words.append(segment.word.split("(", 1)[0])
        return words, deficit, decoder.n_frames()


def grammar_fit(deficit: int, frames: int) -> float:
    """The grammar path's mean acoustic deficit per frame: how far, on average,
    the best path through the grammar (silence included) scores below the best
    senone of each frame, in pocketsphinx's scaled log units.

    Speech outside the grammar is forced onto some phrase or into silence,
    and both fit it badly: measured on espeak-ng speech in five voices through
    G.711 (``python -m bench.recognition``), a fit below :data:`FIT_CENTRE`
    held 33 of 50 menu phrases (all of them right) and 1 of 120 out-of-grammar
    sentences. :func:`fit_confidence` maps it onto 0..1.
    """
    return deficit / frames if frames else math.inf


def trim_silence(pcm: bytes) -> bytes:
    """``pcm`` (8 kHz PCM16) with exactly :data:`TRIM_MARGIN_MS` of quiet before and
    after its loud part (10 ms blocks within :data:`TRIM_BELOW_DB` of the loudest):
    longer quiet is cut, shorter is padded with digital silence. The grammar fit is
    a mean over frames, so it must not depend on how much pre-roll and VAD tail
    came with the speech."""
    block = RATE_HZ // 100 * 2
    levels = [audioop.rms(pcm[i:i + block], 2) for i in range(0, len(pcm), block)]
    loud = [i for i, level in enumerate(levels)
            if level > max(levels, default=0) * 10 ** (-TRIM_BELOW_DB / 20)]
    if not loud:
        return pcm
    margin = TRIM_MARGIN_MS // 10
    first, last = max(0, loud[0] - margin), min(len(levels), loud[-1] + 1 + margin)
    before = bytes((margin - (loud[0] - first)) * block)
    after = bytes((margin - (last - loud[-1] - 1)) * block)
    return before + pcm[first * block:last * block] + after


def _yield_cpu() -> None:
    """Run below the daemon: SCHED_IDLE, or nice 19 where that is refused (a seccomp
    filter answering EPERM); neither raises."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        with contextlib.suppress(OSError):
            os.nice(19)


def _read_message(stream: BinaryIO, reader: MessageReader) -> tuple[dict[str, object],
                                                                     bytes] | None:
    """The next message from ``stream``; None at EOF."""
    while (message := reader.next_untrusted()) is None:
        data = stream.read1(1 << 16)  # type: ignore[attr-defined]
        if not data:
            return None
        reader.feed(data)
    return message


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests from ``stdin`` on ``stdout`` until EOF."""
    reader = MessageReader()
    engine: Engine | None = None
    while (message := _read_message(stdin, reader)) is not None:
        header, payload = message
        if engine is None:
            engine = Engine(min_confidence=REJECT_BELOW)
            reply: dict[str, object] = {"ready": True, "pid": os.getpid()}
        else:
            try:
                reply = engine.decode(payload, str(header["grammar"]),
                                      free_form=bool(header.get("free_form", True))).reply()
            except (KeyError, RuntimeError) as e:
                reply = {"error": str(e)[:200]}
        stdout.write(encode_message(reply))
        stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """The worker's entry point (``python -m voxgate.agents.recognizer_worker``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    _yield_cpu()
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's Ctrl-C is not ours
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except (BadMessage, BrokenPipeError, MemoryError) as e:
        print(f"recognizer worker: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
