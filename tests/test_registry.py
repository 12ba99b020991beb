"""Tests for voxgate.registry: the counters summed over ended and live sessions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import cast

import trio

from voxgate.registry import COUNTERS_CHUNK_SESSIONS, Entry, Registry
from voxgate.session import Session

SESSIONS = 3 * COUNTERS_CHUNK_SESSIONS + 7


class _Session:
    """What the registry reads of a session."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def counters(self) -> dict[str, int]:
        return {"speech_turns": 1}


def _entry(session_id: str, counters: Callable[[], dict[str, int]]) -> Entry:
    return Entry(session=cast(Session, _Session(session_id)), tenant="default",
                 remote=lambda: None, counters=counters)


async def test_the_sum_in_pieces_lets_other_tasks_run_and_matches_the_whole() -> None:
    registry = Registry()
    for i in range(SESSIONS):
        registry.add(_entry(f"s{i}", lambda: {"packets_in": 2}))
    registry.remove("s0")  # an ended session counts too (from ended_counters)
    turns: list[int] = []

    async def other_task() -> None:
        while True:
            turns.append(len(turns))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        before = len(turns)
        total = await registry.summed_counters()
        ran = len(turns) - before
        nursery.cancel_scope.cancel()
    assert ran >= 3  # one turn per piece of COUNTERS_CHUNK_SESSIONS
    assert total == Counter(packets_in=2 * SESSIONS, speech_turns=SESSIONS)


async def test_a_session_that_ends_during_the_sum_is_counted_once() -> None:
    registry = Registry()
    last = f"s{SESSIONS - 1}"

    def ends_two() -> dict[str, int]:  # read in the second piece
        registry.remove("s0")  # summed already, in the first piece
        registry.remove(last)  # not summed yet
        return {"packets_in": 2}

    for i in range(SESSIONS):
        if i == COUNTERS_CHUNK_SESSIONS + 1:
            registry.add(_entry("s-middle", ends_two))
        registry.add(_entry(f"s{i}", lambda: {"packets_in": 2}))
    total = await registry.summed_counters()
    assert total["packets_in"] == 2 * (SESSIONS + 1)
    assert (await registry.summed_counters())["packets_in"] == 2 * (SESSIONS + 1)


async def test_a_total_never_falls_below_the_sum_before_it() -> None:
    """Overlapping sums can read a session before and after it ended: whatever
    the order they finish in, no total goes back (here a session's counter
    reads lower the second time, the effect of such an overlap)."""
    registry = Registry()
    readings = iter([5, 2])
    registry.add(_entry("s0", lambda: {"packets_in": next(readings)}))
    assert (await registry.summed_counters())["packets_in"] == 5
    assert (await registry.summed_counters())["packets_in"] == 5
