"""Recognition accuracy and rejection: a phrase corpus through G.711, a confusion table.

Run from the repository root as ``python -m bench.recognition``. Each phrase
of the corpus is spoken by espeak-ng in several voices and rates
(``--voices``), put through G.711 µ-law (``tests.agents.speech.speak_pcm``),
padded with silence and decoded in this process by the recogniser worker's
:class:`~voxgate.agents.recognizer_worker.Engine` with the built-in menu's
step grammars. Phrase classes:

- ``menu``: the built-in menu's phrases, in the step that expects them;
- ``digits``: spoken digit strings, in the ``account`` step;
- ``oog``: sentences the menu does not know (out of grammar), spread over the steps.

For each rejection method it prints, per class: accepted-correct (the
grammar's words are what was said), accepted-wrong, rejected; and, for the
out-of-grammar class, how many were accepted as a choice that hangs up:

- ``forced``: no rejection (every grammar path is taken, the old behaviour);
- ``fit>=T``: the grammar path's calibrated confidence (its acoustic fit,
  :func:`~voxgate.agents.recognizer_worker.grammar_fit`) at least T, for each
  threshold of ``--thresholds``;
- ``lm-words``: the free-form language-model transcript holds the grammar's words.

Then the confidence of every accepted-correct and accepted-wrong utterance per
class (for choosing ``[agent.menu]`` thresholds), and the mean decode time.

Last, what the caller gets: each utterance answered by the built-in menu's
:class:`~voxgate.agents.dialogue.Dialogue` in its step, with the worker's
rejection floor and the ``[agent.menu]`` thresholds in force (defaults, or
``--min-confidence`` …), per class: routed to the right choice, asked back
(a yes/no question about the right choice), no-match, wrong choice, and call
ended by a wrong choice; and how many of the words said the free-form
transcript holds.
Figures only: it never passes or fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.agents.speech import speak_pcm
from tests.harness import missing_tools

from voxgate.agents.dialogue import (
    BUILTIN_MENU,
    NO_MATCH,
    Answer,
    Dialogue,
    Menu,
    SpeechInput,
    intent_of,
    normalize,
    spoken_digits,
)
from voxgate.agents.recognizer import menu_grammars
from voxgate.agents.recognizer_worker import REJECT_BELOW, Decoded, Engine

MENU_PHRASES = (
    ("main", "balance"), ("main", "my balance"), ("main", "agent"), ("main", "an agent"),
    ("main", "goodbye"), ("main", "bye"), ("more", "yes"), ("more", "no"),
    ("more", "goodbye"), ("account", "goodbye"),
)
DIGIT_STRINGS = (
    "four five six", "one two three four", "nine oh eight seven", "two five",
    "seven seven three one", "zero six", "eight", "three one four one five", "six six two",
    "one oh oh nine",
)
OUT_OF_GRAMMAR = (
    "can you call me back tomorrow morning", "I want to check my account balance please",
    "what are your opening hours", "hello is anybody there", "I would like to speak to someone",
    "maybe later", "cancel my order", "I am not sure", "my number is four five six",
    "where is my parcel", "please hold on a second", "I have a question about my bill",
    "is this the right number", "thank you very much", "sorry what did you say",
    "I need help with my password", "transfer me to sales", "how much does it cost",
    "the weather is nice today", "I lost my card", "can I pay by phone",
    "what time do you close", "let me think about it", "I don't know",
)
VOICES = ("en-us:150", "en-gb:180", "en-us+f3:130", "en-gb-scotland:165", "en-us+m3:190")
"""espeak-ng voice:rate (words per minute) pairs."""
SILENCE = bytes(6400)
"""400 ms at 8 kHz PCM16 on each side: the daemon's utterances have its pre-roll before
and at least ``[agent] endpoint_check_ms`` (300) after; the recogniser trims the rest."""
CLASSES = ("menu", "digits", "oog")
SAME = {"goodbye": ("goodbye", "bye")}
"""What counts as correct besides the phrase itself (one choice takes both)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One phrase spoken and decoded."""

    cls: str
    step: str
    text: str
    voice: str
    decoded: Decoded

    @property
    def correct(self) -> bool:
        """Whether the grammar path's words are what was said."""
        return self.cls != "oog" and self.decoded.words in SAME.get(self.text, (self.text,))

    @property
    def hangs_up(self) -> bool:
        """Whether the grammar path's words pick a choice that ends the call."""
        step = BUILTIN_MENU.step(self.step)
        return any(choice.hangup and self.decoded.words in choice.phrases
                   for choice in step.choices)


