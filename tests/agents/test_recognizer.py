"""The recogniser: grammars, the worker protocol, the process pool, rejection of speech."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from tests.agents.speech import speak_pcm
from tests.harness import requires
from tests.harness.daemon import running_daemon
from voxgate.agents.dialogue import BUILTIN_MENU, DIGIT_WORDS, Choice, Menu, Step
from voxgate.agents.recognizer import (
    QUEUE_PER_WORKER,
    Recognizer,
    RecognizerPool,
    load_lexicon,
    menu_grammars,
    open_recognizer,
    step_grammar,
)
from voxgate.agents.recognizer_worker import (
    HEADER,
    MAX_HEADER_BYTES,
    BadMessage,
    MessageReader,
    encode_message,
    trim_silence,
)
from voxgate.errors import ConfigError

SILENCE = bytes(6400)
"""400 ms at 8 kHz PCM16."""
GRAMMARS = menu_grammars(BUILTIN_MENU)
MIN_CONFIDENCE = 0.5
"""The thresholds ``python -m bench.recognition`` justifies (see ``[agent.menu]``)."""
HANGUP_CONFIDENCE = 0.85


def spoken(text: str, **voice: object) -> bytes:
    """``text`` as the daemon hands an utterance over: speech with silence around it."""
    return SILENCE + speak_pcm(text, **voice) + SILENCE  # type: ignore[arg-type]


async def until(condition: object, what: str) -> None:
    """Poll ``condition()`` every 20 ms, for at most 30 s."""
    with trio.fail_after(30):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - other processes
            await trio.sleep(0.02)
    assert condition(), what  # type: ignore[operator]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- grammars and lexicon ---------------------------------------------------------------------


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


def test_unknown_grammar_word_fails_the_check():
    menu = Menu(steps=(Step(name="a", choices=(Choice(phrases=("voxgatex",)),)),))
    recognizer = Recognizer(menu_grammars(menu), RecognizerPool(workers=1))
    with pytest.raises(ConfigError, match="voxgatex"):
        recognizer.check_words()


async def test_unknown_grammar_name():
    with pytest.raises(KeyError):
        await Recognizer(GRAMMARS, RecognizerPool(workers=1)).recognize(b"", "nope")


# -- the worker protocol (sans-IO) ------------------------------------------------------------


def test_messages_round_trip_in_any_pieces():
    wire = encode_message({"grammar": "g", "free_form": False}, b"\x01\x02") + encode_message(
        {"ready": True})
    reader = MessageReader()
    got = []
    for i in range(len(wire)):  # one byte at a time
        reader.feed(wire[i:i + 1])
        while (message := reader.next_untrusted()) is not None:
            got.append(message)
    assert got == [({"grammar": "g", "free_form": False}, b"\x01\x02"), ({"ready": True}, b"")]


@pytest.mark.parametrize("wire", [
    HEADER.pack(MAX_HEADER_BYTES + 1, 0),
    HEADER.pack(2, 0) + b"{x",
    HEADER.pack(2, 0) + b"[]",
])
def test_bad_messages_are_refused(wire):
    reader = MessageReader()
    reader.feed(wire)
    with pytest.raises(BadMessage):
        reader.next_untrusted()


def test_trim_silence_leaves_the_same_margin_whatever_came_with_the_speech():
    speech = speak_pcm("balance")
    trimmed = trim_silence(bytes(16000) + speech + bytes(16000))  # 1 s of silence each side
    assert trim_silence(speech) == trimmed  # espeak-ng's own short silence: padded
    assert trim_silence(bytes(800) + speech) == trimmed
    assert len(trimmed) < len(speech) + 2 * 4800  # at most 300 ms either side
    assert trim_silence(bytes(1600)) == bytes(1600)  # nothing loud: unchanged


# -- the process pool -------------------------------------------------------------------------


@requires("espeak-ng")
async def test_pool_decodes_in_a_worker_process():
    async with open_recognizer(GRAMMARS) as recognizer:
        result = await recognizer.recognize(spoken("my balance"), "main")
        pids = recognizer.pool.pids
        stats = recognizer.pool.stats
        assert result.matched == "my balance"
        assert MIN_CONFIDENCE <= result.confidence <= 1.0
        assert isinstance(result.transcript, str) and result.decode_s > 0
        assert len(pids) == 1 and pids[0] != os.getpid()
        assert (stats.utterances, stats.restarts, stats.failed) == (1, 0, 0)
        assert recognizer.pool.rss_bytes() > 20 << 20  # the decoder's model, not the daemon's
        grammar_only = await recognizer.recognize(spoken("no"), "more", free_form=False)
        assert (grammar_only.matched, grammar_only.transcript) == ("no", "")
    assert not any(alive(pid) for pid in pids), "a worker outlived the pool's nursery"


@requires("espeak-ng")
async def test_killed_worker_gives_no_match_and_is_restarted():
    long_speech = spoken(" ".join(["I would like to speak to someone about my bill"] * 6))
    async with open_recognizer(GRAMMARS) as recognizer:
        pool = recognizer.pool
        await until(lambda: pool.stats.started == 1, "the worker never got ready")
        victim = pool.pids[0]
        async with trio.open_nursery() as nursery:
            results = []

            async def recognize_long() -> None:
                results.append(await recognizer.recognize(long_speech, "main"))

            nursery.start_soon(recognize_long)
            await trio.sleep(0.3)  # well into the free-form decode of ~20 s of speech
            os.kill(victim, signal.SIGKILL)
        assert results[0].matched == "" and results[0].confidence == 0.0
        assert pool.stats.failed == 1
        await until(lambda: pool.stats.restarts == 1, "the lost worker was not counted")
        after = await recognizer.recognize(spoken("agent"), "main")
        assert after.decode_s > 0 and pool.stats.utterances == 1  # decoded by the new worker
        assert pool.pids and victim not in pool.pids
    assert not alive(victim)


@requires("espeak-ng")
async def test_worker_that_dies_idle_is_restarted_before_the_next_utterance():
    async with open_recognizer(GRAMMARS) as recognizer:
        pool = recognizer.pool
        await until(lambda: pool.stats.started == 1, "the worker never got ready")
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: pool.stats.started == 2, "the dead idle worker was not restarted")
        assert pool.stats.restarts == 1 and victim not in pool.pids
        after = await recognizer.recognize(spoken("agent"), "main")
        assert after.decode_s > 0 and (pool.stats.utterances, pool.stats.failed) == (1, 0)
    assert not alive(victim)


async def test_worker_has_the_memory_limit():
    async with open_recognizer(GRAMMARS, memory_bytes=300 << 20) as recognizer:
        pool = recognizer.pool
        await until(lambda: pool.stats.started == 1, "the worker never got ready")
        limits = await trio.Path(f"/proc/{pool.pids[0]}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max address space"))
    assert line.split()[3:5] == [str(300 << 20), str(300 << 20)]


async def test_idle_worker_lives_and_runs_below_the_daemon():
    """A worker outlives Trio's idle spawning thread (10 s; PR_SET_PDEATHSIG killed it
    then) and runs at SCHED_IDLE, so the daemon's media tick preempts its decodes."""
    async with open_recognizer(GRAMMARS) as recognizer:
        pool = recognizer.pool
        await until(lambda: pool.stats.started == 1, "the worker never got ready")
        pid = pool.pids[0]
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        await trio.sleep(12)
        assert pool.pids == [pid] and pool.stats.restarts == 0


