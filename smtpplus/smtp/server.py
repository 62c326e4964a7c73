"""
The SMTP side assembled: the session registry and the factories of the
STARTTLS and implicit-TLS ports, the same in the single daemon process and
in each SMTP worker process.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtpplus.config import SMTPConfig
from smtpplus.metrics import Metrics
from smtpplus.smtp.interfaces import ILoginService
from smtpplus.smtp.protocol import SMTPServerFactory
from smtpplus.smtp.registry import NodeLimits, SessionRegistry, SessionSettings


@attrs.frozen
class SMTPServer:
    """What serves the SMTP ports: one registry, a factory per kind of port."""

    registry: SessionRegistry
    factory: ServerFactory
    tls_factory: ServerFactory | None


def session_settings(smtp: SMTPConfig, hostname: str) -> SessionSettings:
    """The parts of C{[smtp]} a session and the connection limits need."""
    return SessionSettings(
        hostname=hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_connections=smtp.max_connections,
        max_connections_per_ip=smtp.max_connections_per_ip,
        idle_timeout=smtp.idle_timeout,
        auth_requires_tls=smtp.auth_requires_tls,
    )


def build_smtp_server(
    smtp: SMTPConfig,
    hostname: str,
    clock: IReactorTime,
    login_service: ILoginService,
    tls_options: Any,
    metrics: Metrics,
    worker: int = 0,
    node: NodeLimits | None = None,
) -> SMTPServer:
    """
    The registry and factories for C{[smtp]}; C{worker} and C{node} as
    L{SessionRegistry} takes them (a worker's index, the node-wide limits).
    """
    registry = SessionRegistry(
        session_settings(smtp, hostname),
        clock,
        metrics,
        worker=worker,
        node=node,
    )
    metrics.count_sessions(lambda: len(registry.sessions))
    factory = SMTPServerFactory(registry, login_service, tls_options)
    tls_factory = None
    if smtp.tls_ports:
        implicit = SMTPServerFactory(registry, login_service, None, implicit_tls=True)
        tls_factory = TLSMemoryBIOFactory(tls_options, False, implicit)
        tls_factory.noisy = False
    return SMTPServer(registry, factory, tls_factory)
