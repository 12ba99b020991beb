"""Configuration: a TOML file (``tomllib``) loaded into frozen dataclasses.

Every section is a dataclass whose fields are the keys, with their defaults
(the *embedded default*: a file may leave any key out) and a ``range`` in the
field metadata. Unknown sections or keys, wrong types and out-of-range values
raise :class:`~voxgate.errors.ConfigError` naming the file and the key, e.g.
``/etc/voxgate/voxgate.toml: [rtp] port_min: must be between 1024 and 65535``.
``config/voxgate.toml`` documents every key with its unit and default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxgate.agents.dialogue import BUILTIN_MENU, Choice, Menu, Step, menu_problem
from voxgate.cidr import parse_networks
from voxgate.errors import ConfigError, RemoteProtocolError
from voxgate.sip.digest import ALGORITHMS as DIGEST_ALGORITHMS
from voxgate.sip.digest import Credential, parse_credentials
from voxgate.sip.sdes import SRTP_MODES
from voxgate.sip.uri import parse_uri_untrusted

DEFAULT_PATH = Path("/etc/voxgate/voxgate.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("auto", "journal", "stderr")
AGENT_KINDS = ("echo", "local", "silent", "babble", "stream")
STREAM_PROTOCOLS = ("twilio", "vonage")
CODECS = ("PCMU", "PCMA")


def _range(lo: float, hi: float) -> dict[str, tuple[float, float]]:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class RegistrationConfig:
    """One ``[[sip.registrations]]`` entry: voxgate's contact registered with a
    registrar (a PBX) under an address-of-record (RFC 3261 §10)."""

    registrar: str = ""
    """The registrar's URI, ``sip:IP[:port]`` (the REGISTER's Request-URI and where it goes)."""
    aor: str = ""
    """The address-of-record, ``sip:user@domain`` (To and From)."""
    contact_user: str = ""
    """The user part of the registered Contact ``sip:USER@[sip] advertise-or-listen``
    ("" = the AOR's user)."""
    credentials_file: str = ""
    """Digest credentials for the registrar's challenges, one user ("" = none)."""
    expires_s: int = field(default=600, metadata=_range(60, 86_400))
    retry_initial_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    retry_max_s: float = field(default=300.0, metadata=_range(0.1, 86_400))

    @property
    def contact_user_or_aor(self) -> str:
        """``contact_user``, else the AOR's user part (checked when loading)."""
        return self.contact_user or parse_uri_untrusted(self.aor).user or ""


@dataclass(frozen=True)
class SipConfig:
    listen: str = "127.0.0.1:5060"
    answer_delay_ms: int = field(default=0, metadata=_range(0, 60_000))
    invites_per_source_per_s: float = field(default=100.0, metadata=_range(1, 100_000))
    invite_burst: int = field(default=200, metadata=_range(1, 1_000_000))
    options_per_source_per_s: float = field(default=20.0, metadata=_range(1, 100_000))
    options_burst: int = field(default=40, metadata=_range(1, 1_000_000))
    requests_per_source_per_s: float = field(default=50.0, metadata=_range(1, 100_000))
    requests_burst: int = field(default=100, metadata=_range(1, 1_000_000))
    flood_drop_factor: float = field(default=2.0, metadata=_range(1, 1000))
    transaction_share_per_source: float = field(default=0.75, metadata=_range(0.01, 1))
    unacked_failures_per_source: int = field(default=16, metadata=_range(0, 1_000_000))
    trusted_cidrs: tuple[str, ...] = ()
    advertise: str = ""
    auth_credentials_file: str = ""
    auth_realm: str = "voxgate"
    auth_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
    auth_nonce_ttl_s: float = field(default=300.0, metadata=_range(10, 86_400))
    auth_replay_table_size: int = field(default=4096, metadata=_range(16, 1_000_000))
    transfer_timeout_s: float = field(default=60.0, metadata=_range(1, 3600))
    registrations: tuple[RegistrationConfig, ...] = ()
    outbound_credentials_file: str = ""
    """Digest credentials answering a 401/407 to our outbound INVITEs, one user ("" = none)."""
    outbound_ring_timeout_s: float = field(default=30.0, metadata=_range(1, 600))
    """An outbound call unanswered this long is cancelled (reason ring-timeout)."""
    outbound_from_user: str = "voxgate"
    """The user part of our outbound calls' From ``sip:USER@[sip] advertise-or-listen``."""
    listen_tcp: str = ""
    listen_tls: str = ""
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_client_ca: str = ""
    stream_max_connections: int = field(default=1024, metadata=_range(1, 1_000_000))
    stream_max_connections_per_source: int = field(default=64, metadata=_range(1, 1_000_000))
    stream_idle_timeout_s: float = field(default=300.0, metadata=_range(1, 86_400))
    stream_message_timeout_s: float = field(default=10.0, metadata=_range(0.1, 3600))

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    @property
    def advertised_host_port(self) -> tuple[str, int]:
        """Address and port for our Via and Contact: ``advertise``, else ``listen``."""
        return split_host_port(self.advertise or self.listen)


@dataclass(frozen=True)
class RtpConfig:
    address: str = "127.0.0.1"
    port_min: int = field(default=20000, metadata=_range(1024, 65535))
    port_max: int = field(default=20999, metadata=_range(1024, 65535))
    codecs: tuple[str, ...] = CODECS
    jitter_buffer_ms: int = field(default=20, metadata=_range(0, 1000))
    jitter_buffer_max_ms: int = field(default=200, metadata=_range(20, 5000))
    playback_allowance_ms: int = field(default=100, metadata=_range(0, 5000))
    advertise: str = ""
    srtp: str = "off"
    """SRTP with SDES keys (RFC 3711, RFC 4568): one of :data:`SRTP_MODES`."""

    @property
    def sdp_address(self) -> str:
        """The address our SDP offers for media: ``advertise``, else ``address``."""
        return self.advertise or self.address


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = field(default=100, metadata=_range(1, 100_000))
    default_tenant_max_sessions: int = field(default=0, metadata=_range(0, 100_000))
    queue_size: int = field(default=0, metadata=_range(0, 100_000))
    queue_timeout_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    retry_after_s: int = field(default=5, metadata=_range(1, 86_400))
    drain_timeout_s: float = field(default=30.0, metadata=_range(0, 86_400))
    media_utilisation_max: float = field(default=0.7, metadata=_range(0.001, 1.0))
    media_lag_max_ms: int = field(default=40, metadata=_range(1, 10_000))


@dataclass(frozen=True)
class TenantConfig:
    """One ``[[tenants]]`` entry: a cap and the rules that put a call in it.

    Every rule given must match (AND); a tenant without rules matches nothing.
    ``max_sessions`` 0 means no cap of its own (the global cap still holds).
    """

    name: str = ""
    max_sessions: int = field(default=0, metadata=_range(0, 100_000))
    ruri_user: str = ""
    ruri_host: str = ""
    header_name: str = ""
    header_value: str = ""
    source_cidrs: tuple[str, ...] = ()
    agent: str = ""
    """This tenant's ``[agent] kind`` ("" = the ``[agent]`` one)."""
    providers: tuple[str, ...] = ()
    """For ``kind = "stream"``: the ``[[agent.providers]]`` names its calls try, in
    order (empty = every provider, in the file's order)."""


@dataclass(frozen=True)
class TimersConfig:
    first_media_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    media_inactivity_s: float = field(default=10.0, metadata=_range(0.1, 3600))
    recovery_window_s: float = field(default=20.0, metadata=_range(0, 3600))
    agent_response_s: float = field(default=5.0, metadata=_range(0, 3600))
    playback_deadman_ms: int = field(default=1000, metadata=_range(0, 60_000))
    max_duration_s: float = field(default=3600.0, metadata=_range(1, 7 * 86_400))
    ring_timeout_s: float = field(default=60.0, metadata=_range(0, 3600))


@dataclass(frozen=True)
class BudgetConfig:
    session_bytes: int = field(default=256 * 1024, metadata=_range(4096, 1 << 30))
    budget_grace_ms: int = field(default=2000, metadata=_range(0, 600_000))
    playout_ms: int = field(default=30_000, metadata=_range(20, 3_600_000))
    utterance_ms: int = field(default=10_000, metadata=_range(1000, 600_000))
    rss_soft_bytes: int = field(default=0, metadata=_range(0, 1 << 40))
    rss_hard_bytes: int = field(default=0, metadata=_range(0, 1 << 40))


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = field(default=2, metadata=_range(0, 3))
    start_ms: int = field(default=200, metadata=_range(20, 10_000))
    stop_ms: int = field(default=600, metadata=_range(20, 10_000))


@dataclass(frozen=True)
class WebhookConfig:
    """``[agent.webhook]``: the integrator's HTTP endpoint(s): ``url`` ("" = none) or
    ``urls``, several tried in this order with failover (never both)."""

    url: str = ""
    urls: tuple[str, ...] = ()
    max_concurrent: int = field(default=16, metadata=_range(1, 10_000))

    @property
    def all_urls(self) -> tuple[str, ...]:
        """Every webhook URL in failover order (empty: no webhook)."""
        return (self.url,) if self.url else self.urls

    @property
    def names(self) -> tuple[str, ...]:
        """Each URL's name in metrics and ``voxgatectl providers``: ``webhook-1`` … in order."""
        return tuple(f"webhook-{i}" for i in range(1, len(self.all_urls) + 1))


@dataclass(frozen=True)
class ProviderConfig:
    """One ``[[agent.providers]]`` entry: a bot server the stream agent connects to."""

    name: str = ""
    url: str = ""
    protocol: str = "twilio"
    sample_rate_hz: int = 8000
    """The audio rate of the ``vonage`` protocol (8000 or 16000)."""
    ca_file: str = ""
    """PEM file of the CAs that sign a ``wss://`` server ("" = the system store)."""


@dataclass(frozen=True)
class StreamConfig:
    """``[agent.stream]``: limits of every bot connection and provider health."""

    connect_timeout_s: float = field(default=3.0, metadata=_range(0.1, 60))
    max_message_bytes: int = field(default=65_536, metadata=_range(1024, 16 << 20))
    max_messages_per_s: int = field(default=200, metadata=_range(10, 100_000))
    send_queue_frames: int = field(default=50, metadata=_range(1, 10_000))
    unhealthy_after_errors: int = field(default=3, metadata=_range(1, 1000))
    early_close_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    probe_interval_s: float = field(default=5.0, metadata=_range(0.1, 3600))
    ramp_shares: tuple[float, ...] = (0.1, 0.5, 1.0)
    ramp_step_s: float = field(default=30.0, metadata=_range(0.1, 86_400))


@dataclass(frozen=True)
class AgentConfig:
    """``[agent]``; ``menu`` None runs the local agent's built-in example menu."""

    kind: str = "echo"
    fallback_prompt: str = ""
    voice: str = "en-us"
    rate_wpm: int = field(default=160, metadata=_range(80, 450))
    barge_in: bool = True
    plugin: str = ""
    recognizers: int = field(default=2, metadata=_range(1, 64))
    recognizer_memory_bytes: int = field(default=512 << 20, metadata=_range(256 << 20, 1 << 40))
    """Each recogniser worker process's address-space limit (``RLIMIT_AS``)."""
    recognizer_timeout_s: float = field(default=10.0, metadata=_range(1, 600))
    """A worker taking longer on one utterance is killed and restarted (a no-match); an
    utterance that no worker takes within as long is a no-match too."""
    synthesizers: int = field(default=2, metadata=_range(1, 64))
    preroll_ms: int = field(default=300, metadata=_range(0, 2000))
    endpoint_check_ms: int = field(default=300, metadata=_range(0, 10_000))
    """Silence after which the caller's speech so far is checked against the step
    (0: no endpointing, turns end at ``[vad] stop_ms``)."""
    endpoint_max_ms: int = field(default=1200, metadata=_range(20, 10_000))
    """The silence an incomplete turn (a digit string so far) waits for more."""
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    menu: Menu | None = None
    stream: StreamConfig = field(default_factory=StreamConfig)
    providers: tuple[ProviderConfig, ...] = ()


@dataclass(frozen=True)
class ControlConfig:
    """``[control]``: the socket path, and the group that owns it and may use it
    (``""``: the daemon's own group)."""

    socket: str = "/run/voxgate/control.sock"
    group: str = ""


@dataclass(frozen=True)
class WebSocketConfig:
    listen: str = ""
    path: str = "/media"
    max_message_bytes: int = field(default=65_536, metadata=_range(1024, 16 << 20))
    max_messages_per_s: int = field(default=200, metadata=_range(10, 100_000))


@dataclass(frozen=True)
class AlsaLineConfig:
    """One ``[[alsa.lines]]`` entry: an analog or intercom line on a sound device."""

    name: str = ""
    capture: str = ""
    playback: str = ""
    rate: int = 8000
    period_ms: int = field(default=20, metadata=_range(10, 100))
    tenant: str = ""
    mode: str = "always"


@dataclass(frozen=True)
class AlsaConfig:
    lines: tuple[AlsaLineConfig, ...] = ()
    retry_initial_s: float = field(default=1.0, metadata=_range(0.1, 600))
    retry_max_s: float = field(default=30.0, metadata=_range(0.1, 3600))


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    target: str = "auto"


@dataclass(frozen=True)
class WatchdogConfig:
    max_loop_lag_ms: int = field(default=500, metadata=_range(10, 60_000))
    test_block_s: float = field(default=0.0, metadata=_range(0, 600))


@dataclass(frozen=True)
class RecordsConfig:
    """``[records]``: call records (SQLite), their retention, and optional recordings."""

    path: str = "/var/lib/voxgate/calls.sqlite3"
    keep_days: float = field(default=90.0, metadata=_range(0, 36_500))
    max_rows: int = field(default=1_000_000, metadata=_range(0, 1_000_000_000))
    queue_size: int = field(default=10_000, metadata=_range(100, 1_000_000))
    cost_per_minute: float = field(default=0.0, metadata=_range(0, 1_000_000))
    recordings_dir: str = ""
    recordings_max_bytes: int = field(default=1 << 30, metadata=_range(1 << 20, 1 << 44))
    recording_buffer_ms: int = field(default=5000, metadata=_range(1000, 600_000))


@dataclass(frozen=True)
class PostCallConfig:
    """``[postcall]``: ``call.completed`` jobs POSTed to ``webhook`` ("" = none)."""

    webhook: str = ""
    workers: int = field(default=2, metadata=_range(1, 64))
    max_pending: int = field(default=10_000, metadata=_range(1, 10_000_000))
    max_attempts: int = field(default=8, metadata=_range(1, 100))
    backoff_initial_s: float = field(default=1.0, metadata=_range(0.01, 3600))
    backoff_max_s: float = field(default=300.0, metadata=_range(0.01, 86_400))
    timeout_s: float = field(default=10.0, metadata=_range(0.1, 600))


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration; ``source`` is the file it came from."""

    sip: SipConfig = field(default_factory=SipConfig)
    rtp: RtpConfig = field(default_factory=RtpConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timers: TimersConfig = field(default_factory=TimersConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    alsa: AlsaConfig = field(default_factory=AlsaConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    postcall: PostCallConfig = field(default_factory=PostCallConfig)
    tenants: tuple[TenantConfig, ...] = ()
    source: str = "<embedded default>"
    sip_credentials: tuple[Credential, ...] = ()
    """The entries of ``[sip] auth_credentials_file``, read when the file is loaded."""
    registration_credentials: tuple[tuple[Credential, ...], ...] = ()
    """The entries of each ``[[sip.registrations]]`` credentials_file, in their order
    (empty for an entry without one)."""
    outbound_credentials: tuple[Credential, ...] = ()
    """The entries of ``[sip] outbound_credentials_file`` (none when it is "")."""


RECOGNIZER_RSS_BYTES = 160 << 20
"""What one local-agent recogniser worker is expected to hold resident (~140 MiB measured)."""


def rss_limits(config: Config) -> tuple[int, int]:
    """The (soft, hard) RSS watermarks in bytes: ``[budget]``, or derived.

    A key left at 0 is derived from ``[limits] max_sessions`` (see
    :func:`voxgate.budget.default_rss_limits`: 64 MiB + 512 KiB per session
    for soft, 1.25 x soft for hard), plus :data:`RECOGNIZER_RSS_BYTES` per
    ``[agent] recognizers`` when a local agent runs (its worker processes'
    RSS counts as the daemon's).
    """
    from voxgate.budget import default_rss_limits

    workers_bytes = config.agent.recognizers * RECOGNIZER_RSS_BYTES if _runs_local(config) else 0
    derived = default_rss_limits(config.limits.max_sessions)
    soft = config.budget.rss_soft_bytes or derived.soft_bytes + workers_bytes
    hard = config.budget.rss_hard_bytes or max(derived.hard_bytes + workers_bytes,
                                               soft + (soft >> 2))
    return soft, hard


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raises ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ipaddress.ip_address(host)
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, number


def load_config(path: Path) -> Config:
    """Read and validate ``path``. Raises ConfigError naming the file and key."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], source: str) -> Config:
    """Validate an already-decoded TOML document (see :func:`load_config`)."""
    sections: dict[str, Any] = {}
    section_types = {
        f.name: f.default_factory
        for f in dataclasses.fields(Config)
        if f.name not in ("source", "tenants", "sip_credentials", "registration_credentials",
                          "outbound_credentials")
    }
    for name, value in data.items():
        if name == "tenants":
            sections[name] = _parse_tenants(value, source)
            continue
        if name not in section_types:
            raise ConfigError(f"{source}: [{name}]: unknown section")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}]: must be a table")
        sections[name] = _parse_section(section_types[name], name, value, source)
    config = Config(**sections, source=source)
    _check_consistency(config)
    if config.sip.auth_credentials_file:
        config = dataclasses.replace(config, sip_credentials=_read_sip_credentials(config))
    if config.sip.registrations:
        count = len(config.sip.registrations)
        config = dataclasses.replace(config, registration_credentials=tuple(
            _read_registration_credentials(config, i) for i in range(count)))
    if config.sip.outbound_credentials_file:
        config = dataclasses.replace(config, outbound_credentials=_read_one_user_credentials(
            config.sip.outbound_credentials_file,
            f"{config.source}: [sip] outbound_credentials_file: "
            f"{config.sip.outbound_credentials_file}"))
    return config


