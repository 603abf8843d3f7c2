"""Routing at scale, end to end: real ``twistd popproxy`` asking a real auth_http-compatible service
(``support.authhttp``, what an nginx mail proxy site already runs) which of two real Dovecot servers
serves each user; and a SIGHUP that changes the routing table under two workers."""

from __future__ import annotations

import poplib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popproxy.pki import CertificateAuthority

from support.authhttp import AuthHTTPService
from support.dovecot import DovecotServer, MailUser
from support.mailbox import corpus
from support.proxyproc import ProxyProcess, free_port


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    """A second Dovecot, with users the first does not have."""
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-b"), leaf=ca.issue(["localhost", "127.0.0.1"]))
    server.add_user("frank", "frank-pw", corpus(3, seed=61, large=False))
    server.add_user("grace-real", "grace-pw", corpus(2, seed=62, large=False))
    server.add_user("dave", "dave-pw", corpus(7, seed=63, large=False))  # another dave, on B
    server.start()
    try:
        yield server
    finally:
        server.close()


def _stat(port: int, user: str, password: str) -> tuple[int, int]:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
        return client.stat()
    finally:
        client.quit()


def _refused(port: int, user: str, password: str) -> bytes:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        client.user(user)
        with pytest.raises(poplib.error_proto) as refused:
            client.pass_(password)
        return refused.value.args[0]
    finally:
        client.close()


def _of(service: AuthHTTPService, user: str) -> list[dict[str, str]]:
    found = []
    for request in service.requests():
        headers = {name.lower(): value for name, value in request["headers"]}
        if headers.get("auth-user") == user:
            found.append(headers)
    return found


def test_an_auth_http_service_routes_users_between_two_dovecots(tmp_path: Path, dovecot: DovecotServer,
                                                               second: DovecotServer) -> None:
    a, b = dovecot.plain_port, second.plain_port
    table: dict[str, Any] = {"users": {
        "dave": {"status": "OK", "server": "127.0.0.1", "port": a, "password": "dave-pw"},
        "frank": {"status": "OK", "server": "127.0.0.1", "port": b, "password": "frank-pw"},
        "grace": {"status": "OK", "server": "127.0.0.1", "port": b, "password": "grace-outer",
                  "user": "grace-real", "pass": "grace-pw"},
        "outside": {"status": "OK", "server": "127.0.0.1", "port": 9, "password": "x"},
        "sleepy": {"status": "OK", "server": "127.0.0.1", "port": a, "delay": 4},
    }}
    service = AuthHTTPService(tmp_path / "auth", table).start()
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.mailstore]\naddress = "127.0.0.1:{a}"\ntls = "none"\n'
        f'[routing.lookup]\nurl = "{service.url}"\ntemplate = "mailstore"\ntimeout = 1.5\nconnect_timeout = 1\n'
        f'allowed_upstreams = [{{ network = "127.0.0.1/32", ports = [{a}, {b}] }}]\n'
        f'headers = {{ "X-Auth-Key" = "s3cret" }}\n'
        # popproxy's own per-address delay would stretch the denied logins below: keep it out of the way
        "[limits]\nlogin_failure_delay = 0.01\nmax_login_failures = 10\n"
    )
    try:
        proxy = ProxyProcess(config, [port], tmp_path, json=True)
    except BaseException:
        service.close()  # the service is a process of its own: never leave it behind
        raise
    try:
        dave, frank = dovecot.users["dave"], second.users["frank"]
        # Two Dovecots, chosen by user.
        assert _stat(port, "dave", "dave-pw") == (len(dave.messages), dave.total_size)
        assert _stat(port, "frank", "frank-pw") == (len(frank.messages), frank.total_size)
        [asked] = _of(service, "dave")
        assert asked["auth-method"] == "plain" and asked["auth-protocol"] == "pop3"
        assert asked["auth-pass"] == "dave-pw" and asked["auth-login-attempt"] == "1"
        assert asked["client-ip"] == "127.0.0.1" and asked["x-auth-key"] == "s3cret"

        # Auth-User / Auth-Pass rewrite: the client says grace, Dovecot sees grace-real.
        grace = second.users["grace-real"]
        assert _stat(port, "grace", "grace-outer") == (len(grace.messages), grace.total_size)
        assert "user=<grace-real>" in second.log_text() and "user=<grace>" not in second.log_text()

        # Cached: the same user, address and password are not asked again ...
        assert _stat(port, "dave", "dave-pw") == (len(dave.messages), dave.total_size)
        assert len(_of(service, "dave")) == 1
        # ... but another password is never answered from the cache: the service refuses it, after
        # its Auth-Wait (3 s in the service's table).
        started = time.monotonic()
        assert b"[AUTH]" in _refused(port, "dave", "guess")
        assert time.monotonic() - started >= 2.8
        assert len(_of(service, "dave")) == 2

        # An answer outside allowed_upstreams is refused, and logged.
        assert b"[SYS/TEMP]" in _refused(port, "outside", "x")
        # The service too slow (4 s against a 1.5 s timeout), then down.
        started = time.monotonic()
        assert b"[SYS/TEMP]" in _refused(port, "sleepy", "pw")
        assert time.monotonic() - started < 3.5
        service.close()
        assert b"[SYS/TEMP]" in _refused(port, "frank", "other-password")
    finally:
        proxy.stop()
        service.close()
    events = proxy.events()
    refusals = [e for e in events if e.get("event") == "lookup" and "9" in str(e.get("message"))]
    assert refusals, [e.get("message") for e in events if e.get("event") == "lookup"]
    assert not [e for e in events if "dave-pw" in str(e) or "grace-outer" in str(e)]  # no password in the log


def _write_routed(config: Path, port: int, to: str, a: DovecotServer, b: DovecotServer) -> None:
    config.write_text(
        f'[process]\nworkers = 2\n'
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.a]\naddress = "127.0.0.1:{a.plain_port}"\ntls = "none"\n'
        f'[upstream.b]\naddress = "127.0.0.1:{b.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "a"\n[routing.users]\n"dave" = "{to}"\n'
    )


def test_sighup_with_a_new_routing_table_moves_new_sessions_and_keeps_live_ones(
        tmp_path: Path, dovecot: DovecotServer, second: DovecotServer) -> None:
    port = free_port()
    config = tmp_path / "popproxy.toml"
    _write_routed(config, port, "a", dovecot, second)
    proxy = ProxyProcess(config, [port], tmp_path, json=True)
    on_a: MailUser = dovecot.users["dave"]
    on_b: MailUser = second.users["dave"]
    try:
        deadline = time.monotonic() + 30
        while len([e for e in proxy.events() if e.get("event") == "worker_ready"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        live = poplib.POP3("127.0.0.1", port, timeout=20)
        live.user("dave")
        live.pass_("dave-pw")
        assert live.stat() == (len(on_a.messages), on_a.total_size)
        _write_routed(config, port, "b", dovecot, second)
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not [e for e in proxy.events() if e.get("event") == "reloaded"]:
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.05)
        # Every new session, whichever worker takes it, goes to B ...
        for _ in range(6):
            assert _stat(port, "dave", "dave-pw") == (len(on_b.messages), on_b.total_size)
        # ... while the live one still talks to A.
        assert live.stat() == (len(on_a.messages), on_a.total_size)
        assert live.retr(1)[1] == on_a.messages[0].rstrip(b"\r\n").split(b"\r\n")
        live.quit()
    finally:
        proxy.stop()
