"""Run SIPp (3.6, RTPSTREAM build) as the caller, in the foreground, bounded in time.

Scenarios live in ``scenarios/``; SIPp runs in a working directory holding
the µ-law clip under :data:`~tests.harness.audio.ULAW_CLIP_NAME` (the
scenarios' ``rtp_stream`` names it relatively), its screen output, its
statistics CSV (``-trace_stat``) and its error log (``-trace_err``).

SIPp's exit codes: 0 every call succeeded, 1 some call failed, 97 stopped
by an internal command, 99 no call processed, 255/254 fatal (bad option,
socket bind).
"""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.harness.audio import ULAW_CLIP_NAME, SpeechClip

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
_KILL_TIMEOUT_S = 10.0
_GRACE_S = 15.0  # beyond SIPp's own -timeout before the harness kills it
STAT_FILE = "sipp_stat.csv"
ERROR_FILE = "sipp_errors.log"


@dataclass(frozen=True, slots=True)
class SippResult:
    """How a SIPp run ended, from its exit code and its last statistics row."""

    returncode: int
    created_calls: int
    successful_calls: int
    failed_calls: int
    errors: str
    screen: str

    def describe(self) -> str:
        """A summary for assertion messages: counts, then the error log's start."""
        return (
            f"sipp exit={self.returncode} created={self.created_calls} "
            f"ok={self.successful_calls} failed={self.failed_calls}\n{self.errors[:4000]}"
        )


def scenario_path(name: str) -> Path:
    """``scenarios/NAME`` (``.xml`` added when missing)."""
    return SCENARIO_DIR / (name if name.endswith(".xml") else f"{name}.xml")


def offer_keys(payload_type: int, codec: str) -> list[str]:
    """``-key`` arguments for ``uac_488``'s one-codec plain RTP offer."""
    return ["-key", "offer_pt", str(payload_type), "-key", "offer_codec", codec]


def read_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's ``;``-separated statistics CSV as column → value."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


class Sipp:
    """One SIPp process calling ``target`` with a scenario from ``scenarios/``.

    ``duration_ms`` is ``-d`` (the length of the scenarios' ``<pause/>``);
    ``calls``/``limit``/``rate`` are ``-m``/``-l``/``-r``; ``media_port`` is
    ``-mp`` (the first ``rtp_stream`` port; each further call takes the next
    free even one); ``timeout_s`` is SIPp's ``-timeout`` (with
    ``-timeout_error``) and, plus a grace period, the harness's wait limit.
    """

    def __init__(
        self,
        scenario: str,
        target: tuple[str, int],
        *,
        workdir: Path,
        local_port: int,
        media_port: int,
        clip: SpeechClip | None = None,
        calls: int = 1,
        limit: int = 1,
        rate: float = 1.0,
        duration_ms: int = 1000,
        timeout_s: float = 60.0,
        cpu: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.timeout_s = timeout_s
        workdir.mkdir(parents=True, exist_ok=True)
        if clip is not None:
            link = workdir / ULAW_CLIP_NAME
            if not link.exists():
                link.symlink_to(clip.ulaw_wav)
        self.argv = [
            "sipp", "-sf", str(scenario_path(scenario)), f"{target[0]}:{target[1]}",
            "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(local_port),
            "-mp", str(media_port),
            "-m", str(calls), "-l", str(limit), "-r", f"{rate:g}", "-d", str(duration_ms),
            "-timeout", f"{timeout_s:g}s", "-timeout_error", "-nostdin",
            "-trace_stat", "-stf", str(workdir / STAT_FILE), "-fd", "1",
            "-trace_err", "-error_file", str(workdir / ERROR_FILE),
            *extra_args,
        ]
        if cpu is not None:
            self.argv = ["taskset", "-c", str(cpu), *self.argv]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start SIPp in the foreground (no ``-bg``), screen output to ``sipp_screen.log``."""
        with (self.workdir / "sipp_screen.log").open("wb") as screen:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=screen,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout_s: float | None = None) -> SippResult:
        """Wait for SIPp to finish (default: its ``-timeout`` plus a grace period).

        Raises:
            subprocess.TimeoutExpired: it did not finish in time (it is then killed).
        """
        proc = self._proc
        assert proc is not None, "start() first"
        limit = self.timeout_s + _GRACE_S if timeout_s is None else timeout_s
        try:
            returncode = proc.wait(timeout=limit)
        finally:
            self.stop()
        return self.result(returncode)

    def result(self, returncode: int) -> SippResult:
        """Read the statistics, error log and screen left in the working directory."""
        stats = read_stats(self.workdir / STAT_FILE)
        errors_path = self.workdir / ERROR_FILE
        screen_path = self.workdir / "sipp_screen.log"
        return SippResult(
            returncode=returncode,
            created_calls=int(stats.get("TotalCallCreated", 0) or 0),
            successful_calls=int(stats.get("SuccessfulCall(C)", 0) or 0),
            failed_calls=int(stats.get("FailedCall(C)", 0) or 0),
            errors=errors_path.read_text(errors="replace") if errors_path.exists() else "",
            screen=screen_path.read_text(errors="replace") if screen_path.exists() else "",
        )

    def stop(self) -> None:
        """End SIPp by PID if it still runs: SIGUSR1 (quit softly), then SIGKILL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 3.0
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=_KILL_TIMEOUT_S)

    def run(self) -> SippResult:
        """Start, wait for the end, always stop: one bounded run."""
        with self:
            return self.wait()

    def __enter__(self) -> Sipp:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
