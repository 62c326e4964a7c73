"""
Configuration: TOML text in, one frozen L{Config} out.

Each key is declared once, as an attrs field of its section's class: its
default, the TOML types it takes, the check of its value and the converter
to the stored form.  One loader walks C{attrs.fields()}; every unknown key,
wrong type and bad value it finds becomes one line of L{ConfigError}, each
naming the key and the problem.

The checks describe what a user may write in the file.  Objects built in
code (tests binding port 0, for one) are not checked again.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs
import idna

from smtpplus.address import parse_mailbox
from smtpplus.model import EventType


class ConfigError(ValueError):
    """
    Configuration values are wrong: one line per problem, each naming the key.

    @ivar errors: the lines, in the order found.
    """

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


EVENT_TYPES = tuple(t.value for t in EventType)
FREQUENCIES = ("immediate", "hourly", "daily", "off")

# Below this many characters a configured admin token is named in a warning.
MIN_TOKEN_LENGTH = 16
# More SMTP processes than this only add memory: each serves every port.
MAX_WORKERS = 64


def parse_port_spec(spec: str) -> tuple[int, ...]:
    """
    Parse C{"23,25,1025-5000"} into a sorted tuple of unique ports.

    An empty or blank spec means no ports.
    """
    if not spec.strip():
        return ()
    ports: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in port list {spec!r}")
        low_text, sep, high_text = item.partition("-")
        low = _port_number(low_text, item)
        high = _port_number(high_text, item) if sep else low
        if high < low:
            raise ValueError(f"range {item!r} ends before it starts")
        ports.update(range(low, high + 1))
    return tuple(sorted(ports))


def _port_number(text: str, item: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ValueError(f"{item!r} is not a port number or range")
    number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 1-65535")
    return number


def format_port_list(ports: Iterable[int]) -> str:
    """Render ports as a compact spec: C{[25, 26, 27, 587]} -> C{"25-27,587"}."""
    parts = []
    ordered = sorted(ports)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# Checks take the raw TOML value (its type already checked) and raise
# ValueError with the reason; what they return is ignored.
def _positive(value: int) -> None:
    if value <= 0:
        raise ValueError("must be greater than 0")


def _non_negative(value: float) -> None:
    if value < 0:
        raise ValueError("must not be negative")


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}")

    return check


def _worker_count(value: int) -> None:
    if not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"must be 0 (one per CPU core) to {MAX_WORKERS}")


_NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def _node_name(value: str) -> None:
    # Empty: the hostname.  Shown in the admin API and kept in the claims.
    if value and not _NODE_NAME_RE.fullmatch(value):
        raise ValueError("must be letters, digits, '.', '_' and '-' (up to 253), starting with a letter or digit")


def _nonempty(value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty")


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _hostname(value: str) -> None:
    # The name goes verbatim into the banner, EHLO, Received: and the
    # generated certificate, where only the ASCII (A-label) form is valid
    # without SMTPUTF8: a Unicode name is refused with the form to write.
    _nonempty(value)
    ascii_name = value
    if not value.isascii():
        try:
            ascii_name = idna.encode(value, uts46=True).decode("ascii")
        except idna.IDNAError:
            ascii_name = ""
    if len(ascii_name) > 253 or not _HOSTNAME_RE.fullmatch(ascii_name):
        raise ValueError(f"{value!r} is not a valid host name (letters, digits and hyphens in dot-separated labels)")
    if ascii_name != value:
        raise ValueError(f"{value!r} is not ASCII: write it as {ascii_name!r}")


def _listen_address(value: str) -> None:
    # Twisted binds a host name by resolving it once to one IPv4 address,
    # which is rarely what was meant; "localhost" is the one name kept, as
    # the admin API's loopback test already knows it.
    _nonempty(value)
    if value == "localhost":
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f'{value!r} is not an IPv4 or IPv6 address (or "localhost")') from None


def _port(value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")


def _hostport(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")


def _smarthost(value: str) -> None:
    if value:
        _hostport(value)


def _dns_servers(value: list[Any]) -> None:
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError('must be a list of "host" or "host:port" strings')
    for item in value:
        if item.count(":") == 1:
            _hostport(item)


def _retry_schedule(value: list[Any]) -> None:
    if not value:
        raise ValueError("must list at least one interval")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError("must be a list of positive integers (seconds)")


def _recipients(value: list[Any]) -> None:
    if not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    for item in value:
        if parse_mailbox(item) is None:
            raise ValueError(f"{item!r} is not an email address")


def _url(value: str) -> None:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")


def _directory(value: str) -> None:
    if value and not os.path.isdir(value):
        reason = "is not a directory" if os.path.exists(value) else "no such directory"
        raise ValueError(f"{value}: {reason}")


def _check_frequency(value: dict[str, Any]) -> None:
    for key, setting in value.items():
        if key not in EVENT_TYPES:
            raise ValueError(f"unknown event type {key!r}")
        if setting not in FREQUENCIES:
            raise ValueError(f"{key} must be one of {', '.join(FREQUENCIES)}")


def _frequency(value: Mapping[str, str]) -> Mapping[str, str]:
    """Every event type's frequency: the ones given over the defaults."""
    merged = {name: "immediate" for name in EVENT_TYPES}
    merged.update(value)
    return MappingProxyType(merged)


