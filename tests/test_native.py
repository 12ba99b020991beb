"""The media cores run as built: compiled by mypyc (setup.py), or pure Python when
``VOXGATE_PURE_PYTHON`` is set (``make test-pure`` sets it for its pure copy)."""

from __future__ import annotations

import os

from voxgate.supervisor import media_cores


def test_the_media_cores_are_the_ones_built() -> None:
    expected = "python" if os.environ.get("VOXGATE_PURE_PYTHON") else "native"
    assert media_cores() == expected
