"""Agent configuration: TOML in, frozen dataclasses out, every key optional and every mistake named.

`/etc/edge-agent/agent.toml` by default. Unknown keys and values of the wrong type or range are
rejected with the key's dotted name and what was expected. Each key's rule is declared on its field
with the wire contract's schema machinery (`checked(positive, default=...)`), the rules that relate two
keys in the `__post_init__` of their table. Secrets are never in this file: the MQTT password and TLS
key are files (a relative name is looked up in systemd's $CREDENTIALS_DIRECTORY).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefleet.credentials import credential_path, read_secret
from edgefleet.errors import ConfigError
from edgefleet.protocol.schema import (
    NAME_RULE,
    all_of,
    at_most,
    check_portable_name,
    checked,
    each,
    field_check,
    fraction,
    non_negative,
    positive,
)
from edgefleet.protocol.topics import DEFAULT_PREFIX, check_prefix
from edgefleet.transport import MqttSettings, check_broker_url, parse_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/edge-agent/agent.toml")


def _default_device_id() -> str:
    # a fully qualified host name's dots become '-': a name is a topic level, and some brokers split at '.'
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-_") or "device"
    return host[:64]


def _name(value: str) -> str | None:
    """A device or group name: a topic level every supported broker takes, and a path component."""
    return f"{value!r} must be {NAME_RULE}" if check_portable_name(value) else None


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"expected 1-65535, got {value}"


def _host(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]", value):
        return None
    return f"{value!r} is not a host name, IPv4 address or [IPv6] address"


# Hard limits of what consumes a value: MQTT's keep alive is 16 bits, and the validation child's
# address-space limit (bytes, a signed 64-bit value) and the interpreter's thread count must fit.
_KEEPALIVE = all_of(positive, at_most(65535))
_MEMORY_MB = all_of(positive, at_most(1 << 20))
_THREADS = all_of(positive, at_most(1024))


@dataclass(frozen=True)
class MqttConfig:
    """How the agent reaches its broker; no url means the agent runs without one."""

    url: str | None = checked(check_broker_url, default=None)
    """`mqtt://host[:port]` or `mqtts://host[:port]`; unset runs the agent from local installs only."""
    urls: tuple[str, ...] | None = checked(each(check_broker_url), default=None)
    """Several brokers of one fleet (the nodes of a cluster), all mqtt:// or all mqtts://, instead of `url`:
    tried in this order, and a connection that fails or ends moves on to the next, in turn, with the
    reconnect backoff. `url` then reads as the first of them."""
    prefix: str = checked(check_prefix, default=DEFAULT_PREFIX)
    """Topic prefix shared with the host tools."""
    client_id: str | None = None
    """MQTT client id; defaults to the device id. The shipped broker config forces every device's client id
    to its user name (its device id; `use_username_as_clientid`), so that one device's credential cannot
    take over another's session: any other value has no effect there."""
    username: str | None = None
    """Broker user name; defaults to the device id, which the shipped ACL and identity binding expect. With
    a client certificate whose CN the broker takes as the identity (`use_identity_as_username`), the CN
    must be the device id and this name is ignored by the broker."""
    password_file: Path | None = None
    """File holding the password; a relative name is looked up in $CREDENTIALS_DIRECTORY."""
    ca_file: Path | None = None
    """CA bundle to verify the broker (mqtts://); system CAs when unset."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS."""
    key_file: Path | None = None
    """Client private key for mutual TLS; relative names are looked up in $CREDENTIALS_DIRECTORY."""
    keepalive_s: int = checked(_KEEPALIVE, default=30)
    """MQTT keepalive: a broker that stops answering is detected within 1.5x this."""
    reconnect_min_s: float = checked(positive, default=1.0)
    """First reconnect delay."""
    reconnect_max_s: float = checked(positive, default=60.0)
    """Cap of the exponential reconnect backoff."""
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT version: auto speaks 5 and falls back to 3.1.1 when the broker refuses it."""

    def __post_init__(self) -> None:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError("mqtt.reconnect_min_s: must not exceed mqtt.reconnect_max_s")
        if self.urls is not None:
            if not self.urls:
                raise ConfigError("mqtt.urls: expected at least one broker url (or leave mqtt.urls out)")
            if self.url is not None and self.url != self.urls[0]:
                raise ConfigError("mqtt.url: set mqtt.url or mqtt.urls, not both (mqtt.urls lists every broker)")
            if len({parse_url(u)[0] for u in self.urls}) > 1:
                raise ConfigError("mqtt.urls: mixes mqtt:// and mqtts://; every broker of a fleet takes the same one")
            if len(set(self.urls)) < len(self.urls):
                raise ConfigError("mqtt.urls: lists a url twice")
            object.__setattr__(self, "url", self.urls[0])

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """Every broker url, in the order they are tried; empty without a broker."""
        return self.urls or ((self.url,) if self.url is not None else ())

    def settings(self, device_id: str) -> MqttSettings:
        """The transport's settings from this table; reads the password file (ConfigError when unreadable).

        The user name and client id default to the device id: the shipped broker config knows a device by
        that one name (ACL patterns on the user name, client id bound to the user name)."""
        if self.url is None:
            raise ConfigError("mqtt.url: not set")
        return MqttSettings(
            url=self.url,
            fallback_urls=self.broker_urls[1:],
            username=self.username if self.username is not None else device_id,
            password=read_secret(self.password_file) if self.password_file else None,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=credential_path(self.key_file) if self.key_file else None,
            keepalive=self.keepalive_s,
            reconnect_min_s=self.reconnect_min_s,
            reconnect_max_s=self.reconnect_max_s,
            client_id=self.client_id or device_id,
            protocol=self.protocol,
        )


@dataclass(frozen=True)
class SecurityConfig:
    """Which documents the agent trusts, and limits that bound what a document can make it do."""

    trusted_keys: tuple[Path, ...] = ()
    """Ed25519 public keys (PEM) whose signatures are accepted; list two during a key rotation."""
    require_signature: bool = True
    """Deprecated: `false` is accepted only together with `insecure = true`, which it then repeats."""
    insecure: bool = False
    """Accept what cannot be verified (unsigned or untargeted documents, no trusted key, plain MQTT,
    a network API without a token). Off: the agent refuses to start without a trusted key when MQTT
    or the API is enabled. On: said at start, in status, telemetry and /metrics (`edgefleet_insecure`)."""
    max_artifact_bytes: int = checked(positive, default=256 << 20)
    """Largest model or golden artifact accepted."""
    max_chunks: int = checked(positive, default=8192)
    """Most chunks per artifact."""
    max_clock_skew_s: int = checked(non_negative, default=300)
    """How far in the future a document's issued_at may be before it is refused as not yet valid."""
    max_disk_fraction: float = checked(fraction, default=0.9)
    """Refuse a download that would fill the state filesystem beyond this fraction."""
    download_stall_s: float = checked(positive, default=120.0)
    """A download that receives no chunk for this long fails (it resumes later from what it has)."""
    max_timestamp_age_s: float | None = checked(positive, default=None)
    """Unset: a valid signed timestamp is fresh until its own expiry. Set: also stale once its
    issued_at is older than this (tighter than what the operator signed)."""

    def __post_init__(self) -> None:
        # One meaning for both keys, so code that reads either one cannot fail open: `require_signature
        # = false` alone would accept unsigned documents without the agent ever saying it is insecure.
        if not self.require_signature and not self.insecure:
            raise ConfigError("security.require_signature: false is accepted only with security.insecure = true "
                              "(require_signature is deprecated: set insecure = true instead)")
        if self.insecure:
            object.__setattr__(self, "require_signature", False)


