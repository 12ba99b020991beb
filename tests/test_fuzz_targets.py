"""The fuzz targets on their checked-in seed corpus, and the fuzz runner's report."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz.run import summarize
from fuzz.targets import TARGETS, Target
from fuzz.targets.framing import (
    MAX_RECORDS,
    RECORD_SEPARATOR,
    DatagramRecord,
    join_datagrams,
    split_datagrams,
    split_records,
)
from fuzz.targets.sip import sip_uas


def seeds(target: Target) -> list[Path]:
    return sorted(path for path in target.corpus_dir.iterdir() if path.is_file())


@pytest.mark.parametrize("target", TARGETS.values(), ids=list(TARGETS))
def test_target_runs_its_seed_corpus(target: Target) -> None:
    paths = seeds(target)
    assert paths, f"no seeds in {target.corpus_dir}"
    for path in paths:
        data = path.read_bytes()
        assert len(data) <= target.max_len_bytes, path
        target.run(data)  # a crash raises here, naming the seed in the traceback


def test_truncated_seeds_do_not_crash() -> None:
    """Every prefix length class of every seed: what a cut datagram or read looks like."""
    for target in TARGETS.values():
        for path in seeds(target)[:8]:
            data = path.read_bytes()
            for end in {0, 1, 2, 13, len(data) // 2, len(data) - 1}:
                target.run(data[: max(end, 0)])


def test_a_crash_leaves_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the documented error type is caught: anything else reaches libFuzzer."""
    import voxgate.sip.uas as uas

    def broken(self: uas.UasCore, data: bytes, source: tuple[str, int], now: float) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(uas.UasCore, "receive_datagram", broken)
    with pytest.raises(KeyError):
        sip_uas(b"OPTIONS sip:x SIP/2.0\r\n\r\n")


def test_split_records_is_bounded() -> None:
    assert split_records(b"a" + RECORD_SEPARATOR + b"b") == [b"a", b"b"]
    assert len(split_records(RECORD_SEPARATOR * (MAX_RECORDS * 2))) == MAX_RECORDS


def test_datagram_framing_round_trip() -> None:
    records = [DatagramRecord(0, 0, b""), DatagramRecord(7, 3, bytes(255)),
               DatagramRecord(2, 1, b"\x80\x00")]
    assert list(split_datagrams(join_datagrams(records))) == records
    # A length past the end is cut to what is left; a lone header byte ends the input.
    assert list(split_datagrams(b"\x05\x09ab")) == [DatagramRecord(1, 1, b"ab")]
    assert list(split_datagrams(b"\x05\x02ab\x01")) == [DatagramRecord(1, 1, b"ab")]
    with pytest.raises(ValueError):
        join_datagrams([DatagramRecord(8, 0, b"")])


CLEAN_LOG = """INFO: Seed: 1
#2\tINITED cov: 20 ft: 20 corp: 9/138b exec/s: 0 rss: 40Mb
#8192\tpulse  cov: 20 ft: 20 corp: 9/138b exec/s: 4096 rss: 40Mb
Done 41234 runs in 15 second(s)
stat::number_of_executed_units: 41234
stat::average_exec_per_sec:     2748
stat::new_units_added:          26
"""

CRASH_LOG = """#12463\tREDUCE cov: 20 ft: 20 corp: 9/117b lim: 104 exec/s: 0 rss: 40Mb

 === Uncaught Python exception: ===
UnicodeEncodeError: 'ascii' codec can't encode character
Traceback (most recent call last):
  File "fuzz/targets/sip.py", line 120, in sdp
UnicodeEncodeError: 'ascii' codec can't encode character

==27914== ERROR: libFuzzer: fuzz target exited
artifact_prefix='/x/'; Test unit written to /x/sdp-crash-53fad6d0
stat::number_of_executed_units: 25245
stat::new_units_added:          3
"""


def test_summarize_clean_run() -> None:
    result = summarize("sdp", CLEAN_LOG, 0, 17.5)
    assert (result.executions, result.seconds, result.new_units) == (41234, 15.0, 26)
    assert result.failure is None and result.crash_file is None
    assert round(result.executions_per_s) == 2749


def test_summarize_crash() -> None:
    result = summarize("sdp", CRASH_LOG, 1, 4.0)
    assert result.failure == "crash"
    assert result.crash_file == Path("/x/sdp-crash-53fad6d0")
    assert result.traceback.startswith("UnicodeEncodeError")
    assert "==27914==" not in result.traceback
    assert (result.executions, result.seconds) == (25245, 4.0)


def test_summarize_killed_or_failed_worker() -> None:
    assert summarize("sdp", "#100\tpulse\n", None, 80.0).failure == "killed: ran past its time"
    failed = summarize("sdp", "Traceback ...\nImportError: atheris\n", 1, 0.5)
    assert failed.failure == "worker exited with 1"
    assert failed.executions == 0
