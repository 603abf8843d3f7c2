"""Regression tests for the findings of issue 8, against a real ``twistd -n popproxy`` on loopback.

One section per finding, each test named after what the proxy must do:

1. Answers the proxy writes itself (CAPA, NOOP, USER before login; RETR from the processed-message
   cache after login) are bounded: the proxy's RSS stays within the per-session budget
   (``support.rss.SessionBudget``) plus a slack while a client floods and never reads.
2. Upstream answers do not pile up while a hook runs: a hanging scanner, a 40 MB RETR behind.
3. No DELE reaches the upstream for a message the client cannot have received: a big RETR, DELE
   and QUIT in one segment, then a reset; a DELE written ``03`` after a hook refused message 3.
4. The failed-login delay is no timing oracle: the right password waits the penalty too.
5. PROXY-protocol connections count against ``max_sessions`` from the header on, and the header
   itself has a timeout (``proxy_header_timeout``).
6. Message numbers: only the canonical form (1-10 digits, no sign, no leading zero) is served and
   ever goes upstream; anything else is a bad command answered -ERR by the proxy.
7. A bare AUTH lists no mechanism where the listener requires TLS and TLS is not active yet.
8. USER with NUL, a bare CR or bytes that are not UTF-8 is refused; passwords stay opaque bytes.
9. One identity per session, normalised before routing (``[routing] user_case``, default lower),
   for routing, hooks, logs and the per-user cap.

The upstreams are ``MiniUpstream``: a small POP3 server in threads on plain sockets (so it costs the
proxy's process nothing and can hold a 40 MB message), which records every line it receives and
keeps each user's mailbox, committing DELE only on QUIT like a real server. Like Dovecot it finds
mailboxes case-insensitively and reads message numbers leniently (``03`` is message 3). Every loop
is bounded in count and time; every socket is closed by the fixtures.
"""

from __future__ import annotations

import hashlib
import re
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from popproxy.config import ConfigError, load_config

from support.configs import shared_ca, write_certificate
from support.hostile import close_times, fresh_address, wait_closed, wait_for
from support.pop3client import RawPOP3
from support.proxyproc import ProxyProcess, free_port
from support.rss import MiB, RssWatch, SessionBudget, flood, pid_of, small_receive_buffer_socket

CRLF = b"\r\n"
GREETING = b"+OK POP3 proxy ready.\r\n"
LOGGED_IN = b"+OK Logged in.\r\n"
TOO_MANY_BAD = b"-ERR Too many bad commands, goodbye.\r\n"

# The limits of the memory tests: small, so that the budget is tight.
MAX_BUFFERED = 65536
UPSTREAM_MAX_LINE = 65536
HOOK_MAX_SIZE = 1 * MiB
#: max_listing's default (no such key before the fix, so it cannot be set without breaking the old
#: code's config load): 8 MiB, the old code's LISTING_LIMIT too
MAX_LISTING = 8 * MiB
TIGHT_LIMITS = f"max_buffered = {MAX_BUFFERED}\nupstream_max_line = {UPSTREAM_MAX_LINE}\nshutdown_grace = 1\n"
#: how long a memory test watches the proxy while the attack runs
ATTACK_SECONDS = 5.0


# == a fake upstream ==================================================================================


def wire(message: bytes) -> bytes:
    """A message (CRLF lines, ending in CRLF) as a multi-line body: dot-stuffed, terminated."""
    if not message.startswith(b".") and b"\r\n." not in message:
        return message + b".\r\n"
    lines = message.split(CRLF)[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines) + b".\r\n"


