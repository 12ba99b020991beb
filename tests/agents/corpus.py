"""A phrase corpus of caller speech for the recogniser: espeak-ng voices by rates, via G.711.

Three classes of phrases, each said by every voice of :data:`VOICES` at every
rate of :data:`RATES_WPM` (espeak-ng, 8 kHz, once through µ-law as a PCMU
call delivers it):

- ``in-grammar``: the phrases of :data:`~voxgate.agents.dialogue.BUILTIN_MENU`
  in the step that expects them; the expected outcome is the choice's intent.
- ``out-of-grammar``: sentences a caller might say that the menu does not know;
  the expected outcome is a no-match (a few name a menu word, and matching that
  choice is also right: :attr:`Utterance.accepted`).
- ``digits``: spoken account numbers in the step that takes digits.

Synthesis is cached per process (a test session synthesises each clip once).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from tests.agents.speech import speak_pcm
from voxgate.agents.dialogue import BUILTIN_MENU, DIGIT_WORDS, NO_MATCH, Menu, intent_of, normalize

VOICES = ("en-us", "en-gb", "en-us+f3")
"""espeak-ng voices: American and British male, an American female variant."""
RATES_WPM = (130, 160, 190)
"""Speaking rates, words per minute (espeak-ng's default is 175)."""
PAD = bytes(3200)
"""200 ms of silence either side of a clip, as the VAD leaves around an utterance."""

IN_GRAMMAR = "in-grammar"
OUT_OF_GRAMMAR = "out-of-grammar"
DIGITS = "digits"
CLASSES = (IN_GRAMMAR, OUT_OF_GRAMMAR, DIGITS)

OUT_OF_GRAMMAR_SENTENCES = (
    "can you call me back tomorrow morning",
    "I want to check my account balance please",
    "what time do you open on saturday",
    "I lost my credit card yesterday",
    "hello is anybody there",
    "I would like to change my address",
    "my internet connection is not working",
    "can I speak to someone about a refund",
    "I have a question about my last bill",
    "where is the nearest branch",
    "please send me a new statement",
    "the weather is lovely today",
    "I think I dialled the wrong number",
    "could you repeat that please",
    "I need to report a problem with my order",
    "how much does the premium plan cost",
    "my name is john smith",
    "I am calling about the letter you sent me",
    "can I pay my bill by card",
    "I would like to cancel my subscription",
    "sorry I was not listening",
    "what are your opening hours",
)
"""What callers say that the built-in menu does not expect."""
DIGIT_STRINGS = ("four five six", "one two three four", "seven eight nine",
                 "two oh one five", "nine zero three")
"""Spoken account numbers (the builtin ``account`` step takes digit strings)."""
DIGITS_STEP = "account"


@dataclass(frozen=True, slots=True)
class Utterance:
    """One clip of the corpus.

    Attributes:
        kind: one of :data:`CLASSES`.
        step: the menu step it is said in (its grammar decodes it).
        text: what is said.
        expected: the intent it must route to (:func:`~voxgate.agents.dialogue.intent_of`
            of a choice of the step), or :data:`~voxgate.agents.dialogue.NO_MATCH`.
        accepted: every intent that is right (``expected`` and, for a sentence
            naming a menu word, that word's choice unless it hangs up).
        voice: the espeak-ng voice.
        rate_wpm: the speaking rate.
    """

    kind: str
    step: str
    text: str
    expected: str
    accepted: frozenset[str]
    voice: str
    rate_wpm: int

    @property
    def digits(self) -> str:
        """The digit string said ("" for other classes)."""
        if self.kind != DIGITS:
            return ""
        return "".join(DIGIT_WORDS[word] for word in self.text.split())

    @property
    def label(self) -> str:
        """``step: text [voice @rate]``, for failure messages and tables."""
        return f"{self.step}: {self.text!r} [{self.voice} @{self.rate_wpm}]"

    def pcm(self) -> bytes:
        """The clip, 8 kHz PCM16 after µ-law, with :data:`PAD` either side."""
        return PAD + _speak(self.text, self.voice, self.rate_wpm) + PAD


@functools.cache
def _speak(text: str, voice: str, rate_wpm: int) -> bytes:
    return speak_pcm(text, rate_wpm=rate_wpm, voice=voice)


def intent_in(menu: Menu, step: str, words: str, *, hangup: bool = True) -> str:
    """The intent of the choice of ``step`` that ``words`` name (a digit string names the
    step's digits choice), :data:`~voxgate.agents.dialogue.NO_MATCH` for none; with
    ``hangup`` False, a choice that ends the call is none."""
    words = normalize(words)
    spoken = words.split()
    is_digits = bool(spoken) and all(word in DIGIT_WORDS for word in spoken)
    for choice in menu.step(step).choices:
        if (words in choice.phrases or (is_digits and choice.digits)) \
                and (hangup or not choice.hangup):
            return intent_of(choice)
    return NO_MATCH


def corpus(*, menu: Menu = BUILTIN_MENU, voices: tuple[str, ...] = VOICES,
           rates_wpm: tuple[int, ...] = RATES_WPM,
           out_of_grammar_steps: tuple[str, ...] | None = None) -> Iterator[Utterance]:
    """Every utterance: each phrase of each class by ``voices`` by ``rates_wpm``.

    Out-of-grammar sentences are said in every step of ``out_of_grammar_steps``
    (all steps of ``menu`` by default).
    """
    texts: list[tuple[str, str, str]] = [
        (IN_GRAMMAR, step.name, phrase)
        for step in menu.steps for choice in step.choices for phrase in choice.phrases]
    steps = out_of_grammar_steps or tuple(step.name for step in menu.steps)
    texts += [(OUT_OF_GRAMMAR, step, sentence)
              for step in steps for sentence in OUT_OF_GRAMMAR_SENTENCES]
    texts += [(DIGITS, DIGITS_STEP, digits) for digits in DIGIT_STRINGS]
    for kind, step, text in texts:
        expected = NO_MATCH if kind == OUT_OF_GRAMMAR else intent_in(menu, step, text)
        named = {intent_in(menu, step, word, hangup=False) for word in normalize(text).split()
                 if word not in DIGIT_WORDS} if kind == OUT_OF_GRAMMAR else set()
        accepted = frozenset({expected} | named)
        for voice in voices:
            for rate in rates_wpm:
                yield Utterance(kind, step, text, expected, accepted, voice, rate)
