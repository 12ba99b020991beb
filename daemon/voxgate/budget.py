"""The memory budget: per-session buffer caps and process RSS watermarks; sans-IO.

Two layers keep voxgate's memory hard-bounded (ARCHITECTURE.md, "budget"),
with systemd's ``MemoryHigh=``/``MemoryMax=`` standing behind both:

* :class:`SessionBudget` does the real accounting of one call's audio
  buffers. Callers report bytes as frames enter (:meth:`SessionBudget.add`)
  and leave (:meth:`SessionBudget.release`); a buffer over its own cap is told
  how many bytes to drop from its oldest end, and the drop is counted
  (``voxgate_budget_drops_total{buffer}``). A session whose total stays above
  ``session_bytes`` for the grace period is ended with reason ``budget``.
  :class:`BoundedAudioQueue` is a deque of frames wired to one budget buffer.
* :class:`RssGate` turns the process's resident set size, sampled once a
  second by the driver (:func:`parse_statm_rss_bytes` reads
  ``/proc/self/statm``), into admission and shedding decisions: above the soft
  mark admission's memory gate closes (reason ``memory``); above the hard mark
  the newest session is ended (reason ``memory-shed``, victims picked by
  :func:`choose_shed_victims`) once per sample until RSS is back under soft.

Nothing here reads a clock: ``now`` is monotonic seconds passed in.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from voxgate.end_reasons import EndReason
from voxgate.errors import LocalProtocolError

MIB: Final = 1 << 20
"""One mebibyte, the rounding unit of the derived RSS watermarks."""

BYTES_PER_MS: Mapping[str, int] = MappingProxyType({
    "jitter": 8,  # encoded G.711: 8000 samples/s x 1 byte
    "playout": 16,  # PCM16 mono 8 kHz: 8000 samples/s x 2 bytes
    "utterance": 16,
    "recording": 16,
    "agent_in": 16,
    "agent_out": 16,
})
"""Bytes one millisecond of audio takes in each session buffer, by buffer name."""

BUDGET_REASON: Final = "budget"
"""What :meth:`SessionBudget.check` returns: the session's end reason."""

RSS_HYSTERESIS_FRACTION: Final = 0.05
"""Admission reopens only once RSS is this fraction of the soft mark below it."""


@dataclass(frozen=True, slots=True)
class BufferCaps:
    """The byte caps of one session's buffers (config ``[budget]``).

    Attributes:
        caps_bytes: buffer name (a key of :data:`BYTES_PER_MS`) → most bytes
            it may hold; only the buffers named here can be used.
        session_bytes: most bytes all buffers together may hold beyond the
            grace period.
        grace_s: how long (seconds) the session total may stay above
            ``session_bytes`` before the session is ended.

    Raises:
        LocalProtocolError: an unknown buffer name, a cap or ``session_bytes``
            of 0 or less, or a negative grace.
    """

    caps_bytes: Mapping[str, int]
    session_bytes: int
    grace_s: float

    def __post_init__(self) -> None:
        for name, cap in self.caps_bytes.items():
            if name not in BYTES_PER_MS:
                raise LocalProtocolError(f"unknown budget buffer {name!r}")
            if cap <= 0:
                raise LocalProtocolError(f"budget cap of {name!r} must be > 0, got {cap}")
        if self.session_bytes <= 0:
            raise LocalProtocolError(f"session_bytes must be > 0, got {self.session_bytes}")
        if self.grace_s < 0:
            raise LocalProtocolError(f"grace_s must be >= 0, got {self.grace_s}")

    @classmethod
    def from_ms(
        cls, caps_ms: Mapping[str, int], session_bytes: int, grace_ms: int
    ) -> BufferCaps:
        """Caps from config: ``caps_ms`` is buffer name → cap in ms of audio.

        Each cap becomes ``ms x BYTES_PER_MS[name]`` bytes; ``grace_ms`` becomes
        seconds. Raises :class:`LocalProtocolError` as the constructor does.
        """
        unknown = sorted(set(caps_ms) - set(BYTES_PER_MS))
        if unknown:
            raise LocalProtocolError(f"unknown budget buffer(s): {', '.join(unknown)}")
        caps_bytes = {name: ms * BYTES_PER_MS[name] for name, ms in caps_ms.items()}
        return cls(MappingProxyType(caps_bytes), session_bytes, grace_ms / 1000)


