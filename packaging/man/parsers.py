"""The command lines that packaging/build-deb.sh renders as manual pages.

argparse-manpage calls one of these functions (``--pyfile parsers.py
--function voxgated``) in the staged virtualenv. The DESCRIPTION section comes
from ``PROGRAM.8.inc`` next to this file; the parsers' one-line descriptions
are left out of it (the NAME line says the same).
"""

from __future__ import annotations

import argparse

from voxgate import supervisor
from voxgate.control import cli


def _without_description(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = None
    return parser


def voxgated() -> argparse.ArgumentParser:
    """voxgated(8)."""
    return _without_description(supervisor._build_parser())


def voxgatectl() -> argparse.ArgumentParser:
    """voxgatectl(8)."""
    return _without_description(cli._build_parser())
