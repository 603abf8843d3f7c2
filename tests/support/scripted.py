"""A scripted fake POP3 upstream on a real loopback socket, for hostile-upstream tests.

Each accepted connection runs a *script*: a list of steps executed in order by a thread of its own,
with blocking sockets, so that faults a well-behaved Twisted server cannot produce are easy to write:
an RST (``SO_LINGER`` 0), a greeting that never comes, a line that never ends, an answer cut in the
middle, bytes dribbled one at a time, plain text injected around a STLS handshake.

    upstream = ScriptedUpstream(lambda n: [*login(), Expect(b"STAT"), Reset()])
    ...
    upstream.received        # every line any connection received, in order
    upstream.connections     # how many connections were accepted
    upstream.close()

Whatever a script does, once its steps are done the connection is *drained*: every further line the
proxy sends is recorded until the proxy closes it, so a test can assert what the proxy sent after the
fault (for example, that no ``QUIT`` went upstream on a dead client's behalf).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CRLF = b"\r\n"


class ScriptError(AssertionError):
    """The proxy did not send what the script expected."""


# -- steps -------------------------------------------------------------------------------------------


@dataclass
class Send:
    """Write ``data`` in one ``sendall`` (with TCP_NODELAY, so usually one segment)."""

    data: bytes


@dataclass
class Expect:
    """Read one line and check that it starts with ``prefix`` (case-insensitive)."""

    prefix: bytes


@dataclass
class Answer:
    """Read one line, check it starts with ``prefix``, and answer ``data``."""

    prefix: bytes
    data: bytes


@dataclass
class Sleep:
    seconds: float


@dataclass
class Close:
    """Half-close (FIN) and stop: an orderly end of the connection from the upstream's side."""


@dataclass
class Reset:
    """Close with ``SO_LINGER`` 0, so that the peer gets an RST and no FIN."""


@dataclass
class Hang:
    """Say nothing any more: read and record until the peer closes (or ``seconds`` pass)."""

    seconds: float | None = None


@dataclass
class Dribble:
    """Send ``data`` ``size`` bytes at a time, ``interval`` seconds apart."""

    data: bytes
    size: int = 1
    interval: float = 0.01


@dataclass
class Stream:
    """Send ``chunk`` again and again until ``limit`` bytes are out or the peer is gone.

    ``sent`` on the connection record counts bytes as they go, so a test can watch back-pressure
    (a blocked ``sendall``) from outside.
    """

    chunk: bytes
    limit: int = 1 << 40


@dataclass
class StartTLS:
    """Wrap the connection in server-side TLS and do the handshake."""

    context: ssl.SSLContext


@dataclass
class Serve:
    """Answer every further line with ``handler(line)``: bytes to send, a list of steps to run (the
    connection ends if one of them ends it), or None to hang from then on. ``QUIT`` is answered
    ``+OK`` and the connection closed, unless the handler answers it."""

    handler: Callable[[bytes], bytes | list[Step] | None]


@dataclass
class Call:
    """Run ``function(connection)``: for what the other steps cannot say."""

    function: Callable[[Connection], None]


Step = Send | Expect | Answer | Sleep | Close | Reset | Hang | Dribble | Stream | StartTLS | Serve | Call


def greeting(text: bytes = b"+OK scripted ready\r\n") -> Send:
    return Send(text)


CAPA = b"+OK Capability list follows\r\nUSER\r\nTOP\r\nUIDL\r\nRESP-CODES\r\n.\r\n"
CAPA_PIPELINING = b"+OK Capability list follows\r\nUSER\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n"


def login(capa: bytes = CAPA) -> list[Step]:
    """Greeting, CAPA (without PIPELINING unless asked), USER and PASS accepted."""
    return [greeting(), Answer(b"CAPA", capa), Answer(b"USER", b"+OK\r\n"), Answer(b"PASS", b"+OK Logged in\r\n")]


# -- connections ---------------------------------------------------------------------------------------


@dataclass
class Connection:
    """What happened on one accepted connection."""

    index: int
    sock: socket.socket
    lines: list[bytes] = field(default_factory=list)
    sent: int = 0
    #: how the connection ended: "script" (our Close/Reset), "eof" or "reset" (the peer), "stopped"
    ended: str = ""
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _buffer: bytes = b""

    def read_line(self) -> bytes | None:
        """One line without its CRLF; None if the peer closed first."""
        while b"\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        line = line.rstrip(b"\r")
        self.lines.append(line)
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)