class SessionBudget:
    """Byte accounting of one session's buffers; cheap enough for the 20 ms path.

    Callers report every byte a buffer takes (:meth:`add`) and gives back
    (:meth:`release`, or :meth:`dropped` for bytes thrown away over the cap).
    Counters are plain ints; ``add``/``release`` allocate no containers.

    Attributes:
        total_bytes: bytes held by all buffers now.
        peak_bytes: the highest ``total_bytes`` seen.
        over_limit: ``total_bytes`` went above ``session_bytes`` since :meth:`check`
            last saw it within: the per-tick driver calls :meth:`check` only then.
    """

    __slots__ = (
        "_caps",
        "_drops_bytes",
        "_drops_frames",
        "_grace_s",
        "_held",
        "_over_since",
        "_session_bytes",
        "over_limit",
        "peak_bytes",
        "total_bytes",
    )

    def __init__(self, caps: BufferCaps) -> None:
        self._caps = dict(caps.caps_bytes)
        self._session_bytes = caps.session_bytes
        self._grace_s = caps.grace_s
        self._held = dict.fromkeys(self._caps, 0)
        self._drops_bytes = dict.fromkeys(self._caps, 0)
        self._drops_frames = dict.fromkeys(self._caps, 0)
        self._over_since: float | None = None
        self.total_bytes = 0
        self.peak_bytes = 0
        self.over_limit = False

    @property
    def held_bytes(self) -> Mapping[str, int]:
        """Buffer name → bytes it holds now (a live read-only view)."""
        return self._held

    @property
    def drops_bytes(self) -> Mapping[str, int]:
        """Buffer name → bytes dropped over its cap since the session began."""
        return self._drops_bytes

    @property
    def drops_frames(self) -> Mapping[str, int]:
        """Buffer name → frames dropped over its cap since the session began."""
        return self._drops_frames

    def add(self, buffer: str, nbytes: int) -> int:
        """Account ``nbytes`` (>= 0) newly held by ``buffer``.

        Returns how many bytes the caller must drop from the OLDEST end of that
        buffer to be back within its cap (0 when within). The caller drops at
        least that many (whole frames) and reports them with :meth:`dropped`.

        Raises:
            LocalProtocolError: ``buffer`` has no cap, or ``nbytes`` < 0.
        """
        held = self._held
        try:
            buffer_bytes = held[buffer] + nbytes
        except KeyError:
            raise LocalProtocolError(f"no budget for buffer {buffer!r}") from None
        if nbytes < 0:
            raise LocalProtocolError(f"add() of {nbytes} bytes to {buffer!r}")
        held[buffer] = buffer_bytes
        total = self.total_bytes + nbytes
        self.total_bytes = total
        if total > self.peak_bytes:
            self.peak_bytes = total
        if total > self._session_bytes:
            self.over_limit = True
        excess = buffer_bytes - self._caps[buffer]
        return excess if excess > 0 else 0

    def release(self, buffer: str, nbytes: int) -> None:
        """Account ``nbytes`` (>= 0) that ``buffer`` no longer holds (played, consumed).

        Raises:
            LocalProtocolError: ``buffer`` has no cap, ``nbytes`` < 0, or the
                buffer would hold fewer than 0 bytes (an accounting bug).
        """
        held = self._held
        try:
            buffer_bytes = held[buffer] - nbytes
        except KeyError:
            raise LocalProtocolError(f"no budget for buffer {buffer!r}") from None
        if buffer_bytes < 0 or nbytes < 0:
            raise LocalProtocolError(
                f"release() of {nbytes} bytes from {buffer!r} holding {held[buffer]}"
            )
        held[buffer] = buffer_bytes
        self.total_bytes -= nbytes

    def dropped(self, buffer: str, nbytes: int, frames: int) -> None:
        """Release ``nbytes`` the caller dropped over the cap, and count the drop.

        ``frames`` is how many frames those bytes were (>= 0). Raises
        :class:`LocalProtocolError` as :meth:`release` does.
        """
        self.release(buffer, nbytes)
        self._drops_bytes[buffer] += nbytes
        self._drops_frames[buffer] += frames

    def check(self, now: float) -> EndReason | None:
        """``"budget"`` once the session total has stayed above ``session_bytes``
        for the grace period, else None.

        The first check that sees the total over the limit starts the grace
        period at ``now``; a check that sees it back within resets it.
        """
        if self.total_bytes <= self._session_bytes:
            self._over_since = None
            self.over_limit = False
            return None
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self._grace_s:
            return BUDGET_REASON
        return None

    def next_deadline(self) -> float | None:
        """When :meth:`check` will return ``"budget"`` if the total stays over, or None."""
        if self._over_since is None:
            return None
        return self._over_since + self._grace_s

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per buffer: ``held_bytes``, ``cap_bytes``, ``drops_bytes``, ``drops_frames``.

        A fresh plain dict, JSON-ready (``voxgatectl show ID``).
        """
        return {
            name: {
                "held_bytes": self._held[name],
                "cap_bytes": cap,
                "drops_bytes": self._drops_bytes[name],
                "drops_frames": self._drops_frames[name],
            }
            for name, cap in self._caps.items()
        }


class BoundedAudioQueue:
    """A FIFO of audio frames (bytes) held against one :class:`SessionBudget` buffer.

    Pushing past the buffer's cap drops the oldest frames (possibly the one just
    pushed, if a single frame exceeds the cap) and reports them with
    :meth:`SessionBudget.dropped`. :meth:`clear` (barge-in) releases without
    counting a drop.

    Attributes:
        held_bytes: bytes of the frames queued now.
    """

    __slots__ = ("_budget", "_buffer", "_frames", "held_bytes")

    def __init__(self, budget: SessionBudget, buffer: str) -> None:
        if buffer not in budget.held_bytes:
            raise LocalProtocolError(f"no budget for buffer {buffer!r}")
        self._budget = budget
        self._buffer = buffer
        self._frames: deque[bytes] = deque()
        self.held_bytes = 0

    def push(self, frame: bytes) -> int:
        """Queue ``frame``; returns how many frames were dropped (oldest first)."""
        frames = self._frames
        frames.append(frame)
        self.held_bytes += len(frame)
        excess = self._budget.add(self._buffer, len(frame))
        if not excess:
            return 0
        dropped_bytes = 0
        dropped_frames = 0
        while dropped_bytes < excess:
            dropped_bytes += len(frames.popleft())
            dropped_frames += 1
        self.held_bytes -= dropped_bytes
        self._budget.dropped(self._buffer, dropped_bytes, dropped_frames)
        return dropped_frames

    def pop(self) -> bytes | None:
        """The oldest frame, or None when the queue is empty."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self.held_bytes -= len(frame)
        self._budget.release(self._buffer, len(frame))
        return frame

    def snapshot(self) -> bytes:
        """A copy of the queued frames, oldest first, joined (the queue is unchanged)."""
        return b"".join(self._frames)

    def clear(self) -> int:
        """Discard every frame (barge-in, not a drop); returns how many went."""
        count = len(self._frames)
        self._frames.clear()
        self._budget.release(self._buffer, self.held_bytes)
        self.held_bytes = 0
        return count

    def __len__(self) -> int:
        return len(self._frames)


