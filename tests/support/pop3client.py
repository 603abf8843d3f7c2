"""Client helpers for integration tests: poplib in each TLS mode, and a raw wire-level client."""

from __future__ import annotations

import hashlib
import poplib
import socket
import ssl
from pathlib import Path

CRLF = b"\r\n"


def tls_context(cafile: Path | str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def open_poplib(mode: str, port: int, cafile: Path | str, timeout: float = 30) -> poplib.POP3:
    """A poplib session to ``localhost:port``: plain, STLS (``stls()`` straight after the greeting)
    or implicit TLS. Certificates are checked against ``cafile`` and the name ``localhost``."""
    if mode == "none":
        return poplib.POP3("127.0.0.1", port, timeout=timeout)
    if mode == "starttls":
        client = poplib.POP3("localhost", port, timeout=timeout)
        client.stls(tls_context(cafile))
        return client
    if mode == "implicit":
        return poplib.POP3_SSL("localhost", port, timeout=timeout, context=tls_context(cafile))
    raise ValueError(mode)


def log_in(port: int, user: str, password: str, host: str = "127.0.0.1") -> poplib.POP3:
    """A poplib session logged in over plain POP3 (closed again if the login fails)."""
    client = poplib.POP3(host, port, timeout=20)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


class BoundPOP3(poplib.POP3):
    """poplib whose socket has the source address ``source`` (any of 127.0.0.0/8 on Linux: a second
    client address on loopback); with ``stls``, STLS checked against that context after the greeting."""

    def __init__(self, port: int, source: str, stls: ssl.SSLContext | None = None, host: str = "127.0.0.1",
                 timeout: float = 30) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)
        if stls is not None:
            self.stls(stls)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class BoundPOP3S(poplib.POP3_SSL):
    """poplib with implicit TLS from source address ``source``."""

    def __init__(self, port: int, source: str, context: ssl.SSLContext, host: str = "127.0.0.1",
                 timeout: float = 30) -> None:
        self._source = source
        self._tls = context
        super().__init__(host, port, timeout=timeout, context=context)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        return self._tls.wrap_socket(sock, server_hostname="localhost")


def timed_login(client: poplib.POP3, user: str, password: str, started: float,
                first_message: list[bytes] | None = None) -> tuple[bytes, float]:
    """Log ``client`` in: the answer to PASS (or the -ERR raised) and the seconds from ``started``
    (``time.monotonic()`` before connecting) to that answer. Logged in, it reads message 1 (and
    checks its lines against ``first_message``), then QUITs; ``client`` is closed either way."""
    import time

    try:
        client.user(user)
        try:
            answer = client.pass_(password)
        except poplib.error_proto as error:
            answer = error.args[0]
        elapsed = time.monotonic() - started
        if answer.startswith(b"+OK"):
            lines = client.retr(1)[1]
            assert first_message is None or lines == first_message, lines
        client.quit()
        return answer, elapsed
    finally:
        client.close()


def retrieve(client: poplib.POP3, number: int) -> bytes:
    """``RETR number`` as the message bytes a client stores: poplib's lines (already un-stuffed)
    joined with CRLF, ending with CRLF."""
    _, lines, _ = client.retr(number)
    return b"".join(line + CRLF for line in lines)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RawPOP3:
    """A wire-level client: sends exact bytes, reads exact answers (dot-stuffing kept).

    For byte-for-byte comparisons and for what poplib will not do (pipelining, injection, hanging up
    in the middle of a command).
    """

    #: every connection made, so that a fixture can close what a failed test left open
    opened: list[RawPOP3] = []

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        RawPOP3.opened.append(self)

    @classmethod
    def close_all(cls) -> None:
        while cls.opened:
            cls.opened.pop().close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self._buffer += data

    def line(self) -> bytes:
        while CRLF not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(CRLF)
        return line + CRLF

    def answer(self, multiline: bool = False) -> bytes:
        """One answer, as on the wire: the status line, and if ``multiline`` and +OK, the body up to
        and including its terminator (an empty body is just ``.CRLF``)."""
        status = self.line()
        if not (multiline and status.startswith(b"+OK")):
            return status
        # The status line's CRLF counts as the start of the terminator of an empty body.
        self._buffer = CRLF + self._buffer
        scanned = 0
        while True:
            end = self._buffer.find(b"\r\n.\r\n", scanned)
            if end != -1:
                cut = end + 5
                body, self._buffer = self._buffer[2:cut], self._buffer[cut:]
                return status + body
            scanned = max(0, len(self._buffer) - 4)
            self._fill()

    def command(self, line: bytes, multiline: bool = False) -> bytes:
        self.send(line + CRLF)
        return self.answer(multiline)

    def start_tls(self, cafile: Path | str, server_hostname: str = "localhost") -> None:
        assert not self._buffer, "plain-text bytes left over before TLS"
        self.sock = tls_context(cafile).wrap_socket(self.sock, server_hostname=server_hostname)

    def read_all(self) -> bytes:
        """Everything until the peer closes (or resets) the connection."""
        data, self._buffer = self._buffer, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError, OSError):
            pass
        return data

    def close(self) -> None:
        self.sock.close()