class ScriptedUpstream:
    """A loopback POP3 "server" that runs ``script(n)`` on its ``n``-th connection (from 0).

    ``script`` may also be a plain list, used for every connection.
    """

    def __init__(self, script: Sequence[Step] | Callable[[int], Sequence[Step]], host: str = "127.0.0.1") -> None:
        self._script = script if callable(script) else (lambda n, steps=list(script): steps)
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.conns: list[Connection] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="scripted-upstream", daemon=True)
        self._accepter.start()

    # -- what tests look at

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.conns)

    @property
    def received(self) -> list[bytes]:
        with self._lock:
            return [line for conn in self.conns for line in conn.lines]

    @property
    def errors(self) -> list[BaseException]:
        with self._lock:
            return [conn.error for conn in self.conns if isinstance(conn.error, ScriptError)]

    def wait_closed(self, timeout: float = 10.0) -> list[Connection]:
        """Wait until every connection so far has ended; return them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            if not conn.done.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"upstream connection {conn.index} still open after {timeout}s")
        return conns

    # -- serving

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = Connection(len(self.conns), sock)
                self.conns.append(conn)
            thread = threading.Thread(target=self._run, args=(conn,), name=f"scripted-{conn.index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: Connection) -> None:
        try:
            for step in self._script(conn.index):
                if self._step(conn, step):
                    return
            self._drain(conn, None)
        except ScriptError as error:
            conn.error = error
            self._drain(conn, None)
        except (ConnectionResetError, BrokenPipeError):
            conn.ended = conn.ended or "reset"
        except (OSError, ssl.SSLError) as error:
            conn.error = error
            conn.ended = conn.ended or ("stopped" if self._stop.is_set() else "error")
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            conn.done.set()

    def _step(self, conn: Connection, step: Step) -> bool:
        """Run one step; True if the connection is over."""
        if isinstance(step, Send):
            conn.send(step.data)
        elif isinstance(step, (Expect, Answer)):
            line = conn.read_line()
            if line is None:
                conn.ended = "eof"
                return True
            if not line.upper().startswith(step.prefix.upper()):
                raise ScriptError(f"expected {step.prefix!r}, got {line!r}")
            if isinstance(step, Answer):
                conn.send(step.data)
        elif isinstance(step, Sleep):
            self._stop.wait(step.seconds)
        elif isinstance(step, Close):
            conn.ended = "script"
            conn.sock.shutdown(socket.SHUT_WR)
            self._drain(conn, 10.0)
            conn.ended = "script"
            return True
        elif isinstance(step, Reset):
            conn.ended = "script"
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
            return True
        elif isinstance(step, Hang):
            self._drain(conn, step.seconds)
            return step.seconds is None or bool(conn.ended)
        elif isinstance(step, Dribble):
            for start in range(0, len(step.data), step.size):
                conn.send(step.data[start : start + step.size])
                if self._stop.wait(step.interval):
                    return True
        elif isinstance(step, Stream):
            view = memoryview(step.chunk)
            while conn.sent < step.limit and not self._stop.is_set():
                conn.send(view)
        elif isinstance(step, StartTLS):
            assert not conn._buffer, "plain text left over before TLS"
            conn.sock = step.context.wrap_socket(conn.sock, server_side=True)
        elif isinstance(step, Serve):
            while (line := conn.read_line()) is not None:
                answer = step.handler(line)
                if answer is None and line.upper().startswith(b"QUIT"):
                    answer = [Send(b"+OK bye\r\n"), Close()]
                if answer is None:
                    return self._step(conn, Hang())
                if isinstance(answer, bytes):
                    conn.send(answer)
                    continue
                for inner in answer:
                    if self._step(conn, inner):
                        return True
            conn.ended = conn.ended or "eof"
            return True
        elif isinstance(step, Call):
            step.function(conn)
        return False

    def _drain(self, conn: Connection, seconds: float | None) -> None:
        """Record lines until the peer closes, the server stops, or ``seconds`` pass."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            conn.sock.settimeout(0.1 if remaining is None else min(0.1, remaining))
            try:
                line = conn.read_line()
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                conn.ended = conn.ended or "reset"
                return
            except OSError:
                conn.ended = conn.ended or "error"
                return
            finally:
                try:
                    conn.sock.settimeout(None)
                except OSError:
                    pass
            if line is None:
                conn.ended = conn.ended or "eof"
                return
        conn.ended = conn.ended or "stopped"

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            if not conn.done.wait(2.0):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(5.0)
        self._accepter.join(5.0)


def refused_address(host: str = "127.0.0.1") -> str:
    """A loopback address where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"