@dataclass(frozen=True)
class RuntimeConfig:
    """The interpreter backend used to validate and serve models."""

    backend: Literal["auto", "litert", "tflite", "tensorflow"] = "auto"
    """auto: LiteRT, then tflite-runtime, then TensorFlow's interpreter."""
    num_threads: int | None = checked(_THREADS, default=None)
    """Interpreter threads; unset lets the backend decide."""
    use_xnnpack: bool = True
    """Apply the default XNNPACK delegate (validation uses the same setting as serving)."""
    keep_previous_loaded: bool = True
    """Keep the version a new one replaced loaded while it is the rollback target: it answers by version
    and by label (`stable` during probation) and a rollback swaps it back without loading."""
    keep_previous_max_mb: float = checked(positive, default=256.0)
    """Largest model file kept loaded beside the active one; a bigger previous version is not kept."""


@dataclass(frozen=True)
class ValidationConfig:
    """The child process that tries a model before it is activated."""

    timeout_s: float = checked(positive, default=60.0)
    """Kill the validation child after this long."""
    memory_mb: int = checked(_MEMORY_MB, default=1024)
    """Address-space limit of the validation child."""
    latency_runs: int = checked(positive, default=50)
    """Invocations timed to measure the new model's latency."""
    max_latency_ms: float | None = checked(positive, default=None)
    """Reject a model whose validation p95 latency is above this."""


