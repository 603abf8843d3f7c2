"""The upstream leg: one connection to the POP3 server chosen for the user.

``UpstreamProtocol`` logs in by itself (greeting, CAPA, optional STLS, USER, PASS, and LIST and UIDL
when the hooks need them), one request at a time, each answer collected whole and bounded. Once
logged in it is *attached* to the session (``attach``): from then on it is plain glue, handing every
byte to the session machine, which parses and pairs the answers, and writing what the machine sends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..pop3 import capa
from ..pop3.framing import ResponseReader, body_limit
from ..pop3.wire import CRLF, is_ok, response_code, unstuff_lines
from ..tls import tls_facts
from .interfaces import IUpstreamReceiver, LegTransport
from .mailbox import parse_listing

# RFC 1939 §3 caps a status line at 512 octets; leave room for servers that exceed it a little.
MAX_STATUS_LINE = 8192

# RFC 3206 codes from the upstream that the client must see as they are: they tell it to wait or to
# stop retrying, which [AUTH] would not.
PASSED_LOGIN_CODES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or failed before the credentials were checked.

    The client gets ``-ERR [SYS/TEMP]``; ``reason`` is for the log and never holds a credential.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamLost(ConnectionError):
    """The upstream connection ended; the message says how."""


class CollectSink:
    """Collects a whole (small) answer for the proxy's own use while logging in: the greeting, CAPA,
    the replies to STLS, USER and PASS, LIST and UIDL. Fires ``result`` with ``(status, lines)``;
    an answer over ``limit`` octets fails it at once (an endless answer is not waited for)."""

    def __init__(self, limit: int = 65536) -> None:
        self.result: Deferred[tuple[bytes, list[bytes]]] = Deferred()
        self._limit = limit
        self._status = b""
        self._parts: list[bytes] = []
        self._size = 0

    def status(self, line: bytes, has_body: bool) -> None:
        self._status = line

    def body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)
        elif not self.result.called:
            self._parts.clear()
            self.result.errback(ValueError(f"answer larger than {self._limit} bytes"))

    def end(self) -> None:
        if not self.result.called:
            self.result.callback((self._status, unstuff_lines(b"".join(self._parts))))

    def failed(self, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(reason)


class UpstreamRefused(Exception):
    """The upstream refused the credentials; ``code`` is its RFC 3206 response code, if any."""

    def __init__(self, code: str | None) -> None:
        super().__init__(code or "refused")
        self.code = code


@dataclass(slots=True)
class _Request:
    line: bytes | None  # None for the greeting, which nobody asks for
    sink: CollectSink
    expects_body: bool


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """One upstream POP3 connection: logging in, then relaying for the session it is attached to.

    :param tls: client TLS options for STLS (``starttls`` upstreams), or None.
    """

    log = Logger()
    transport: LegTransport  # type: ignore[assignment]  # set by makeConnection, never None after

    def __init__(
        self,
        *,
        tls: IOpenSSLClientConnectionCreator | None = None,
        log_fields: dict[str, object] | None = None,
        clock: IReactorTime | None = None,
        response_timeout: float = 120.0,
        max_body_line: int | None = None,
    ) -> None:
        self._tls = tls
        self._clock = clock
        self._response_timeout = response_timeout
        self._watchdog: IDelayedCall | None = None
        self._receiver: IUpstreamReceiver | None = None
        self._log_fields = log_fields or {}
        self._reader = ResponseReader(self, MAX_STATUS_LINE, max_body_line)
        self._greeting = CollectSink()
        # Sent and awaiting an answer, oldest first; the greeting counts as one.
        self._inflight: deque[_Request] = deque([_Request(None, self._greeting, False)])
        # Not sent yet, because the upstream does not pipeline.
        self._waiting: deque[_Request] = deque()
        self._handshake: Deferred[None] | None = None
        self.pipelining = False
        self.capabilities: list[bytes] = []
        self.connected_tls = False
        self.tls_facts: dict[str, str] = {}
        self._delivering = False  # inside the reader: requests made now wait until it is done
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False

    # -- Twisted callbacks -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._rearm()  # the greeting is an answer that is due

    def dataReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.upstream_data(data)
            return
        self.bytes_in += len(data)
        self._delivering = True
        try:
            self._reader.feed(data)
        finally:
            self._delivering = False
        self._after_delivery()
        self._rearm()

    def _after_delivery(self) -> None:
        """Requests made while answers were being handed out go now (not in the middle of a chunk,
        whose rest may hold a line nobody asked for: it must not become the next request's answer)."""
        if self.closed:
            return
        if not self._inflight and self._reader.pending and not self._reader.paused:
            self._unsolicited()
            return
        while self._waiting and (self.pipelining or not self._inflight):
            self._send(self._waiting.popleft())

    def handshakeCompleted(self) -> None:
        # Twisted calls this even when certificate verification failed and the connection is being
        # aborted (the check runs in the handshake's info callback): trust only a live connection.
        if self.closed or self.transport.disconnecting:
            return
        self.connected_tls = True
        # Read now: once the connection is gone the TLS state may no longer be reachable.
        self.tls_facts = tls_facts(self.transport)
        if self._handshake is not None:
            waiting, self._handshake = self._handshake, None
            waiting.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._disarm()
        # The reactor hands every clean close the same shared Failure object: raising it in a
        # waiting coroutine would hang this session's frames on that shared exception's traceback
        # until the next close. Give the waiters a failure of their own.
        reason = Failure(UpstreamLost(describe(reason)))
        requests = list(self._inflight) + list(self._waiting)
        self._inflight.clear()
        self._waiting.clear()
        if self._handshake is not None:
            waiting, self._handshake = self._handshake, None
            waiting.errback(reason)
        for request in requests:
            request.sink.failed(reason)
        if self._receiver is not None:
            self._receiver.upstream_lost(describe(reason))

    # -- sending -----------------------------------------------------------------------------------

    def request(self, line: bytes, sink: CollectSink, *, expects_body: bool) -> None:
        """Send ``line`` (with its CRLF) now, or once the answers before it are in."""
        request = _Request(line, sink, expects_body)
        if self.closed:
            sink.failed(Failure(ConnectionError("upstream connection closed")))
        elif not self._delivering and (self.pipelining or not (self._inflight or self._waiting)):
            self._send(request)
        else:
            self._waiting.append(request)

    def _send(self, request: _Request) -> None:
        assert request.line is not None
        self._inflight.append(request)
        self.bytes_out += len(request.line)
        self.transport.write(request.line)
        if self._watchdog is None:
            self._rearm()

    @property
    def idle(self) -> bool:
        """No command is waiting for an answer."""
        return not (self._inflight or self._waiting)

    # -- ResponseHandler (called by the reader) ----------------------------------------------------

    def status_received(self, line: bytes) -> bool:
        if not self._inflight:
            self._unsolicited()
            return False
        if not (line.startswith(b"+OK") or line.startswith(b"-ERR")) and self._inflight[0].line is not None:
            # RFC 1939 §3: every status line starts with +OK or -ERR. Anything else means the stream
            # is not what the proxy thinks it is; relaying it would hand the client nonsense. (A bad
            # greeting goes to the login, which refuses it by name.)
            self.log.warn("upstream sent a line that is neither +OK nor -ERR; closing", **self._log_fields)
            self.transport.abortConnection()
            return False
        request = self._inflight[0]
        has_body = request.expects_body and is_ok(line)
        if has_body:
            self._reader.body_limit = body_limit(line)
        request.sink.status(line, has_body)
        if not has_body:
            self._complete()
        return has_body

    def body_received(self, data: bytes) -> None:
        self._inflight[0].sink.body(data)

    def body_ended(self) -> None:
        self._complete()

    def line_too_long(self) -> None:
        self.log.warn(
            "upstream sent a line or an answer beyond the limits (status line {status} octets, body "
            "line {body_line}, body twice its announced size); closing",
            status=MAX_STATUS_LINE,
            body_line=self._reader.max_body_line,
            **self._log_fields,
        )
        self.transport.abortConnection()

    def _complete(self) -> None:
        request = self._inflight.popleft()
        if not self._inflight:
            self._disarm()
        request.sink.end()

    # -- the upstream response watchdog --------------------------------------------------------------

    def _rearm(self) -> None:
        """(Re)start the clock on the upstream's answer: it must start, and keep coming, within
        ``response_timeout`` seconds while something is asked."""
        self._disarm()
        if self._clock is not None and self._inflight and not self.closed:
            self._watchdog = self._clock.callLater(self._response_timeout, self._silent)

    def _disarm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _silent(self) -> None:
        self._watchdog = None
        self.log.warn(
            "upstream sent nothing for {seconds}s while an answer was due; closing",
            seconds=self._response_timeout,
            **self._log_fields,
        )
        self.transport.abortConnection()

    # -- relaying for the session --------------------------------------------------------------------

    def attach(self, receiver: IUpstreamReceiver) -> bytes:
        """Hand every later byte (and the end of the connection) to ``receiver``, the session.

        Returns what was received and not part of any login answer: the session treats it as the
        unsolicited line it is.
        """
        self._disarm()
        self._receiver = receiver
        return self._reader.take_buffer()

    def send(self, line: bytes) -> None:
        """A command line from the session (which keeps the upstream's pipelining rules)."""
        if not self.closed:
            self.bytes_out += len(line)
            self.transport.write(line)

    def pause_reading(self) -> None:
        """Stop reading the socket (flow control: the session decides when)."""
        if not self.closed:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resumeProducing()

    def _unsolicited(self) -> None:
        # Nothing was asked: an upstream that talks out of turn would shift every later answer onto
        # the wrong command, so it is not believed any further.
        self.log.warn("upstream sent an unsolicited line; closing", **self._log_fields)
        self.transport.abortConnection()

    # -- logging in --------------------------------------------------------------------------------

    async def _ask(self, line: bytes, expects_body: bool = False) -> tuple[bytes, list[bytes]]:
        sink = CollectSink()
        self.request(line, sink, expects_body=expects_body)
        return await sink.result

    async def log_in(self, name: bytes, password: bytes, *, starttls: bool) -> None:
        """Greeting, CAPA, STLS if asked for, then USER and PASS.

        Raises ``UpstreamUnavailable`` for anything that is not the upstream's verdict on the
        credentials, and ``UpstreamRefused`` for that verdict. With ``starttls`` no credential is
        sent before the TLS handshake has completed and the certificate was verified.
        """
        greeting, _ = await self._greeting.result
        if not is_ok(greeting):
            raise UpstreamUnavailable("greeting was not +OK")
        status, lines = await self._ask(b"CAPA" + CRLF, expects_body=True)
        if starttls:
            if not (is_ok(status) and b"STLS" in capa.names(lines)):
                raise UpstreamUnavailable("upstream does not offer STLS")
            await self._start_tls()
            status, lines = await self._ask(b"CAPA" + CRLF, expects_body=True)
        self.capabilities = lines if is_ok(status) else []
        self.pipelining = b"PIPELINING" in capa.names(self.capabilities)
        status, _ = await self._ask(b"USER " + name + CRLF)
        if is_ok(status):
            status, _ = await self._ask(b"PASS " + password + CRLF)
        if not is_ok(status):
            code = response_code(status)
            if code is None and b"AUTH-RESP-CODE" in capa.names(self.capabilities):
                # RFC 3206 §6: an upstream that announces AUTH-RESP-CODE marks credential failures
                # with [AUTH]; a refusal without it is about something else (shutting down, say).
                raise UpstreamUnavailable("login refused without [AUTH] by an AUTH-RESP-CODE upstream")
            raise UpstreamRefused(code)

    async def listing(self, limit: int) -> tuple[dict[int, int], dict[int, str]]:
        """LIST and UIDL, once, at login: sizes for the hooks' reservations, UIDLs for their facts.

        Each answer may hold at most ``limit`` octets (``[limits] max_listing``); an upstream that
        sends more, or refuses LIST, fails the login with ``UpstreamUnavailable``.
        """
        listing = CollectSink(limit=limit)
        self.request(b"LIST" + CRLF, listing, expects_body=True)
        uidl = CollectSink(limit=limit)
        self.request(b"UIDL" + CRLF, uidl, expects_body=True)
        # Both answers are awaited together, so that neither is left failing unobserved.
        try:
            (status, lines), (uidl_status, uidl_lines) = await gatherResults(
                [listing.result, uidl.result], consumeErrors=True)
        except FirstError as error:
            raise UpstreamUnavailable(f"LIST/UIDL at login failed: {describe(error.subFailure)}") from None
        if not is_ok(status):
            raise UpstreamUnavailable("LIST/UIDL at login failed: LIST refused")
        sizes = {n: int(value) for n, value in parse_listing(lines).items() if value.isdigit()}
        uidls = ({n: value.decode("ascii", "replace") for n, value in parse_listing(uidl_lines).items()}
                 if is_ok(uidl_status) else {})
        return sizes, uidls

    async def _start_tls(self) -> None:
        status, _ = await self._ask(b"STLS" + CRLF)
        if not is_ok(status):
            raise UpstreamUnavailable("upstream refused STLS")
        # RFC 2595 §4 / RFC 3207 §6: whatever followed the +OK in plain text was not protected by TLS;
        # a man in the middle may have appended answers to commands we have not sent yet.
        injected = self._reader.take_buffer()
        if injected:
            self.log.warn(
                "upstream sent {count} bytes in plain text after +OK to STLS; discarded",
                count=len(injected),
                **self._log_fields,
            )
        self._handshake = Deferred()
        self.transport.startTLS(self._tls)
        try:
            await self._handshake
        except Exception as error:
            raise UpstreamUnavailable(f"TLS handshake failed: {describe(error)}") from None

    def quit(self) -> None:
        """Say goodbye politely where nothing is at stake (before login, or after a refusal)."""
        if not self.closed:
            goodbye = CollectSink()
            goodbye.result.addErrback(lambda _: None)  # nobody waits for the answer
            self.request(b"QUIT" + CRLF, goodbye, expects_body=False)
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection without QUIT: the upstream must not enter UPDATE state (RFC 1939 §6)."""
        if not self.closed:
            self.transport.abortConnection()


def set_no_delay(transport: object) -> None:
    """Disable Nagle: a response's last small segment must not wait for a delayed ACK (40 ms)."""
    try:
        transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
    except Exception:  # not TCP (a UNIX socket, a memory transport)
        pass


def describe(error: BaseException | Failure) -> str:
    """A short, credential-free description of a connection or TLS failure, for logs."""
    value = error.value if isinstance(error, Failure) else error
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}"[:300]
