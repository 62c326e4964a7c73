"""
Configuration: TOML text in, one frozen L{Config} out.

Every key is optional; unknown sections or keys, wrong types and bad values
raise L{ConfigError} with one line naming the key and the problem.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from smtpplus.model import EventType


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


EVENT_TYPES = tuple(t.value for t in EventType)
FREQUENCIES = ("immediate", "hourly", "daily", "off")


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


def format_port_list(ports: tuple[int, ...] | list[int]) -> str:
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


@attrs.frozen
class ServerConfig:
    hostname: str
    state_dir: str


@attrs.frozen
class SMTPConfig:
    listen: str
    ports_spec: str
    ports: tuple[int, ...]
    tls_ports_spec: str
    tls_ports: tuple[int, ...]
    require_all_ports: bool
    auth_requires_tls: bool
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    idle_timeout: int


@attrs.frozen
class TLSConfig:
    certificate: str
    private_key: str
    profile: str = "intermediate"


@attrs.frozen
class DeliveryConfig:
    mode: str
    smarthost: str
    smarthost_username: str
    smarthost_password: str = attrs.field(repr=False)
    smarthost_tls: str
    dns_servers: tuple[str, ...]
    max_concurrency: int
    rate_limit: float
    retry_schedule: tuple[int, ...]
    max_queue_lifetime: int


@attrs.frozen
class AdminConfig:
    listen: str
    port: int
    token: str = attrs.field(repr=False)
    tls: bool = False


@attrs.frozen
class NotificationsConfig:
    recipients: tuple[str, ...]
    webhook_url: str
    delivery_delay_threshold: int
    templates_dir: str
    frequency: Mapping[str, str]


@attrs.frozen
class SecurityConfig:
    auth_failures_per_ip: int
    auth_failures_per_user: int
    auth_lock_seconds: int


@attrs.frozen
class Config:
    """The whole daemon configuration, validated."""

    server: ServerConfig
    smtp: SMTPConfig
    tls: TLSConfig
    delivery: DeliveryConfig
    admin: AdminConfig
    notifications: NotificationsConfig
    security: SecurityConfig


def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


# Validators take the raw TOML value (already type-checked) and return the
# value to store, raising ValueError with a reason.
def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative(value: int | float) -> int | float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}")
        return value

    return check


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _smarthost(value: str) -> str:
    return _hostport(value) if value else value


def _dns_servers(value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError("must be a list of \"host\" or \"host:port\" strings")
    for item in value:
        if ":" in item and item.count(":") == 1:
            _hostport(item)
    return tuple(value)


def _string_list(value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(item, str) for item in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _retry_schedule(value: list[Any]) -> tuple[int, ...]:
    if not value:
        raise ValueError("must list at least one interval")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError("must be a list of positive integers (seconds)")
    return tuple(value)


def _frequency(value: dict[str, Any]) -> Mapping[str, str]:
    merged = dict(_DEFAULT_FREQUENCY)
    for key, setting in value.items():
        if key not in EVENT_TYPES:
            raise ValueError(f"unknown event type {key!r}")
        if setting not in FREQUENCIES:
            raise ValueError(f"{key} must be one of {', '.join(FREQUENCIES)}")
        merged[key] = setting
    return MappingProxyType(merged)


def _url(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


_DEFAULT_FREQUENCY = {name: "immediate" for name in EVENT_TYPES}

# section -> key -> (type, default, validator or None).  A default of None is
# computed at load time.
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any, Callable[[Any], Any] | None]]] = {
    "server": {
        "hostname": (str, None, _nonempty),
        "state_dir": (str, "var", _nonempty),
    },
    "smtp": {
        "listen": (str, "0.0.0.0", _nonempty),
        "ports": (str, "23,25,26,587,1025-5000", parse_port_spec),
        "tls_ports": (str, "", parse_port_spec),
        "require_all_ports": (bool, False, None),
        "auth_requires_tls": (bool, True, None),
        "max_message_size": (int, 26214400, _positive),
        "max_recipients": (int, 1000, _positive),
        "max_connections": (int, 2000, _positive),
        "max_connections_per_ip": (int, 100, _positive),
        "idle_timeout": (int, 300, _positive),
    },
    "tls": {
        "certificate": (str, "", None),
        "private_key": (str, "", None),
        "profile": (str, "intermediate", _one_of("intermediate", "compatible")),
    },
    "delivery": {
        "mode": (str, "mx", _one_of("mx", "smarthost")),
        "smarthost": (str, "", _smarthost),
        "smarthost_username": (str, "", None),
        "smarthost_password": (str, "", None),
        "smarthost_tls": (str, "opportunistic", _one_of("opportunistic", "required", "none")),
        "dns_servers": (list, [], _dns_servers),
        "max_concurrency": (int, 20, _positive),
        "rate_limit": ((int, float), 0, _non_negative),
        "retry_schedule": (list, [60, 300, 900, 3600, 14400], _retry_schedule),
        "max_queue_lifetime": (int, 432000, _positive),
    },
    "admin": {
        "listen": (str, "127.0.0.1", _nonempty),
        "port": (int, 8025, _port),
        "token": (str, "", None),
        "tls": (bool, False, None),
    },
    "notifications": {
        "recipients": (list, [], _string_list),
        "webhook_url": (str, "", _url),
        "delivery_delay_threshold": (int, 3600, _positive),
        "templates_dir": (str, "", None),
        "frequency": (dict, {}, _frequency),
    },
    "security": {
        "auth_failures_per_ip": (int, 10, _positive),
        "auth_failures_per_user": (int, 10, _positive),
        "auth_lock_seconds": (int, 900, _positive),
    },
}

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "a list", dict: "a table"}


def _check_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _section_values(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    for section, table in data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"[{section}]: unknown section")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: must be a table")
        for key in table:
            if key not in _SCHEMA[section]:
                raise ConfigError(f"[{section}] {key}: unknown key")

    result: dict[str, dict[str, Any]] = {}
    for section, keys in _SCHEMA.items():
        table = data.get(section, {})
        values = {}
        for key, (kind, default, validate) in keys.items():
            raw = table.get(key, default)
            if raw is None:
                raw = _fqdn()
            if not _check_type(raw, kind):
                kinds = kind if isinstance(kind, tuple) else (kind,)
                wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
                raise ConfigError(f"[{section}] {key}: must be {wanted}, not {raw!r}")
            if validate is not None:
                try:
                    raw = validate(raw)
                except ValueError as e:
                    raise ConfigError(f"[{section}] {key}: {e}") from None
            values[key] = raw
        result[section] = values
    return result


def config_from_text(text: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """
    Build a L{Config} from TOML text, with optional C{{section: {key: value}}}
    overrides applied before validation (the command-line options).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    for section, keys in (overrides or {}).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"[{section}]: must be a table")
        data[section].update(keys)
    v = _section_values(data)
    smtp = v["smtp"]
    delivery = v["delivery"]
    if delivery["mode"] == "smarthost" and not delivery["smarthost"]:
        raise ConfigError('[delivery] smarthost: must be "host:port" when mode = "smarthost"')
    raw_smtp = data.get("smtp", {})
    return Config(
        server=ServerConfig(**v["server"]),
        smtp=SMTPConfig(
            listen=smtp["listen"],
            ports_spec=raw_smtp.get("ports", _SCHEMA["smtp"]["ports"][1]),
            ports=smtp["ports"],
            tls_ports_spec=raw_smtp.get("tls_ports", ""),
            tls_ports=smtp["tls_ports"],
            require_all_ports=smtp["require_all_ports"],
            auth_requires_tls=smtp["auth_requires_tls"],
            max_message_size=smtp["max_message_size"],
            max_recipients=smtp["max_recipients"],
            max_connections=smtp["max_connections"],
            max_connections_per_ip=smtp["max_connections_per_ip"],
            idle_timeout=smtp["idle_timeout"],
        ),
        tls=TLSConfig(**v["tls"]),
        delivery=DeliveryConfig(**delivery),
        admin=AdminConfig(**v["admin"]),
        notifications=NotificationsConfig(**v["notifications"]),
        security=SecurityConfig(**v["security"]),
    )


def load_config(path: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read and validate the TOML file at C{path}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    return config_from_text(text, overrides)