MAX_CREDENTIALS_FILE_BYTES = 1 << 20


def _read_sip_credentials(config: Config) -> tuple[Credential, ...]:
    """``[sip] auth_credentials_file``'s entries; raises ConfigError naming the key and
    the file (see :func:`_read_credentials_file`), or an HA1 for another realm."""
    path = Path(config.sip.auth_credentials_file)
    where = f"{config.source}: [sip] auth_credentials_file: {path}"
    entries = _read_credentials_file(path, where)
    for entry in entries:
        if entry.realm is not None and entry.realm != config.sip.auth_realm:
            raise ConfigError(f"{where}: the HA1 of {entry.username!r} is for realm "
                              f"{entry.realm!r}, not [sip] auth_realm {config.sip.auth_realm!r}")
    return entries


def _read_registration_credentials(config: Config, index: int) -> tuple[Credential, ...]:
    """The entries of ``[[sip.registrations]]`` #``index + 1``'s credentials_file (none
    when it is ""); one username only, else ConfigError (and see
    :func:`_read_credentials_file`)."""
    name = config.sip.registrations[index].credentials_file
    if not name:
        return ()
    where = f"{config.source}: [[sip.registrations]] #{index + 1} credentials_file: {name}"
    return _read_one_user_credentials(name, where)


def _read_one_user_credentials(name: str, where: str) -> tuple[Credential, ...]:
    """A credentials file holding one username's entries (a client's); else
    ConfigError starting with ``where`` (and see :func:`_read_credentials_file`)."""
    entries = _read_credentials_file(Path(name), where)
    if len({entry.username for entry in entries}) > 1:
        raise ConfigError(f"{where}: must hold one user's credentials")
    return entries


