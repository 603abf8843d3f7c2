"""The session state machine, in memory: client ↔ proxy ↔ fake upstream, no sockets, no real time."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from popproxy.config import Address
from popproxy.protocol.client import AUTH_FAILED, UPSTREAM_DOWN
from popproxy.testing import MemoryProxy, RecordingClient, wire_body

from support.configs import proxy_config

MESSAGES = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\n\r\n.leading dot\r\n.\r\n..\r\nend\r\n",
    b"Subject: three\r\n\r\n" + b"x" * 70 + b"\r\n" * 3000,
]


@implementer(IOpenSSLServerConnectionCreator)
class FakeServerTLS:
    """Stands in for ServerTLS over iosim's pretend TLS (iosim asks both ends to agree)."""

    def iosimVerify(self, other: object) -> bool:
        return True

    def serverConnectionForTLS(self, tlsProtocol: object) -> None:
        raise AssertionError("iosim does not build real connections")


class FakeClientTLS:
    def iosimVerify(self, other: object) -> bool:
        return True


def make_proxy(tmp_path: Path, *, tls: str = "none", require_tls: bool = True, pipelining: bool = True,
               routing: str = 'default = "main"\n[routing.users]\n"dave" = "other"', extra: str = "") -> MemoryProxy:
    listener: dict[str, object] = {"endpoint": "tcp:110", "tls": tls}
    if tls == "starttls":
        listener["require_tls"] = require_tls
    config = proxy_config(
        tmp_path,
        listeners=[listener],
        upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}, "other": {"address": "127.0.0.1:2110", "tls": "none"}},
        routing=routing,
        extra=extra,
    )
    proxy = MemoryProxy(config, server_tls=FakeServerTLS() if tls != "none" else None)
    fake = proxy.upstreams["main"]
    fake.pipelining = pipelining
    fake.add_user("alice", "alice-pw", MESSAGES)
    return proxy


def logged_in(proxy: MemoryProxy) -> RecordingClient:
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    return client


