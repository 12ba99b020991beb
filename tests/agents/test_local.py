"""The local agent: capture with pre-roll, turns through the menu and the integrator, hang-up."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from voxgate.agents.dialogue import BUILTIN_MENU, Choice
from voxgate.agents.local import CallerUtterance, LocalAgent, LocalRuntime, shared_runtime
from voxgate.agents.transfer import TransferFailure
from voxgate.agents.webhook import PluginIntegrator
from voxgate.budget import BufferCaps, SessionBudget
from voxgate.config import AgentConfig, Config, TimersConfig
from voxgate.pipeline.playout import Playout
from voxgate.pipeline.vad import SpeechStarted, SpeechStopped
from voxgate.rtp.dtmf import DtmfEvent


class Controls:
    session_id = "s1"
    call_id = "c1"
    tenant = "default"
    transport = "sip"
    from_uri = "sip:alice@example.com"
    to_uri = "sip:agent@example.com"
    answered_at: float | None = 0.0

    def __init__(self) -> None:
        self.hangups: list[str] = []
        self.barge_in: list[bool] = []
        self.key_turns = 0
        self.transfers: list[str] = []

    def transfer(self, target: str) -> None:
        self.transfers.append(target)

    def hangup(self, reason: str) -> None:
        self.hangups.append(reason)

    def set_barge_in(self, enabled: bool) -> None:
        self.barge_in.append(enabled)

    def caller_turn_ended(self) -> None:
        self.key_turns += 1

    def fallback(self) -> None:
        pass

    def clear_playout(self) -> None:
        pass


@dataclass(frozen=True)
class Heard:
    """A recognition as the recogniser reports it (transcript, matched, confidence)."""

    transcript: str
    matched: str
    confidence: float = 0.97
    decode_s: float = 0.01


class FakeRecognizer:
    """Answers each recognise with the next of ``transcripts`` (a str: said and matched
    alike) or ``results``; endpointing checks answer ``check`` and are kept apart."""

    def __init__(self) -> None:
        self.transcripts: list[str | Heard] = []
        self.heard: list[tuple[bytes, str]] = []
        self.checks: list[tuple[bytes, str]] = []
        self.check = Heard("", "")
        self.checked = trio.Event()

    async def recognize(self, pcm: bytes, grammar: str, *, free_form: bool = True) -> Heard:
        if not free_form:
            self.checks.append((pcm, grammar))
            self.checked.set()
            return self.check
        self.heard.append((pcm, grammar))
        said = self.transcripts.pop(0)
        return said if isinstance(said, Heard) else Heard(said, said)


class FakeSynth:
    async def frames(self, text: str) -> tuple[bytes, ...]:
        return tuple(bytes(320) for _ in range(len(text) // 10 + 1)) if text else ()


def turns_of(agent: LocalAgent) -> list[dict[str, Any]]:
    turns = agent.describe()["turns"]
    assert isinstance(turns, list)
    return turns


def frame(n: int) -> bytes:
    return bytes([n % 256]) * 320


def make(config: AgentConfig | None = None) -> tuple[LocalAgent, Controls, FakeRecognizer]:
    runtime = LocalRuntime(config or AgentConfig(kind="local"), 5.0)
    recognizer = FakeRecognizer()
    runtime.recognizer = recognizer  # type: ignore[assignment]
    runtime.synth = FakeSynth()  # type: ignore[assignment]
    budget = SessionBudget(BufferCaps.from_ms({"playout": 30_000, "utterance": 1000},
                                              1 << 20, 2000))
    agent = LocalAgent(Playout(budget), budget, runtime, vad_start_ms=200)
    controls = Controls()
    agent.controls = controls
    return agent, controls, recognizer


def speak(agent: LocalAgent, first: int, count: int, now: float = 1.0) -> None:
    """Speech of ``count`` frames, numbered from ``first``, between VAD events; the agent's
    speech was cut first, as the pipeline's barge-in does."""
    agent.playout.clear()
    agent.on_speech(SpeechStarted(now))
    for n in range(first, first + count):
        agent.on_frame(frame(n), now)
    agent.on_speech(SpeechStopped(now + 0.5, count * 20))