RssState = Literal["ok", "soft", "hard"]
"""``ok``: admitting; ``soft``: admission closed; ``hard``: shedding sessions."""


@dataclass(frozen=True, slots=True)
class RssLimits:
    """Process RSS watermarks in bytes (config ``[budget]``).

    Raises:
        LocalProtocolError: unless ``0 < soft_bytes < hard_bytes``.
    """

    soft_bytes: int
    hard_bytes: int

    def __post_init__(self) -> None:
        if self.soft_bytes <= 0 or self.hard_bytes <= 0:
            raise LocalProtocolError(
                f"RSS watermarks must be > 0, got soft {self.soft_bytes} hard {self.hard_bytes}"
            )
        if self.soft_bytes >= self.hard_bytes:
            raise LocalProtocolError(
                f"RSS soft mark {self.soft_bytes} must be below hard mark {self.hard_bytes}"
            )


def default_rss_limits(
    max_sessions: int, *, base_bytes: int = 64 << 20, per_session_bytes: int = 512 << 10
) -> RssLimits:
    """The RSS watermarks used when config sets none.

    ``soft = base_bytes + max_sessions x per_session_bytes`` and
    ``hard = soft x 1.25``, rounded up to a whole MiB. With the defaults
    (64 MiB for the interpreter and daemon, 512 KiB per call) 300 sessions
    give soft 214 MiB and hard 268 MiB. Keep both below systemd's
    ``MemoryHigh=``.

    Raises:
        LocalProtocolError: ``max_sessions`` or ``per_session_bytes`` < 0, or
            ``base_bytes`` <= 0.
    """
    if max_sessions < 0 or per_session_bytes < 0 or base_bytes <= 0:
        raise LocalProtocolError(
            f"bad RSS derivation: max_sessions {max_sessions}, base_bytes {base_bytes}, "
            f"per_session_bytes {per_session_bytes}"
        )
    soft = base_bytes + max_sessions * per_session_bytes
    hard = -(-soft * 5 // (4 * MIB)) * MIB  # integer ceil of soft x 1.25 in MiB
    return RssLimits(soft, hard)


@dataclass(frozen=True, slots=True)
class RssVerdict:
    """What one RSS sample means.

    Attributes:
        admit: whether admission's memory gate is open.
        shed: how many sessions (newest first) to end now, reason ``memory-shed``.
        state: ``ok``, ``soft`` (not admitting) or ``hard`` (shedding).
        detail: a human-readable line for logs and ``voxgatectl status``.
    """

    admit: bool
    shed: int
    state: RssState
    detail: str


class RssGate:
    """Process RSS watermarks → admission and shedding decisions; sans-IO.

    States (one transition per :meth:`sample`)::

        ok   --(rss > soft)--> soft       admit closes
        any  --(rss > hard)--> hard       shed 1 session per sample
        hard --(rss <= soft)--> soft      shedding stops (or ok, if also below resume)
        soft --(rss < resume)--> ok       resume = soft - 5 % of soft

    Attributes:
        shed_total: sessions this gate has asked to shed, for metrics.
    """

    __slots__ = ("_limits", "_resume_bytes", "_since", "_state", "shed_total")

    def __init__(self, limits: RssLimits) -> None:
        self._state: RssState = "ok"
        self._since: float | None = None
        self.shed_total = 0
        self.update(limits)

    @property
    def state(self) -> RssState:
        """The state after the last sample (``ok`` before the first)."""
        return self._state

    @property
    def limits(self) -> RssLimits:
        """The watermarks in force."""
        return self._limits

    def update(self, limits: RssLimits) -> None:
        """Use new watermarks (SIGHUP reload); the next :meth:`sample` applies them."""
        self._limits = limits
        self._resume_bytes = limits.soft_bytes - int(limits.soft_bytes * RSS_HYSTERESIS_FRACTION)

    def sample(self, rss_bytes: int, now: float) -> RssVerdict:
        """Judge one RSS sample (bytes) taken at ``now`` (monotonic seconds).

        The driver samples once a second; every sample above the hard mark, and
        every later one while RSS stays above the soft mark, sheds 1 session.
        """
        limits = self._limits
        if rss_bytes > limits.hard_bytes or (
            self._state == "hard" and rss_bytes > limits.soft_bytes
        ):
            state: RssState = "hard"
        elif rss_bytes > limits.soft_bytes or (
            self._state != "ok" and rss_bytes >= self._resume_bytes
        ):
            state = "soft"
        else:
            state = "ok"
        if state != self._state or self._since is None:
            self._state = state
            self._since = now
        shed = 1 if state == "hard" else 0
        self.shed_total += shed
        detail = (
            f"{state} for {now - self._since:.0f}s: rss {rss_bytes / MIB:.1f} MiB "
            f"(soft {limits.soft_bytes / MIB:.1f} MiB, hard {limits.hard_bytes / MIB:.1f} MiB, "
            f"resume below {self._resume_bytes / MIB:.1f} MiB)"
        )
        return RssVerdict(admit=state == "ok", shed=shed, state=state, detail=detail)


def parse_statm_rss_bytes(text: str, page_size: int) -> int:
    """Resident set size in bytes from ``/proc/self/statm`` (proc(5)).

    ``text`` is the file's content: seven page counts separated by spaces; the
    second is the resident set. ``page_size`` is ``os.sysconf("SC_PAGE_SIZE")``.

    Raises:
        ValueError: fewer than two fields, a field that is not a decimal
            integer, or ``page_size`` <= 0.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    fields = text.split()
    if len(fields) < 2:
        raise ValueError(f"statm: expected at least 2 fields, got {text!r:.80}")
    resident = fields[1]
    if not (resident.isascii() and resident.isdigit()):
        raise ValueError(f"statm: resident field is not a page count: {resident!r:.40}")
    return int(resident) * page_size


def choose_shed_victims(sessions: Sequence[tuple[str, float]], count: int) -> list[str]:
    """The ids of the ``count`` newest sessions, newest first.

    ``sessions`` holds ``(session_id, started_at)`` with ``started_at`` in
    monotonic seconds; on equal start times the earlier entry goes first.
    Fewer ids come back when there are fewer sessions.

    Raises:
        LocalProtocolError: ``count`` < 0.
    """
    if count < 0:
        raise LocalProtocolError(f"shed count must be >= 0, got {count}")
    newest = heapq.nlargest(count, sessions, key=lambda session: session[1])
    return [session_id for session_id, _ in newest]
