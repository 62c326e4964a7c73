"""
The server's TLS: the configured PEM files, or self-signed pairs made for the
hostname and kept (and renewed) under C{state_dir}, served with the
C{[tls] profile}'s protocol versions, cipher suites and key-exchange groups.

The same options serve STARTTLS, implicit TLS and the admin API.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _openssl
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger

from smtpplus.config import ConfigError, TLSConfig

log = Logger()

# Apple's platforms refuse server certificates valid for longer (since 2019).
GENERATED_LIFETIME = datetime.timedelta(days=825)
RENEW_BEFORE = datetime.timedelta(days=30)


@attrs.frozen
class TLSProfile:
    """
    What a C{[tls] profile} lets a handshake use (TLS 1.2 is the floor for all).

    @ivar ciphers: TLS 1.2 cipher suites, an OpenSSL cipher string.
    @ivar ciphersuites: TLS 1.3 cipher suites, in preference order.
    @ivar groups: key-exchange groups in preference order, each list a
        fallback for an OpenSSL that does not know a group of the one before.
    """

    ciphers: str
    ciphersuites: str
    groups: tuple[str, ...]


_TLS13 = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Mozilla's intermediate list without the DHE suites: every client that
# negotiates DHE-RSA-*-GCM also offers ECDHE (Mozilla dropped them in 5.8 for
# that reason), and DHE would need DH parameters.
_AEAD = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# Still forward secret, but CBC (Lucky13-class padding oracles are mitigated,
# not designed out); for TLS 1.2 stacks without AEAD: Safari on iOS 5-8 and
# OS X 10.9-10.10, Chrome 30, Opera 17.
_CBC = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
)
# X25519MLKEM768 (post-quantum hybrid, TLS 1.3 only) is in Mozilla's groups
# since 5.8 and in OpenSSL's own default list since 3.5; leaving it out would
# downgrade the clients that have it.
_GROUPS = (("X25519MLKEM768", "X25519", "P-256", "P-384"), ("X25519", "P-256", "P-384"))

PROFILES: dict[str, TLSProfile] = {
    "intermediate": TLSProfile(ciphers=_AEAD, ciphersuites=_TLS13, groups=_GROUPS),
    "compatible": TLSProfile(ciphers=f"{_AEAD}:{_CBC}", ciphersuites=_TLS13, groups=_GROUPS),
}


def _select_protocol(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """
    The first protocol the served factory speaks (twisted.web's C{Site}:
    C{h2}, C{http/1.1}) that the client offered; with none in common, go on
    without ALPN.
    """
    # Twisted finds the served factory the same way (protosFromProtocol).
    negotiation = IProtocolNegotiationFactory(connection.get_app_data().factory.wrappedFactory, None)
    if negotiation is not None:
        for protocol in negotiation.acceptableProtocols():
            if protocol in offered:
                return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


class ProfileCertificateOptions(ssl.CertificateOptions):
    """
    L{ssl.CertificateOptions} that applies a L{TLSProfile}, serves further
    certificates of other key types beside the first, and never fails a
    handshake over ALPN.

    Twisted (26.10) installs an ALPN callback even when no protocols are
    configured; when none of a client's protocols fit (an SMTP factory has
    none; the simulated Android and Go clients offer C{h2}, C{http/1.1}) it
    answers with an empty protocol name, which OpenSSL turns into a fatal
    C{internal_error} alert.  Here no overlap means no ALPN, as with a
    server that has no ALPN at all.
    """

    def __init__(
        self,
        profile: TLSProfile,
        additional: tuple[tuple[crypto.X509, crypto.PKey], ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(profile.ciphers),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            **kwargs,
        )
        self.profile = profile
        self.additional = additional

    def _makeContext(self, *args: Any, **kwargs: Any) -> SSL.Context:
        # Every context these options hand out is made here; the arguments
        # differ between Twisted releases, hence the passthrough.
        ctx = super()._makeContext(*args, **kwargs)
        for certificate, key in self.additional:
            # OpenSSL keeps one certificate per key type and picks the one the
            # client's signature algorithms and groups allow.
            ctx.use_certificate(certificate)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        ctx.set_tls13_ciphersuites(self.profile.ciphersuites.encode("ascii"))
        _set_groups(ctx, self.profile.groups)
        ctx.set_alpn_select_callback(_select_protocol)
        return ctx


def _set_groups(ctx: SSL.Context, choices: tuple[tuple[str, ...], ...]) -> None:
    # pyOpenSSL has no wrapper for SSL_CTX_set1_groups_list (whose older name
    # cryptography's bindings keep); without it OpenSSL's default list would
    # also offer X448, P-521 and the FFDHE groups.
    for groups in choices:
        if _openssl.SSL_CTX_set1_curves_list(ctx._context, ":".join(groups).encode("ascii")) == 1:
            return
        _openssl.ERR_clear_error()
    raise SSL.Error(f"OpenSSL accepts none of the key-exchange group lists {choices}")


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


def _load_pair(cert_path: str, key_path: str, validate: bool = True) -> tuple[list[x509.Certificate], bytes]:
    """
    The chain and the key's PEM, checked to belong together.  C{validate}
    also checks an RSA key's own numbers (about 60 ms for 2048 bits, at
    every start): wanted for the operator's key, needless for one this
    daemon generated.
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"[tls] certificate: {cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None, unsafe_skip_rsa_key_validation=not validate)
    except (ValueError, TypeError):
        raise ConfigError(f"[tls] private_key: {key_path} holds no unencrypted PEM private key") from None
    # A mismatched pair would otherwise fail later, inside OpenSSL, as a traceback.
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, spki) != chain[0].public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ):
        raise ConfigError(f"[tls] private_key: {key_path} does not match the certificate {cert_path}")
    return chain, key_pem


