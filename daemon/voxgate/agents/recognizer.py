"""Offline speech recognition for the local agent: pocketsphinx with one grammar per step.

A phone menu expects a few phrases; a JSGF grammar per menu step
(:func:`step_grammar`: the step's phrases, plus digit strings when a choice
takes them) recognises those reliably where the full language model does not.

Decoding runs without the lattice pass (``bestpath``), which would hold the
GIL for seconds on long inputs; the decode itself holds it for ~20 ms per
second of speech, the most the event loop can be held up by recognition.

Decoding runs in worker threads (``trio.to_thread.run_sync``) behind a
``trio.CapacityLimiter`` of ``[agent] recognizers``: at most that many
utterances are decoded at once and at most that many decoders exist. A
decoder (the acoustic model, dictionary and every step's grammar, ~0.2 s to
build) is built in a worker the first time one is needed and kept in a free
list for the next utterance. Audio comes in as the pipeline's 8 kHz PCM16 and
is resampled to the model's 16 kHz.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import trio
from pocketsphinx import Decoder, get_model_path

from voxgate.agents.dialogue import DIGIT_WORDS, Menu, Step
from voxgate.errors import ConfigError
from voxgate.pipeline.frames import RATE_HZ

with warnings.catch_warnings():
    # Python 3.11/3.12 deprecate audioop (PEP 594) with a DeprecationWarning at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MODEL_RATE_HZ = 16000
_SAMPLE_WIDTH_BYTES = 2
_FILLERS = frozenset({"<s>", "</s>", "<sil>", "[NOISE]", "[SPEECH]", "(NULL)"})
"""Segments that are not words: silence, noise, the grammar's null transitions."""


def step_grammar(step: Step) -> str:
    """The JSGF grammar (JSGF 1.0) of what ``step`` expects: its phrases and digit strings."""
    alternatives = sorted({phrase for choice in step.choices for phrase in choice.phrases})
    rules = ""
    if step.takes_digits:
        alternatives.append("<digit>+")
        rules = "<digit> = " + " | ".join(sorted(DIGIT_WORDS)) + ";\n"
    return (f"#JSGF V1.0;\ngrammar {step.name};\n"
            f"public <input> = {' | '.join(alternatives)};\n{rules}")


def menu_grammars(menu: Menu) -> dict[str, str]:
    """Step name → its grammar, for every step of ``menu``."""
    return {step.name: step_grammar(step) for step in menu.steps}


@dataclass(frozen=True, slots=True)
class Recognition:
    """One decoded utterance.

    Attributes:
        transcript: the words heard, "" when nothing of the grammar was.
        confidence: 0..1, the lowest word probability the decoder reports for
            the words heard (0 for an empty transcript).
        decode_s: seconds the decoder worked (waiting for a worker excluded).
    """

    transcript: str
    confidence: float
    decode_s: float


class RecognizerStats:
    """Counters of one :class:`Recognizer`."""

    __slots__ = ("decoders", "empty", "utterances")

    def __init__(self) -> None:
        self.utterances = 0
        self.empty = 0
        """Utterances with nothing of the grammar heard."""
        self.decoders = 0
        """Decoders built."""


