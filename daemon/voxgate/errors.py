"""Error types shared across voxgate.

Protocol cores split errors the h11 way: :class:`RemoteProtocolError` is the
peer's fault (bad bytes from the network) and carries the SIP status a UAS
answers with; :class:`LocalProtocolError` is our own misuse of a core.
"""

from __future__ import annotations

import errno

EX_CONFIG = 78
"""sysexits.h EX_CONFIG: the exit code for a configuration error."""
EX_CANTCREAT = 73
"""sysexits.h EX_CANTCREAT: a listener (``[sip] listen``, ``[websocket] listen``,
``[metrics] listen``, ``[control] socket``) cannot be created in this environment
(address in use, permission denied, disk full …). Restarting does not fix that,
so the units list it in ``RestartPreventExitStatus=``."""

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""errno values meaning "out of descriptors or kernel buffers right now" (accept(2),
socket(2), sendto(2)): survived with a back-off, never fatal."""


def is_resource_shortage(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError whose errno is in :data:`RESOURCE_ERRNOS`."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


class VoxgateError(Exception):
    """Base class of every error voxgate raises on purpose."""


class ConfigError(VoxgateError):
    """A configuration file is unreadable or invalid.

    The message names the file and the offending key, e.g.
    ``/etc/voxgate/voxgate.toml: [rtp] port_min: must be an integer``.
    """


class RemoteProtocolError(VoxgateError):
    """The peer sent something that violates the protocol.

    ``status_hint`` is the SIP status code a UAS should answer with (400 by
    default); ``None`` means the input is to be dropped without an answer
    (e.g. a malformed response).
    """

    def __init__(self, reason: str, status_hint: int | None = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


class LocalProtocolError(VoxgateError):
    """voxgate itself misused a protocol core (a bug, never the peer's fault)."""


class BadPacket(RemoteProtocolError):
    """An RTP/RTCP datagram from the network could not be parsed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status_hint=None)
