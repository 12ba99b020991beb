"""The system test's pure helpers: package names, the host's mirror, the cache key.

These run in ``make test`` (no root, no container).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.container import (
    BASE_PACKAGES,
    DEFAULT_MIRROR,
    cache_key,
    dependency_names,
    host_mirror,
)


def test_dependency_names_take_the_first_alternative_without_versions() -> None:
    field = "python3 (>= 3.11), python3 (<< 3.12), libc6 (>= 2.34), systemd | adduser, " \
            "libfoo:any, bar [amd64]"
    assert dependency_names(field) == ["python3", "python3", "libc6", "systemd", "libfoo",
                                       "bar"]
    assert dependency_names("") == []


def test_host_mirror_reads_deb822_and_one_line_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VOXGATE_SYSTEM_MIRROR", raising=False)
    listed = tmp_path / "sources.list.d"
    listed.mkdir()
    (listed / "a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "# a comment\nTypes: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert host_mirror([listed]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [signed-by=/k.gpg] http://other.example/debian bookworm main\n")
    assert host_mirror([one_line]) == "http://other.example/debian"
    assert host_mirror([tmp_path / "missing"]) == DEFAULT_MIRROR
    monkeypatch.setenv("VOXGATE_SYSTEM_MIRROR", "http://chosen.example/debian")
    assert host_mirror([one_line]) == "http://chosen.example/debian"


def test_cache_key_follows_the_package_set_only() -> None:
    key = cache_key(["python3", "espeak-ng", *BASE_PACKAGES])
    assert key == cache_key([*BASE_PACKAGES, "espeak-ng", "python3", "python3"])
    assert key != cache_key([*BASE_PACKAGES, "espeak-ng", "python3", "procps"])
    assert key.startswith("bookworm-")