def text_message(subject: str, size: int = 0, line: bytes = b"x" * 78) -> bytes:
    """A plain message of about ``size`` octets (at least a short body), no line starting with a dot."""
    head = f"From: sender@example.org\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n" \
           f"Message-ID: <{abs(hash((subject, size)))}@findings.test>\r\n\r\n".encode()
    body_line = line + CRLF
    count = max(1, (size - len(head)) // len(body_line))
    return head + body_line * count


@dataclass
class Box:
    password: bytes
    messages: list[bytes | None]

    def remaining(self) -> list[int]:
        """The numbers (from 1, as first listed) of the messages still there."""
        return [n for n, m in enumerate(self.messages, start=1) if m is not None]


@dataclass
class UpConn:
    lines: list[bytes] = field(default_factory=list)
    user: bytes | None = None
    closed: bool = False


class MiniUpstream:
    """A POP3 server on 127.0.0.1 (a thread per connection, blocking sockets; answers in order, one
    command at a time, so a big RETR blocks the commands behind it as on a real server).

    ``delays`` maps a command keyword to seconds to wait before answering it.
    """

    CAPA = b"+OK\r\nUSER\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.boxes: dict[str, Box] = {}
        self.delays: dict[bytes, float] = {}
        self.conns: list[UpConn] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wire: dict[int, tuple[bytes, bytes]] = {}  # id(message) -> (message, its wire form)
        threading.Thread(target=self._accept, daemon=True).start()

    def add_user(self, name: str, password: bytes, messages: list[bytes]) -> Box:
        box = Box(password, list(messages))
        self.boxes[name.lower()] = box
        return box

    def lines(self) -> list[bytes]:
        with self._lock:
            return [line for conn in self.conns for line in conn.lines]

    def lines_of(self, user: bytes) -> list[bytes]:
        """Every line of the connections that sent ``USER user`` (compared case-insensitively)."""
        with self._lock:
            return [line for conn in self.conns if conn.user is not None and conn.user.lower() == user.lower()
                    for line in conn.lines]

    def connections_of(self, user: bytes) -> int:
        with self._lock:
            return sum(1 for conn in self.conns if conn.user is not None and conn.user.lower() == user.lower())

    def all_closed(self, user: bytes | None = None) -> bool:
        with self._lock:
            return all(conn.closed for conn in self.conns
                       if user is None or (conn.user is not None and conn.user.lower() == user.lower()))

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- serving

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = UpConn()
            with self._lock:
                self.conns.append(conn)
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: UpConn) -> None:
        state: dict[str, object] = {"box": None, "visible": [], "deleted": set()}
        buffer = b""
        try:
            sock.sendall(b"+OK MiniUpstream ready\r\n")
            while data := sock.recv(65536):
                buffer += data
                while b"\n" in buffer:
                    raw, _, buffer = buffer.partition(b"\n")
                    line = raw[:-1] if raw.endswith(b"\r") else raw
                    with self._lock:
                        conn.lines.append(line)
                    delay = self.delays.get(line.partition(b" ")[0].upper())
                    if delay:
                        time.sleep(delay)
                    if not self._handle(sock, conn, line, state):
                        return
        except OSError:
            pass  # the proxy dropped the connection: nothing is committed
        finally:
            sock.close()
            with self._lock:
                conn.closed = True

    def _body(self, message: bytes) -> bytes:
        cached = self._wire.get(id(message))
        if cached is None or cached[0] is not message:
            cached = self._wire[id(message)] = (message, wire(message))
        return cached[1]

    def _handle(self, sock: socket.socket, conn: UpConn, line: bytes, state: dict) -> bool:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        args = rest.split()
        send = sock.sendall
        box: Box | None = state["box"]  # type: ignore[assignment]
        visible: list[int] = state["visible"]  # type: ignore[assignment]
        deleted: set[int] = state["deleted"]  # type: ignore[assignment]

        def message(arg: bytes) -> tuple[int, bytes] | None:
            # Lenient, like many servers: any run of ASCII digits, leading zeros allowed.
            if box is None or not arg.isdigit():
                return None
            n = int(arg)
            if not 1 <= n <= len(visible) or n in deleted:
                return None
            found = box.messages[visible[n - 1]]
            return (n, found) if found is not None else None

        if verb == b"CAPA":
            send(self.CAPA)
        elif verb == b"QUIT":
            if box is not None:
                for n in deleted:
                    box.messages[visible[n - 1]] = None
            send(b"+OK bye\r\n")
            return False
        elif verb == b"NOOP":
            send(b"+OK\r\n")
        elif box is None:
            if verb == b"USER":
                state["user"] = rest
                with self._lock:
                    conn.user = rest
                send(b"+OK\r\n")
            elif verb == b"PASS":
                user = state.get("user")
                found = self.boxes.get(user.decode("utf-8", "replace").lower()) if isinstance(user, bytes) else None
                if found is not None and found.password == rest:
                    state["box"] = found
                    state["visible"] = [i for i, m in enumerate(found.messages) if m is not None]
                    send(b"+OK Logged in\r\n")
                else:
                    send(b"-ERR [AUTH] Authentication failed\r\n")
            else:
                send(b"-ERR not logged in\r\n")
        elif verb == b"STAT":
            sizes = [len(box.messages[visible[n - 1]] or b"") for n in range(1, len(visible) + 1) if n not in deleted]
            send(b"+OK %d %d\r\n" % (len(sizes), sum(sizes)))
        elif verb in (b"LIST", b"UIDL"):
            value: Callable[[int, bytes], bytes] = (
                (lambda n, m: b"%d" % len(m)) if verb == b"LIST" else (lambda n, m: b"uid-%d" % visible[n - 1])
            )
            if args:
                found = message(args[0]) if len(args) == 1 else None
                send(b"+OK %d %s\r\n" % (found[0], value(*found)) if found else b"-ERR no such message\r\n")
            else:
                rows = [b"%d %s\r\n" % (n, value(n, f[1])) for n in range(1, len(visible) + 1)
                        if (f := message(str(n).encode()))]
                send(b"+OK\r\n" + b"".join(rows) + b".\r\n")
        elif verb == b"RETR":
            found = message(args[0]) if len(args) == 1 else None
            if found is None:
                send(b"-ERR no such message\r\n")
            else:
                send(b"+OK %d octets\r\n" % len(found[1]))
                send(self._body(found[1]))
        elif verb == b"TOP":
            found = message(args[0]) if len(args) == 2 and args[1].isdigit() else None
            if found is None:
                send(b"-ERR no such message\r\n")
            else:
                head, _, body = found[1].partition(CRLF + CRLF)
                kept = body.split(CRLF)[:-1][: int(args[1])]
                send(b"+OK\r\n" + wire(head + CRLF + CRLF + b"".join(k + CRLF for k in kept)))
        elif verb == b"DELE":
            found = message(args[0]) if len(args) == 1 else None
            if found is None:
                send(b"-ERR no such message\r\n")
            else:
                deleted.add(found[0])
                send(b"+OK deleted\r\n")
        elif verb == b"RSET":
            deleted.clear()
            send(b"+OK\r\n")
        else:
            send(b"-ERR unknown command\r\n")
        return True