def _read_credentials_file(path: Path, where: str) -> tuple[Credential, ...]:
    """A credentials file's entries; raises ConfigError starting with ``where`` when it
    is missing, unreadable, readable or writable by "other", too large, or malformed
    (see :func:`voxgate.sip.digest.parse_credentials`)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the load
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{where}: must be a regular file")
            if mode & 0o007:
                raise ConfigError(f"{where}: must not be accessible to others "
                                  f"(mode {stat.S_IMODE(mode):04o}; chmod o-rwx)")
            data = f.read(MAX_CREDENTIALS_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from e
    if len(data) > MAX_CREDENTIALS_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CREDENTIALS_FILE_BYTES} bytes")
    try:
        entries = parse_credentials(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8") from e
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e
    return entries


def _parse_tenants(value: Any, source: str) -> tuple[TenantConfig, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: [[tenants]]: must be an array of tables")
    tenants = tuple(
        _parse_section(TenantConfig, f"tenants.{i}", t, source) for i, t in enumerate(value)
    )
    names = [t.name for t in tenants]
    for i, tenant in enumerate(tenants):
        where = f"{source}: [[tenants]] #{i + 1} name"
        if not tenant.name or not tenant.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: must be a non-empty word (letters, digits, - and _)")
        if tenant.name == "default" or names.count(tenant.name) > 1:
            raise ConfigError(f"{where}: {tenant.name!r} is reserved or used twice")
        if bool(tenant.header_name) != bool(tenant.header_value):
            raise ConfigError(f"{source}: [[tenants]] {tenant.name} header_name: "
                              "header_name and header_value go together")
        try:
            parse_networks(tenant.source_cidrs)
        except ValueError as e:
            raise ConfigError(f"{source}: [[tenants]] {tenant.name} source_cidrs: {e}") from e
    return tenants


def _parse_section(cls: Any, section: str, values: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{source}: [{section}] {key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key")
        if (section, key) == ("alsa", "lines"):
            kwargs[key] = _parse_lines(value, source)
            continue
        nested = _NESTED.get((cls, key))
        if nested is not None:
            kwargs[key] = nested(value, f"{section}.{key}", source)
            continue
        kwargs[key] = _check_value(fields[key], value, where)
    return cls(**kwargs)


def _parse_lines(value: Any, source: str) -> tuple[AlsaLineConfig, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: [[alsa.lines]]: must be an array of tables")
    lines = tuple(
        _parse_section(AlsaLineConfig, f"alsa.lines.{i}", t, source) for i, t in enumerate(value)
    )
    names = [line.name for line in lines]
    for i, line in enumerate(lines):
        where = f"{source}: [[alsa.lines]] #{i + 1}"
        if not line.name or names.count(line.name) > 1:
            raise ConfigError(f"{where} name: must be set and unique")
        if not line.capture or not line.playback:
            raise ConfigError(f"{where} capture/playback: both ALSA PCM names are needed")
        if line.rate not in (8000, 16000):
            raise ConfigError(f"{where} rate: must be 8000 or 16000, got {line.rate}")
        if line.mode not in ("always", "on-demand"):
            raise ConfigError(f"{where} mode: must be \"always\" or \"on-demand\"")
    return lines


def _parse_table(cls: Any, section: str, value: Any, source: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{section}]: must be a table")
    return _parse_section(cls, section, value, source)


def _parse_tables(cls: Any, section: str, value: Any, source: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: [[{section}]]: must be an array of tables")
    return tuple(_parse_section(cls, f"{section}.{i}", t, source) for i, t in enumerate(value))


def _parse_menu(value: Any, section: str, source: str) -> Menu:
    """``[agent.menu]``; without ``steps`` its keys apply to the built-in example menu."""
    menu: Menu = _parse_table(Menu, section, value, source)
    if "steps" not in value:
        menu = dataclasses.replace(BUILTIN_MENU, **{key: getattr(menu, key) for key in value})
    problem = menu_problem(menu)
    if problem is not None:
        raise ConfigError(f"{source}: [{section}] {problem}")
    return menu


_NESTED: dict[tuple[type, str], Any] = {
    (SipConfig, "registrations"):
        lambda v, sec, src: _parse_tables(RegistrationConfig, sec, v, src),
    (AgentConfig, "webhook"): lambda v, sec, src: _parse_table(WebhookConfig, sec, v, src),
    (AgentConfig, "menu"): _parse_menu,
    (AgentConfig, "stream"): lambda v, sec, src: _parse_table(StreamConfig, sec, v, src),
    (AgentConfig, "providers"): lambda v, sec, src: _parse_tables(ProviderConfig, sec, v, src),
    (Menu, "steps"): lambda v, sec, src: _parse_tables(Step, sec, v, src),
    (Step, "choices"): lambda v, sec, src: _parse_tables(Choice, sec, v, src),
}
"""(section class, key) → parser of a nested table or array of tables under it."""
_VOICE = re.compile(r"[A-Za-z0-9_+\-]+\Z")


def _check_value(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: must be a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
    elif isinstance(default, tuple) and default and isinstance(default[0], float):
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: must be a non-empty list of numbers")
        value = tuple(float(v) for v in value)
    elif isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        value = tuple(value)
    lo_hi = f.metadata.get("range")
    if lo_hi is not None and not lo_hi[0] <= value <= lo_hi[1]:
        lo, hi = (int(x) if float(x).is_integer() else x for x in lo_hi)
        raise ConfigError(f"{where}: must be between {lo} and {hi}, got {value}")
    return value


def _check_stream_listeners(sip: SipConfig, src: str) -> None:
    """``[sip] listen_tcp``/``listen_tls`` are HOST:PORT; TLS needs its PEM files."""
    for key in ("listen_tcp", "listen_tls"):
        value = getattr(sip, key)
        if value:
            try:
                split_host_port(value)
            except ValueError as e:
                raise ConfigError(f"{src}: [sip] {key}: {e}, got {value!r}") from e
    if sip.listen_tls and not (sip.tls_certificate and sip.tls_private_key):
        raise ConfigError(f"{src}: [sip] tls_certificate/tls_private_key: both PEM files "
                          "are needed with listen_tls")


def _check_consistency(config: Config) -> None:
    src = config.source
    try:
        split_host_port(config.sip.listen)
    except ValueError as e:
        raise ConfigError(f"{src}: [sip] listen: {e}, got {config.sip.listen!r}") from e
    if config.sip.advertise:
        try:
            split_host_port(config.sip.advertise)
        except ValueError as e:
            raise ConfigError(f"{src}: [sip] advertise: {e}, got {config.sip.advertise!r}") from e
    _check_stream_listeners(config.sip, src)
    if config.rtp.advertise:
        try:
            ipaddress.ip_address(config.rtp.advertise)
        except ValueError as e:
            raise ConfigError(f"{src}: [rtp] advertise: must be an IP address") from e
    try:
        parse_networks(config.sip.trusted_cidrs)
    except ValueError as e:
        raise ConfigError(f"{src}: [sip] trusted_cidrs: {e}") from e
    if not re.fullmatch(r"[\x20-\x7e]{1,64}", config.sip.auth_realm) or any(
            c in config.sip.auth_realm for c in '"\\'):
        raise ConfigError(f"{src}: [sip] auth_realm: 1-64 printable ASCII characters "
                          "without quotes or backslashes")
    _check_registrations(config.sip, src)
    if not _CONTACT_USER.match(config.sip.outbound_from_user):
        raise ConfigError(f"{src}: [sip] outbound_from_user: 1-64 letters, digits and . _ ~ + -")
    algorithms = config.sip.auth_algorithms
    if not algorithms or len(set(algorithms)) < len(algorithms) or not set(algorithms) <= set(
            DIGEST_ALGORITHMS):
        raise ConfigError(f"{src}: [sip] auth_algorithms: a non-empty list of "
                          f"{', '.join(map(repr, DIGEST_ALGORITHMS))}, each at most once")
    try:
        ipaddress.ip_address(config.rtp.address)
    except ValueError as e:
        raise ConfigError(f"{src}: [rtp] address: must be an IP address") from e
    if config.rtp.port_min > config.rtp.port_max:
        raise ConfigError(f"{src}: [rtp] port_min: must not be above port_max")
    if config.rtp.port_max - config.rtp.port_min < 1:
        raise ConfigError(f"{src}: [rtp] port_max: the range must hold at least one even port")
    if not config.rtp.codecs or any(c not in CODECS for c in config.rtp.codecs):
        raise ConfigError(f"{src}: [rtp] codecs: must be a non-empty list of {', '.join(CODECS)}")
    if config.rtp.srtp not in SRTP_MODES:
        raise ConfigError(f"{src}: [rtp] srtp: must be one of {', '.join(SRTP_MODES)}, "
                          f"got {config.rtp.srtp!r}")
    if config.rtp.jitter_buffer_max_ms <= config.rtp.jitter_buffer_ms:
        raise ConfigError(f"{src}: [rtp] jitter_buffer_max_ms: must be above jitter_buffer_ms")
    if config.vad.start_ms % 20 or config.vad.stop_ms % 20:
        raise ConfigError(f"{src}: [vad] start_ms/stop_ms: must be multiples of 20 ms")
    _check_endpointing(config, src)
    soft, hard = rss_limits(config)
    if soft >= hard:
        raise ConfigError(f"{src}: [budget] rss_soft_bytes: must be below rss_hard_bytes "
                          f"({soft} >= {hard})")
    jitter_bytes = config.rtp.jitter_buffer_max_ms * 8
    if config.budget.session_bytes < jitter_bytes:
        raise ConfigError(f"{src}: [budget] session_bytes: must hold at least the jitter "
                          f"buffer ({jitter_bytes} bytes for [rtp] jitter_buffer_max_ms)")
    _check_agent(config.agent, src)
    _check_providers(config, src)
    if config.websocket.listen:
        try:
            split_host_port(config.websocket.listen)
        except ValueError as e:
            raise ConfigError(f"{src}: [websocket] listen: {e}, "
                              f"got {config.websocket.listen!r}") from e
        if not config.websocket.path.startswith("/"):
            raise ConfigError(f"{src}: [websocket] path: must start with /")
    if config.alsa.retry_initial_s > config.alsa.retry_max_s:
        raise ConfigError(f"{src}: [alsa] retry_initial_s: must not be above retry_max_s")
    if config.metrics.listen:
        try:
            split_host_port(config.metrics.listen)
        except ValueError as e:
            raise ConfigError(f"{src}: [metrics] listen: {e}, got {config.metrics.listen!r}") from e
    if config.postcall.webhook and not config.postcall.webhook.startswith(("http://",
                                                                         "https://")):
        raise ConfigError(f"{src}: [postcall] webhook: must be an http:// or https:// URL")
    if config.postcall.webhook and not config.records.path:
        raise ConfigError(f"{src}: [postcall] webhook: post-call jobs are kept in the records "
                          "database: set [records] path")
    if config.postcall.backoff_initial_s > config.postcall.backoff_max_s:
        raise ConfigError(f"{src}: [postcall] backoff_initial_s: must not be above backoff_max_s")
    if config.log.level not in LOG_LEVELS:
        raise ConfigError(f"{src}: [log] level: must be one of {', '.join(LOG_LEVELS)}")
    if config.log.target not in LOG_TARGETS:
        raise ConfigError(f"{src}: [log] target: must be one of {', '.join(LOG_TARGETS)}")


_CONTACT_USER = re.compile(r"[A-Za-z0-9._~+-]{1,64}\Z")


def _check_registrations(sip: SipConfig, src: str) -> None:
    """Registrar ``sip:IP[:port]`` (names are not resolved), AOR ``sip:user@host``, a
    plain contact user, retry_initial_s ≤ retry_max_s, each (registrar, aor) once, and a
    Contact address a registrar can reach (not 0.0.0.0 or ::)."""
    if sip.registrations and ipaddress.ip_address(sip.advertised_host_port[0]).is_unspecified:
        raise ConfigError(f"{src}: [sip] advertise: [[sip.registrations]] register "
                          f"sip:USER@{sip.advertise or sip.listen}: set advertise to the "
                          "address the registrar reaches us at")
    seen: set[tuple[str, str]] = set()
    for i, reg in enumerate(sip.registrations):
        where = f"{src}: [[sip.registrations]] #{i + 1}"
        try:
            registrar = parse_uri_untrusted(reg.registrar)
            ipaddress.ip_address(registrar.host)
            if registrar.scheme != "sip" or registrar.user is not None or registrar.headers:
                raise ValueError
        except (RemoteProtocolError, ValueError) as e:
            raise ConfigError(f"{where} registrar: must be sip:IP[:port] (an IP address, no "
                              f"user part), got {reg.registrar!r}") from e
        try:
            aor = parse_uri_untrusted(reg.aor)
            if aor.scheme != "sip" or not aor.user or aor.params or aor.headers:
                raise ValueError
        except (RemoteProtocolError, ValueError) as e:
            raise ConfigError(f"{where} aor: must be sip:user@domain, got {reg.aor!r}") from e
        if not _CONTACT_USER.match(reg.contact_user_or_aor):
            raise ConfigError(f"{where} contact_user: 1-64 letters, digits and . _ ~ + -")
        if reg.retry_initial_s > reg.retry_max_s:
            raise ConfigError(f"{where} retry_initial_s: must not be above retry_max_s")
        if (reg.registrar, reg.aor) in seen:
            raise ConfigError(f"{where} aor: {reg.aor!r} is registered with "
                              f"{reg.registrar!r} twice")
        seen.add((reg.registrar, reg.aor))


def _check_agent(agent: AgentConfig, src: str) -> None:
    if agent.kind not in AGENT_KINDS:
        raise ConfigError(f"{src}: [agent] kind: must be one of {', '.join(AGENT_KINDS)}")
    if not _VOICE.match(agent.voice):
        raise ConfigError(f"{src}: [agent] voice: an espeak-ng voice name (letters, digits, "
                          f"+ - _), got {agent.voice!r}")
    if agent.plugin and agent.webhook.all_urls:
        raise ConfigError(f"{src}: [agent] plugin: set either plugin or [agent.webhook] url/urls")
    if agent.plugin and agent.plugin.count(":") != 1:
        raise ConfigError(f"{src}: [agent] plugin: must be \"module:callable\"")
    _check_webhook(agent, src)


def _runs_local(config: Config) -> bool:
    """Whether ``[agent]`` or a tenant runs the local agent."""
    return "local" in {config.agent.kind} | {tenant.agent for tenant in config.tenants}


def _check_endpointing(config: Config, src: str) -> None:
    agent, stop_ms = config.agent, config.vad.stop_ms
    if agent.endpoint_check_ms % 20 or agent.endpoint_max_ms % 20:
        raise ConfigError(f"{src}: [agent] endpoint_check_ms/endpoint_max_ms: must be "
                          "multiples of 20 ms")
    if (_runs_local(config) and agent.endpoint_check_ms
            and not agent.endpoint_check_ms < stop_ms <= agent.endpoint_max_ms):
        raise ConfigError(f"{src}: [agent] endpoint_check_ms: endpoint_check_ms < [vad] stop_ms "
                          f"<= endpoint_max_ms is needed, got {agent.endpoint_check_ms} < "
                          f"{stop_ms} <= {agent.endpoint_max_ms}")


def _check_webhook(agent: AgentConfig, src: str) -> None:
    webhook = agent.webhook
    key = "url" if webhook.url else "urls"
    if webhook.url and webhook.urls:
        raise ConfigError(f"{src}: [agent.webhook] urls: set either url or urls")
    for url in webhook.all_urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{src}: [agent.webhook] {key}: must be an http:// or https:// "
                              f"URL, got {url!r}")
        if webhook.all_urls.count(url) > 1:
            raise ConfigError(f"{src}: [agent.webhook] urls: {url!r} is listed twice")
    taken = sorted(set(webhook.names) & {p.name for p in agent.providers})
    if taken:
        raise ConfigError(f"{src}: [[agent.providers]] name: {', '.join(taken)} is the name "
                          f"of an [agent.webhook] URL in metrics and voxgatectl")


def _check_providers(config: Config, src: str) -> None:
    providers = config.agent.providers
    names = [p.name for p in providers]
    for i, provider in enumerate(providers):
        where = f"{src}: [[agent.providers]] #{i + 1}"
        if not provider.name or provider.name in names[:i]:
            raise ConfigError(f"{where} name: must be set and unique")
        if not provider.url.startswith(("ws://", "wss://")):
            raise ConfigError(f"{where} url: must be a ws:// or wss:// URL, got {provider.url!r}")
        if provider.protocol not in STREAM_PROTOCOLS:
            raise ConfigError(f"{where} protocol: must be one of {', '.join(STREAM_PROTOCOLS)}")
        if provider.sample_rate_hz not in (8000, 16000):
            raise ConfigError(f"{where} sample_rate_hz: must be 8000 or 16000")
    shares = config.agent.stream.ramp_shares
    if any(not 0 < s <= 1 for s in shares) or list(shares) != sorted(shares) or shares[-1] != 1:
        raise ConfigError(f"{src}: [agent.stream] ramp_shares: rising shares in (0, 1] that "
                          f"end with 1, got {list(shares)}")
    kinds = {config.agent.kind} | {t.agent for t in config.tenants if t.agent}
    for tenant in config.tenants:
        where = f"{src}: [[tenants]] {tenant.name}"
        if tenant.agent and tenant.agent not in AGENT_KINDS:
            raise ConfigError(f"{where} agent: must be one of {', '.join(AGENT_KINDS)}")
        unknown = [n for n in tenant.providers if n not in names]
        if unknown:
            raise ConfigError(f"{where} providers: no [[agent.providers]] named "
                              f"{', '.join(unknown)}")
    if "stream" in kinds and not providers:
        raise ConfigError(f"{src}: [[agent.providers]]: the stream agent needs at least one")
