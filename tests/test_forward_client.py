"""``forward_client``: a real Dovecot sees the client's own address, not the proxy's.

Clients are Python's poplib with the socket bound to a source address of 127/8 (Linux routes all of
it to ``lo``), so "the client's address" is a real one: 127.0.0.2 or 127.0.0.3, while the proxy
connects upstream from 127.0.0.1. Dovecot logs the address it believes as ``rip=`` in its login
lines; with its anvil auth penalty on, failed logins slow the next logins from that address only.

The proxy runs in this process (pytest-twisted's reactor, as in ``test_upstream_tls.py``); each
client runs in a thread. Dovecot (``support.dovecot``) trusts 127.0.0.1 for XCLIENT
(``login_trusted_networks``) and for PROXY headers (``haproxy_trusted_networks``); a second one
trusts nobody.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher

from popproxy.config import Address, ConfigError, UpstreamConfig, load_config, parse_config
from popproxy.pki import CertificateAuthority
from popproxy.protocol.connector import ClientOrigin, LoggedIn, UpstreamConnector, proxy_header
from popproxy.proxyheader import build_v2, build_v2_local
from popproxy.service import ProxyService
from popproxy.testing import FakePOP3Factory

from support.dovecot import DovecotServer
from support.pop3client import BoundPOP3, timed_login
from support.proxyproc import free_port

MESSAGE = b"Subject: forwarded\r\n\r\nbody\r\n"
PASSWORD = "alice-pw"
TRUSTED = "127.0.0.1/32"  # the proxy's source address towards Dovecot


@pytest.fixture(scope="module")
def trusting(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    """Dovecot that trusts the proxy for XCLIENT and PROXY headers, with the auth penalty on."""
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-trusting"), ca=ca, trusted_networks=TRUSTED,
                           haproxy_trusted_networks=TRUSTED, auth_penalty=True)
    server.add_user("alice", PASSWORD, [MESSAGE])
    with server:
        yield server


@pytest.fixture(scope="module")
def untrusting(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    """Dovecot as installed: no login_trusted_networks, so no XCLIENT for the proxy."""
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-untrusting"), ca=ca)
    server.add_user("alice", PASSWORD, [MESSAGE])
    with server:
        yield server


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def upstream_table(name: str, port: int, tls: str, forward: str, cafile: Path) -> str:
    text = f'[upstream.{name}]\naddress = "127.0.0.1:{port}"\ntls = "{tls}"\nforward_client = "{forward}"\n'
    text += 'login_as = "{local}"\nconnect_timeout = 5\n'
    if tls != "none":
        text += f'ca = "{cafile}"\nserver_name = "localhost"\n'
    return text


class Proxy:
    """popproxy in this process in front of both Dovecots (and a fake upstream without XCLIENT),
    one upstream per combination; user ``alice@<upstream name>`` is routed to that upstream and
    logs in there as ``alice``."""

    def __init__(self, tmp_path: Path, trusting: DovecotServer, untrusting: DovecotServer) -> None:
        self.tmp_path = tmp_path
        self.trusting = trusting
        self.untrusting = untrusting
        self.service: ProxyService | None = None
        self.stopped = False
        self.fake = FakePOP3Factory(greeting=b"+OK not Dovecot\r\n")
        self.fake.add_user("alice", PASSWORD, [MESSAGE])
        self.ports: list[Any] = []
        self.port = 0

    async def start(self) -> Proxy:
        fake_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.fake)
        self.ports.append(fake_port)
        d, cafile = self.trusting, self.trusting.ca_path
        tables = []
        for forward in ("none", "xclient", "proxy-v1", "proxy-v2"):
            header = forward.startswith("proxy")
            plain, implicit = (d.proxy_port, d.proxy_tls_port) if header else (d.plain_port, d.tls_port)
            tables += [
                upstream_table(f"{forward}-plain", plain, "none", forward, cafile),
                upstream_table(f"{forward}-stls", plain, "starttls", forward, cafile),
                upstream_table(f"{forward}-implicit", implicit, "implicit", forward, cafile),
            ]
        tables.append(upstream_table("untrusted", self.untrusting.plain_port, "none", "xclient", cafile))
        tables.append(upstream_table("fake", fake_port.getHost().port, "none", "xclient", cafile))
        names = re.findall(r"\[upstream\.([\w-]+)\]", "".join(tables))
        routes = "".join(f'"@{name}" = "{name}"\n' for name in names)
        self.port = free_port()
        config = self.tmp_path / "popproxy.toml"
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{self.port}:interface=127.0.0.1"\ntls = "none"\n\n'
            + "\n".join(tables)
            + f'\n[routing]\ndefault = "none-plain"\n[routing.users]\n{routes}'
            # popproxy's own per-address penalty would slow 127.0.0.2 too: only Dovecot's is measured.
            + '\n[limits]\nip_allowlist = ["127.0.0.0/8"]\nlogin_failure_delay = 0.1\n'
        )
        self.service = ProxyService(load_config(config), reactor)
        self.service.privilegedStartService()
        self.service.startService()
        return self

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.service is not None:
            await self.service.stopService()
        for port in self.ports:
            await port.stopListening()

    async def login(self, source: str, upstream: str, password: str = PASSWORD) -> tuple[bytes, float]:
        """Log in from ``source`` as alice at ``upstream``: the answer to PASS (or the -ERR it
        raised) and the seconds from connecting to that answer."""
        return await deferToThread(login, self.port, source, f"alice@{upstream}", password)


def login(port: int, source: str, user: str, password: str) -> tuple[bytes, float]:
    started = time.monotonic()
    return timed_login(BoundPOP3(port, source), user, password, started, [b"Subject: forwarded", b"", b"body"])


@pytest.fixture
def proxy(tmp_path: Path, trusting: DovecotServer, untrusting: DovecotServer) -> Iterator[Proxy]:
    """Started by each test (``await proxy.start()``), stopped here."""
    made = Proxy(tmp_path, trusting, untrusting)
    yield made
    pytest_twisted.blockon(ensureDeferred(made.stop()))


async def log_lines(server: DovecotServer, offset: int, pattern: str) -> list[str]:
    """``wait_for_log`` in a thread: the reactor must keep running (to close connections, say)."""
    lines: list[str] = await deferToThread(wait_for_log, server, offset, pattern)
    return lines


def wait_for_log(server: DovecotServer, offset: int, pattern: str, timeout: float = 10.0) -> list[str]:
    """Dovecot's log lines after ``offset`` that match ``pattern``, waiting until there is one (its
    login process may write the line just after answering)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log_text()[offset:].splitlines() if re.search(pattern, line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


LOGINS = [f"{forward}-{tls}" for forward in ("xclient", "proxy-v1", "proxy-v2")
          for tls in ("plain", "stls", "implicit")]


@pytest.mark.parametrize("upstream", [*LOGINS, "none-plain"])
@pytest_twisted.ensureDeferred
async def test_dovecot_sees_the_clients_address(proxy: Proxy, trusting: DovecotServer, upstream: str) -> None:
    """A client at 127.0.0.2 appears in Dovecot's login line as rip=127.0.0.2 for every forwarding
    mode and TLS mode; the control, ``none``, shows the proxy's 127.0.0.1 (what the test tells apart)."""
    await proxy.start()
    offset = len(trusting.log_text())
    answer, _ = await proxy.login("127.0.0.2", upstream)
    assert answer.startswith(b"+OK")
    lines = await log_lines(trusting, offset, r"pop3-login: Info: Login: user=<alice>")
    assert len(lines) == 1, lines
    expected = "127.0.0.1" if upstream == "none-plain" else "127.0.0.2"
    assert f"rip={expected}," in lines[0]
    if upstream.endswith("implicit") or upstream.endswith("stls"):
        assert "TLS" in lines[0]  # Dovecot saw the session encrypted: the header did not break TLS


@pytest_twisted.ensureDeferred
async def test_dovecot_not_trusting_the_proxy_is_a_logged_configuration_error(
    proxy: Proxy, untrusting: DovecotServer, events: list[dict[str, Any]]
) -> None:
    await proxy.start()
    offset = len(untrusting.log_text())
    answer, _ = await proxy.login("127.0.0.2", "untrusted")
    assert answer.startswith(b"-ERR [SYS/TEMP]")
    errors = [e for e in events if e.get("log_level") == LogLevel.error and e.get("upstream") == "untrusted"]
    assert len(errors) == 1 and "login_trusted_networks" in errors[0]["log_format"]
    # Never a silent fallback: Dovecot saw the connection end without any login attempt.
    lines = await log_lines(untrusting, offset, r"pop3-login: Info: Disconnected")
    assert len(lines) == 1 and "no auth attempts" in lines[0] and "user=<alice>" not in lines[0], lines


@pytest_twisted.ensureDeferred
async def test_upstream_without_xclient_gets_no_credentials(proxy: Proxy, events: list[dict[str, Any]]) -> None:
    await proxy.start()
    answer, _ = await proxy.login("127.0.0.2", "fake")
    assert answer.startswith(b"-ERR [SYS/TEMP]")
    assert proxy.fake.received == [b"CAPA"]  # then the connection was dropped: no XCLIENT, USER or PASS
    assert any(e.get("log_level") == LogLevel.error and e.get("upstream") == "fake" for e in events)


@pytest.mark.parametrize("upstream", ["xclient-plain", "proxy-v2-implicit"])
@pytest_twisted.ensureDeferred
async def test_failed_logins_slow_only_that_clients_address(proxy: Proxy, upstream: str) -> None:
    """Dovecot's auth penalty after a failed login from 127.0.0.2 delays 127.0.0.2's next login
    (by 4 s: src/auth/auth-penalty.c) and not 127.0.0.3's. The bounds are far apart on purpose:
    the assertion is about which address is slowed."""
    await proxy.start()
    # A password of its own: anvil does not count the same user and password twice (the checksums
    # in src/anvil/penalty.c), even after a success reset the penalty.
    answer, _ = await proxy.login("127.0.0.2", upstream, password=f"wrong-for-{upstream}")
    assert answer.startswith(b"-ERR")
    answer, other = await proxy.login("127.0.0.3", upstream)
    assert answer.startswith(b"+OK")
    answer, same = await proxy.login("127.0.0.2", upstream)
    assert answer.startswith(b"+OK")  # the success also resets the penalty for the next test
    assert other < 2.0, f"127.0.0.3 was slowed by 127.0.0.2's failure ({other:.2f} s)"
    assert same >= 3.0, f"127.0.0.2 was not slowed ({same:.2f} s)"


# -- configuration ---------------------------------------------------------------------------------


def minimal_config(upstream_extra: str) -> str:
    return ('[[listen]]\nendpoint = "tcp:1110:interface=127.0.0.1"\ntls = "none"\n'
            f'[upstream.main]\naddress = "127.0.0.1:110"\ntls = "none"\n{upstream_extra}'
            '[routing]\ndefault = "main"\n')


@pytest.mark.parametrize("mode", ["none", "xclient", "proxy-v1", "proxy-v2"])
def test_forward_client_modes_parse(tmp_path: Path, mode: str) -> None:
    config = parse_config(minimal_config(f'forward_client = "{mode}"\n'), tmp_path / "popproxy.toml")
    assert config.upstreams["main"].forward_client == mode


def test_forward_client_defaults_to_none_and_refuses_other_values(tmp_path: Path) -> None:
    assert parse_config(minimal_config(""), tmp_path / "p.toml").upstreams["main"].forward_client == "none"
    for value in ('"proxy"', '"XCLIENT"', "true"):
        with pytest.raises(ConfigError) as caught:
            parse_config(minimal_config(f"forward_client = {value}\n"), tmp_path / "p.toml")
        assert caught.value.key == "upstream.main.forward_client"
        assert '"none", "xclient", "proxy-v1", "proxy-v2"' in caught.value.reason


# -- which PROXY header ----------------------------------------------------------------------------


def test_proxy_header_names_the_client_and_what_it_connected_to() -> None:
    client = ClientOrigin("192.0.2.7", 40000, "192.0.2.1", 110, "abc")
    assert proxy_header("proxy-v1", client) == b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 110\r\n"
    assert proxy_header("proxy-v2", client) == build_v2(("192.0.2.7", 40000), ("192.0.2.1", 110))
    # A dual-stack listener's IPv4 client is sent as IPv4.
    mapped = ClientOrigin("::ffff:192.0.2.7", 40000, "::ffff:192.0.2.1", 110, "abc")
    assert proxy_header("proxy-v1", mapped) == b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 110\r\n"
    six = ClientOrigin("2001:db8::7", 40000, "2001:db8::1", 995, "abc")
    assert proxy_header("proxy-v1", six) == b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 995\r\n"
    assert proxy_header("none", client) == proxy_header("xclient", client) == b""


def test_proxy_header_for_an_unknown_client_says_unknown() -> None:
    """A UNIX socket listener's client (host "") or no origin at all: v1 UNKNOWN, v2 LOCAL, never
    a made-up address."""
    for client in (ClientOrigin("", 0, "", 0, "abc"), ClientOrigin("192.0.2.7", 1, "", 0, "abc"), None):
        assert proxy_header("proxy-v1", client) == b"PROXY UNKNOWN\r\n"
        assert proxy_header("proxy-v2", client) == build_v2_local()


# -- the connector, in memory -----------------------------------------------------------------------


def memory_upstream(forward: str, tls: str = "none") -> UpstreamConfig:
    return UpstreamConfig("u", (Address("192.0.2.9", 110),), tls, 10.0, True, None, "192.0.2.9", "{local}", forward)


def connect_in_memory(clock: MemoryReactorClock) -> tuple[StringTransport, IProtocol]:
    """Complete the connection the connector asked the memory reactor for."""
    _, _, factory, _, _ = clock.tcpClients[0]
    transport = StringTransport()
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return transport, protocol


def test_connector_sends_xclient_then_the_routed_login_name_and_times_the_login() -> None:
    clock = MemoryReactorClock()
    connector = UpstreamConnector(clock)
    origin = ClientOrigin("192.0.2.7", 40000, "192.0.2.1", 110, "abc")
    result: list[LoggedIn] = []
    connector.open(memory_upstream("xclient"), "alice@example.org", b"pw", log_fields={}, client=origin,
                   login_name="routed-alice").addCallback(result.append)
    clock.advance(2)
    transport, protocol = connect_in_memory(clock)
    assert transport.value() == b""  # XCLIENT mode sends no header
    clock.advance(3)
    answers = [
        (b"+OK [XCLIENT] Dovecot ready.\r\n", b"CAPA\r\n"),
        (b"+OK\r\nUSER\r\n.\r\n", b"XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=abc TTL=4\r\n"),
        (b"+OK Updated\r\n", b"USER routed-alice\r\n"),  # login_name as given, not login_as's "alice"
        (b"+OK\r\n", b"PASS pw\r\n"),
    ]
    for answer, request in answers:
        transport.clear()
        protocol.dataReceived(answer)
        assert transport.value() == request
    protocol.dataReceived(b"+OK Logged in.\r\n")
    assert len(result) == 1
    assert result[0].connect_seconds == 2.0 and result[0].login_seconds == 5.0


@pytest.mark.parametrize("mode", ["proxy-v1", "proxy-v2"])
def test_connector_writes_the_proxy_header_first(mode: str) -> None:
    clock = MemoryReactorClock()
    origin = ClientOrigin("192.0.2.7", 40000, "192.0.2.1", 110, "abc")
    UpstreamConnector(clock).open(memory_upstream(mode), "alice", b"pw", log_fields={}, client=origin)
    transport, _ = connect_in_memory(clock)
    assert transport.value() == proxy_header(mode, origin)  # on connecting, before the greeting


def test_implicit_tls_with_a_header_dials_plain_and_starts_tls_itself() -> None:
    """The header must precede the ClientHello: the endpoint is left plain for PROXY modes."""
    connector = UpstreamConnector(MemoryReactorClock())
    address = Address("127.0.0.1", 995)
    assert isinstance(connector._default_endpoint(address, memory_upstream("proxy-v2", "implicit")),
                      TCP4ClientEndpoint)
    assert not isinstance(connector._default_endpoint(address, memory_upstream("xclient", "implicit")),
                          TCP4ClientEndpoint)


# -- unknown client addresses, against the real Dovecot ------------------------------------------------


@pytest.mark.parametrize("forward", ["xclient", "proxy-v1", "proxy-v2"])
@pytest_twisted.ensureDeferred
async def test_unknown_client_address_logs_in_as_the_proxy(trusting: DovecotServer, forward: str) -> None:
    """No client address (a UNIX socket listener): Dovecot accepts XCLIENT without ADDR, v1 UNKNOWN
    and v2 LOCAL, and logs the proxy's own address."""
    port = trusting.proxy_port if forward.startswith("proxy") else trusting.plain_port
    upstream = UpstreamConfig("u", (Address("127.0.0.1", port),), "none", 5.0, True, None, "127.0.0.1", "{user}",
                              forward)
    offset = len(trusting.log_text())
    logged_in = await UpstreamConnector(reactor).open(upstream, "alice", PASSWORD.encode(), log_fields={},
                                                      client=ClientOrigin("", 0, "", 0, "unix-1"))
    assert 0 < logged_in.connect_seconds <= logged_in.login_seconds
    logged_in.protocol.quit()
    lines = await log_lines(trusting, offset, r"pop3-login: Info: Login: user=<alice>")
    assert len(lines) == 1 and "rip=127.0.0.1," in lines[0], lines
