"""The menu engine: matching speech and keys, answers, digit collection, menu checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from voxgate.agents.dialogue import (
    BUILTIN_MENU,
    Choice,
    Dialogue,
    KeyInput,
    Menu,
    SpeechInput,
    Step,
    menu_problem,
    normalize,
)


def heard(text: str) -> SpeechInput:
    return SpeechInput(text, 0.9)


def test_builtin_menu_is_usable_and_greets_with_the_main_prompt():
    assert menu_problem(BUILTIN_MENU) is None
    dialogue = Dialogue(BUILTIN_MENU)
    greeting = dialogue.greeting()
    assert greeting.say == "Welcome to voxgate. Say balance, agent, or goodbye."
    assert greeting.next_step == "main"


def test_balance_then_digits_then_no_hangs_up():
    dialogue = Dialogue(BUILTIN_MENU)
    answer = dialogue.respond(heard("Balance"))
    assert answer.next_step == "account" and answer.say.startswith("Please say or key")
    dialogue.go(answer)
    answer = dialogue.respond(heard("one two three"))
    assert answer.digits == "123"
    assert answer.say.startswith("The balance of account 1 2 3 is forty two dollars.")
    assert answer.say.endswith("Anything else? Say yes or no.")
    dialogue.go(answer)
    answer = dialogue.respond(heard("no"))
    assert (answer.say, answer.hangup) == ("Goodbye.", True)


def test_every_builtin_word_routes():
    dialogue = Dialogue(BUILTIN_MENU)
    assert dialogue.respond(heard("agent")).say.startswith("All our agents are busy.")
    assert dialogue.respond(heard("goodbye")).hangup
    dialogue.go(dialogue.respond(heard("agent")))
    assert dialogue.step.name == "more"
    yes = dialogue.respond(heard("yes"))
    assert (yes.next_step, yes.say) == ("main", "Say balance, agent, or goodbye.")


def test_no_match_repeats_the_prompt_and_stays():
    dialogue = Dialogue(BUILTIN_MENU)
    answer = dialogue.respond(heard("weather"))
    assert not answer.matched
    assert answer.say == "Sorry, I did not understand. Say balance, agent, or goodbye."
    assert answer.next_step == "main"
    assert not dialogue.respond(heard("")).matched


def test_single_keys_pick_choices():
    dialogue = Dialogue(BUILTIN_MENU)
    assert dialogue.key("1", 0.0) == KeyInput("1")
    assert dialogue.respond(KeyInput("1")).next_step == "account"
    assert dialogue.respond(KeyInput("9")).hangup
    assert not dialogue.respond(KeyInput("5")).matched


def test_digit_strings_end_with_pound():
    dialogue = Dialogue(BUILTIN_MENU)
    dialogue.go(dialogue.respond(KeyInput("1")))
    assert [dialogue.key(d, 1.0) for d in "45"] == [None, None]
    assert dialogue.next_deadline() == pytest.approx(1.0 + BUILTIN_MENU.dtmf_timeout_ms / 1000)
    keys = dialogue.key("#", 1.5)
    assert keys == KeyInput("45")
    assert dialogue.next_deadline() is None
    assert dialogue.respond(keys).digits == "45"


def test_digit_strings_end_by_timeout_and_by_length():
    menu = dataclasses.replace(BUILTIN_MENU, max_digits=3, dtmf_timeout_ms=1000)
    dialogue = Dialogue(menu)
    dialogue.go(dialogue.respond(KeyInput("1")))
    dialogue.key("7", 10.0)
    assert dialogue.handle_timer(10.5) is None
    assert dialogue.handle_timer(11.0) == KeyInput("7")
    assert [dialogue.key(d, 20.0) for d in "123"] == [None, None, KeyInput("123")]


def test_follow_takes_the_integrators_answer():
    dialogue = Dialogue(BUILTIN_MENU)
    answer = dialogue.follow("Hello from the webhook.", "more", False)
    assert answer.say == "Hello from the webhook. Anything else? Say yes or no."
    assert answer.next_step == "more"
    unknown = dialogue.follow("Hi.", "nowhere", True)
    assert (unknown.say, unknown.next_step, unknown.hangup) == ("Hi.", "main", True)


def test_normalize():
    assert normalize("  My, BALANCE!  ") == "my balance"


@pytest.mark.parametrize(
    ("menu", "problem"),
    [
        (Menu(), "steps: at least one step"),
        (Menu(steps=(Step(name="1x", choices=(Choice(dtmf="1"),)),)), "steps #1 name"),
        (Menu(steps=(Step(name="a"),)), "steps #1 choices: a step needs"),
        (Menu(steps=(Step(name="a", choices=(Choice(dtmf="1", next="b"),)),)),
         "choices #1 next: no step 'b'"),
        (Menu(steps=(Step(name="a", choices=(Choice(),)),)), "needs phrases, dtmf or digits"),
        (Menu(steps=(Step(name="a", choices=(Choice(phrases=("Yes",)),)),)), "phrases: lower"),
        (Menu(steps=(Step(name="a", choices=(Choice(dtmf="x"),)),)), "dtmf: only"),
        (Menu(steps=(Step(name="a", choices=(Choice(dtmf="1", say="{digits}"),)),)),
         "{digits} needs digits"),
        (Menu(start="b", steps=(Step(name="a", choices=(Choice(dtmf="1"),)),)), "start: no step"),
    ],
)
def test_menu_problems(menu, problem):
    found = menu_problem(menu)
    assert found is not None and problem in found


def test_dialogue_imports_no_event_loop():
    code = "import sys, voxgate.agents.dialogue; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