def generate_self_signed(
    hostname: str,
    cert_path: str,
    key_path: str,
    key_type: str = "ecdsa",
    now: datetime.datetime | None = None,
) -> None:
    """
    Write a new self-signed certificate for C{hostname} and its key (mode
    0600): C{key_type} C{"ecdsa"} (P-256) or C{"rsa"} (2048 bits), valid from
    a day before C{now} for L{GENERATED_LIFETIME}.
    """
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    try:
        dns_name = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        dns_name = "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name[:64])])
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + GENERATED_LIFETIME)
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


def _renewal_reason(cert_path: str, key_path: str, now: datetime.datetime) -> str | None:
    """Why the generated pair at these paths must be made anew, or None."""
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        return "none on disk"
    try:
        chain, _ = _load_pair(cert_path, key_path, validate=False)
    except ConfigError as e:
        return f"unusable: {e}"
    cert = chain[0]
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"it expires {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_after_utc - cert.not_valid_before_utc > GENERATED_LIFETIME:
        return f"it is valid for longer than {GENERATED_LIFETIME.days} days"
    return None


def _generated_pair(
    hostname: str, tls_dir: str, key_type: str, now: datetime.datetime
) -> tuple[str, str]:
    prefix = "" if key_type == "ecdsa" else f"{key_type}-"
    cert_path = os.path.join(tls_dir, f"{prefix}cert.pem")
    key_path = os.path.join(tls_dir, f"{prefix}key.pem")
    reason = _renewal_reason(cert_path, key_path, now)
    if reason is not None:
        generate_self_signed(hostname, cert_path, key_path, key_type, now)
        log.info(
            "Generated a self-signed {key_type} TLS certificate for {hostname} in {path} ({reason})",
            key_type=key_type.upper(),
            hostname=hostname,
            path=cert_path,
            reason=reason,
        )
    return cert_path, key_path


def _warn_if_expiring(cert_path: str, cert: x509.Certificate, now: datetime.datetime) -> None:
    expires = cert.not_valid_after_utc
    if expires <= now:
        log.warn("TLS certificate {path} expired on {date}", path=cert_path, date=f"{expires:%Y-%m-%d}")
    elif expires - now < RENEW_BEFORE:
        log.warn(
            "TLS certificate {path} expires on {date}, in {days} days",
            path=cert_path,
            date=f"{expires:%Y-%m-%d}",
            days=(expires - now).days,
        )


@attrs.frozen
class TLSMaterial:
    """
    The server's certificates and keys as PEM, with the profile: what the
    coordinator hands its SMTP workers (which may not read the key files
    once privileges are dropped) to build the same options.
    """

    profile: str
    pairs: tuple[tuple[bytes, bytes], ...]

    def options(self) -> ProfileCertificateOptions:
        """The TLS options for these certificates."""
        loaded = []
        for chain_pem, key_pem in self.pairs:
            chain = [
                crypto.load_certificate(crypto.FILETYPE_PEM, c.public_bytes(serialization.Encoding.PEM))
                for c in x509.load_pem_x509_certificates(chain_pem)
            ]
            loaded.append((chain, crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)))
        (first_chain, first_key), *others = loaded
        return ProfileCertificateOptions(
            PROFILES[self.profile],
            tuple((chain[0], key) for chain, key in others),
            privateKey=first_key,
            certificate=first_chain[0],
            extraCertChain=first_chain[1:],
        )


def tls_material(tls: TLSConfig, hostname: str, state_dir: str, now: datetime.datetime | None = None) -> TLSMaterial:
    """
    Read (and when needed generate) the server's certificates for C{[tls]}.

    Without a configured certificate, serve a self-signed ECDSA one and an
    RSA-2048 one beside it (for TLS 1.2 clients whose groups exclude P-256),
    both generated into C{state_dir} and made anew when fewer than 30 days
    remain.  A configured certificate is the operator's: it is served alone,
    with a warning when it has expired or expires within 30 days.
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    if tls.certificate:
        pairs = [(tls.certificate, tls.private_key)]
    else:
        tls_dir = os.path.join(state_dir, "tls")
        os.makedirs(tls_dir, mode=0o700, exist_ok=True)
        pairs = [_generated_pair(hostname, tls_dir, key_type, now) for key_type in ("ecdsa", "rsa")]
    material = []
    for cert_path, key_path in pairs:
        chain, key_pem = _load_pair(cert_path, key_path, validate=bool(tls.certificate))
        fingerprint = chain[0].fingerprint(hashes.SHA256()).hex(":").upper()
        log.info("TLS certificate {path} SHA-256 fingerprint {fingerprint}", path=cert_path, fingerprint=fingerprint)
        if tls.certificate:
            _warn_if_expiring(cert_path, chain[0], now)
        material.append((b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain), key_pem))
    return TLSMaterial(tls.profile, tuple(material))


def server_context(
    tls: TLSConfig, hostname: str, state_dir: str, now: datetime.datetime | None = None
) -> ProfileCertificateOptions:
    """Build the server's TLS options for C{[tls]} (see L{tls_material})."""
    return tls_material(tls, hostname, state_dir, now).options()