def test_utterance_keeps_the_preroll_and_is_bounded():
    agent, _, _ = make()
    for n in range(40):
        agent.on_frame(frame(n), 0.0)
    speak(agent, 100, 60)  # 1.2 s: over the 1 s utterance cap
    item = agent._inputs.receive_nowait()
    assert isinstance(item, CallerUtterance)
    frames = [item.pcm[i:i + 320] for i in range(0, len(item.pcm), 320)]
    assert len(frames) == 50  # capped at [budget] utterance_ms
    assert frames[-1] == frame(159)
    assert item.speech_ms == 1200


def test_preroll_frames_come_first():
    agent, _, _ = make()
    for n in range(40):
        agent.on_frame(frame(n), 0.0)
    speak(agent, 100, 5)
    pcm = agent._inputs.receive_nowait().pcm  # type: ignore[union-attr]
    preroll = (200 + 300) // 20
    assert pcm[:320] == frame(40 - preroll)
    assert len(pcm) == (preroll + 5) * 320


def test_full_input_channel_drops_and_counts():
    agent, _, _ = make()
    for _ in range(6):
        agent.on_dtmf(DtmfEvent("1", 100, 0.0))
    assert agent.stats.dropped_inputs == 2


def test_speech_over_the_agent_with_barge_in_off_is_ignored():
    agent, _, _ = make()
    agent.playout.say([bytes(320)])
    agent.on_speech(SpeechStarted(1.0))
    agent.on_frame(frame(1), 1.0)
    agent.on_speech(SpeechStopped(1.5, 20))
    assert agent.stats.ignored_utterances == 1
    with pytest.raises(trio.WouldBlock):
        agent._inputs.receive_nowait()


async def test_conversation_through_the_menu():
    agent, controls, recognizer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        assert turns_of(agent)[0]["input"] == "greeting"
        assert agent.playout.speaking
        agent.playout.clear()
        recognizer.transcripts += ["balance", "one two three", "goodbye"]
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert controls.hangups == []
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        turns = turns_of(agent)
        assert [t.get("transcript") for t in turns] == [
            None, "balance", "one two three", "goodbye"]
        assert [g for _, g in recognizer.heard] == ["main", "account", "more"]
        assert turns[2]["say"].startswith("The balance of account 1 2 3")
        assert all(t["response_ms"] >= 0 for t in turns[1:])
        last = turns[-1]
        assert last["hangup"] and last["say"] == "Goodbye."
        for utterance_id in range(1, 5):
            agent.on_playback_done(utterance_id, "paced")
        assert controls.hangups == ["agent-hangup"]
        nursery.cancel_scope.cancel()


async def test_dtmf_digit_string_and_first_voice():
    agent, _, _ = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        agent.playout.pop()
        agent.on_frame(frame(0), 0.25)
        assert agent.describe()["time_to_first_voice_ms"] == 250
        for digit in "1", "4", "2", "#":
            agent.on_dtmf(DtmfEvent(digit, 100, trio.current_time()))
            await trio.testing.wait_all_tasks_blocked()
        turns = turns_of(agent)
        assert [t.get("dtmf") for t in turns] == [None, "1", "42"]
        assert turns[-1]["next"] == "more"
        nursery.cancel_scope.cancel()


