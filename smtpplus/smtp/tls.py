"""
The server certificate: the configured PEM files, or a self-signed pair made
once for the hostname and kept under C{state_dir}.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.logger import Logger

from smtpplus.config import ConfigError, TLSConfig

log = Logger()


def check_tls_files(tls: TLSConfig) -> None:
    """
    Fail with a L{ConfigError} naming the key when a configured certificate
    or key cannot be read or parsed; called while options are validated.
    """
    if bool(tls.certificate) != bool(tls.private_key):
        missing = "private_key" if tls.certificate else "certificate"
        raise ConfigError(f"[tls] {missing}: must be set together with the other")
    if tls.certificate:
        _load_pair(tls.certificate, tls.private_key)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"[tls] {key}: cannot read {path}: {e.strerror}") from None


def _load_pair(cert_path: str, key_path: str) -> tuple[list[x509.Certificate], bytes]:
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"[tls] certificate: {cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"[tls] private_key: {key_path} holds no unencrypted PEM private key") from None
    # A mismatched pair would otherwise fail later, inside OpenSSL, as a traceback.
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, spki) != chain[0].public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ):
        raise ConfigError(f"[tls] private_key: {key_path} does not match the certificate {cert_path}")
    return chain, key_pem


def generate_self_signed(hostname: str, cert_path: str, key_path: str) -> None:
    """Write a new self-signed ECDSA certificate for C{hostname} and its key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        dns_name = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        dns_name = "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_pem)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _write_private(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def server_context(tls: TLSConfig, hostname: str, state_dir: str) -> ssl.CertificateOptions:
    """
    Build the server's TLS options (TLS 1.2 or newer), generating and
    logging a self-signed certificate on first start when none is configured.
    """
    if tls.certificate:
        cert_path, key_path = tls.certificate, tls.private_key
    else:
        tls_dir = os.path.join(state_dir, "tls")
        os.makedirs(tls_dir, mode=0o700, exist_ok=True)
        cert_path = os.path.join(tls_dir, "cert.pem")
        key_path = os.path.join(tls_dir, "key.pem")
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            generate_self_signed(hostname, cert_path, key_path)
            log.info("Generated a self-signed TLS certificate for {hostname} in {path}", hostname=hostname, path=cert_path)
    chain, key_pem = _load_pair(cert_path, key_path)
    fingerprint = chain[0].fingerprint(hashes.SHA256()).hex(":").upper()
    log.info("TLS certificate {path} SHA-256 fingerprint {fingerprint}", path=cert_path, fingerprint=fingerprint)
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
    return ssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM, pem[0]),
        extraCertChain=[crypto.load_certificate(crypto.FILETYPE_PEM, p) for p in pem[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
