"""
The twistd plugin's entry points: L{Options} parses and validates, and
L{makeService} builds the whole service tree.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from typing import Any, NoReturn

import attrs
from setproctitle import setproctitle
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ServerFactory
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import admin_service, admin_token
from smtpplus.admin.sessions import ConsoleSessions
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.login import build_login_service
from smtpplus.auth.store import Revocations, SQLiteUserStore
from smtpplus.auth.throttle import LoginThrottle
from smtpplus.config import Config, ConfigError, TLSConfig, config_from_text, config_warnings, read_config_file
from smtpplus.delivery.dkim import DKIMKeys, SigningPool, SQLiteDKIMStore
from smtpplus.delivery.queue import ACTIVE, SQLiteQueueStore
from smtpplus.delivery.service import build_delivery
from smtpplus.delivery.suppressions import SQLiteSuppressionList
from smtpplus.delivery.threads import reactor_runner
from smtpplus.log import DaemonLog, log_destination
from smtpplus.metrics import HealthCheck, daemon_metrics
from smtpplus.nodes.heartbeat import Heartbeat, NodeNameInUse, beat_interval, check_node_name, take_over_when_steady
from smtpplus.nodes.listing import PostgresNodes, SingleNode
from smtpplus.notify.dispatch import build_notifier
from smtpplus.notify.events import EventStore
from smtpplus.notify.stats import Statistics
from smtpplus.reload import Appliers, ReloadableTLS, Reloader, hold_sighup
from smtpplus.smtp.listeners import BindError, SMTPListeners, raise_open_files_limit
from smtpplus.smtp.server import build_smtp_server, session_settings
from smtpplus.smtp.tls import TLSMaterial, check_tls_files, tls_material
from smtpplus.storage.database import Database, DatabaseService, StorageUnavailable
from smtpplus.workers.pool import Node, NodeConnections, WorkerPool

log = Logger()

# Sessions still receiving or storing a message get this long after SIGTERM;
# twistd must exit within 10 s.
DRAIN_SECONDS = 7.0
# How often the leader deletes the shared throttle's stale rows.
THROTTLE_SWEEP_SECONDS = 60.0


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
        self.overrides = overrides
        try:
            config = self.load()
        except ConfigError as e:
            errors.extend(e.errors)
        if errors:
            _fail(*(f"configuration error: {line}" for line in errors))
        self.config: Config = config

    def load(self) -> Config:
        """
        Read and check the configuration file (or the defaults without
        one) with the command line's overrides: at start and on SIGHUP.

        @raise ConfigError: one line per problem.
        """
        text = "" if self["config"] is None else read_config_file(self["config"])
        config = config_from_text(text, self.overrides, {TLSConfig: check_tls_files})
        if not hasattr(self, "text"):
            # What SMTP workers run with: the file as it was at start (a
            # reload changes only what needs no restart, and a worker that
            # starts again must match the running coordinator).
            self.text = text
        return config


class DaemonService(MultiService):
    """
    The root of the tree.  Children start in order and stop one after the
    other in reverse, so that listeners close and sessions drain before the
    stores they write to go away.

    @ivar log_observer: set as the application's L{ILogObserver} when the
        tree joins it, for twistd to log through (see L{smtpplus.log}).
    """

    log_observer: DaemonLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        MultiService.setServiceParent(self, parent)
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)

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


@attrs.frozen
class _StoreKinds:
    """The database and the store classes of one C{[storage] backend}."""

    database: Any
    users: Any
    statistics: Any
    events: Any
    queue: Any
    suppressions: Any
    dkim: Any

    @classmethod
    def for_config(cls, config: Config, reactor: Any, state_dir: str) -> _StoreKinds:
        if config.storage.backend == "postgresql":
            # Imported here: psycopg is needed only with PostgreSQL.
            from smtpplus.auth.postgres import PostgresUserStore
            from smtpplus.delivery.postgres import PostgresDKIMStore, PostgresQueueStore, PostgresSuppressionList
            from smtpplus.notify.postgres import PostgresEventStore, PostgresStatistics
            from smtpplus.storage.postgres import PostgresDatabase

            pg = PostgresDatabase(reactor, config.storage.dsn)
            return cls(
                pg, functools.partial(PostgresUserStore, node=config.server.node()),
                PostgresStatistics, PostgresEventStore,
                functools.partial(PostgresQueueStore, node=config.server.node()), PostgresSuppressionList,
                PostgresDKIMStore,
            )
        database = Database(reactor, os.path.join(state_dir, "smtpplus.db"))
        return cls(
            database, SQLiteUserStore, Statistics, EventStore, SQLiteQueueStore,
            SQLiteSuppressionList, SQLiteDKIMStore,
        )


def _nodes(config: Config, reactor: Any, database: Any, queue_store: Any, top: MultiService) -> tuple[Any, Any]:
    """
    What C{GET /api/v1/nodes} lists, and with PostgreSQL this node's
    heartbeat (started after the database, stopped before it), else None.
    """
    node, processes = config.server.node(), config.server.worker_processes()
    started_at = reactor.seconds()
    if config.storage.backend != "postgresql":
        return SingleNode(reactor, node, processes, started_at, queue_store.count_active), None
    check_node_name(database, node, config.storage.lease_seconds, started_at)
    interval = beat_interval(config.storage.lease_seconds)
    heartbeat = Heartbeat(database, reactor, node, processes, started_at, interval)
    heartbeat.setServiceParent(top)
    return PostgresNodes(database), heartbeat


def _throttle(config: Config, reactor: Any, database: Any, events: Any) -> Any:
    """The login throttle: in this process's memory, or in PostgreSQL shared by the nodes."""
    if config.storage.backend != "postgresql":
        return LoginThrottle(reactor, config.security, events)
    from smtpplus.auth.postgres_throttle import PostgresThrottle

    return PostgresThrottle(database, reactor, config.security, events)


