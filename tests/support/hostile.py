"""Helpers for the hostile-client suite (``tests/test_hostile_clients.py``): raw sockets from chosen
loopback addresses, a recording fake upstream that lets logins go through (so that whatever a proxy
would send after the credentials shows up), TLS clients that really offer TLS 1.0/1.1, and a counter
of the hostile inputs the suite sends.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

# -- counting hostile inputs ---------------------------------------------------------------------------

#: hostile inputs sent so far in this process (one per abusive command, payload, connection pattern)
HOSTILE_INPUTS = 0


def hostile(n: int = 1) -> None:
    """Count ``n`` hostile inputs."""
    global HOSTILE_INPUTS
    HOSTILE_INPUTS += n


# -- sockets from many loopback addresses ------------------------------------------------------------

_addresses = (f"127.0.{a}.{b}" for a, b in itertools.product(range(10, 250), range(1, 255)))
_address_lock = threading.Lock()


def fresh_address() -> str:
    """A loopback address no other caller got (127.0.10.1 upwards): the proxy's per-address counters
    and penalties start from zero for it. Linux routes all of 127.0.0.0/8 to ``lo``."""
    with _address_lock:
        return next(_addresses)


#: every socket ``connect`` made, so that a fixture can close what a failed test left open
OPENED: list[socket.socket] = []


def close_opened() -> None:
    while OPENED:
        OPENED.pop().close()


def connect(port: int, source: str | None = None, timeout: float = 10.0, nodelay: bool = False) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source`` (a fresh address if None)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    OPENED.append(sock)
    try:
        sock.settimeout(timeout)
        sock.bind((source or fresh_address(), 0))
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes, float]:
    """Read until the peer closes (FIN or RST) or ``timeout`` passes.

    Returns (closed, what was received, seconds it took)."""
    started = time.monotonic()
    data = b""
    deadline = started + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, data, time.monotonic() - started
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, data, time.monotonic() - started
        except (ConnectionResetError, BrokenPipeError):
            return True, data, time.monotonic() - started
        except ssl.SSLError:
            return True, data, time.monotonic() - started
        if not chunk:
            return True, data, time.monotonic() - started
        data += chunk


def quiet_for(sock: socket.socket, seconds: float) -> bytes:
    """Whatever arrives within ``seconds`` (b"" if nothing); the socket stays open."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except (TimeoutError, ssl.SSLWantReadError):
        return b""
    finally:
        sock.settimeout(10)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` in /proc/PID/status)."""
    return _status_kib(pid, "VmRSS")


def reset_peak(pid: int) -> int:
    """Reset the peak RSS of ``pid`` to its current RSS (``clear_refs`` 5, allowed for our own
    processes) and return the current RSS in KiB. A buffer that grows and is freed again between two
    RSS readings still shows in the peak (``peak_kib``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_kib(pid)


def peak_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` since the last ``reset_peak`` (``VmHWM``), in KiB."""
    return _status_kib(pid, "VmHWM")


def close_times(socks: dict[str, socket.socket], timeout: float, tick: Callable[[], None] | None = None,
                every: float = 0.25) -> dict[str, tuple[float | None, bytes]]:
    """Watch several sockets at once until each is closed by its peer or ``timeout`` passes.

    Returns, per name, the ``time.monotonic()`` at which the peer closed (None if it did not) and
    everything received. ``tick`` is called every ``every`` seconds (a slowloris client's next byte).
    """
    import selectors

    result: dict[str, tuple[float | None, bytes]] = {name: (None, b"") for name in socks}
    open_names = {sock.fileno(): name for name, sock in socks.items()}
    selector = selectors.DefaultSelector()
    for fd, name in open_names.items():
        socks[name].setblocking(False)
        selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + every
    try:
        while open_names and time.monotonic() < deadline:
            wait = min(deadline, next_tick if tick else deadline) - time.monotonic()
            for key, _ in selector.select(max(0.0, wait)):
                name = open_names[key.fd]
                try:
                    chunk = socks[name].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                _, data = result[name]
                if chunk:
                    result[name] = (None, data + chunk)
                else:
                    result[name] = (time.monotonic(), data)
                    selector.unregister(key.fd)
                    del open_names[key.fd]
            if tick and time.monotonic() >= next_tick:
                tick()
                next_tick += every
    finally:
        selector.close()
        for sock in socks.values():
            if sock.fileno() != -1:
                sock.setblocking(True)
                sock.settimeout(10)
    return result


# -- a recording fake upstream ---------------------------------------------------------------------------

class RecordingUpstream:
    """A small POP3 server on 127.0.0.1 (threads, plain sockets) that records every line.

    Unlike ``support.trap.TrapServer`` it speaks enough POP3 (a CAPA with a body, PIPELINING) for a
    proxy's login to complete, so that a command a proxy would inject after the credentials, or a QUIT
    it should not send, actually reaches it. ``users`` maps names to passwords; with None any name is
    accepted with any password that does not start with ``"wrong"``. An unknown user is refused at USER and a wrong
    password at PASS, with different texts, like servers that leak which one it was.

    With ``hold`` set, commands after login are recorded but not answered until it is cleared.
    """

    def __init__(self, users: dict[bytes, bytes] | None = None) -> None:
        self.users = users
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.sessions: list[list[bytes]] = []  # lines received, one list per connection
        self.hold = threading.Event()
        self._released = threading.Condition()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.sessions)

    def session_of(self, user: bytes) -> list[bytes]:
        """The lines of the (last) connection on which ``USER user`` was sent."""
        with self._lock:
            found = [s for s in self.sessions if b"USER " + user in s]
        assert found, f"no upstream session for {user!r}"
        return list(found[-1])

    def lines(self) -> list[bytes]:
        """Every line received, on every connection, in order per connection."""
        with self._lock:
            return [line for session in self.sessions for line in session]

    def release(self) -> None:
        self.hold.clear()
        with self._released:
            self._released.notify_all()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                record: list[bytes] = []
                self.sessions.append(record)
                self._conns.append(conn)
            threading.Thread(target=self._talk, args=(conn, record), daemon=True).start()

    def _talk(self, conn: socket.socket, record: list[bytes]) -> None:
        buffer = b""
        user: bytes | None = None
        logged_in = False
        try:
            conn.sendall(b"+OK fake POP3 ready\r\n")
            while data := conn.recv(65536):
                buffer += data
                *raws, buffer = buffer.split(b"\n")
                lines = [raw[:-1] if raw.endswith(b"\r") else raw for raw in raws]
                with self._lock:
                    record.extend(lines)
                out: list[bytes] = []
                for line in lines:
                    verb, _, rest = line.partition(b" ")
                    verb = verb.upper()
                    if logged_in and verb != b"QUIT" and self.hold.is_set():
                        if out:
                            conn.sendall(b"".join(out))
                            out = []
                        with self._released:
                            self._released.wait_for(lambda: not self.hold.is_set())
                    if verb == b"CAPA":
                        out.append(b"+OK\r\nUSER\r\nTOP\r\nUIDL\r\nPIPELINING\r\n.\r\n")
                    elif verb == b"USER" and not logged_in:
                        if self.users is None or rest in self.users:
                            user = rest
                            out.append(b"+OK\r\n")
                        else:
                            out.append(b"-ERR [AUTH] No such user here\r\n")
                    elif verb == b"PASS" and not logged_in and user is not None:
                        if self.users is None:
                            good = not rest.startswith(b"wrong")
                        else:
                            good = self.users.get(user) == rest
                        if good:
                            logged_in = True
                            out.append(b"+OK maildrop ready\r\n")
                        else:
                            out.append(b"-ERR [AUTH] Password incorrect\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"".join(out) + b"+OK bye\r\n")
                        return
                    elif not logged_in:
                        out.append(b"-ERR not logged in\r\n")
                    elif verb in (b"NOOP", b"DELE", b"RSET"):
                        out.append(b"+OK\r\n")
                    elif verb == b"STAT":
                        out.append(b"+OK 1 20\r\n")
                    elif verb == b"LIST" and not rest:
                        out.append(b"+OK\r\n1 20\r\n.\r\n")
                    elif verb == b"RETR" and rest == b"1":
                        out.append(b"+OK 20 octets\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
                    else:
                        out.append(b"-ERR no such command\r\n")
                if out:
                    conn.sendall(b"".join(out))
        except OSError:  # the proxy aborted the connection: allowed
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.release()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- TLS ---------------------------------------------------------------------------------------------------

_TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def client_context(cafile: Path | str | None, version: str) -> ssl.SSLContext:
    """A client context that offers exactly TLS ``version`` ("1.0" ... "1.3").

    Debian's OpenSSL refuses TLS 1.0/1.1 on the client side at its default security level, so the
    level is lowered to 0 (``@SECLEVEL=0``): the client then really offers the old version, which
    ``offered_version`` proves. Setting TLSv1/TLSv1_1 warns (DeprecationWarning) in Python; that is
    the point here, so the warning is silenced.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(cafile))
    wanted = _TLS_VERSIONS[version]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if wanted < ssl.TLSVersion.TLSv1_2:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = wanted
        context.maximum_version = wanted
    return context


def legacy_server_context(certificate: Path | str) -> ssl.SSLContext:
    """A server context that accepts anything from TLS 1.0 up, at security level 0."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.load_cert_chain(str(certificate))
    return context


def offered_version(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """Run a handshake between ``client`` and ``server`` in memory (no socket) and return the version
    they agreed on: proof of what a client context really offers."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        for obj, done_flag in ((tls_client, "c"), (tls_server, "s")):
            try:
                obj.do_handshake()
                if done_flag == "c":
                    client_done = True
                else:
                    server_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client_done and server_done:
            return tls_client.version()
    return None


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The bytes of a real TLS ClientHello, as Python's default client would send it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
