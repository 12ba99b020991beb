"""Offline speech recognition for the local agent, in a pool of worker processes.

A phone menu expects a few phrases; a JSGF grammar per menu step
(:func:`step_grammar`: the step's phrases, plus digit strings when a choice
takes them) recognises those reliably where the full language model does not.
Every utterance is also decoded with pocketsphinx's general en-us language
model for a free-form ``transcript`` of what was said.

pocketsphinx holds the GIL while it decodes, so decoding never runs in the
daemon: :class:`RecognizerPool` keeps ``[agent] recognizers`` worker
processes (:mod:`voxgate.agents.recognizer_worker`), each with an address
space limit of ``[agent] recognizer_memory_bytes`` and its own decoders,
built once. The pool is owned by one Trio task (:meth:`RecognizerPool.run`)
in the supervisor's nursery, so it outlives sessions; workers end with it
(killed and reaped), and with the daemon (their stdin reaches EOF). They run
below the daemon's CPU priority (``SCHED_IDLE``), so a decode never delays the
media tick.

Bounds: at most one utterance per worker is decoded, at most
:data:`QUEUE_PER_WORKER` per worker wait (more are dropped, counted, and
answered no-match). A worker that dies or takes longer than ``[agent]
recognizer_timeout_s`` on one utterance is killed and restarted after a
backoff (``voxgate_recognizer_restarts_total``, one ``recognizer_restart``
log line); its utterance is answered no-match. A worker is watched while idle
too, so one that dies between utterances is restarted at once. Each worker
that has built its decoders logs one ``recognizer_ready`` line. An utterance
that no worker takes within ``recognizer_timeout_s`` (none ready: they keep
dying, or are still starting) is answered no-match too, so a caller hears
the menu's answer instead of waiting for ever.
:meth:`Recognizer.recognize` never raises because of a worker.

Rejection: the grammar path's acoustic fit decides (see
:func:`voxgate.agents.recognizer_worker.grammar_fit`; measured with
``python -m bench.recognition``); utterances that fit below
:data:`~voxgate.agents.recognizer_worker.REJECT_BELOW` are a no-match.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from pocketsphinx import get_model_path

import voxgate
from voxgate.agents.dialogue import DIGIT_WORDS, Menu, Step, grammar_steps
from voxgate.agents.recognizer_worker import BadMessage, MessageReader, encode_message
from voxgate.config import AgentConfig
from voxgate.errors import ConfigError
from voxgate.logging import log_event
from voxgate.metrics import RECOGNIZER_RESTARTS

QUEUE_PER_WORKER = 16
"""Utterances that may wait per worker; more are dropped (no-match, counted)."""
START_TIMEOUT_S = 30.0
"""A worker that has not built its decoder by then is killed and restarted."""
RESTART_BACKOFF_S = (0.1, 5.0)
"""First and longest wait before restarting a worker (doubling in between)."""
STEADY_S = 10.0
"""A worker that lived this long restarts after the first backoff again."""
DEFAULT_MEMORY_BYTES = 512 << 20
DEFAULT_TIMEOUT_S = 10.0


def step_grammar(step: Step) -> str:
    """The JSGF grammar (JSGF 1.0) of what ``step`` expects: its phrases and digit strings."""
    alternatives = sorted({phrase for choice in step.choices for phrase in choice.phrases})
    rules = ""
    if step.takes_digits:
        alternatives.append("<digit>+")
        rules = "<digit> = " + " | ".join(sorted(DIGIT_WORDS)) + ";\n"
    return (f"#JSGF V1.0;\ngrammar {step.name};\n"
            f"public <input> = {' | '.join(alternatives)};\n{rules}")


def menu_grammars(menu: Menu) -> dict[str, str]:
    """Step name → its grammar, for every step of ``menu`` and the dialogue's yes/no
    question (:func:`~voxgate.agents.dialogue.grammar_steps`)."""
    return {step.name: step_grammar(step) for step in grammar_steps(menu)}


@dataclass(frozen=True, slots=True)
class Recognition:
    """One decoded utterance.

    Attributes:
        transcript: the free-form transcript from the en-us language model
            ("" = nothing heard, or not asked for).
        matched: the step grammar's words when the rejection accepts them;
            "" = no-match (out of grammar, rejected, or the worker died or timed out).
        confidence: 0..1, how sure ``matched`` is what was said (0.0 when it is "").
        decode_s: seconds of decoding in the worker (0.0 when none happened).
    """

    transcript: str
    matched: str
    confidence: float
    decode_s: float


NO_MATCH = Recognition("", "", 0.0, 0.0)


class PoolStats:
    """Counters of one :class:`RecognizerPool`."""

    __slots__ = ("dropped", "expired", "failed", "restarts", "started", "timeouts",
                 "utterances")

    def __init__(self) -> None:
        self.utterances = 0
        """Utterances answered by a worker."""
        self.dropped = 0
        """Utterances answered no-match at once: the queue was full or the pool not running."""
        self.expired = 0
        """Utterances answered no-match because no worker took them within the timeout."""
        self.failed = 0
        """Utterances answered no-match because their worker died, timed out, erred or
        was stopped with the pool."""
        self.timeouts = 0
        """Workers killed for taking longer than the decode timeout."""
        self.restarts = 0
        """Workers restarted (after dying, a timeout, or a failed start)."""
        self.started = 0
        """Workers that built their decoder and reported ready."""


class _Request:
    """One utterance on its way through the pool."""

    __slots__ = ("abandoned", "done", "free_form", "grammar", "pcm", "result", "taken")

    def __init__(self, pcm: bytes, grammar: str, free_form: bool) -> None:
        self.pcm = pcm
        self.grammar = grammar
        self.free_form = free_form
        self.result = NO_MATCH
        self.done = trio.Event()
        self.abandoned = False
        """The caller stopped waiting: a worker skips it."""
        self.taken = False
        """A worker is decoding it (or has)."""


class _WorkerLost(Exception):
    """The worker died, hung, or spoke garbage: kill it and start another."""


class RecognizerPool:
    """The worker processes that decode, shared by every session of the process.

    Args:
        workers: processes, and utterances decoded at once (``[agent] recognizers``).
        memory_bytes: each worker's ``RLIMIT_AS`` (``[agent] recognizer_memory_bytes``).
        timeout_s: most seconds one utterance may take (``[agent] recognizer_timeout_s``).
    """

    def __init__(self, *, workers: int, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.workers = workers
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self._send, self._receive = trio.open_memory_channel[_Request](
            workers * QUEUE_PER_WORKER)
        self._pids: dict[int, int] = {}
        self._running = False
        self.stats = PoolStats()

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers alive now."""
        return sorted(self._pids.values())

    def rss_bytes(self) -> int:
        """The workers' resident memory, summed (read from ``/proc/PID/statm``)."""
        from voxgate.budget import parse_statm_rss_bytes

        page_size = os.sysconf("SC_PAGE_SIZE")
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += parse_statm_rss_bytes(f.read(), page_size)
            except (OSError, ValueError):  # gone since, or being restarted
                continue
        return total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep the workers running until cancelled; they are killed and reaped on the way out.

        Reports started at once: utterances wait in the queue while the
        workers build their decoders.
        """
        if self._running:
            raise RuntimeError("the recognizer pool is running already")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                for slot in range(self.workers):
                    nursery.start_soon(self._keep_worker, slot)
                task_status.started()
        finally:
            self._running = False
            self._pids.clear()
            while True:  # nobody will take these any more
                try:
                    self._receive.receive_nowait().done.set()
                except trio.WouldBlock:
                    break

    async def decode(self, pcm: bytes, grammar: str, free_form: bool) -> Recognition:
        """``pcm`` decoded by a worker with the JSGF text ``grammar`` (no-match when
        the pool is not running, its queue is full, no worker takes it within the
        timeout, or the worker fails)."""
        request = _Request(pcm, grammar, free_form)
        if not self._running:
            self.stats.dropped += 1
            return NO_MATCH
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            self.stats.dropped += 1
            return NO_MATCH
        try:
            with trio.move_on_after(self.timeout_s):
                await request.done.wait()
            if not request.taken:
                self.stats.expired += 1
                return NO_MATCH
            await request.done.wait()  # bounded by the worker's own decode timeout
        finally:
            request.abandoned = True
        return request.result

    async def _keep_worker(self, slot: int) -> None:
        """Run worker ``slot``; restart it with a backoff whenever it is lost."""
        backoff_s = RESTART_BACKOFF_S[0]
        while True:
            started = trio.current_time()
            try:
                await self._serve(slot)
            except _WorkerLost as e:
                reason = str(e)
            finally:
                self._pids.pop(slot, None)
            if trio.current_time() - started >= STEADY_S:
                backoff_s = RESTART_BACKOFF_S[0]
            self.stats.restarts += 1
            RECOGNIZER_RESTARTS.inc()
            log_event(logging.WARNING, "recognizer_restart",
                      f"recognizer worker lost ({reason}); restarting in {backoff_s:.1f} s",
                      slot=slot, reason=reason)
            await trio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_S[1])

    async def _serve(self, slot: int) -> None:
        """Start one worker and feed it requests until it is lost (raises _WorkerLost)."""
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "voxgate.agents.recognizer_worker",
                 "--memory-bytes", str(self.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_worker_env())
        except OSError as e:
            raise _WorkerLost(f"cannot start: {e}") from e
        assert process.stdin is not None and process.stdout is not None
        self._pids[slot] = process.pid
        reader = MessageReader()
        started = trio.current_time()
        try:
            with trio.move_on_after(START_TIMEOUT_S) as starting:
                ready = await _exchange(process, reader, {"init": True}, b"")
            if starting.cancelled_caught or not ready.get("ready"):
                raise _WorkerLost(f"not ready within {START_TIMEOUT_S:.0f} s")
            self.stats.started += 1
            startup_ms = round((trio.current_time() - started) * 1000)
            log_event(logging.INFO, "recognizer_ready",
                      f"recognizer worker ready in {startup_ms} ms",
                      slot=slot, pid=process.pid, startup_ms=startup_ms)
            # The worker is watched while idle too: one that dies between utterances is
            # restarted at once, not found dead by (and answering no-match to) the next one.
            lost: list[_WorkerLost] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._decode_requests, process, reader, lost)
                status = await process.wait()
                nursery.cancel_scope.cancel()
            raise lost[0] if lost else _WorkerLost(f"exited ({status})")
        finally:
            with trio.CancelScope(shield=True):
                process.kill()
                await process.wait()
                await process.stdin.aclose()
                await process.stdout.aclose()

    async def _decode_requests(self, process: trio.Process, reader: MessageReader,
                               lost: list[_WorkerLost]) -> None:
        """Feed the worker queued utterances until it is lost; then put why in ``lost``
        and kill it (which ends :meth:`_serve`'s wait for its exit)."""
        try:
            async for request in self._receive:
                if not request.abandoned:
                    await self._decode_one(process, reader, request)
            raise _WorkerLost("the request channel closed")  # never: the pool holds it
        except _WorkerLost as e:
            lost.append(e)
            process.kill()

    async def _decode_one(self, process: trio.Process, reader: MessageReader,
                          request: _Request) -> None:
        """Have the worker decode ``request``; its waiter is woken whatever happens (a
        no-match, counted as failed, unless the worker answered)."""
        request.taken = True
        try:
            with trio.move_on_after(self.timeout_s) as decoding:
                reply = await _exchange(process, reader, {
                    "grammar": request.grammar, "free_form": request.free_form,
                }, request.pcm)
            if decoding.cancelled_caught:
                self.stats.timeouts += 1
                raise _WorkerLost(f"no answer within {self.timeout_s:g} s")
            request.result = _recognition(reply)
        finally:
            if request.result is NO_MATCH:  # lost, or cancelled by the worker's exit
                self.stats.failed += 1
            else:
                self.stats.utterances += 1
            request.done.set()


async def _exchange(process: trio.Process, reader: MessageReader,
                    header: Mapping[str, object], payload: bytes) -> dict[str, object]:
    """Send one message to the worker and read its answer's header.

    Raises:
        _WorkerLost: the pipes broke, the worker exited, or it answered garbage or an error.
    """
    assert process.stdin is not None and process.stdout is not None
    try:
        await process.stdin.send_all(encode_message(header, payload))
        while (message := reader.next_untrusted()) is None:
            data = await process.stdout.receive_some(1 << 16)
            if not data:
                raise _WorkerLost(f"exited ({await process.wait()})")
            reader.feed(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, BadMessage) as e:
        raise _WorkerLost(str(e) or type(e).__name__) from e
    reply, _ = message
    if "error" in reply:
        raise _WorkerLost(f"worker error: {reply['error']}")
    return reply


def _recognition(reply: Mapping[str, object]) -> Recognition:
    """A worker's reply as a :class:`Recognition`; _WorkerLost when malformed."""
    try:
        confidence = float(reply["confidence"])  # type: ignore[arg-type]
        return Recognition(str(reply["transcript"]), str(reply["matched"]),
                           max(0.0, min(1.0, confidence)),
                           float(reply["decode_s"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise _WorkerLost(f"malformed reply: {e}") from e


def _worker_env() -> dict[str, str]:
    """The daemon's environment, with voxgate importable from where it is now."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(voxgate.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


class Recognizer:
    """Utterances of a menu's steps → :class:`Recognition`, decoded in ``pool``.

    Args:
        grammars: step name → JSGF grammar text (see :func:`menu_grammars`).
        pool: the worker processes (run by its owner, see :meth:`RecognizerPool.run`).
    """

    def __init__(self, grammars: Mapping[str, str], pool: RecognizerPool, *,
                 dictionary_path: str | None = None) -> None:
        self._grammars = dict(grammars)
        self._words = frozenset(word for text in grammars.values() for word in _words(text))
        self._dictionary_path = dictionary_path or get_model_path("en-us/cmudict-en-us.dict")
        self.pool = pool

    def check_words(self) -> None:
        """Raise ConfigError when a grammar holds a word the dictionary does not know
        (reads the dictionary file: for start-up and ``--check-config``)."""
        load_lexicon(self._dictionary_path, self._words)

    async def recognize(self, pcm: bytes, grammar: str, *,
                        free_form: bool = True) -> Recognition:
        """Decode ``pcm`` (8 kHz 16-bit mono) with the step grammar called ``grammar``
        and, when ``free_form``, with the general language model too.

        Never raises because of a worker: a lost one gives a no-match.

        Raises:
            KeyError: no grammar of that name.
        """
        return await self.pool.decode(pcm, self._grammars[grammar], free_form)


_pool: RecognizerPool | None = None


def shared_pool(agent: AgentConfig) -> RecognizerPool:
    """The process's one :class:`RecognizerPool`, made from ``[agent]`` on first use (its
    keys need a restart; the supervisor runs it while a local agent is configured)."""
    global _pool
    if _pool is None:
        _pool = RecognizerPool(workers=agent.recognizers,
                               memory_bytes=agent.recognizer_memory_bytes,
                               timeout_s=agent.recognizer_timeout_s)
    return _pool


@asynccontextmanager
async def open_recognizer(grammars: Mapping[str, str], *, workers: int = 1,
                          memory_bytes: int = DEFAULT_MEMORY_BYTES,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncIterator[Recognizer]:
    """A :class:`Recognizer` with a pool of its own, running until the block ends
    (for tools and tests; the daemon runs one pool for all its calls)."""
    pool = RecognizerPool(workers=workers, memory_bytes=memory_bytes, timeout_s=timeout_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield Recognizer(grammars, pool)
        nursery.cancel_scope.cancel()


def load_lexicon(dictionary_path: str, words: Iterable[str]) -> dict[str, str]:
    """The pronunciations of ``words`` from a CMU-style dictionary file.

    Keys are the dictionary's entries (``word``, and ``word(2)`` … for
    alternatives), values their phones.

    Raises:
        ConfigError: a word is not in the dictionary.
    """
    wanted = set(words)
    lexicon: dict[str, str] = {}
    with open(dictionary_path, encoding="utf-8") as f:
        for line in f:
            entry, _, phones = line.strip().partition(" ")
            if entry.split("(", 1)[0] in wanted:
                lexicon[entry] = phones.strip()
    unknown = sorted(wanted - {entry.split("(", 1)[0] for entry in lexicon})
    if unknown:
        raise ConfigError(f"[agent.menu]: words not in the recogniser's dictionary: "
                          f"{', '.join(unknown)}")
    return lexicon


def _words(grammar: str) -> Iterable[str]:
    """The words of a grammar made by :func:`step_grammar`."""
    for line in grammar.splitlines():
        if line.startswith(("public <input> =", "<digit> =")):
            body = line.split("=", 1)[1]
            yield from (w for w in body.replace("|", " ").rstrip(";").split()
                        if not w.startswith("<"))
