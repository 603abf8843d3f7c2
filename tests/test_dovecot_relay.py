"""popproxy under twistd in front of a real Dovecot, driven by real clients (poplib, raw sockets).

One ``twistd -n popproxy`` serves the whole module, with a listener of each client-side TLS mode and
a plain-text upstream (Dovecot's plain port). User ``trap`` is routed to a trap server that records
any connection, to prove when the proxy made none.
"""

from __future__ import annotations

import base64
import os
import poplib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority, write_private

from support.configs import _table
from support.dovecot import DovecotServer, MailUser
from support.pop3client import RawPOP3, open_poplib, retrieve, sha256
from support.proxyproc import ProxyProcess, free_port
from support.trap import TrapServer

MODES = ("none", "starttls", "implicit")


class Relay:
    def __init__(self, proxy: ProxyProcess, ports: dict[str, int], cafile: Path, trap: TrapServer) -> None:
        self.proxy = proxy
        self.ports = ports
        self.cafile = cafile
        self.trap = trap


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer, ca: CertificateAuthority) -> Iterator[Relay]:
    folder = tmp_path_factory.mktemp("relay")
    certificate = write_private(folder / "proxy.pem", ca.issue(["localhost", "127.0.0.1"]).combined_pem)
    cafile = folder / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    trap = TrapServer()
    ports = {mode: free_port() for mode in MODES}
    listeners = []
    for mode, port in ports.items():
        table: dict[str, object] = {"endpoint": f"tcp:{port}:interface=127.0.0.1", "tls": mode}
        if mode != "none":
            table["certificate"] = str(certificate)
        listeners.append("[[listen]]\n" + _table(table))
    config = folder / "popproxy.toml"
    config.write_text(
        "\n".join(listeners)
        + f'\n[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\nconnect_timeout = 5\n'
        + f'\n[upstream.trap]\naddress = "127.0.0.1:{trap.port}"\ntls = "none"\nconnect_timeout = 5\n'
        + '\n[routing]\ndefault = "dovecot"\n[routing.users]\n"trap" = "trap"\n'
        # Every test connects from 127.0.0.1: keep per-address penalties from piling up across tests
        # (the hostile-client suite tests them with a configuration of its own).
        + '\n[limits]\nip_allowlist = ["127.0.0.0/8"]\nlogin_failure_delay = 0.2\n'
    )
    proxy = ProxyProcess(config, list(ports.values()), folder, json=True)
    try:
        yield Relay(proxy, ports, cafile, trap)
    finally:
        proxy.stop()
        trap.close()
    # Whatever happened in the module, no password (nor its base64 form) may have reached the log.
    log = proxy.log()
    for user in dovecot.users.values():
        assert user.password not in log
        assert base64.b64encode(user.password.encode()).decode()[:-2] not in log


