"""C{ssl} contexts: a client that accepts the daemon's self-signed certificate, and a server with a fresh one."""

from __future__ import annotations

import os
import ssl


def client_context() -> ssl.SSLContext:
    """A client context without verification: the test daemon's certificate is self-signed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(directory: str, hostname: str = "smarthost.test") -> ssl.SSLContext:
    """
    A server context with a fresh self-signed certificate kept in
    C{directory}, for the smarthost; made by the daemon's own generator
    (the one import from smtpplus here, done only when called).
    """
    from smtpplus.smtp.tls import generate_self_signed

    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    generate_self_signed(hostname, cert_path, key_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
