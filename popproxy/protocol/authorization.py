"""AUTHORIZATION state (RFC 1939 §4) and logging in upstream.

Before login the proxy is the server: it answers CAPA, STLS, USER, PASS, AUTH, NOOP and QUIT itself
and opens no upstream connection until it holds credentials. Then it picks the upstream from
``[routing]``, logs in there, and either starts relaying or gives one of a few fixed answers, after
the escalating delay that makes guessing passwords slow.
"""

from __future__ import annotations

import dataclasses

from twisted.internet.defer import FirstError, ensureDeferred, gatherResults
from twisted.python.failure import Failure

from ..hooks.registry import BuiltHook
from ..pop3 import capa, sasl
from ..pop3.wire import (
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    Command,
    err,
    has_forbidden_bytes,
    multiline,
    ok,
)
from ..tls import tls_facts
from .flow import HoldProducer, PauseGate
from .hooked import HookRuntime, TransactionHooks
from .mailbox import MailboxView, parse_listing
from .responses import CollectSink
from .state import SHUTTING_DOWN, State
from .upstream import (
    PASSED_LOGIN_CODES,
    UpstreamProtocol,
    UpstreamRefused,
    UpstreamUnavailable,
    describe,
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

USER_IN_USE = err("Too many sessions for this user.", "IN-USE")

# The most octets of a LIST or UIDL answer read at login: about half a million messages. An upstream
# that sends more (or without end) fails the login instead of filling memory.
LISTING_LIMIT = 8 * 1024 * 1024


class Authorization:
    """The AUTHORIZATION-state half of ``ClientProtocol`` (a mixin: it shares the session's state)."""

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
        self._attempt = (user, upstream.name)
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
        self._login = prepared  # a client that goes away cancels this too
        prepared.addCallbacks(
            lambda mailbox: self._start_transaction(upstream, user, upstream_name, mailbox),
            lambda failure: self._mailbox_failed(failure, upstream, user, upstream_name),
        )

    def _mailbox_failed(self, failure: Failure, upstream: UpstreamProtocol, user: str, upstream_name: str) -> None:
        self._login = None
        upstream.abort()
        self._login_failed(Failure(UpstreamUnavailable(f"LIST/UIDL at login failed: {describe(failure)}")), user, upstream_name)

    def _start_transaction(self, upstream: UpstreamProtocol, user: str, upstream_name: str,
                           mailbox: MailboxView | None) -> None:
        self._login = None
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
            # Counted case-insensitively: domains route that way, and servers such as Dovecot
            # (auth_username_format %Lu) map names differing in case to one mailbox.
            if not guard.user_admit(user.casefold()):
                self.log.warn("session {session_id}: {user} has too many sessions; refused", user=user, **self._fields())
                upstream.abort()  # no QUIT: nothing of this session may reach UPDATE state
                self._authenticated("refused", "IN-USE", user, upstream_name)
                self._answer(USER_IN_USE)
                self._close("too many sessions for user")
                return
            self._counted_user = user.casefold()
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
        # Answer (or hold the answer back for the penalty) before reading pipelined commands again:
        # their answers must follow this one (RFC 2449 §6.6), and a pipelined guess must wait.
        if result == "refused":
            self._login_refused(answer)
        else:
            # [SYS/TEMP]: the upstream is down; not the client's fault, not a failed login.
            self._answer(answer)
        self._release_reading("login")


async def _mailbox_view(upstream: UpstreamProtocol, hooks: list[BuiltHook]) -> MailboxView:
    """LIST and UIDL, once, at login: sizes for the reservations, UIDLs for the hooks' facts."""
    listing = CollectSink(limit=LISTING_LIMIT)
    upstream.request(b"LIST\r\n", listing, expects_body=True)
    uidl = CollectSink(limit=LISTING_LIMIT)
    upstream.request(b"UIDL\r\n", uidl, expects_body=True)
    # Both answers are awaited together, so that neither is left failing unobserved.
    try:
        (status, lines), (uidl_status, uidl_lines) = await gatherResults([listing.result, uidl.result], consumeErrors=True)
    except FirstError as error:
        raise error.subFailure.value from None
    if not status.startswith(b"+OK"):
        raise UpstreamUnavailable("LIST refused")
    sizes = {n: int(value) for n, value in parse_listing(lines).items() if value.isdigit()}
    status, lines = uidl_status, uidl_lines
    uidls = {n: value.decode("ascii", "replace") for n, value in parse_listing(lines).items()} if status.startswith(b"+OK") else {}
    return MailboxView(sizes, uidls, hooks)