@dataclass(frozen=True)
class HealthConfig:
    """Probation: how long a new model is watched and what makes it roll back."""

    probation_s: float = checked(non_negative, default=60.0)
    """How long a newly activated model is watched before it is committed."""
    min_requests: int = checked(non_negative, default=20)
    """Requests needed before error rate and latency are judged (fewer: judged on what there is)."""
    max_error_rate: float = checked(fraction, default=0.05)
    """Roll back when more than this fraction of requests fail."""
    max_latency_ratio: float = checked(positive, default=1.5)
    """Roll back when p95 latency exceeds this times the previous model's p95."""
    latency_slack_ms: float = checked(non_negative, default=1.0)
    """...and exceeds it by more than this many ms too (microsecond-scale models are all noise)."""
    hang_timeout_s: float = checked(positive, default=10.0)
    """An invocation running longer than this is hung."""
    max_boot_failures: int = checked(positive, default=2)
    """Restarts of the agent during probation after which the new model is rolled back."""
    max_updates_per_hour: int = checked(positive, default=12)
    """Update attempts per model per hour; more are put off (not refused), so a stream of bad
    deployments cannot keep the board downloading and validating."""


@dataclass(frozen=True)
class ShadowConfig:
    """Shadow probation, for deployments whose signed policy asks for it: the defaults of its policy
    fields (a signed threshold can only tighten these) and the bounds of the work it may cost."""

    sample_rate: float = checked(fraction, default=0.2)
    """Share of live requests copied to the candidate."""
    min_samples: int = checked(positive, default=200)
    """Compared requests needed before the candidate may be activated."""
    min_agreement: float = checked(fraction, default=0.98)
    """Share of compared requests on which the candidate must agree with the active model."""
    atol: float | None = checked(non_negative, default=None)
    """Absolute tolerance per output value for outputs that are not class scores (None: the model's golden
    tolerance per output)."""
    rtol: float | None = checked(non_negative, default=None)
    """Relative tolerance, as `atol`."""
    max_latency_ratio: float = checked(positive, default=1.5)
    """The candidate's median invoke time over the active model's, at most..."""
    latency_slack_ms: float = checked(non_negative, default=1.0)
    """...unless it is no more than this many ms slower (microsecond-scale models are all noise)."""
    window_s: float = checked(positive, default=600.0)
    """Longest time to collect `min_samples`; not enough traffic by then rejects the candidate."""
    queue_size: int = checked(all_of(positive, at_most(1024)), default=16)
    """Sampled requests waiting for the candidate; more are dropped, never waited for."""


@dataclass(frozen=True)
class StoreConfig:
    """On-disk model store."""

    keep_blobs: int = checked(non_negative, default=4)
    """Artifacts kept per model beyond the active and previous ones (older ones are pruned)."""
    max_models: int = checked(positive, default=64)
    """Model names this agent keeps a record of; a signed document for one more is refused."""


@dataclass(frozen=True)
class DriftConfig:
    """Input drift: live inputs and outputs compared with the calibration data the bundle carries
    (docs/operations.md, "Input drift"). Models whose bundle has no drift reference are not watched."""

    enabled: bool = True
    """Watch the inputs and outputs of models whose bundle carries a drift reference."""
    sample_rate: float = checked(fraction, default=0.1)
    """Share of successful requests whose inputs and outputs are binned (off the request path)."""
    window: int = checked(all_of(positive, at_most(100_000)), default=400)
    """Sampled instances a score covers at most: the most recent ones (older ones leave in eighths)."""
    min_samples: int = checked(positive, default=200)
    """Sampled instances the window must hold before a score is judged: under no drift the PSI of n
    samples over 10 bins averages about 9/n, so 200 keeps that noise near 0.05, far below 0.25."""
    threshold: float = checked(positive, default=0.25)
    """A score at or above this raises a DRIFT event; it recovers below 0.8 x this."""

    def __post_init__(self) -> None:
        if self.min_samples > self.window:
            raise ConfigError(f"drift.min_samples: {self.min_samples} is more than drift.window ({self.window}), "
                              "so no score would ever be judged")