async def test_slow_utterance_times_out_and_the_worker_restarts():
    async with open_recognizer(GRAMMARS, timeout_s=1.0) as recognizer:
        pool = recognizer.pool
        await until(lambda: pool.stats.started == 1, "the worker never got ready")
        # Two minutes of loud noise: the free-form search takes far longer than 1 s.
        noise = os.urandom(16000 * 120)
        result = await recognizer.recognize(noise, "main")
        assert result.matched == "" and result.decode_s == 0.0
        assert pool.stats.timeouts == 1
        await until(lambda: pool.stats.started == 2, "the worker was not restarted")
        assert pool.stats.restarts == 1


async def test_utterance_no_worker_takes_in_time_is_a_no_match():
    # 32 MiB of address space: every worker fails to build its decoders and restarts.
    async with open_recognizer(GRAMMARS, memory_bytes=32 << 20, timeout_s=1.0) as recognizer:
        pool = recognizer.pool
        result = await recognizer.recognize(bytes(3200), "main")
        assert result.matched == "" and result.decode_s == 0.0
        assert (pool.stats.expired, pool.stats.started, pool.stats.utterances) == (1, 0, 0)
        await until(lambda: pool.stats.restarts >= 1, "the failing worker was not restarted")


async def test_queue_is_bounded_and_drops_are_counted():
    async with open_recognizer(GRAMMARS) as recognizer:
        results = []

        async def recognize() -> None:
            results.append(await recognizer.recognize(bytes(3200), "more", free_form=False))

        async with trio.open_nursery() as nursery:
            for _ in range(QUEUE_PER_WORKER + 3):  # before the worker is ready
                nursery.start_soon(recognize)
        assert recognizer.pool.stats.dropped == 3
        assert recognizer.pool.stats.utterances == QUEUE_PER_WORKER
        assert len(results) == QUEUE_PER_WORKER + 3