def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


_META = "smtpplus.config"
_KINDS: dict[type, tuple[type, ...]] = {str: (str,), bool: (bool,), int: (int,), tuple: (list,), dict: (dict,)}
_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "a list", dict: "a table"}


@attrs.frozen
class _Key:
    """How one field is read from TOML; C{name} is empty when it is the attribute's."""

    name: str
    kinds: tuple[type, ...]
    check: Callable[[Any], object] | None


def _key(
    default: Any,
    check: Callable[[Any], object] | None = None,
    *,
    kinds: tuple[type, ...] | None = None,
    converter: Callable[[Any], Any] | None = None,
    name: str = "",
    secret: bool = False,
) -> Any:
    """
    One configuration key as an attrs field.  C{kinds} are the TOML types it
    takes (by default the default's), C{check} raises ValueError on a bad
    value, C{converter} makes the stored form, C{name} is the key in the
    file when it differs from the attribute's.
    """
    if kinds is None:
        kinds = _KINDS[type(default)]
    return attrs.field(
        default=default, converter=converter, repr=not secret, metadata={_META: _Key(name, kinds, check)}
    )


@attrs.frozen
class ServerConfig:
    """C{[server]}."""

    hostname: str = _key(attrs.Factory(_fqdn), _hostname, kinds=(str,))
    state_dir: str = _key("var", _nonempty)
    workers: int = _key(0, _worker_count)
    node_name: str = _key("", _node_name)

    def node(self) -> str:
        """This node's name among those sharing a PostgreSQL store: C{node_name}, else the hostname."""
        return self.node_name or self.hostname

    def worker_processes(self) -> int:
        """How many SMTP processes C{workers} means here: 0 is one per CPU core this process may use."""
        if self.workers:
            return self.workers
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@attrs.frozen
class SMTPConfig:
    """C{[smtp]}; C{ports} and C{tls_ports} are the parsed port specs."""

    listen: str = _key("0.0.0.0", _listen_address)
    ports_spec: str = _key("23,25,26,587,1025-5000", parse_port_spec, name="ports")
    tls_ports_spec: str = _key("", parse_port_spec, name="tls_ports")
    require_all_ports: bool = _key(False)
    auth_requires_tls: bool = _key(True)
    max_message_size: int = _key(26214400, _positive)
    max_recipients: int = _key(1000, _positive)
    max_connections: int = _key(2000, _positive)
    max_connections_per_ip: int = _key(100, _positive)
    idle_timeout: int = _key(300, _positive)
    ports: tuple[int, ...] = attrs.field(init=False, repr=False)
    tls_ports: tuple[int, ...] = attrs.field(init=False, repr=False)

    @ports.default
    def _parse_ports(self) -> tuple[int, ...]:
        return parse_port_spec(self.ports_spec)

    @tls_ports.default
    def _parse_tls_ports(self) -> tuple[int, ...]:
        return parse_port_spec(self.tls_ports_spec)


@attrs.frozen
class TLSConfig:
    """C{[tls]}; the files are checked by L{smtpplus.smtp.tls.check_tls_files}."""

    certificate: str = _key("")
    private_key: str = _key("")
    profile: str = _key("intermediate", _one_of("intermediate", "compatible"))


