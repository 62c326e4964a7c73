"""
The twistd plugin's entry points: L{Options} parses and validates, and
L{makeService} builds the whole service tree.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import admin_service, admin_token
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.login import build_login_service
from smtpplus.auth.store import SQLiteUserStore
from smtpplus.auth.throttle import LoginThrottle
from smtpplus.config import Config, ConfigError, TLSConfig, config_from_text, config_warnings, load_config
from smtpplus.delivery.queue import ACTIVE, SQLiteQueueStore
from smtpplus.delivery.service import build_delivery
from smtpplus.delivery.threads import reactor_runner
from smtpplus.metrics import HealthCheck, daemon_metrics
from smtpplus.notify.dispatch import build_notifier
from smtpplus.notify.events import EventStore
from smtpplus.notify.stats import Statistics
from smtpplus.smtp.listeners import BindError, SMTPListeners, raise_open_files_limit
from smtpplus.smtp.protocol import SessionRegistry, SessionSettings, SMTPServerFactory
from smtpplus.smtp.tls import check_tls_files, server_context
from smtpplus.storage.database import Database, DatabaseService

log = Logger()

# Sessions still receiving or storing a message get this long after SIGTERM;
# twistd must exit within 10 s.
DRAIN_SECONDS = 7.0


def _fail(*lines: str) -> NoReturn:
    """
    Stop start-up with one line on stderr per problem.  A UsageError would
    make twistd print its whole usage text first; the contract wants one
    clear line.
    """
    sys.stderr.writelines(f"smtpplus: {line}\n" for line in lines)
    raise SystemExit(1)


class Options(usage.Options):
    """C{twistd smtpplus} options: a TOML file and a few overrides of it."""

    optParameters = [
        ["config", "c", None, "TOML configuration file (every key optional)."],
        ["ports", None, None, 'Override [smtp] ports, e.g. "25,587,2525-2530".'],
        ["state-dir", None, None, "Override [server] state_dir."],
        ["admin-port", None, None, "Override [admin] port."],
    ]

    def postOptions(self) -> None:
        """
        Read and check the whole configuration, the TLS files included,
        before anything is written to state_dir; every problem found is one
        line on stderr, then twistd exits 1.
        """
        errors: list[str] = []
        overrides: dict[str, dict[str, Any]] = {}
        if self["ports"] is not None:
            overrides.setdefault("smtp", {})["ports"] = self["ports"]
        if self["state-dir"] is not None:
            overrides.setdefault("server", {})["state_dir"] = self["state-dir"]
        if self["admin-port"] is not None:
            if self["admin-port"].isdigit():
                overrides.setdefault("admin", {})["port"] = int(self["admin-port"])
            else:
                errors.append(f"--admin-port: {self['admin-port']!r} is not a port number")
        checks = {TLSConfig: check_tls_files}
        try:
            if self["config"] is None:
                config = config_from_text("", overrides, checks)
            else:
                config = load_config(self["config"], overrides, checks)
        except ConfigError as e:
            errors.extend(e.errors)
        if errors:
            _fail(*(f"configuration error: {line}" for line in errors))
        self.config: Config = config


class DaemonService(MultiService):
    """
    The root of the tree.  Children start in order and stop one after the
    other in reverse, so that listeners close and sessions drain before the
    stores they write to go away.
    """

    def privilegedStartService(self) -> None:
        try:
            MultiService.privilegedStartService(self)
        except BindError as e:
            log.critical("smtpplus cannot start: {error}", error=str(e))
            _fail(f"cannot start: {e}")

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield child.stopService()
            except Exception:
                log.failure("stopping {child} failed", child=child)


class _CallableService(Service):
    """Runs plain start/stop callables as a service."""

    def __init__(self, name: str, start: Any, stop: Any) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def privilegedStartService(self) -> None:
        self._start()
        Service.privilegedStartService(self)

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        return self._stop()


def build_service(config: Config, reactor: Any) -> MultiService:
    """
    Build the daemon's service tree for C{config} on C{reactor}.

    Children start in this order and stop in reverse: the admin API and the
    listeners close first, sessions drain (still committing to the queue),
    the notifier flushes its summaries into the queue, delivery stops, the
    statistics flush, and the database closes last.
    """
    state_dir = config.server.state_dir
    # The queue and the users are the daemon user's alone, whatever mode
    # an existing state_dir had.
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    smtp = config.smtp
    raise_open_files_limit(len(smtp.ports) + len(smtp.tls_ports) + smtp.max_connections + 256)
    tls_options = server_context(config.tls, config.server.hostname, state_dir)

    top = DaemonService()
    metrics = daemon_metrics()
    database = Database(reactor, os.path.join(state_dir, "smtpplus.db"))
    DatabaseService(database).setServiceParent(top)

    users = SQLiteUserStore(database, reactor)
    users.migrate()
    hasher = PasswordHasher(reactor)
    hasher.setServiceParent(top)

    def user_policy(username: str) -> Deferred[str | None]:
        return users.get(username).addCallback(lambda user: user.aggregation if user else None)

    stats = Statistics(database, reactor, user_policy)
    stats.setServiceParent(top)
    events = EventStore(database, reactor)
    queue_store = SQLiteQueueStore(database)
    queue_store.migrate()
    delivery_service, avatar_factory, message_query, submit_internal = build_delivery(
        config.delivery,
        hostname=config.server.hostname,
        state_dir=state_dir,
        delay_threshold=config.notifications.delivery_delay_threshold,
        clock=reactor,
        run_in_thread=reactor_runner(reactor),
        connector=reactor,
        store=queue_store,
        events=events,
        stats=stats,
    )
    delivery_service.setServiceParent(top)
    notifier = build_notifier(config.notifications, config.server.hostname, reactor, submit_internal)
    events.sink = notifier
    delivery_service.delivery.agent.results = notifier
    delivery_service.delivery.agent.metrics = metrics
    metrics.count_queue(reactor, queue_store.count_active, ACTIVE)
    notifier.setServiceParent(top)

    throttle = LoginThrottle(reactor, config.security, events)
    login_service, _ = build_login_service(users, hasher, throttle, avatar_factory, reactor, metrics)
    registry = SessionRegistry(
        SessionSettings(
            hostname=config.server.hostname,
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_connections=smtp.max_connections,
            max_connections_per_ip=smtp.max_connections_per_ip,
            idle_timeout=smtp.idle_timeout,
            auth_requires_tls=smtp.auth_requires_tls,
        ),
        reactor,
        metrics,
    )
    metrics.count_sessions(lambda: len(registry.sessions))
    factory = SMTPServerFactory(registry, login_service, tls_options)
    tls_factory = None
    if smtp.tls_ports:
        implicit = SMTPServerFactory(registry, login_service, None, implicit_tls=True)
        tls_factory = TLSMemoryBIOFactory(tls_options, False, implicit)
        tls_factory.noisy = False
    listeners = SMTPListeners(reactor, smtp.listen, smtp.ports, smtp.tls_ports, factory, tls_factory, smtp.require_all_ports)
    _CallableService("smtp-sessions", lambda: None, lambda: registry.drain(DRAIN_SECONDS)).setServiceParent(top)
    listeners.setName("smtp")
    listeners.setServiceParent(top)

    def client_settings() -> dict[str, Any]:
        return {
            "hostname": config.server.hostname,
            "ports": smtp.ports_spec,
            "listening_ports": sorted(listeners.bound),
            "tls_ports": smtp.tls_ports_spec,
            "listening_tls_ports": sorted(listeners.bound_tls),
            "encryption": "STARTTLS",
            "auth_mechanisms": ["PLAIN", "LOGIN"],
        }

    def listening_ports() -> int:
        # The lists outlive stopService; the admin API stops first anyway.
        return len(listeners.bound) + len(listeners.bound_tls) if listeners.running else 0

    api = AdminAPI(
        admin_token(config.admin, state_dir),
        users,
        hasher,
        client_settings,
        messages=message_query,
        events=events,
        stats=stats,
        metrics=metrics,
        health=HealthCheck(reactor, database.probe, listening_ports),
    )
    admin_service(reactor, config.admin, api, tls_options).setServiceParent(top)
    return top


def hand_over_state_dir(state_dir: str, uid: int | None, gid: int | None) -> None:
    """
    When root starts twistd with C{--uid/--gid}, give C{state_dir} and what
    is in it to that user: the daemon writes there after dropping privileges.
    """
    if os.getuid() != 0 or (uid is None and gid is None):
        return
    owner = -1 if uid is None else uid
    group = -1 if gid is None else gid
    os.chown(state_dir, owner, group)
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            os.chown(os.path.join(root, name), owner, group, follow_symlinks=False)


def makeService(options: Options) -> IService:
    """twistd entry point."""
    from twisted.internet import reactor

    config = options.config
    for warning in config_warnings(config):
        log.warn("configuration warning: {warning}", warning=warning)
    try:
        service = build_service(config, reactor)
    except ConfigError as e:
        _fail(f"configuration error: {e}")
    except OSError as e:
        _fail(f"cannot prepare state_dir {config.server.state_dir}: {e}")
    # Everything built so far lives as long as the process: keep the cyclic
    # collector from rescanning it while large API answers are built.
    gc.collect()
    gc.freeze()
    parent = options.parent
    if parent is not None:
        hand_over_state_dir(config.server.state_dir, parent.get("uid"), parent.get("gid"))
    return service
