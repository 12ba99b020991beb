"""Config loading: defaults, the shipped file, and errors naming file and key."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.daemon import user_python, user_pythonpath
from voxgate.config import Config, load_config
from voxgate.errors import EX_CONFIG, ConfigError
from voxgate.sip.digest import Credential

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "voxgate.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "voxgate.toml"
    path.write_text(text)
    return path


def test_shipped_file_equals_embedded_defaults():
    config = load_config(SHIPPED)
    assert config == Config(source=str(SHIPPED))


def test_shipped_file_documents_every_key_with_a_comment():
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"undocumented key: {line}"


def test_partial_file_takes_defaults(tmp_path):
    config = load_config(write(tmp_path, '[sip]\nlisten = "[::1]:5070"\n'))
    assert (config.sip.host, config.sip.port) == ("::1", 5070)
    assert config.limits.max_sessions == 100
    assert config.sip.transfer_timeout_s == 60.0


def test_transfer_timeout(tmp_path):
    config = load_config(write(tmp_path, "[sip]\ntransfer_timeout_s = 5\n"))
    assert config.sip.transfer_timeout_s == 5.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[sip]\nlisten = 5060\n", "[sip] listen: must be a string"),
        ('[sip]\nlisten = "localhost"\n', "[sip] listen: must be HOST:PORT"),
        ("[sip]\nbogus = 1\n", "[sip] bogus: unknown key"),
        ("[nosuch]\nx = 1\n", "[nosuch]: unknown section"),
        ("[limits]\nmax_sessions = 0\n", "[limits] max_sessions: must be between 1 and 100000"),
        ("[limits]\nmax_sessions = true\n", "[limits] max_sessions: must be an integer"),
        ("[rtp]\nport_min = 30000\nport_max = 20000\n", "[rtp] port_min: must not be above"),
        ('[rtp]\ncodecs = ["G729"]\n', "[rtp] codecs"),
        ('[rtp]\nsrtp = "on"\n', "[rtp] srtp: must be one of off, offer, required, got 'on'"),
        ("[rtp]\nsrtp = true\n", "[rtp] srtp: must be a string"),
        ('[agent]\nkind = "parrot"\n', "[agent] kind: must be one of echo"),
        ("[timers]\nmax_duration_s = -1\n", "[timers] max_duration_s: must be between"),
        ("not toml [", "invalid TOML"),
        ('[[tenants]]\nname = "default"\n', "reserved or used twice"),
        ('[[tenants]]\nname = "a b"\n', "must be a non-empty word"),
        ('[[tenants]]\nname = "a"\nsource_cidrs = ["nope"]\n', "is not a CIDR"),
        ('[sip]\ntrusted_cidrs = ["10.0.0.0/8", "nope"]\n',
         "[sip] trusted_cidrs: 'nope' is not a CIDR"),
        ('[limits]\nmedia_utilisation_max = 0\n', "[limits] media_utilisation_max: must be"),
        ('[sip]\nadvertise = "192.0.2.1"\n', "[sip] advertise: must be HOST:PORT"),
        ("[sip]\ntransfer_timeout_s = 0\n", "[sip] transfer_timeout_s: must be between 1 and"),
        ('[sip]\nlisten_tcp = "5061"\n', "[sip] listen_tcp: must be HOST:PORT"),
        ('[sip]\nlisten_tls = "127.0.0.1:5061"\n',
         "[sip] tls_certificate/tls_private_key: both PEM files are needed"),
        ("[sip]\nstream_message_timeout_s = 0\n", "[sip] stream_message_timeout_s: must be"),
        ("[sip]\nstream_max_connections = 0\n", "[sip] stream_max_connections: must be"),
        ('[rtp]\nadvertise = "nat.example"\n', "[rtp] advertise: must be an IP address"),
        ('[[tenants]]\nname = "a"\nheader_name = "X-T"\n', "go together"),
        ('[[tenants]]\nname = "a"\nbogus = 1\n', "[tenants.0] bogus: unknown key"),
        ('[agent]\nkind = "stream"\n', "[[agent.providers]]: the stream agent needs at least one"),
        ('[[agent.providers]]\nname = "a"\nurl = "http://x"\n', "#1 url: must be a ws://"),
        ('[[agent.providers]]\nname = "a"\nurl = "ws://x"\nprotocol = "sip"\n',
         "#1 protocol: must be one of twilio"),
        ('[[agent.providers]]\nname = "a"\nurl = "ws://x"\n[[agent.providers]]\nname = "a"\n'
         'url = "ws://y"\n', "#2 name: must be set and unique"),
        ('[agent.stream]\nramp_shares = [0.5, 0.2]\n', "[agent.stream] ramp_shares: rising"),
        ('[agent.stream]\nramp_shares = ["x"]\n', "ramp_shares: must be a non-empty list of num"),
        ('[[tenants]]\nname = "a"\nruri_user = "a"\nproviders = ["nope"]\n',
         "[[tenants]] a providers: no [[agent.providers]] named nope"),
        ('[[tenants]]\nname = "a"\nruri_user = "a"\nagent = "parrot"\n',
         "[[tenants]] a agent: must be one of"),
        ("tenants = 3\n", "must be an array of tables"),
        ('[log]\ntarget = "syslog"\n', "[log] target: must be one of"),
        ('[metrics]\nlisten = "nowhere"\n', "[metrics] listen"),
        ('[agent.webhook]\nurl = "ftp://x/"\n',
         "[agent.webhook] url: must be an http:// or https:// URL, got 'ftp://x/'"),
        ('[agent.webhook]\nurls = "http://x/"\n', "[agent.webhook] urls: must be a list of str"),
        ('[agent.webhook]\nurls = ["http://a/", "ftp://b/"]\n',
         "[agent.webhook] urls: must be an http:// or https:// URL, got 'ftp://b/'"),
        ('[agent.webhook]\nurls = ["http://a/", ""]\n', "[agent.webhook] urls: must be an http"),
        ('[agent.webhook]\nurl = "http://a/"\nurls = ["http://b/"]\n',
         "[agent.webhook] urls: set either url or urls"),
        ('[agent.webhook]\nurls = ["http://a/", "http://a/"]\n',
         "[agent.webhook] urls: 'http://a/' is listed twice"),
        ('[agent]\nplugin = "m:f"\n[agent.webhook]\nurls = ["http://a/"]\n',
         "[agent] plugin: set either plugin or [agent.webhook] url/urls"),
        ('[agent.webhook]\nurls = ["http://a/", "http://b/"]\n[[agent.providers]]\n'
         'name = "webhook-2"\nurl = "ws://x"\n',
         "[[agent.providers]] name: webhook-2 is the name of an [agent.webhook] URL"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_webhook_urls_in_failover_order(tmp_path):
    several = load_config(write(tmp_path, '[agent.webhook]\nurls = ["http://a:1/h", '
                                          '"https://b/h"]\n')).agent.webhook
    assert several.all_urls == ("http://a:1/h", "https://b/h")
    assert several.names == ("webhook-1", "webhook-2")
    one = load_config(write(tmp_path, '[agent.webhook]\nurl = "http://a/"\n')).agent.webhook
    assert (one.all_urls, one.names) == (("http://a/",), ("webhook-1",))
    none = load_config(write(tmp_path, "[agent.webhook]\nurls = []\n")).agent.webhook
    assert (none.all_urls, none.names) == ((), ())


def test_tenants_become_admission_rules(tmp_path):
    from voxgate.admission import limits_from_config

    config = load_config(write(tmp_path, """