@attrs.frozen
class DeliveryConfig:
    """C{[delivery]}."""

    mode: str = _key("mx", _one_of("mx", "smarthost"))
    smarthost: str = _key("", _smarthost)
    smarthost_username: str = _key("")
    smarthost_password: str = _key("", secret=True)
    smarthost_tls: str = _key("opportunistic", _one_of("opportunistic", "required", "none"))
    dns_servers: tuple[str, ...] = _key((), _dns_servers, converter=tuple)
    max_concurrency: int = _key(20, _positive)
    rate_limit: float = _key(0, _non_negative, kinds=(int, float))
    retry_schedule: tuple[int, ...] = _key((60, 300, 900, 3600, 14400), _retry_schedule, converter=tuple)
    max_queue_lifetime: int = _key(432000, _positive)
    dedup_window: int = _key(86400, _non_negative)
    # Contract section 8: on by default, a new protection on purpose.
    suppress_hard_bounces: bool = _key(True)


@attrs.frozen
class AdminConfig:
    """C{[admin]}."""

    listen: str = _key("127.0.0.1", _listen_address)
    port: int = _key(8025, _port)
    token: str = _key("", secret=True)
    tls: bool = _key(False)


@attrs.frozen
class NotificationsConfig:
    """C{[notifications]}."""

    recipients: tuple[str, ...] = _key((), _recipients, converter=tuple)
    webhook_url: str = _key("", _url)
    webhook_secret: str = _key("", secret=True)
    message_webhooks: bool = _key(False)
    delivery_delay_threshold: int = _key(3600, _positive)
    templates_dir: str = _key("", _directory)
    frequency: Mapping[str, str] = _key(MappingProxyType({}), _check_frequency, kinds=(dict,), converter=_frequency)


@attrs.frozen
class SecurityConfig:
    """C{[security]}."""

    auth_failures_per_ip: int = _key(10, _positive)
    auth_failures_per_user: int = _key(10, _positive)
    auth_lock_seconds: int = _key(900, _positive)


LOG_LEVELS = ("debug", "info", "warn", "error")


@attrs.frozen
class LogConfig:
    """C{[log]}: how each line is written and the least level written."""

    format: str = _key("text", _one_of("text", "json"))
    level: str = _key("info", _one_of(*LOG_LEVELS))


STORAGE_BACKENDS = ("sqlite", "postgresql")
# Below this a node's heartbeat could not keep its lease on a busy database.
MIN_LEASE_SECONDS = 5
def _dsn_syntax(value: str) -> None:
    if not value:
        return
    from psycopg import conninfo  # the daemon needs it only with PostgreSQL

    try:
        conninfo.conninfo_to_dict(value)
    except Exception:
        # libpq's reason may quote the string, password and all.
        raise ValueError('is not a libpq connection string ("host=... dbname=...") or URI ("postgresql://...")') from None


def _at_least_lease(value: int) -> None:
    if value < MIN_LEASE_SECONDS:
        raise ValueError(f"must be at least {MIN_LEASE_SECONDS}")


@attrs.frozen
class StorageConfig:
    """C{[storage]}: where users, the queue, events and statistics are kept (contract section 5)."""

    backend: str = _key("sqlite", _one_of(*STORAGE_BACKENDS))
    dsn: str = _key("", _dsn_syntax, secret=True)
    lease_seconds: int = _key(30, _at_least_lease)


def _dsn_given(storage: StorageConfig) -> None:
    if storage.backend == "postgresql" and not storage.dsn:
        raise ConfigError('[storage] dsn: required with backend = "postgresql" (e.g. "postgresql://user:pass@host/db")')


