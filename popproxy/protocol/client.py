"""The client leg: one POP3 session as the client sees it.

Before login the proxy is the server: it greets, answers CAPA, STLS, USER, PASS, AUTH, NOOP and QUIT
itself, and opens no upstream connection until it holds credentials. After login it relays every
command it knows the framing of to the upstream chosen for the user and passes the answers back byte
for byte, in order, with back-pressure both ways.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted.internet.defer import ensureDeferred

from ..config import ListenerConfig, ProxyConfig
from ..hooks.events import SessionEvents
from ..hooks.interfaces import Delivery, SessionFacts
from ..hooks.registry import BuiltHook
from ..pop3 import capa, commands, sasl
from ..pop3.framing import TOO_LONG, CommandLines
from ..pop3.wire import (
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    Command,
    err,
    has_forbidden_bytes,
    multiline,
    ok,
    parse_command,
)
from ..tls import ServerTLS, tls_facts
from .connector import UpstreamConnector
from .flow import HoldProducer, PauseGate
from .guard import Guard
from .hooked import HookRuntime, TransactionHooks
from .mailbox import MailboxView, parse_listing
from .responses import AnswerQueue, CollectSink, FilteringSink, RelaySink, ResponseSink
from .upstream import (
    PASSED_LOGIN_CODES,
    UpstreamProtocol,
    UpstreamRefused,
    UpstreamUnavailable,
    describe,
    set_no_delay,
)

# The one answer to every credential failure, whatever the upstream said and whether the user exists
# (RFC 3206 §4 [AUTH]; the same text for an unknown user and a wrong password, so that nobody can
# tell them apart).
AUTH_FAILED = err("Authentication failed.", "AUTH")
UPSTREAM_DOWN = err("Mail server unavailable, try again later.", "SYS/TEMP")
# The same wording Dovecot uses, so that clients and admins recognise it.
TLS_REQUIRED = err("Plaintext authentication disallowed on non-secure (SSL/TLS) connections.", "AUTH")

_LOGIN_CODE_TEXT = {
    "IN-USE": "Mailbox is locked by another session.",
    "LOGIN-DELAY": "Logged in too recently, try again later.",
    "SYS/TEMP": "Mail server unavailable, try again later.",
    "SYS/PERM": "Mail server refused the login; do not retry.",
}

TOO_MANY_SESSIONS = err("Too many sessions, try again later.", "SYS/TEMP")
USER_IN_USE = err("Too many sessions for this user.", "IN-USE")
# Octets of unhandled client input kept while commands wait (a login in flight, a full pipeline)
# before the proxy stops reading the socket.
MAX_BUFFERED = 65536
# Seconds a closing connection may take to finish (TLS close_notify) before it is cut.
CLOSE_TIMEOUT = 5.0
SHUTTING_DOWN = err("Server shutting down, try again later.", "SYS/TEMP")


class State(enum.Enum):
    AUTHORIZATION = enum.auto()  # RFC 1939 §4
    SASL = enum.auto()  # waiting for an AUTH PLAIN continuation line (RFC 5034 §4)
    LOGGING_IN = enum.auto()  # credentials given, upstream login in flight
    TRANSACTION = enum.auto()  # RFC 1939 §5: relaying
    CLOSED = enum.auto()


@dataclass(frozen=True)
class SessionSettings:
    """Everything a session needs from the outside world, fixed when it starts (a reload changes the
    settings for new sessions only)."""

    listener: ListenerConfig
    config: ProxyConfig
    server_tls: ServerTLS | None
    connector: UpstreamConnector
    clock: IReactorTime
    hooks: tuple[BuiltHook, ...] = ()
    guard: Guard | None = None


class ClientProtocol(Protocol):
    """One client session. ``on_closed`` is called once, when the session is over."""

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
        self._draining = False
        self._activity = 0.0  # when the client last sent a command (idle timeout)
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
            user=self.user,
            upstream=self._upstream_name,
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
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        guard = self.settings.guard
        if guard is not None:
            if self._admitted_host is not None:
                guard.left(self._admitted_host)
            if self._counted_user is not None:
                guard.user_left(self._counted_user)
        self.state = State.CLOSED
        if self._login is not None and self._quit_after_login is None:
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

    def _pending_until_quit(self) -> list[Command] | None:
        """The buffered commands up to and including a QUIT, or None if the client sent no QUIT."""
        pending: list[Command] = []
        while (line := self._lines.next_line()) is not None:
            command = parse_command(line) if isinstance(line, bytes) and not has_forbidden_bytes(line) else None
            if command is None:
                continue
            pending.append(command)
            if command.verb == b"QUIT":
                return pending
        return None

    def _forward_after_hangup(self, upstream: UpstreamProtocol, pending: list[Command]) -> None:
        """Relay what the client sent before it hung up, through its QUIT.

        A client may send ``DELE 1`` and ``QUIT`` and close at once; its QUIT must still reach the
        upstream (RFC 1939 §6), with the commands before it, though nobody will read the answers.
        One exception keeps mail safe: a ``DELE`` of a message whose RETR or TOP the client could not
        have received (it was in the same unanswered batch, still with the hooks, or refused by
        them) is not forwarded.
        """
        unsure: set[bytes] = {c.args[0] for c in pending if c.verb in (b"RETR", b"TOP") and c.args}
        hooks = self._hooks
        if hooks is not None:
            unsure |= {str(n).encode() for n in hooks.in_flight}
            if hooks.runtime.mailbox is not None:
                unsure |= {str(n).encode() for n in hooks.runtime.mailbox.refused}
        capabilities = capa.names(upstream.capabilities)
        for command in pending:
            if command.verb == b"DELE" and command.args and command.args[0] in unsure:
                self.log.info("session {session_id}: client hung up; DELE {number} not forwarded, the "
                              "client cannot have the message", number=command.args[0].decode("ascii", "replace"),
                              **self._fields())
                continue
            if not commands.is_relayable(command, capabilities):
                continue
            quit_sink = command.verb == b"QUIT"
            upstream.request(command.to_line(), _Discard(upstream if quit_sink else None),
                             expects_body=commands.expects_body(command))
        self._quit_sent = True
        self._end_reason = "quit after hang-up"

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
            self.settings.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

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
            # An answer is still streaming to a slow client: that is not idleness.
            self._start_timer(seconds, reason)
            return
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
        the buffer passes ``MAX_BUFFERED``; only then is the transport paused.
        """
        self._holds.add(reason)
        self._check_buffer()

    def _check_buffer(self) -> None:
        if self._holds and len(self._lines) > MAX_BUFFERED:
            self._reading.hold("buffer full")
        elif len(self._lines) <= MAX_BUFFERED:
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
            return
        if self.state is State.TRANSACTION:
            self._transaction(command, line)
        else:
            self._authorization(command)

    # -- AUTHORIZATION state (RFC 1939 §4), answered by the proxy ---------------------------------------

    @property
    def _login_allowed(self) -> bool:
        """RFC 2595 §2.2 / `require_tls`: no credentials in clear text where TLS is required."""
        listener = self.settings.listener
        return self._tls_active or not (listener.tls == "starttls" and listener.require_tls)

    def _authorization(self, command: Command) -> None:
        verb = command.verb
        if verb == b"CAPA":
            lines = capa.before_login(
                stls=self.settings.listener.tls == "starttls" and not self._tls_active,
                user=self._login_allowed,
                sasl_plain=self._login_allowed,
            )
            self._answer(multiline(ok("Capability list follows"), lines))
        elif verb == b"STLS":
            self._stls()
        elif verb == b"USER":
            self._user_command(command)
        elif verb == b"PASS":
            self._pass_command(command)
        elif verb == b"AUTH":
            self._auth_command(command)
        elif verb == b"NOOP":
            self._answer(ok())
        elif verb == b"QUIT":
            # RFC 1939 §6: QUIT in AUTHORIZATION state ends the session, with no UPDATE.
            self._answer(ok("Bye."))
            self._close("quit")
        else:
            self._answer(err("Unknown command or not allowed before login."))
            self._bad_command()

    def _stls(self) -> None:
        # RFC 2595 §4: STLS only in AUTHORIZATION state, only where offered, only once.
        if self.settings.listener.tls != "starttls" or self._tls_active or self.settings.server_tls is None:
            self._answer(err("STLS not available."))
            return
        self._answer(ok("Begin TLS negotiation."))
        # RFC 2595 §4 (and CVE-2011-0411): anything the client sent after STLS arrived in plain text
        # and must not be executed as if it had come over TLS. Throw it away.
        injected = self._lines.clear()
        if injected:
            self.log.warn(
                "session {session_id}: {count} bytes pipelined after STLS in plain text; discarded",
                count=len(injected),
                **self._fields(),
            )
        self.transport.startTLS(self.settings.server_tls)
        self._tls_active = True
        self._start_tls_timer()
        # RFC 2595 §4: forget what was learnt before TLS.
        self._user = None

    def _user_command(self, command: Command) -> None:
        if not self._login_allowed:
            self._answer(TLS_REQUIRED)
        elif not command.rest:
            self._answer(err("USER needs a user name."))
        else:
            self._user = command.rest
            self._answer(ok())

    def _pass_command(self, command: Command) -> None:
        if not self._login_allowed:
            self._answer(TLS_REQUIRED)
        elif self._user is None:
            self._answer(err("Send USER first."))
        else:
            user, self._user = self._user, None
            self._log_in(user, command.rest)

    def _auth_command(self, command: Command) -> None:
        if not command.args:
            # Not in RFC 5034, but Outlook-era clients send a bare AUTH to list mechanisms.
            self._answer(multiline(ok("Mechanisms follow"), [b"PLAIN"]))
        elif not self._login_allowed:
            self._answer(TLS_REQUIRED)
        elif command.args[0].upper() != b"PLAIN" or len(command.args) > 2:
            self._answer(err("Unsupported authentication mechanism."))
        elif len(command.args) == 2:
            self._sasl_plain(command.args[1])
        else:
            # RFC 5034 §4: an empty challenge, then the client's response on a line of its own, which
            # may be longer than a command line.
            self.state = State.SASL
            self._lines.max_length = MAX_SASL_LINE
            self._answer(b"+ \r\n")

    def _sasl_continuation(self, line: bytes) -> None:
        self.state = State.AUTHORIZATION
        self._lines.max_length = MAX_COMMAND_LINE
        if line == b"*":
            # RFC 5034 §4: the client cancelled; the server rejects the AUTH command with -ERR.
            self._answer(err("Authentication cancelled."))
        else:
            self._sasl_plain(line)

    def _sasl_plain(self, response: bytes) -> None:
        try:
            credentials = sasl.decode_plain(response)
        except sasl.SaslError as error:
            self._login_refused(err(f"Invalid SASL PLAIN response: {error}.", "AUTH"))
            return
        # RFC 4616 §2: an authorization identity other than the user's own would ask the upstream
        # to act for someone else, which the proxy cannot pass on with USER/PASS.
        if credentials.authzid not in (b"", credentials.authcid):
            self._login_refused(err("Authorization identity not allowed.", "AUTH"))
            return
        self._log_in(credentials.authcid, credentials.password)

    # -- logging in upstream ------------------------------------------------------------------------

    def _log_in(self, user_bytes: bytes, password: bytes) -> None:
        self._login_started = self.settings.clock.seconds()
        if self._tls_active and not self._client_tls:
            # The handshake is over by now (a command arrived over TLS); read its facts while the
            # connection is certainly alive.
            self._client_tls = tls_facts(self.transport)
        # No command injection upstream through credentials (nginx PR #1620 class): CR, LF and NUL
        # never appear in what we send. Line splitting already removed LF; SASL may carry any byte.
        if has_forbidden_bytes(user_bytes) or has_forbidden_bytes(password):
            self._login_refused(err("Credentials contain forbidden characters.", "AUTH"))
            return
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self._login_refused(AUTH_FAILED)
            return
        config = self.settings.config
        route = config.routing.route(user)
        if route is None:
            self.log.info(
                "session {session_id}: login for {user} refused: no route",
                event="login",
                user=user,
                result="refused",
                code="AUTH",
                **self._fields(),
            )
            self._authenticated("refused", "AUTH", user)
            self._login_refused(AUTH_FAILED)
            return
        upstream = config.upstreams[route]
        self.state = State.LOGGING_IN
        self._hold_reading("login")
        self._login = self.settings.connector.open(
            upstream,
            user,
            password,
            on_lost=self._upstream_lost,
            log_fields={"session_id": self.session_id, "upstream": upstream.name},
        )
        self._login.addCallbacks(self._logged_in, self._login_failed, (user, upstream.name), None, (user, upstream.name))

    def _bad_command(self) -> None:
        """Count a command that could not be served; too many and the client is cut off."""
        self._bad_commands += 1
        if self._bad_commands >= self._limits.max_bad_commands:
            self.log.info("session {session_id}: too many bad commands; disconnecting", **self._fields())
            self._answer(err("Too many bad commands, goodbye."))
            self._close("too many bad commands")

    def _login_refused(self, answer: bytes) -> None:
        """A failed login: the answer comes after an escalating delay counted from the login command,
        the same for every kind of failure (so an unknown user and a wrong password look alike), and
        after ``max_login_failures`` the connection is closed."""
        self._login_failures += 1
        host = str(self._fields()["peer_host"])
        guard = self.settings.guard
        delay = 0.0
        if guard is not None:
            guard.login_failed(host)
            delay = guard.failure_delay(host, self._login_failures)
        wait = max(0.0, self._login_started + delay - self.settings.clock.seconds())
        last = self._login_failures >= self._limits.max_login_failures
        if wait <= 0:
            self._refuse_now(answer, last)
            return
        self._hold_reading("login penalty")
        self.settings.clock.callLater(wait, self._refuse_after_delay, answer, last)

    def _refuse_after_delay(self, answer: bytes, last: bool) -> None:
        if self.state is State.CLOSED:
            return
        self._refuse_now(answer, last)
        self._release_reading("login penalty")

    def _refuse_now(self, answer: bytes, last: bool) -> None:
        self._answer(answer)
        if last:
            self.log.info("session {session_id}: {count} failed logins; disconnecting",
                          count=self._login_failures, **self._fields())
            self._close("too many failed logins")

    def _authenticated(self, result: str, code: str | None, user: str | None = None,
                       upstream: str | None = None) -> None:
        if self._events:
            facts = dataclasses.replace(self.session_facts(), user=user or self.user, upstream=upstream or self._upstream_name)
            self._events.emit("authenticated", facts, result, code)

    def _logged_in(self, upstream: UpstreamProtocol, user: str, upstream_name: str) -> None:
        self._login = None
        if self.state is State.CLOSED:
            if self._quit_after_login is not None:
                self._forward_after_hangup(upstream, self._quit_after_login)
            else:
                upstream.abort()
            return
        message_hooks = [h for h in self.settings.hooks if h.is_message_hook and h.config.applies_to(user)]
        wants_uidls = any(getattr(h.hook, "wants_uidls", False) for h in self.settings.hooks
                          if h.is_session_hook and h.config.applies_to(user))
        if not (message_hooks or wants_uidls):
            self._start_transaction(upstream, user, upstream_name, None)
            return
        # Sizes must include what the hooks may add from the first answer on: learn them now.
        prepared = ensureDeferred(_mailbox_view(upstream, message_hooks))
        prepared.addCallbacks(
            lambda mailbox: self._start_transaction(upstream, user, upstream_name, mailbox),
            lambda failure: self._mailbox_failed(failure, upstream, user, upstream_name),
        )

    def _mailbox_failed(self, failure: Failure, upstream: UpstreamProtocol, user: str, upstream_name: str) -> None:
        upstream.abort()
        self._login_failed(Failure(UpstreamUnavailable(f"LIST/UIDL at login failed: {describe(failure)}")), user, upstream_name)

    def _start_transaction(self, upstream: UpstreamProtocol, user: str, upstream_name: str,
                           mailbox: MailboxView | None) -> None:
        if self.state is State.CLOSED:
            upstream.abort()
            return
        if self._draining:
            upstream.abort()
            self._answer(SHUTTING_DOWN)
            self._close("shutdown")
            return
        guard = self.settings.guard
        if guard is not None:
            if not guard.user_admit(user):
                self.log.warn("session {session_id}: {user} has too many sessions; refused", user=user, **self._fields())
                upstream.abort()  # no QUIT: nothing of this session may reach UPDATE state
                self._authenticated("refused", "IN-USE", user, upstream_name)
                self._answer(USER_IN_USE)
                self._close("too many sessions for user")
                return
            self._counted_user = user
        self.state = State.TRANSACTION
        self._upstream = upstream
        self._upstream_capabilities = capa.names(upstream.capabilities)
        self._upstream_name = upstream_name
        self.user = user
        if mailbox is not None or self._events:
            runtime = HookRuntime(
                clock=self.settings.clock,
                mailbox=mailbox,
                facts=self.session_facts,
                pause_upstream=upstream.pause_reading,
                resume_upstream=upstream.resume_reading,
                delivered=self._delivered if self._events else None,
                wanted_headers=frozenset(self._events.wanted_headers),
            )
            self._hooks = TransactionHooks(runtime, self._answers, self._write, self._upstream_broke)
        self.log.info(
            "session {session_id}: {user} logged in to {upstream}",
            event="login",
            user=user,
            upstream=upstream_name,
            result="ok",
            **self._fields(),
        )
        # Back-pressure both ways: a client that reads slowly pauses reading from the upstream, an
        # upstream that reads slowly pauses reading from the client.
        upstream_reading = PauseGate()
        upstream_reading.attach(upstream.transport)
        upstream.reading_gate = upstream_reading
        self.transport.registerProducer(
            HoldProducer(upstream_reading.hold, upstream_reading.release, "client busy"), True
        )
        upstream.transport.registerProducer(
            HoldProducer(self._reading.hold, self._reading.release, "upstream busy"), True
        )
        self._start_timer(self.settings.config.limits.idle_timeout, "idle timeout")
        self._authenticated("ok", None)
        self._answer(ok("Logged in."))
        self._release_reading("login")

    def _login_failed(self, failure: Failure, user: str, upstream_name: str) -> None:
        self._login = None
        if self.state is State.CLOSED:
            return
        self.state = State.AUTHORIZATION
        error = failure.value
        if isinstance(error, UpstreamRefused) and error.code in PASSED_LOGIN_CODES:
            answer, code, result = err(_LOGIN_CODE_TEXT[error.code], error.code), error.code, "refused"
        elif isinstance(error, UpstreamRefused):
            answer, code, result = AUTH_FAILED, "AUTH", "refused"
        else:
            answer, code, result = UPSTREAM_DOWN, "SYS/TEMP", "unavailable"
        reason = error.reason if isinstance(error, UpstreamUnavailable) else describe(failure)
        self.log.info(
            "session {session_id}: login for {user} at {upstream} failed: {reason}",
            event="login",
            user=user,
            upstream=upstream_name,
            result=result,
            code=code,
            reason=reason if result == "unavailable" else f"upstream said {error.code or 'no'}",
            **self._fields(),
        )
        self._authenticated(result, code, user, upstream_name)
        self._release_reading("login")
        if result == "refused":
            self._login_refused(answer)
        else:
            # [SYS/TEMP]: the upstream is down; not the client's fault, not a failed login.
            self._answer(answer)

    # -- TRANSACTION state (RFC 1939 §5), relayed ----------------------------------------------------

    def _transaction(self, command: Command, line: bytes) -> None:
        upstream = self._upstream
        assert upstream is not None
        self._activity = self.settings.clock.seconds()
        if has_forbidden_bytes(line):
            self._answer(err("Command contains forbidden characters."))
            return
        if self._draining and command.verb != b"QUIT":
            self._answer(SHUTTING_DOWN)
            return
        if command.verb in (b"STLS", b"USER", b"PASS", b"AUTH", b"APOP"):
            self._answer(err("Not allowed after login."))
            self._bad_command()
            return
        if not commands.is_relayable(command, self._upstream_capabilities):
            self._answer(err("Unknown command."))
            self._bad_command()
            return
        if command.verb == b"QUIT":
            self._quit_sent = True
            self._end_reason = "quit"
        hooks = self._hooks
        if hooks is not None and hooks.must_wait(command):
            self._waiting_command = (command, line)
            self._hold_reading("verdict pending")
            return
        if hooks is not None:
            local = hooks.local_answer(command)
            if local is not None:
                self._answer(local)
                return
        to_send = hooks.upstream_line(command) if hooks is not None else command.to_line()
        sink = self.sink_for(command)
        if isinstance(sink, RelaySink) and self._events:
            sink.label = (command.verb.decode("ascii", "replace"), command.rest.decode("utf-8", "replace"))
        upstream.request(to_send, sink, expects_body=commands.expects_body(command))
        if len(self._answers) >= self._limits.max_pipelined:
            self._hold_reading("pipeline full")

    def sink_for(self, command: Command) -> ResponseSink:
        """The sink that carries the answer to ``command`` back to the client.

        The one place to intercept answers to RETR, TOP, LIST and STAT (message hooks, size
        accounting): return another sink here. The sink must call ``AnswerQueue.finished`` when its
        answer has been written, in order.
        """
        if command.verb == b"CAPA":
            return FilteringSink(self._answers, self._write, self._upstream_broke, capa.after_login)
        if command.verb == b"QUIT":
            return _QuitSink(self._answers, self._write, self._upstream_broke, self._quit_answered)
        if self._hooks is not None:
            sink = self._hooks.sink_for(command)
            if sink is not None:
                return sink
        return RelaySink(self._answers, self._write, self._upstream_broke)

    def _answer_finished(self, sink: RelaySink) -> None:
        if sink.label is not None and self._events:
            command, argument = sink.label
            self._events.emit("command_done", self.session_facts(), command, argument, sink.succeeded)

    def _delivered(self, delivery: Delivery) -> None:
        self._events.emit("message_delivered", self.session_facts(), delivery)

    def _answers_idle(self) -> None:
        waiting, self._waiting_command = self._waiting_command, None
        if waiting is not None:
            self._holds.discard("verdict pending")
            self._transaction(*waiting)
        self._release_reading("pipeline full")

    def _quit_answered(self) -> None:
        if self._upstream is not None:
            self._upstream.transport.loseConnection()
        if self.state is not State.CLOSED:
            self._close("quit")

    def _upstream_broke(self) -> None:
        """The upstream went away in the middle of an answer: abort, so that the client sees a broken
        connection rather than a complete-looking, truncated message."""
        if self.state is not State.CLOSED:
            self._abort("upstream lost mid-answer")

    def _upstream_lost(self, reason: Failure) -> None:
        if self.state is State.CLOSED or self._closing:
            return
        if self._upstream is not None and not self._quit_sent:
            self.log.warn(
                "session {session_id}: upstream connection lost: {reason}",
                reason=describe(reason),
                **self._fields(),
            )
        self._close("upstream closed")


