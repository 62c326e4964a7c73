"""
SIGHUP: reopen the log file and reload the configuration file.

twistd leaves SIGHUP at its default, which ends the process without a log
line; L{Reloader} takes it while the daemon runs.  The signal handler only
schedules L{Reloader.reload} on the reactor thread.  The file is read and
the TLS options are built (which may write a renewed self-signed
certificate) in a worker thread; the changes are applied on the reactor
thread:

  - C{[tls]}: new options for new sessions (STARTTLS, implicit TLS, the
    admin API), from the certificate files as they are now, changed or not
    (a renewed certificate at the same path is the usual case);
  - C{[delivery]} except C{mode}, C{[notifications]}, C{[security]}: to
    what starts from now on (attempts, notifications, logins);
  - C{[log]}: to the next line.

A changed C{[server]}, C{[smtp]}, C{[admin]} or C{[storage]} key or C{[delivery] mode}
is named in one "needs a restart" line and keeps its running value.  A bad
file is one error line (its problems joined) and changes nothing.
Sessions already open keep what they had: their TLS is established, their
settings were read when they connected.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.config import Config, ConfigError

log = Logger()

# Sections whose keys need a restart, and the one [delivery] key that does.
RESTART_SECTIONS = ("server", "smtp", "admin", "storage")
RESTART_KEYS = (("delivery", "mode"),)


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """
    The server's TLS options as the listeners and STARTTLS see them: each
    new TLS connection asks for the context of the current C{options}, so
    replacing them serves a new certificate to new sessions only.
    """

    def __init__(self, options: Any) -> None:
        self.options = options

    def getContext(self) -> SSL.Context:
        return self.options.getContext()


def changed_keys(old: Config, new: Config) -> list[tuple[str, str]]:
    """The C{(section, key)} of every key whose value differs, in declaration order."""
    changed = []
    for section in attrs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for field in attrs.fields(type(before)):
            if field.init and getattr(before, field.name) != getattr(after, field.name):
                key = field.metadata.get("smtpplus.config")
                changed.append((section.name, (key.name if key is not None else "") or field.name))
    return changed


def _needs_restart(section: str, key: str) -> bool:
    return section in RESTART_SECTIONS or (section, key) in RESTART_KEYS


def _names(keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"[{section}] {key}" for section, key in keys)


@attrs.define
class Appliers:
    """
    What applies each reloadable part; each takes the new configuration.
    C{tls} gets the new TLS options instead.
    """

    tls: Callable[[Any], None]
    delivery: Callable[[Config], None]
    notifications: Callable[[Config], None]
    security: Callable[[Config], None]
    log: Callable[[Config], None]


# SIGHUPs that arrived before a Reloader took the signal (L{hold_sighup}).
_held: list[int] = []


def hold_sighup() -> None:
    """
    Until a L{Reloader} takes SIGHUP, remember it instead of meeting its
    default action, which ends the process: the daemon's log file exists
    from the start, and logrotate may signal a daemon that is still
    starting.
    """
    signal.signal(signal.SIGHUP, lambda signum, frame: _held.append(signum))


class Reloader(Service):
    """
    Handles SIGHUP while running (see the module docstring).

    @param load: reads and checks the configuration file; raises
        L{ConfigError}.  Runs in a worker thread.
    @param make_tls: builds the TLS options for a configuration (worker thread).
    @param reopen_log: reopens the log file.
    @param run_in_thread: C{(f, *args) -> Deferred}.
    """

    name = "reload"

    def __init__(
        self,
        reactor: Any,
        config: Config,
        source: str,
        load: Callable[[], Config],
        make_tls: Callable[[Config], Any],
        appliers: Appliers,
        reopen_log: Callable[[], None],
        run_in_thread: Callable[..., Deferred[Any]],
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._source = source
        self._load = load
        self._make_tls = make_tls
        self._appliers = appliers
        self._reopen_log = reopen_log
        self._in_thread = run_in_thread
        self._previous: Any = None
        self._installed = False
        self._running = False
        self._again = False

    def startService(self) -> None:
        Service.startService(self)
        self.take_signal()

    def take_signal(self) -> None:
        """
        Handle SIGHUP from now on, before the services start: a reload asked
        for meanwhile (or held by L{hold_sighup}) runs once the reactor does.
        """
        if not self._installed:
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True
            if _held:
                _held.clear()
                self._reactor.callFromThread(self.reload)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
            self._previous = None

    def _signalled(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[None] | None:
        """Reopen the log and reload the file; a reload asked for meanwhile runs after this one."""
        if self._running:
            self._again = True
            return None
        self._running = True
        return self._reload()

    @inlineCallbacks
    def _reload(self) -> Any:
        try:
            while True:
                self._again = False
                self._reopen_log()
                log.info("SIGHUP: reloading the configuration from {source}", source=self._source)
                try:
                    new, tls = yield self._in_thread(self._read)
                except ConfigError as e:
                    log.error(
                        "configuration error: {problems}; the running configuration stays",
                        problems="; ".join(e.errors),
                    )
                except Exception as e:
                    log.error(
                        "configuration reload failed: {error}; the running configuration stays",
                        error=str(e) or e.__class__.__name__,
                    )
                else:
                    self._apply(new, tls)
                if not self._again:
                    break
        finally:
            self._running = False

    def _read(self) -> tuple[Config, Any]:
        new = self._load()
        # The running hostname and state_dir: changing those needs a restart.
        running = attrs.evolve(new, server=self.config.server)
        return new, self._make_tls(running)

    def _apply(self, new: Config, tls: Any) -> None:
        old = self.config
        changed = changed_keys(old, new)
        restart = [key for key in changed if _needs_restart(*key)]
        applied = [key for key in changed if not _needs_restart(*key)]
        if restart:
            log.warn(
                "configuration reload: {keys} changed: needs a restart; the running values stay",
                keys=_names(restart),
            )
        # The running configuration: the new reloadable values, the old rest.
        running = attrs.evolve(
            new,
            server=old.server,
            smtp=old.smtp,
            admin=old.admin,
            storage=old.storage,
            delivery=attrs.evolve(new.delivery, mode=old.delivery.mode),
        )
        self.config = running
        self._appliers.tls(tls)
        sections = {section for section, _ in applied}
        for section in ("delivery", "notifications", "security", "log"):
            if section in sections:
                try:
                    getattr(self._appliers, section)(running)
                except Exception:
                    log.failure("applying the reloaded [{section}] failed", section=section)
        log.info(
            "configuration reloaded: TLS certificate reloaded for new sessions; {applied}",
            applied=f"applied {_names(applied)}" if applied else "no other change applied",
        )
