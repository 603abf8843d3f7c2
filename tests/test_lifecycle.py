"""Stopping and reloading: SIGTERM drains sessions within a grace time, SIGHUP reloads for new
sessions only; both in memory and under a real twistd."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from popproxy.pki import CertificateAuthority, write_private
from popproxy.testing import MemoryProxy

from support.configs import proxy_config
from support.dovecot import DovecotServer, MailUser
from support.pop3client import RawPOP3, tls_context
from support.proxyproc import ProxyProcess, free_port
from support.trap import TrapServer

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n"]


def test_draining_sessions_in_memory(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}})
    proxy = MemoryProxy(config)
    proxy.upstreams["main"].add_user("alice", "alice-pw", MESSAGES)
    waiting, waiting_session = proxy.connect("192.0.2.1")
    working, working_session = proxy.connect("192.0.2.2")
    proxy.say(working, b"USER alice\r\nPASS alice-pw\r\nDELE 1\r\n")
    waiting.take()
    waiting_session.start_draining()
    working_session.start_draining()
    proxy.pump()
    # Not logged in: nothing to finish, so it ends now, with a clear answer.
    assert waiting.take() == b"-ERR [SYS/TEMP] Server shutting down, try again later.\r\n" and waiting.lost
    # Logged in: new commands are refused, QUIT still commits what the client asked for.
    assert proxy.say(working, b"RETR 2\r\n") == b"-ERR [SYS/TEMP] Server shutting down, try again later.\r\n"
    assert proxy.say(working, b"QUIT\r\n") == b"+OK Bye\r\n"
    assert proxy.upstreams["main"].mailboxes[b"alice"].remaining() == MESSAGES[1:]


def _login(port: int, user: MailUser) -> RawPOP3:
    raw = RawPOP3(port)
    raw.answer()
    raw.command(b"USER " + user.name.encode())
    assert raw.command(b"PASS " + user.password.encode()) == b"+OK Logged in.\r\n"
    return raw


def test_sigterm_lets_sessions_quit_then_closes_the_rest_without_quit(tmp_path: Path, dovecot: DovecotServer, bob: MailUser) -> None:
    from support.mailbox import corpus

    carl = dovecot.add_user("carl", "carl-pw", corpus(3, seed=77, large=False))
    port = free_port()
    config = proxy_config(
        tmp_path,
        listeners=[{"endpoint": f"tcp:{port}:interface=127.0.0.1", "tls": "none"}],
        upstreams={"main": {"address": f"127.0.0.1:{dovecot.plain_port}", "tls": "none"}},
        extra="[limits]\nshutdown_grace = 3\n",
    )
    proxy = ProxyProcess(config.path, [port], tmp_path)
    polite = _login(port, bob)
    silent = _login(port, carl)
    assert polite.command(b"DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert silent.command(b"DELE 1") == b"+OK Marked to be deleted.\r\n"
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with socket.socket() as late:  # no longer accepting
        assert late.connect_ex(("127.0.0.1", port)) != 0
    assert polite.command(b"STAT").startswith(b"-ERR [SYS/TEMP] Server shutting down")
    assert polite.command(b"QUIT").startswith(b"+OK")
    started = time.monotonic()
    assert silent.read_all() == b""  # closed by the proxy when the grace time ran out
    assert 1.5 < time.monotonic() - started < 10
    status = proxy.stop()
    assert status == -signal.SIGTERM
    log = proxy.log()
    assert "session(s) get 3.0s to finish" in log
    # bob QUIT within the grace time: his DELE was committed. carl never did: nothing deleted.
    check = _login(dovecot.plain_port, bob)
    assert check.command(b"STAT") == b"+OK %d %d\r\n" % (len(bob.messages) - 1, bob.total_size - bob.sizes[0])
    check.command(b"QUIT")
    check = _login(dovecot.plain_port, carl)
    assert check.command(b"STAT") == b"+OK %d %d\r\n" % (len(carl.messages), carl.total_size)
    check.command(b"QUIT")


def _certificate_sha256(port: int, cafile: Path) -> bytes:
    import hashlib

    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        with tls_context(cafile).wrap_socket(plain, server_hostname="localhost") as wrapped:
            return hashlib.sha256(wrapped.getpeercert(binary_form=True)).digest()


def test_sighup_reloads_for_new_sessions_and_refuses_a_bad_config(tmp_path: Path, dovecot: DovecotServer, ca: CertificateAuthority) -> None:
    plain, implicit = free_port(), free_port()
    certificate = tmp_path / "proxy.pem"
    write_private(certificate, ca.issue(["localhost"]).combined_pem)
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    trap = TrapServer()
    config = tmp_path / "popproxy.toml"

    def write(default: str, broken: bool = False) -> None:
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{plain}:interface=127.0.0.1"\ntls = "none"\n'
            f'[[listen]]\nendpoint = "tcp:{implicit}:interface=127.0.0.1"\ntls = "implicit"\ncertificate = "{certificate}"\n'
            f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
            f'[upstream.trap]\naddress = "127.0.0.1:{trap.port}"\ntls = "none"\nconnect_timeout = 2\n'
            f'[routing]\ndefault = "{default}"\n' + ("[limits]\nmax_sessions = -1\n" if broken else "")
        )

    write("dovecot")
    proxy = ProxyProcess(config, [plain, implicit], tmp_path, extra=(), json=True)
    dave = dovecot.users["dave"]
    try:
        before = _certificate_sha256(implicit, cafile)
        old_session = _login(plain, dave)
        write_private(certificate, ca.issue(["localhost"]).combined_pem)
        write("trap")
        proxy.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        # The live session keeps its upstream and settings.
        assert old_session.command(b"STAT") == b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)
        # New sessions get the new routing and the new certificate.
        new_session = RawPOP3(plain)
        new_session.answer()
        new_session.command(b"USER dave")
        new_session.send(b"PASS " + dave.password.encode() + b"\r\n")
        time.sleep(0.5)
        assert trap.connections == 1
        new_session.close()
        assert _certificate_sha256(implicit, cafile) != before
        # A configuration that does not validate is refused; the running one stays.
        write("dovecot", broken=True)
        proxy.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        third = RawPOP3(plain)
        third.answer()
        third.command(b"USER dave")
        third.send(b"PASS " + dave.password.encode() + b"\r\n")
        time.sleep(0.5)
        assert trap.connections == 2
        third.close()
        old_session.command(b"QUIT")
    finally:
        proxy.stop()
        trap.close()
    events = proxy.events()
    assert [e["event"] for e in events if e.get("event") in ("reloaded", "reload_failed")] == ["reloaded", "reload_failed"]
    failed = next(e for e in events if e.get("event") == "reload_failed")
    assert "limits.max_sessions" in failed["error"] and str(config) in failed["error"]
