"""
The daemon's log observer: C{[log] format} and C{level} applied to every
line the process writes, Twisted's own included, and reopened on SIGHUP.

How it is installed: twistd picks its log observer after C{makeService}
and before the services start (C{AppLogger.start}): a C{--logger} factory
first, then an L{ILogObserver} component of the application, then its own
text observer on C{--logfile} or stdout.  A plugin's C{makeService} never
sees the application, but the root service is handed to it:
L{smtpplus.tap.DaemonService.setServiceParent} sets a L{DaemonLog} as the
application's L{ILogObserver} component, the route twistd documents for
C{.tac} files.  L{log_destination} makes the same choice of file twistd
would (C{--logfile}, stdout with C{--nodaemon}, C{twistd.log} when
daemonized, C{--syslog}), so the log goes where twistd's own options say.
A C{--logger} given on the command line still wins, without C{[log]}.

Differences from twistd's observer, on purpose:

  - the log file is not rotated by size: twistd rotates at 1 MB into
    C{.1}, C{.2}, ... and deletes none, which bounds nothing and fights
    logrotate.  Rotation is logrotate's (without C{copytruncate}):
    L{DaemonLog.reopen} on SIGHUP starts a new file at the same path.
    C{kill -USR1} still rotates twistd's way, as twistd does.
  - text lines carry ISO 8601 times with the UTC offset
    (C{2026-05-01T12:00:00.123+00:00}) and, as twistd's do, the namespace
    and level (C{[smtpplus.smtp.protocol#info]}).
  - JSON lines are what L{jsonFileLogObserver} writes, one object per line
    (no RFC 7464 record separator), plus C{"timestamp"}: C{log_time} in
    ISO 8601, and C{"node"}: the node's name (C{[server] node_name}), so
    that the logs of several nodes can be read together.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import attrs
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from smtpplus.config import LogConfig

log = Logger()

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


def iso_time(seconds: float | None) -> str:
    """C{seconds} since the epoch as local ISO 8601 with its offset, to the millisecond."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).astimezone().isoformat(timespec="milliseconds")


def _text_line(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=iso_time)


def line_formatter(format: str, node: str | None) -> Callable[[dict[str, Any]], str | None]:
    """
    The line (newline included) that C{[log] format} C{format} writes for
    an event: text, or L{jsonFileLogObserver}'s record without its record
    separator plus an ISO 8601 C{timestamp} and the C{node} (when known).
    The SMTP workers format their own lines with it, so that the
    coordinator only appends them to the file.
    """
    if format != "json":
        return _text_line
    extra = {} if node is None else {"node": node}

    def json_line(event: dict[str, Any]) -> str:
        return eventAsJSON(dict(event, timestamp=iso_time(event.get("log_time")), **extra)) + "\n"

    return json_line


@attrs.frozen
class Destination:
    """
    Where the log goes: a stream (stdout), a file twistd would have opened
    (C{path}), or syslog (C{syslog_prefix}).
    """

    stream: IO[Any] | None = None
    path: str | None = None
    syslog_prefix: str | None = None


def log_destination(twistd_options: Any) -> Destination | None:
    """
    twistd's own choice of log destination for its options
    (C{UnixAppLogger._getLogObserver}), or None when a C{--logger} factory
    replaces the observer altogether.
    """
    if twistd_options is None:
        return Destination(stream=sys.stdout)
    if twistd_options.get("logger"):
        return None
    if twistd_options.get("syslog"):
        return Destination(syslog_prefix=twistd_options.get("prefix", "twisted"))
    path = twistd_options.get("logfile") or ""
    nodaemon = twistd_options.get("nodaemon", False)
    if path == "-":
        if not nodaemon:
            raise ValueError("Daemons cannot log to stdout")
        return Destination(stream=sys.stdout)
    if nodaemon and not path:
        return Destination(stream=sys.stdout)
    return Destination(path=path or "twistd.log")


def _open(path: str) -> LogFile:
    # rotateLength=None: no rotation by size (see the module docstring).
    return LogFile.fromFullPath(path, rotateLength=None)


@implementer(ILogObserver)
class DaemonLog:
    """
    The daemon's one log observer: writes each event at or above the
    configured level in the configured format to its L{Destination}.

    L{configure} and L{reopen} take effect from the next event on.

    @param node: this node's name, a field of every JSON line.
    """

    def __init__(self, destination: Destination, config: LogConfig, node: str | None = None) -> None:
        self.destination = destination
        self.config = config
        self.node = node
        self.file: LogFile | None = None
        self._out: IO[Any] | None = destination.stream
        if destination.path is not None:
            self.file = self._out = _open(destination.path)
        self._observer: Any = None
        self._build()

    def _build(self) -> None:
        if self.destination.syslog_prefix is not None:
            from twisted.python.syslog import SyslogObserver

            # syslog has its own record format: [log] format does not apply.
            inner: Any = LegacyLogObserverWrapper(SyslogObserver(self.destination.syslog_prefix).emit)
        else:
            inner = FileLogObserver(self._out, line_formatter(self.config.format, self.node))
        predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[self.config.level])
        self._observer = FilteringLogObserver(inner, [predicate])

    def __call__(self, event: dict[str, Any]) -> None:
        self._observer(event)

    @property
    def line_format(self) -> str:
        """
        How other processes hand this log their lines: C{text} or C{json},
        formatted (L{line_formatter}) for L{write_lines}; C{events} for
        syslog, which formats its own records.
        """
        return "events" if self.destination.syslog_prefix is not None else self.config.format

    def write_lines(self, text: str) -> None:
        """Append lines already formatted as L{line_format} says (another process's events)."""
        if self._out is not None:
            self._out.write(text)
            self._out.flush()

    def configure(self, config: LogConfig) -> None:
        """Write with C{config}'s format and level from now on."""
        self.config = config
        self._build()

    def reopen(self) -> None:
        """
        Open the log file's path anew (logrotate moved the file away); the
        old file is kept when the new one cannot be opened.
        """
        if self.file is None:
            return
        try:
            new = _open(self.file.path)
        except OSError as e:
            log.error("cannot reopen the log file {path}: {error}; still writing to the old one",
                      path=self.file.path, error=e.strerror or str(e))
            return
        old, self.file, self._out = self.file, new, new
        self._build()
        old.close()

    def rotate_on_usr1(self) -> None:
        """As twistd: SIGUSR1 rotates the log file (C{.1}, C{.2}, ...), unless the signal is taken."""
        if self.file is None or signal.getsignal(signal.SIGUSR1):
            return

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(self._rotate)

        signal.signal(signal.SIGUSR1, rotate)

    def _rotate(self) -> None:
        if self.file is not None:
            self.file.rotate()
