"""voxgated registers with a real Kamailio registrar and takes the calls routed to it.

Kamailio (``tests/harness/kamailio-registrar.cfg``) challenges REGISTER and
checks it with ``auth_db`` against a db_text ``subscriber`` table holding the
password in clear; bindings live in memory (usrloc). voxgated registers
``sip:echo@127.0.0.1`` from ``[[sip.registrations]]`` with a credentials
file; ``kamcmd ul.dump`` then lists its contact. SIPp calls the AOR through
Kamailio, whose ``lookup("location")`` sends the INVITE to voxgate: the echo
agent answers it like any other call. SIGTERM removes the binding
(un-REGISTER) before voxgated exits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import requires
from tests.harness.audio import SpeechClip
from tests.harness.daemon import ConfigOverrides, PortRange, free_udp_port
from tests.harness.kamailio import running_registrar
from tests.harness.sipp import Sipp
from tests.integration.conftest import StartDaemon
from tests.integration.test_control import ctl_json, ctl_ok, wait_until

pytestmark = requires("sipp", "kamailio", "kamcmd")

USER, PASSWORD = "echo", "pass:word with spaces"
REGISTER_TIMEOUT_S = 15.0
SIPP_TIMEOUT_S = 30.0


def _registered(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return rows if rows and all(r["state"] == "registered" for r in rows) else []


def _secret(tmp_path: Path, password: str) -> Path:
    secret = tmp_path / "registration.secret"
    secret.write_text(f"# the registrar's subscriber\n{USER}:{password}\n")
    secret.chmod(0o600)
    return secret


def _registration(registrar: str, secret: Path) -> ConfigOverrides:
    return {"sip.registrations": [{
        "registrar": registrar, "aor": f"sip:{USER}@127.0.0.1", "credentials_file": str(secret),
        "expires_s": 60, "retry_initial_s": 1.0}]}


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_registers_with_kamailio_takes_its_call_and_unregisters_on_stop(
    start_daemon: StartDaemon, reserve_ports: Callable[[int], PortRange], clip: SpeechClip,
    tmp_path: Path, algorithm: str,
) -> None:
    secret = _secret(tmp_path, PASSWORD)
    with running_registrar(tmp_path / "kamailio", {USER: PASSWORD},
                           algorithm=algorithm) as kam:
        registrar = f"sip:127.0.0.1:{kam.port}"
        daemon = start_daemon(_registration(registrar, secret))
        contact = f"sip:{USER}@127.0.0.1:{daemon.sip_port}"

        # Registered: voxgatectl says so, and so does Kamailio's location table.
        rows = wait_until(lambda: _registered(ctl_json(daemon, "registrations")),
                          "the binding registered", REGISTER_TIMEOUT_S)
        assert rows[0]["aor"] == f"sip:{USER}@127.0.0.1" and rows[0]["last_status"] == 200
        assert 0 < float(str(rows[0]["expires_in_s"])) <= 60
        assert kam.contacts() == [contact], kam.log_text()[-3000:]
        table = ctl_ok(daemon, "registrations")
        assert re.search(rf"sip:{USER}@127\.0\.0\.1 +{registrar} +registered", table), table
        metrics = ctl_json(daemon, "metrics")["text"]
        labels = f'aor="sip:{USER}@127.0.0.1",registrar="{registrar}"'
        assert f"voxgate_sip_registration_state{{{labels},state=\"registered\"}} 1.0" \
            in metrics, metrics
        assert f"voxgate_sip_register_responses_total{{{labels},result=\"challenge\"}}" \
            in metrics, metrics

        # A call to the AOR through Kamailio reaches voxgate's echo agent.
        media = reserve_ports(20)
        sipp = Sipp("uac_echo", kam.address, workdir=tmp_path / "sipp",
                    local_port=free_udp_port(), media_port=media.first, clip=clip,
                    calls=1, duration_ms=300, timeout_s=SIPP_TIMEOUT_S)
        result = sipp.run()
        assert (result.returncode, result.successful_calls, result.failed_calls) == (0, 1, 0), \
            f"{result.describe()}\nkamailio:\n{kam.log_text()[-3000:]}"
        assert "INVITE routed to " + contact in kam.log_text()
        records = wait_until(lambda: ctl_json(daemon, "calls"), "the call record")
        assert [r["reason"] for r in records] == ["bye"], records

        # SIGTERM: the binding is removed before voxgated exits.
        assert daemon.terminate() == 0
        assert kam.contacts() == [], kam.log_text()[-3000:]
        assert "expires 0" in kam.log_text()
        events = daemon.events("sip_registration")
        assert [e["state"] for e in events][-2:] == ["unregistering", "unregistered"], events


def test_wrong_password_fails_and_retries_with_backoff(
    start_daemon: StartDaemon, tmp_path: Path,
) -> None:
    secret = _secret(tmp_path, "not the password")
    with running_registrar(tmp_path / "kamailio", {USER: PASSWORD}) as kam:
        daemon = start_daemon(_registration(f"sip:127.0.0.1:{kam.port}", secret))
        # The answer to the challenge is challenged again: no third REGISTER until the
        # retry (1 s, then 2 s …).
        row = wait_until(lambda: [r for r in ctl_json(daemon, "registrations")
                                  if r["failures"] >= 2], "two failed tries", 10.0)[0]
        assert (row["state"], row["last_status"], row["last_error"]) in [
            ("failed", 401, "credentials refused"), ("registering", 401, "credentials refused")]
        assert kam.contacts() == []
        failed = daemon.events("sip_registration")
        delays = [round(float(e["next_try_in_s"])) for e in failed if e["state"] == "failed"]
        assert delays[:2] == [1, 2], failed
        assert daemon.terminate() == 0  # nothing to remove: no REGISTER with Expires: 0
        assert "expires 0" not in kam.log_text()