async def test_a_transfer_choice_transfers_after_its_say_and_a_failure_is_spoken():
    steps = BUILTIN_MENU.steps
    menu = dataclasses.replace(BUILTIN_MENU, steps=(dataclasses.replace(steps[0], choices=(
        Choice(dtmf="0", say="Connecting you.", transfer="sip:human@192.0.2.7"),
        *steps[0].choices[2:])), *steps[1:]))
    agent, controls, _ = make(AgentConfig(kind="local", menu=menu))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        agent.on_dtmf(DtmfEvent("0", 100, trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        assert turns_of(agent)[-1]["transfer"] == "sip:human@192.0.2.7"
        assert controls.transfers == []  # not before "Connecting you." is played
        agent.on_playback_done(2, "paced")
        assert controls.transfers == ["sip:human@192.0.2.7"]
        agent.transfer_failed(TransferFailure("sip:human@192.0.2.7", 486, "failed"))
        await trio.testing.wait_all_tasks_blocked()
        last = turns_of(agent)[-1]
        assert (last["input"], last["status"], last["intent"], last["next"]) == (
            "transfer", 486, "transfer-failed", "main")
        assert last["say"] == f"{menu.transfer_failed_say} {steps[0].prompt}"
        assert agent.describe()["stats"]["transfer_failures"] == 1  # type: ignore[index]
        assert controls.hangups == []
        nursery.cancel_scope.cancel()


async def _hook(request: dict[str, object]) -> dict[str, object] | None:
    if request["transcript"] == "agent":
        return {"say": f"Hello {request['call']}.", "next": "main"}
    return None


async def test_integrator_reply_overrides_the_menu():
    agent, _, recognizer = make()
    agent._runtime.integrator = PluginIntegrator(_hook, max_concurrent=1, timeout_s=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts += ["agent", "balance"]
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        first, second = turns_of(agent)[1:]
        assert (first["source"], first["say"]) == (
            "plugin", "Hello c1. Say balance, agent, or goodbye.")
        assert (second["source"], second["next"]) == ("menu", "account")
        nursery.cancel_scope.cancel()


async def _transfer_hook(request: dict[str, object]) -> dict[str, object] | None:
    return {"say": "One moment.", "transfer": "sip:human@192.0.2.7", "next": "more"}


async def test_integrator_reply_transfers_the_caller():
    agent, controls, recognizer = make()
    agent._runtime.integrator = PluginIntegrator(_transfer_hook, max_concurrent=1, timeout_s=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts += ["agent"]
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        turn = turns_of(agent)[-1]
        assert (turn["source"], turn["say"], turn["next"], turn["transfer"]) == (
            "plugin", "One moment.", "main", "sip:human@192.0.2.7")
        agent.on_playback_done(2, "paced")
        assert controls.transfers == ["sip:human@192.0.2.7"]
        nursery.cancel_scope.cancel()


def test_barge_in_marks_the_cut_turn_and_the_utterance():
    agent, _, _ = make()
    agent._turns.append({"turn": 1})
    agent.on_barge_in()
    speak(agent, 0, 5)
    assert agent.describe()["turns"] == [{"turn": 1, "cut_short": True}]
    assert agent.stats.barge_ins == 1
    item = agent._inputs.receive_nowait()
    assert isinstance(item, CallerUtterance) and item.barged_in
    speak(agent, 0, 5)
    item = agent._inputs.receive_nowait()
    assert isinstance(item, CallerUtterance) and not item.barged_in


async def test_barge_in_setting_is_applied_before_speaking():
    agent, controls, _ = make(AgentConfig(kind="local", barge_in=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        assert controls.barge_in == [False]
        nursery.cancel_scope.cancel()


def test_shared_runtime_follows_the_config():
    config = Config(agent=AgentConfig(kind="local"))
    runtime = shared_runtime(config)
    assert shared_runtime(config) is runtime
    changed = Config(agent=config.agent, timers=TimersConfig(agent_response_s=1.0))
    assert shared_runtime(changed) is not runtime


async def _reply_to_no_match(request: dict[str, object]) -> dict[str, object] | None:
    requests.append(request)
    if request["intent"] == "no-match":
        return {"say": f"You said: {request['transcript']}."}
    return None


requests: list[dict[str, object]] = []


async def test_out_of_grammar_speech_is_a_no_match_the_integrator_can_answer():
    agent, controls, recognizer = make()
    agent._runtime.integrator = PluginIntegrator(_reply_to_no_match, max_concurrent=1,
                                                 timeout_s=1)
    requests.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts += [Heard("can you call me back tomorrow", "", 0.0),
                                   Heard("check my balance please", "balance", 0.75)]
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [(r["transcript"], r["intent"], r["confidence"]) for r in requests] == [
        ("can you call me back tomorrow", "no-match", 0.0),
        ("check my balance please", "balance", 0.75)]
    assert requests[0]["dtmf"] is None and requests[0]["confirming"] is False
    no_match, balance = turns_of(agent)[1:]
    assert (no_match["source"], no_match["say"], no_match["intent"]) == (
        "plugin", "You said: can you call me back tomorrow.", "no-match")
    assert (no_match["transcript"], no_match["matched"], no_match["confidence"]) == (
        "can you call me back tomorrow", "", 0.0)
    assert (balance["intent"], balance["next"], balance["source"]) == ("balance", "account", "menu")
    assert controls.hangups == [] and agent.stats.no_matches == 1


async def test_unsure_spoken_digits_are_confirmed_with_the_yes_no_grammar():
    agent, _, recognizer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts += ["balance", Heard("four five six", "four five six", 0.6),
                                   "yes"]
        for _ in range(3):
            speak(agent, 0, 10)
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [g for _, g in recognizer.heard] == ["main", "account", "_confirm"]
    _, _, question, yes = turns_of(agent)
    assert question["say"] == "I heard 4 5 6. Is that right? Say yes or no."
    assert (question["intent"], question.get("digits")) == ("digits", None)
    assert (yes["intent"], yes["digits"], yes["next"]) == ("yes", "456", "more")


async def test_repeated_no_matches_end_in_a_polite_hangup():
    agent, controls, recognizer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts += [Heard("what", "", 0.0)] * 3
        for _ in range(3):
            speak(agent, 0, 10)
            await trio.testing.wait_all_tasks_blocked()
        last = turns_of(agent)[-1]
        assert (last["say"], last["hangup"]) == ("Sorry, I did not understand. Goodbye.", True)
        for utterance_id in range(1, 5):
            agent.on_playback_done(utterance_id, "paced")
        nursery.cancel_scope.cancel()
    assert controls.hangups == ["agent-hangup"]


async def _endpoint_after(agent: LocalAgent, recognizer: FakeRecognizer,
                          check: Heard) -> list[int | None]:
    """What the agent tells the VAD over 0.5 s of a pause after speech in the main step,
    its check of the speech so far answering ``check``."""
    recognizer.check = check
    agent.playout.clear()  # the greeting: speech over it would be ignored (barge-in off)
    agent.on_speech(SpeechStarted(1.0))
    for n in range(10):
        agent.on_frame(frame(n), 1.0 + n * 0.02)
    said = [agent.endpoint(1.2, 1.2 + i * 0.02) for i in range(16)]
    with trio.fail_after(5):
        await recognizer.checked.wait()
    await trio.testing.wait_all_tasks_blocked()
    return said + [agent.endpoint(1.2, 1.2 + i * 0.02) for i in range(16, 25)]


async def test_a_confident_complete_match_ends_the_turn_early():
    agent, _, recognizer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        said = await _endpoint_after(agent, recognizer, Heard("", "balance", 0.9))
        nursery.cancel_scope.cancel()
    assert said[:16] == [None] * 16  # until the check comes back: [vad] stop_ms
    assert said[16] == 0
    (pcm, grammar), = recognizer.checks
    assert grammar == "main" and len(pcm) == 10 * 320  # the speech so far
    assert agent.describe()["endpointing"] == {"early": 1, "extended": 0}


@pytest.mark.parametrize("check", [Heard("", "four five", 0.9), Heard("", "", 0.0)])
async def test_digits_so_far_wait_longer(check: Heard):
    agent, _, recognizer = make(AgentConfig(kind="local", endpoint_max_ms=1400))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        recognizer.transcripts.append("balance")
        speak(agent, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert agent.describe()["step"] == "account"
        said = await _endpoint_after(agent, recognizer, check)
        nursery.cancel_scope.cancel()
    assert said[16:] == [1400] * 9
    assert agent.describe()["endpointing"] == {"early": 0, "extended": 1}


@pytest.mark.parametrize("check", [Heard("", "bye", 0.7), Heard("", "", 0.0)])
async def test_a_doubtful_match_or_a_no_match_leaves_the_default_silence(check: Heard):
    agent, _, recognizer = make()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.testing.wait_all_tasks_blocked()
        said = await _endpoint_after(agent, recognizer, check)
        nursery.cancel_scope.cancel()
    assert said == [None] * 25