[limits]
max_sessions = 10
default_tenant_max_sessions = 4
[[tenants]]
name = "acme"
max_sessions = 3
ruri_user = "acme"
source_cidrs = ["10.0.0.0/8"]
[[tenants]]
name = "globex"
header_name = "X-Tenant"
header_value = "globex"
"""))
    limits = limits_from_config(config)
    assert limits.default_tenant_max_sessions == 4
    acme, globex = limits.tenants
    assert (acme.name, acme.max_sessions, acme.ruri_user) == ("acme", 3, "acme")
    assert [str(n) for n in acme.source_cidrs] == ["10.0.0.0/8"]
    assert globex.max_sessions is None
    assert globex.header == ("X-Tenant", "globex")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def run_voxgated(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxgate.supervisor", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_check_config_exit_codes(tmp_path):
    ok = run_voxgated("--check-config", str(SHIPPED))
    assert ok.returncode == 0, ok.stderr
    bad = run_voxgated("--check-config", str(write(tmp_path, "[sip]\nlisten = 1\n")))
    assert bad.returncode == EX_CONFIG
    assert bad.stderr.count("\n") == 1
    assert "[sip] listen" in bad.stderr


def test_check_config_loads_the_tls_pem_files(tmp_path):
    """An unloadable certificate fails the check (exit 78) naming the keys and files."""
    missing = tmp_path / "missing.pem"
    text = (f'[sip]\nlisten_tls = "127.0.0.1:5061"\ntls_certificate = "{missing}"\n'
            f'tls_private_key = "{missing}"\n')
    bad = run_voxgated("--check-config", str(write(tmp_path, text)))
    assert bad.returncode == EX_CONFIG
    assert "[sip] tls_certificate/tls_private_key: cannot load" in bad.stderr
    assert str(missing) in bad.stderr


def test_check_config_without_path_checks_the_config_option(tmp_path):
    ok = run_voxgated("--config", str(SHIPPED), "--check-config")
    assert (ok.returncode, ok.stdout) == (0, f"voxgated: {SHIPPED}: ok\n"), ok.stderr
    bad = write(tmp_path, "[limits]\nmax_sessions = 0\n")
    done = run_voxgated("--check-config", "--config", str(bad))
    assert done.returncode == EX_CONFIG
    assert done.stderr == (f"voxgated: config error: {bad}: [limits] max_sessions: "
                           "must be between 1 and 100000, got 0\n")


def _default_file_skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root to mount an overlay on /etc inside a mount namespace (unshare -m)"
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "unshare/setpriv missing (apt-get install util-linux)"
    return None


needs_private_etc = pytest.mark.skipif(_default_file_skip_reason() is not None,
                                       reason=_default_file_skip_reason() or "")


def run_with_default_file(tmp_path: Path, text: str | None, *args: str,
                          user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``voxgated ARGS`` (as ``user``, without supplementary groups) while
    /etc/voxgate/voxgate.toml holds ``text`` (None: /etc/voxgate does not exist).

    An overlay over /etc in a private mount namespace adds (or hides) the
    directory; the host's /etc is never written and the mount goes away with
    the namespace. The directory is 0750 root:root, like the package's
    /etc/voxgate for a user outside the voxgate group.
    """
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    work.mkdir()
    upper.mkdir()
    directory = upper / "voxgate"
    if text is None:
        os.mknod(directory, stat.S_IFCHR, os.makedev(0, 0))  # an overlayfs whiteout
    else:
        directory.mkdir(mode=0o750)
        (directory / "voxgate.toml").write_text(text)
    python, pythonpath = [sys.executable], str(REPO / "daemon")
    if user is not None:
        python, pythonpath = user_python(user, login_groups=False), user_pythonpath()
    script = ('mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc'
              ' || exit 90; shift 2; exec "$@"')
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(upper), str(work), *python, "-m", "voxgate.supervisor", *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    if done.returncode == 90:
        pytest.skip(f"cannot mount an overlay on /etc here: {done.stderr.strip()}")
    return done