class SilentScanner:
    """A "spamd" that accepts connections and reads what it is sent, but never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._socks.append(sock)
            threading.Thread(target=self._drain, args=(sock,), daemon=True).start()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


# == running the proxy ================================================================================


@dataclass
class Running:
    process: ProxyProcess
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return pid_of(self.process)

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def events(self) -> list[dict[str, object]]:
        return self.process.events()


def start_proxy(folder: Path, body: str, listeners: dict[str, str] | None = None, json: bool = False) -> Running:
    """``twistd -n popproxy`` with ``listeners`` (name -> TOML lines after the endpoint; the endpoint
    is ``tcp:PORT:interface=127.0.0.1``, prefixed with ``haproxy:`` if the lines start with
    ``#haproxy``) and the rest of the configuration in ``body``."""
    listeners = listeners or {"plain": 'tls = "none"\n'}
    ports = {name: free_port() for name in listeners}
    parts = []
    for name, extra in listeners.items():
        prefix = "haproxy:" if extra.startswith("#haproxy") else ""
        parts.append(f'[[listen]]\nendpoint = "{prefix}tcp:{ports[name]}:interface=127.0.0.1"\n{extra}')
    path = folder / "popproxy.toml"
    path.write_text("\n".join(parts) + "\n" + body)
    try:
        load_config(path)  # a refused configuration fails here, by name (no half-started twistd)
    except ConfigError as error:
        pytest.fail(f"configuration refused: {error}", pytrace=False)
    return Running(ProxyProcess(path, list(ports.values()), folder, json=json), ports)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets a test opened, closed after it, passed or failed."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def greet(port: int, source: str | None = None, rcvbuf: int | None = None) -> RawPOP3:
    """A session on ``port``, greeted (from ``source``, with a small receive buffer if asked)."""
    sock = small_receive_buffer_socket(rcvbuf, source or "127.0.0.1") if rcvbuf else socket.socket()
    try:
        if not rcvbuf and source:
            sock.bind((source, 0))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    raw = RawPOP3(0, sock=sock)  # closed after the test by conftest's close_raw_connections
    assert raw.answer() == GREETING
    return raw


def login(port: int, user: bytes, password: bytes, **kwargs: object) -> RawPOP3:
    raw = greet(port, **kwargs)  # type: ignore[arg-type]
    assert raw.command(b"USER " + user) == b"+OK\r\n"
    answer = raw.command(b"PASS " + password)
    assert answer == LOGGED_IN, f"login of {user!r}: {answer!r}"
    return raw


def rest_until_closed(raw: RawPOP3, timeout: float) -> tuple[bool, bytes]:
    """What ``raw`` holds and still receives until the proxy closes the connection (or ``timeout``
    passes): (closed, those octets)."""
    held, raw._buffer = raw._buffer, b""
    closed, data, _ = wait_closed(raw.sock, timeout)
    return closed, held + data


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class WireReader:
    """Answers read from a socket in big gulps, whatever follows them kept for the next one. Linear
    in the size (a bytearray), for 40 MB answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"answer incomplete: {len(self.buffer)} octets, begins {bytes(self.buffer[:80])!r}")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed with {len(self.buffer)} octets of an answer")
        self.buffer += chunk

    def multiline(self, timeout: float) -> tuple[bytes, bytes]:
        """One answer to a command with a multi-line answer: the status line, and if +OK the body as
        on the wire, terminator included."""
        deadline = time.monotonic() + timeout
        while (end := self.buffer.find(CRLF)) < 0:
            self._fill(deadline)
        status = bytes(self.buffer[: end + 2])
        if not status.startswith(b"+OK"):
            del self.buffer[: end + 2]
            return status, b""
        scan = end  # an empty body's terminator begins with the status line's own CRLF
        while (found := self.buffer.find(b"\r\n.\r\n", scan)) < 0:
            scan = max(end, len(self.buffer) - 4)
            self._fill(deadline)
        body = bytes(self.buffer[end + 2 : found + 5])
        del self.buffer[: found + 5]
        return status, body


def upstream_body(upstream_address: str, routing: str = 'default = "main"\n') -> str:
    return f'[upstream.main]\naddress = "{upstream_address}"\ntls = "none"\n[routing]\n{routing}'


# == 1. answers the proxy writes itself ================================================================


@pytest.fixture(scope="module")
def quiet_upstream() -> Iterator[MiniUpstream]:
    upstream = MiniUpstream()
    upstream.add_user("warm", b"warm-pw", [text_message("warm-up", 2000)])
    yield upstream
    upstream.close()


#: command -> (the line, the most octets of it a flood sends). A +OK is 5 octets, so NOOP and USER
#: need more input than CAPA before the answers outgrow the kernel's socket buffers (a few MB).
FLOODS = {
    "CAPA": (b"CAPA\r\n", 3 * MiB),
    "NOOP": (b"NOOP\r\n", 16 * MiB),
    "USER": (b"USER a\r\n", 16 * MiB),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_local_answers_before_login_are_bounded(kind: str, tmp_path: Path, quiet_upstream: MiniUpstream,
                                                sockets: list[socket.socket]) -> None:
    """Finding 1: a client that floods CAPA (NOOP, USER) before login and never reads. The proxy must
    stop reading it once its own unsent answers pass the budget, so RSS stays within baseline +
    budget + slack. No hooks are configured, so the budget has no listing or hook terms."""
    proxy = start_proxy(tmp_path, upstream_body(quiet_upstream.address) + "[limits]\n" + TIGHT_LIMITS)
    try:
        warm = login(proxy.port, b"warm", b"warm-pw")
        warm.command(b"CAPA", multiline=True)
        warm.command(b"NOOP")
        warm.command(b"QUIT")
        warm.close()
        raw = greet(proxy.port, rcvbuf=4096)
        sockets.append(raw.sock)
        budget = SessionBudget(MAX_BUFFERED, UPSTREAM_MAX_LINE)
        bound = budget.bound_kib()
        with RssWatch(proxy.pid) as watch:
            until = time.monotonic() + ATTACK_SECONDS
            line, most = FLOODS[kind]
            sent = flood(raw.sock, line, most, stall=2.0, until=until)
            while time.monotonic() < until:
                time.sleep(0.05)
        assert watch.growth <= bound, watch.report(f"{kind} flood before login ({sent} octets sent, never read)", bound)
        print(watch.report(f"{kind} flood before login ({sent} octets sent)", bound))
    finally:
        proxy.process.stop(timeout=5)


def test_local_answers_over_implicit_tls_are_bounded(tmp_path: Path, quiet_upstream: MiniUpstream,
                                                     sockets: list[socket.socket]) -> None:
    """Finding 1 over TLS: the answers go through the TLS layer's buffers before the socket's; the
    proxy must still stop once the client stops taking them."""
    certificate = write_certificate(tmp_path)
    listeners = {"tls": f'tls = "implicit"\ncertificate = "{certificate}"\n'}
    proxy = start_proxy(tmp_path, upstream_body(quiet_upstream.address) + "[limits]\n" + TIGHT_LIMITS, listeners)
    try:
        context = ssl.create_default_context(cadata=shared_ca().cert_pem.decode())
        raw_sock = small_receive_buffer_socket(4096)
        raw_sock.settimeout(30)
        raw_sock.connect(("127.0.0.1", proxy.port))
        tls_sock = context.wrap_socket(raw_sock, server_hostname="localhost")
        sockets.append(tls_sock)
        assert tls_sock.recv(100) == GREETING
        bound = SessionBudget(MAX_BUFFERED, UPSTREAM_MAX_LINE).bound_kib()
        with RssWatch(proxy.pid) as watch:
            until = time.monotonic() + ATTACK_SECONDS
            sent = flood(tls_sock, b"CAPA\r\n", 3 * MiB, stall=2.0, until=until)
            while time.monotonic() < until:
                time.sleep(0.05)
        assert watch.growth <= bound, watch.report(f"CAPA flood over TLS ({sent} octets sent, never read)", bound)
        print(watch.report(f"CAPA flood over TLS ({sent} octets sent)", bound))
    finally:
        proxy.process.stop(timeout=5)


CACHE_RETRS = 300


def test_answers_from_the_message_cache_are_bounded(tmp_path: Path, sockets: list[socket.socket]) -> None:
    """Finding 1, after login: with a rewriting hook, ``TOP 1 0`` puts the processed message 1 in the
    session's cache; 300 pipelined ``RETR 1`` that are never read must not make the proxy write 300
    copies of it into memory. RSS stays within baseline + budget (with the hook and listing terms)
    + slack."""
    upstream = MiniUpstream()
    message = text_message("cached", 900_000)
    upstream.add_user("cachey", b"cachey-pw", [message, text_message("second", 3000)])
    max_added = 512
    hooks = (
        f'[[hook]]\nuse = "rewrite"\nmax_size = {HOOK_MAX_SIZE}\nmax_added = {max_added}\n'
        '[[hook.rule]]\nadd_header = ["X-Checked: yes"]\n'
    )
    proxy = start_proxy(tmp_path, upstream_body(upstream.address) + "[limits]\n" + TIGHT_LIMITS + hooks)
    try:
        warm = login(proxy.port, b"cachey", b"cachey-pw")
        assert warm.command(b"TOP 1 0", multiline=True).startswith(b"+OK")
        status, body = warm.command(b"RETR 1", multiline=True).split(CRLF, 1)
        assert status.startswith(b"+OK") and b"X-Checked: yes" in body
        warm.command(b"QUIT")
        warm.close()
        raw = login(proxy.port, b"cachey", b"cachey-pw", rcvbuf=4096)
        sockets.append(raw.sock)
        assert raw.command(b"TOP 1 0", multiline=True).startswith(b"+OK")
        # The budget: a message in a hook and one kept processed, each with the hook's reservation
        # (max_added) and the size-keeping filler header; LIST and UIDL read at login.
        budget = SessionBudget(MAX_BUFFERED, UPSTREAM_MAX_LINE, MAX_LISTING, HOOK_MAX_SIZE, max_added + 64)
        bound = budget.bound_kib()
        with RssWatch(proxy.pid) as watch:
            until = time.monotonic() + ATTACK_SECONDS
            raw.sock.sendall(b"RETR 1\r\n" * CACHE_RETRS)
            while time.monotonic() < until:
                time.sleep(0.05)
        assert watch.growth <= bound, watch.report(
            f"TOP 1 0, then {CACHE_RETRS} pipelined RETR 1 of a {len(message)}-octet message, never read", bound)
        print(watch.report(f"{CACHE_RETRS} x RETR 1 from the cache", bound))
    finally:
        proxy.process.stop(timeout=5)
        upstream.close()


# == 2. upstream answers while a hook runs =============================================================


BIG = 40 * MiB


def test_upstream_answers_wait_while_a_hook_runs(tmp_path: Path, sockets: list[socket.socket]) -> None:
    """Finding 2: message 1 goes to a scanner that never answers (until the hook's timeout), message
    2 (40 MB, over the hook's max_size, so streamed) is pipelined behind it, and the client reads
    nothing. The proxy must stop reading the upstream while the hook holds the answers back: RSS
    stays within baseline + budget + slack. Once the hook times out (on_error = "pass"), both
    messages arrive, message 2 intact."""
    scanner = SilentScanner()
    upstream = MiniUpstream()
    small = text_message("to be scanned", 3000)
    big = text_message("too big to scan", BIG)
    upstream.add_user("scanned", b"scanned-pw", [small, big])
    upstream.add_user("warm", b"warm-pw", [text_message("warm-up", 3000)])
    hook_timeout = 7  # longer than the watch (ATTACK_SECONDS)
    hooks = (
        f'[[hook]]\nuse = "spamassassin"\nusers = ["scanned"]\naddress = "127.0.0.1:{scanner.port}"\n'
        f'timeout = {hook_timeout}\nmax_size = {HOOK_MAX_SIZE}\n'
    )
    proxy = start_proxy(tmp_path, upstream_body(upstream.address) + "[limits]\n" + TIGHT_LIMITS + hooks)
    try:
        warm = login(proxy.port, b"warm", b"warm-pw")
        assert warm.command(b"RETR 1", multiline=True).startswith(b"+OK")
        warm.command(b"QUIT")
        warm.close()
        raw = login(proxy.port, b"scanned", b"scanned-pw", rcvbuf=4096)
        sockets.append(raw.sock)
        budget = SessionBudget(MAX_BUFFERED, UPSTREAM_MAX_LINE, MAX_LISTING, HOOK_MAX_SIZE, 1024 + 64)
        bound = budget.bound_kib()
        with RssWatch(proxy.pid) as watch:
            started = time.monotonic()
            raw.sock.sendall(b"RETR 1\r\nRETR 2\r\n")
            while time.monotonic() < started + ATTACK_SECONDS:
                time.sleep(0.05)
        assert scanner.accepted >= 1, "the hook never asked the scanner"
        assert watch.growth <= bound, watch.report(
            f"RETR 1 (scanner hangs) + RETR 2 ({len(big)} octets) pipelined, client not reading", bound)
        print(watch.report("hanging scanner, 40 MB RETR behind", bound))
        # The hook times out, message 1 goes out unscanned (padded to its listed size), then
        # message 2, intact.
        reader = WireReader(raw.sock)
        status, body = reader.multiline(hook_timeout + 20)
        assert status.startswith(b"+OK") and b"Subject: to be scanned" in body, status
        status, body = reader.multiline(30)
        assert status.startswith(b"+OK"), status
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(wire(big)).hexdigest(), \
            f"message 2 changed on the way: {len(body)} octets, expected {len(wire(big))}"
    finally:
        proxy.process.stop(timeout=5)
        upstream.close()
        scanner.close()


# == 3. no DELE for a message the client never received ================================================


@pytest.fixture(scope="module")
def dele_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, MiniUpstream]]:
    upstream = MiniUpstream()
    down = free_port()  # no scanner listens: every scan fails, and on_error = "refuse"
    hooks = (
        f'[[hook]]\nuse = "spamassassin"\nusers = ["refusal"]\naddress = "127.0.0.1:{down}"\n'
        'on_error = "refuse"\ntimeout = 5\n'
    )
    proxy = start_proxy(tmp_path_factory.mktemp("dele"),
                        upstream_body(upstream.address) + "[limits]\nshutdown_grace = 1\n" + hooks)
    yield proxy, upstream
    proxy.process.stop()
    upstream.close()


LARGE_4 = 6 * MiB


@pytest.mark.parametrize("between", [b"", b"NOOP\r\n"], ids=["retr-dele-quit", "with-noops"])
def test_no_dele_of_a_message_the_client_never_received(between: bytes, request: pytest.FixtureRequest,
                                                        dele_proxy: tuple[Running, MiniUpstream]) -> None:
    """Finding 3: ``RETR 4`` (6 MB) + ``DELE 4`` + ``QUIT`` in one segment (with NOOPs between, or
    not) from a client that does not read, then a reset 0.3 s later. The client cannot have message
    4, so it must still be in the mailbox afterwards."""
    proxy, upstream = dele_proxy
    user = f"victim-{request.node.callspec.id}"
    box = upstream.add_user(user, b"victim-pw", [text_message(f"m{n}", 2000) for n in (1, 2, 3)]
                            + [text_message("large", LARGE_4)])
    raw = login(proxy.port, user.encode(), b"victim-pw", rcvbuf=4096)
    raw.send(b"RETR 4\r\n" + between * 2 + b"DELE 4\r\n" + between + b"QUIT\r\n")
    time.sleep(0.3)
    reset(raw.sock)
    assert wait_for(lambda: upstream.all_closed(user.encode()), 15), "the upstream connection is still open"
    sent = [line for line in upstream.lines_of(user.encode()) if not line.startswith(b"PASS")]
    assert box.remaining() == [1, 2, 3, 4], f"message 4 was deleted; the upstream received {sent}"


def test_hang_up_after_a_refused_message_deletes_nothing(dele_proxy: tuple[Running, MiniUpstream]) -> None:
    """Finding 3 (and 6): a hook refuses message 3 (scanner down, on_error = "refuse"). ``DELE 03``
    gets -ERR and never goes upstream. Then, with message 1's RETR still in flight and its DELE
    waiting for the verdict, ``DELE 03`` + ``QUIT`` and a hang-up: nothing may be deleted (message 3
    was refused, message 1 was never received), and ``DELE 03`` never reaches the upstream."""
    proxy, upstream = dele_proxy
    box = upstream.add_user("refusal", b"refusal-pw", [text_message(f"r{n}", 2000) for n in (1, 2, 3)])
    raw = login(proxy.port, b"refusal", b"refusal-pw")
    assert raw.command(b"RETR 3", multiline=True).startswith(b"-ERR [SYS/TEMP]")
    answer = raw.command(b"DELE 03")
    assert answer.startswith(b"-ERR"), answer
    assert b"DELE 03" not in upstream.lines_of(b"refusal")
    upstream.delays[b"RETR"] = 1.0  # message 1's answer is late: its RETR is in flight at the hang-up
    try:
        raw.send(b"RETR 1\r\nDELE 1\r\nDELE 03\r\nQUIT\r\n")
        raw.close()  # FIN: what was sent is read before the end of the connection
        assert wait_for(lambda: upstream.all_closed(b"refusal"), 15), "the upstream connection is still open"
    finally:
        upstream.delays.pop(b"RETR", None)
    sent = [line for line in upstream.lines_of(b"refusal") if not line.startswith(b"PASS")]
    assert box.remaining() == [1, 2, 3], f"a message was deleted; the upstream received {sent}"
    assert b"DELE 03" not in sent, f"DELE 03 went upstream: {sent}"


# == 4. the failed-login delay is no timing oracle =====================================================

FAILURE_DELAY = 0.5


def _answer_times(raws: dict[str, RawPOP3], started: float, timeout: float) -> dict[str, tuple[float, bytes]]:
    """For each session, the seconds from ``started`` until its first answer line, and the line."""
    result: dict[str, tuple[float, bytes]] = {}
    selector = selectors.DefaultSelector()
    for name, raw in raws.items():
        selector.register(raw.sock, selectors.EVENT_READ, name)
    deadline = started + timeout
    try:
        while len(result) < len(raws) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                name = key.data
                if name not in result:
                    result[name] = (time.monotonic() - started, raws[name].line())
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
    return result


def test_right_password_waits_out_the_penalty_too(tmp_path: Path) -> None:
    """Finding 4: from an address with failed logins (two, on earlier connections), the answer to the
    RIGHT password comes no sooner than the penalty (login_failure_delay * 2**(failures - 1)), as the
    answer to a wrong one does, so the delay tells nothing about the password."""
    upstream = MiniUpstream()
    upstream.add_user("timed", b"right-pw", [text_message("t", 500)])
    proxy = start_proxy(tmp_path, upstream_body(upstream.address)
                        + f"[limits]\nlogin_failure_delay = {FAILURE_DELAY}\nshutdown_grace = 1\n")
    try:
        right_from, wrong_from = fresh_address(), fresh_address()
        failures = 2
        for _ in range(failures):  # earlier connections, each with one wrong password
            raws = {name: greet(proxy.port, source=source) for name, source in (("a", right_from), ("b", wrong_from))}
            for raw in raws.values():
                assert raw.command(b"USER timed") == b"+OK\r\n"
                raw.send(b"PASS wrong-pw\r\n")
            answers = _answer_times(raws, time.monotonic(), 10)
            assert all(line.startswith(b"-ERR [AUTH]") for _, line in answers.values()), answers
            for raw in raws.values():
                raw.close()
        # The delay an address with `failures` failures has earned before this attempt; a wrong
        # password now earns one more doubling on top.
        penalty = FAILURE_DELAY * 2 ** (failures - 1)
        raws = {"right": greet(proxy.port, source=right_from), "wrong": greet(proxy.port, source=wrong_from)}
        for raw in raws.values():
            assert raw.command(b"USER timed") == b"+OK\r\n"
        started = time.monotonic()
        raws["right"].send(b"PASS right-pw\r\n")
        raws["wrong"].send(b"PASS wrong-pw\r\n")
        answers = _answer_times(raws, started, 15)
        (t_right, right), (t_wrong, wrong) = answers["right"], answers["wrong"]
        timings = f"right password {t_right:.3f}s ({right!r}), wrong {t_wrong:.3f}s ({wrong!r}), penalty {penalty}s"
        assert right == LOGGED_IN and wrong.startswith(b"-ERR [AUTH]"), timings
        assert t_right >= 0.8 * penalty, "the right password is answered before the penalty: " + timings
        assert t_wrong >= 0.8 * penalty, timings
        assert t_wrong <= 3 * t_right and t_right <= 3 * t_wrong, "right and wrong are told apart by time: " + timings
        print(timings)
        for raw in raws.values():
            raw.close()
    finally:
        proxy.process.stop(timeout=5)
        upstream.close()


# == 5. PROXY-protocol connections and max_sessions ====================================================


HAPROXY_LISTENER = '#haproxy\ntls = "none"\nproxy_from = ["127.0.0.0/8"]\n'


def proxy_header(n: int) -> bytes:
    return b"PROXY TCP4 127.0.0.%d 127.0.0.1 %d 110\r\n" % (2 + n, 5555 + n)


def _open(port: int, sockets: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sockets.append(sock)
    return sock


@pytest.fixture(scope="module")
def haproxy_proxy(tmp_path_factory: pytest.TempPathFactory, quiet_upstream: MiniUpstream) -> Iterator[Running]:
    proxy = start_proxy(tmp_path_factory.mktemp("haproxy"),
                        upstream_body(quiet_upstream.address)
                        + "[limits]\nmax_sessions = 4\nmax_sessions_per_ip = 100\nshutdown_grace = 1\n",
                        {"haproxy": HAPROXY_LISTENER})
    yield proxy
    proxy.process.stop()


def test_proxy_header_only_connections_count_against_max_sessions(haproxy_proxy: Running,
                                                                  sockets: list[socket.socket]) -> None:
    """Finding 5: max_sessions = 4; 12 connections send a PROXY v1 header and nothing else. Each is a
    session from its header on: 4 are held, the other 8 get -ERR [SYS/TEMP] and are closed, and a
    13th client (header and CAPA) is refused while the 4 are held."""
    time.sleep(0.5)  # the start-up probe's connection (support.proxyproc) is over: 4 places are free
    socks: dict[str, socket.socket] = {}
    for n in range(12):
        sock = _open(haproxy_proxy.port, sockets)
        sock.sendall(proxy_header(n))
        socks[f"header-only-{n}"] = sock
    seen = close_times(socks, 2.0)
    held = [name for name, (closed, _) in seen.items() if closed is None]
    refused = [name for name, (closed, data) in seen.items() if closed is not None and data.startswith(b"-ERR [SYS/TEMP]")]
    summary = {name: (closed is not None, data) for name, (closed, data) in seen.items()}
    assert len(held) == 4 and len(refused) == 8, f"max_sessions = 4, 12 header-only connections: {summary}"
    late = _open(haproxy_proxy.port, sockets)
    late.sendall(proxy_header(40) + b"CAPA\r\n")
    closed, data, _ = wait_closed(late, 3.0)
    assert closed and data.startswith(b"-ERR [SYS/TEMP]"), f"a 13th client with 4 held: {data!r}, closed: {closed}"


def test_connection_without_proxy_header_is_closed_by_default(haproxy_proxy: Running,
                                                              sockets: list[socket.socket]) -> None:
    """Finding 5, without the new key: a connection to a ``haproxy:`` listener that sends nothing is
    closed once ``proxy_header_timeout`` (default 10 s) has passed, not held for ever."""
    time.sleep(0.3)  # the previous test's connections are gone: this one is under the cap
    sock = _open(haproxy_proxy.port, sockets)
    closed, data, seconds = wait_closed(sock, 10 + 4)
    assert closed, f"still open after {seconds:.1f}s without a PROXY header (received {data!r})"


def test_connection_without_proxy_header_is_closed_after_proxy_header_timeout(
        tmp_path: Path, quiet_upstream: MiniUpstream, sockets: list[socket.socket]) -> None:
    """Finding 5: ``[limits] proxy_header_timeout = 1.0``: a connection that sends no PROXY header is
    closed within 5 s (and one that sends half a header too)."""
    proxy = start_proxy(tmp_path, upstream_body(quiet_upstream.address)
                        + "[limits]\nproxy_header_timeout = 1.0\nshutdown_grace = 1\n",
                        {"haproxy": HAPROXY_LISTENER})
    try:
        silent, partial = _open(proxy.port, sockets), _open(proxy.port, sockets)
        partial.sendall(b"PROXY TCP4 127.0.0.9 ")
        seen = close_times({"silent": silent, "partial": partial}, 5.0)
        assert all(closed is not None for closed, _ in seen.values()), f"not closed within 5 s: {seen}"
    finally:
        proxy.process.stop(timeout=5)


# == 6. message numbers, 7. bare AUTH, 8. USER bytes ==================================================


def _mailbox(count: int = 12) -> list[bytes]:
    return [text_message(f"number {n}", 600) for n in range(1, count + 1)]


@pytest.fixture(scope="module")
def numbers_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, MiniUpstream]]:
    """max_bad_commands high; a rewriting hook for ``hooked`` only."""
    upstream = MiniUpstream()
    for user in ("plain", "hooked"):
        upstream.add_user(user, b"numbers-pw", _mailbox())
    hooks = '[[hook]]\nuse = "rewrite"\nusers = ["hooked"]\n[[hook.rule]]\nadd_header = ["X-Hooked: yes"]\n'
    proxy = start_proxy(tmp_path_factory.mktemp("numbers"), upstream_body(upstream.address)
                        + "[limits]\nmax_bad_commands = 1000\nshutdown_grace = 1\n" + hooks)
    yield proxy, upstream
    proxy.process.stop()
    upstream.close()


BAD_NUMBERS = [b"1_0", b"1abc", b"01", b"+1", b"-1", b"0", b"12345678901", b"1 2"]
BAD_COMMANDS = (
    [verb + b" " + arg for verb in (b"RETR", b"DELE", b"LIST", b"UIDL") for arg in BAD_NUMBERS]
    + [b"TOP " + arg + b" 0" for arg in BAD_NUMBERS if b" " not in arg]
    + [b"TOP 1 01", b"TOP 1 -1", b"TOP 1 x", b"TOP 1 +1", b"TOP 1 0 0", b"TOP 1"]
)
CANONICAL = re.compile(rb"(RETR|DELE|LIST|UIDL) [1-9][0-9]{0,9}|TOP [1-9][0-9]{0,9} (0|[1-9][0-9]{0,9})|LIST|UIDL")
NUMBERED = (b"RETR", b"DELE", b"LIST", b"UIDL", b"TOP")


@pytest.mark.parametrize("user", [b"plain", b"hooked"], ids=["no-hook", "message-hook"])
def test_non_canonical_message_numbers_are_refused_locally(user: bytes,
                                                           numbers_proxy: tuple[Running, MiniUpstream]) -> None:
    """Finding 6: after login, with and without a message hook, RETR/DELE/LIST/UIDL/TOP with a
    message number (or TOP line count) that is not canonical (1-10 digits, no sign, no leading zero;
    ``0`` is no message), or with an argument too many or too few, get -ERR from the proxy, and only
    canonical lines ever reach the upstream (``RETR  1`` with two spaces may be served, but goes up
    as ``RETR 1``). ``RETR 1`` still works afterwards."""
    proxy, upstream = numbers_proxy
    raw = login(proxy.port, user, b"numbers-pw")
    answers = {}
    for command in BAD_COMMANDS:
        multiline = command.startswith((b"RETR", b"TOP"))
        answers[command] = raw.command(command, multiline=multiline)
    spaced = raw.command(b"RETR  1", multiline=True)
    status, body = raw.command(b"RETR 1", multiline=True).split(CRLF, 1)
    raw.close()  # no QUIT: nothing the old code let through is committed
    served = {c.decode(): a[:60] for c, a in answers.items() if not a.startswith(b"-ERR")}
    assert not served, f"answered by the upstream, not refused: {served}"
    assert wait_for(lambda: upstream.all_closed(user), 10)
    reached = [line for line in upstream.lines_of(user)
               if line.split(b" ", 1)[0].upper() in NUMBERED and not CANONICAL.fullmatch(line)]
    assert not reached, f"non-canonical lines reached the upstream: {reached}"
    assert spaced.startswith(b"-ERR") or spaced.startswith(b"+OK"), spaced
    assert status.startswith(b"+OK") and b"Subject: number 1" in body
    assert (b"X-Hooked: yes" in body) == (user == b"hooked")


@pytest.fixture(scope="module")
def strict_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, MiniUpstream, Path]]:
    """max_bad_commands = 3; a plain listener and a STLS listener that requires TLS."""
    folder = tmp_path_factory.mktemp("strict")
    upstream = MiniUpstream()
    upstream.add_user("counted", b"counted-pw", _mailbox(3))
    upstream.add_user("latin", "p\u00e4ss".encode("latin-1"), _mailbox(1))
    certificate = write_certificate(folder)
    cafile = folder / "ca.pem"
    cafile.write_bytes(shared_ca().cert_pem)
    proxy = start_proxy(folder, upstream_body(upstream.address) + "[limits]\nmax_bad_commands = 3\nshutdown_grace = 1\n",
                        {"plain": 'tls = "none"\n',
                         "stls": f'tls = "starttls"\ncertificate = "{certificate}"\nrequire_tls = true\n'})
    yield proxy, upstream, cafile
    proxy.process.stop()
    upstream.close()


def test_non_canonical_message_numbers_count_as_bad_commands(strict_proxy: tuple[Running, MiniUpstream, Path]) -> None:
    """Finding 6: each non-canonical message number is a bad command: with max_bad_commands = 3 the
    third closes the session, and none of them reached the upstream."""
    proxy, upstream, _ = strict_proxy
    raw = login(proxy.ports["plain"], b"counted", b"counted-pw")
    answers = [raw.command(b"RETR 1_0", multiline=True), raw.command(b"DELE 01"), raw.command(b"LIST +1")]
    closed, rest = rest_until_closed(raw, 3.0)
    assert all(a.startswith(b"-ERR") for a in answers) and closed and (TOO_MANY_BAD in answers[-1] + rest), \
        f"answers {answers}, then {rest!r}, closed: {closed}"
    assert not [line for line in upstream.lines_of(b"counted") if line in (b"RETR 1_0", b"DELE 01", b"LIST +1")]


def test_bare_auth_lists_no_mechanism_before_stls_where_tls_is_required(
        strict_proxy: tuple[Running, MiniUpstream, Path]) -> None:
    """Finding 7: on a STLS listener with require_tls, a bare AUTH before STLS answers +OK and an
    empty list (as CAPA lists no SASL there); after STLS it lists PLAIN."""
    proxy, _, cafile = strict_proxy
    raw = greet(proxy.ports["stls"])
    capa = raw.command(b"CAPA", multiline=True)
    assert b"SASL PLAIN" not in capa
    before = raw.command(b"AUTH", multiline=True)
    assert before.startswith(b"+OK") and before.split(CRLF, 1)[1] == b".\r\n", \
        f"bare AUTH before STLS lists mechanisms: {before!r}"
    assert raw.command(b"STLS").startswith(b"+OK")
    raw.start_tls(cafile)
    after = raw.command(b"AUTH", multiline=True)
    assert after.startswith(b"+OK") and b"\r\nPLAIN\r\n" in after, after


def test_user_with_nul_cr_or_non_utf8_is_refused(strict_proxy: tuple[Running, MiniUpstream, Path]) -> None:
    """Finding 8: USER with a NUL, a bare CR inside the line, or bytes that are not UTF-8 gets -ERR
    and counts as a bad command (max_bad_commands = 3: the third closes the session). A Latin-1
    password stays opaque bytes: ``p\\xe4ss`` logs in."""
    proxy, upstream, _ = strict_proxy
    raw = greet(proxy.ports["plain"])
    answers = [raw.command(b"USER a\x00b"), raw.command(b"USER a\rb"), raw.command(b"USER \xff\xfe")]
    closed, rest = rest_until_closed(raw, 3.0)
    assert all(a.startswith(b"-ERR") for a in answers), f"USER answers: {answers}"
    assert closed and TOO_MANY_BAD in answers[-1] + rest, f"not closed as too many bad commands: {answers}, {rest!r}"
    password = "p\u00e4ss".encode("latin-1")
    latin = login(proxy.ports["plain"], b"latin", password)
    assert latin.command(b"QUIT") == b"+OK bye\r\n"
    assert b"PASS " + password in upstream.lines_of(b"latin")


# == 9. one identity per session =======================================================================


@dataclass
class Identity:
    proxy: Running
    main: MiniUpstream
    special: MiniUpstream
    user_case: str | None


def _identity_proxy(folder: Path, user_case: str | None) -> Identity:
    main, special = MiniUpstream(), MiniUpstream()
    main.add_user("user177", b"pw-177", [text_message("from the default upstream", 500)])
    main.add_user("other", b"pw-other", [text_message("other", 500)])
    special.add_user("user177", b"pw-177", [text_message("from the special upstream", 500)])
    case = f'user_case = "{user_case}"\n' if user_case else ""
    body = (
        f'[upstream.main]\naddress = "{main.address}"\ntls = "none"\n'
        f'[upstream.special]\naddress = "{special.address}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n{case}[routing.users]\n"user177" = "special"\n'
        "[limits]\nmax_sessions_per_user = 1\nshutdown_grace = 1\n"
        '[[hook]]\nuse = "rewrite"\nusers = ["user177"]\n[[hook.rule]]\nadd_header = ["X-For-177: yes"]\n'
    )
    return Identity(start_proxy(folder, body, json=True), main, special, user_case)


@pytest.fixture(scope="module", params=[None, "lower"], ids=["user_case-default", "user_case-lower"])
def identity(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Identity]:
    setup = _identity_proxy(tmp_path_factory.mktemp("identity"), request.param)
    yield setup
    setup.proxy.process.stop()
    setup.main.close()
    setup.special.close()


def test_user_name_case_does_not_change_the_route(identity: Identity) -> None:
    """Finding 9 (a): ``"user177" = "special"``, default route elsewhere: ``USER USER177`` is
    user177 and goes to "special"."""
    before = identity.special.connections_of(b"user177")
    raw = login(identity.proxy.port, b"USER177", b"pw-177")
    _, body = raw.command(b"RETR 1", multiline=True).split(CRLF, 1)
    raw.command(b"QUIT")
    assert identity.main.connections_of(b"USER177") == 0 and identity.special.connections_of(b"user177") == before + 1, \
        f"USER177 was routed to the default upstream, not to user177's: {body[:200]!r}"
    assert b"from the special upstream" in body


def test_per_user_hook_applies_whatever_the_case(identity: Identity) -> None:
    """Finding 9 (b): a hook with ``users = ["user177"]`` applies to a login as USER177."""
    raw = login(identity.proxy.port, b"USER177", b"pw-177")
    status, body = raw.command(b"RETR 1", multiline=True).split(CRLF, 1)
    raw.command(b"QUIT")
    assert status.startswith(b"+OK") and b"X-For-177: yes" in body, \
        f"the hook for user177 did not apply to USER177: {body[:300]!r}"


def test_one_identity_in_logs_and_the_per_user_cap(identity: Identity) -> None:
    """Finding 9 (c, d): the login and session_ended events of a USER177 session name "user177", and
    with max_sessions_per_user = 1, USER177 and user177 are one user (the second gets [IN-USE])."""
    first = login(identity.proxy.port, b"USER177", b"pw-177")
    port = first.sock.getsockname()[1]
    second = greet(identity.proxy.port)
    assert second.command(b"USER user177") == b"+OK\r\n"
    assert second.command(b"PASS pw-177").startswith(b"-ERR [IN-USE]")
    second.close()
    first.command(b"QUIT")
    first.close()

    def ended() -> list[dict[str, object]]:
        return [e for e in identity.proxy.events() if e.get("client_port") == port and e.get("event") == "session_close"]

    assert wait_for(lambda: ended() != [], 10)
    logins = [e for e in identity.proxy.events()
              if e.get("client_port") == port and e.get("event") == "auth" and e.get("result") == "ok"]
    users = {"login": [e.get("user") for e in logins], "session_ended": [e.get("user") for e in ended()]}
    assert users == {"login": ["user177"], "session_ended": ["user177"]}, f"the session's user in the logs: {users}"


def test_user_case_preserve_keeps_the_name_as_sent(tmp_path: Path) -> None:
    """Finding 9, the setting: ``user_case = "preserve"`` keeps USER177 apart from user177, so it
    takes the default route and the hook for user177 does not apply."""
    setup = _identity_proxy(tmp_path, "preserve")
    try:
        raw = login(setup.proxy.port, b"USER177", b"pw-177")
        _, body = raw.command(b"RETR 1", multiline=True).split(CRLF, 1)
        raw.command(b"QUIT")
        assert b"from the default upstream" in body and b"X-For-177" not in body
    finally:
        setup.proxy.process.stop()
        setup.main.close()
        setup.special.close()
