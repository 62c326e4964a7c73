"""
The admin API's listening service and its bearer token.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from smtpplus.admin.api import AdminAPI, CappedRequest
from smtpplus.admin.console import ConsoleResource
from smtpplus.config import AdminConfig

log = Logger()

TOKEN_FILE = "admin-token"


def admin_token(admin: AdminConfig, state_dir: str) -> str:
    """
    The configured C{[admin] token}, or the one generated on first start
    into C{state_dir/admin-token} (mode 0600) and reused afterwards.  Only
    the file's path is ever logged.
    """
    if admin.token:
        return admin.token
    path = os.path.join(state_dir, TOKEN_FILE)
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
        if token:
            log.info("Admin API token read from {path}", path=path)
            return token
    except FileNotFoundError:
        pass
    token = new_token()
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("Generated an admin API token into {path}", path=path)
    return token


def new_token() -> str:
    """
    A random admin token (256 bits, URL-safe) that does not start with
    C{-}: pasted after C{smtpplusctl --token}, such a token would be taken
    for an option (one token in 64 did).
    """
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def admin_site(api: AdminAPI, secure: bool = False) -> Site:
    """
    The HTTP site serving C{api}, and the web console in front of it when
    the API has console sessions (C{secure}: served over TLS): no
    tracebacks, capped request bodies, no access log noise.
    """
    root = api.resource() if api.sessions is None else ConsoleResource(api, api.sessions, secure)
    site = Site(root, requestFactory=CappedRequest)
    site.displayTracebacks = False
    site.noisy = False
    return site


def is_loopback(address: str) -> bool:
    """Whether the listening address C{address} accepts connections from this host only."""
    if address == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a host name: it may well resolve to a public address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class AdminListener(Service):
    """
    Listens on C{[admin] listen:port}, bound before privileges are dropped;
    with C{[admin] tls = true} over TLS with C{tls_options} (the server
    context the SMTP side uses).  A port that cannot be bound is named in one
    warning line and the daemon goes on relaying mail without its admin API;
    so is a plain-HTTP API that other hosts can reach, since its bearer token
    would cross the network in clear text.

    @ivar port: the listening port, or None.
    """

    name = "admin"

    def __init__(
        self, reactor: Any, admin: AdminConfig, site: Site, tls_options: ssl.CertificateOptions | None = None
    ) -> None:
        if admin.tls and tls_options is None:
            raise ValueError("[admin] tls = true needs the server TLS options")
        self._reactor = reactor
        self._admin = admin
        self._site = site
        self._tls_options = tls_options
        self.port: IListeningPort | None = None

    def _listen(self) -> IListeningPort:
        admin = self._admin
        if admin.tls:
            return self._reactor.listenSSL(admin.port, self._site, self._tls_options, interface=admin.listen)
        return self._reactor.listenTCP(admin.port, self._site, interface=admin.listen)

    def privilegedStartService(self) -> None:
        scheme = "HTTPS" if self._admin.tls else "HTTP"
        try:
            self.port = self._listen()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            log.warn(
                "Admin API cannot listen on {address} port {port}: {reason}; running without it",
                address=self._admin.listen,
                port=self._admin.port,
                reason=reason,
            )
        else:
            log.info(
                "Admin API listening on {address} port {port} ({scheme})",
                address=self._admin.listen,
                port=self._admin.port,
                scheme=scheme,
            )
            if not self._admin.tls and not is_loopback(self._admin.listen):
                log.warn(
                    "Admin API on {address} port {port} is reachable from other hosts without TLS: "
                    "the bearer token crosses the network in clear text; set [admin] tls = true",
                    address=self._admin.listen,
                    port=self._admin.port,
                )
        Service.privilegedStartService(self)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


def admin_service(
    reactor: Any, admin: AdminConfig, api: AdminAPI, tls_options: ssl.CertificateOptions | None = None
) -> AdminListener:
    """The admin API's listening service; C{tls_options} serve it when C{[admin] tls = true}."""
    return AdminListener(reactor, admin, admin_site(api, secure=admin.tls), tls_options)
