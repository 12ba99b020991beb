"""The phone menu of the local agent: steps, what they expect, what they answer; sans-IO.

A :class:`Menu` is declarative (``[agent.menu]`` in the config, or
:data:`BUILTIN_MENU`)::

    greeting ─▶ start step ─(input)─▶ matching choice ─▶ say, next step (its prompt), hang up
                                 └──(nothing matches)──▶ no_match + the step's prompt again

An input is what the caller said (:class:`SpeechInput`, the recogniser's
transcript) or keyed (:class:`KeyInput`, RFC 4733 digits). A choice matches a
transcript by one of its ``phrases`` (compared after :func:`normalize`) and a
key string by its ``dtmf``; a choice with ``digits`` takes any digit string,
spoken ("one two three") or keyed ("123", ended by ``#``, the step's
``[agent.menu] dtmf_timeout_ms`` or ``max_digits``), and its ``say`` may
hold ``{digits}`` (spoken one digit at a time).

:class:`Dialogue` walks one call through the menu. It never reads a clock:
the key collector's deadline is exposed as :meth:`Dialogue.next_deadline` and
fired by :meth:`Dialogue.handle_timer` (aioquic style).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DIGIT_WORDS = {
    "zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
}
"""Spoken digit → its character; the recogniser's digit grammar uses these words."""

DTMF_END_KEY = "#"
_WORD = re.compile(r"[a-z']+")
_STEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_DIGITS_FIELD = "{digits}"


def normalize(text: str) -> str:
    """Lower-case words separated by one space; punctuation and digits dropped."""
    return " ".join(_WORD.findall(text.lower()))


@dataclass(frozen=True, slots=True)
class Choice:
    """One thing a step expects (``[[agent.menu.steps.choices]]``).

    Attributes:
        phrases: what the caller may say (words the recogniser's dictionary knows).
        dtmf: the key string that picks this choice ("" for none).
        digits: takes any digit string, spoken or keyed.
        say: the answer ("" says nothing); ``{digits}`` is replaced by the digits.
        next: the step to go to, whose prompt is said after ``say``; "" stays, silently.
        hangup: end the call once the answer has been played.
    """

    phrases: tuple[str, ...] = ()
    dtmf: str = ""
    digits: bool = False
    say: str = ""
    next: str = ""
    hangup: bool = False


@dataclass(frozen=True, slots=True)
class Step:
    """One menu state (``[[agent.menu.steps]]``).

    Attributes:
        name: unique; a letter then letters, digits or ``_``.
        prompt: said on entering the step and after a no-match.
        choices: what it expects, matched in order.
        no_match: said when no choice matches ("" takes the menu's).
        barge_in: whether caller speech may cut the step's prompts.
        webhook: whether its inputs go to the integrator (webhook or plugin), if one is set.
    """

    name: str = ""
    prompt: str = ""
    choices: tuple[Choice, ...] = ()
    no_match: str = ""
    barge_in: bool = True
    webhook: bool = True

    @property
    def takes_digits(self) -> bool:
        """Whether a choice of the step takes digit strings."""
        return any(choice.digits for choice in self.choices)


