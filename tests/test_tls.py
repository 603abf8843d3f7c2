"""popproxy.tls: real TLS handshakes in memory (TLSMemoryBIOProtocol over iosim), no sockets."""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popproxy.config import Address, ConfigError, ListenerConfig, UpstreamConfig, parse_config
from popproxy.pki import CertificateAuthority, IssuedCertificate, write_private
from popproxy.tls import ServerTLS, check_tls, client_tls, load_certificate_file, tls_facts

DAY = datetime.timedelta(days=1)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.create("some other CA")


# --- helpers -----------------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Records whether the handshake completed and why the connection ended."""

    def __init__(self) -> None:
        self.handshook = False
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshook = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@dataclass
class Handshake:
    client: TLSMemoryBIOProtocol
    server: TLSMemoryBIOProtocol
    client_peer: Peer  # kept here: the TLS wrapper forgets its wrapped protocol once the connection is lost
    server_peer: Peer

    @property
    def succeeded(self) -> bool:
        return self.client_peer.handshook and self.server_peer.handshook

    def served_fingerprint(self) -> str:
        """SHA-256 of the certificate the client received."""
        return tls_facts(self.client_peer.transport)["peer_cert_sha256"]

    def client_failure(self) -> Failure:
        assert not self.succeeded
        assert self.client_peer.lost is not None
        return self.client_peer.lost


def handshake(server_tls: Any, client_tls_: Any) -> Handshake:
    """Connect a TLS client and server in memory and pump until the handshake settles."""
    server = TLSMemoryBIOFactory(server_tls, False, Factory.forProtocol(Peer)).buildProtocol(None)
    client = TLSMemoryBIOFactory(client_tls_, True, Factory.forProtocol(Peer)).buildProtocol(None)
    result = Handshake(client, server, client.wrappedProtocol, server.wrappedProtocol)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client)
    pump.flush()
    return result


def trusting(ca: CertificateAuthority, name: str = "localhost", **extra: object) -> Any:
    """A client that trusts ``ca`` and expects ``name``: Twisted's own, to test the server side."""
    return optionsForClientTLS(
        name, trustRoot=Certificate.loadPEM(ca.cert_pem), extraCertificateOptions=extra or None
    )


def write_combined(tmp_path: Path, name: str, issued: IssuedCertificate) -> Path:
    return write_private(tmp_path / name, issued.combined_pem)


def listener(paths: list[Path], *, tls: str = "implicit", min_version: str = "1.2") -> ListenerConfig:
    return ListenerConfig("listen[0]", "tcp:995", tls, tuple(paths), min_version, False, ())


def server_tls(tmp_path: Path, *issued: IssuedCertificate, min_version: str = "1.2") -> ServerTLS:
    paths = [write_combined(tmp_path, f"cert{index}.pem", cert) for index, cert in enumerate(issued)]
    return ServerTLS.from_listener(listener(paths, min_version=min_version), tmp_path / "popproxy.toml")


def raw_server_options(issued: IssuedCertificate) -> CertificateOptions:
    """Server options that skip popproxy's own checks, to serve an expired certificate."""
    return CertificateOptions(
        privateKey=issued.key,  # type: ignore[arg-type]
        certificate=issued.certificate,  # type: ignore[arg-type]
        extraCertChain=[issued.issuer],  # type: ignore[list-item]
    )


def upstream(
    ca_path: Path | None = None, *, verify: bool = True, server_name: str = "localhost"
) -> UpstreamConfig:
    return UpstreamConfig(
        name="mail",
        addresses=(Address("127.0.0.1", 995),),
        tls="implicit",
        connect_timeout=10.0,
        verify=verify,
        ca=ca_path,
        server_name=server_name,
        login_as="{user}",
    )


def ca_file(tmp_path: Path, ca: CertificateAuthority) -> Path:
    path = tmp_path / "upstream-ca.pem"
    path.write_bytes(ca.cert_pem)
    return path


# --- listener side: SNI, default, minimum version, reload, expiry ------------------------------------


def test_server_tls_provides_the_interface(tmp_path: Path, ca: CertificateAuthority) -> None:
    assert verifyObject(IOpenSSLServerConnectionCreator, server_tls(tmp_path, ca.issue()))


