"""Hostile clients against a real ``twistd -n popproxy``, over scripted raw sockets on loopback.

Every client-side limit and timeout of ``[limits]`` (``upstream_max_line`` belongs to the hostile
upstream suite, ``shutdown_grace`` to ``test_lifecycle.py``), a slowloris flood and a client that
stops reading, plus framing abuse (bare CR/LF, NUL, non-ASCII, one-byte packets, thousands of
pipelined commands, endless lines), open-proxy and credential-injection attempts, out-of-state and
admin commands, TLS garbage, hostile SNI, client renegotiation, and TLS 1.0/1.1 from a client that
really offers them. ``tests/test_limits.py`` and ``tests/test_session.py`` hold the in-memory
versions; here everything crosses real sockets and real time.

Three proxies, one per kind of configuration, each started once for the module:

- ``main``: plain, STLS and implicit-TLS listeners; routes ``dave`` to the real Dovecot, ``@down.test``
  to a port nobody listens on, and everything else to a recording fake upstream (``rec``), so that an
  open-proxy attempt or an injected command would show there. ``max_pipelined`` 8, ``max_buffered``
  16 kB, ``max_bad_commands`` 8, ``login_failure_delay`` 0.2 s.
- ``timeouts``: login 1.6 s, idle 1.0 s, TLS handshake 0.8 s, upstream 1.2 s; ``max_sessions`` 500.
- ``caps``: ``max_sessions`` 6, per address 2 (127.0.0.200 allowlisted), per user 1, an address
  table of 4 entries, and no default route.

Per-address counters and penalties would make tests from 127.0.0.1 interfere, so every connection
comes from a loopback address of its own (``fresh_address()``: 127.0.10.1 upwards) unless a test
reuses one on purpose. Every hostile input is counted (``support.hostile.hostile``); the total is
printed after the module. Every password and AUTH PLAIN blob goes through ``secret()``, and the last
test checks that none of them, nor their base64, reached any proxy's log.
"""

from __future__ import annotations

import base64
import os
import random
import re
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from popproxy.pki import CertificateAuthority, write_private

import support.hostile as hostile_inputs
from support.dovecot import DovecotServer, MailUser
from support.hostile import (
    RecordingUpstream,
    client_context,
    client_hello,
    close_opened,
    close_times,
    connect,
    fresh_address,
    hostile,
    legacy_server_context,
    offered_version,
    peak_kib,
    quiet_for,
    reset_peak,
    wait_closed,
    wait_for,
)
from support.mailbox import corpus
from support.pop3client import RawPOP3
from support.proxyproc import ProxyProcess, free_port
from support.trap import TrapServer

GREETING = b"+OK POP3 proxy ready.\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
FORBIDDEN = b"-ERR [AUTH] Credentials contain forbidden characters.\r\n"
BAD_USER = b"-ERR [AUTH] Invalid user name.\r\n"
NO_USER = b"-ERR Send USER first.\r\n"
TOO_LONG = b"-ERR Command line too long.\r\n"
UNKNOWN_BEFORE_LOGIN = b"-ERR Unknown command or not allowed before login.\r\n"
NOT_AFTER_LOGIN = b"-ERR Not allowed after login.\r\n"
UNKNOWN_AFTER_LOGIN = b"-ERR Unknown command.\r\n"
TOO_MANY_BAD = b"-ERR Too many bad commands, goodbye.\r\n"
TOO_MANY_SESSIONS = b"-ERR [SYS/TEMP] Too many sessions, try again later.\r\n"
UPSTREAM_DOWN = b"-ERR [SYS/TEMP] Mail server unavailable, try again later.\r\n"
LOGGED_IN = b"+OK Logged in.\r\n"

#: every password and AUTH PLAIN blob the module sends; none may appear in a proxy's log
SECRETS: set[bytes] = set()
#: every proxy the module started, for the final log check
PROXIES: list[ProxyProcess] = []


def secret(value: bytes) -> bytes:
    SECRETS.add(value)
    return value


def plain_blob(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    """An AUTH PLAIN response (RFC 4616), remembered as a secret with its password."""
    secret(password)
    return secret(base64.b64encode(authzid + b"\0" + authcid + b"\0" + password))


_serial = iter(range(1, 1_000_000))


def unique(prefix: str) -> bytes:
    """A user name no other test uses, so that the recording upstream's sessions can be told apart."""
    return f"{prefix}-{next(_serial)}".encode()


# -- fixtures ------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    process: ProxyProcess
    ports: dict[str, int]
    rec: RecordingUpstream
    cafile: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def greet(self, listener: str = "plain", source: str | None = None, nodelay: bool = False) -> RawPOP3:
        raw = RawPOP3(0, sock=connect(self.ports[listener], source, nodelay=nodelay))
        assert raw.answer() == GREETING
        return raw

    def tls(self, version: str = "1.2", source: str | None = None) -> RawPOP3:
        """An implicit-TLS session, greeted."""
        sock = connect(self.ports["implicit"], source)
        try:
            wrapped = client_context(self.cafile, version).wrap_socket(sock, server_hostname="localhost")
        except BaseException:
            sock.close()
            raise
        raw = RawPOP3(0, sock=wrapped)
        assert raw.answer() == GREETING
        return raw

    def login(self, user: bytes, password: bytes, listener: str = "plain", source: str | None = None) -> RawPOP3:
        raw = self.greet(listener, source)
        assert raw.command(b"USER " + user) == b"+OK\r\n"
        assert raw.command(b"PASS " + secret(password)) == LOGGED_IN
        return raw

    def events(self) -> list[dict[str, object]]:
        return self.process.events()

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until every session the proxy opened has ended (sessions of earlier tests still count
        against the session caps until the proxy has noticed that they closed)."""

        def idle() -> bool:
            kinds = [e.get("event") for e in self.events()]
            return kinds.count("session_open") == kinds.count("session_close")

        assert wait_for(idle, timeout), "sessions of earlier tests did not end"

    def ended(self, client_host: str) -> list[dict[str, object]]:
        return [e for e in self.events() if e.get("event") == "session_close" and e.get("client_host") == client_host]


def _write_config(folder: Path, listeners: list[tuple[str, int, str]], certificate: Path, body: str) -> Path:
    """``listeners``: (tls, port, extra TOML); extra lines starting with ":" are endpoint options."""
    parts = []
    for tls, port, extra in listeners:
        options = "".join(line for line in extra.splitlines() if line.startswith(":"))
        extra = "".join(line + "\n" for line in extra.splitlines() if not line.startswith(":"))
        text = f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1{options}"\ntls = "{tls}"\n'
        if tls != "none":
            text += f'certificate = "{certificate}"\n'
        parts.append(text + extra)
    path = folder / "popproxy.toml"
    path.write_text("\n".join(parts) + body)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile-pki")
    certificate = write_private(folder / "proxy.pem", ca.issue(["localhost", "127.0.0.1"]).combined_pem)
    cafile = folder / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    return certificate, cafile


def _start(folder: Path, names: list[tuple[str, str, str]], certificate: Path, cafile: Path, body: str,
           rec: RecordingUpstream) -> Proxy:
    ports = {name: free_port() for name, _, _ in names}
    config = _write_config(folder, [(tls, ports[name], extra) for name, tls, extra in names], certificate, body)
    process = ProxyProcess(config, list(ports.values()), folder, json=True)
    PROXIES.append(process)
    return Proxy(process, ports, rec, cafile)


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path], dovecot: DovecotServer) -> Iterator[Proxy]:
    certificate, cafile = pki
    rec = RecordingUpstream()
    dead = free_port()  # nobody listens there: the upstream is down
    body = (
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[upstream.rec]\naddress = "127.0.0.1:{rec.port}"\ntls = "none"\n'
        f'[upstream.down]\naddress = "127.0.0.1:{dead}"\ntls = "none"\nconnect_timeout = 2\n'
        '[routing]\ndefault = "rec"\n'
        '[routing.users]\n"dave" = "dovecot"\n"@down.test" = "down"\n'
        "[limits]\nmax_pipelined = 8\nmax_buffered = 16384\nmax_bad_commands = 8\nlogin_failure_delay = 0.2\n"
        "max_login_failures = 3\nupstream_timeout = 10\n"
    )
    proxy = _start(
        tmp_path_factory.mktemp("hostile-main"),
        [("plain", "none", ""), ("stls", "starttls", ""), ("implicit", "implicit", 'tls_min_version = "1.2"\n')],
        certificate, cafile, body, rec,
    )
    secret(dovecot.users["dave"].password.encode())
    try:
        yield proxy
    finally:
        proxy.process.stop()
        rec.close()


def _raise_fd_limit(wanted: int = 4096) -> None:
    """Many sockets at once: raise the soft descriptor limit (inherited by the proxy started after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


FLOOD_SESSIONS = 500


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path], dovecot: DovecotServer) -> Iterator[Proxy]:
    certificate, cafile = pki
    _raise_fd_limit()
    rec = RecordingUpstream()
    eve = dovecot.add_user("hostile-eve", secret(b"eve-Hx-pw-5").decode(), corpus(3, seed=31, large=False))
    body = (
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[upstream.rec]\naddress = "127.0.0.1:{rec.port}"\ntls = "none"\n'
        '[routing]\ndefault = "rec"\n[routing.users]\n"hostile-eve" = "dovecot"\n"alice" = "dovecot"\n'
        "[limits]\nlogin_timeout = 1.6\nidle_timeout = 1.0\ntls_handshake_timeout = 0.8\n"
        f"upstream_timeout = 1.2\nmax_sessions = {FLOOD_SESSIONS}\n"
    )
    proxy = _start(
        tmp_path_factory.mktemp("hostile-timeouts"),
        # A listen queue for the flood test's burst of connections (Twisted's default is 50).
        [("plain", "none", ":backlog=1024"), ("stls", "starttls", "require_tls = false\n"), ("implicit", "implicit", "")],
        certificate, cafile, body, rec,
    )
    proxy.extra["eve"] = eve
    proxy.extra["dovecot"] = dovecot
    secret(dovecot.users["alice"].password.encode())
    try:
        yield proxy
    finally:
        proxy.process.stop()
        rec.close()


