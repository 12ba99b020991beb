"""Run the misbehaving bot (``tests/bots/hostile_bot.py``) for a bad-bot test.

Process handling (``.venv-bot``'s interpreter, the ``ready port=N`` line, events, stop by
PID) is :class:`tests.harness.bot.BotProcess`'s::

    with HostileBot(mode="echo", workdir=tmp_path) as bot:
        ...  # point voxgate's stream agent at bot.url; call sip:flood@… to flood
        bot.wait_event(lambda e: e["event"] == "burst_done" and e["mode"] == "flood")

A call picks the bot's mode with its Request-URI user (``customParameters.to``); see the
bot's docstring for the modes and events.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from tests.harness.bot import READY_TIMEOUT_S, REPO_ROOT, BotProcess, bot_venv_python

HOSTILE_SCRIPT: Final = REPO_ROOT / "tests" / "bots" / "hostile_bot.py"
Mode = Literal["malformed", "unknown", "badmedia", "oversize", "flood", "endless", "echo"]


class HostileBot(BotProcess):
    """The hostile bot as a subprocess.

    ``mode`` is used when a call's user names none, ``resumed_mode`` on resumed
    connections; ``count`` is the messages per burst (``flood_count`` for the flood),
    ``max_message_bytes`` voxgate's
    bound (the ``oversize`` message exceeds it by 1 KiB); ``chunk_s``/``every_s`` shape the
    ``endless`` audio (seconds of audio per message, seconds between messages).
    """

    def __init__(
        self,
        mode: Mode = "echo",
        *,
        resumed_mode: Mode = "echo",
        count: int = 20,
        flood_count: int = 1000,
        max_message_bytes: int = 65_536,
        chunk_s: float = 1.0,
        every_s: float = 0.1,
        port: int = 0,
        workdir: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        super().__init__(port=port, workdir=workdir, ready_timeout_s=ready_timeout_s)
        self.mode: Mode = mode
        self.resumed_mode: Mode = resumed_mode
        self.count = count
        self.flood_count = flood_count
        self.max_message_bytes = max_message_bytes
        self.chunk_s = chunk_s
        self.every_s = every_s

    def command(self) -> list[str]:
        """The bot's command line."""
        return [
            str(bot_venv_python()), str(HOSTILE_SCRIPT), *self.listen_args(),
            "--mode", self.mode, "--resumed-mode", self.resumed_mode,
            "--count", str(self.count), "--flood-count", str(self.flood_count),
            "--max-message-bytes", str(self.max_message_bytes),
            "--chunk-s", str(self.chunk_s), "--every-s", str(self.every_s),
        ]
