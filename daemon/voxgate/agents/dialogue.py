"""The phone menu of the local agent: steps, what they expect, what they answer; sans-IO.

A :class:`Menu` is declarative (``[agent.menu]`` in the config, or
:data:`BUILTIN_MENU`)::

    greeting ─▶ start step ─(input)─▶ matching choice ─▶ say, next step (its prompt), hang up
                                 │                     └─▶ say, transfer to a human (REFER)
                                 └──(nothing matches)──▶ no_match + the step's prompt again

An input is what the caller said (:class:`SpeechInput`: the free-form
``transcript``, the step grammar's words the recogniser accepted as
``matched`` and their ``confidence``) or keyed (:class:`KeyInput`, RFC 4733
digits). A choice matches speech only by ``matched`` (one of its ``phrases``,
compared after :func:`normalize`) with ``confidence`` at least the menu's
``min_confidence``, and a key string by its ``dtmf``; a choice with
``digits`` takes any digit string, spoken ("one two three") or keyed ("123",
ended by ``#``, the step's ``[agent.menu] dtmf_timeout_ms`` or
``max_digits``), and its ``say`` may hold ``{digits}`` (spoken one digit at a
time). The transcript never picks a choice: it is for the integrator.

Rejection and confirmation (speech only; keys are exact and never confirmed)::

    matched "" or confidence < min_confidence ─▶ no-match: the step's no_match + prompt
        └─ max_no_match in a row in the step ──▶ no_match_fallback: goodbye + hang up,
                                                  or go to the named step
    a hangup choice, confidence < hangup_confidence
        or the free-form transcript lacks its words ─▶ "Do you want to end the call?"
    a digit string, confidence < confirm_digits_below ─▶ "I heard 4 5 6. Is that right?"
        confirmation (grammar :data:`CONFIRM_STEP`: yes / no, keys 1 / 2):
          yes ─▶ the choice's answer    no ─▶ the step's prompt    else ─▶ no-match, asked again

A choice with ``transfer`` (a ``sip:``/``sips:`` URI) says its ``say`` and
then hands the caller to that target (blind transfer). When the transfer
fails the caller hears the menu's ``transfer_failed_say`` and the step's prompt
again (:meth:`Dialogue.transfer_failed`): the menu goes on.

Every answer names the turn's *intent* (:func:`intent_of`): the matched
choice's name, :data:`NO_MATCH`, or ``yes``/``no`` in a confirmation.

:class:`Dialogue` walks one call through the menu. It never reads a clock:
the key collector's deadline is exposed as :meth:`Dialogue.next_deadline` and
fired by :meth:`Dialogue.handle_timer` (aioquic style).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from voxgate.agents.transfer import target_problem

DIGIT_WORDS = {
    "zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
}
"""Spoken digit → its character; the recogniser's digit grammar uses these words."""

NO_MATCH = "no-match"
"""The intent of an input no choice took."""
DIGITS_INTENT = "digits"
"""The intent of a digit choice without ``intent`` or phrases."""
DTMF_END_KEY = "#"
_WORD = re.compile(r"[a-z']+")
_STEP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_DIGITS_FIELD = "{digits}"