async def test_pool_not_running_answers_no_match():
    pool = RecognizerPool(workers=1)
    result = await Recognizer(GRAMMARS, pool).recognize(bytes(3200), "main")
    assert result.matched == "" and pool.stats.dropped == 1


def test_workers_die_with_the_daemon(tmp_path):
    """SIGKILL the owning process: its workers go too (their stdin reaches EOF)."""
    script = textwrap.dedent("""
        import sys, trio
        from voxgate.agents.dialogue import BUILTIN_MENU
        from voxgate.agents.recognizer import menu_grammars, open_recognizer

        async def main():
            async with open_recognizer(menu_grammars(BUILTIN_MENU), workers=2) as r:
                while len(r.pool.pids) < 2:
                    await trio.sleep(0.02)
                print(*r.pool.pids, flush=True)
                await trio.sleep_forever()

        trio.run(main)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True) as owner:
        try:
            assert owner.stdout is not None
            pids = [int(pid) for pid in owner.stdout.readline().split()]
            assert len(pids) == 2 and all(alive(pid) for pid in pids)
        finally:
            owner.kill()
    trio.run(until, lambda: not any(alive(pid) for pid in pids), "an orphan worker survived")


# -- rejection on telephone speech ------------------------------------------------------------


@requires("espeak-ng")
async def test_rejection_by_phrase_class():
    """Menu phrases are matched confidently; sentences outside the grammar are rejected
    (at most one of five accepted: the benchmark measured 2 of 120) and never reach a
    hang-up choice's threshold; digit strings come out as digits or not at all."""
    in_grammar = [("main", "my balance", "en-us"), ("main", "bye", "en-us"),
                  ("main", "agent", "en-gb-scotland"), ("more", "yes", "en-us"),
                  ("more", "no", "en-gb")]
    out_of_grammar = [("main", "can you call me back tomorrow morning"),
                      ("main", "hello is anybody there"),
                      ("more", "I am not sure"),  # heard as "no", a hang-up choice
                      ("more", "what are your opening hours"),
                      ("account", "I would like to speak to someone")]
    hangup_phrases = {"goodbye", "bye", "no"}
    async with open_recognizer(GRAMMARS, workers=2) as recognizer:
        for step, text, voice in in_grammar:
            result = await recognizer.recognize(spoken(text, voice=voice), step,
                                                free_form=False)
            assert result.matched == text, (text, result)
            assert result.confidence >= MIN_CONFIDENCE, (text, result)
        accepted = []
        for step, text in out_of_grammar:
            result = await recognizer.recognize(spoken(text), step)
            if result.matched and result.confidence >= MIN_CONFIDENCE:
                accepted.append((text, result))
            assert not (result.matched in hangup_phrases
                        and result.confidence >= HANGUP_CONFIDENCE), (text, result)
            assert result.transcript, text  # the free-form model heard words
        assert len(accepted) <= 1, accepted
        digits = await recognizer.recognize(spoken("one two three four"), "account")
        assert digits.matched == "" or set(digits.matched.split()) <= set(DIGIT_WORDS)


# -- in the daemon ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended since
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def test_daemon_runs_the_workers_counts_their_rss_and_reaps_them(tmp_path):
    """The supervisor starts ``[agent] recognizers`` workers with the memory limit; their
    RSS closes admission at a soft mark the daemon alone is far below; SIGTERM ends them."""
    soft = 200 << 20
    with running_daemon(tmp_path, {
        "agent": {"kind": "local", "recognizers": 2, "recognizer_memory_bytes": 400 << 20},
        "budget": {"rss_soft_bytes": soft, "rss_hard_bytes": 4 << 30},
    }) as daemon:
        gate = daemon.wait_log(r"event=memory_gate .*rss_bytes=(\d+)", timeout_s=60)
        with open(f"/proc/{daemon.pid}/statm") as f:
            own_rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert own_rss < soft <= int(gate.group(1)), (own_rss, gate.group(0))
        workers = _children(daemon.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            with open(f"/proc/{pid}/limits") as f:
                assert f"Max address space         {400 << 20}" in f.read()
        assert daemon.terminate() == 0
    assert not any(alive(pid) for pid in workers)
