"""Upstream TLS against fake upstreams over real loopback TLS: no credential ever leaves the proxy
unless the upstream's certificate verified, and STLS stripping or response injection fail safe.

The proxy runs in this process (pytest-twisted's reactor) and the client is a blocking socket client
in a thread, so every TLS handshake here is real.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from popproxy.config import load_config
from popproxy.pki import CertificateAuthority, IssuedCertificate
from popproxy.service import ProxyService
from popproxy.testing import FakePOP3Factory, wire_body

from support.pop3client import RawPOP3
from support.proxyproc import free_port

MESSAGE = b"Subject: tls\r\n\r\n.dot\r\nbody\r\n"


def server_options(leaf: IssuedCertificate) -> CertificateOptions:
    return CertificateOptions(
        privateKey=leaf.key,
        certificate=leaf.certificate,
        extraCertChain=[leaf.issuer],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


class Setup:
    """A fake upstream on loopback (TLS as asked) and an in-process proxy in front of it."""

    def __init__(self, tmp_path: Path, ca: CertificateAuthority, upstream_tls: str, leaf: IssuedCertificate,
                 server_name: str = "localhost", **fake_options: Any) -> None:
        self.tmp_path = tmp_path
        self.ca = ca
        self.upstream_tls = upstream_tls
        self.fake = FakePOP3Factory(tls=server_options(leaf) if upstream_tls == "starttls" else None, **fake_options)
        self.fake.add_user("alice", "alice-pw", [MESSAGE])
        self.leaf = leaf
        self.server_name = server_name
        self.ports: list[Any] = []
        self.service: ProxyService | None = None

    async def start(self) -> int:
        factory = self.fake
        if self.upstream_tls == "implicit":
            factory = TLSMemoryBIOFactory(server_options(self.leaf), False, self.fake)  # type: ignore[assignment]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.ports.append(port)
        ca_file = self.tmp_path / "upstream-ca.pem"
        ca_file.write_bytes(self.ca.cert_pem)
        listen_port = free_port()
        config = self.tmp_path / "popproxy.toml"
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{listen_port}:interface=127.0.0.1"\ntls = "none"\n'
            f'[upstream.fake]\naddress = "127.0.0.1:{port.getHost().port}"\ntls = "{self.upstream_tls}"\n'
            f'ca = "{ca_file}"\nserver_name = "{self.server_name}"\nconnect_timeout = 5\n'
            '[routing]\ndefault = "fake"\n'
        )
        self.service = ProxyService(load_config(config), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        return listen_port

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stopService()
        for port in self.ports:
            await port.stopListening()


def session(port: int, script: list[tuple[bytes, bool]]) -> list[bytes]:
    """Run a scripted client session in a thread: greeting, then each (command, multiline)."""
    raw = RawPOP3(port)
    try:
        answers = [raw.answer()]
        for line, multiline in script:
            answers.append(raw.command(line, multiline))
        return answers
    finally:
        raw.close()


LOGIN = [(b"USER alice", False), (b"PASS alice-pw", False)]


async def run(tmp_path: Path, ca: CertificateAuthority, upstream_tls: str, leaf: IssuedCertificate,
              script: list[tuple[bytes, bool]], **options: Any) -> tuple[list[bytes], FakePOP3Factory]:
    setup = Setup(tmp_path, ca, upstream_tls, leaf, **options)
    port = await setup.start()
    try:
        answers = await deferToThread(session, port, script)
    finally:
        await setup.stop()
    return answers, setup.fake


def login_failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "auth" and e.get("result") == "unavailable"]


def assert_no_credentials(fake: FakePOP3Factory) -> None:
    assert not any(line.startswith((b"USER", b"PASS", b"AUTH")) for line in fake.received), fake.received


@pytest.mark.parametrize("upstream_tls", ["starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_verified_upstream_tls_relays(tmp_path: Path, ca: CertificateAuthority, leaf: IssuedCertificate,
                                            upstream_tls: str, events: list[dict[str, Any]]) -> None:
    answers, _fake = await run(tmp_path, ca, upstream_tls, leaf, LOGIN + [(b"RETR 1", True), (b"QUIT", False)])
    assert answers[2] == b"+OK Logged in.\r\n"
    assert answers[3] == b"+OK %d octets\r\n" % len(MESSAGE) + wire_body(MESSAGE)
    ended = [e for e in events if e.get("event") == "session_close" and e.get("user") == "alice"][-1]
    assert ended["upstream_tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert ended["upstream_peer_cert_sha256"] == leaf.sha256_fingerprint


@pytest.mark.parametrize("upstream_tls", ["starttls", "implicit"])
@pytest.mark.parametrize("problem", ["untrusted", "wrong name", "expired"])
@pytest_twisted.ensureDeferred
async def test_unverifiable_upstream_gets_no_credentials(
    tmp_path: Path, ca: CertificateAuthority, upstream_tls: str, problem: str, events: list[dict[str, Any]]
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if problem == "untrusted":
        leaf = CertificateAuthority.create("someone else's CA").issue(["localhost", "127.0.0.1"])
    elif problem == "wrong name":
        leaf = ca.issue(["mail.example.net"])
    else:
        leaf = ca.issue(["localhost"], not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1))
    answers, fake = await run(tmp_path, ca, upstream_tls, leaf, LOGIN + [(b"NOOP", False)])
    assert answers[2].startswith(b"-ERR [SYS/TEMP] ")
    assert answers[3] == b"+OK\r\n"  # the session goes on; the client may try again
    assert_no_credentials(fake)
    failure = login_failures(events)[-1]
    assert failure["upstream"] == "fake"
    assert "TLS" in failure["reason"] or "verif" in failure["reason"].lower() or "certificate" in failure["reason"].lower()


@pytest_twisted.ensureDeferred
async def test_upstream_without_stls_gets_no_credentials(tmp_path: Path, ca: CertificateAuthority,
                                                          leaf: IssuedCertificate, events: list[dict[str, Any]]) -> None:
    """An RFC 1939 server that knows no STLS: the proxy asks for STLS first (no CAPA before TLS,
    RFC 2595 §4), gets -ERR, and sends nothing more."""
    answers, fake = await run(tmp_path, ca, "starttls", leaf, LOGIN, offer_stls=False, accept_stls=False)
    assert answers[2].startswith(b"-ERR [SYS/TEMP] ")
    assert fake.received == [b"STLS"]
    assert "refused STLS" in login_failures(events)[-1]["reason"]


@pytest_twisted.ensureDeferred
async def test_upstream_refusing_stls_gets_no_credentials(tmp_path: Path, ca: CertificateAuthority,
                                                           leaf: IssuedCertificate, events: list[dict[str, Any]]) -> None:
    answers, fake = await run(tmp_path, ca, "starttls", leaf, LOGIN, accept_stls=False)
    assert answers[2].startswith(b"-ERR [SYS/TEMP] ")
    assert fake.received == [b"STLS"]
    assert "refused STLS" in login_failures(events)[-1]["reason"]


@pytest_twisted.ensureDeferred
async def test_response_injected_after_stls_is_discarded(tmp_path: Path, ca: CertificateAuthority,
                                                          leaf: IssuedCertificate, events: list[dict[str, Any]]) -> None:
    """A man in the middle appends answers after +OK to STLS, in plain text; they must not be taken
    as the answers to CAPA, USER or PASS."""
    injected = b"+OK Capability list follows\r\nUSER\r\n.\r\n+OK\r\n+OK injected login\r\n"
    answers, fake = await run(tmp_path, ca, "starttls", leaf, LOGIN + [(b"STAT", False), (b"RETR 1", True)],
                              inject_after_stls=injected)
    assert answers[2] == b"+OK Logged in.\r\n"
    assert answers[3] == b"+OK 1 %d\r\n" % len(MESSAGE)
    assert answers[4] == b"+OK %d octets\r\n" % len(MESSAGE) + wire_body(MESSAGE)
    assert fake.received[:3] == [b"STLS", b"CAPA", b"USER alice"]
    warnings = [e for e in events if "plain text after +OK to STLS" in str(e.get("log_format", ""))]
    assert warnings and warnings[-1]["count"] == len(injected)


class ResumptionRecorder:
    """A small POP3 server on stdlib ``ssl`` (whose ``session_reused`` is public), in a thread: it
    records, for each connection, whether the TLS session was resumed."""

    def __init__(self, leaf: IssuedCertificate, tmp_path: Path, upstream_tls: str) -> None:
        import socket
        import ssl
        import threading

        pem = tmp_path / "upstream-leaf.pem"
        pem.write_bytes(leaf.combined_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pem)
        self.upstream_tls = upstream_tls
        self.reused: list[bool] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import ssl

        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                self._session(raw, ssl)
            except (OSError, ssl.SSLError):
                pass
            finally:
                raw.close()

    def _session(self, raw: Any, ssl: Any) -> None:
        conn = raw
        opened: list[Any] = []
        try:
            if self.upstream_tls == "implicit":
                conn = self.context.wrap_socket(raw, server_side=True)
                opened.append(conn)
                self.reused.append(conn.session_reused)
            conn.sendall(b"+OK ready\r\n")
            reader = conn.makefile("rb")
            opened.append(reader)
            while line := reader.readline():
                verb = line.split()[0].upper() if line.split() else b""
                if verb == b"CAPA":
                    stls = b"STLS\r\n" if conn is raw and self.upstream_tls == "starttls" else b""
                    conn.sendall(b"+OK\r\nUSER\r\n" + stls + b".\r\n")
                elif verb == b"STLS":
                    conn.sendall(b"+OK go\r\n")
                    conn = self.context.wrap_socket(raw, server_side=True)
                    opened.append(conn)
                    self.reused.append(conn.session_reused)
                    reader = conn.makefile("rb")
                    opened.append(reader)
                elif verb == b"QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    if conn is not raw:
                        conn.unwrap()  # close_notify, as Dovecot sends
                    return
                else:
                    conn.sendall(b"+OK\r\n")
        finally:
            for item in reversed(opened):
                item.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("upstream_tls", ["starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_second_login_resumes_the_upstream_tls_session(tmp_path: Path, ca: CertificateAuthority,
                                                             leaf: IssuedCertificate, upstream_tls: str,
                                                             events: list[dict[str, Any]]) -> None:
    """TLS session resumption (RFC 8446 §2.2): the first login to an upstream makes a full
    handshake, the next ones resume its session, and the certificate is still the one verified."""
    upstream = ResumptionRecorder(leaf, tmp_path, upstream_tls)
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    listen_port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{listen_port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.fake]\naddress = "127.0.0.1:{upstream.port}"\ntls = "{upstream_tls}"\n'
        f'ca = "{ca_file}"\nserver_name = "localhost"\n[routing]\ndefault = "fake"\n'
    )
    service = ProxyService(load_config(config), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        for _ in range(3):
            answers = await deferToThread(session, listen_port, LOGIN + [(b"QUIT", False)])
            assert answers[2] == b"+OK Logged in.\r\n"
    finally:
        await service.stopService()
        upstream.close()
    assert upstream.reused == [False, True, True]
    ended = [e for e in events if e.get("event") == "session_close" and e.get("user") == "alice"]
    assert {e["upstream_peer_cert_sha256"] for e in ended} == {leaf.sha256_fingerprint}