def test_sni_picks_the_right_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    default = ca.issue(["localhost", "127.0.0.1"])
    wildcard = ca.issue(["*.example.org"])
    exact = ca.issue(["pop.example.org"])
    tls = server_tls(tmp_path, default, wildcard, exact)

    for name, expected in [
        ("pop.example.org", exact),  # an exact name beats an earlier wildcard
        ("mail.example.org", wildcard),
        ("localhost", default),
    ]:
        result = handshake(tls, trusting(ca, name))
        assert result.succeeded, name
        assert result.served_fingerprint() == expected.sha256_fingerprint, name


def test_default_certificate_without_sni(tmp_path: Path, ca: CertificateAuthority) -> None:
    default = ca.issue(["localhost", "127.0.0.1"])
    tls = server_tls(tmp_path, default, ca.issue(["pop.example.org"]))

    # Twisted sends no SNI for an IP address (RFC 6066 §3); the certificate's IP SAN verifies.
    result = handshake(tls, trusting(ca, "127.0.0.1"))

    assert result.succeeded
    assert result.served_fingerprint() == default.sha256_fingerprint


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        (None, 0),
        ("", 0),
        ("localhost", 0),
        ("pop.example.org", 2),
        ("POP.Example.ORG.", 2),  # case and a trailing dot do not matter
        ("mail.example.org", 1),
        ("a.mail.example.org", 0),  # a wildcard covers one label only (RFC 6125 §6.4.3)
        ("example.org", 0),
        ("unknown.test", 0),
    ],
)
def test_certificate_for(
    tmp_path: Path, ca: CertificateAuthority, server_name: str | None, expected: int
) -> None:
    tls = server_tls(
        tmp_path, ca.issue(["localhost"]), ca.issue(["*.example.org"]), ca.issue(["pop.example.org"])
    )
    assert tls.certificate_for(server_name) == tmp_path / f"cert{expected}.pem"


def test_first_file_wins_for_a_name_in_two_files(tmp_path: Path, ca: CertificateAuthority) -> None:
    tls = server_tls(tmp_path, ca.issue(["localhost"]), ca.issue(["a.test"]), ca.issue(["a.test"]))
    assert tls.certificate_for("a.test") == tmp_path / "cert1.pem"


def test_tls13_minimum_refuses_a_tls12_client(tmp_path: Path, ca: CertificateAuthority) -> None:
    tls = server_tls(tmp_path, ca.issue(), min_version="1.3")

    refused = handshake(tls, trusting(ca, lowerMaximumSecurityTo=TLSVersion.TLSv1_2))
    accepted = handshake(tls, trusting(ca))

    assert refused.client_failure().check(SSL.Error)
    assert "protocol version" in str(refused.client_failure().value)
    assert accepted.succeeded
    assert tls_facts(accepted.client)["tls_version"] == "TLSv1.3"


