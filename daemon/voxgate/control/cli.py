"""``voxgatectl``: talk to a running voxgated over its control socket.

Usage: ``voxgatectl [OPTIONS] COMMAND [ARGS] [OPTIONS]``: the common options
(``--json``, ``--socket PATH``, ``-i/--instance N``, ``--timeout S``) go
before or after the command. The socket is ``/run/voxgate/control.sock``
unless ``VOXGATE_CONTROL_SOCKET``, ``--socket`` or ``--instance N``
(``voxgate@N``'s ``/run/voxgate/N/control.sock``) says otherwise. Results
print as human tables, or as the raw JSON result with ``--json``.

``--timeout S`` bounds each wait for the daemon: every reply (default
:data:`DEFAULT_TIMEOUT_S`) and, with ``drain --wait``, the whole drain (default
no limit).

Exit codes: 0 ok, 1 the daemon said no (an error reply), 2 usage error, 3
``health`` found a component unhealthy, 69
(EX_UNAVAILABLE) the daemon cannot be reached, did not answer in time or broke
the protocol, 75 (EX_TEMPFAIL) ``drain --wait --timeout`` ran out with
sessions left; output cut by a closed pipe (``| head``) ends quietly with 141
as a shell pipeline would (Python's "Note on SIGPIPE").

The client is plain blocking :mod:`socket`: one connection, one request at a
time, replies bounded by :data:`MAX_REPLY_BYTES`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import select
import shutil
import socket
import sys
import termios
import textwrap
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

from voxgate import __version__
from voxgate.control.protocol import (
    MAX_REPLY_BYTES,
    ControlProtocolError,
    decode_reply,
    encode_request,
    plural,
)

DEFAULT_SOCKET = "/run/voxgate/control.sock"
INSTANCE_SOCKET = "/run/voxgate/{instance}/control.sock"
"""The control socket of ``voxgate@N.service`` (RuntimeDirectory=voxgate/%i)."""
SOCKET_ENV = "VOXGATE_CONTROL_SOCKET"
DEFAULT_TIMEOUT_S = 10.0
RECEIVE_CHUNK_BYTES = 65_536
TOP_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.5
PROGRESS_BAR_WIDTH = 20
CLEAR_SCREEN = "\x1b[H\x1b[2J"
QUIT_KEYS = frozenset("qQ")
STATUS_WIDTH = 80
"""``status`` wraps its ``limits:`` line to this many columns."""

EX_OK = 0
EX_REFUSED = 1
"""The daemon answered with an error reply."""
EX_UNHEALTHY = 3
"""``health``: the daemon answered that a component is unhealthy (for probes and scripts)."""
EX_UNAVAILABLE = 69
"""sysexits.h: the daemon is not reachable (or answered garbage)."""
EX_TEMPFAIL = 75
"""sysexits.h: ``drain --wait --timeout`` ran out before the last session ended."""
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a reader that went away."""


class DaemonUnavailable(Exception):
    """The daemon cannot be reached, closed the connection, or broke the protocol."""


class DaemonTimeout(DaemonUnavailable):
    """The daemon did not answer in time (it may still be there)."""


