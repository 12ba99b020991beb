"""``[agent]``, ``[agent.webhook]`` and ``[agent.menu]``: parsing and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxgate.agents.dialogue import BUILTIN_MENU, Choice, Step
from voxgate.config import Config, load_config
from voxgate.errors import ConfigError

MENU = """
[agent]
kind = "local"
voice = "en-us+m3"
rate_wpm = 140
barge_in = false

[agent.webhook]
url = "http://127.0.0.1:8080/hook"
max_concurrent = 4

[agent.menu]
greeting = "Hi."
start = "main"

[[agent.menu.steps]]
name = "main"
prompt = "Say yes."
barge_in = false

[[agent.menu.steps.choices]]
phrases = ["yes"]
say = "Okay."
hangup = true

[[agent.menu.steps.choices]]
dtmf = "5"
next = "main"
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "voxgate.toml"
    path.write_text(text)
    return load_config(path)


def test_menu_and_webhook_parse(tmp_path):
    agent = load(tmp_path, MENU).agent
    assert (agent.kind, agent.voice, agent.rate_wpm, agent.barge_in) == (
        "local", "en-us+m3", 140, False)
    assert (agent.webhook.url, agent.webhook.max_concurrent) == ("http://127.0.0.1:8080/hook", 4)
    assert agent.menu is not None
    assert agent.menu.steps == (Step(name="main", prompt="Say yes.", barge_in=False, choices=(
        Choice(phrases=("yes",), say="Okay.", hangup=True), Choice(dtmf="5", next="main"))),)


def test_transfer_choice_parses(tmp_path):
    text = MENU.replace('dtmf = "5"\nnext = "main"', 'dtmf = "5"\ntransfer = "sip:human@10.0.0.1"')
    menu = load(tmp_path, text.replace('start = "main"', 'start = "main"\n'
                                       'transfer_failed_say = "Nobody is here."')).agent.menu
    assert menu is not None and menu.transfer_failed_say == "Nobody is here."
    assert menu.steps[0].choices[1] == Choice(dtmf="5", transfer="sip:human@10.0.0.1")


def test_budget_utterance_ms(tmp_path):
    assert load(tmp_path, "[budget]\nutterance_ms = 5000\n").budget.utterance_ms == 5000


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('dtmf = "5"', 'dtmf = "5"\nbogus = 1'),
         "[agent.menu.steps.0.choices.1] bogus: unknown key"),
        (('greeting = "Hi."', 'greeting = "Hi."\nbogus = 1'), "[agent.menu] bogus: unknown key"),
        (("max_concurrent = 4", "max_concurrent = 4\nbogus = 1"),
         "[agent.webhook] bogus: unknown key"),
        (('next = "main"', 'next = "elsewhere"'), "[agent.menu] steps #1 choices #2 next"),
        (('phrases = ["yes"]', "phrases = [1]"), "phrases: must be a list of strings"),
        (("rate_wpm = 140", "rate_wpm = 10"), "[agent] rate_wpm: must be between 80 and 450"),
        (('voice = "en-us+m3"', 'voice = "-x; rm"'), "[agent] voice"),
        (('url = "http://127.0.0.1:8080/hook"', 'url = "ftp://x"'), "[agent.webhook] url"),
        (("barge_in = false\n", 'barge_in = false\nplugin = "m:f"\n'),
         "set either plugin or [agent.webhook] url"),
        (('start = "main"', 'start = "nowhere"'), "[agent.menu] start: no step"),
        (('dtmf = "5"\nnext = "main"', 'dtmf = "5"\ntransfer = "http://x"'),
         "[agent.menu] steps #1 choices #2 transfer: not a sip:/sips: URI"),
        (('dtmf = "5"\nnext = "main"', 'dtmf = "5"\ntransfer = "<sip:a@b>"'),
         "[agent.menu] steps #1 choices #2 transfer: must be a bare sip:/sips: URI"),
        (('dtmf = "5"', 'dtmf = "5"\ntransfer = "sip:human@10.0.0.1"'),
         "[agent.menu] steps #1 choices #2 transfer: not with next or hangup"),
    ],
)
def test_errors_name_the_key(tmp_path, change, expected):
    old, new = change
    assert old in MENU
    with pytest.raises(ConfigError, match=None) as info:
        load(tmp_path, MENU.replace(old, new, 1))
    assert expected in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_bad_plugin_spec(tmp_path):
    with pytest.raises(ConfigError, match="module:callable"):
        load(tmp_path, '[agent]\nkind = "local"\nplugin = "nocolon"\n')


def test_webhook_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match=r"\[agent.webhook\]: must be a table"):
        load(tmp_path, '[agent]\nwebhook = "http://x"\n')


def test_menu_settings_without_steps_apply_to_the_builtin_menu(tmp_path):
    menu = load(tmp_path, '[agent.menu]\nmin_confidence = 0.6\nmax_no_match = 2\n'
                          'no_match_fallback = "more"\n').agent.menu
    assert menu is not None
    assert (menu.min_confidence, menu.max_no_match, menu.no_match_fallback) == (0.6, 2, "more")
    assert menu.steps == BUILTIN_MENU.steps and menu.greeting == BUILTIN_MENU.greeting


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[agent.menu]\nhangup_confidence = 1.5\n",
         "[agent.menu] hangup_confidence: must be between 0 and 1"),
        ("[agent.menu]\nmin_confidence = 0.9\n", "hangup_confidence: must not be below"),
        ('[agent.menu]\nno_match_fallback = "transfer"\n', "[agent.menu] no_match_fallback"),
        ("[agent]\nendpoint_check_ms = 310\n", "multiples of 20"),
        ('[agent]\nkind = "local"\nendpoint_check_ms = 600\n',
         "endpoint_check_ms < [vad] stop_ms"),
        ('[agent]\nkind = "local"\nendpoint_max_ms = 400\n', "<= endpoint_max_ms"),
    ],
)
def test_rejection_and_endpointing_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert expected in str(info.value)


def test_endpointing_bounds_only_bind_the_local_agent(tmp_path):
    config = load(tmp_path, "[vad]\nstop_ms = 2000\n")  # echo: no turns to end
    assert config.vad.stop_ms == 2000


def test_endpointing_can_be_off(tmp_path):
    agent = load(tmp_path, "[agent]\nendpoint_check_ms = 0\nendpoint_max_ms = 20\n").agent
    assert (agent.endpoint_check_ms, agent.endpoint_max_ms) == (0, 20)