@needs_private_etc
def test_check_config_without_path_checks_the_default_file(tmp_path):
    """``voxgated --check-config`` alone checks /etc/voxgate/voxgate.toml (as ``nginx -t``)."""
    ok = run_with_default_file(tmp_path, SHIPPED.read_text(), "--check-config")
    assert (ok.returncode, ok.stdout) == (0, "voxgated: /etc/voxgate/voxgate.toml: ok\n"), \
        ok.stderr


@needs_private_etc
def test_check_config_without_path_names_key_and_default_file(tmp_path):
    bad = run_with_default_file(tmp_path, '[sip]\nlisten = "nowhere"\n', "--check-config")
    assert bad.returncode == EX_CONFIG
    assert bad.stderr.startswith(
        "voxgated: config error: /etc/voxgate/voxgate.toml: [sip] listen: must be HOST:PORT")
    assert bad.stdout == ""


@needs_private_etc
def test_check_config_without_default_file_accepts_the_embedded_defaults(tmp_path):
    """No file: the daemon would start on the embedded defaults, and the check says so."""
    done = run_with_default_file(tmp_path, None, "--check-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("voxgated: /etc/voxgate/voxgate.toml does not exist: "
                           "the embedded defaults apply: ok\n")


@needs_private_etc
def test_check_config_of_an_unreadable_default_file_fails(tmp_path):
    """A user outside the voxgate group is told the file cannot be read, not that the
    embedded defaults apply (and gets no traceback)."""
    done = run_with_default_file(tmp_path, SHIPPED.read_text(), "--check-config",
                                 user="nobody")
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr == ("voxgated: config error: /etc/voxgate/voxgate.toml: "
                           "cannot read: Permission denied\n")


