"""The recogniser: grammars from the menu, the lexicon, decoding espeak-ng speech."""

from __future__ import annotations

import pytest
import trio

from tests.agents.speech import speak_pcm
from tests.harness import requires
from voxgate.agents.dialogue import BUILTIN_MENU, Choice, Menu, Step
from voxgate.agents.recognizer import Recognizer, load_lexicon, menu_grammars, step_grammar
from voxgate.errors import ConfigError

SILENCE_200MS = bytes(3200)


def test_step_grammar_lists_phrases_and_digits():
    account = BUILTIN_MENU.step("account")
    text = step_grammar(account)
    assert text.startswith("#JSGF V1.0;\ngrammar account;\n")
    assert "public <input> = goodbye | <digit>+;" in text
    assert "<digit> = eight | five | four | nine | oh | one" in text
    assert "<digit>" not in step_grammar(BUILTIN_MENU.step("main"))
    assert "my balance" in step_grammar(BUILTIN_MENU.step("main"))


def test_lexicon_holds_alternatives_and_rejects_unknown_words(tmp_path):
    path = tmp_path / "dict"
    path.write_text("yes Y EH S\nzero Z IH R OW\nzero(2) Z IY R OW\nother AH DH ER\n")
    assert load_lexicon(str(path), ["yes", "zero"]) == {
        "yes": "Y EH S", "zero": "Z IH R OW", "zero(2)": "Z IY R OW"}
    with pytest.raises(ConfigError, match="not in the recogniser's dictionary: voxgate"):
        load_lexicon(str(path), ["yes", "voxgate"])


async def test_unknown_grammar_word_fails_prepare():
    menu = Menu(steps=(Step(name="a", choices=(Choice(phrases=("voxgatex",)),)),))
    recognizer = Recognizer(menu_grammars(menu), workers=1)
    with pytest.raises(ConfigError, match="voxgatex"):
        await recognizer.prepare()


@requires("espeak-ng")
@pytest.mark.parametrize(
    ("step", "text", "expected"),
    [
        ("main", "balance", "balance"),
        ("main", "agent", "agent"),
        ("main", "goodbye", ("goodbye", "bye")),
        ("more", "yes", "yes"),
        ("more", "no", "no"),
        ("account", "one two three", "one two three"),
    ],
)
async def test_recognizes_menu_words(step, text, expected):
    recognizer = Recognizer(menu_grammars(BUILTIN_MENU), workers=1)
    result = await recognizer.recognize(SILENCE_200MS + speak_pcm(text) + SILENCE_200MS, step)
    assert result.transcript in ((expected,) if isinstance(expected, str) else expected)
    assert 0.0 < result.confidence <= 1.0
    assert recognizer.stats.decoders == 1


async def test_decoders_are_bounded_and_reused():
    recognizer = Recognizer(menu_grammars(BUILTIN_MENU), workers=2)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(recognizer.recognize, bytes(16000), "more")
    assert recognizer.stats.utterances == 6
    assert 1 <= recognizer.stats.decoders <= 2


async def test_too_short_audio_gives_an_empty_transcript():
    recognizer = Recognizer(menu_grammars(BUILTIN_MENU), workers=1)
    result = await recognizer.recognize(bytes(320), "main")
    assert (result.transcript, result.confidence) == ("", 0.0)
    assert recognizer.stats.empty == 1


async def test_unknown_grammar_name():
    with pytest.raises(KeyError):
        await Recognizer(menu_grammars(BUILTIN_MENU), workers=1).recognize(b"", "nope")
