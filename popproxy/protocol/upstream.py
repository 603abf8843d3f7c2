"""The upstream leg: one connection to the POP3 server chosen for the user.

``UpstreamProtocol`` is glue twice over. While logging in it carries out what the login machine
(``login.UpstreamLogin``: greeting, optional STLS, CAPA, USER, PASS, and LIST and UIDL when the hooks
need them) decides. Once logged in it is *attached* to the session (``attach``): it hands every byte
to the session machine, which parses and pairs the answers, and writes what the machine sends.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..pop3.framing import body_limit  # noqa: F401  (re-exported for older imports)
from ..pop3.wire import CRLF
from ..tls import tls_facts
from .interfaces import IUpstreamReceiver, LegTransport
from .login import BeginTLS, Failed, LoginEffect, Misconfigured, SendLine, Succeeded, UpstreamLogin, Warn


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or failed before the credentials were checked.

    The client gets ``-ERR [SYS/TEMP]``; ``reason`` is for the log and never holds a credential.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamRefused(Exception):
    """The upstream refused the credentials; ``code`` is its RFC 3206 response code, if any."""

    def __init__(self, code: str | None) -> None:
        super().__init__(code or "refused")
        self.code = code


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """One upstream POP3 connection: logging in (``login.UpstreamLogin`` decides, this carries it
    out), then relaying for the session it is attached to.

    ``login_result`` fires with the login's ``Succeeded`` or fails with ``UpstreamRefused`` (the
    upstream's verdict) or ``UpstreamUnavailable`` (anything else).

    :param tls: client TLS options for STLS (``starttls`` upstreams), or None.
    :param xclient: the XCLIENT line the login sends before USER (``login.xclient_command``), or None.
    :param preamble: bytes written first on the connection, before anything else (a PROXY protocol
        header), or empty.
    :param tls_at_connect: client TLS options to start right after ``preamble``, for an implicit-TLS
        upstream whose endpoint was left plain so that the header can precede the ClientHello.
    :ivar connected_at: the clock's time when the TCP connection was made.
    :ivar handshake_at: the clock's time when the TLS handshake completed (implicit TLS or STLS).
    """

    log = Logger()
    transport: LegTransport  # type: ignore[assignment]  # set by makeConnection, never None after

    def __init__(
        self,
        name: bytes,
        password: bytes,
        *,
        starttls: bool = False,
        listing_limit: int | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
        log_fields: dict[str, object] | None = None,
        clock: IReactorTime | None = None,
        response_timeout: float = 120.0,
        max_body_line: int | None = None,
        xclient: bytes | None = None,
        preamble: bytes = b"",
        tls_at_connect: IOpenSSLClientConnectionCreator | None = None,
    ) -> None:
        self._tls = tls
        self._preamble = preamble
        self._tls_at_connect = tls_at_connect
        self.connected_at: float | None = None
        self.handshake_at: float | None = None
        self._clock = clock
        self._response_timeout = response_timeout
        self._watchdog: IDelayedCall | None = None
        self._silence: str | None = None
        self._receiver: IUpstreamReceiver | None = None
        self._log_fields = log_fields or {}
        self._login = UpstreamLogin(name, password, self._carry_out, starttls=starttls, listing_limit=listing_limit,
                                    max_body_line=max_body_line, xclient=xclient)
        self.login_result: Deferred[Succeeded] = Deferred()
        self.capabilities: list[bytes] = []
        self.connected_tls = False
        self.tls_facts: dict[str, str] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False

    # -- Twisted callbacks -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_at = self._now()
        set_no_delay(self.transport)
        if self._preamble:
            # The PROXY protocol header is the first thing on the connection (the PROXY protocol
            # spec, section 2), before a TLS ClientHello too.
            self.bytes_out += len(self._preamble)
            self.transport.write(self._preamble)
        if self._tls_at_connect is not None:
            # Bytes written before startTLS leave in plain text ahead of the handshake (Twisted's
            # ITLSTransport.startTLS).
            self.transport.startTLS(self._tls_at_connect)
        self._rearm()  # the greeting is an answer that is due

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._receiver is not None:
            self._receiver.upstream_data(data)
            return
        self._login.data(data)
        self._rearm()

    def handshakeCompleted(self) -> None:
        # Twisted calls this even when certificate verification failed and the connection is being
        # aborted (the check runs in the handshake's info callback): trust only a live connection.
        if self.closed or self.transport.disconnecting:
            return
        self.connected_tls = True
        self.handshake_at = self._now()
        # Read now: once the connection is gone the TLS state may no longer be reachable.
        self.tls_facts = tls_facts(self.transport)
        self._login.tls_ready()
        self._rearm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._disarm()
        # A description, never the reactor's Failure itself: every clean close shares one Failure
        # object, and raising it in a waiter would keep this session alive through its traceback.
        if self._receiver is not None:
            self._receiver.upstream_lost(describe(reason))
        else:
            self._login.lost(self._silence or describe(reason))

    # -- the login's effects ---------------------------------------------------------------------------

    def _carry_out(self, effect: LoginEffect) -> None:
        if isinstance(effect, SendLine):
            if not self.closed:
                self.bytes_out += len(effect.line)
                self.transport.write(effect.line)
        elif isinstance(effect, BeginTLS):
            self.transport.startTLS(self._tls)
        elif isinstance(effect, Warn):
            self.log.warn(effect.text, **{**self._log_fields, **effect.fields})
        elif isinstance(effect, Misconfigured):
            self.log.error(effect.text, **{**self._log_fields, **effect.fields})
        elif isinstance(effect, Succeeded):
            self._disarm()
            self.capabilities = effect.capabilities
            if not self.login_result.called:
                self.login_result.callback(effect)
        elif isinstance(effect, Failed):
            self._disarm()
            if not self.login_result.called:
                error = UpstreamRefused(effect.code) if effect.refused else UpstreamUnavailable(effect.reason)
                self.login_result.errback(error)

    def _now(self) -> float | None:
        return self._clock.seconds() if self._clock is not None else None

    # -- the upstream response watchdog --------------------------------------------------------------

    def _rearm(self) -> None:
        """(Re)start the clock on the upstream's answer while logging in: it must start, and keep
        coming, within ``response_timeout`` seconds while something is asked."""
        self._disarm()
        if self._clock is not None and self._login.waiting and self._receiver is None and not self.closed:
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
        self._silence = f"no answer to {self._login.step.value} within {self._response_timeout:g}s"
        self.transport.abortConnection()

    # -- relaying for the session --------------------------------------------------------------------

    def attach(self, receiver: IUpstreamReceiver) -> bytes:
        """Hand every later byte (and the end of the connection) to ``receiver``, the session.

        Returns what was received and not part of any login answer: the session treats it as the
        unsolicited line it is.
        """
        self._disarm()
        self._receiver = receiver
        return self._login.leftover()

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

    def quit(self) -> None:
        """Say goodbye politely where nothing is at stake (before login, or after a refusal)."""
        if not self.closed:
            self.send(b"QUIT" + CRLF)
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