class _Discard:
    """The sink of a command relayed after the client hung up: nobody reads the answer. For QUIT,
    the upstream connection is closed once its answer is in."""

    def __init__(self, close: UpstreamProtocol | None = None) -> None:
        self._close = close

    def status(self, line: bytes, has_body: bool) -> None:
        pass

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        if self._close is not None:
            self._close.transport.loseConnection()

    def failed(self, reason: Failure) -> None:
        pass


class _QuitSink(RelaySink):
    """QUIT's answer: relayed, then both connections are closed."""

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[[], None], done: Callable[[], None]) -> None:
        super().__init__(queue, write, abort)
        self._done = done

    def end(self) -> None:
        super().end()
        self._done()

    def failed(self, reason: Failure) -> None:
        self._done()


async def _mailbox_view(upstream: UpstreamProtocol, hooks: list[BuiltHook]) -> MailboxView:
    """LIST and UIDL, once, at login: sizes for the reservations, UIDLs for the hooks' facts."""
    listing = CollectSink(limit=64 * 1024 * 1024)
    upstream.request(b"LIST\r\n", listing, expects_body=True)
    uidl = CollectSink(limit=64 * 1024 * 1024)
    upstream.request(b"UIDL\r\n", uidl, expects_body=True)
    status, lines = await listing.result
    if not status.startswith(b"+OK"):
        raise UpstreamUnavailable("LIST refused")
    sizes = {n: int(value) for n, value in parse_listing(lines).items() if value.isdigit()}
    status, lines = await uidl.result
    uidls = {n: value.decode("ascii", "replace") for n, value in parse_listing(lines).items()} if status.startswith(b"+OK") else {}
    return MailboxView(sizes, uidls, hooks)


def _prefixed(prefix: str, facts: dict[str, str]) -> dict[str, str]:
    return {prefix + key: value for key, value in facts.items()}