def _singleton_duties(config: Config, reactor: Any, database: Any, notifier: Any, throttle: Any) -> Service:
    """
    With PostgreSQL, the service that runs the relay's singleton duties on
    the one node holding the leader lock (see L{smtpplus.nodes.leader}):
    the notification mail of every node's events and the throttle's sweep.
    """
    from smtpplus.nodes.leader import AdvisoryLock, Leadership, LockThread, PeriodicDuty
    from smtpplus.notify.shared import SharedMailFeed

    lease = config.storage.lease_seconds
    lock = AdvisoryLock(config.storage.dsn, keepalive=lease)
    leadership = Leadership(lock, reactor, beat_interval(lease), LockThread(reactor), config.server.node())
    leadership.duties.append(SharedMailFeed(database, reactor, notifier))
    leadership.duties.append(PeriodicDuty("sweeping the login throttle", reactor, THROTTLE_SWEEP_SECONDS, throttle.sweep))
    return leadership


def build_service(
    config: Config,
    reactor: Any,
    load: Any = None,
    source: str = "",
    daemon_log: DaemonLog | None = None,
    worker_config: tuple[str, dict[str, Any]] = ("", {}),
    drop_to: tuple[int | None, int | None] = (None, None),
) -> MultiService:
    """
    Build the daemon's service tree for C{config} on C{reactor}.

    With C{load} (which reads the configuration file C{source} again),
    SIGHUP reloads it and reopens C{daemon_log}'s file.

    With more than one SMTP process (C{[server] workers}), this process is
    the coordinator: it binds the ports and runs the queue, delivery,
    notifications and the admin API, and the workers (configured with
    C{worker_config}: the configuration file's text and the command line's
    overrides) serve the sessions; see L{smtpplus.workers.pool}.  They
    start while this process is still root and drop to C{drop_to} (twistd's
    C{--uid} and C{--gid}) themselves.

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
    # The coordinator of N workers holds N sockets per port.
    sockets = (len(smtp.ports) + len(smtp.tls_ports)) * config.server.worker_processes()
    raise_open_files_limit(sockets + smtp.max_connections + 256)
    material = tls_material(config.tls, config.server.hostname, state_dir)
    tls_options = ReloadableTLS(material.options())

    top = DaemonService()
    metrics = daemon_metrics()
    metrics.node_info(config.server.node(), config.storage.backend)
    log.info(
        "smtpplus node {node} starting: {backend} store, {processes} SMTP process(es)",
        node=config.server.node(),
        backend=config.storage.backend,
        processes=config.server.worker_processes(),
    )
    stores = _StoreKinds.for_config(config, reactor, state_dir)
    database = stores.database
    DatabaseService(database).setServiceParent(top)

    processes = config.server.worker_processes()
    # Set once the worker pool exists; user changes reach the workers through it.
    pool: list[WorkerPool] = []

    def user_changed(username: str, revoked: str | None = None) -> None:
        if pool:
            pool[0].user_changed(username, revoked)

    users = stores.users(database, reactor, Revocations(on_revoke=user_changed) if processes > 1 else None)
    users.migrate()
    if processes > 1:
        users.subscribe(user_changed)
    hasher = PasswordHasher(reactor)
    hasher.setServiceParent(top)

    def user_policy(username: str) -> Deferred[str | None]:
        return users.get(username).addCallback(lambda user: user.aggregation if user else None)

    stats = stores.statistics(database, reactor, user_policy)
    stats.setServiceParent(top)
    events = stores.events(database, reactor)
    queue_store = stores.queue(database)
    queue_store.migrate()
    nodes, heartbeat = _nodes(config, reactor, database, queue_store, top)
    # Before delivery in the tree: it stops after the attempts that sign.
    dkim_pool = SigningPool(reactor)
    dkim_pool.setServiceParent(top)
    suppressions = stores.suppressions(database)
    suppressions.migrate()
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
        suppressions=suppressions,
    )
    delivery_service.setServiceParent(top)
    dkim_store = stores.dkim(database)
    dkim_store.migrate()
    dkim_keys = DKIMKeys(dkim_store, reactor, dkim_pool.run)
    delivery_service.delivery.sign_with(dkim_keys, dkim_pool.run)
    if heartbeat is not None:
        # The messages of nodes silent for a lease become this node's (one
        # of the live nodes gets each).
        take_over_when_steady(heartbeat, config.storage.lease_seconds, delivery_service.delivery.take_over)
        # What another node's API changed: its users (a disabled one's open
        # sessions here end) and its DKIM keys, within a beat.
        users.skip_past_changes()
        heartbeat.on_beat.append(lambda now: users.poll_changes())
        heartbeat.on_beat.append(lambda now: dkim_keys.refresh())
    shared = config.storage.backend == "postgresql"
    notifier = build_notifier(config.notifications, config.server.hostname, reactor, submit_internal, shared=shared)
    events.sink = notifier
    delivery_service.delivery.agent.results = notifier
    delivery_service.delivery.agent.metrics = metrics
    metrics.count_queue(reactor, queue_store.count_active, ACTIVE)
    notifier.setServiceParent(top)

    throttle = _throttle(config, reactor, database, events)
    if shared:
        # After the notifier and delivery in the tree: the leader's last
        # summaries go into the queue before they stop.
        _singleton_duties(config, reactor, database, notifier, throttle).setServiceParent(top)
    settings = session_settings(smtp, config.server.hostname)
    if processes > 1:
        # The coordinator binds; its workers accept.  The factories only
        # tell the STARTTLS ports from the implicit-TLS ones here.
        plain, implicit = ServerFactory(), ServerFactory()
        plain.noisy = implicit.noisy = False
        listeners = SMTPListeners(
            reactor, smtp.listen, smtp.ports, smtp.tls_ports, plain, implicit, smtp.require_all_ports, workers=processes
        )
        delivery = delivery_service.delivery
        node = Node(
            users=users,
            throttle=throttle,
            record=delivery.record,
            refusals=delivery.intake.refusals,
            spool=delivery.spool,
            connections=NodeConnections(settings),
            suppressions=suppressions,
            budget=delivery.intake.budget,
        )
        pool.append(
            WorkerPool(
                reactor, processes, listeners, node, worker_config, material, config.log.level, metrics, drop_to, daemon_log
            )
        )
        listeners.setName("smtp")
        listeners.setServiceParent(top)
        pool[0].setServiceParent(top)
    else:
        login_service, _ = build_login_service(users, hasher, throttle, avatar_factory, reactor, metrics)
        server = build_smtp_server(smtp, config.server.hostname, reactor, login_service, tls_options, metrics)
        listeners = SMTPListeners(
            reactor, smtp.listen, smtp.ports, smtp.tls_ports, server.factory, server.tls_factory, smtp.require_all_ports
        )
        _CallableService("smtp-sessions", lambda: None, lambda: server.registry.drain(DRAIN_SECONDS)).setServiceParent(top)
        listeners.setName("smtp")
        listeners.setServiceParent(top)

    if load is not None:
        delivery = delivery_service.delivery

        def reload_delivery(new: Config) -> None:
            # delivery_delay_threshold is a [notifications] key the agent applies.
            delivery.reconfigure(new.delivery, new.notifications.delivery_delay_threshold)

        def reload_notifications(new: Config) -> None:
            replacement = build_notifier(
                new.notifications, config.server.hostname, reactor, submit_internal, shared=shared
            )
            notifier.take_over(replacement).addErrback(
                lambda f: log.failure("stopping the previous notification channels failed", f)
            )
            reload_delivery(new)

        def reload_tls(reloaded: tuple[TLSMaterial, Any]) -> None:
            material, tls_options.options = reloaded
            if pool:
                pool[0].reload(material, reloader.config.log.level)

        def reload_log(new: Config) -> None:
            if daemon_log is not None:
                daemon_log.configure(new.log)
            if pool:
                # After reload_tls, which sent the level but not yet the format.
                pool[0].reload(pool[0].tls, new.log.level)

        appliers = Appliers(
            tls=reload_tls,
            delivery=reload_delivery,
            notifications=reload_notifications,
            security=lambda new: throttle.reconfigure(new.security),
            log=reload_log,
        )
        def make_tls(new: Config) -> tuple[TLSMaterial, Any]:
            material = tls_material(new.tls, new.server.hostname, new.server.state_dir)
            return material, material.options()

        reloader = Reloader(
            reactor,
            config,
            source,
            load,
            make_tls,
            appliers,
            daemon_log.reopen if daemon_log is not None else lambda: None,
            reactor_runner(reactor),
        )
        reloader.setServiceParent(top)
        # Now rather than when the services start (this one last, after the
        # ports are bound and the workers forked): a SIGHUP held since
        # makeService began becomes a reload.
        reloader.take_signal()

    def client_settings() -> dict[str, Any]:
        return {
            "hostname": config.server.hostname,
            "ports": smtp.ports_spec,
            "listening_ports": sorted(listeners.bound),
            "tls_ports": smtp.tls_ports_spec,
            "listening_tls_ports": sorted(listeners.bound_tls),
            "encryption": "STARTTLS",
            "auth_mechanisms": ["PLAIN", "LOGIN"],
            # Beyond the contract's keys: which processes serve the sessions.
            "workers": pool[0].describe() if pool else [{"index": 0, "pid": os.getpid(), "serving": True}],
        }

    def listening_ports() -> int:
        # The lists outlive stopService; the admin API stops first anyway.
        if not listeners.running or (pool and not pool[0].serving()):
            return 0
        return len(listeners.bound) + len(listeners.bound_tls)

    api = AdminAPI(
        admin_token(config.admin, state_dir),
        users,
        hasher,
        client_settings,
        messages=message_query,
        events=events,
        stats=stats,
        metrics=pool[0] if pool else metrics,
        health=HealthCheck(reactor, database.probe, listening_ports),
        policy=delivery_service.delivery.policy_check(smtp.max_recipients),
        dkim=dkim_keys,
        sessions=ConsoleSessions(reactor),
        suppressions=suppressions,
        clock=reactor,
        nodes=nodes,
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
    parent = options.parent
    # Before the log file is opened: logrotate may signal it from then on.
    hold_sighup()
    try:
        destination = log_destination(parent)
    except ValueError as e:
        _fail(str(e))
    daemon_log = None
    if destination is None:
        log.warn("twistd --logger is given: it writes the log, and [log] format and level do not apply")
    else:
        try:
            daemon_log = DaemonLog(destination, config.log, config.server.node())
        except OSError as e:
            _fail(f"cannot open the log file {destination.path}: {e.strerror or e}")
    for warning in config_warnings(config):
        log.warn("configuration warning: {warning}", warning=warning)
    source = options["config"] or "(no file: the defaults)"
    try:
        service = build_service(
            config,
            reactor,
            options.load,
            source,
            daemon_log,
            (options.text, options.overrides),
            (parent.get("uid"), parent.get("gid")) if parent is not None else (None, None),
        )
    except ConfigError as e:
        _fail(f"configuration error: {e}")
    except OSError as e:
        _fail(f"cannot prepare state_dir {config.server.state_dir}: {e}")
    except (StorageUnavailable, NodeNameInUse) as e:
        _fail(f"cannot start: {e}")
    # Everything built so far lives as long as the process: keep the cyclic
    # collector from rescanning it while large API answers are built.
    gc.collect()
    gc.freeze()
    if daemon_log is not None:
        assert isinstance(service, DaemonService)
        service.log_observer = daemon_log
        daemon_log.rotate_on_usr1()
    if config.server.worker_processes() > 1:
        setproctitle(f"smtpplus: coordinator ({' '.join(sys.argv)})")
    if parent is not None:
        hand_over_state_dir(config.server.state_dir, parent.get("uid"), parent.get("gid"))
    return service
