"""Run the real Pipecat bot (``tests/bots/pipecat_bot.py``) for a stream-agent test.

The bot lives in its own virtualenv, ``.venv-bot`` (``make bot-venv``; ``make setup``
builds it), because Pipecat's dependency set has nothing to do with voxgate's.
:class:`PipecatBot` starts it on 127.0.0.1 (a free port unless one is given), waits for
its ``ready port=N`` line, and reads the JSON-lines events it writes; the process is
stopped by its own PID on the way out whatever happened::

    with PipecatBot("twilio", workdir=tmp_path) as bot:
        ...  # point voxgate's stream agent at bot.url
        bot.wait_event(lambda e: e["event"] == "dtmf" and e["digit"] == "5")
        # or, in a trio test running voxgate in-process: await bot.await_event(...)

Events (see the bot's docstring) carry ``event``, ``conn`` (1 for the first connection)
and ``t`` (Unix time). The bot echoes caller audio; DTMF ``1`` plays 1 s of tone then
sends a mark (Twilio) / notify (Vonage) named ``m1``, ``m2``…; ``#`` plays 3 s of tone
and clears it after 0.5 s; ``*`` ends the call (bot closes the socket, code 1000);
``0`` cancels it (abrupt close).

:class:`BotProcess` is the process handling for any bot of ``.venv-bot`` (a subclass
gives its command line), e.g. the misbehaving one of :mod:`tests.harness.hostile_bot`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]
BOT_VENV = REPO_ROOT / ".venv-bot"
BOT_VENV_STAMP = BOT_VENV / ".installed"
BOT_SCRIPT = REPO_ROOT / "tests" / "bots" / "pipecat_bot.py"
WS_PATH = "/ws"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_KILL_TIMEOUT_S = 10.0
_POLL_S = 0.05

Protocol = Literal["twilio", "vonage"]
Event = dict[str, Any]
EventMatch = str | Callable[[Event], bool]
"""An event name, or a predicate over the parsed event."""


class BotVenvMissing(RuntimeError):
    """``.venv-bot`` is absent or was not fully installed."""


def bot_venv_python() -> Path:
    """The bot virtualenv's interpreter.

    Raises:
        BotVenvMissing: ``.venv-bot`` was not built, or its install did not finish.
    """
    python = BOT_VENV / "bin" / "python"
    if not python.exists() or not BOT_VENV_STAMP.exists():
        state = "is incomplete" if python.exists() else "is missing"
        raise BotVenvMissing(
            f"{BOT_VENV} {state}: the Pipecat bot needs its own virtualenv; "
            "run `make bot-venv` (or `make setup`) first"
        )
    return python


def _matcher(match: EventMatch) -> Callable[[Event], bool]:
    if isinstance(match, str):
        name = match
        return lambda event: event.get("event") == name
    return match


class BotProcess:
    """A bot server of ``.venv-bot`` as a subprocess: start, readiness, events, stop or kill.

    Subclasses give :meth:`command`: a program that listens on ``self.host`` and the
    port asked for, prints ``ready port=N`` on stdout once listening and writes JSON-lines
    events to ``self.events_path``. ``workdir`` holds ``bot-events.jsonl`` and ``bot.log``
    (the bot's stderr); without one a temporary directory is used and removed by
    :meth:`stop`. ``port=0`` lets the bot bind a free port; give the port of a killed bot
    to start its replacement at the same URL.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        workdir: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.host = "127.0.0.1"
        self._requested_port = port
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="voxgate-bot-")) if workdir is None else workdir
        self.events_path = self.workdir / "bot-events.jsonl"
        self.log_path = self.workdir / "bot.log"
        self._ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._port: int | None = None
        self._stdout: list[str] = []
        self._stdout_cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._events: list[Event] = []
        self._events_offset = 0
        self._partial = b""

    # lifecycle

    def command(self) -> list[str]:
        """The bot's command line (the bot virtualenv's interpreter and a script)."""
        raise NotImplementedError

    def listen_args(self) -> list[str]:
        """``--host H --port P --events PATH``: the options every bot takes."""
        return ["--host", self.host, "--port", str(self._requested_port),
                "--events", str(self.events_path)]

    def start(self) -> Self:
        """Start the bot and wait for ``ready port=N``.

        Raises:
            BotVenvMissing: no usable ``.venv-bot``.
            RuntimeError: already started, or the bot exited or was not ready in time
                (the bot is killed and its log tail is in the message).
        """
        if self._proc is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        cmd = self.command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_child_env(),
            )
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        port = self._wait_ready()
        if port is None:
            self.kill()
            raise RuntimeError(
                f"{type(self).__name__} not ready in {self._ready_timeout_s} s "
                f"(exit code {self._proc.returncode}); log tail:\n{self._log_tail()}"
            )
        self._port = port
        return self

    def _read_stdout(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            with self._stdout_cond:
                self._stdout.append(line.rstrip("\n"))
                self._stdout_cond.notify_all()
        with self._stdout_cond:
            self._stdout_cond.notify_all()

    def _wait_ready(self) -> int | None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._ready_timeout_s
        with self._stdout_cond:
            while True:
                for line in self._stdout:
                    if line.startswith("ready port="):
                        return int(line.removeprefix("ready port="))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or proc.poll() is not None:
                    return None
                self._stdout_cond.wait(min(remaining, _POLL_S * 4))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM by PID, wait ``timeout_s``, then SIGKILL; returns the exit code.

        Idempotent; None when the bot was never started. Removes the temporary workdir
        if this object created it.
        """
        proc = self._proc
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=_KILL_TIMEOUT_S)
            self._join_reader()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def kill(self) -> int | None:
        """SIGKILL by PID (a crash, for failover tests) and reap; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=_KILL_TIMEOUT_S)
        self._join_reader()
        return code

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=_KILL_TIMEOUT_S)
            self._reader = None
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # state

    @property
    def port(self) -> int:
        """The TCP port the bot listens on (known once started)."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._port

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:N/ws``: where voxgate's stream agent connects."""
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def pid(self) -> int:
        """The bot's process id."""
        if self._proc is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._proc.pid

    def alive(self) -> bool:
        """Started and still running."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """The bot's stderr (Pipecat's log) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # events

    def events(self, match: EventMatch | None = None) -> list[Event]:
        """Every event written so far, in order; only those matching ``match`` if given."""
        self._read_events()
        if match is None:
            return list(self._events)
        accept = _matcher(match)
        return [event for event in self._events if accept(event)]

    def _read_events(self) -> None:
        try:
            with self.events_path.open("rb") as f:
                f.seek(self._events_offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._events_offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if line.strip():
                self._events.append(json.loads(line))

    def wait_event(self, match: EventMatch, timeout_s: float = 10.0) -> Event:
        """The first event matching ``match`` (a name or a predicate), waiting up to
        ``timeout_s`` for it to be written. Blocks the thread: in a trio test where
        voxgate runs in-process, use :meth:`await_event`.

        Raises:
            AssertionError: none came in time, or the bot exited first; the message
                holds the last events and the bot's log tail.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._poll(match, deadline, timeout_s)
            if found is not None:
                return found
            time.sleep(_POLL_S)

    async def await_event(self, match: EventMatch, timeout_s: float = 10.0) -> Event:
        """:meth:`wait_event` that sleeps with trio, leaving the event loop running."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._poll(match, deadline, timeout_s)
            if found is not None:
                return found
            await trio.sleep(_POLL_S)

    def _poll(self, match: EventMatch, deadline: float, timeout_s: float) -> Event | None:
        accept = _matcher(match)
        exited = not self.alive()
        for event in self.events():
            if accept(event):
                return event
        if exited or time.monotonic() >= deadline:
            last = "\n".join(json.dumps(e) for e in self.events()[-20:])
            why = "bot exited" if exited else f"no matching event in {timeout_s} s"
            raise AssertionError(f"{why}; last events:\n{last}\nbot log tail:\n{self._log_tail()}")
        return None


class PipecatBot(BotProcess):
    """The Pipecat bot (``tests/bots/pipecat_bot.py``) speaking ``protocol``; the other
    arguments are :class:`BotProcess`'s."""

    def __init__(
        self,
        protocol: Protocol = "twilio",
        *,
        sample_rate: int = 16000,
        port: int = 0,
        workdir: Path | None = None,
        log_level: str = "INFO",
        ready_timeout_s: float = READY_TIMEOUT_S,
        transfer: tuple[str, str] | None = None,
    ) -> None:
        """``transfer``: (key, SIP URI): that key makes the bot ask for a transfer there."""
        super().__init__(port=port, workdir=workdir, ready_timeout_s=ready_timeout_s)
        self.protocol: Protocol = protocol
        self.sample_rate = sample_rate
        self._log_level = log_level
        self._transfer = transfer

    def command(self) -> list[str]:
        """The bot's command line."""
        cmd = [
            str(bot_venv_python()),
            str(BOT_SCRIPT),
            *self.listen_args(),
            "--protocol",
            self.protocol,
            "--log-level",
            self._log_level,
        ]
        if self.protocol == "vonage":
            cmd += ["--sample-rate", str(self.sample_rate)]
        if self._transfer is not None:
            cmd += ["--transfer-key", self._transfer[0], "--transfer-target", self._transfer[1]]
        return cmd


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PIPECAT_ALLOWED_ORIGINS", None)
    return env