@dataclass(frozen=True)
class TelemetryConfig:
    """Periodic metrics on MQTT and /metrics."""

    interval_s: float = checked(positive, default=10.0)
    """Seconds between telemetry messages."""
    window_s: float = checked(positive, default=60.0)
    """Latency percentiles cover this many recent seconds."""
    logs: bool = True
    """Publish the agent's log records of `logs_level` and above on `P/devices/{id}/logs` (with MQTT only),
    and the most recent ones as the retained `P/devices/{id}/logs/recent` (`edgectl logs`)."""
    logs_level: Literal["warning", "error", "critical"] = "warning"
    """The least severe records published (records below `log_level` are never made at all)."""
    logs_per_s: float = checked(positive, default=10.0)
    """Records published per second on average (a token bucket); the rest are counted and reported as
    one "N log records suppressed" record."""
    logs_burst: int = checked(all_of(positive, at_most(1000)), default=50)
    """Records that may go out at once after a quiet spell (the bucket's size)."""
    logs_recent: int = checked(all_of(non_negative, at_most(1000)), default=100)
    """Records kept in the retained recent-records document; 0 publishes none (only live records)."""


@dataclass(frozen=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery: the device and its sensors appear in Home Assistant by themselves."""

    discovery: bool = False
    """Publish retained discovery messages (the device, its figures and one set per model) on connect."""
    prefix: str = checked(check_prefix, default="homeassistant")
    """Home Assistant's discovery prefix (its MQTT integration's setting); the broker's ACL must let the
    device write `PREFIX/+/DEVICE_ID/#`."""


@dataclass(frozen=True)
class ApiConfig:
    """The local inference API."""

    socket: Path | None = Path("/run/edge-agent/api.sock")
    """Unix socket path; unset disables it."""
    port: int | None = checked(_port, default=None)
    """TCP port on `host` (8501 is TensorFlow Serving's); unset disables it."""
    host: str = "127.0.0.1"
    """Address of the TCP listener."""
    max_body_bytes: int = checked(positive, default=16 << 20)
    """Largest request body accepted."""
    admin_socket: Path | None = Path("admin.sock")
    """Unix socket of the admin actions (install, rollback, status), mode 0600: only the agent's own
    user and root may use it. A relative name is taken beside `socket` (and disables it when `socket`
    is disabled); "" disables admin actions over the API."""
    max_inflight_bytes: int = checked(positive, default=64 << 20)
    """Request bodies of all connections together may hold at most this many bytes; a request that
    would go above it is answered 503 before its body is read. TCP requests get at most half."""
    max_connections: int = checked(positive, default=64)
    """Open connections per listener (the Unix socket and TCP each have their own)."""
    max_connections_per_peer: int = checked(positive, default=16)
    """Open TCP connections from one client address."""
    idle_timeout_s: float = checked(positive, default=60.0)
    """A connection that starts no request for this long is closed."""
    header_timeout_s: float = checked(positive, default=10.0)
    """A request head must arrive whole within this many seconds of its first byte."""
    body_timeout_s: float = checked(positive, default=60.0)
    """A request body must arrive whole within this many seconds of its head."""
    allowed_hosts: tuple[str, ...] = checked(each(_host), default=())
    """Host header values (without port) the TCP listener accepts besides localhost, 127.0.0.1, [::1]
    and `host`; any other Host is refused, so a web page cannot reach the API by DNS rebinding."""
    token_file: Path | None = None
    """File holding a bearer token every TCP request must send (`Authorization: Bearer ...`); a
    relative name is looked up in $CREDENTIALS_DIRECTORY. The Unix sockets are guarded by their modes."""

    def __post_init__(self) -> None:
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ConfigError("api.max_inflight_bytes: must be at least api.max_body_bytes")

    def admin_socket_path(self) -> Path | None:
        """Where the admin socket is, with a relative name resolved beside `socket`; None when disabled."""
        if self.admin_socket is None or self.admin_socket.is_absolute():
            return self.admin_socket
        if self.socket is None:
            return None
        return self.socket.parent / self.admin_socket


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration."""

    device_id: str = checked(_name, default_factory=_default_device_id)
    """This device's id (topic level and default MQTT client id); defaults to the host name."""
    groups: tuple[str, ...] = checked(each(_name), default=())
    """Groups whose deployments this device follows."""
    state_dir: Path = Path("/var/lib/edge-agent")
    """Models, partial downloads and state.json."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log verbosity."""
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    api: ApiConfig = field(default_factory=ApiConfig)

    def __post_init__(self) -> None:
        if self.homeassistant.discovery and not re.fullmatch(r"[A-Za-z0-9_-]+", self.device_id):
            # the device id is the node id of every discovery topic, which Home Assistant matches as
            # [a-zA-Z0-9_-]+, and the broker's ACL pins it to the device's user name, so it cannot be rewritten
            raise ConfigError(f"homeassistant.discovery: device_id {self.device_id!r} contains '.'; Home Assistant "
                              "discovery needs a device id of letters, digits, '_' and '-'")


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if inner is Path and value == "":
            return None  # an empty path switches the feature off (e.g. api.socket = "")
        return _convert(key, inner, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table [{key}], got {type(value).__name__}")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{full}: unknown key")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(key, hints[name], value)
        check = field_check(fields[name])
        problem = check(converted) if check is not None and converted is not None else None
        if problem:
            raise ConfigError(f"{key}: {problem}")
        kwargs[name] = converted
    return cls(**kwargs)


def parse_config(text: str, *, source: str = "config") -> AgentConfig:
    """Build the configuration from TOML text; raise ConfigError naming the key that is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    config: AgentConfig = _build(AgentConfig, data)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> AgentConfig:
    """Read the configuration file; a missing default file means all defaults, a missing explicit one is an error."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        if path is None:
            return AgentConfig()
        raise ConfigError(f"{p}: no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read: {err}") from err
    return parse_config(text, source=str(p))


def describe(config: AgentConfig) -> dict[str, Any]:
    """The effective configuration as plain data (for `check-config --json` and logs)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(config)  # type: ignore[no-any-return]


# --- fail closed: the checks `check-config` prints and `edge-agent run` refuses to start on ---------

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_loopback(host: str) -> bool:
    """True for names and addresses that never leave the board (no DNS lookup: a name could lie)."""
    import ipaddress

    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_file(key: str, path: Path, problems: list[str], *, secret: bool = False) -> bytes | None:
    """The bytes of a file the config names, or None after adding one line saying why not."""
    p = credential_path(path) if secret else path
    hint = ""
    if secret and not p.is_absolute() and not os.environ.get("CREDENTIALS_DIRECTORY"):
        hint = (" (a relative name is a systemd credential id, found in $CREDENTIALS_DIRECTORY, which is not set"
                " here: the unit's LoadCredential= sets it)")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        problems.append(f"{key}: {p}: no such file{hint}")
        return None
    except IsADirectoryError:
        problems.append(f"{key}: {p} is a directory, not a file")
        return None
    except OSError as err:
        problems.append(f"{key}: cannot read {p}: {err.strerror}{hint}")
        return None
    if not data.strip():
        problems.append(f"{key}: {p} is empty")
        return None
    return data


def _check_trusted_key(key: str, path: Path, problems: list[str]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgefleet.protocol.signing import PUBLIC_KEY_FILE

    p = path / PUBLIC_KEY_FILE if path.is_dir() else path  # as Keyring.from_files reads it
    data = _read_file(key, p, problems)
    if data is None:
        return
    if b"PRIVATE KEY-----" in data:
        # a signing key copied to a board is a leaked signing key, and it verifies nothing
        problems.append(f"{key}: {p} is a private key; list its public key (.pub)")
        return
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        problems.append(f"{key}: {p} is not a PEM public key (expected edgefleet.pub from `edgectl keygen`)")
        return
    if not isinstance(public, Ed25519PublicKey):
        problems.append(f"{key}: {p} is not an Ed25519 public key")


def _check_tls_files(mqtt: MqttConfig, problems: list[str]) -> None:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    if mqtt.ca_file is not None:
        data = _read_file("mqtt.ca_file", mqtt.ca_file, problems)
        if data is not None:
            try:
                x509.load_pem_x509_certificates(data)
            except ValueError:
                problems.append(f"mqtt.ca_file: {mqtt.ca_file} holds no PEM certificate")
    if (mqtt.cert_file is None) != (mqtt.key_file is None):
        given, missing = ("cert_file", "key_file") if mqtt.key_file is None else ("key_file", "cert_file")
        problems.append(f"mqtt.{given}: set without mqtt.{missing}; mutual TLS needs both")
        return
    if mqtt.cert_file is None or mqtt.key_file is None:
        return
    cert_pem = _read_file("mqtt.cert_file", mqtt.cert_file, problems)
    key_pem = _read_file("mqtt.key_file", mqtt.key_file, problems, secret=True)
    cert = key = None
    if cert_pem is not None:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            problems.append(f"mqtt.cert_file: {mqtt.cert_file} is not a PEM certificate")
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            problems.append(f"mqtt.key_file: {credential_path(mqtt.key_file)} is encrypted; the agent needs it "
                            "unencrypted (systemd's LoadCredentialEncrypted= protects it at rest)")
        except (ValueError, UnsupportedAlgorithm):
            problems.append(f"mqtt.key_file: {credential_path(mqtt.key_file)} is not a PEM private key")
    if cert is not None and key is not None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            problems.append(f"mqtt.key_file: {credential_path(mqtt.key_file)} does not match the certificate "
                            f"{mqtt.cert_file}")


def security_problems(config: AgentConfig) -> list[str]:
    """Everything that would make the agent insecure or unable to start, one line each; empty when fine.

    `edge-agent check-config` prints these and `edge-agent run` refuses to start on any of them. Every
    file the configuration names is read and parsed here as the agent would use it, so a broken key
    or certificate is found before the service starts rather than by a restart loop. Combinations
    that expose the board are refused unless `security.insecure = true` says they are meant.
    """
    problems: list[str] = []
    sec, mqtt, api = config.security, config.mqtt, config.api
    insecure = sec.insecure
    fix = "or set security.insecure = true for a test setup"

    for i, path in enumerate(sec.trusted_keys):
        _check_trusted_key(f"security.trusted_keys[{i}]", path, problems)
    inputs = [k for k, v in (("mqtt.url", mqtt.url), ("api.socket", api.socket), ("api.port", api.port),
                             ("api.admin_socket", api.admin_socket_path())) if v is not None]
    if not sec.trusted_keys and inputs and not insecure:
        reaches = inputs[0] if len(inputs) == 1 else f"{', '.join(inputs[:-1])} or {inputs[-1]}"
        problems.append(f"security.trusted_keys: no trusted key, so any bundle that reaches {reaches} "
                        f"would install unsigned; list the fleet's public key (edgefleet.pub from `edgectl keygen`) "
                        f"{fix}")

    if mqtt.url is not None:
        key = "mqtt.url" if mqtt.urls is None else "mqtt.urls"
        tls = parse_url(mqtt.url)[0]  # one scheme for all of mqtt.urls
        remote = next((u for u in mqtt.broker_urls if not _is_loopback(parse_url(u)[1])), None)
        if not tls:
            if mqtt.ca_file is not None or mqtt.cert_file is not None or mqtt.key_file is not None:
                problems.append(f"{key}: {mqtt.url} is plain TCP but TLS files are set (mqtt.ca_file, cert_file, "
                                "key_file); use mqtts://")
            # Loopback is allowed, password or not (a broker or bridge on the board itself): the bytes
            # never leave the board, and whoever could read them there can read the password file too.
            # Refusing it would push such boards to `insecure`, which also stops signature checks.
            elif remote is not None and not insecure:
                exposed = ("the password in mqtt.password_file would cross the network in clear text"
                           if mqtt.password_file is not None else "anyone on the way can read and alter the traffic")
                problems.append(f"{key}: {remote} is plain TCP to another host, so {exposed}; use mqtts:// {fix}")
        if mqtt.password_file is not None:
            _read_file("mqtt.password_file", mqtt.password_file, problems, secret=True)
        _check_tls_files(mqtt, problems)

    if api.token_file is not None:
        _read_file("api.token_file", api.token_file, problems, secret=True)
    if api.port is not None and api.token_file is None and not _is_loopback(api.host) and not insecure:
        problems.append(f"api.host: {api.host} puts the inference API on the network with no api.token_file, so "
                        f"anyone who reaches port {api.port} can use it; set api.token_file, use 127.0.0.1 {fix}")
    return problems


def insecure_warning(config: AgentConfig) -> str | None:
    """The line the agent says loudly when it runs with `security.insecure = true`, else None."""
    if not config.security.insecure:
        return None
    keys = "no trusted key" if not config.security.trusted_keys else "signatures not enforced"
    return (f"security.insecure = true ({keys}): unsigned and untargeted documents are accepted, so anyone who "
            "can publish to this device's topics or reach its API can change the model it runs")