ALLOWED = "127.0.0.200"


@pytest.fixture(scope="module")
def caps(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path], dovecot: DovecotServer) -> Iterator[Proxy]:
    certificate, cafile = pki
    rec = RecordingUpstream(users={b"known": secret(b"known-Hx-pw-1"), b"solo": secret(b"solo-Hx-pw-2")})
    body = (
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[upstream.dovelocal]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\nlogin_as = "{{local}}"\n'
        f'[upstream.rec]\naddress = "127.0.0.1:{rec.port}"\ntls = "none"\n'
        '[routing]\n[routing.users]\n"known" = "rec"\n"solo" = "rec"\n"dave" = "dovecot"\n"@rec.test" = "rec"\n'
        '"@dove.test" = "dovelocal"\n'
        "[limits]\nmax_sessions = 6\nmax_sessions_per_ip = 2\nmax_sessions_per_user = 1\n"
        f'ip_allowlist = ["{ALLOWED}/32"]\nip_table_size = 4\nlogin_failure_delay = 0.3\n'
    )
    proxy = _start(tmp_path_factory.mktemp("hostile-caps"), [("plain", "none", "")], certificate, cafile, body, rec)
    secret(dovecot.users["dave"].password.encode())
    try:
        yield proxy
    finally:
        proxy.process.stop()
        rec.close()


