"""TLS for both legs, built from the config: listener contexts (SNI, minimum version, reload) and
upstream client options (chain and host name verification), plus the facts worth logging.

Keys and certificates are loaded with ``cryptography`` and handed to Twisted's ``CertificateOptions``
as cryptography objects: pyOpenSSL deprecates its own ``PKey``/``X509`` in its APIs and warns when
given them (pyOpenSSL's changelog, 24.3.0). Everything that can be wrong with a file is reported as a ``ConfigError`` at load time,
never in the middle of a client's handshake.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from zope.interface import implementer

from .config import ConfigError, ListenerConfig, ProxyConfig, UpstreamConfig

if TYPE_CHECKING:  # exported at run time as twisted.internet.ssl.IOpenSSLTrustRoot, untyped there
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = ["ServerTLS", "check_tls", "client_tls", "load_certificate_file", "tls_facts"]

_MINIMUM_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
_UPSTREAM_MINIMUM = TLSVersion.TLSv1_2


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def load_certificate_file(
    path: Path, key: str, config_path: Path, *, now: datetime.datetime | None = None
) -> tuple[PrivateKeyTypes, list[x509.Certificate]]:
    """Load a listener's PEM file: the unencrypted private key and the chain, the server's own first.

    Refuses a file that clients would refuse anyway, so the operator hears about it now:
    a key that does not belong to the first certificate, or a first certificate that is expired or
    not yet valid at ``now`` (default: the current time). Only the server's own certificate is
    dated: an outdated cross-signed intermediate is harmless to clients that build other paths.

    :param key: the config key to blame, e.g. ``listen[0].certificate``.
    :raises ConfigError: naming ``config_path``, ``key`` and the file.
    """

    def fail(reason: str) -> ConfigError:
        return ConfigError(config_path, key, f"{path}: {reason}")

    try:
        data = path.read_bytes()
    except OSError as error:
        raise fail(f"cannot read: {error.strerror or error}") from None
    try:
        private_key = load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise fail(
            "the private key is encrypted; give popproxy an unencrypted key in a mode 0600 file"
        ) from None
    except UnsupportedAlgorithm as error:
        raise fail(f"unsupported private key: {error}") from None
    except ValueError:
        raise fail("no private key (expected a PEM private key followed by the certificate chain)") from None
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise fail("no certificate (expected a PEM private key followed by the certificate chain)") from None
    leaf = chain[0]
    if private_key.public_key() != leaf.public_key():
        raise fail("key does not match certificate (the server's own certificate must come first)")
    now = now or _utc_now()
    if leaf.not_valid_after_utc < now:
        raise fail(f"certificate expired on {_when(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > now:
        raise fail(f"certificate not valid before {_when(leaf.not_valid_before_utc)}")
    return private_key, chain


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The subjectAltName DNS names, lowercased. The subject CN is ignored, as clients ignore it
    whenever a SAN is present (RFC 6125 §6.4.4)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName))


@dataclass(frozen=True)
class _Served:
    """One certificate file as served: its options, and what SNI and expiry warnings need."""

    path: Path
    names: tuple[str, ...]
    not_after: datetime.datetime
    options: CertificateOptions


class _CertificateSet:
    """One generation of a listener's certificates, the first being the default.

    Never changed once built, so a reload (which swaps the whole set) cannot affect a handshake
    already under way: its SNI callback belongs to the set the connection started with.
    """

    def __init__(
        self, loaded: Sequence[tuple[Path, PrivateKeyTypes, list[x509.Certificate]]], minimum: TLSVersion,
        session_tickets: bool = True,
    ) -> None:
        self.loaded = tuple(loaded)
        self.minimum = minimum
        self.session_tickets = session_tickets
        self._exact: dict[str, int] = {}
        self._wildcard: dict[str, int] = {}  # "example.org" for "*.example.org"
        served = []
        for index, (path, private_key, chain) in enumerate(loaded):
            names = _dns_names(chain[0])
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], index)
                elif "*" not in name:  # partial wildcards ("f*.example.org") are not matched
                    self._exact.setdefault(name, index)
            options = CertificateOptions(
                privateKey=private_key,  # type: ignore[arg-type]  # cryptography objects are accepted
                certificate=chain[0],  # type: ignore[arg-type]
                extraCertChain=chain[1:],  # type: ignore[arg-type]
                raiseMinimumTo=minimum,
                # Only the default context sees the ClientHello's name; it may switch to another.
                contextForServerName=None if index else self.context_for,
                # RFC 8446 §2.2 / RFC 5077: a returning client resumes with a ticket instead of a full
                # handshake. OpenSSL makes a random ticket key for each context, so building the set
                # anew (``ServerTLS.rotate_ticket_key``) replaces the key.
                enableSessionTickets=session_tickets,
            )
            served.append(_Served(path, names, chain[0].not_valid_after_utc, options))
        self.served = tuple(served)

    def select(self, server_name: str | None) -> int:
        """The index of the certificate for ``server_name``; 0 (the default) when none matches.

        An exact name beats a wildcard, then the earlier file wins. A wildcard covers exactly one
        leftmost label (RFC 6125 §6.4.3): ``*.example.org`` matches ``pop.example.org`` only.
        """
        if not server_name:
            return 0
        name = server_name.lower().rstrip(".")
        if name in self._exact:
            return self._exact[name]
        _, dot, parent = name.partition(".")
        return self._wildcard.get(parent, 0) if dot else 0

    def context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """SNI callback (RFC 6066 §3) on the default context; None keeps the default."""
        index = self.select(server_name.decode("ascii", "replace") if server_name else None)
        return self.served[index].options.getContext() if index else None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Listener TLS: certificates chosen by SNI, TLS 1.2 minimum (1.3 if configured), reloadable.

    SNI matches the subjectAltName DNS names of each file, a leading wildcard ``*.x`` included; the
    first file is the default for clients that send no name or an unknown one. Works with
    ``transport.startTLS`` (STLS), ``TLSMemoryBIOFactory`` and ``SSL4ServerEndpoint`` alike.
    ``reload`` swaps in new certificates for new handshakes only; live sessions keep theirs.
    """

    def __init__(self, certificates: _CertificateSet, built_at: float = 0.0) -> None:
        self._certificates = certificates
        self.built_at = built_at  # when the current ticket key was made (the clock's seconds)

    @classmethod
    def from_listener(
        cls, listener: ListenerConfig, config_path: Path, *, now: datetime.datetime | None = None
    ) -> ServerTLS:
        """Load every certificate file of ``listener`` and build (not just describe) its contexts.

        Building the OpenSSL contexts here runs OpenSSL's own checks at load time too, and keeps
        that work out of the SNI callback.

        :raises ConfigError: for a listener without certificates or with any unusable file.
        """
        if not listener.certificates:
            raise ConfigError(config_path, f"{listener.key}.certificate", "no certificate configured")
        several = len(listener.certificates) > 1
        keys = [
            f"{listener.key}.certificate" + (f"[{index}]" if several else "")
            for index in range(len(listener.certificates))
        ]
        loaded = [
            (path, *load_certificate_file(path, key, config_path, now=now))
            for key, path in zip(keys, listener.certificates, strict=True)
        ]
        certificates = _CertificateSet(loaded, _MINIMUM_VERSIONS[listener.tls_min_version], listener.session_tickets)
        for key, entry in zip(keys, certificates.served, strict=True):
            try:
                entry.options.getContext()
            except SSL.Error as error:
                raise ConfigError(config_path, key, f"{entry.path}: OpenSSL refused it: {error}") from None
        return cls(certificates)

    def reload(self, new: ServerTLS) -> None:
        """Serve ``new``'s certificates from the next handshake on (SIGHUP)."""
        self._certificates = new._certificates
        self.built_at = new.built_at

    def rotate_ticket_key(self, now: float) -> None:
        """Replace the session-ticket key (new contexts from the key material already loaded, no
        file is read again): tickets issued before stop resuming and get a full handshake."""
        old = self._certificates
        fresh = _CertificateSet(old.loaded, old.minimum, old.session_tickets)
        for entry in fresh.served:
            entry.options.getContext()
        self._certificates = fresh
        self.built_at = now

    def rotate_if_due(self, now: float, lifetime: float) -> bool:
        """Rotate the ticket key if it is ``lifetime`` seconds old (and tickets are on)."""
        if not self._certificates.session_tickets or now - self.built_at < lifetime:
            return False
        self.rotate_ticket_key(now)
        return True

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Start a handshake with the default certificate; the SNI callback may switch it."""
        return self._certificates.served[0].options.serverConnectionForTLS(tlsProtocol)

    def certificate_for(self, server_name: str | None) -> Path:
        """The file that a client asking for ``server_name`` by SNI is served (for diagnostics)."""
        return self._certificates.served[self._certificates.select(server_name)].path

    def expiring(
        self, within: datetime.timedelta, now: datetime.datetime
    ) -> list[tuple[Path, datetime.datetime]]:
        """Files whose own certificate expires before ``now + within``, soonest first.

        ``now`` must be timezone-aware. Meant for a daily warning well before clients start failing.
        """
        limit = now + within
        due = [
            (entry.path, entry.not_after) for entry in self._certificates.served if entry.not_after <= limit
        ]
        return sorted(due, key=lambda item: item[1])


def client_tls(
    upstream: UpstreamConfig, hostname: str | None = None, *, config_path: Path | None = None
) -> ResumingClientTLS:
    """Client TLS options for ``upstream`` (STLS or implicit TLS), TLS 1.2 at least.

    With ``verify`` (the default), the chain must lead to ``upstream.ca`` (or the system's roots)
    and the certificate must name ``hostname`` (default ``upstream.server_name``), checked by
    ``service_identity``. With ``verify = false`` nothing about the certificate is checked, but the
    name is still sent as SNI, so an upstream hosting several names presents the right one.

    Results are cached, keyed by the upstream's settings, the name and the ``ca`` file's identity
    (inode, size, mtime): the CA file is not read and parsed again for every connection, yet a file
    replaced on disk takes effect with the next connection.

    :param config_path: the configuration file, to name in errors.
    :raises ConfigError: for an unreadable or empty ``ca`` file, or an unusable server name.
    """
    ca_version = _file_version(upstream.ca) if upstream.verify and upstream.ca else None
    return _client_tls(upstream, hostname or upstream.server_name, config_path or Path("-"), ca_version)


def _file_version(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None  # _trust_root reports the problem, and errors are not cached
    return (status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=128)
def _client_tls(
    upstream: UpstreamConfig, server_name: str, config_path: Path, ca_version: object
) -> ResumingClientTLS:
    key = f"upstream.{upstream.name}"
    try:
        if not upstream.verify:
            options = CertificateOptions(verify=False, raiseMinimumTo=_UPSTREAM_MINIMUM, enableSessionTickets=True)
            options.getContext()
            return ResumingClientTLS(cast(IOpenSSLClientConnectionCreator, _UnverifiedClientTLS(options, server_name)))
        trust_root = _trust_root(upstream.ca, f"{key}.ca", config_path) if upstream.ca else None
        return ResumingClientTLS(optionsForClientTLS(
            server_name,
            trustRoot=trust_root,  # None: platformTrust()
            # Twisted turns tickets off unless asked (OP_NO_TICKET): they carry the resumable session.
            extraCertificateOptions={"raiseMinimumTo": _UPSTREAM_MINIMUM, "enableSessionTickets": True},
        ))
    except UnicodeError as error:  # the name cannot be IDNA-encoded
        raise ConfigError(
            config_path, f"{key}.server_name", f"{server_name!r} is not a usable host name: {error}"
        ) from None


def _trust_root(ca: Path, key: str, config_path: Path) -> IOpenSSLTrustRoot:
    try:
        data = ca.read_bytes()
    except OSError as error:
        raise ConfigError(config_path, key, f"{ca}: cannot read: {error.strerror or error}") from None
    try:
        roots = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(config_path, key, f"{ca}: no PEM certificates found") from None
    certificates = [Certificate.loadPEM(root.public_bytes(serialization.Encoding.PEM)) for root in roots]
    return trustRootFromCertificates(certificates)  # type: ignore[no-any-return]


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClientTLS:
    """Client TLS options that offer an upstream the last session it issued, so that a login
    costs an abbreviated handshake instead of a full one (TLS session resumption: RFC 8446 §2.2
    with TLS 1.3 tickets, RFC 5077 for TLS 1.2). One per upstream (``client_tls`` caches them by
    the upstream's settings), so a session is only ever offered to the server that issued it, and
    checked as before: the certificate of a resumed session is verified by the same callback.
    If the upstream declines, the handshake is a full one, as without a session.
    """

    def __init__(self, options: IOpenSSLClientConnectionCreator) -> None:
        self._options = options
        self._session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._session is not None:
            connection.set_session(self._session)
        return connection

    def remember(self, connection: object) -> None:
        """Keep ``connection``'s session for the next one. Called once the login's answers have
        been read, so that a TLS 1.3 ticket, which comes after the handshake, is in."""
        if isinstance(connection, SSL.Connection):
            session = connection.get_session()
            if session is not None:
                self._session = session


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """``verify = false``: encrypt, accept any certificate, and still send SNI.

    Twisted's ``ClientTLSOptions`` cannot be used here: it always checks the host name. IP
    literals are not sent as SNI, which RFC 6066 §3 forbids.
    """

    def __init__(self, options: CertificateOptions, server_name: str) -> None:
        self._options = options
        self._sni = None if _is_ip(server_name) else _sni_bytes(server_name)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _sni_bytes(name: str) -> bytes:
    """SNI carries A-labels (RFC 6066 §3); ASCII names go as they are (underscores and all)."""
    return name.encode("ascii") if name.isascii() else idna.encode(name, uts46=True)


def check_tls(config: ProxyConfig) -> None:
    """Build every TLS context the configuration needs, so that bad files fail at start or reload.

    Covers each TLS listener's certificates (key/certificate mismatch, expiry, OpenSSL's own
    checks) and each TLS upstream's trust roots and server name.

    :raises ConfigError: naming the file and key at fault.
    """
    for listener in config.listeners:
        if listener.tls != "none":
            ServerTLS.from_listener(listener, config.path)
    for upstream in config.upstreams.values():
        if upstream.tls != "none":
            client_tls(upstream, config_path=config.path)


def tls_facts(transport: object) -> dict[str, str]:
    """The negotiated TLS version and cipher and the SHA-256 of the peer's certificate, for logs.

    Returns ``{}`` for a plaintext transport or a handshake not yet finished. Reads the
    ``OpenSSL.SSL.Connection`` from ``getHandle()``, which also works behind the ``haproxy:``
    wrapper, which copies its transport's interfaces when the connection is made, so that
    ``ISSLTransport`` is not provided after STLS (``twisted.protocols.policies.ProtocolWrapper``). Never raises: it is
    called from logging paths. ``peer_cert_sha256`` is ``""`` when the peer sent no certificate
    (the client leg, normally).
    """
    try:
        connection = transport.getHandle()  # type: ignore[attr-defined]
        if not isinstance(connection, SSL.Connection):
            return {}
        cipher = connection.get_cipher_name()
        if cipher is None:
            return {}
        peer = connection.get_peer_certificate(as_cryptography=True)
        return {
            "tls_version": connection.get_protocol_version_name(),
            "tls_cipher": cipher,
            "peer_cert_sha256": peer.fingerprint(hashes.SHA256()).hex() if peer is not None else "",
        }
    except Exception:  # noqa: BLE001  # anything at all: a log line must not break a session
        return {}