def test_daemon_refuses_bad_config_with_78(tmp_path):
    bad = run_voxgated("--config", str(write(tmp_path, "[limits]\nmax_sessions = -5\n")))
    assert bad.returncode == EX_CONFIG
    assert "[limits] max_sessions" in bad.stderr


def credentials_file(tmp_path: Path, text: str, mode: int = 0o640) -> Path:
    path = tmp_path / "sip-users"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_sip_credentials_are_read_with_the_config(tmp_path):
    users = credentials_file(tmp_path, "# callers\nalice:wonder land\n"
                             f"bob:pbx:{'ab' * 16}\n")
    config = load_config(write(tmp_path, f'[sip]\nauth_credentials_file = "{users}"\n'
                                         'auth_realm = "pbx"\nauth_nonce_ttl_s = 60\n'))
    assert [(c.username, c.algorithm) for c in config.sip_credentials] == [
        ("alice", None), ("bob", "MD5")]
    assert (config.sip.auth_realm, config.sip.auth_nonce_ttl_s) == ("pbx", 60.0)
    assert Config().sip_credentials == ()


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("alice:pw\n", 0o644, "must not be accessible to others (mode 0644; chmod o-rwx)"),
        ("alice:pw\n", 0o602, "must not be accessible to others"),
        ("alice\n", 0o600, "line 1: must be username:password"),
        ("# nobody\n", 0o600, "no credentials in the file"),
        (f"bob:elsewhere:{'ab' * 16}\n", 0o600, "is for realm 'elsewhere', not [sip] auth_realm"),
        ("caf\xe9:pw\n".encode("latin-1"), 0o600, "not UTF-8"),
    ],
)
def test_bad_sip_credentials_file_names_key_and_file(tmp_path, text, mode, expected):
    users = tmp_path / "sip-users"
    if isinstance(text, bytes):
        users.write_bytes(text)
        users.chmod(mode)
    else:
        credentials_file(tmp_path, text, mode)
    path = write(tmp_path, f'[sip]\nauth_credentials_file = "{users}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: [sip] auth_credentials_file: {users}: ")
    assert expected in str(info.value)


def test_outbound_call_keys(tmp_path):
    default = Config().sip
    assert (default.outbound_credentials_file, default.outbound_ring_timeout_s,
            default.outbound_from_user) == ("", 30.0, "voxgate")
    assert Config().outbound_credentials == ()
    users = credentials_file(tmp_path, "alice:secret\n", 0o600)
    config = load_config(write(tmp_path, f'[sip]\noutbound_credentials_file = "{users}"\n'
                                         'outbound_ring_timeout_s = 5\n'
                                         'outbound_from_user = "agent.1"\n'))
    assert [c.username for c in config.outbound_credentials] == ["alice"]
    assert (config.sip.outbound_ring_timeout_s, config.sip.outbound_from_user) == (5.0, "agent.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('outbound_ring_timeout_s = 0', "[sip] outbound_ring_timeout_s"),
        ('outbound_ring_timeout_s = 601', "[sip] outbound_ring_timeout_s"),
        ('outbound_from_user = "a b"', "[sip] outbound_from_user: 1-64 letters"),
        ('outbound_from_user = ""', "[sip] outbound_from_user: 1-64 letters"),
    ],
)
def test_bad_outbound_keys(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[sip]\n{text}\n"))
    assert expected in str(info.value)


@pytest.mark.parametrize(("text", "mode", "expected"), [
    ("alice:pw\n", 0o644, "must not be accessible to others"),
    ("alice:pw\nbob:pw\n", 0o600, "must hold one user's credentials"),
])
def test_bad_outbound_credentials_file(tmp_path, text, mode, expected):
    users = credentials_file(tmp_path, text, mode)
    path = write(tmp_path, f'[sip]\noutbound_credentials_file = "{users}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: [sip] outbound_credentials_file: {users}: ")
    assert expected in str(info.value)


@pytest.mark.parametrize("mode", ["off", "offer", "required"])
def test_srtp_modes(tmp_path, mode):
    assert load_config(write(tmp_path, f'[rtp]\nsrtp = "{mode}"\n')).rtp.srtp == mode


def test_missing_sip_credentials_file_and_bad_realm(tmp_path):
    with pytest.raises(ConfigError, match=r"auth_credentials_file: .*absent: cannot read: "
                                          "No such file"):
        load_config(write(tmp_path, f'[sip]\nauth_credentials_file = "{tmp_path}/absent"\n'))
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(ConfigError, match="fifo: must be a regular file"):
        load_config(write(tmp_path, f'[sip]\nauth_credentials_file = "{tmp_path}/fifo"\n'))
    for algorithms in ("[]", '["MD5", "MD5"]', '["SHA-1"]'):
        with pytest.raises(ConfigError, match=r"\[sip\] auth_algorithms: a non-empty list"):
            load_config(write(tmp_path, f"[sip]\nauth_algorithms = {algorithms}\n"))
    with pytest.raises(ConfigError, match=r"\[sip\] auth_realm: 1-64 printable"):
        load_config(write(tmp_path, '[sip]\nauth_realm = "a\\"b"\n'))


def test_daemon_refuses_world_readable_credentials_with_78(tmp_path):
    users = credentials_file(tmp_path, "alice:pw\n", 0o604)
    bad = run_voxgated("--config", str(write(tmp_path, "[sip]\nauth_credentials_file = "
                                                       f'"{users}"\n')))
    assert bad.returncode == EX_CONFIG, bad.stderr
    assert f"[sip] auth_credentials_file: {users}: must not be accessible to others" \
        in bad.stderr


REGISTRATION = '[[sip.registrations]]\nregistrar = "sip:192.0.2.10:5070"\naor = "sip:echo@pbx"\n'


def test_registrations_are_read_with_their_credentials(tmp_path):
    secret = credentials_file(tmp_path, "echo:pass:word\n", 0o600)
    config = load_config(write(tmp_path, REGISTRATION + f'credentials_file = "{secret}"\n'
                               'expires_s = 120\n' + REGISTRATION.replace("echo", "desk")
                               + 'contact_user = "front-desk"\n'))
    first, second = config.sip.registrations
    assert (first.registrar, first.aor, first.expires_s, first.contact_user_or_aor) == (
        "sip:192.0.2.10:5070", "sip:echo@pbx", 120, "echo")
    assert (second.expires_s, second.retry_initial_s, second.retry_max_s) == (600, 5.0, 300.0)
    assert second.contact_user_or_aor == "front-desk"
    assert config.registration_credentials == ((Credential("echo", password="pass:word"),), ())
    assert Config().sip.registrations == () and Config().registration_credentials == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (REGISTRATION.replace("192.0.2.10", "pbx.example"), "#1 registrar: must be sip:IP"),
        (REGISTRATION.replace("sip:192", "sip:u@192"), "#1 registrar: must be sip:IP"),
        (REGISTRATION.replace("sip:192", "tel:192"), "#1 registrar: must be sip:IP"),
        (REGISTRATION.replace("sip:echo@pbx", "sip:pbx"), "#1 aor: must be sip:user@domain"),
        (REGISTRATION + 'contact_user = "a b"\n', "#1 contact_user: 1-64 letters"),
        (REGISTRATION + "expires_s = 30\n",
         "[sip.registrations.0] expires_s: must be between 60 and 86400"),
        (REGISTRATION + "retry_initial_s = 60\nretry_max_s = 10\n",
         "#1 retry_initial_s: must not be above retry_max_s"),
        (REGISTRATION * 2, "#2 aor: 'sip:echo@pbx' is registered with 'sip:192.0.2.10:5070' "
                           "twice"),
        (REGISTRATION + "bogus = 1\n", "[sip.registrations.0] bogus: unknown key"),
        ("[sip]\nregistrations = 1\n", "[[sip.registrations]]: must be an array of tables"),
        ('[sip]\nlisten = "0.0.0.0:5060"\n' + REGISTRATION,
         "[sip] advertise: [[sip.registrations]] register sip:USER@0.0.0.0:5060: set advertise"),
    ],
)
def test_bad_registration_names_the_entry_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("echo:pw\n", 0o604, "must not be accessible to others"),
        ("echo:pw\nother:pw\n", 0o600, "must hold one user's credentials"),
        ("# none\n", 0o600, "no credentials in the file"),
    ],
)
def test_bad_registration_credentials_file(tmp_path, text, mode, expected):
    secret = credentials_file(tmp_path, text, mode)
    path = write(tmp_path, REGISTRATION + f'credentials_file = "{secret}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(
        f"{path}: [[sip.registrations]] #1 credentials_file: {secret}: ")
    assert expected in str(info.value)