def test_tls12_minimum_accepts_a_tls12_client(tmp_path: Path, ca: CertificateAuthority) -> None:
    result = handshake(
        server_tls(tmp_path, ca.issue()), trusting(ca, lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
    )
    assert result.succeeded
    assert tls_facts(result.client)["tls_version"] == "TLSv1.2"


def test_reload_swaps_certificates_for_new_handshakes(tmp_path: Path, ca: CertificateAuthority) -> None:
    old, new = ca.issue(), ca.issue()
    tls = server_tls(tmp_path, old)
    before = handshake(tls, trusting(ca))

    tls.reload(server_tls(tmp_path, new))  # the operator replaced the file, then SIGHUP
    after = handshake(tls, trusting(ca))

    assert before.served_fingerprint() == old.sha256_fingerprint
    assert after.served_fingerprint() == new.sha256_fingerprint
    assert tls_facts(before.client) != {}  # the session made before the reload goes on


def test_expiring_lists_certificates_within_the_window(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = utc_now()
    soon = ca.issue(["soon.test"], not_after=now + 10 * DAY)
    later = ca.issue(["later.test"], not_after=now + 90 * DAY)
    tls = server_tls(tmp_path, later, soon)

    assert tls.expiring(30 * DAY, now) == [(tmp_path / "cert1.pem", soon.certificate.not_valid_after_utc)]
    assert [path for path, _ in tls.expiring(100 * DAY, now)] == [
        tmp_path / "cert1.pem",
        tmp_path / "cert0.pem",
    ]
    assert tls.expiring(5 * DAY, now) == []


# --- loading certificate files -----------------------------------------------------------------------


def load_error(path: Path, *, now: datetime.datetime | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_certificate_file(path, "listen[0].certificate", path.parent / "popproxy.toml", now=now)
    error = caught.value
    assert (error.key, error.path) == ("listen[0].certificate", str(path.parent / "popproxy.toml"))
    assert str(path) in error.reason
    return error


def test_load_certificate_file(tmp_path: Path, ca: CertificateAuthority) -> None:
    issued = ca.issue()
    key, chain = load_certificate_file(write_combined(tmp_path, "tls.pem", issued), "k", tmp_path / "c.toml")
    assert key.public_key() == issued.certificate.public_key()
    assert chain == [issued.certificate, ca.certificate]


def test_load_refuses_a_file_without_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = write_private(tmp_path / "tls.pem", ca.issue().chain_pem)
    assert "no private key" in load_error(path).reason


def test_load_refuses_a_file_without_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = write_private(tmp_path / "tls.pem", ca.issue().key_pem)
    assert "no certificate" in load_error(path).reason


def test_load_refuses_a_key_that_does_not_match(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = write_private(tmp_path / "tls.pem", ca.issue().key_pem + ca.issue().chain_pem)
    assert "key does not match certificate" in load_error(path).reason


def test_load_refuses_an_encrypted_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    issued = ca.issue()
    encrypted = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = write_private(tmp_path / "tls.pem", encrypted + issued.chain_pem)
    assert "encrypted" in load_error(path).reason


def test_load_refuses_an_expired_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = utc_now()
    issued = ca.issue(not_before=now - 30 * DAY, not_after=now - DAY)
    error = load_error(write_combined(tmp_path, "tls.pem", issued))
    assert f"expired on {(now - DAY):%Y-%m-%d}" in error.reason


def test_load_refuses_a_certificate_not_yet_valid(tmp_path: Path, ca: CertificateAuthority) -> None:
    issued = ca.issue(not_before=utc_now() + DAY)
    assert "not valid before" in load_error(write_combined(tmp_path, "tls.pem", issued)).reason


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    assert "cannot read" in load_error(tmp_path / "gone.pem").reason


# --- check_tls: the whole configuration, at start and reload ------------------------------------------


def config_with(tmp_path: Path, certificate: str, upstream_lines: str = 'tls = "none"') -> str:
    return f"""
[[listen]]
endpoint = "tcp:995"
tls = "implicit"
certificate = {certificate}

[upstream.mail]
address = "localhost:995"
{upstream_lines}

[routing]
default = "mail"
"""


def test_check_tls_accepts_a_good_configuration(tmp_path: Path, ca: CertificateAuthority) -> None:
    write_combined(tmp_path, "tls.pem", ca.issue())
    ca_file(tmp_path, ca)
    text = config_with(tmp_path, '"tls.pem"', 'tls = "implicit"\nca = "upstream-ca.pem"')
    check_tls(parse_config(text, tmp_path / "popproxy.toml"))


def test_check_tls_names_the_file_and_key_of_a_mismatched_pair(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    write_combined(tmp_path, "good.pem", ca.issue())
    bad = write_private(tmp_path / "bad.pem", ca.issue().key_pem + ca.issue().chain_pem)
    config = parse_config(config_with(tmp_path, '["good.pem", "bad.pem"]'), tmp_path / "popproxy.toml")

    with pytest.raises(ConfigError) as caught:
        check_tls(config)

    assert caught.value.key == "listen[0].certificate[1]"
    assert str(bad) in caught.value.reason
    assert "key does not match certificate" in caught.value.reason
    assert caught.value.path == str(tmp_path / "popproxy.toml")


def test_check_tls_refuses_a_ca_file_without_certificates(tmp_path: Path, ca: CertificateAuthority) -> None:
    write_combined(tmp_path, "tls.pem", ca.issue())
    (tmp_path / "upstream-ca.pem").write_text("not a certificate\n")
    text = config_with(tmp_path, '"tls.pem"', 'tls = "starttls"\nca = "upstream-ca.pem"')

    with pytest.raises(ConfigError) as caught:
        check_tls(parse_config(text, tmp_path / "popproxy.toml"))

    assert caught.value.key == "upstream.mail.ca"
    assert "no PEM certificates" in caught.value.reason


def test_check_tls_refuses_a_server_name_that_cannot_be_verified(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    write_combined(tmp_path, "tls.pem", ca.issue())
    text = config_with(tmp_path, '"tls.pem"', 'tls = "implicit"\nserver_name = "mail_1.internal"')

    with pytest.raises(ConfigError) as caught:
        check_tls(parse_config(text, tmp_path / "popproxy.toml"))

    assert caught.value.key == "upstream.mail.server_name"


# --- upstream side: client_tls -----------------------------------------------------------------------


def test_client_tls_provides_the_interface(tmp_path: Path, ca: CertificateAuthority) -> None:
    assert verifyObject(IOpenSSLClientConnectionCreator, client_tls(upstream(ca_file(tmp_path, ca))))
    assert verifyObject(IOpenSSLClientConnectionCreator, client_tls(upstream(verify=False)))


def test_client_tls_accepts_the_right_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    issued = ca.issue(["localhost"])
    result = handshake(raw_server_options(issued), client_tls(upstream(ca_file(tmp_path, ca))))
    assert result.succeeded
    assert result.served_fingerprint() == issued.sha256_fingerprint


def test_client_tls_refuses_an_untrusted_ca(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    result = handshake(raw_server_options(ca.issue()), client_tls(upstream(ca_file(tmp_path, other_ca))))
    assert result.client_failure().check(SSL.Error)
    assert "certificate verify failed" in str(result.client_failure().value)


def test_client_tls_uses_the_system_roots_without_ca(ca: CertificateAuthority) -> None:
    result = handshake(raw_server_options(ca.issue()), client_tls(upstream(None)))
    assert result.client_failure().check(SSL.Error)


def test_client_tls_refuses_a_wrong_name(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = raw_server_options(ca.issue(["localhost"]))
    result = handshake(server, client_tls(upstream(ca_file(tmp_path, ca), server_name="mail.internal")))
    assert result.client_failure().check(VerificationError)


def test_client_tls_hostname_overrides_server_name(tmp_path: Path, ca: CertificateAuthority) -> None:
    server = raw_server_options(ca.issue(["mail.internal"]))
    result = handshake(server, client_tls(upstream(ca_file(tmp_path, ca)), "mail.internal"))
    assert result.succeeded


def test_client_tls_refuses_an_expired_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = utc_now()
    expired = ca.issue(not_before=now - 30 * DAY, not_after=now - DAY)
    # trusted CA and right name, as in test_client_tls_accepts_the_right_certificate: only the dates differ
    result = handshake(raw_server_options(expired), client_tls(upstream(ca_file(tmp_path, ca))))
    assert result.client_failure().check(SSL.Error)


def test_client_tls_without_verify_accepts_anything(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    now = utc_now()
    expired_other = other_ca.issue(["elsewhere.test"], not_before=now - 30 * DAY, not_after=now - DAY)
    result = handshake(raw_server_options(expired_other), client_tls(upstream(verify=False)))
    assert result.succeeded


def test_client_tls_without_verify_still_sends_sni(tmp_path: Path, ca: CertificateAuthority) -> None:
    wanted = ca.issue(["pop.example.org"])
    tls = server_tls(tmp_path, ca.issue(["localhost"]), wanted)

    named = handshake(tls, client_tls(upstream(verify=False, server_name="pop.example.org")))
    by_ip = handshake(tls, client_tls(upstream(verify=False, server_name="127.0.0.1")))

    assert named.served_fingerprint() == wanted.sha256_fingerprint
    assert by_ip.succeeded and by_ip.served_fingerprint() != wanted.sha256_fingerprint


def test_client_tls_is_cached_per_upstream(tmp_path: Path, ca: CertificateAuthority) -> None:
    config = upstream(ca_file(tmp_path, ca))
    assert client_tls(config) is client_tls(config)
    assert client_tls(config) is not client_tls(config, "other.test")


def test_client_tls_rereads_a_replaced_ca_file(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    config = upstream(ca_file(tmp_path, other_ca))
    server = raw_server_options(ca.issue())
    assert not handshake(server, client_tls(config)).succeeded

    replacement = tmp_path / "new-ca.pem"
    replacement.write_bytes(ca.cert_pem)
    os.replace(replacement, tmp_path / "upstream-ca.pem")  # how a deployment swaps files atomically

    assert handshake(server, client_tls(config)).succeeded


# --- tls_facts ---------------------------------------------------------------------------------------


def test_tls_facts_after_a_handshake(tmp_path: Path, ca: CertificateAuthority) -> None:
    issued = ca.issue()
    result = handshake(server_tls(tmp_path, issued), client_tls(upstream(ca_file(tmp_path, ca))))

    client_side = tls_facts(result.client_peer.transport)
    server_side = tls_facts(result.server_peer.transport)

    assert client_side["tls_version"] == "TLSv1.3"
    assert client_side["tls_cipher"].startswith("TLS_")
    assert client_side["peer_cert_sha256"] == issued.sha256_fingerprint
    assert server_side == {**client_side, "peer_cert_sha256": ""}  # the client sent no certificate


class Exploding:
    def getHandle(self) -> object:
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "transport",
    [StringTransport(), iosim.FakeTransport(Protocol(), isServer=True), object(), None, Exploding()],
    ids=["StringTransport", "FakeTransport", "object", "None", "raising"],
)
def test_tls_facts_of_a_plain_transport_is_empty(transport: object) -> None:
    assert tls_facts(transport) == {}


def test_tls_facts_before_the_handshake_is_empty(ca: CertificateAuthority) -> None:
    factory = TLSMemoryBIOFactory(trusting(ca), True, Factory.forProtocol(Peer))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())  # ClientHello written, no answer yet
    assert tls_facts(protocol) == {}


def _resumed(tls: ServerTLS, context: Any, session: Any = None) -> tuple[bool, Any]:
    """One TLS 1.3 connection from a stdlib client (whose ``session_reused`` is public) to ``tls``,
    in memory: was the offered ``session`` resumed, and the session to offer next time."""
    import ssl

    from OpenSSL import SSL

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost", session=session)
    server = tls.serverConnectionForTLS(TLSMemoryBIOFactory(tls, False, Factory.forProtocol(Peer)).buildProtocol(None))
    server.set_accept_state()

    def pump() -> None:
        for _ in range(50):  # until nothing moves; a handshake takes a few rounds
            moved = False
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                server.bio_write(outgoing.read())
                moved = True
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                incoming.write(server.bio_read(65536))
                moved = True
            except SSL.WantReadError:
                pass
            if not moved:
                return

    pump()
    server.send(b"+OK\r\n")  # application data: the client also takes the server's tickets in
    pump()
    assert client.read(5) == b"+OK\r\n"
    return client.session_reused, client.session


def test_listener_session_tickets_resume_until_the_key_is_rotated(tmp_path: Path, ca: CertificateAuthority) -> None:
    """RFC 8446 §2.2: a returning client resumes with its ticket; after the ticket key is replaced
    (``ticket_key_lifetime``) it gets a full handshake again, and so it does where tickets are off."""
    path = write_combined(tmp_path, "cert.pem", ca.issue())
    tls = ServerTLS.from_listener(listener([path]), tmp_path / "popproxy.toml")
    import ssl

    ca_trust = ssl.create_default_context(cadata=ca.cert_pem.decode())  # sessions belong to one context
    first, session = _resumed(tls, ca_trust)
    second, session = _resumed(tls, ca_trust, session)
    assert (first, second) == (False, True)
    assert not tls.rotate_if_due(now=100.0, lifetime=3600.0)  # built at 0: not due yet
    assert tls.rotate_if_due(now=3600.0, lifetime=3600.0)
    third, _ = _resumed(tls, ca_trust, session)
    assert third is False
    off = ServerTLS.from_listener(dataclasses.replace(listener([path]), session_tickets=False), tmp_path / "popproxy.toml")
    _, session = _resumed(off, ca_trust)
    assert _resumed(off, ca_trust, session)[0] is False
