"""Listener kinds under twistd: PROXY protocol (plain and implicit TLS behind it), peer filtering,
UNIX sockets. Upstream: the real Dovecot."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from popproxy.pki import CertificateAuthority, write_private
from popproxy.proxyheader import build_v2, build_v2_local

from support.dovecot import DovecotServer
from support.pop3client import RawPOP3, tls_context
from support.proxyproc import ProxyProcess, free_port


def closed_without_data(sock: socket.socket) -> bool:
    """True if the peer closed (FIN or RST) without sending anything."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_proxy_protocol_unix_and_peer_filter(tmp_path: Path, dovecot: DovecotServer, ca: CertificateAuthority) -> None:
    certificate = write_private(tmp_path / "proxy.pem", ca.issue(["localhost", "127.0.0.1"]).combined_pem)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    proxied, proxied_tls, filtered = free_port(), free_port(), free_port()
    unix_path = tmp_path / "pop3.sock"
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "haproxy:tcp:{proxied}:interface=127.0.0.1"\ntls = "none"\n'
        f'[[listen]]\nendpoint = "haproxy:tcp:{proxied_tls}:interface=127.0.0.1"\ntls = "implicit"\ncertificate = "{certificate}"\n'
        f'[[listen]]\nendpoint = "haproxy:tcp:{filtered}:interface=127.0.0.1"\ntls = "none"\nproxy_from = ["10.0.0.0/8"]\n'
        f'[[listen]]\nendpoint = "unix:{unix_path}"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
    )
    proxy = ProxyProcess(config, [proxied, proxied_tls, filtered], tmp_path, json=True)
    dave = dovecot.users["dave"]
    try:
        # A PROXY v1 header names the real client; the session is logged with that address.
        raw = RawPOP3(proxied)
        raw.send(b"PROXY TCP4 192.0.2.10 127.0.0.1 50123 110\r\n")
        assert raw.answer().startswith(b"+OK")
        raw.command(b"USER dave")
        assert raw.command(b"PASS " + dave.password.encode()) == b"+OK Logged in.\r\n"
        assert raw.command(b"STAT") == b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)
        raw.command(b"QUIT")

        # Implicit TLS behind the PROXY header: the header in clear text, then the handshake.
        plain = socket.create_connection(("127.0.0.1", proxied_tls), timeout=10)
        plain.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 995\r\n")
        wrapped = tls_context(tmp_path / "ca.pem").wrap_socket(plain, server_hostname="localhost")
        tls = RawPOP3(0, sock=wrapped)
        assert tls.answer().startswith(b"+OK")
        assert tls.command(b"NOOP") == b"+OK\r\n"
        tls.command(b"QUIT")
        tls.close()

        # A peer outside proxy_from is refused before a byte is read.
        refused = socket.create_connection(("127.0.0.1", filtered), timeout=10)
        refused.sendall(b"PROXY TCP4 203.0.113.1 127.0.0.1 1 110\r\n")
        assert closed_without_data(refused)

        # A connection without a PROXY header on a PROXY listener is closed (no guessing).
        bare = socket.create_connection(("127.0.0.1", proxied), timeout=10)
        bare.sendall(b"USER dave\r\n")
        data = bare.recv(100)
        assert not data.startswith(b"+OK Logged") and bare.recv(100) == b""
        bare.close()

        # UNIX socket listener.
        unix = socket.socket(socket.AF_UNIX)
        unix.settimeout(10)
        unix.connect(str(unix_path))
        local = RawPOP3(0, sock=unix)
        assert local.answer().startswith(b"+OK")
        local.command(b"USER dave")
        assert local.command(b"PASS " + dave.password.encode()) == b"+OK Logged in.\r\n"
        local.command(b"QUIT")
        time.sleep(0.3)
    finally:
        proxy.stop()
    events = proxy.events()
    peers = {e.get("client_host") for e in events if e.get("event") == "session_open"}
    assert "192.0.2.10" in peers and "198.51.100.7" in peers
    assert "203.0.113.1" not in peers
    ended = [e for e in events if e.get("event") == "session_close" and e.get("client_host") == "198.51.100.7"]
    assert ended and ended[0]["client_tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert any("not in proxy_from" in str(e.get("message", "")) for e in events)


def test_proxy_protocol_v2_and_health_checks(tmp_path: Path, dovecot: DovecotServer) -> None:
    """Our own header reader under twistd: a v2 header with TLVs, sent in two pieces, names an IPv6
    client; a v2 LOCAL health check (HAProxy's check-send-proxy) is greeted; a v1 header with a port out of range closes the connection."""
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path, json=True)
    dave = dovecot.users["dave"]
    try:
        header = build_v2(("2001:db8::7", 40001), ("2001:db8::1", 110), [(0x04, b"padding"), (0xE0, b"x" * 300)])
        raw = RawPOP3(port)
        raw.send(header[:20])
        time.sleep(0.2)  # the rest of the header (and a command) in a later segment
        raw.send(header[20:] + b"USER dave\r\n")
        assert raw.answer().startswith(b"+OK")
        assert raw.answer() == b"+OK\r\n"
        assert raw.command(b"PASS " + dave.password.encode()) == b"+OK Logged in.\r\n"
        raw.command(b"QUIT")

        check = RawPOP3(port)
        check.send(build_v2_local())
        assert check.answer().startswith(b"+OK")
        # A health check is no session: it cannot log in, and leaves no session record (below).
        assert check.command(b"USER dave") == b"-ERR [SYS/PERM] Health checks cannot log in.\r\n"
        check.close()
        silent = RawPOP3(port)  # a TCP check: the header, the greeting, and gone
        silent.send(build_v2_local())
        assert silent.answer().startswith(b"+OK")
        silent.close()

        bad = socket.create_connection(("127.0.0.1", port), timeout=10)
        bad.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 110\r\nUSER dave\r\n")
        received = b""
        while chunk := bad.recv(100):
            received += chunk
        bad.close()
        assert b"+OK\r\n" not in received.partition(b"\r\n")[2]  # at most the greeting; USER never answered
        time.sleep(0.3)
    finally:
        proxy.stop()
    events = proxy.events()
    opened = [e.get("client_host") for e in events if e.get("event") == "session_open"]
    closed = [e.get("client_host") for e in events if e.get("event") == "session_close"]
    # The IPv6 client's session, and from the load balancer's address the readiness probe's connection
    # (no header) and the bad header's: nothing from the two health checks.
    assert sorted(opened) == sorted(closed) == ["127.0.0.1", "127.0.0.1", "2001:db8::7"], (opened, closed)
    assert any(e.get("error") == "v1 header port 99999 is out of range" for e in events)


