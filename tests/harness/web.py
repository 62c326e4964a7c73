"""
HTTP on loopback for in-process tests: a site listening on 127.0.0.1 port
0, and a treq client whose connection pool is closed when the test ends.
Imports nothing from smtpplus.
"""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site


def serve(case: Any, site: Site) -> str:
    """Listen with C{site} on 127.0.0.1 until C{case} ends; its base URL."""
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


def http_client(case: Any, tls_policy: Any = None) -> treq.client.HTTPClient:
    """A treq client without persistent connections (none outlives C{case}); C{tls_policy} for HTTPS."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    case.addCleanup(pool.closeCachedConnections)
    if tls_policy is None:
        return treq.client.HTTPClient(Agent(reactor, pool=pool))
    return treq.client.HTTPClient(Agent(reactor, tls_policy, pool=pool))