@attrs.frozen
class Config:
    """The whole daemon configuration, validated; one field per TOML section."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    smtp: SMTPConfig = attrs.field(factory=SMTPConfig)
    tls: TLSConfig = attrs.field(factory=TLSConfig)
    delivery: DeliveryConfig = attrs.field(factory=DeliveryConfig)
    admin: AdminConfig = attrs.field(factory=AdminConfig)
    notifications: NotificationsConfig = attrs.field(factory=NotificationsConfig)
    security: SecurityConfig = attrs.field(factory=SecurityConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)


def _smtp_ports_apart(smtp: SMTPConfig) -> None:
    both = set(smtp.ports) & set(smtp.tls_ports)
    if both:
        raise ConfigError(
            f"[smtp] tls_ports: {format_port_list(both)} also in [smtp] ports; a port is either STARTTLS or implicit TLS"
        )


def _smarthost_given(delivery: DeliveryConfig) -> None:
    if delivery.mode == "smarthost" and not delivery.smarthost:
        raise ConfigError('[delivery] smarthost: must be "host:port" when mode = "smarthost"')


# Checks that look at several keys of a section, run once its keys are valid.
_SECTION_CHECKS: dict[type, Callable[[Any], None]] = {
    SMTPConfig: _smtp_ports_apart,
    DeliveryConfig: _smarthost_given,
    StorageConfig: _dsn_given,
}

SectionChecks = Mapping[type, Callable[[Any], None]]

# TOML section name -> its class, in the order errors are reported.
_SECTIONS: dict[str, type] = {field.name: field.type for field in attrs.fields(attrs.resolve_types(Config))}


def _is_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _load_section(
    cls: type, section: str, table: Mapping[str, Any], checks: Iterable[Callable[[Any], None]]
) -> tuple[Any, list[str]]:
    """Build section class C{cls} from its TOML C{table}: (the object or None, the error lines)."""
    fields = {(f.metadata[_META].name or f.name): f for f in attrs.fields(cls) if f.init}
    errors = [f"[{section}] {key}: unknown key" for key in table if key not in fields]
    values = {}
    for key, field in fields.items():
        if key not in table:
            continue
        raw, spec = table[key], field.metadata[_META]
        if not _is_kind(raw, spec.kinds):
            wanted = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in spec.kinds)
            errors.append(f"[{section}] {key}: must be {wanted}, not {raw!r}")
            continue
        if spec.check is not None:
            try:
                spec.check(raw)
            except ValueError as e:
                errors.append(f"[{section}] {key}: {e}")
                continue
        values[field.name] = raw
    if errors:
        return None, errors
    built = cls(**values)
    for check in checks:
        try:
            check(built)
        except ConfigError as e:
            errors.extend(e.errors)
    return built, errors


def _config_from_data(data: Mapping[str, Any], checks: SectionChecks | None = None) -> Config:
    """
    Build a L{Config} from parsed TOML; C{checks} adds a check per section
    class (one raising L{ConfigError}), run when that section's keys are valid.

    @raise ConfigError: with every problem found, one line each.
    """
    errors = [f"[{section}]: unknown section" for section in data if section not in _SECTIONS]
    built = {}
    for section, cls in _SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            errors.append(f"[{section}]: must be a table")
            continue
        section_checks = [c for c in (_SECTION_CHECKS.get(cls), (checks or {}).get(cls)) if c is not None]
        built[section], section_errors = _load_section(cls, section, table, section_checks)
        errors.extend(section_errors)
    if errors:
        raise ConfigError(*errors)
    return Config(**built)


def config_from_text(
    text: str, overrides: Mapping[str, Mapping[str, Any]] | None = None, checks: SectionChecks | None = None
) -> Config:
    """
    Build a L{Config} from TOML text, with optional C{{section: {key: value}}}
    overrides (the command-line options) applied before validation.

    @raise ConfigError: with every problem found, one line each.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    for section, keys in (overrides or {}).items():
        table = data.setdefault(section, {})
        if isinstance(table, dict):
            table.update(keys)
    return _config_from_data(data, checks)


def load_config(
    path: str, overrides: Mapping[str, Mapping[str, Any]] | None = None, checks: SectionChecks | None = None
) -> Config:
    """Read and validate the TOML file at C{path}, like L{config_from_text}."""
    return config_from_text(read_config_file(path), overrides, checks)


def read_config_file(path: str) -> str:
    """The text of the configuration file at C{path}; L{ConfigError} when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None


def config_warnings(config: Config) -> list[str]:
    """Values that work but deserve a line at start: one line each, naming the key."""
    warnings = []
    token = config.admin.token
    if token and len(token) < MIN_TOKEN_LENGTH:
        warnings.append(
            f"[admin] token: {len(token)} characters is easy to guess; use at least {MIN_TOKEN_LENGTH}"
            " (or leave it empty to have one generated)"
        )
    hostname = config.server.hostname
    if "." not in hostname or hostname.lower() == "localhost.localdomain":
        # Other servers see the name in EHLO and Received: and many refuse
        # or score down a bare or localhost one; the default, getfqdn(),
        # is exactly that on a machine whose name resolves to 127.0.0.1.
        warnings.append(
            f"[server] hostname: {hostname!r} is not a fully qualified domain name (it is the EHLO name,"
            " the banner and the Received: host; when unset, the machine's FQDN);"
            ' set it in the config file, e.g. [server] hostname = "mail.example.com"'
        )
    notifications = config.notifications
    if notifications.message_webhooks and not notifications.webhook_url:
        warnings.append("[notifications] message_webhooks: true has no effect without webhook_url")
    if notifications.webhook_secret and not notifications.webhook_url:
        warnings.append("[notifications] webhook_secret: set, but there is no webhook_url to sign for")
    return warnings