def test_plaintext_from_behind_haproxy_counts_the_proxy_header_address(tmp_path: Path, dovecot: DovecotServer,
                                                                      ca: CertificateAuthority) -> None:
    """A legacy device behind the load balancer: the PROXY header's address decides, not the load
    balancer's (which every client shares). Its login is marked in the log."""
    port = free_port()
    certificate = tmp_path / "proxy.pem"
    write_private(certificate, ca.issue(["localhost"]).combined_pem)
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "starttls"\n'
        f'certificate = "{certificate}"\nplaintext_from = ["192.0.2.10/32"]\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path, json=True)
    dave = dovecot.users["dave"]
    try:
        legacy = RawPOP3(port)
        legacy.send(build_v2(("192.0.2.10", 40001), ("127.0.0.1", port)))
        assert legacy.answer().startswith(b"+OK")
        capa = legacy.command(b"CAPA", multiline=True)
        assert b"\r\nUSER\r\n" in capa and b"\r\nSTLS\r\n" in capa
        assert legacy.command(b"USER dave") == b"+OK\r\n"
        assert legacy.command(b"PASS " + dave.password.encode()) == b"+OK Logged in.\r\n"
        legacy.command(b"QUIT")

        other = RawPOP3(port)  # the same load balancer, another client: STLS first
        other.send(build_v2(("192.0.2.11", 40002), ("127.0.0.1", port)))
        assert other.answer().startswith(b"+OK")
        assert b"\r\nUSER\r\n" not in other.command(b"CAPA", multiline=True)
        assert other.command(b"USER dave").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
        other.close()
    finally:
        proxy.stop()
    logins = [e for e in proxy.events() if e.get("event") == "auth" and e.get("result") == "ok"]
    assert [(e.get("client_host"), e.get("plaintext_from")) for e in logins] == [("192.0.2.10", True)]