class CommandFailed(Exception):
    """The daemon answered with ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class ControlClient:
    """A blocking connection to the control socket at ``path``.

    Raises:
        DaemonUnavailable: connecting failed (the message names the path).
    """

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise DaemonUnavailable(
                f"cannot connect to {path}: {_reason(e)} (is voxgated running?)") from None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sock.close()

    def call(self, cmd: str, args: Mapping[str, Any] | None = None, *,
             timeout_s: float | None = None) -> Any:
        """Send one request and return its result, waiting at most ``timeout_s`` for
        each step (default: the client's timeout).

        Raises:
            CommandFailed: the daemon answered ``ok: false``.
            DaemonTimeout: no reply in time.
            DaemonUnavailable: the connection broke, or the reply was not a valid
                reply to this request.
        """
        request_id = next(self._ids)
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        self._sock.settimeout(timeout_s)
        try:
            # Refused (busy, forbidden) before it read the request: the reply is buffered.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(encode_request(request_id, cmd, args or {}))
            reply = decode_reply(self._read_line())
        except TimeoutError:
            raise DaemonTimeout(f"{self._path}: no reply to {cmd} within {timeout_s:g} s "
                                "(is voxgated stuck?)") from None
        except OSError as e:
            raise DaemonUnavailable(f"{self._path}: {_reason(e)}") from None
        except ControlProtocolError as e:
            raise DaemonUnavailable(f"{self._path}: bad reply: {e.reason}") from None
        if not reply.ok:
            raise CommandFailed(reply.code, reply.message)
        if reply.id != request_id:
            raise DaemonUnavailable(f"{self._path}: reply to request {reply.id!r}, "
                                    f"expected {request_id}")
        return reply.result

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise DaemonUnavailable(f"{self._path}: reply longer than {MAX_REPLY_BYTES} bytes")
            data = self._sock.recv(RECEIVE_CHUNK_BYTES)
            if not data:
                raise DaemonUnavailable(f"{self._path}: connection closed by voxgated")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


# --- rendering: results as human text ---------------------------------------------------

def _as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _format_age(seconds: Any) -> str:
    """``12.3s``, ``4m05s``, ``1h02m``."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, headers on top."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _render_components(components: Any) -> str:
    rows = [(name, _as_dict(c).get("healthy"), _as_dict(c).get("detail"))
            for name, c in _as_dict(components).items()]
    return table(("COMPONENT", "HEALTHY", "DETAIL"), rows)


def render_health(result: Any) -> str:
    """``health``: the verdict, then one row per component."""
    health = _as_dict(result)
    verdict = "healthy" if health.get("healthy") else "UNHEALTHY"
    if not _as_dict(health.get("components")):
        return verdict
    return f"{verdict}\n\n{_render_components(health['components'])}"


def render_status(result: Any) -> str:
    """``status``: state, session counts, limits (wrapped to :data:`STATUS_WIDTH`),
    health, tenants, admission counters."""
    status = _as_dict(result)
    sessions = _as_dict(status.get("sessions"))
    limits = " ".join(f"{k}={_cell(v)}" for k, v in _as_dict(status.get("limits")).items())
    health = _as_dict(status.get("health"))
    label = " " * len("limits:    ")
    lines = [
        f"state:     {_cell(status.get('state'))}",
        f"sessions:  {_cell(sessions.get('active'))} active, "
        f"{_cell(sessions.get('queued'))} queued",
        textwrap.fill(limits or "-", STATUS_WIDTH, initial_indent="limits:    ",
                      subsequent_indent=label, break_long_words=False,
                      break_on_hyphens=False),
        f"health:    {render_health(health) if health else '-'}",
    ]
    tenants = _as_dict(sessions.get("by_tenant"))
    if tenants:
        rows = [(name, _as_dict(t).get("active"), _as_dict(t).get("queued"),
                 _as_dict(t).get("max_sessions")) for name, t in tenants.items()]
        lines += ["", table(("TENANT", "ACTIVE", "QUEUED", "MAX"), rows)]
    counters = _as_list(_as_dict(status.get("admission")).get("counters"))
    if counters:
        keys = ("result", "reason", "tenant", "count")
        counter_rows = [[_as_dict(c).get(k) for k in keys] for c in counters]
        lines += ["", "admission:", table([k.upper() for k in keys], counter_rows)]
    return "\n".join(lines)


def render_sessions(result: Any) -> str:
    """``sessions``: one row per session, or ``no sessions``."""
    sessions = [_as_dict(s) for s in _as_list(result)]
    if not sessions:
        return "no sessions"
    keys = ("id", "call_id", "tenant", "transport", "state", "codec")
    rows = [(*(s.get(k) for k in keys), _format_age(s.get("age_s")), s.get("remote"))
            for s in sessions]
    return table(("ID", "CALL-ID", "TENANT", "TRANSPORT", "STATE", "CODEC", "AGE", "REMOTE"),
                 rows)


def render_top_sessions(result: Any) -> str:
    """``top``'s session rows: the narrow columns first, the Call-ID (which may be
    cut at the screen's edge) last; no remote address."""
    sessions = [_as_dict(s) for s in _as_list(result)]
    if not sessions:
        return "no sessions"
    keys = ("id", "tenant", "transport", "state", "codec")
    rows = [(*(s.get(k) for k in keys), _format_age(s.get("age_s")), s.get("call_id"))
            for s in sessions]
    return table(("ID", "TENANT", "TRANSPORT", "STATE", "CODEC", "AGE", "CALL-ID"), rows)


def fit(text: str, columns: int, lines: int | None = None) -> str:
    """``text`` cut to ``columns`` per line and, unless None, its first ``lines`` lines."""
    kept = text.splitlines()[:lines]
    return "\n".join(line[:columns] for line in kept)


def render_calls(result: Any) -> str:
    """``calls``: one row per call record, newest first, or ``no calls``."""
    calls = [_as_dict(c) for c in _as_list(result)]
    if not calls:
        return "no calls"
    rows = [(c.get("started_at"), c.get("session_id"), c.get("call_id"), c.get("transport"),
             c.get("tenant"), c.get("state"), c.get("reason"), c.get("duration_s"))
            for c in calls]
    return table(("STARTED", "SESSION", "CALL-ID", "TRANSPORT", "TENANT", "STATE", "REASON",
                  "DURATION_S"), rows)


def render_jobs(result: Any) -> str:
    """``jobs``: the post-call queue's counts, then its recent failures."""
    summary = dict(_as_dict(result))
    failures = [_as_dict(f) for f in _as_list(summary.pop("recent_failures", []))]
    text = render_mapping(summary)
    if failures:
        text += "\n\n" + table(("JOB", "KIND", "SESSION", "ATTEMPTS", "LAST ERROR"), [
            (f.get("id"), f.get("kind"), f.get("session_id"), f.get("attempts"),
             f.get("last_error")) for f in failures])
    return text


def render_providers(result: Any) -> str:
    """``providers``: one row per bot provider, in the order calls try them."""
    rows = []
    for p in (_as_dict(r) for r in _as_list(result)):
        last = p.get("last_error")
        last_text = "" if not isinstance(last, dict) else (
            f"{last.get('kind')} {round(float(last.get('age_s') or 0))}s ago: "
            f"{last.get('detail')}")
        sessions = _as_dict(p.get("sessions"))
        rows.append((p.get("name"), p.get("state"), p.get("share"), p.get("consecutive_errors"),
                     " ".join(f"{k}={v}" for k, v in sorted(sessions.items())) or "-",
                     round(float(str(p.get("state_since_s") or 0))), last_text or "-"))
    return table(("PROVIDER", "STATE", "SHARE", "ERRORS", "SESSIONS", "SINCE_S", "LAST ERROR"),
                 rows)


def render_registrations(result: Any) -> str:
    """``registrations``: one row per ``[[sip.registrations]]`` binding, in config order."""
    rows = []
    for r in (_as_dict(x) for x in _as_list(result)):
        rows.append((r.get("aor"), r.get("registrar"), r.get("state"),
                     _format_age(r.get("expires_in_s")), _format_age(r.get("next_try_in_s")),
                     r.get("last_status"), r.get("failures"), r.get("last_error") or "-"))
    return table(("AOR", "REGISTRAR", "STATE", "EXPIRES_IN", "NEXT_TRY", "STATUS", "FAILURES",
                  "LAST ERROR"), rows)


def parse_duration_s(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds; raises ArgumentTypeError."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h, 7d)")
    return value * units[unit]


def render_mapping(result: Any, indent: int = 0) -> str:
    """``show``: ``key: value`` lines, nested dicts indented two spaces per level."""
    if not isinstance(result, dict):
        return _cell(result)
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and value:
            lines += [f"{' ' * indent}{key}:", render_mapping(value, indent + 2)]
        else:
            lines.append(f"{' ' * indent}{key}: {_cell(value)}")
    return "\n".join(lines)


def render_message(result: Any) -> str:
    """``hangup``/``drain``/``resume``/``reload``/``line``: the daemon's message."""
    return _cell(_as_dict(result).get("message", "ok"))


def render_metrics(result: Any) -> str:
    """``metrics``: the Prometheus exposition text as is."""
    return str(_as_dict(result).get("text", "")).rstrip("\n")


def render_devices(result: Any) -> str:
    """``devices``: the sound devices as a table (headers even when empty), then
    the ALSA PCM names and what could not be listed."""
    rows = [_as_dict(r) for r in _as_list(result)]
    keys = ("index", "name", "hostapi", "inputs", "outputs", "default_rate_hz", "alsa",
            "alsa_plug")
    devices = [[r.get(k) for k in keys] for r in rows if r.get("kind") == "device"]
    lines = [table(("#", "NAME", "API", "IN", "OUT", "RATE", "ALSA", "ALSA (CONVERTING)"),
                   devices)]
    pcms = [(r.get("name"), r.get("capture"), r.get("playback"))
            for r in rows if r.get("kind") == "pcm"]
    if pcms:
        lines += ["", "ALSA PCMs:", table(("PCM", "CAPTURE", "PLAYBACK"), pcms)]
    lines += [f"note: {_cell(r.get('name'))}: {_cell(r.get('detail'))}"
              for r in rows if r.get("kind") == "error"]
    return "\n".join(lines)


def render_hello(result: Any) -> str:
    """``hello``: ``voxgated 0.1.0 (protocol 1)``."""
    hello = _as_dict(result)
    return (f"{_cell(hello.get('daemon'))} {_cell(hello.get('version'))} "
            f"(protocol {_cell(hello.get('protocol'))})")


def progress_bar(left: int, total: int) -> str:
    """``[##########----------] 5 sessions left of 10``; ``#`` are sessions ended."""
    done = PROGRESS_BAR_WIDTH if total <= 0 else (total - left) * PROGRESS_BAR_WIDTH // total
    return (f"[{'#' * done}{'-' * (PROGRESS_BAR_WIDTH - done)}] "
            f"{plural(left, 'session')} left of {total}")


# --- commands ------------------------------------------------------------------------------

def _emit(args: argparse.Namespace, result: Any, render: Callable[[Any], str]) -> None:
    print(json.dumps(result, indent=2) if args.json else render(result))


def _simple(cmd: str, render: Callable[[Any], str]) -> Callable[[ControlClient,
                                                                 argparse.Namespace], int]:
    """A command that sends ``cmd`` (with ``id`` when the parser took one) and prints."""
    def run(client: ControlClient, args: argparse.Namespace) -> int:
        request_args = {"id": args.id} if "id" in args else {}
        _emit(args, client.call(cmd, request_args), render)
        return EX_OK
    return run


def _run_health(client: ControlClient, args: argparse.Namespace) -> int:
    """``health``: the verdict and the components; exit 3 when unhealthy."""
    result = client.call("health", {})
    _emit(args, result, render_health)
    return EX_OK if _as_dict(result).get("healthy") else EX_UNHEALTHY


def _run_transfer(client: ControlClient, args: argparse.Namespace) -> int:
    _emit(args, client.call("transfer", {"id": args.id, "target": args.target}), render_message)
    return EX_OK


def _run_call(client: ControlClient, args: argparse.Namespace) -> int:
    request = {"uri": args.uri, "tenant": args.tenant, "agent": args.agent}
    _emit(args, client.call("call", {k: v for k, v in request.items() if v is not None}),
          render_session_id)
    return EX_OK


def render_session_id(result: Any) -> str:
    """``call``: the new session's id alone (for scripts: ``id=$(voxgatectl call …)``)."""
    return _cell(_as_dict(result).get("id", ""))


def _run_calls(client: ControlClient, args: argparse.Namespace) -> int:
    request = {"since_s": args.since, "tenant": args.tenant, "reason": args.reason,
               "limit": args.limit}
    _emit(args, client.call("calls", {k: v for k, v in request.items() if v is not None}),
          render_calls)
    return EX_OK


def _run_drain(client: ControlClient, args: argparse.Namespace) -> int:
    _emit(args, client.call("drain"), render_message)
    if args.wait:
        out = sys.stderr if args.json else sys.stdout
        limit = args.timeout
        deadline = None if limit is None else time.monotonic() + limit
        left = _wait_for_drain(client, out, deadline)
        if left:
            print(f"voxgatectl: drain: {plural(left, 'session')} still up after "
                  f"{limit:g} s; the drain goes on", file=sys.stderr)
            return EX_TEMPFAIL
    return EX_OK


def _wait_for_drain(client: ControlClient, out: TextIO, deadline: float | None) -> int:
    """Poll ``status`` until no session is active, the daemon is gone or ``deadline``
    (monotonic) passed; returns the sessions left (0 when drained). Each poll waits
    for its reply no longer than the time left (at least one poll interval).

    Raises:
        DaemonTimeout: a poll got no reply in time.
    """
    total = 0
    last = ""
    while True:
        left_s = math.inf if deadline is None else deadline - time.monotonic()
        try:
            status = client.call("status", timeout_s=min(DEFAULT_TIMEOUT_S,
                                                         max(left_s, DRAIN_POLL_S)))
        except DaemonTimeout:
            raise
        except DaemonUnavailable:  # it exited (systemctl stop): nothing left to drain
            print("\nvoxgated is gone; drain done", file=out)
            return 0
        active = _as_dict(_as_dict(status).get("sessions")).get("active")
        left = active if isinstance(active, int) and not isinstance(active, bool) else 0
        total = max(total, left)
        line = progress_bar(left, total)
        if line != last:
            print(f"\r{line}" if out.isatty() else line, end="" if out.isatty() else "\n",
                  file=out, flush=True)
            last = line
        if left == 0:
            print("\ndrain done" if out.isatty() else "drain done", file=out)
            return 0
        left_s = math.inf if deadline is None else deadline - time.monotonic()
        if left_s <= 0:
            if out.isatty():
                print(file=out)
            return left
        time.sleep(min(DRAIN_POLL_S, left_s))


def _run_line(client: ControlClient, args: argparse.Namespace) -> int:
    _emit(args, client.call("line", {"action": args.action, "name": args.name}), render_message)
    return EX_OK


@contextlib.contextmanager
def _quit_key() -> Iterator[Callable[[float], bool]]:
    """``wait(seconds)``: sleeps, and says whether ``q`` was typed meanwhile (or the
    terminal went away). Keys are read from stdin when it is a terminal, put in
    cbreak mode (no echo, no line buffering, Ctrl-C still works) until the end."""
    if not sys.stdin.isatty():
        def sleep(seconds: float) -> bool:
            time.sleep(seconds)
            return False
        yield sleep
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait_for_q(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                keys = os.read(fd, 64).decode(errors="replace")
                if not keys or QUIT_KEYS.intersection(keys):
                    return True
        return False

    try:
        yield wait_for_q
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _run_top(client: ControlClient, args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt), _quit_key() as quit_typed:
        hint = "q to quit" if sys.stdin.isatty() else "Ctrl-C to quit"
        for i in itertools.count(1):
            status, sessions = client.call("status"), client.call("sessions")
            if args.json:
                print(json.dumps({"status": status, "sessions": sessions}), flush=True)
            else:
                size = shutil.get_terminal_size()
                frame = (f"voxgate top  {time.strftime('%H:%M:%S')}  ({hint})\n\n"
                         f"{render_status(status)}\n\n{render_top_sessions(sessions)}")
                print(CLEAR_SCREEN + fit(frame, size.columns,
                                         size.lines - 1 if sys.stdout.isatty() else None),
                      flush=True)
            if args.iterations is not None and i >= args.iterations:
                break
            if quit_typed(TOP_INTERVAL_S):
                break
    return EX_OK


def _seconds(text: str) -> float:
    """A positive number of seconds; raises ArgumentTypeError."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r}")
    return value


def _instance(text: str) -> str:
    """A ``voxgate@N`` instance name: a path component of its socket's directory."""
    if not text or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"not an instance name: {text!r}")
    return text


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (no defaults here:
    :func:`_resolve` fills them, so an option given after the command wins)."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="print the raw JSON result")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"control socket (default ${SOCKET_ENV} or "
                                        f"{DEFAULT_SOCKET})")
    where.add_argument("-i", "--instance", metavar="N", type=_instance,
                       help="the instance voxgate@N (socket " +
                            INSTANCE_SOCKET.format(instance="N") + ")")
    common.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help=f"wait this long for each reply (default {DEFAULT_TIMEOUT_S:g}); "
                             "with drain --wait: for the last session to end (default: "
                             "no limit)")
    return common


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the common options' defaults (``timeout`` None: not given) and the
    socket of ``--instance``."""
    args.json = getattr(args, "json", False)
    args.timeout = getattr(args, "timeout", None)
    instance = getattr(args, "instance", None)
    if instance is not None:
        args.socket = INSTANCE_SOCKET.format(instance=instance)
    elif getattr(args, "socket", None) is None:
        args.socket = os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    return args


def _build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="voxgatectl", description="Control a running voxgated.", parents=[common],
        epilog="exit codes: 0 ok, 1 the daemon refused, 2 usage, 69 daemon not reachable "
               "or no reply in time, 75 drain --wait --timeout ran out")
    parser.add_argument("--version", action="version", version=f"voxgatectl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run: Callable[[ControlClient, argparse.Namespace], int],
            help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  parents=[common])
        sub.set_defaults(run=run)
        return sub

    add("status", _simple("status", render_status), "daemon state, sessions, limits, health")
    add("sessions", _simple("sessions", render_sessions), "list the sessions")
    add("show", _simple("show", render_mapping),
        "show one session or call record").add_argument("id", help="session id or Call-ID")
    calls = add("calls", _run_calls, "list call records, newest first")
    calls.add_argument("--since", type=parse_duration_s, metavar="DURATION",
                       help="only calls started in the last DURATION (90s, 15m, 2h, 7d)")
    calls.add_argument("--tenant", help="only this tenant's calls")
    calls.add_argument("--reason", help="only calls that ended with this reason")
    calls.add_argument("--limit", type=int, default=50, metavar="N",
                       help="at most N calls (default 50)")
    add("jobs", _simple("jobs", render_jobs), "post-call job queue: backlog and failures")
    add("providers", _simple("providers", render_providers),
        "bot providers: health, ramp share, errors, sessions")
    add("registrations", _simple("registrations", render_registrations),
        "[[sip.registrations]]: each binding's state, expiry, last status and error")
    add("hangup", _simple("hangup", render_message), "end one session").add_argument("id")
    transfer = add("transfer", _run_transfer,
                   "blind-transfer one SIP call (REFER); it ends with reason transferred")
    transfer.add_argument("id")
    transfer.add_argument("target", help="the SIP URI to send the caller to (sip:…)")
    call = add("call", _run_call,
               "place an outbound SIP call through admission; prints its session id")
    call.add_argument("uri", help="the SIP URI to call (sip:user@IP[:port])")
    call.add_argument("--tenant", help="the tenant to admit it in (default: the tenant rules)")
    call.add_argument("--agent", help="the agent kind to run, one the config runs "
                                      "(default: the tenant's)")
    drain = add("drain", _run_drain, "stop admitting calls; sessions in progress go on")
    drain.add_argument("--wait", action="store_true",
                       help="wait until no session is left (--timeout SECONDS: give up "
                            "then, exit 75; the drain goes on)")
    add("resume", _simple("resume", render_message), "admit calls again after drain")
    add("reload", _simple("reload", render_message), "reload the configuration's limits")
    add("health", _run_health, "health of each component (exit 3: unhealthy)")
    add("metrics", _simple("metrics", render_metrics), "Prometheus metrics text")
    top = add("top", _run_top, "live view, refreshed every second; q quits")
    top.add_argument("--iterations", type=int, default=None, metavar="N",
                     help="stop after N refreshes")
    add("hello", _simple("hello", render_hello), "daemon name, version and protocol")
    add("devices", _simple("devices", render_devices),
        "sound devices and the ALSA names for [[alsa.lines]]")
    line = add("line", _run_line, "start or stop an on-demand ALSA line")
    line.add_argument("action", choices=("start", "stop"))
    line.add_argument("name", help="the line's [[alsa.lines]] name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``voxgatectl``; returns the exit code (argparse exits 2 on usage errors)."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # now, not at exit: a reader gone (`| head`) is caught below
    except BrokenPipeError:
        # Python's "Note on SIGPIPE": what is left of stdout goes nowhere, no traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = _resolve(_build_parser().parse_args(argv))
    reply_timeout_s = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    try:
        with ControlClient(args.socket, reply_timeout_s) as client:
            code: int = args.run(client, args)
            return code
    except CommandFailed as e:
        print(f"voxgatectl: {args.command}: {e.message} ({e.code})", file=sys.stderr)
        return EX_REFUSED
    except DaemonUnavailable as e:
        print(f"voxgatectl: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
