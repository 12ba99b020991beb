"""``voxgated``: parse the command line, load the config, run the daemon.

The supervisor starts the components in order inside one Trio nursery (the
media clock, then the SIP endpoint), sends ``READY=1`` once every listener
is bound, and on SIGTERM or SIGINT stops admitting calls (SIP 503), ends the
sessions in progress with BYE and exits 0. Exit codes: 0 clean stop, 1 a
listener could not be bound, 78 (EX_CONFIG) an invalid configuration.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from voxgate import __version__
from voxgate.admission import Admission, limits_from_config
from voxgate.config import DEFAULT_PATH, Config, load_config
from voxgate.errors import EX_CONFIG, ConfigError
from voxgate.logging import log_event, setup_logging
from voxgate.systemd import Notifier
from voxgate.transports.rtp_media import MediaClock
from voxgate.transports.sip_endpoint import SipEndpoint

SHUTDOWN_GRACE_S = 5.0
"""How long SIGTERM waits for the BYEs it sent to be answered."""


async def serve(config: Config, notifier: Notifier) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            clock = MediaClock()
            await nursery.start(clock.run)
            admission = Admission(limits_from_config(config))
            endpoint = SipEndpoint(config, clock, admission)
            try:
                await nursery.start(endpoint.run)
            except OSError as e:
                log_event(logging.ERROR, "listen_failed", f"cannot bind SIP {config.sip.listen}: "
                          f"{e.strerror}", listen=config.sip.listen)
                nursery.cancel_scope.cancel()
                return 1
            notifier.notify("READY=1", f"STATUS=listening on {config.sip.listen}")
            log_event(logging.INFO, "ready", "voxgate ready", sip=config.sip.listen,
                      rtp=f"{config.rtp.address}:{config.rtp.port_min}-{config.rtp.port_max}",
                      max_sessions=config.limits.max_sessions, agent=config.agent.kind,
                      config=config.source, version=__version__)
            async for signum in signals:
                log_event(logging.INFO, "shutdown", "stopping", signal=signal.Signals(signum).name,
                          sessions=endpoint.active_sessions)
                notifier.notify("STOPPING=1")
                await endpoint.shutdown(SHUTDOWN_GRACE_S)
                nursery.cancel_scope.cancel()
                break
    log_event(logging.INFO, "stopped", "voxgate stopped")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="voxgated", description="voxgate telephony daemon")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"configuration file (default {DEFAULT_PATH}; the embedded "
                             "defaults when that file does not exist)")
    parser.add_argument("--check-config", type=Path, metavar="PATH",
                        help="validate PATH and exit (0 valid, 78 invalid)")
    parser.add_argument("--version", action="version", version=f"voxgated {__version__}")
    return parser.parse_args(argv)


def _load(args: argparse.Namespace) -> Config:
    if args.check_config is not None:
        return load_config(args.check_config)
    if args.config is not None:
        return load_config(args.config)
    if DEFAULT_PATH.exists():
        return load_config(DEFAULT_PATH)
    return Config()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``voxgated``; returns the process exit code."""
    args = _parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"voxgated: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config is not None:
        print(f"voxgated: {args.check_config}: ok")
        return 0
    setup_logging(config.log.level)
    return trio.run(serve, config, Notifier())


if __name__ == "__main__":
    sys.exit(main())