def test_greeting_has_no_timestamp_or_version(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    assert client.take() == b"+OK POP3 proxy ready.\r\n"
    assert proxy.upstreams["main"].connections == 0


def test_capa_before_login_on_plain_listener(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    answer = proxy.say(client, b"CAPA\r\n")
    assert answer == (
        b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n"
        b"AUTH-RESP-CODE\r\nPIPELINING\r\n.\r\n"
    )
    assert proxy.upstreams["main"].connections == 0


def test_login_then_relay_byte_for_byte(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    fake = proxy.upstreams["main"]
    assert fake.received[-2:] == [b"USER alice", b"PASS alice-pw"]
    sizes = [len(m) for m in MESSAGES]
    assert proxy.say(client, b"STAT\r\n") == b"+OK 3 %d\r\n" % sum(sizes)
    for number, message in enumerate(MESSAGES, start=1):
        answer = proxy.say(client, b"RETR %d\r\n" % number)
        assert answer == b"+OK %d octets\r\n" % len(message) + wire_body(message)
    assert proxy.say(client, b"LIST\r\n") == b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes)) + b".\r\n"
    assert proxy.say(client, b"top 2 1\r\n") == b"+OK\r\nSubject: two\r\n\r\n..leading dot\r\n.\r\n"
    assert proxy.say(client, b"RETR 9\r\n") == b"-ERR no such message\r\n"


def test_capa_after_login_is_the_upstreams_filtered(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    assert proxy.say(client, b"CAPA\r\n") == b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"


def test_wrong_password_and_unknown_user_get_the_same_answer(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, routing='[routing.users]\n"alice" = "main"')
    client, _ = proxy.connect()
    client.take()
    wrong_password = proxy.say(client, b"USER alice\r\nPASS nope\r\n")
    unknown_user = proxy.say(client, b"USER mallory\r\nPASS nope\r\n")
    assert wrong_password == unknown_user == b"+OK\r\n" + AUTH_FAILED
    # The unknown user had no route: no upstream connection was made for it.
    assert proxy.upstreams["main"].connections == 1
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"


@pytest.mark.parametrize("code", ["IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"])
def test_upstream_response_codes_are_passed_on(tmp_path: Path, code: str) -> None:
    proxy = make_proxy(tmp_path)
    proxy.upstreams["main"].login_answer = f"-ERR [{code}] upstream words\r\n".encode()
    client, _ = proxy.connect()
    client.take()
    answer = proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n")
    assert answer.startswith(f"+OK\r\n-ERR [{code}] ".encode())
    assert b"upstream words" not in answer


def test_unreachable_upstream_is_sys_temp_and_client_may_retry(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    proxy.refuse.add(Address("127.0.0.1", 1110))
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n" + UPSTREAM_DOWN
    proxy.refuse.clear()
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_upstream_connect_timeout_is_sys_temp(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    client.send(b"USER alice\r\nPASS alice-pw\r\n")
    # Let the client's bytes arrive, but never complete the upstream connection.
    for pump in proxy._pumps:
        pump.pump()
    assert proxy.clock.tcpClients
    proxy.clock.advance(10)
    for pump in proxy._pumps:
        pump.pump()
    assert client.take() == b"+OK\r\n" + UPSTREAM_DOWN


def test_auth_plain_initial_response_and_continuation(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    token = base64.b64encode(b"\0alice\0alice-pw")
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"AUTH PLAIN " + token + b"\r\n") == b"+OK Logged in.\r\n"
    client2, _ = proxy.connect()
    client2.take()
    assert proxy.say(client2, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert proxy.say(client2, token + b"\r\n") == b"+OK Logged in.\r\n"


def test_auth_plain_cancel_empty_and_foreign_authzid(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert proxy.say(client, b"*\r\n").startswith(b"-ERR ")
    assert proxy.say(client, b"AUTH PLAIN =\r\n").startswith(b"-ERR [AUTH] ")
    foreign = base64.b64encode(b"bob\0alice\0alice-pw")
    assert proxy.say(client, b"AUTH PLAIN " + foreign + b"\r\n").startswith(b"-ERR [AUTH] ")
    same = base64.b64encode(b"alice\0alice\0alice-pw")
    assert proxy.say(client, b"AUTH PLAIN " + same + b"\r\n") == b"+OK Logged in.\r\n"
    assert proxy.upstreams["main"].connections == 1


def test_auth_lists_mechanisms_and_refuses_others(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"AUTH\r\n") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert proxy.say(client, b"AUTH CRAM-MD5\r\n").startswith(b"-ERR")
    assert proxy.say(client, b"APOP alice 0123456789abcdef\r\n").startswith(b"-ERR")


@pytest.mark.parametrize(
    "credentials",
    [
        b"\0alice\0alice-pw\r\nDELE 1",
        b"\0alice\r\nDELE 1\0alice-pw",
        b"\0alice\0alice\0pw",
        b"\0alice\0pw\nDELE 1",
    ],
)
def test_credentials_with_cr_lf_nul_never_reach_the_upstream(tmp_path: Path, credentials: bytes) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    answer = proxy.say(client, b"AUTH PLAIN " + base64.b64encode(credentials) + b"\r\n")
    assert answer.startswith(b"-ERR")
    assert proxy.upstreams["main"].connections == 0
    assert proxy.upstreams["main"].received == []


def test_user_line_with_bare_cr_is_refused(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    # Refused at USER itself (a bare CR is not part of any user name), so PASS has no user.
    assert proxy.say(client, b"USER alice\rDELE 1\r\nPASS x\r\n") == (
        b"-ERR [AUTH] Invalid user name.\r\n-ERR Send USER first.\r\n")
    assert proxy.upstreams["main"].connections == 0


def test_pipelined_answers_come_back_in_order(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    answer = proxy.say(client, b"STAT\r\nRETR 1\r\nXYZZY\r\nLIST 2\r\nSTLS\r\nNOOP\r\n")
    expected = (
        b"+OK 3 %d\r\n" % sum(map(len, MESSAGES))
        + b"+OK %d octets\r\n" % len(MESSAGES[0]) + wire_body(MESSAGES[0])
        + b"-ERR Unknown command.\r\n"
        + b"+OK 2 %d\r\n" % len(MESSAGES[1])
        + b"-ERR Not allowed after login.\r\n"
        + b"+OK\r\n"
    )
    assert answer == expected


@pytest.mark.parametrize("pipelining", [True, False])
def test_commands_go_upstream_together_only_with_pipelining(tmp_path: Path, pipelining: bool) -> None:
    proxy = make_proxy(tmp_path, pipelining=pipelining)
    client = logged_in(proxy)
    fake = proxy.upstreams["main"]
    chunks: list[bytes] = []
    server = proxy._pumps[-1].server  # the upstream connection's server side is the fake
    original = server.dataReceived

    def record(data: bytes) -> None:
        chunks.append(data)
        original(data)

    server.dataReceived = record  # type: ignore[method-assign]
    answer = proxy.say(client, b"NOOP\r\nSTAT\r\nLIST 1\r\n")
    assert answer.count(b"+OK") == 3
    assert fake.received[-3:] == [b"NOOP", b"STAT", b"LIST 1"]
    if pipelining:
        assert chunks == [b"NOOP\r\nSTAT\r\nLIST 1\r\n"]
    else:
        assert chunks == [b"NOOP\r\n", b"STAT\r\n", b"LIST 1\r\n"]


def test_dele_then_quit_deletes(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    assert proxy.say(client, b"DELE 1\r\nQUIT\r\n") == b"+OK deleted\r\n+OK Bye\r\n"
    assert client.lost
    assert proxy.upstreams["main"].mailboxes[b"alice"].remaining() == MESSAGES[1:]


def test_dele_then_dropped_connection_deletes_nothing(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    assert proxy.say(client, b"DELE 1\r\n") == b"+OK deleted\r\n"
    client.transport.loseConnection()
    proxy.pump()
    fake = proxy.upstreams["main"]
    assert b"QUIT" not in fake.received
    assert fake.mailboxes[b"alice"].remaining() == MESSAGES


def test_quit_is_forwarded_when_the_client_hangs_up_at_once(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, pipelining=False)
    client = logged_in(proxy)
    client.send(b"DELE 1\r\nDELE 2\r\nQUIT\r\n")
    client.transport.loseConnection()
    proxy.pump()
    fake = proxy.upstreams["main"]
    assert fake.received[-3:] == [b"DELE 1", b"DELE 2", b"QUIT"]
    assert fake.mailboxes[b"alice"].remaining() == MESSAGES[2:]


def test_upstream_lost_mid_body_leaves_no_terminator(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client = logged_in(proxy)
    proxy.upstreams["main"].cut_retr_after = 5000
    message = MESSAGES[2]
    received = proxy.say(client, b"RETR 3\r\n")
    assert received == (b"+OK %d octets\r\n" % len(message) + wire_body(message))[:5000]
    assert not received.endswith(b"\r\n.\r\n")
    assert client.lost


def test_login_timeout_disconnects_without_upstream(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    proxy.say(client, b"NOOP\r\n")
    proxy.clock.advance(59)
    proxy.pump()
    assert not client.lost
    proxy.clock.advance(1)
    proxy.pump()
    assert client.take().startswith(b"-ERR [SYS/TEMP] Autologout")
    assert client.lost
    assert proxy.upstreams["main"].connections == 0


def test_idle_timeout_closes_both_legs_without_quit(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, extra="[limits]\nidle_timeout = 600")
    client = logged_in(proxy)
    proxy.say(client, b"DELE 1\r\n")
    proxy.clock.advance(599)
    proxy.pump()
    assert not client.lost
    proxy.clock.advance(1)
    proxy.pump()
    assert client.lost
    fake = proxy.upstreams["main"]
    assert b"QUIT" not in fake.received
    assert fake.mailboxes[b"alice"].remaining() == MESSAGES


def test_overlong_command_line_gets_err_and_session_goes_on(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER " + b"a" * 300 + b"\r\nNOOP\r\n") == b"-ERR Command line too long.\r\n+OK\r\n"
    assert proxy.say(client, b"NOOP " + b"b" * 248 + b"\r\n") == b"+OK\r\n"  # 255 octets with CRLF
    assert proxy.say(client, b"NOOP " + b"b" * 249 + b"\r\n") == b"-ERR Command line too long.\r\n"


def test_commands_outside_their_state(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"RETR 1\r\n").startswith(b"-ERR")
    assert proxy.say(client, b"PASS x\r\n") == b"-ERR Send USER first.\r\n"
    assert proxy.say(client, b"STLS\r\n") == b"-ERR STLS not available.\r\n"
    assert proxy.say(client, b"KILL\r\n").startswith(b"-ERR")
    assert proxy.say(client, b"\r\n").startswith(b"-ERR")
    assert proxy.upstreams["main"].connections == 0
    assert proxy.say(client, b"QUIT\r\n") == b"+OK Bye.\r\n"
    assert client.lost


def test_routing_sends_users_to_their_upstream(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path)
    proxy.upstreams["other"].add_user("dave", "dave-pw", [b"Subject: d\r\n\r\nd\r\n"])
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER dave\r\nPASS dave-pw\r\nSTAT\r\n") == b"+OK\r\n+OK Logged in.\r\n+OK 1 17\r\n"
    assert proxy.upstreams["main"].connections == 0


# -- STLS on the client leg (state rules; real handshakes are in the integration tests) -------------

def test_require_tls_refuses_plaintext_login_and_capa_says_so(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, tls="starttls")
    client, _ = proxy.connect()
    client.take()
    capa = proxy.say(client, b"CAPA\r\n")
    assert b"STLS\r\n" in capa and b"USER\r\n" not in capa and b"SASL" not in capa
    assert proxy.say(client, b"USER alice\r\n").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert proxy.say(client, b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-pw") + b"\r\n").startswith(b"-ERR [AUTH]")
    assert proxy.upstreams["main"].connections == 0


def test_stls_discards_pipelined_plaintext_and_recomputes_capa(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, tls="starttls")
    client, _session = proxy.connect()
    client.take()
    assert proxy.say(client, b"STLS\r\nUSER alice\r\nCAPA\r\n") == b"+OK Begin TLS negotiation.\r\n"
    client.transport.startTLS(FakeClientTLS())
    proxy.pump()
    assert client.take() == b""  # nothing answered the injected commands
    capa = proxy.say(client, b"CAPA\r\n")
    assert b"STLS" not in capa and b"USER\r\n" in capa and b"SASL PLAIN\r\n" in capa
    assert proxy.say(client, b"PASS alice-pw\r\n") == b"-ERR Send USER first.\r\n"
    assert proxy.say(client, b"STLS\r\n") == b"-ERR STLS not available.\r\n"
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_starttls_listener_without_require_tls_allows_plaintext(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, tls="starttls", require_tls=False)
    client, _ = proxy.connect()
    client.take()
    capa = proxy.say(client, b"CAPA\r\n")
    assert b"STLS\r\n" in capa and b"USER\r\n" in capa
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_stls_on_implicit_listener_is_refused(tmp_path: Path) -> None:
    proxy = make_proxy(tmp_path, tls="implicit")
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"STLS\r\n") == b"-ERR STLS not available.\r\n"
    capa = proxy.say(client, b"CAPA\r\n")
    assert b"STLS" not in capa and b"USER\r\n" in capa


@pytest.fixture
def failures():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_any_client_bytes_never_raise(tmp_path: Path, failures: list) -> None:
    """Property: whatever a client sends, in any chunking, before or after login, no exception
    escapes the protocol and every session still ends cleanly."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    proxy = make_proxy(tmp_path, tls="starttls", require_tls=False)
    words = st.sampled_from([b"USER alice", b"PASS alice-pw", b"STAT", b"LIST", b"RETR 2", b"TOP 1 0", b"DELE 1",
                             b"RSET", b"NOOP", b"CAPA", b"AUTH PLAIN", b"AUTH", b"UIDL", b"QUIT", b"STLS", b"*", b"="])
    chunks = st.lists(st.one_of(st.binary(max_size=300), words.map(lambda w: w + b"\r\n")), max_size=30)

    @given(chunks)
    @settings(max_examples=150, deadline=None)
    def run(parts: list[bytes]) -> None:
        client, session = proxy.connect()
        for part in parts:
            if client.lost:
                break
            client.send(part)
            proxy.settle()
        client.transport.loseConnection()
        proxy.settle()
        assert session.state.name == "CLOSED"

    run()
    assert failures == []
    assert proxy.factory.sessions == set()


def test_ip_literal_upstreams_are_dialled_without_the_resolver(tmp_path: Path) -> None:
    """An upstream written as an address is connected to directly: HostnameEndpoint would hand even
    a literal to the resolver's thread pool on every login."""
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
    from twisted.internet.testing import MemoryReactorClock

    from popproxy.config import Address
    from popproxy.protocol.connector import UpstreamConnector, ip_literal

    upstream = make_proxy(tmp_path).config.upstreams["main"]
    connector = UpstreamConnector(MemoryReactorClock())
    assert isinstance(connector._default_endpoint(Address("127.0.0.1", 110), upstream), TCP4ClientEndpoint)
    assert isinstance(connector._default_endpoint(Address("::1", 110), upstream), TCP6ClientEndpoint)
    assert isinstance(connector._default_endpoint(Address("localhost", 110), upstream), HostnameEndpoint)
    assert [ip_literal(h) for h in ("192.0.2.1", "2001:db8::1", "mail.example.org", "1.2.3")] == [4, 6, None, None]


def test_peer_fields_of_every_address_kind() -> None:
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    from popproxy.protocol.client import peer_fields

    assert peer_fields(IPv4Address("TCP", "192.0.2.1", 1110)) == ("192.0.2.1", 1110)
    assert peer_fields(IPv6Address("TCP", "2001:db8::1", 995)) == ("2001:db8::1", 995)
    assert peer_fields(UNIXAddress(b"/run/popproxy.sock")) == ("/run/popproxy.sock", 0)
    assert peer_fields(UNIXAddress(None)) == ("", 0)