def corpus() -> list[tuple[str, str, str]]:
    """(class, step, text) for every phrase."""
    steps = ("main", "more", "account")
    return ([("menu", step, text) for step, text in MENU_PHRASES]
            + [("digits", "account", text) for text in DIGIT_STRINGS]
            + [("oog", steps[i % len(steps)], text) for i, text in enumerate(OUT_OF_GRAMMAR)])


def decode_all(voices: Sequence[str]) -> list[Sample]:
    """Speak and decode the corpus in every voice."""
    engine = Engine(min_confidence=0.0)
    grammars = menu_grammars(BUILTIN_MENU)
    samples = []
    for spec in voices:
        voice, _, rate = spec.partition(":")
        for cls, step, text in corpus():
            pcm = SILENCE + speak_pcm(text, voice=voice, rate_wpm=int(rate or 150)) + SILENCE
            decoded = engine.decode(pcm, grammars[step], free_form=True)
            samples.append(Sample(cls, step, text, spec, decoded))
        print(f"  decoded {len(samples)} utterances ({spec})", file=sys.stderr)
    return samples


def lm_words(sample: Sample) -> bool:
    """Method lm-words: the free-form transcript holds every grammar word."""
    heard = sample.decoded.transcript.split()
    words = sample.decoded.words.split()
    return bool(words) and all(word in heard for word in words)


def methods(thresholds: Sequence[float]) -> list[tuple[str, Callable[[Sample], bool]]]:
    """(name, accepts) of every rejection method compared."""
    def fit(threshold: float) -> Callable[[Sample], bool]:
        return lambda s: bool(s.decoded.words) and s.decoded.confidence >= threshold
    return ([("forced", lambda s: bool(s.decoded.words))]
            + [(f"fit>={t:g}", fit(t)) for t in thresholds]
            + [("lm-words", lm_words)])


def print_table(samples: Sequence[Sample], thresholds: Sequence[float]) -> None:
    """The confusion table: per method and class, accepted-correct / -wrong / rejected."""
    print(f"{len(samples)} utterances; per class: accepted-correct / accepted-wrong / "
          "rejected (oog: accepted / hang-up choices / rejected)")
    header = f"{'method':<10}" + "".join(f"{cls:>22}" for cls in CLASSES)
    print(header)
    for name, accepts in methods(thresholds):
        cells = []
        for cls in CLASSES:
            group = [s for s in samples if s.cls == cls]
            taken = [s for s in group if accepts(s)]
            right = sum(s.correct for s in taken)
            second = sum(s.hangs_up for s in taken) if cls == "oog" else len(taken) - right
            first = len(taken) if cls == "oog" else right
            cells.append(f"{first:>4} / {second:>3} / {len(group) - len(taken):>3}"
                         f" ({len(group)})")
        print(f"{name:<10}" + "".join(f"{cell:>22}" for cell in cells))


def print_confidences(samples: Sequence[Sample]) -> None:
    """Confidence of the correct and the wrong grammar paths, per class."""
    print("confidence of the grammar path (sorted), c = correct words, w = wrong:")
    for cls in CLASSES:
        group = sorted((s for s in samples if s.cls == cls and s.decoded.words),
                       key=lambda s: s.decoded.confidence)
        text = " ".join(f"{'c' if s.correct else 'w'}{s.decoded.confidence:.2f}"
                        for s in group)
        print(f"  {cls}: {text}")
    print("most confident out-of-grammar utterances:")
    worst = sorted((s for s in samples if s.cls == "oog"), key=lambda s: -s.decoded.confidence)
    for s in worst[:5]:
        print(f"  {s.decoded.confidence:.2f} {s.text!r} as {s.decoded.words!r} "
              f"(step {s.step}, {s.voice})")
    times = [s.decoded.decode_s * 1000 for s in samples]
    print(f"decode (grammar + free-form) per utterance: mean {statistics.fmean(times):.0f} ms, "
          f"max {max(times):.0f} ms")