def test_session_events_are_structured(relay: Relay, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    client = login(relay, "implicit", dave)
    retrieve(client, 1)
    client.quit()
    time.sleep(0.2)
    events = relay.proxy.events()
    ended = [e for e in events if e.get("event") == "session_close" and e.get("user") == "dave"
             and e.get("listener") == "listen[2]"][-1]
    assert ended["upstream"] == "dovecot"
    assert ended["ended"] == "quit"
    assert ended["client_tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert ended["client_tls_cipher"]
    assert ended["bytes_to_client"] > len(dave.messages[0])
    assert ended["bytes_from_upstream"] > len(dave.messages[0])
    assert isinstance(ended["duration"], float) and ended["duration"] >= 0
    assert ended["client_host"] == "127.0.0.1"
    session = ended["session_id"]
    opened = [e for e in events if e.get("event") == "session_open" and e.get("session_id") == session]
    assert opened and opened[0]["listener"] == "listen[2]" and opened[0]["client_port"] == ended["client_port"]
    logins = [e for e in events if e.get("event") == "auth" and e.get("session_id") == session]
    assert [e["result"] for e in logins] == ["ok"]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_client_does_not_make_the_proxy_buffer_the_message(relay: Relay, dovecot: DovecotServer) -> None:
    """Back-pressure: while the client stalls, the proxy holds a few socket buffers' worth of a 40 MB
    message, not the message; then the whole message arrives intact."""
    line = b"y" * 76 + b"\r\n"
    big = b"Subject: slow\r\nMessage-ID: <slow@popproxy.test>\r\n\r\n" + line * (40 * 1024 * 1024 // len(line))
    dovecot.add_user("frank", "frank-pw", [big])
    pid = relay.proxy.process.pid
    raw = RawPOP3(relay.ports["none"])
    raw.answer()
    raw.command(b"USER frank")
    assert raw.command(b"PASS frank-pw").startswith(b"+OK")
    before = _rss_kib(pid)
    raw.send(b"RETR 1\r\n")
    time.sleep(1.5)  # the client reads nothing
    during = _rss_kib(pid)
    answer = raw.answer(multiline=True)
    assert during - before < 16 * 1024, f"proxy grew by {during - before} KiB while the client stalled"
    status, _, body = answer.partition(b"\r\n")
    assert status == b"+OK %d octets" % len(big)
    assert sha256(body) == sha256(big + b".\r\n")  # no line of this message starts with a dot
    raw.command(b"QUIT")


def login(relay: Relay, mode: str, user: MailUser) -> poplib.POP3:
    client = open_poplib(mode, relay.ports[mode], relay.cafile)
    client.user(user.name)
    client.pass_(user.password)
    return client


@pytest.mark.parametrize("mode", MODES)
def test_poplib_retrieves_every_message_byte_for_byte(relay: Relay, dovecot: DovecotServer, mode: str) -> None:
    alice = dovecot.users["alice"]
    client = login(relay, mode, alice)
    try:
        assert client.stat() == (len(alice.messages), alice.total_size)
        _, listing, _ = client.list()
        assert listing == [b"%d %d" % (i + 1, size) for i, size in enumerate(alice.sizes)]
        _, uidls, _ = client.uidl()
        assert uidls == [b"%d %s" % (i + 1, uid.encode()) for i, uid in enumerate(alice.uidls)]
        for number, expected in enumerate(alice.messages, start=1):
            assert sha256(retrieve(client, number)) == sha256(expected), f"message {number}"
    finally:
        client.quit()


def test_proxy_and_dovecot_send_identical_wire_bytes(relay: Relay, dovecot: DovecotServer) -> None:
    """The strongest form of "byte for byte": the wire answers themselves, dot-stuffing included."""
    alice = dovecot.users["alice"]
    sample = [1, 2, 3, 4, 5, 6, alice.largest, len(alice.messages)]
    answers = {}
    for name, port in (("direct", dovecot.plain_port), ("proxy", relay.ports["none"])):
        raw = RawPOP3(port)
        raw.answer()
        raw.command(b"USER alice")
        assert raw.command(b"PASS " + alice.password.encode()).startswith(b"+OK")
        answers[name] = [sha256(raw.command(b"RETR %d" % n, multiline=True)) for n in sample]
        answers[name].append(sha256(raw.command(b"TOP %d 3" % sample[-1], multiline=True)))
        answers[name].append(sha256(raw.command(b"LIST", multiline=True)))
        raw.command(b"QUIT")
        raw.close()
    assert answers["proxy"] == answers["direct"]


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_auth_plain_both_ways(relay: Relay, dovecot: DovecotServer, mode: str) -> None:
    dave = dovecot.users["dave"]
    token = base64.b64encode(b"\0dave\0" + dave.password.encode()).decode()
    client = open_poplib(mode, relay.ports[mode], relay.cafile)
    assert client._shortcmd("AUTH PLAIN " + token).startswith(b"+OK")
    assert client.stat()[0] == len(dave.messages)
    client.quit()
    client = open_poplib(mode, relay.ports[mode], relay.cafile)
    assert client._shortcmd("AUTH PLAIN").startswith(b"+ ")
    assert client._shortcmd(token).startswith(b"+OK")
    assert sha256(retrieve(client, 1)) == sha256(dave.messages[0])
    client.quit()


def test_wrong_password_is_auth_and_the_client_may_retry(relay: Relay, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    client = open_poplib("implicit", relay.ports["implicit"], relay.cafile)
    client.user("dave")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed."):
        client.pass_("wrong")
    client.user("nobody-at-all")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed."):
        client.pass_("wrong")
    client.user("dave")
    client.pass_(dave.password)
    assert client.stat()[0] == len(dave.messages)
    client.quit()


def test_pipelined_commands_get_their_answers_in_order(relay: Relay, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    script = [(b"STAT", False), (b"LIST", True), (b"UIDL 2", False), (b"RETR 1", True), (b"FROB", False),
              (b"TOP 2 0", True), (b"RETR 3", True), (b"NOOP", False)]
    raw = RawPOP3(relay.ports["none"])
    raw.answer()
    raw.send(b"USER dave\r\nPASS " + dave.password.encode() + b"\r\n" + b"".join(line + b"\r\n" for line, _ in script))
    assert raw.answer() == b"+OK\r\n"
    assert raw.answer() == b"+OK Logged in.\r\n"
    answers = [raw.answer(multiline) for _, multiline in script]
    raw.command(b"QUIT")
    assert answers[0] == b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)
    assert answers[4] == b"-ERR Unknown command.\r\n"
    assert answers[7] == b"+OK\r\n"
    # The relayed answers are what Dovecot itself says to the same commands.
    direct = RawPOP3(dovecot.plain_port)
    direct.answer()
    direct.command(b"USER dave")
    direct.command(b"PASS " + dave.password.encode())
    for (line, multiline), answer in zip(script, answers, strict=True):
        if line != b"FROB":
            assert direct.command(line, multiline) == answer
    direct.command(b"QUIT")


def test_dele_then_quit_deletes(relay: Relay, dovecot: DovecotServer, bob: MailUser) -> None:
    client = login(relay, "starttls", bob)
    client.dele(1)
    client.dele(2)
    client.quit()
    check = login(relay, "none", bob)
    assert check.stat() == (len(bob.messages) - 2, bob.total_size - bob.sizes[0] - bob.sizes[1])
    assert sha256(retrieve(check, 1)) == sha256(bob.messages[2])
    check.quit()


@pytest.mark.parametrize("mode", MODES)
def test_dele_then_dropped_connection_deletes_nothing(relay: Relay, dovecot: DovecotServer, bob: MailUser, mode: str) -> None:
    client = login(relay, mode, bob)
    client.dele(1)
    client.sock.close()  # hang up without QUIT
    time.sleep(0.3)
    check = login(relay, "none", bob)
    assert check.stat() == (len(bob.messages), bob.total_size)
    check.quit()


def test_quit_sent_then_hang_up_still_deletes(relay: Relay, dovecot: DovecotServer, bob: MailUser) -> None:
    raw = RawPOP3(relay.ports["none"])
    raw.answer()
    raw.send(b"USER bob\r\nPASS " + bob.password.encode() + b"\r\nDELE 1\r\nQUIT\r\n")
    raw.close()
    deadline = time.monotonic() + 10
    while True:
        check = login(relay, "none", bob)
        count = check.stat()[0]
        check.quit()
        if count == len(bob.messages) - 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert count == len(bob.messages) - 1


def test_upstream_killed_mid_retr_leaves_the_client_a_broken_connection(relay: Relay, dovecot: DovecotServer) -> None:
    # 40 MB: more than every socket buffer between Dovecot and the client can hold, so Dovecot is
    # still writing the message when it is killed.
    line = b"x" * 76 + b"\r\n"
    big = b"Subject: big\r\nMessage-ID: <big@popproxy.test>\r\n\r\n" + line * (40 * 1024 * 1024 // len(line))
    user = dovecot.add_user("erin", "erin-pw", [big])
    raw = RawPOP3(relay.ports["none"])
    raw.answer()
    raw.command(b"USER erin")
    assert raw.command(b"PASS erin-pw").startswith(b"+OK")
    raw.send(b"RETR 1\r\n")
    first = raw.sock.recv(1000)  # the status line and the start of the body; then stop reading
    assert first.startswith(b"+OK %d octets" % len(big))
    time.sleep(0.5)  # let the buffers fill and back-pressure reach Dovecot
    pids = dovecot.pop3_pids("erin")
    assert pids, "no Dovecot pop3 process for erin"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    received = first + raw.read_all()
    assert len(received) < len(big)
    assert not received.endswith(b"\r\n.\r\n")
    # And the message is still on the server, whole.
    check = login(relay, "none", user)
    assert check.stat() == (1, len(big))
    check.quit()


def test_plaintext_user_on_require_tls_listener_makes_no_upstream_connection(relay: Relay) -> None:
    raw = RawPOP3(relay.ports["starttls"])
    raw.answer()
    capa = raw.command(b"CAPA", multiline=True)
    assert b"STLS\r\n" in capa and b"USER\r\n" not in capa and b"SASL" not in capa
    assert raw.command(b"USER trap").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert raw.command(b"PASS secret").startswith(b"-ERR")
    assert raw.command(b"AUTH PLAIN " + base64.b64encode(b"\0trap\0secret")).startswith(b"-ERR [AUTH]")
    raw.command(b"QUIT")
    time.sleep(0.2)
    assert relay.trap.connections == 0
    assert b"secret" not in relay.trap.received


def test_stls_injection_is_discarded(relay: Relay, dovecot: DovecotServer) -> None:
    raw = RawPOP3(relay.ports["starttls"])
    raw.answer()
    # One segment: STLS and commands a man in the middle wants run as if they came over TLS.
    raw.send(b"STLS\r\nCAPA\r\nUSER dave\r\n")
    assert raw.line() == b"+OK Begin TLS negotiation.\r\n"
    raw.start_tls(relay.cafile)
    # The first answer inside TLS is the answer to the first command sent inside TLS.
    assert raw.command(b"NOOP") == b"+OK\r\n"
    assert raw.command(b"PASS " + dovecot.users["dave"].password.encode()) == b"-ERR Send USER first.\r\n"
    capa = raw.command(b"CAPA", multiline=True)
    assert b"STLS" not in capa and b"USER\r\n" in capa
    assert raw.command(b"STLS") == b"-ERR STLS not available.\r\n"
    raw.command(b"QUIT")


def test_credentials_with_crlf_never_reach_the_upstream(relay: Relay, dovecot: DovecotServer, bob: MailUser) -> None:
    raw = RawPOP3(relay.ports["none"])
    raw.answer()
    for user in (b"bob", b"trap"):
        injected = base64.b64encode(b"\0" + user + b"\0" + bob.password.encode() + b"\r\nDELE 1")
        assert raw.command(b"AUTH PLAIN " + injected).startswith(b"-ERR")
    # A bare CR inside USER is refused at USER (it is no part of any name), so PASS has no user.
    assert raw.command(b"USER trap\rDELE 1") == b"-ERR [AUTH] Invalid user name.\r\n"
    assert raw.command(b"PASS x") == b"-ERR Send USER first.\r\n"
    raw.command(b"QUIT")
    assert raw.read_all() == b""
    time.sleep(0.2)
    assert relay.trap.connections == 0
    check = login(relay, "none", bob)
    assert check.stat()[0] == len(bob.messages)
    check.quit()


def test_unreachable_upstream_is_sys_temp(tmp_path: Path, dovecot: DovecotServer) -> None:
    closed_port = free_port()
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.down]\naddress = "127.0.0.1:{closed_port}"\ntls = "none"\nconnect_timeout = 2\n'
        '[routing]\ndefault = "down"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path)
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("dave")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.pass_("dave-pw")
        assert client.noop().startswith(b"+OK")  # the session goes on
        client.quit()
    finally:
        proxy.stop()
    log = proxy.log()
    assert f"at 127.0.0.1:{closed_port} unreachable" in log and "dave-pw" not in log