@pytest.fixture(scope="module", autouse=True)
def report_hostile_inputs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many hostile inputs the module sent (for the release note)."""
    before = hostile_inputs.HOSTILE_INPUTS
    yield
    sent = hostile_inputs.HOSTILE_INPUTS - before
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{request.module.__name__}: {sent} hostile inputs sent")


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[None]:
    """Close every socket a test opened with ``connect``, passed or failed (no ResourceWarning)."""
    yield
    close_opened()


def closed_after(raw: RawPOP3, timeout: float = 3.0) -> tuple[bool, bytes]:
    """(closed by the proxy within ``timeout``, anything that came before the close)."""
    leftover, raw._buffer = raw._buffer, b""
    closed, data, _ = wait_closed(raw.sock, timeout)
    return closed, leftover + data


# == 1. Information leaks ==============================================================================

_FINGERPRINT = re.compile(rb"\d+\.\d+|twisted|python|popproxy|dovecot|implementation|openssl", re.IGNORECASE)


def test_greeting_and_capa_disclose_no_software_or_version(main: Proxy) -> None:
    seen = []
    for listener in ("plain", "stls"):
        raw = main.greet(listener)
        seen.append(GREETING)
        seen.append(raw.command(b"CAPA", multiline=True))
        if listener == "stls":
            assert raw.command(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
            raw.start_tls(main.cafile)
            seen.append(raw.command(b"CAPA", multiline=True))
    tls = main.tls()
    seen.append(tls.command(b"CAPA", multiline=True))
    # After login the upstream's CAPA is relayed, filtered (Dovecot's own, here).
    dave = main.login(b"dave", b"dave-pw")
    after = dave.command(b"CAPA", multiline=True)
    assert after.startswith(b"+OK") and b"TOP" in after
    seen.append(after)
    hostile(1)  # the version probe itself
    unknown = dave.command(b"VERSION")
    seen.append(unknown)
    for answer in seen:
        assert not _FINGERPRINT.search(answer), answer


# == 2. Command lines: length, repeated abuse, endless lines ===========================================


def test_command_line_limit_is_255_octets_and_the_session_goes_on(main: Proxy) -> None:
    raw = main.greet()
    exactly = b"NOOP " + b"x" * (255 - 7)  # 255 octets with the CRLF (RFC 2449 §4)
    assert len(exactly) + 2 == 255
    assert raw.command(exactly) == b"+OK\r\n"
    hostile(2)
    assert raw.command(exactly + b"x") == TOO_LONG
    assert raw.command(b"USER " + b"u" * 4000) == TOO_LONG
    assert raw.command(b"NOOP") == b"+OK\r\n"
    # The same after login: an over-long command never reaches the upstream.
    user = unique("hx-long")
    assert raw.command(b"USER " + user) == b"+OK\r\n"
    assert raw.command(b"PASS " + secret(b"pw-long-Hx")) == LOGGED_IN
    hostile(2)
    assert raw.command(b"RETR 1 " + b"9" * 300) == TOO_LONG
    assert raw.command(b"DELE " + b"1" * 100_000) == TOO_LONG
    assert raw.command(b"NOOP") == b"+OK\r\n"
    assert raw.command(b"QUIT") == b"+OK bye\r\n"
    lines = main.rec.session_of(user)
    assert lines[-2:] == [b"NOOP", b"QUIT"]
    assert all(len(line) < 255 for line in lines) and not any(line.startswith((b"RETR", b"DELE")) for line in lines)


def test_repeated_bad_commands_disconnect_before_and_after_login(main: Proxy) -> None:
    # max_bad_commands = 8: seven are answered and the session goes on; the eighth ends it.
    raw = main.greet()
    bad = [b"X" * 300, b"FOO", b"RETR 1", b"KILL", b"APOP dave 0123456789abcdef", b"XPROXY", b"\xff\xfe"]
    hostile(len(bad) + 1)
    for line in bad:
        answer = raw.command(line)
        assert answer.startswith(b"-ERR"), (line, answer)
    assert raw.command(b"NOOP") == b"+OK\r\n"
    raw.send(b"CRASH\r\nNOOP\r\n")  # the NOOP pipelined after the last straw is not served
    assert raw.answer() == UNKNOWN_BEFORE_LOGIN
    assert raw.answer() == TOO_MANY_BAD
    assert closed_after(raw) == (True, b"")

    user = unique("hx-bad")
    raw = main.login(user, b"pw-bad-Hx")
    verbs = [b"KILL", b"SHUTDOWN", b"XPROXY", b"CRASH", b"DEBUG", b"STLS", b"AUTH PLAIN", b"SITE EXEC x"]
    hostile(len(verbs))
    raw.send(b"".join(v + b"\r\n" for v in verbs) + b"NOOP\r\n")
    answers = [raw.answer() for _ in range(len(verbs) + 1)]
    assert all(a.startswith(b"-ERR") for a in answers) and answers[-1] == TOO_MANY_BAD
    assert closed_after(raw) == (True, b"")
    # None of it reached the upstream, and the session ended without QUIT.
    assert wait_for(lambda: main.rec.session_of(user)[-1] == b"PASS pw-bad-Hx")
    assert main.rec.session_of(user) == [b"CAPA", b"USER " + user, b"PASS pw-bad-Hx"]


def test_a_line_that_never_ends_does_not_grow_memory(main: Proxy) -> None:
    """10 MB without a line feed: one -ERR as soon as the line passes the limit, the rest is thrown
    away as it arrives (peak RSS stays flat), and once the line ends the session goes on."""
    chunk = b"A" * 65536
    for stage in ("before login", "after login"):
        raw = main.greet()
        user = unique("hx-endless")
        if stage == "after login":
            raw.command(b"USER " + user)
            assert raw.command(b"PASS " + secret(b"pw-endless-Hx")) == LOGGED_IN
        before = reset_peak(main.pid)
        hostile()
        for _ in range(160):  # 10 MiB
            raw.send(chunk)
        raw.send(b"\r\nNOOP\r\n")
        assert raw.answer() == TOO_LONG  # once, not once per chunk
        assert raw.answer() == b"+OK\r\n"  # the session went on after the line's end
        growth = peak_kib(main.pid) - before
        assert growth < 4096, f"{stage}: peak RSS grew by {growth} KiB for a 10 MiB line"
        assert quiet_for(raw.sock, 0.2) == b""
        raw.close()
    assert all(len(line) < 255 for line in main.rec.session_of(user))


def test_over_long_sasl_response_ends_the_auth_exchange(main: Proxy) -> None:
    """RFC 5034 §4: the answer to the continuation line ends AUTH. After ``-ERR Command line too
    long.`` the client is back in AUTHORIZATION state and its next command is a command.
    (Found by this suite: the session used to stay in SASL state and took the NOOP for SASL data,
    answering ``-ERR [AUTH] Invalid SASL PLAIN response`` after a failed-login delay.)"""
    raw = main.greet()
    assert raw.command(b"AUTH PLAIN") == b"+ \r\n"
    hostile()
    raw.send(b"QUFB" * 5000 + b"\r\n")  # 20 kB of base64, over the 8 kB continuation limit
    assert raw.answer() == TOO_LONG
    started = time.monotonic()
    assert raw.command(b"NOOP") == b"+OK\r\n"
    assert time.monotonic() - started < 0.15  # and no failed-login delay


# == 3. Pipelining ======================================================================================


def test_thousands_of_pipelined_commands_in_one_write_are_answered_in_order(main: Proxy, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    raw = main.greet()
    # Before login the proxy answers by itself.
    hostile()
    raw.send(b"NOOP\r\n" * 3000)
    expected = b"+OK\r\n" * 3000
    received = b""
    while len(received) < len(expected):
        received += raw.sock.recv(65536)
    assert received == expected
    assert raw.command(b"USER dave") == b"+OK\r\n"
    assert raw.command(b"PASS " + dave.password.encode()) == LOGGED_IN
    # After login: 5,000 commands in one write, a numbered LIST every 50th so that order shows.
    commands, answers = [], []
    for i in range(5000):
        if i % 50 == 49:
            n = (i // 50) % len(dave.messages) + 1
            commands.append(b"LIST %d\r\n" % n)
            answers.append(b"+OK %d %d\r\n" % (n, dave.sizes[n - 1]))
        else:
            commands.append(b"NOOP\r\n")
            answers.append(b"+OK\r\n")
    before = reset_peak(main.pid)
    hostile()
    raw.send(b"".join(commands))
    expected = b"".join(answers)
    received = b""
    while len(received) < len(expected):
        received += raw.sock.recv(65536)
    assert received == expected
    assert peak_kib(main.pid) - before < 8192
    assert raw.command(b"QUIT").startswith(b"+OK")


def test_max_pipelined_bounds_the_commands_in_flight_upstream(main: Proxy) -> None:
    user = unique("hx-pipe")
    raw = main.login(user, b"pw-pipe-Hx")
    main.rec.hold.set()  # the upstream reads but answers nothing
    try:
        hostile()
        raw.send(b"NOOP\r\n" * 40)

        def sent_up() -> int:
            return main.rec.session_of(user).count(b"NOOP")

        assert wait_for(lambda: sent_up() >= 8)
        time.sleep(0.3)
        assert sent_up() == 8  # max_pipelined = 8: the rest waits in the proxy
        assert quiet_for(raw.sock, 0.05) == b""
    finally:
        main.rec.release()
    received = b""
    while len(received) < 40 * 5:
        received += raw.sock.recv(65536)
    assert received == b"+OK\r\n" * 40
    assert main.rec.session_of(user).count(b"NOOP") == 40


def test_max_buffered_stops_reading_a_client_whose_commands_wait(main: Proxy) -> None:
    """The upstream answers nothing, so the pipeline is full (8) and further commands wait in the
    proxy: past max_buffered (16 kB) it stops reading the socket. A client pushing 32 MB of NOOPs
    stalls once the kernel's buffers are full, and the proxy's peak RSS stays flat."""
    user = unique("hx-buffered")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.bind((fresh_address(), 0))
    sock.connect(("127.0.0.1", main.ports["plain"]))
    raw = RawPOP3(0, sock=sock)
    assert raw.answer() == GREETING
    raw.command(b"USER " + user)
    assert raw.command(b"PASS " + secret(b"pw-buffered-Hx")) == LOGGED_IN
    payload = b"NOOP\r\n" * (32 * 1024 * 1024 // 6)
    main.rec.hold.set()
    try:
        before = reset_peak(main.pid)
        hostile()
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 1.5
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                sent += sock.send(payload[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        assert sent < 8 * 1024 * 1024, f"the proxy took {sent} bytes of commands it cannot serve yet"
        growth = peak_kib(main.pid) - before
        assert growth < 4096, f"peak RSS grew by {growth} KiB"
        assert main.rec.session_of(user).count(b"NOOP") == 8
    finally:
        main.rec.release()
        sock.close()


# == 4. Failed logins ===================================================================================


def _timed_answers(raw: RawPOP3, count: int) -> list[tuple[float, bytes]]:
    out = []
    for _ in range(count):
        line = raw.answer()
        out.append((time.monotonic(), line))
    return out


def test_failed_logins_are_delayed_more_each_time_then_disconnected(main: Proxy) -> None:
    """One attempt at a time: the first is answered at once, the next after 0.2 and 0.4 s
    (login_failure_delay doubling, paid before the upstream is asked), and the third failure
    (max_login_failures) closes the connection."""
    raw = main.greet()
    user = unique("hx-brute")
    gaps = []
    hostile(3)
    for _ in range(3):
        assert raw.command(b"USER " + user) == b"+OK\r\n"
        started = time.monotonic()
        assert raw.command(b"PASS " + secret(b"wrong-brute-Hx")) == AUTH_FAILED
        gaps.append(time.monotonic() - started)
    for gap, nominal in zip(gaps, (0.0, 0.2, 0.4), strict=True):
        assert nominal - 0.02 <= gap <= nominal + 0.35, gaps
    assert closed_after(raw) == (True, b"")
    assert main.rec.lines().count(b"USER " + user) == 3


@pytest.mark.parametrize("login", [b"USER hx-order\r\nPASS wrong-order-Hx\r\n",
                                   b"AUTH PLAIN AGh4LW9yZGVyAHdyb25nLW9yZGVyLUh4\r\n",
                                   b"USER hx-order@down.test\r\nPASS pw-order-Hx\r\n"],
                         ids=["user-pass-refused", "auth-plain-refused", "upstream-down"])
def test_commands_pipelined_behind_a_failed_login_are_answered_in_order(main: Proxy, login: bytes) -> None:
    """RFC 2449 §6.6 (PIPELINING is in the proxy's CAPA before login): answers come in the order of
    the commands. ``USER x / PASS wrong / NOOP`` in one write must be answered +OK, -ERR, +OK.
    (Found by this suite: the NOOP's +OK used to overtake the login's -ERR, because the read hold
    of the login was released before its answer was queued.)"""
    secret(b"wrong-order-Hx")
    secret(b"pw-order-Hx")
    secret(b"AGh4LW9yZGVyAHdyb25nLW9yZGVyLUh4")
    raw = main.greet()
    hostile()
    raw.send(login + b"NOOP\r\n")
    answers = [raw.answer() for _ in range(login.count(b"\r\n") + 1)]
    assert answers[-2].startswith(b"-ERR [") and answers[-1] == b"+OK\r\n", answers


def test_pipelined_brute_force_gets_no_more_guesses_than_max_login_failures(main: Proxy) -> None:
    """Ten USER/PASS pairs in one write: the answers come in order after 0, 0.2 and 0.4 s, the third
    failure closes the connection, and the upstream saw 3 passwords, not more. (Found by this suite:
    the next pipelined PASS used to reach the upstream while the previous failure's delay ran, six
    guesses per connection with max_login_failures = 3.)"""
    raw = main.greet()
    user = unique("hx-pipebrute")
    attempt = b"USER " + user + b"\r\nPASS " + secret(b"wrong-pipebrute-Hx") + b"\r\n"
    hostile(10)
    started = time.monotonic()
    raw.send(attempt * 10)
    answers = _timed_answers(raw, 6)
    assert [line for _, line in answers] == [b"+OK\r\n", AUTH_FAILED] * 3
    failures = [when for when, line in answers if line == AUTH_FAILED]
    gaps = [failures[0] - started, failures[1] - failures[0], failures[2] - failures[1]]
    for gap, nominal in zip(gaps, (0.0, 0.2, 0.4), strict=True):
        assert nominal - 0.02 <= gap <= nominal + 0.35, gaps
    assert closed_after(raw) == (True, b"")
    time.sleep(0.3)  # a login started after the close would still reach the upstream
    assert main.rec.lines().count(b"USER " + user) == 3


def _one_failure(proxy: Proxy, source: str, user: bytes, password: bytes) -> float:
    raw = proxy.greet(source=source)
    assert raw.command(b"USER " + user).startswith((b"+OK", b"-ERR"))
    started = time.monotonic()
    assert raw.command(b"PASS " + secret(password)) == AUTH_FAILED
    elapsed = time.monotonic() - started
    raw.close()
    return elapsed


def test_failure_penalty_follows_the_address_to_its_next_connection(main: Proxy) -> None:
    guilty, innocent = fresh_address(), fresh_address()
    hostile(3)
    first = _one_failure(main, guilty, unique("hx-pen"), b"wrong-pen-Hx")
    second = _one_failure(main, guilty, unique("hx-pen"), b"wrong-pen-Hx")
    other = _one_failure(main, innocent, unique("hx-pen"), b"wrong-pen-Hx")
    # The first failure from an address costs nothing; the next connection from it waits 0.2 s before
    # its login is tried; another address is not affected.
    assert first <= 0.15 and 0.18 <= second <= 0.5 and other <= 0.15, (first, second, other)


def test_upstream_down_is_sys_temp_and_not_a_failed_login(main: Proxy) -> None:
    raw = main.greet()
    for _ in range(4):  # more than max_login_failures = 3
        raw.command(b"USER nobody@down.test")
        started = time.monotonic()
        assert raw.command(b"PASS " + secret(b"pw-down-Hx")) == UPSTREAM_DOWN
        # No penalty (the 4th would wait 1.6 s); Twisted's HostnameEndpoint takes ~0.3 s to give up.
        assert time.monotonic() - started < 0.7
    # Still connected, and the next real failure is the first one: no penalty at all, not 0.2 * 2**4.
    raw.command(b"USER " + unique("hx-down"))
    started = time.monotonic()
    hostile()
    assert raw.command(b"PASS " + secret(b"wrong-down-Hx")) == AUTH_FAILED
    assert time.monotonic() - started <= 0.15
    raw.command(b"USER " + unique("hx-down"))
    started = time.monotonic()
    assert raw.command(b"PASS pw-down-Hx") == LOGGED_IN  # after one failure: 0.2 s first, right or wrong
    assert time.monotonic() - started >= 0.18


# == 5. No open proxy, no credential injection =========================================================


def test_user_names_never_pick_the_upstream_host(main: Proxy) -> None:
    """Host and port in user names (the perdition ``-c`` anti-pattern), source routes with ``%``,
    ``!`` and ``/``, and SASL authzid tricks: only configured upstreams are contacted (``rec`` is the
    default route), and a socket of the test's own that the names point to sees no connection."""
    canary = TrapServer()
    try:
        c = canary.port
        names = [
            f"victim@127.0.0.1:{c}", "a@evil.example:22", f"a@127.0.0.1:{c}", "victim@127.0.0.1:25",
            f"x%127.0.0.1:{c}", f"x!127.0.0.1:{c}", f"127.0.0.1:{c}!x", f"x/127.0.0.1:{c}",
            f"../../127.0.0.1:{c}", f"a@[127.0.0.1]:{c}", f"a@localhost:{c}", f"a@127.0.0.1%{c}",
            f"@127.0.0.1:{c}", f"a@127.0.0.1:{c}@evil.example", f"a@127.0.0.1 {c}", f"a@127.0.0.1:{c}/x%y!z",
        ]
        hostile(len(names))
        for name in names:
            raw = main.greet()
            assert raw.command(b"USER " + name.encode()) == b"+OK\r\n"
            assert raw.command(b"PASS " + secret(b"pw-open-Hx")) == LOGGED_IN
            assert raw.command(b"QUIT").startswith(b"+OK")
            assert main.rec.session_of(name.encode())[:3] == [b"CAPA", b"USER " + name.encode(), b"PASS pw-open-Hx"]
        # SASL: an authorization identity naming a host is refused; as the authentication identity
        # it is only a user name for the default upstream.
        raw = main.greet()
        hostile(2)
        trick = plain_blob(f"victim@127.0.0.1:{c}".encode(), b"hx-authz", b"pw-open-Hx")
        assert raw.command(b"AUTH PLAIN " + trick) == b"-ERR [AUTH] Authorization identity not allowed.\r\n"
        authz = f"authz@127.0.0.1:{c}".encode()
        assert raw.command(b"AUTH PLAIN " + plain_blob(b"", authz, b"pw-open-Hx")) == LOGGED_IN
        assert main.rec.session_of(authz)[:3] == [b"CAPA", b"USER " + authz, b"PASS pw-open-Hx"]
        assert b"USER hx-authz" not in main.rec.lines()
        time.sleep(0.2)
        assert canary.connections == 0 and canary.received == b""
    finally:
        canary.close()


def test_cr_lf_nul_in_credentials_are_refused_and_nothing_is_injected(main: Proxy) -> None:
    """USER, PASS and decoded AUTH PLAIN with CR, LF or NUL: refused before any upstream connection
    (nginx PR #1620 class). Each attempt on a connection of its own, all at once."""

    def b64(raw: bytes) -> bytes:
        return base64.b64encode(raw)

    cases: list[tuple[bytes, list[bytes]]] = [
        (b"USER hx-i1\rDELE 1\r\nPASS pw-inj-Hx\r\n", [BAD_USER, NO_USER]),
        (b"USER hx-i2\0DELE 1\r\nPASS pw-inj-Hx\r\n", [BAD_USER, NO_USER]),
        (b"USER hx-i3\r\nPASS pw-inj-Hx\rDELE 1\r\n", [b"+OK\r\n", FORBIDDEN]),
        (b"USER hx-i4\r\nPASS pw-inj-Hx\0QUIT\r\n", [b"+OK\r\n", FORBIDDEN]),
        (b"USER hx-i5\r\nPASS \r\r\n", [b"+OK\r\n", FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"\0hx-i6\0pw-inj-Hx\r\nDELE 1") + b"\r\n", [FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"\0hx-i7\r\nDELE 1\0pw-inj-Hx") + b"\r\n", [FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"\0hx-i8\0pw-inj-Hx\nDELE 1") + b"\r\n", [FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"\0hx-i9\0pw-inj-Hx\rQUIT") + b"\r\n", [FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"\0hx-i10\x00x\0pw-inj-Hx") + b"\r\n",
         [b"-ERR [AUTH] Invalid SASL PLAIN response: PLAIN needs authzid NUL authcid NUL password.\r\n"]),
        (b"AUTH PLAIN\r\n" + b64(b"\0hx-i11\0pw-inj-Hx\r\nRETR 1") + b"\r\n", [b"+ \r\n", FORBIDDEN]),
        (b"AUTH PLAIN\r\n" + b64(b"\0hx-i12\n\0pw-inj-Hx") + b"\r\n", [b"+ \r\n", FORBIDDEN]),
        (b"AUTH PLAIN " + b64(b"hx-i13\rDELE 1\0hx-i13\0pw-inj-Hx") + b"\r\n",
         [b"-ERR [AUTH] Authorization identity not allowed.\r\n"]),
    ]
    secret(b"pw-inj-Hx")
    for data, _ in cases:
        if b"AUTH PLAIN" in data:
            secret(data.split(b"\r\n")[-2].split(b" ")[-1])
    before = main.rec.connections
    hostile(len(cases))
    sessions = []
    for data, _ in cases:
        raw = main.greet()
        raw.send(data)
        sessions.append(raw)
    for raw, (data, expected) in zip(sessions, cases, strict=True):
        assert [raw.answer() for _ in expected] == expected, data
        assert raw.command(b"NOOP") == b"+OK\r\n"  # refused, not disconnected
    # A bare LF ends a line: "USER x\nDELE 1" is two commands, and DELE before login is refused.
    raw = main.greet()
    hostile()
    raw.send(b"USER hx-i14\nDELE 1\r\nPASS pw-inj-Hx\r\n")
    assert [raw.answer() for _ in range(3)] == [b"+OK\r\n", UNKNOWN_BEFORE_LOGIN, LOGGED_IN]
    assert raw.command(b"QUIT").startswith(b"+OK")
    assert main.rec.connections == before + 1
    assert main.rec.session_of(b"hx-i14") == [b"CAPA", b"USER hx-i14", b"PASS pw-inj-Hx", b"QUIT"]
    for line in main.rec.lines():
        assert b"\0" not in line and b"\r" not in line


# == 6. Commands outside their state ====================================================================


def test_commands_outside_their_state_and_admin_verbs_get_err_and_no_crash(main: Proxy, dovecot: DovecotServer) -> None:
    plain = main.greet()
    before_login = [
        (b"STLS", b"-ERR STLS not available.\r\n"),  # a tls = "none" listener
        (b"RETR 1", UNKNOWN_BEFORE_LOGIN),
        (b"DELE 1", UNKNOWN_BEFORE_LOGIN),
        (b"APOP dave c4c9334bac560ecc979e58001b3e22fb", UNKNOWN_BEFORE_LOGIN),
        (b"PASS " + secret(b"pw-nouser-Hx"), b"-ERR Send USER first.\r\n"),
        (b"AUTH CRAM-MD5", b"-ERR Unsupported authentication mechanism.\r\n"),
        (b"KILL", UNKNOWN_BEFORE_LOGIN),
        (b"SHUTDOWN", UNKNOWN_BEFORE_LOGIN),
        (b"XPROXY", UNKNOWN_BEFORE_LOGIN),
    ]
    more = [b"CRASH", b"DEBUG", b"XCLIENT ADDR=1.2.3.4", b"PROXY TCP4 1.2.3.4 127.0.0.1 1 110", b"XTND XMIT"]
    hostile(len(before_login) + len(more))
    for line, expected in before_login:
        assert plain.command(line) == expected, line
    assert plain.command(b"NOOP") == b"+OK\r\n"
    other = main.greet()
    for line in more:
        assert other.command(line) == UNKNOWN_BEFORE_LOGIN, line
    assert other.command(b"NOOP") == b"+OK\r\n"

    # STLS twice, then STLS and other login commands after login.
    stls = main.greet("stls")
    assert stls.command(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
    stls.start_tls(main.cafile)
    hostile(1)
    assert stls.command(b"STLS") == b"-ERR STLS not available.\r\n"
    name = unique("hx-state")
    assert stls.command(b"USER " + name) == b"+OK\r\n"
    assert stls.command(b"PASS " + secret(b"pw-state-Hx")) == LOGGED_IN
    after_login = [b"STLS", b"USER dave", b"PASS x", b"AUTH PLAIN", b"APOP dave 0123", b"KILL", b"SHUTDOWN"]
    hostile(len(after_login))
    for line in after_login:
        assert stls.command(line) in (NOT_AFTER_LOGIN, UNKNOWN_AFTER_LOGIN), line
    assert stls.command(b"NOOP") == b"+OK\r\n"
    assert stls.command(b"QUIT") == b"+OK bye\r\n"
    assert main.rec.session_of(name) == [b"CAPA", b"USER " + name, b"PASS pw-state-Hx", b"NOOP", b"QUIT"]

    implicit = main.tls()
    hostile(1)
    assert implicit.command(b"STLS") == b"-ERR STLS not available.\r\n"
    # The proxy kept serving all along: a fresh login to the real server works.
    fresh = main.login(b"dave", dovecot.users["dave"].password.encode())
    dave = dovecot.users["dave"]
    assert fresh.command(b"STAT") == b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)
    assert plain.command(b"NOOP") == b"+OK\r\n" and other.command(b"NOOP") == b"+OK\r\n"


# == 7. Framing: bare CR and LF, NUL, non-ASCII, one-byte packets =======================================


def test_bare_lf_is_a_line_end_and_bare_cr_is_not(main: Proxy, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    raw = main.greet()
    hostile(5)
    raw.send(b"CAPA\n")
    assert raw.answer(multiline=True).startswith(b"+OK Capability list follows\r\n")
    raw.send(b"NOOP\r")  # a bare CR ends nothing: no answer yet
    assert quiet_for(raw.sock, 0.3) == b""
    raw.send(b"\n")
    assert raw.answer() == b"+OK\r\n"
    raw.send(b"NOOP\rQUIT\r\n")  # one line whose keyword is "NOOP\rQUIT": unknown, and no QUIT
    assert raw.answer() == UNKNOWN_BEFORE_LOGIN
    raw.send(b"USER dave\nPASS " + dave.password.encode() + b"\nSTAT\n")
    assert [raw.answer() for _ in range(3)] == [
        b"+OK\r\n", LOGGED_IN, b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)]
    raw.send(b"LIST 1\n")
    assert raw.answer() == b"+OK 1 %d\r\n" % dave.sizes[0]
    # After login: a bare CR inside a line never reaches the upstream as a line end.
    user = unique("hx-cr")
    rec = main.login(user, b"pw-cr-Hx")
    hostile(2)
    assert rec.command(b"DELE 1\rQUIT") == b"-ERR Command contains forbidden characters.\r\n"
    assert rec.command(b"NOOP\r\r") == b"-ERR Command contains forbidden characters.\r\n"
    assert rec.command(b"NOOP") == b"+OK\r\n"
    assert main.rec.session_of(user)[3:] == [b"NOOP"]


def test_nul_bytes_and_non_ascii_in_commands_are_answered_sanely(main: Proxy) -> None:
    raw = main.greet()
    before_login = [b"NO\0OP", b"\0\0\0", b"NOOP\0", b"NO\xc3\x96P", b"\xff\xfe\xfd", b"\xe2\x80\xa8NOOP",
                    b"CAPA\x00\xff"]
    hostile(len(before_login))
    for line in before_login:
        assert raw.command(line) == UNKNOWN_BEFORE_LOGIN, line
    assert raw.command(b"NOOP") == b"+OK\r\n"
    user = unique("hx-nul")
    raw = main.login(user, b"pw-nul-Hx")
    after_login = [(b"STAT\0", b"-ERR Command contains forbidden characters.\r\n"),
                   (b"RETR 1\0DELE 1", b"-ERR Command contains forbidden characters.\r\n"),
                   (b"N\xc3\x96OP", UNKNOWN_AFTER_LOGIN),
                   (b"\xff\xff", UNKNOWN_AFTER_LOGIN),
                   (b"RETR \xff\xfe", b"-ERR Invalid message number.\r\n")]  # not canonical: local
    hostile(len(after_login))
    for line, expected in after_login:
        assert raw.command(line) == expected, line
    assert raw.command(b"NOOP") == b"+OK\r\n"
    assert main.rec.session_of(user)[3:] == [b"NOOP"]


def test_non_ascii_and_invalid_utf8_user_names(main: Proxy) -> None:
    before = main.rec.connections
    raw = main.greet()
    hostile(3)
    # Not UTF-8 (RFC 3629 forbids overlong forms too): refused at USER, so PASS has no user; no upstream.
    assert raw.command(b"USER \xff\xfe\xfd") == BAD_USER
    assert raw.command(b"PASS " + secret(b"pw-utf-Hx")) == NO_USER
    assert raw.command(b"USER \xc0\xaf..\xc0\xafetc") == BAD_USER  # overlong UTF-8 "/"
    assert raw.command(b"PASS pw-utf-Hx") == NO_USER
    assert main.rec.connections == before
    name = "dävé-ユーザー-" + unique("hx").decode()
    assert raw.command(b"USER " + name.encode()) == b"+OK\r\n"
    assert raw.command(b"PASS pw-utf-Hx") == LOGGED_IN  # valid UTF-8: an ordinary name
    assert main.rec.session_of(name.encode())[1] == b"USER " + name.encode()
    assert raw.command(b"QUIT").startswith(b"+OK")


def _bytewise(raw: RawPOP3, data: bytes) -> None:
    for i in range(len(data)):
        raw.sock.sendall(data[i : i + 1])


def test_commands_split_into_one_byte_packets(main: Proxy, dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    script = (b"CAPA\r\nUSER dave\r\nPASS " + dave.password.encode() + b"\r\nSTAT\r\nLIST 2\r\nUIDL 3\r\nNOOP\r\n")
    expected_tail = [
        b"+OK\r\n", LOGGED_IN, b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size),
        b"+OK 2 %d\r\n" % dave.sizes[1], b"+OK 3 %s\r\n" % dave.uidls[2].encode(), b"+OK\r\n"]
    for listener in ("plain", "implicit"):
        if listener == "plain":
            raw = main.greet(nodelay=True)
        else:
            raw = main.tls()
            raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one TLS record per byte
        hostile()
        _bytewise(raw, script)
        assert raw.answer(multiline=True).startswith(b"+OK Capability list follows\r\n")
        assert [raw.answer() for _ in expected_tail] == expected_tail
        _bytewise(raw, b"RETR 1\r\n")
        assert raw.answer(multiline=True).endswith(b"\r\n.\r\n")
        _bytewise(raw, b"QUIT\r\n")
        assert raw.answer().startswith(b"+OK")


# == 8. TLS ==============================================================================================


def test_stls_injection_gets_no_answer_inside_tls(main: Proxy) -> None:
    """``STLS\\r\\nCAPA\\r\\n`` in one segment (CVE-2011-0411 class): nothing follows ``+OK`` in plain
    text, nothing answers the injected command inside TLS, and injected credentials are forgotten."""
    for injected in (b"CAPA\r\n", b"USER dave\r\nPASS " + secret(b"dave-pw") + b"\r\n"):
        raw = main.greet("stls")
        hostile()
        raw.send(b"STLS\r\n" + injected)
        assert raw.answer() == b"+OK Begin TLS negotiation.\r\n"
        assert raw._buffer == b"" and quiet_for(raw.sock, 0.3) == b""  # waiting for our ClientHello
        raw.start_tls(main.cafile)
        assert quiet_for(raw.sock, 0.3) == b""
        assert raw.command(b"NOOP") == b"+OK\r\n"
        # The USER in the injected plaintext was dropped with the rest.
        assert raw.command(b"PASS dave-pw") == b"-ERR Send USER first.\r\n"
    warnings = [e for e in main.events() if "pipelined after STLS" in str(e.get("message", ""))]
    assert len(warnings) >= 2


def _closes_cleanly(port: int, payload: bytes, half_close: bool = False) -> bytes:
    sock = connect(port)
    try:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        closed, data, elapsed = wait_closed(sock, 3)
        assert closed and elapsed < 2, (payload[:40], data)
        # Nothing in plain text: at most TLS records (an alert, 21, or the handshake, 22).
        assert data == b"" or data[0] in (0x15, 0x16), data[:40]
        assert b"+OK" not in data and b"-ERR" not in data
        return data
    finally:
        sock.close()


def test_tls_garbage_on_the_implicit_port_closes_cleanly_and_the_proxy_keeps_serving(main: Proxy, dovecot: DovecotServer) -> None:
    hello = client_hello()
    rng = random.Random(20240607)
    payloads = [
        (bytes(rng.getrandbits(8) for _ in range(4096)), False),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
        (b"CAPA\r\nUSER dave\r\n", False),
        (hello[: len(hello) // 2], True),
        (b"\x16\x03\x01\xff\xff" + b"\x01" * 100, True),  # a record header announcing 64 kB
        (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37, False),  # SSLv2-style hello
        (hello + os.urandom(512), False),  # a good hello, then garbage
        (b"\x15\x03\x03\x00\x02\x02\x28", False),  # an unsolicited fatal alert
        (b"\x00" * 2048, False),
    ]
    hostile(len(payloads))
    for payload, half_close in payloads:
        _closes_cleanly(main.ports["implicit"], payload, half_close)
    # The same after STLS on the STLS listener.
    for payload in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(1024)):
        raw = main.greet("stls")
        hostile()
        assert raw.command(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
        raw.send(payload)
        closed, data = closed_after(raw)
        assert closed and (data == b"" or data[0] == 0x15)
    # A TLS 1.2 control session works afterwards.
    control = main.tls("1.2")
    assert isinstance(control.sock, ssl.SSLSocket)
    assert control.sock.version() == "TLSv1.2" and control.sock.compression() is None
    dave = dovecot.users["dave"]
    assert control.command(b"USER dave") == b"+OK\r\n"
    assert control.command(b"PASS " + dave.password.encode()) == LOGGED_IN
    assert control.command(b"STAT") == b"+OK %d %d\r\n" % (len(dave.messages), dave.total_size)


@pytest.mark.parametrize("listener", ["implicit", "stls"])
def test_tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_work(main: Proxy, pki: tuple[Path, Path], listener: str) -> None:
    certificate, cafile = pki
    lenient = legacy_server_context(certificate)
    for version, name in (("1.0", "TLSv1"), ("1.1", "TLSv1.1"), ("1.2", "TLSv1.2"), ("1.3", "TLSv1.3")):
        context = client_context(cafile, version)
        # The client really offers this version: a lenient server in memory agrees to it.
        assert offered_version(context, lenient) == name
        sock = connect(main.ports[listener])
        try:
            if listener == "stls":
                raw = RawPOP3(0, sock=sock)
                assert raw.answer() == GREETING
                assert raw.command(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
            if version in ("1.0", "1.1"):
                hostile()
                with pytest.raises(ssl.SSLError, match=r"(?i)protocol.version|unsupported.protocol"):
                    context.wrap_socket(sock, server_hostname="localhost")
                continue
            wrapped = context.wrap_socket(sock, server_hostname="localhost")
            assert wrapped.version() == name
            tls = RawPOP3(0, sock=wrapped)
            if listener == "implicit":
                assert tls.answer() == GREETING
            assert tls.command(b"NOOP") == b"+OK\r\n"
            tls.close()
        finally:
            sock.close()


def _openssl_session(port: int, server_name: bytes | None) -> tuple[Any, socket.socket]:
    """A TLS 1.2 session made with pyOpenSSL, which sends any SNI bytes and can renegotiate."""
    import struct

    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    sock = connect(port)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket; SO_RCVTIMEO keeps a hang bounded
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    connection = SSL.Connection(context, sock)
    if server_name is not None:
        connection.set_tlsext_host_name(server_name)
    connection.set_connect_state()
    connection.do_handshake()
    return connection, sock


def test_hostile_server_names_and_client_renegotiation(main: Proxy) -> None:
    """SNI values no real client sends (over-long labels, invalid UTF-8, wildcards, an IP address,
    empty labels) get the default certificate, and a client-initiated renegotiation is refused
    (a CPU-exhaustion vector); the proxy keeps serving."""
    from OpenSSL import SSL

    names = [b"a" * 255, b"\xff\xfe\xfd", b"*.", b"*.localhost", b"LOCALHOST", b"127.0.0.1",
             b"x" * 63 + b"." + b"y" * 63, b"..", b"localhost.", b"%s", b"{user}"]
    hostile(len(names))
    for name in names:
        connection, sock = _openssl_session(main.ports["implicit"], name)
        assert connection.recv(100) == GREETING, name
        sock.close()
    connection, sock = _openssl_session(main.ports["implicit"], None)
    assert connection.recv(100) == GREETING
    hostile()
    connection.renegotiate()
    with pytest.raises(SSL.Error, match="renegotiation"):
        connection.do_handshake()
    sock.close()
    control = main.tls("1.3")
    assert control.command(b"NOOP") == b"+OK\r\n"


# == 9. Timeouts ===========================================================================================


def test_login_timeout_closes_silent_slow_and_half_logged_in_clients(timeouts: Proxy) -> None:
    """login_timeout = 1.6 s counts from the connection, whatever the client sends meanwhile."""
    timeouts.wait_idle()
    before = timeouts.rec.connections
    started = time.monotonic()
    socks = {name: connect(timeouts.ports["plain"]) for name in ("silent", "slowloris", "user only", "bytewise")}
    socks["user only"].sendall(b"USER eve\r\n")
    hostile(4)
    trickle = iter(b"NOOP " + b"x" * 200)

    def tick() -> None:
        try:
            socks["slowloris"].sendall(b"NOOP\r\n")
            socks["bytewise"].sendall(bytes([next(trickle)]))
        except OSError:
            pass

    closed = close_times(socks, 5, tick, every=0.2)
    for name, (when, data) in closed.items():
        assert when is not None, name
        assert 1.5 <= when - started <= 2.6, (name, when - started)
        assert data.startswith(GREETING) and data.endswith(b"-ERR [SYS/TEMP] Autologout: login timeout.\r\n"), (name, data)
    assert closed["slowloris"][1].count(b"+OK\r\n") >= 5  # it was answered all along
    assert timeouts.rec.connections == before
    for sock in socks.values():
        sock.close()


def test_idle_timeout_closes_without_quit_so_nothing_is_deleted(timeouts: Proxy) -> None:
    timeouts.wait_idle()
    eve = timeouts.extra["eve"]
    dovecot = timeouts.extra["dovecot"]
    assert isinstance(eve, MailUser) and isinstance(dovecot, DovecotServer)
    silent = timeouts.login(b"hostile-eve", eve.password.encode())
    assert silent.command(b"DELE 1") == b"+OK Marked to be deleted.\r\n"
    silent_at = time.monotonic()
    user, busy_user = unique("hx-idle"), unique("hx-busy")
    recorded = timeouts.login(user, b"pw-idle-Hx")
    assert recorded.command(b"DELE 1") == b"+OK\r\n"
    recorded_at = time.monotonic()
    busy = timeouts.login(busy_user, b"pw-idle-Hx")
    hostile(2)

    def tick() -> None:
        busy.sock.sendall(b"NOOP\r\n")

    closed = close_times({"silent": silent.sock, "recorded": recorded.sock, "busy": busy.sock}, 2.6, tick, every=0.3)
    for name, since in (("silent", silent_at), ("recorded", recorded_at)):
        when, data = closed[name]
        assert when is not None and 0.9 <= when - since <= 2.0, (name, when and when - since)
        assert data == b"-ERR [SYS/TEMP] Autologout: idle timeout.\r\n"
    assert closed["busy"][0] is None  # a command every 0.3 s keeps it alive past 1.0 s
    answers = closed["busy"][1] + quiet_for(busy.sock, 0.3)
    assert answers == b"+OK\r\n" * answers.count(b"+OK\r\n") and answers.count(b"+OK\r\n") >= 7
    assert busy.command(b"QUIT") == b"+OK bye\r\n"
    # Expiry sent no QUIT upstream: the recording upstream saw none, and eve's message is still there.
    assert b"QUIT" not in timeouts.rec.session_of(user)
    assert timeouts.rec.session_of(busy_user)[-1] == b"QUIT"
    check = RawPOP3(dovecot.plain_port)
    check.answer()
    check.command(b"USER hostile-eve")
    assert check.command(b"PASS " + eve.password.encode()).startswith(b"+OK")
    assert check.command(b"STAT") == b"+OK %d %d\r\n" % (len(eve.messages), eve.total_size)
    check.command(b"QUIT")


def test_tls_handshake_timeout_on_implicit_and_after_stls(timeouts: Proxy) -> None:
    timeouts.wait_idle()
    hello = client_hello()
    socks, started = {}, {}
    for name in ("implicit silent", "implicit partial hello"):
        started[name] = time.monotonic()
        socks[name] = connect(timeouts.ports["implicit"])
    socks["implicit partial hello"].sendall(hello[:50])
    for name in ("stls silent", "stls partial hello"):
        raw = RawPOP3(0, sock=connect(timeouts.ports["stls"]))
        assert raw.answer() == GREETING
        assert raw.command(b"STLS") == b"+OK Begin TLS negotiation.\r\n"
        started[name] = time.monotonic()
        socks[name] = raw.sock
    socks["stls partial hello"].sendall(hello[:50])
    hostile(4)
    closed = close_times(socks, 4)
    sources = {sock.getsockname()[0]: name for name, sock in socks.items()}
    for name, (when, data) in closed.items():
        assert when is not None, name
        # tls_handshake_timeout = 0.8 s, well before login_timeout = 1.6 s
        assert 0.7 <= when - started[name] <= 1.55, (name, when - started[name])
        assert b"+OK" not in data and b"-ERR" not in data
    assert wait_for(lambda: all(timeouts.ended(source) for source in sources))
    for source, name in sources.items():
        assert [e["ended"] for e in timeouts.ended(source)] == ["TLS handshake timeout"], name
    for sock in socks.values():
        sock.close()


def test_silent_upstream_times_out_without_quit(timeouts: Proxy) -> None:
    timeouts.wait_idle()
    user = unique("hx-stall")
    raw = timeouts.login(user, b"pw-stall-Hx")
    timeouts.rec.hold.set()
    try:
        hostile()
        raw.send(b"DELE 1\r\nSTAT\r\n")
        started = time.monotonic()
        closed, data = closed_after(raw, 4)
        assert closed and 1.1 <= time.monotonic() - started <= 2.5
        assert b"+OK" not in data
    finally:
        timeouts.rec.release()
    lines = timeouts.rec.session_of(user)
    assert b"QUIT" not in lines and lines[3:4] == [b"DELE 1"]


def test_a_client_that_stops_reading_is_not_held_forever(timeouts: Proxy, dovecot: DovecotServer) -> None:
    """Slow-read abuse: log in, ask for ~36 MB (five RETRs of alice's 7 MB message) with a tiny
    receive window, and never read. Once nothing has moved for a few idle timeouts (1.0 s) the
    session ends and its upstream connection (a Dovecot process) goes with it; nginx's send_timeout
    plays this part. (Found by this suite: the idle timer re-armed for as long as an answer was
    pending and upstream_timeout leaves out time the proxy is not reading, so both legs were held
    forever.)"""
    timeouts.wait_idle()
    alice = dovecot.users["alice"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((fresh_address(), 0))
    sock.connect(("127.0.0.1", timeouts.ports["plain"]))
    raw = RawPOP3(0, sock=sock)
    assert raw.answer() == GREETING
    assert raw.command(b"USER alice") == b"+OK\r\n"
    assert raw.command(b"PASS " + alice.password.encode()) == LOGGED_IN
    assert wait_for(lambda: len(dovecot.pop3_pids("alice")) == 1)
    hostile()
    raw.send(b"RETR %d\r\n" % alice.largest * 5)
    started = time.monotonic()
    source = sock.getsockname()[0]
    # A few idle timeouts without progress, plus the 5 s popproxy gives any close to complete.
    assert wait_for(lambda: timeouts.ended(source) != [], 3 * 1.0 + 5 + 2), "still open, without progress"
    assert time.monotonic() - started >= 1.0  # not before idle_timeout
    assert wait_for(lambda: dovecot.pop3_pids("alice") == [], 5)


def test_many_sockets_at_once_meet_the_caps_and_the_login_timeout(timeouts: Proxy) -> None:
    """A slowloris flood: 520 connections from 26 addresses, each sending one byte. max_sessions
    (500) and max_sessions_per_ip (20, the default) hold, the rest get [SYS/TEMP] at once, and the
    login timeout clears the admitted ones. The file-descriptor limit is raised for this."""
    _raise_fd_limit()
    timeouts.wait_idle()
    baseline = reset_peak(timeouts.pid)
    addresses = [fresh_address() for _ in range(26)]
    socks: dict[str, socket.socket] = {}
    started = time.monotonic()
    try:
        # One address over its cap while there is still room in all.
        for i in range(21):
            socks[f"{addresses[0]}#{i}"] = connect(timeouts.ports["plain"], addresses[0])
        for address in addresses[1:]:
            for i in range(20):
                socks[f"{address}#{i}"] = connect(timeouts.ports["plain"], address)
        hostile(len(socks))
        for sock in socks.values():
            try:
                sock.sendall(b"N")
            except OSError:
                pass
        connected = time.monotonic() - started
        closed = close_times(socks, 6)
        greeted = [n for n, (_, data) in closed.items() if data.startswith(GREETING)]
        refused = [n for n, (_, data) in closed.items() if data == TOO_MANY_SESSIONS]
        assert len(greeted) == FLOOD_SESSIONS and len(refused) == len(socks) - FLOOD_SESSIONS
        assert f"{addresses[0]}#20" in refused  # per address, before the global cap was reached
        close_at = [closed[n][0] for n in greeted]
        assert all(when is not None and when - started <= connected + 1.6 + 1.5 for when in close_at)
        assert all(closed[n][1].endswith(b"Autologout: login timeout.\r\n") for n in greeted)
        growth = peak_kib(timeouts.pid) - baseline
        assert growth < 32 * 1024, f"{growth} KiB for {FLOOD_SESSIONS} sessions"
    finally:
        for sock in socks.values():
            sock.close()
    timeouts.wait_idle()
    raw = timeouts.greet()
    assert raw.command(b"NOOP") == b"+OK\r\n"
    log = timeouts.process.log()
    assert "too many sessions from your address" in log and '"refusal": "too many sessions"' in log


# == 10. Session caps, per address and per user ===============================================================


def test_session_caps_per_address_and_in_all_with_an_allowlisted_address(caps: Proxy) -> None:
    caps.wait_idle()
    first, second = fresh_address(), fresh_address()
    held = [caps.greet(source=first), caps.greet(source=first)]
    hostile()
    over = RawPOP3(0, sock=connect(caps.ports["plain"], first))
    assert closed_after(over) == (True, TOO_MANY_SESSIONS)
    # The allowlisted address is not limited per address.
    held += [caps.greet(source=ALLOWED) for _ in range(3)]
    held.append(caps.greet(source=second))  # 6 sessions: max_sessions
    hostile()
    global_over = RawPOP3(0, sock=connect(caps.ports["plain"], fresh_address()))
    assert closed_after(global_over) == (True, TOO_MANY_SESSIONS)
    hostile()
    also_allowed = RawPOP3(0, sock=connect(caps.ports["plain"], ALLOWED))
    assert closed_after(also_allowed) == (True, TOO_MANY_SESSIONS)  # the global cap binds everyone
    for raw in held:
        assert raw.command(b"NOOP") == b"+OK\r\n"
    # A place comes free when a session ends.
    ended = len(caps.ended(ALLOWED))
    assert held.pop(2).command(b"QUIT") == b"+OK Bye.\r\n"
    assert wait_for(lambda: len(caps.ended(ALLOWED)) > ended)
    held.append(caps.greet(source=fresh_address()))
    for raw in held:
        raw.command(b"QUIT")
    refusals = [e.get("refusal") for e in caps.events() if e.get("refusal")]
    assert "too many sessions from your address" in refusals and "too many sessions" in refusals


def test_per_user_cap_gives_in_use_and_sends_no_quit(caps: Proxy) -> None:
    caps.wait_idle()
    first = caps.login(b"solo", b"solo-Hx-pw-2")
    second = caps.greet()
    hostile()
    assert second.command(b"USER solo") == b"+OK\r\n"
    assert second.command(b"PASS solo-Hx-pw-2") == b"-ERR [IN-USE] Too many sessions for this user.\r\n"
    assert closed_after(second) == (True, b"")
    assert first.command(b"STAT") == b"+OK 1 20\r\n"
    solo_sessions = [s for s in caps.rec.sessions if b"USER solo" in s]
    assert solo_sessions[-1] == [b"CAPA", b"USER solo", b"PASS solo-Hx-pw-2"]  # dropped, no QUIT
    assert first.command(b"QUIT") == b"+OK bye\r\n"
    assert wait_for(lambda: caps.ended(first.sock.getsockname()[0]) != [])
    third = caps.login(b"solo", b"solo-Hx-pw-2")  # the place came free
    third.command(b"QUIT")


@pytest.mark.parametrize("variant", [b"dave@DOVE.TEST", b"Dave@dove.test"])
def test_per_user_cap_is_not_bypassed_by_changing_case(caps: Proxy, dovecot: DovecotServer, variant: bytes) -> None:
    """With ``max_sessions_per_user = 1``, a second session for the same mailbox is refused whatever
    the case of the name; the route (``@dove.test``, ``login_as = "{local}"``) is the same. (Found by
    this suite: names were counted exactly as typed, while domains route case-insensitively and
    Dovecot's default ``auth_username_format = %Lu`` maps both to one mailbox.)"""
    caps.wait_idle()
    password = dovecot.users["dave"].password.encode()
    first = caps.login(b"dave@dove.test", password)
    hostile()
    other = caps.greet()
    assert other.command(b"USER " + variant) == b"+OK\r\n"
    answer = other.command(b"PASS " + password)
    first.command(b"QUIT")
    other.close()
    assert answer == b"-ERR [IN-USE] Too many sessions for this user.\r\n"


def test_unknown_user_and_wrong_password_are_answered_alike(caps: Proxy, dovecot: DovecotServer) -> None:
    """An unrouted name, a name the upstream refuses at USER, a wrong password at PASS (with upstream
    texts that differ), and a wrong password at the real Dovecot: the same answer, and the same time
    where the upstream answers at once: from a fresh address at once, from an address with a failure
    behind it after the same penalty."""
    cases = [(b"nobody", b"wrong-a-Hx"), (b"ghost@rec.test", b"wrong-b-Hx"), (b"known", b"wrong-c-Hx")]
    hostile(2 * len(cases) + 1)
    addresses = [fresh_address() for _ in cases]
    timings = [_one_failure(caps, address, user, password) for address, (user, password) in zip(addresses, cases, strict=True)]
    assert all(t <= 0.25 for t in timings), timings
    assert max(timings) - min(timings) < 0.15, timings
    timings = [_one_failure(caps, address, user, password) for address, (user, password) in zip(addresses, cases, strict=True)]
    assert all(0.28 <= t <= 0.6 for t in timings), timings
    assert max(timings) - min(timings) < 0.15, timings
    assert _one_failure(caps, fresh_address(), b"dave", b"wrong-d-Hx") < 1.2
    # The upstream was asked only where a route exists.
    assert not any(b"nobody" in line for line in caps.rec.lines())


def test_address_penalties_live_in_a_bounded_lru_table_and_spare_the_allowlist(caps: Proxy) -> None:
    """ip_table_size = 4: an address's failures are remembered (its next login waits 0.3 s, then
    0.6 s) until enough other addresses push it out; then it starts again with no wait. The
    allowlisted address never escalates across connections."""
    caps.wait_idle()
    suspect = fresh_address()
    hostile(9)
    assert _one_failure(caps, suspect, b"known", b"wrong-lru-Hx") <= 0.25
    assert 0.28 <= _one_failure(caps, suspect, b"known", b"wrong-lru-Hx") <= 0.6
    assert 0.58 <= _one_failure(caps, suspect, b"known", b"wrong-lru-Hx") <= 0.9
    others = [caps.greet(source=fresh_address()) for _ in range(5)]
    for raw in others:
        raw.send(b"USER known\r\nPASS wrong-lru-Hx\r\n")
    for raw in others:
        assert [raw.answer(), raw.answer()] == [b"+OK\r\n", AUTH_FAILED]
        raw.close()
    caps.wait_idle()
    assert _one_failure(caps, suspect, b"known", b"wrong-lru-Hx") <= 0.25  # forgotten
    assert _one_failure(caps, ALLOWED, b"known", b"wrong-lru-Hx") <= 0.25
    assert _one_failure(caps, ALLOWED, b"known", b"wrong-lru-Hx") <= 0.25


# == 11. After everything ==================================================================================


def test_logs_hold_no_password_and_no_crash(main: Proxy, timeouts: Proxy, caps: Proxy) -> None:
    """Runs last: no password or AUTH PLAIN blob used in this module, nor its base64, reached any
    proxy's log, no traceback was logged, and every proxy is still running."""
    forms = set()
    for value in SECRETS:
        forms.add(value)
        forms.add(base64.b64encode(value))
    assert len(forms) > 20
    for process in PROXIES:
        assert process.process.poll() is None
        log = process.log().encode()
        assert log
        for form in forms:
            assert form not in log, form
        assert b"Traceback" not in log and b"Unhandled" not in log