class Recognizer:
    """Utterances → transcripts, shared by every session of a process.

    Args:
        grammars: search name → JSGF grammar text (see :func:`menu_grammars`).
        workers: most decoders, and most utterances decoded at once.
    """

    def __init__(self, grammars: Mapping[str, str], *, workers: int,
                 dictionary_path: str | None = None) -> None:
        self._grammars = dict(grammars)
        self._words = frozenset(word for text in grammars.values() for word in _words(text))
        self._dictionary_path = dictionary_path or get_model_path("en-us/cmudict-en-us.dict")
        self._lexicon: dict[str, str] | None = None
        self._preparing = trio.Lock()
        self._limiter = trio.CapacityLimiter(workers)
        self._free: list[Decoder] = []
        self.stats = RecognizerStats()

    def check_words(self) -> None:
        """Raise ConfigError when a grammar holds a word the dictionary does not know
        (reads the dictionary file: for start-up and ``--check-config``)."""
        load_lexicon(self._dictionary_path, self._words)

    async def prepare(self) -> None:
        """Load the grammars' pronunciations and build one decoder, if not done yet.

        Raises:
            ConfigError: a grammar holds a word the dictionary does not know.
        """
        async with self._preparing:
            if self._lexicon is None:
                self._lexicon = await trio.to_thread.run_sync(
                    load_lexicon, self._dictionary_path, self._words)
            if self.stats.decoders == 0:
                async with self._limiter:
                    self._free.append(await trio.to_thread.run_sync(self._new_decoder))
                    self.stats.decoders += 1

    async def recognize(self, pcm: bytes, grammar: str) -> Recognition:
        """Decode ``pcm`` (8 kHz 16-bit mono) with the grammar called ``grammar``.

        Raises:
            KeyError: no grammar of that name.
            ConfigError: as :meth:`prepare`.
        """
        if grammar not in self._grammars:
            raise KeyError(grammar)
        await self.prepare()
        async with self._limiter:
            decoder = self._free.pop() if self._free else None
            self.stats.decoders += decoder is None
            decoder, result = await trio.to_thread.run_sync(self._decode, decoder, pcm, grammar)
            self._free.append(decoder)
        self.stats.utterances += 1
        if not result.transcript:
            self.stats.empty += 1
        return result

    def _decode(self, decoder: Decoder | None, pcm: bytes,
                grammar: str) -> tuple[Decoder, Recognition]:
        """In a worker thread: decode with ``decoder`` (built first when None)."""
        if decoder is None:
            decoder = self._new_decoder()
        started = time.perf_counter()
        audio, _ = audioop.ratecv(pcm, _SAMPLE_WIDTH_BYTES, 1, RATE_HZ,
                                  MODEL_RATE_HZ, None)
        decoder.activate_search(grammar)  # (current_search() crashes before the first one)
        decoder.start_utt()
        decoder.process_raw(audio, full_utt=True)  # batch CMN: the model's feature setup
        decoder.end_utt()
        words = [(segment.word.split("(", 1)[0], segment.prob)
                 for segment in decoder.seg() or ()  # None: nothing decoded
                 if segment.word not in _FILLERS]
        transcript = " ".join(word for word, _ in words)
        confidence = _confidence(prob for _, prob in words)
        return decoder, Recognition(transcript, confidence, time.perf_counter() - started)

    def _new_decoder(self) -> Decoder:
        """A decoder knowing only the grammars' words: ~5 MiB instead of ~90 MiB with the
        full dictionary and language model, built in milliseconds."""
        assert self._lexicon is not None
        # bestpath=False: no lattice pass. With it, hyp() and seg() compute the lattice's
        # posteriors, seconds of CPU on a long digit string, all of it holding the GIL
        # (the event loop would stop); without it decoding is a few ms per second of speech.
        decoder = Decoder(loglevel="FATAL", samprate=MODEL_RATE_HZ, lm=None, dict=os.devnull,
                          bestpath=False)
        entries = list(self._lexicon.items())
        for i, (word, phones) in enumerate(entries):
            decoder.add_word(word, phones, i == len(entries) - 1)  # update once, at the end
        for name, text in self._grammars.items():
            decoder.add_jsgf_string(name, text)
        return decoder


def load_lexicon(dictionary_path: str, words: Iterable[str]) -> dict[str, str]:
    """The pronunciations of ``words`` from a CMU-style dictionary file.

    Keys are the dictionary's entries (``word``, and ``word(2)`` … for
    alternatives), values their phones.

    Raises:
        ConfigError: a word is not in the dictionary.
    """
    wanted = set(words)
    lexicon: dict[str, str] = {}
    with open(dictionary_path, encoding="utf-8") as f:
        for line in f:
            entry, _, phones = line.strip().partition(" ")
            if entry.split("(", 1)[0] in wanted:
                lexicon[entry] = phones.strip()
    unknown = sorted(wanted - {entry.split("(", 1)[0] for entry in lexicon})
    if unknown:
        raise ConfigError(f"[agent.menu]: words not in the recogniser's dictionary: "
                          f"{', '.join(unknown)}")
    return lexicon


def _words(grammar: str) -> Iterable[str]:
    """The words of a grammar made by :func:`step_grammar`."""
    for line in grammar.splitlines():
        if line.startswith(("public <input> =", "<digit> =")):
            body = line.split("=", 1)[1]
            yield from (w for w in body.replace("|", " ").rstrip(";").split()
                        if not w.startswith("<"))


def _confidence(posteriors: Iterable[float]) -> float:
    lowest = min(posteriors, default=0.0)
    return max(0.0, min(1.0, lowest))