HANGUP_FALLBACK = "hangup"
"""``no_match_fallback`` that says goodbye and hangs up."""
_GOODBYE = "Goodbye."


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
        hangup: end the call once the answer has been played (speech must reach the
            menu's ``hangup_confidence``, else the caller is asked first).
        intent: the name the integrator, the logs and the call record see ("" takes
            :func:`intent_of`'s default).
        transfer: a ``sip:``/``sips:`` URI to transfer the caller to once ``say`` has
            been played ("" for none; not with ``next`` or ``hangup``).
    """

    phrases: tuple[str, ...] = ()
    dtmf: str = ""
    digits: bool = False
    say: str = ""
    next: str = ""
    hangup: bool = False
    intent: str = ""
    transfer: str = ""


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
        min_confidence: the least recogniser confidence that picks a choice.
        hangup_confidence: the least that picks a ``hangup`` choice without asking
            "Do you want to end the call?" first (at least ``min_confidence``; the
            free-form transcript must hold the matched words too).
        confirm_digits_below: spoken digit strings less sure than this are read
            back for a yes/no (0: never).
        max_no_match: no-matches in a row in one step before ``no_match_fallback``.
        no_match_fallback: ``"hangup"`` (``fallback_say`` or "Goodbye.", then hang up)
            or the name of a step to go to (after ``fallback_say``).
        fallback_say: said with the fallback, after the no-match answer.
        confirm_digits_say: the digit read-back; ``{digits}`` is the digits.
        confirm_hangup_say: the question before a doubtful hang-up choice.
        transfer_failed_say: said when a ``transfer`` choice's transfer failed, before
            the step's prompt.
    """

    greeting: str = ""
    start: str = ""
    no_match: str = "Sorry, I did not understand."
    dtmf_timeout_ms: int = field(default=3000, metadata={"range": (200, 60_000)})
    max_digits: int = field(default=16, metadata={"range": (1, 64)})
    min_confidence: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    hangup_confidence: float = field(default=0.85, metadata={"range": (0.0, 1.0)})
    confirm_digits_below: float = field(default=0.95, metadata={"range": (0.0, 1.0)})
    max_no_match: int = field(default=3, metadata={"range": (1, 100)})
    no_match_fallback: str = HANGUP_FALLBACK
    fallback_say: str = ""
    confirm_digits_say: str = "I heard {digits}. Is that right? Say yes or no."
    confirm_hangup_say: str = "Do you want to end the call? Say yes or no."
    transfer_failed_say: str = "Sorry, nobody can take your call right now."
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
            if choice.transfer:
                if choice.next or choice.hangup:
                    return f"{at} transfer: not with next or hangup"
                problem = target_problem(choice.transfer)
                if problem is not None:
                    return f"{at} transfer: {problem}"
            if choice.intent == NO_MATCH:
                return f"{at} intent: {NO_MATCH!r} is the intent of no match"
    if menu.start and menu.start not in names:
        return f"start: no step {menu.start!r}"
    if menu.hangup_confidence < menu.min_confidence:
        return "hangup_confidence: must not be below min_confidence"
    if menu.no_match_fallback != HANGUP_FALLBACK and menu.no_match_fallback not in names:
        return f"no_match_fallback: {HANGUP_FALLBACK!r} or a step name, " \
               f"got {menu.no_match_fallback!r}"
    return None


def intent_of(choice: Choice) -> str:
    """A choice's intent: its ``intent``, else its first phrase, else :data:`DIGITS_INTENT`
    for a digit choice, else ``"key <dtmf>"``."""
    if choice.intent:
        return choice.intent
    if choice.phrases:
        return choice.phrases[0]
    return DIGITS_INTENT if choice.digits else f"key {choice.dtmf}"


@dataclass(frozen=True, slots=True)
class SpeechInput:
    """What the recogniser heard.

    Attributes:
        transcript: free-form, what was said ("" = nothing heard); never matched.
        matched: the grammar's words the recogniser accepted ("" = none).
        confidence: 0..1, how sure ``matched`` is.
    """

    transcript: str
    matched: str
    confidence: float


@dataclass(frozen=True, slots=True)
class KeyInput:
    """Keys the caller pressed, as one string (``#`` that ended it left out)."""

    keys: str


Input = SpeechInput | KeyInput


@dataclass(frozen=True, slots=True)
class Pending:
    """A choice waiting for the caller's yes (with the digits it would take)."""

    choice: Choice
    digits: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the agent does with one input.

    Attributes:
        say: the text to speak ("" = nothing).
        next_step: the step the dialogue is in afterwards.
        hangup: end the call once ``say`` has been played.
        matched: False when nothing matched (no-match answer).
        digits: the digit string taken, "" when none.
        intent: what the input meant (see :func:`intent_of`, :data:`NO_MATCH`).
        no_matches: no-matches in a row in the step once this answer is taken.
        confirming: the choice (and digits) a yes/no question asks about, if any.
        transfer: the SIP URI to transfer the caller to once ``say`` is played ("": none).
    """

    say: str
    next_step: str
    hangup: bool = False
    matched: bool = True
    digits: str = ""
    intent: str = ""
    no_matches: int = 0
    confirming: Pending | None = None
    transfer: str = ""


TRANSFER_FAILED_INTENT = "transfer-failed"
"""The intent of the turn that tells the caller their transfer failed."""


class Dialogue:
    """One call's walk through a menu (a usable one: see :func:`menu_problem`)."""

    def __init__(self, menu: Menu) -> None:
        self.menu = menu
        self.step = menu.start_step
        self._no_matches = 0
        self._confirming: Pending | None = None
        self._keys = ""
        self._keys_deadline: float | None = None

    @property
    def grammar(self) -> str:
        """The recogniser grammar for the next speech: the step's, or :data:`CONFIRM_STEP`'s
        while a yes/no question is open."""
        return CONFIRM_STEP.name if self._confirming is not None else self.step.name

    def greeting(self) -> Answer:
        """The first answer: the greeting and the start step's prompt."""
        return Answer(_join(self.menu.greeting, self.step.prompt), self.step.name)

    def respond(self, heard: Input) -> Answer:
        """The menu's answer to ``heard`` (nothing changes until :meth:`go`)."""
        if self._confirming is not None:
            return self._confirmed(self._confirming, heard)
        menu, step = self.menu, self.step
        match = self._match(step, heard)
        if match is None:
            return self._no_match(step.prompt)
        choice, digits = match
        if isinstance(heard, SpeechInput):
            if choice.hangup and not _sure_to_hang_up(heard, menu):
                return Answer(menu.confirm_hangup_say, step.name, intent=intent_of(choice),
                              confirming=Pending(choice))
            if digits and heard.confidence < menu.confirm_digits_below:
                say = menu.confirm_digits_say.replace(_DIGITS_FIELD, " ".join(digits))
                return Answer(say, step.name, intent=intent_of(choice),
                              confirming=Pending(choice, digits))
        return self._answer(choice, digits, intent_of(choice))

    def is_complete(self, matched: str, confidence: float) -> bool:
        """Whether speech with ``matched`` words at ``confidence`` completes a choice of the
        current grammar with no question to ask (endpointing: the turn may end now).

        A digit string never does: the caller may be reading more digits.
        """
        step = CONFIRM_STEP if self._confirming is not None else self.step
        heard = SpeechInput("", matched, confidence)
        match = self._match(step, heard)
        if match is None or match[1]:
            return False
        return not match[0].hangup or confidence >= self.menu.hangup_confidence

    def follow(self, say: str, next_step: str, hangup: bool, transfer: str = "") -> Answer:
        """An integrator's answer: ``say``, then ``next_step``'s prompt (unknown or ""
        stays in the current step silently), or the transfer to ``transfer`` (a checked
        SIP URI; it wins over ``next_step`` and ``hangup``). It ends any no-match run
        and question."""
        if transfer:
            return self._answer(Choice(say=say, transfer=transfer), "", "")
        choice = Choice(say=say, next=next_step if _has_step(self.menu, next_step) else "",
                        hangup=hangup)
        return self._answer(choice, "", "")

    def transfer_failed(self) -> Answer:
        """The answer when a transfer failed: ``transfer_failed_say`` and the current
        step's prompt; the menu goes on in that step."""
        return Answer(_join(self.menu.transfer_failed_say, self.step.prompt), self.step.name,
                      intent=TRANSFER_FAILED_INTENT)

    def go(self, answer: Answer) -> None:
        """Take ``answer``: move to its step, keep its no-match count and question."""
        self.step = self.menu.step(answer.next_step)
        self._no_matches = answer.no_matches
        self._confirming = answer.confirming

    def key(self, digit: str, now: float) -> KeyInput | None:
        """One key press at ``now`` (monotonic seconds): the input it completes, if any.

        In a step that takes digit strings keys are collected until ``#``,
        ``max_digits`` or ``dtmf_timeout_ms`` of silence; elsewhere (and while a
        yes/no question is open) every key is an input of its own.
        """
        if not self.step.takes_digits or self._confirming is not None:
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

    def _match(self, step: Step, heard: Input) -> tuple[Choice, str] | None:
        """The choice ``heard`` picks in ``step`` and the digit string it takes, if any."""
        if isinstance(heard, KeyInput):
            for choice in step.choices:
                if choice.dtmf and heard.keys == choice.dtmf:
                    return choice, ""
            digits = heard.keys if heard.keys.isdigit() else ""
        else:
            words = normalize(heard.matched)
            if not words or heard.confidence < self.menu.min_confidence:
                return None
            for choice in step.choices:
                if words in choice.phrases:
                    return choice, ""
            digits = spoken_digits(words)
        if digits:
            for choice in step.choices:
                if choice.digits:
                    return choice, digits
        return None

    def _no_match(self, prompt: str) -> Answer:
        """The no-match answer (then ``prompt``), or the fallback after too many."""
        menu, step = self.menu, self.step
        sorry = step.no_match or menu.no_match
        count = self._no_matches + 1
        if count < menu.max_no_match:
            return Answer(_join(sorry, prompt), step.name, matched=False, intent=NO_MATCH,
                          no_matches=count, confirming=self._confirming)
        if menu.no_match_fallback == HANGUP_FALLBACK:
            return Answer(_join(sorry, menu.fallback_say or _GOODBYE), step.name, hangup=True,
                          matched=False, intent=NO_MATCH)
        target = menu.step(menu.no_match_fallback)
        return Answer(_join(sorry, menu.fallback_say, target.prompt), target.name,
                      matched=False, intent=NO_MATCH)

    def _confirmed(self, pending: Pending, heard: Input) -> Answer:
        """The answer to a yes/no question about ``pending``."""
        match = self._match(CONFIRM_STEP, heard)
        if match is None:
            question = (self.menu.confirm_digits_say.replace(
                _DIGITS_FIELD, " ".join(pending.digits)) if pending.digits
                else self.menu.confirm_hangup_say)
            return self._no_match(question)
        intent = intent_of(match[0])
        if intent == CONFIRM_YES:
            return self._answer(pending.choice, pending.digits, intent)
        return Answer(self.step.prompt, self.step.name, intent=intent)

    def _answer(self, choice: Choice, digits: str, intent: str) -> Answer:
        say = choice.say.replace(_DIGITS_FIELD, " ".join(digits))
        if choice.next:
            say = _join(say, self.menu.step(choice.next).prompt)
        return Answer(say, choice.next or self.step.name, choice.hangup, True, digits, intent,
                      transfer=choice.transfer)


def _sure_to_hang_up(heard: SpeechInput, menu: Menu) -> bool:
    """Whether speech that matched a hang-up choice may end the call without asking: at
    least ``hangup_confidence``, and the free-form transcript holds the matched words
    (a sentence forced onto "no" by the grammar does not)."""
    said = f" {normalize(heard.transcript)} "
    return heard.confidence >= menu.hangup_confidence and f" {normalize(heard.matched)} " in said


def spoken_digits(words: str) -> str:
    """The digit string of normalised spoken digit words ("" when they are not only digits)."""
    split = words.split()
    if not split or any(word not in DIGIT_WORDS for word in split):
        return ""
    return "".join(DIGIT_WORDS[word] for word in split)


def _has_step(menu: Menu, name: str) -> bool:
    return any(step.name == name for step in menu.steps)


def _join(*texts: str) -> str:
    return " ".join(text.strip() for text in texts if text.strip())


CONFIRM_YES = "yes"
CONFIRM_STEP = Step(
    name="_confirm",  # not a step name a menu can use (those start with a letter)
    choices=(
        # Not "that is right": pocketsphinx finds no path through "is that"/"that is"
        # on espeak-ng telephone audio (measured), so such phrases never match.
        Choice(phrases=("yes", "yes please", "correct"), dtmf="1",
               intent=CONFIRM_YES),
        Choice(phrases=("no", "no thanks", "wrong"), dtmf="2", intent="no"),
    ),
)
"""What a yes/no question expects (its grammar is recognised like a step's)."""


def grammar_steps(menu: Menu) -> tuple[Step, ...]:
    """Every step the recogniser needs a grammar for: ``menu``'s and :data:`CONFIRM_STEP`."""
    return (*menu.steps, CONFIRM_STEP)


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
