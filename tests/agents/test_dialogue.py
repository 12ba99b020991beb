"""The menu engine: matching speech and keys, answers, digit collection, menu checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from voxgate.agents.dialogue import (
    BUILTIN_MENU,
    CONFIRM_STEP,
    NO_MATCH,
    TRANSFER_FAILED_INTENT,
    Choice,
    Dialogue,
    KeyInput,
    Menu,
    SpeechInput,
    Step,
    grammar_steps,
    intent_of,
    menu_problem,
    normalize,
)


def heard(text: str, confidence: float = 0.97, transcript: str = "") -> SpeechInput:
    """Speech whose grammar match is ``text``."""
    return SpeechInput(transcript or text, text, confidence)


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


HUMAN = "sip:human@192.0.2.7"
TRANSFER_MENU = dataclasses.replace(BUILTIN_MENU, steps=(dataclasses.replace(
    BUILTIN_MENU.steps[0], choices=(
        Choice(phrases=("agent",), dtmf="0", say="Connecting you.", transfer=HUMAN),
        *BUILTIN_MENU.steps[0].choices[2:]),
), *BUILTIN_MENU.steps[1:]), transfer_failed_say="Nobody is free.")


def test_a_transfer_choice_transfers_then_a_failure_goes_back_to_the_step():
    assert menu_problem(TRANSFER_MENU) is None
    dialogue = Dialogue(TRANSFER_MENU)
    answer = take(dialogue, KeyInput("0"))
    assert (answer.say, answer.transfer, answer.next_step, answer.hangup) == (
        "Connecting you.", HUMAN, "main", False)
    failed = dialogue.transfer_failed()
    assert (failed.say, failed.next_step, failed.intent, failed.transfer) == (
        "Nobody is free. Say balance, agent, or goodbye.", "main", TRANSFER_FAILED_INTENT, "")


def test_follow_takes_an_integrators_transfer_over_next_and_hangup():
    answer = Dialogue(BUILTIN_MENU).follow("One moment.", "more", True, HUMAN)
    assert (answer.say, answer.transfer, answer.next_step, answer.hangup) == (
        "One moment.", HUMAN, "main", False)


def take(dialogue: Dialogue, heard_input: SpeechInput | KeyInput):
    answer = dialogue.respond(heard_input)
    dialogue.go(answer)
    return answer


def test_only_the_grammar_match_picks_a_choice_never_the_transcript():
    dialogue = Dialogue(BUILTIN_MENU)
    answer = dialogue.respond(SpeechInput("can you call me back tomorrow bye", "", 0.0))
    assert (answer.matched, answer.hangup, answer.intent) == (False, False, NO_MATCH)
    answer = dialogue.respond(SpeechInput("bye", "", 0.0))
    assert not answer.matched
    answer = dialogue.respond(heard("balance", transcript="check my balance please"))
    assert (answer.intent, answer.next_step) == ("balance", "account")


def test_a_match_below_min_confidence_is_a_no_match():
    dialogue = Dialogue(BUILTIN_MENU)
    assert dialogue.respond(heard("balance", 0.49)).intent == NO_MATCH
    assert dialogue.respond(heard("balance", 0.5)).intent == "balance"


def test_a_doubtful_hangup_choice_asks_and_never_hangs_up():
    dialogue = Dialogue(BUILTIN_MENU)
    question = take(dialogue, heard("bye", 0.79))
    assert not question.hangup and question.intent == "goodbye"
    assert question.say == "Do you want to end the call? Say yes or no."
    assert dialogue.grammar == CONFIRM_STEP.name
    no = take(dialogue, heard("no"))
    assert (no.hangup, no.intent, no.say) == (False, "no", "Say balance, agent, or goodbye.")
    assert dialogue.grammar == "main"
    take(dialogue, heard("goodbye", 0.6))
    yes = take(dialogue, heard("yes"))
    assert (yes.hangup, yes.say, yes.intent) == (True, "Goodbye.", "yes")
    sure = Dialogue(BUILTIN_MENU).respond(heard("goodbye", 0.85))
    assert sure.hangup and sure.intent == "goodbye"


def test_a_hangup_match_the_transcript_does_not_hold_is_asked_about():
    dialogue = Dialogue(BUILTIN_MENU)
    dialogue.go(dialogue.respond(heard("agent")))
    forced = heard("no", 0.99, transcript="can you call me back tomorrow morning")
    answer = dialogue.respond(forced)
    assert not answer.hangup and answer.say.startswith("Do you want to end the call?")
    assert dialogue.respond(heard("no", 0.9, transcript="oh no")).hangup


def test_keys_are_exact_and_never_asked_about():
    dialogue = Dialogue(BUILTIN_MENU)
    assert take(dialogue, KeyInput("9")).hangup
    dialogue = Dialogue(BUILTIN_MENU)
    take(dialogue, KeyInput("1"))
    answer = take(dialogue, KeyInput("456"))
    assert (answer.digits, answer.intent, answer.next_step) == ("456", "digits", "more")


def test_doubtful_spoken_digits_are_read_back():
    dialogue = Dialogue(BUILTIN_MENU)
    take(dialogue, heard("balance"))
    question = take(dialogue, heard("four five six", 0.7))
    assert question.say == "I heard 4 5 6. Is that right? Say yes or no."
    assert (question.digits, question.next_step, question.intent) == ("", "account", "digits")
    assert dialogue.key("1", 0.0) == KeyInput("1")  # a yes/no question takes single keys
    no = take(dialogue, KeyInput("2"))
    assert (no.intent, no.say, no.next_step) == ("no", "Please say or key in your account number.",
                                                 "account")
    take(dialogue, heard("four five six", 0.7))
    confused = take(dialogue, heard("weather"))
    assert confused.say == ("Sorry, I did not understand. "
                            "I heard 4 5 6. Is that right? Say yes or no.")
    yes = take(dialogue, heard("yes"))
    assert (yes.intent, yes.digits, yes.next_step) == ("yes", "456", "more")
    assert yes.say.startswith("The balance of account 4 5 6")
    sure = Dialogue(BUILTIN_MENU)
    take(sure, heard("balance"))
    assert sure.respond(heard("four five six", 0.95)).digits == "456"


def test_no_match_fallback_hangs_up_politely_after_max_no_match():
    dialogue = Dialogue(BUILTIN_MENU)
    answers = [take(dialogue, heard("")) for _ in range(3)]
    assert [a.hangup for a in answers] == [False, False, True]
    assert answers[-1].say == "Sorry, I did not understand. Goodbye."
    assert all(a.intent == NO_MATCH for a in answers)


def test_no_match_count_is_in_a_row_and_per_step():
    dialogue = Dialogue(BUILTIN_MENU)
    take(dialogue, heard(""))
    take(dialogue, heard(""))
    take(dialogue, heard("agent"))  # a match: the run is over (and the step changed)
    take(dialogue, heard("yes"))
    assert not take(dialogue, heard("")).hangup
    assert not take(dialogue, heard("")).hangup


def test_no_match_fallback_to_a_step_and_an_integrators_answer_ends_the_run():
    menu = dataclasses.replace(BUILTIN_MENU, no_match_fallback="more", max_no_match=2,
                               fallback_say="Let us try something else.")
    dialogue = Dialogue(menu)
    take(dialogue, heard(""))
    fallback = take(dialogue, heard(""))
    assert (fallback.hangup, fallback.next_step) == (False, "more")
    assert fallback.say == ("Sorry, I did not understand. Let us try something else. "
                            "Anything else? Say yes or no.")
    take(dialogue, heard(""))
    dialogue.go(dialogue.follow("The webhook knows.", "", False))
    assert not take(dialogue, heard("")).hangup and dialogue.step.name == "more"


def test_is_complete_for_endpointing():
    dialogue = Dialogue(BUILTIN_MENU)
    assert dialogue.is_complete("balance", 0.9)
    assert not dialogue.is_complete("balance", 0.3)
    assert not dialogue.is_complete("", 0.0)
    assert not dialogue.is_complete("bye", 0.7)  # would ask first
    assert dialogue.is_complete("bye", 0.9)
    take(dialogue, heard("balance"))
    assert not dialogue.is_complete("four five six", 0.99)  # more digits may come


def test_intents():
    assert intent_of(Choice(phrases=("my balance", "balance"))) == "my balance"
    assert intent_of(Choice(phrases=("sales",), intent="sales-team")) == "sales-team"
    assert intent_of(Choice(digits=True)) == "digits"
    assert intent_of(Choice(dtmf="5")) == "key 5"


def test_grammar_steps_add_the_confirmation():
    assert grammar_steps(BUILTIN_MENU)[-1] is CONFIRM_STEP
    assert CONFIRM_STEP.name not in {step.name for step in BUILTIN_MENU.steps}


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
        (dataclasses.replace(BUILTIN_MENU, no_match_fallback="nowhere"), "no_match_fallback"),
        (dataclasses.replace(BUILTIN_MENU, min_confidence=0.9), "hangup_confidence: must not"),
        (Menu(steps=(Step(name="a", choices=(Choice(dtmf="1", intent="no-match"),)),)),
         "intent: 'no-match'"),
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
