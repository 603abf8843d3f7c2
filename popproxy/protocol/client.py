"""The client leg: one POP3 session as the client sees it.

Before login the proxy is the server: it greets, answers CAPA, STLS, USER, PASS, AUTH, NOOP and QUIT
itself, and opens no upstream connection until it holds credentials. After login it relays every
command it knows the framing of to the upstream chosen for the user and passes the answers back byte
for byte, in order, with back-pressure both ways.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..hooks.events import SessionEvents
from ..hooks.interfaces import SessionFacts
from ..pop3.framing import TOO_LONG, CommandLines
from ..pop3.wire import (
    MAX_COMMAND_LINE,
    Command,
    err,
    ok,
    parse_command,
)
from ..tls import tls_facts
from .authorization import AUTH_FAILED, TLS_REQUIRED, UPSTREAM_DOWN, Authorization
from .flow import PauseGate
from .hooked import TransactionHooks
from .responses import AnswerQueue
from .state import SHUTTING_DOWN, SessionSettings, State
from .transaction import Transaction
from .upstream import (
    UpstreamProtocol,
    set_no_delay,
)

__all__ = ["AUTH_FAILED", "TLS_REQUIRED", "UPSTREAM_DOWN", "ClientProtocol", "SessionSettings", "State"]

TOO_MANY_SESSIONS = err("Too many sessions, try again later.", "SYS/TEMP")
# Seconds a closing connection may take to finish (TLS close_notify) before it is cut.
CLOSE_TIMEOUT = 5.0


class ClientProtocol(Authorization, Transaction, Protocol):
    """One client session. ``on_closed`` is called once, when the session is over.

    The state-specific halves live in ``authorization`` and ``transaction``; this class holds what
    every state shares: I/O, timers, limits, logging and the end of the session.
    """

    log = Logger()

    def __init__(self, settings: SessionSettings, on_closed: Callable[[ClientProtocol], None]) -> None:
        self.settings = settings
        self._on_closed = on_closed
        self.session_id = secrets.token_hex(6)
        self.state = State.AUTHORIZATION
        self._lines = CommandLines(MAX_COMMAND_LINE)
        self._tls_active = settings.listener.tls == "implicit"
        self._user: bytes | None = None
        self._upstream: UpstreamProtocol | None = None
        self._upstream_name: str | None = None
        self._login: Deferred[UpstreamProtocol] | None = None
        self._answers = AnswerQueue(self._write, self._answers_idle, self._answer_finished)
        self._reading = PauseGate()  # transport pauses: back-pressure, a full buffer
        self._holds: set[str] = set()  # reasons not to handle buffered commands yet
        self._quit_sent = False
        self._timer: IDelayedCall | None = None
        self._started = settings.clock.seconds()
        self._bytes_in = 0
        self._bytes_out = 0
        self._end_reason = "client closed"
        self._close_waiters: list[Deferred[None]] = []
        self.user: str | None = None
        self._opened_logged = False
        self._closing = False
        self._hung_up = False
        self._client_tls: dict[str, str] = {}
        self._tls_reported = False
        self._events = SessionEvents(settings.hooks)
        self._hooks: TransactionHooks | None = None
        self._waiting_command: tuple[Command, bytes] | None = None
        self._limits = settings.config.limits
        self._admitted_host: str | None = None  # counted by the guard under this address
        self._counted_user: str | None = None  # counted by the guard as a logged-in session
        self._bad_commands = 0
        self._login_failures = 0
        self._login_started = 0.0
        self._tls_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._draining = False
        self._activity = 0.0  # when the client last sent a command (idle timeout)
        self._progress_mark = -1  # bytes_out at the last idle check while an answer was pending
        self._attempt: tuple[str, str] | None = None  # (user, upstream) of the latest login attempt
        self._upstream_capabilities: frozenset[bytes] = frozenset()
        self._quit_after_login: list[Command] | None = None

    # -- log fields ---------------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        peer = self.transport.getPeer() if self.transport is not None else None
        return {
            "session_id": self.session_id,
            "peer_host": getattr(peer, "host", str(peer)),
            "peer_port": getattr(peer, "port", 0),
            "listener": self.settings.listener.key,
        }

    def session_facts(self) -> SessionFacts:
        """A snapshot of what is known about this session, for hooks."""
        fields = self._fields()
        upstream = self._upstream
        return SessionFacts(
            session_id=self.session_id,
            client_host=str(fields["peer_host"]),
            client_port=int(fields["peer_port"] or 0),
            listener=self.settings.listener.key,
            user=self.user or (self._attempt[0] if self._attempt else None),
            upstream=self._upstream_name or (self._attempt[1] if self._attempt else None),
            client_tls=dict(self._client_tls),
            upstream_tls=dict(upstream.tls_facts) if upstream is not None else {},
        )

    def _log_opened(self) -> None:
        if not self._opened_logged:
            self._opened_logged = True
            self.log.info(
                "session {session_id} opened from {peer_host}:{peer_port} on {listener}",
                event="session_opened",
                endpoint=self.settings.listener.endpoint,
                **self._fields(),
            )
            if self._events:
                self._events.emit("session_opened", self.session_facts())

    # -- Twisted callbacks --------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._reading.attach(self.transport)
        # Behind a PROXY-protocol listener the real peer is known only after the header, which
        # arrives with the first data (TWISTED-NOTES gotcha 3): log the opening then.
        if not self.settings.listener.haproxy:
            self._log_opened()
        self._start_timer(self._limits.login_timeout, "login timeout")
        if self._tls_active:
            self._start_tls_timer()
        # RFC 1939 §4: the greeting. No APOP timestamp (APOP is not offered) and no software name or
        # version (nothing to fingerprint).
        if self.settings.listener.haproxy or self._admit():
            self._write(ok("POP3 proxy ready."))

    def _admit(self) -> bool:
        """Count this session against the global and per-address limits, or refuse it."""
        guard = self.settings.guard
        if guard is None or self._admitted_host is not None:
            return True
        host = str(self._fields()["peer_host"])
        refusal = guard.admit(host)
        if refusal is None:
            self._admitted_host = host
            return True
        self.log.warn("session {session_id} refused: {refusal}", refusal=refusal, **self._fields())
        self._write(TOO_MANY_SESSIONS)
        self._close(refusal)
        return False

    def _start_tls_timer(self) -> None:
        self._tls_timer = self.settings.clock.callLater(self._limits.tls_handshake_timeout, self._tls_timed_out)

    def _tls_timed_out(self) -> None:
        self._tls_timer = None
        self.log.info("session {session_id}: TLS handshake timed out", **self._fields())
        self._abort("TLS handshake timeout")

    def dataReceived(self, data: bytes) -> None:
        self._log_opened()
        if self.settings.listener.haproxy and self._admitted_host is None and not self._closing:
            # Behind the PROXY wrapper the real client address is known only now.
            if not self._admit():
                return
        if self._tls_active and not self._tls_reported:
            if self._tls_timer is not None and self._tls_timer.active():
                self._tls_timer.cancel()
            self._tls_timer = None
            # Application data arrived over TLS, so the handshake is complete: record its facts now
            # (behind the PROXY wrapper no handshake callback arrives, TWISTED-NOTES gotcha 4).
            self._tls_reported = True
            self._client_tls = tls_facts(self.transport)
            if self._events:
                self._events.emit("tls_started", self.session_facts())
        self._bytes_in += len(data)
        self._lines.feed(data)
        self._process_lines()
        self._check_buffer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._hung_up = True
        previous = self.state
        pending = self._pending_until_quit()
        if previous is State.TRANSACTION and pending is not None and self._upstream is not None:
            self._forward_after_hangup(self._upstream, pending)
        # A login in flight with a QUIT queued behind it is allowed to finish, to deliver that QUIT.
        self._quit_after_login = pending if previous is State.LOGGING_IN else None
        self._cancel_timer()
        for timer in (self._tls_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        guard = self.settings.guard
        if guard is not None:
            if self._admitted_host is not None:
                guard.left(self._admitted_host)
            if self._counted_user is not None:
                guard.user_left(self._counted_user)
        self.state = State.CLOSED
        if self._login is not None and self._quit_after_login is None:
            if previous is State.LOGGING_IN and self._attempt is not None:
                user, upstream_name = self._attempt
                self.log.info(
                    "session {session_id}: login for {user} at {upstream} abandoned: {reason}",
                    event="login", user=user, upstream=upstream_name, result="abandoned",
                    reason=self._end_reason, **self._fields(),
                )
            self._login.cancel()
        upstream = self._upstream
        if upstream is not None and not upstream.closed:
            if self._quit_sent:
                # RFC 1939 §6: the client asked for UPDATE; let the upstream finish it even though
                # nobody is listening any more, then close.
                upstream.on_lost = None
            else:
                # No QUIT from the client: no deletions. Drop the connection without QUIT.
                upstream.abort()
        self._log_opened()
        summary = self._log_ended(previous)
        if self._events:
            self._events.emit("session_closed", self.session_facts(), summary)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._on_closed(self)

    def shut_down(self) -> None:
        """End the session now (the proxy is stopping): no QUIT upstream unless the client sent one."""
        self._abort("shutdown")

    def start_draining(self) -> None:
        """The proxy is stopping. A session that is not logged in ends now (it holds nothing); a
        logged-in one finishes what it is doing and may still QUIT, but new commands get
        ``-ERR [SYS/TEMP]``."""
        self._draining = True
        if self.state in (State.AUTHORIZATION, State.SASL):
            self._write(SHUTTING_DOWN)
            self._close("shutdown")

    def when_closed(self) -> Deferred[None]:
        """A fresh Deferred that fires when the session is over (one per caller)."""
        waiter: Deferred[None] = Deferred()
        if self.state is State.CLOSED:
            waiter.callback(None)
        else:
            self._close_waiters.append(waiter)
        return waiter

    def _log_ended(self, state: State) -> dict[str, Any]:
        fields = self._fields()
        fields.update(
            event="session_ended",
            user=self.user,
            upstream=self._upstream_name,
            bytes_from_client=self._bytes_in,
            bytes_to_client=self._bytes_out,
            duration=round(self.settings.clock.seconds() - self._started, 3),
            ended=self._end_reason,
            authenticated=state is State.TRANSACTION or self._upstream is not None,
        )
        if self._tls_active and not self._client_tls:
            self._client_tls = tls_facts(self.transport)
        fields.update(_prefixed("client_", self._client_tls))
        if self._upstream is not None:
            fields.update(_prefixed("upstream_", self._upstream.tls_facts))
            fields.update(
                bytes_from_upstream=self._upstream.bytes_in,
                bytes_to_upstream=self._upstream.bytes_out,
            )
        self.log.info(
            "session {session_id} ended ({ended}): user {user}, upstream {upstream}, "
            "{bytes_from_client} bytes in, {bytes_to_client} bytes out, {duration}s",
            **fields,
        )
        return {key: value for key, value in fields.items() if key != "event"}

    # -- output -------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._hung_up:
            self._bytes_out += len(data)
            self.transport.write(data)

    def _close(self, reason: str) -> None:
        """Close after what was written has gone out. Over TLS that waits for the client's
        close_notify, which a client may never send: after ``CLOSE_TIMEOUT`` the connection is cut."""
        if not self._closing:
            self._closing = True
            self._end_reason = reason
            self.transport.loseConnection()
            self._close_timer = self.settings.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self._hung_up:
            self.transport.abortConnection()

    def _abort(self, reason: str) -> None:
        """Close at once, dropping anything not yet written (a graceful close may be under way)."""
        self._closing = True
        self._end_reason = reason
        if not self._hung_up:
            self.transport.abortConnection()

    # -- timers -------------------------------------------------------------------------------------

    def _start_timer(self, seconds: float, reason: str) -> None:
        self._cancel_timer()
        self._activity = self.settings.clock.seconds()
        self._timer = self.settings.clock.callLater(seconds, self._timed_out, seconds, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, seconds: float, reason: str) -> None:
        self._timer = None
        clock = self.settings.clock
        if self.state is State.TRANSACTION and len(self._answers):
            # An answer is still on its way to the client: that is not idleness as long as it moves.
            # A client that stops reading altogether is cut off after the same time without progress.
            if self._bytes_out != self._progress_mark:
                self._progress_mark = self._bytes_out
                self._start_timer(seconds, reason)
                return
            reason = "client stopped reading"
        remaining = self._activity + seconds - clock.seconds()
        if remaining > 0:
            # A command came since the timer was set (``_activity``, cheaper than a new timer per
            # command): wait for the rest.
            self._timer = clock.callLater(remaining, self._timed_out, seconds, reason)
            return
        self.log.info("session {session_id}: {reason} after {seconds}s", reason=reason, seconds=seconds, **self._fields())
        # RFC 1939 §3: an autologout timer expiring closes the connection without entering UPDATE,
        # so the upstream is dropped without QUIT.
        self._write(err(f"Autologout: {reason}.", "SYS/TEMP"))
        self._close(reason)

    # -- reading commands ---------------------------------------------------------------------------

    def _process_lines(self) -> None:
        """Handle buffered command lines until one of them needs to wait (a login in flight, too
        many answers outstanding) or the buffer is empty."""
        while self.state is not State.CLOSED and not self._closing and not self._holds:
            line = self._lines.next_line()
            if line is None:
                return
            if line is TOO_LONG:
                if self.state is State.SASL:
                    # RFC 5034 §4: this -ERR ends the AUTH exchange; what follows is a command again.
                    self.state = State.AUTHORIZATION
                    self._lines.max_length = MAX_COMMAND_LINE
                self._answer(err("Command line too long."))
                self._bad_command()
            elif self.state is State.SASL:
                assert isinstance(line, bytes)
                self._sasl_continuation(line)
            else:
                assert isinstance(line, bytes)
                self._command_line(line)

    def _hold_reading(self, reason: str) -> None:
        """Stop handling the client's commands for ``reason`` (they stay buffered).

        The socket itself keeps being read, so that a client that hangs up is noticed at once, until
        the buffer passes ``max_buffered`` (``[limits]``); only then is the transport paused.
        """
        self._holds.add(reason)
        self._check_buffer()

    def _check_buffer(self) -> None:
        if self._holds and len(self._lines) > self._limits.max_buffered:
            self._reading.hold("buffer full")
        elif len(self._lines) <= self._limits.max_buffered:
            self._reading.release("buffer full")

    def _release_reading(self, reason: str) -> None:
        self._holds.discard(reason)
        if not self._holds:
            self._process_lines()
        self._check_buffer()

    def _answer(self, data: bytes) -> None:
        """A local answer, in order with any relayed answers still outstanding."""
        self._answers.local(data)

    def _command_line(self, line: bytes) -> None:
        command = parse_command(line)
        if command is None:
            self._answer(err("Empty command."))
            self._bad_command()
            return
        if self.state is State.TRANSACTION:
            self._transaction(command, line)
        else:
            self._authorization(command)

    def _bad_command(self) -> None:
        """Count a command that could not be served; too many and the client is cut off."""
        self._bad_commands += 1
        if self._bad_commands >= self._limits.max_bad_commands:
            self.log.info("session {session_id}: too many bad commands; disconnecting", **self._fields())
            self._answer(err("Too many bad commands, goodbye."))
            self._close("too many bad commands")


def _prefixed(prefix: str, facts: dict[str, str]) -> dict[str, str]:
    return {prefix + key: value for key, value in facts.items()}