@dataclass(frozen=True, slots=True)
class Menu:
    """A whole menu (``[agent.menu]``); check it with :func:`menu_problem`.

    Attributes:
        start: the first step's name ("" takes the first step).
        greeting: said once, before the start step's prompt.
        no_match: the default no-match answer.
        dtmf_timeout_ms: silence after a key that ends a digit string.
        max_digits: keys that end a digit string.
    """

    greeting: str = ""
    start: str = ""
    no_match: str = "Sorry, I did not understand."
    dtmf_timeout_ms: int = field(default=3000, metadata={"range": (200, 60_000)})
    max_digits: int = field(default=16, metadata={"range": (1, 64)})
    steps: tuple[Step, ...] = ()

    def step(self, name: str) -> Step:
        """The step called ``name``; KeyError when there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def start_step(self) -> Step:
        return self.step(self.start) if self.start else self.steps[0]


def menu_problem(menu: Menu) -> str | None:
    """The first thing wrong with ``menu`` as ``"key: what"``, or None when it is usable."""
    if not menu.steps:
        return "steps: at least one step is needed"
    names = [step.name for step in menu.steps]
    for i, step in enumerate(menu.steps):
        where = f"steps #{i + 1}"
        if not _STEP_NAME.match(step.name) or names.count(step.name) > 1:
            return f"{where} name: must be a unique word (a letter, then letters, digits or _)"
        if not step.choices:
            return f"{where} choices: a step needs at least one choice"
        for j, choice in enumerate(step.choices):
            at = f"{where} choices #{j + 1}"
            if choice.next and choice.next not in names:
                return f"{at} next: no step {choice.next!r}"
            if not (choice.phrases or choice.dtmf or choice.digits):
                return f"{at}: needs phrases, dtmf or digits"
            if any(not p or normalize(p) != p for p in choice.phrases):
                return f"{at} phrases: lower-case words separated by spaces"
            if any(key not in "0123456789*#ABCD" for key in choice.dtmf):
                return f"{at} dtmf: only 0-9 * # A-D"
            if _DIGITS_FIELD in choice.say and not choice.digits:
                return f"{at} say: {{digits}} needs digits = true"
    if menu.start and menu.start not in names:
        return f"start: no step {menu.start!r}"
    return None


@dataclass(frozen=True, slots=True)
class SpeechInput:
    """What the recogniser heard: ``transcript`` (may be "") and ``confidence`` 0..1."""

    transcript: str
    confidence: float


@dataclass(frozen=True, slots=True)
class KeyInput:
    """Keys the caller pressed, as one string (``#`` that ended it left out)."""

    keys: str


Input = SpeechInput | KeyInput


@dataclass(frozen=True, slots=True)
class Answer:
    """What the agent does with one input.

    Attributes:
        say: the text to speak ("" = nothing).
        next_step: the step the dialogue is in afterwards.
        hangup: end the call once ``say`` has been played.
        matched: False when nothing matched (no-match answer).
        digits: the digit string taken, "" when none.
    """

    say: str
    next_step: str
    hangup: bool = False
    matched: bool = True
    digits: str = ""


class Dialogue:
    """One call's walk through a menu (a usable one: see :func:`menu_problem`)."""

    def __init__(self, menu: Menu) -> None:
        self.menu = menu
        self.step = menu.start_step
        self._keys = ""
        self._keys_deadline: float | None = None

    def greeting(self) -> Answer:
        """The first answer: the greeting and the start step's prompt."""
        return Answer(_join(self.menu.greeting, self.step.prompt), self.step.name)

    def respond(self, heard: Input) -> Answer:
        """The menu's answer to ``heard`` in the current step (the step does not change)."""
        step = self.step
        digits = _digits_of(heard)
        for choice in step.choices:
            if _matches(choice, heard):
                return self._answer(choice, "")
        if digits:
            for choice in step.choices:
                if choice.digits:
                    return self._answer(choice, digits)
        return Answer(_join(step.no_match or self.menu.no_match, step.prompt), step.name,
                      matched=False)

    def follow(self, say: str, next_step: str, hangup: bool) -> Answer:
        """An integrator's answer: ``say``, then ``next_step``'s prompt (unknown or ""
        stays in the current step silently)."""
        choice = Choice(say=say, next=next_step if _has_step(self.menu, next_step) else "",
                        hangup=hangup)
        return self._answer(choice, "")

    def go(self, answer: Answer) -> None:
        """Move to ``answer.next_step``."""
        self.step = self.menu.step(answer.next_step)

    def key(self, digit: str, now: float) -> KeyInput | None:
        """One key press at ``now`` (monotonic seconds): the input it completes, if any.

        In a step that takes digit strings keys are collected until ``#``,
        ``max_digits`` or ``dtmf_timeout_ms`` of silence; elsewhere every key
        is an input of its own.
        """
        if not self.step.takes_digits:
            return KeyInput(digit)
        if digit == DTMF_END_KEY:
            return self._take_keys()
        self._keys += digit
        if len(self._keys) >= self.menu.max_digits:
            return self._take_keys()
        self._keys_deadline = now + self.menu.dtmf_timeout_ms / 1000
        return None

    def next_deadline(self) -> float | None:
        """When a pending digit string ends by timeout, or None."""
        return self._keys_deadline

    def handle_timer(self, now: float) -> KeyInput | None:
        """The digit string whose timeout has passed at ``now``, if any."""
        if self._keys_deadline is None or now < self._keys_deadline:
            return None
        return self._take_keys()

    def _take_keys(self) -> KeyInput:
        keys, self._keys, self._keys_deadline = self._keys, "", None
        return KeyInput(keys or DTMF_END_KEY)

    def _answer(self, choice: Choice, digits: str) -> Answer:
        say = choice.say.replace(_DIGITS_FIELD, " ".join(digits))
        if choice.next:
            say = _join(say, self.menu.step(choice.next).prompt)
        return Answer(say, choice.next or self.step.name, choice.hangup, True, digits)


def _matches(choice: Choice, heard: Input) -> bool:
    if isinstance(heard, KeyInput):
        return bool(choice.dtmf) and heard.keys == choice.dtmf
    return bool(heard.transcript) and normalize(heard.transcript) in choice.phrases


def _digits_of(heard: Input) -> str:
    """The digit string of an input ("" when it is not one)."""
    if isinstance(heard, KeyInput):
        return heard.keys if heard.keys.isdigit() else ""
    words = normalize(heard.transcript).split()
    if not words or any(word not in DIGIT_WORDS for word in words):
        return ""
    return "".join(DIGIT_WORDS[word] for word in words)


def _has_step(menu: Menu, name: str) -> bool:
    return any(step.name == name for step in menu.steps)


def _join(*texts: str) -> str:
    return " ".join(text.strip() for text in texts if text.strip())


BUILTIN_MENU = Menu(
    greeting="Welcome to voxgate.",
    start="main",
    no_match="Sorry, I did not understand.",
    steps=(
        Step(
            name="main",
            prompt="Say balance, agent, or goodbye.",
            choices=(
                Choice(phrases=("balance", "my balance"), dtmf="1", next="account"),
                Choice(phrases=("agent", "an agent"), dtmf="0",
                       say="All our agents are busy. Please try again later.", next="more"),
                Choice(phrases=("goodbye", "bye"), dtmf="9", say="Goodbye.", hangup=True),
            ),
        ),
        Step(
            name="account",
            prompt="Please say or key in your account number.",
            choices=(
                Choice(digits=True, say="The balance of account {digits} is forty two dollars.",
                       next="more"),
                Choice(phrases=("goodbye",), say="Goodbye.", hangup=True),
            ),
        ),
        Step(
            name="more",
            prompt="Anything else? Say yes or no.",
            choices=(
                Choice(phrases=("yes",), dtmf="1", next="main"),
                Choice(phrases=("no", "goodbye"), dtmf="2", say="Goodbye.", hangup=True),
            ),
        ),
    ),
)
"""The menu run when the config has none: greeting, then balance / agent / goodbye."""