def menu_answer(menu: Menu, sample: Sample) -> Answer:
    """What a fresh dialogue in the sample's step answers, as the daemon would (the
    worker's rejection floor, then ``menu``'s thresholds)."""
    decoded = sample.decoded
    kept = decoded.confidence >= REJECT_BELOW
    dialogue = Dialogue(menu)
    dialogue.go(Answer("", sample.step))
    return dialogue.respond(SpeechInput(decoded.transcript, decoded.words if kept else "",
                                        decoded.confidence if kept else 0.0))


def expected_intent(menu: Menu, sample: Sample) -> str:
    """The intent the sample should be taken as (no-match for out-of-grammar sentences)."""
    said = normalize(sample.text)
    for choice in menu.step(sample.step).choices:
        if sample.cls != "oog" and (said in choice.phrases
                                    or (sample.cls == "digits" and choice.digits)):
            return intent_of(choice)
    return NO_MATCH


def outcome(menu: Menu, sample: Sample) -> str:
    """``routed``, ``asked`` (a question about the right choice), ``no-match``, ``wrong``
    or ``HANG-UP`` (a wrong choice that ends the call)."""
    answer = menu_answer(menu, sample)
    if answer.intent == NO_MATCH:
        return "no-match"
    digits = answer.confirming.digits if answer.confirming is not None else answer.digits
    if answer.intent == expected_intent(menu, sample) \
            and digits == spoken_digits(normalize(sample.text)):
        return "asked" if answer.confirming is not None else "routed"
    return "HANG-UP" if answer.hangup else "wrong"


OUTCOMES = ("routed", "asked", "no-match", "wrong", "HANG-UP")


def print_outcomes(samples: Sequence[Sample], menu: Menu) -> None:
    """What the caller gets per class, and the free-form transcripts' share of the words."""
    print(f"what the caller gets (min_confidence {menu.min_confidence:g}, hangup_confidence "
          f"{menu.hangup_confidence:g}, confirm_digits_below {menu.confirm_digits_below:g}):")
    print(f"{'class':<8}" + "".join(f"{name:>10}" for name in OUTCOMES) + f"{'words':>8}")
    for cls in CLASSES:
        group = [s for s in samples if s.cls == cls]
        counts = [sum(outcome(menu, s) == name for s in group) for name in OUTCOMES]
        shares = [len(set(normalize(s.text).split()) & set(s.decoded.transcript.split()))
                  / len(set(normalize(s.text).split())) for s in group]
        print(f"{cls:<8}" + "".join(f"{count:>10}" for count in counts)
              + f"{statistics.fmean(shares):>8.0%}")


def main(argv: list[str] | None = None) -> int:
    """Decode the corpus and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voices", nargs="+", default=list(VOICES),
                        help="espeak-ng voice:rate pairs (default: %(default)s)")
    parser.add_argument("--thresholds", nargs="+", type=float,
                        default=[0.2, 0.5, 0.6, 0.7, 0.8, 0.9])
    for key in ("min_confidence", "hangup_confidence", "confirm_digits_below"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=float,
                            default=getattr(BUILTIN_MENU, key))
    args = parser.parse_args(argv)
    missing = missing_tools("espeak-ng")
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    samples = decode_all(args.voices)
    print_table(samples, args.thresholds)
    print_confidences(samples)
    print_outcomes(samples, dataclasses.replace(
        BUILTIN_MENU, min_confidence=args.min_confidence,
        hangup_confidence=args.hangup_confidence,
        confirm_digits_below=args.confirm_digits_below))
    return 0


if __name__ == "__main__":
    sys.exit(main())
