"""The session machine: every decision of one proxied POP3 session, with no I/O and no Twisted.

Inputs are what happens to a session: the client's bytes, the upstream's bytes once logged in, the
result of a login, the hooks' verdicts, timers, TLS and flow events, hang-ups. Outputs are *effects*
(``Write``, ``Send``, ``Login``, ``PauseReading``, ``SetTimer``, ...) handed to an ``emit`` callable,
which the Twisted glue (``client.ClientProtocol``) carries out and tests record.

The machine decides everything about order, state and safety:

- answers reach the client in the order of its commands (RFC 2449 §6.6), whether the proxy gives
  them itself or relays them, and only one answer is ever being written at a time;
- no command goes upstream before the login, and only the canonical form of a message number does
  (``pop3.arguments``);
- a ``DELE`` or ``QUIT`` goes upstream only once every ``RETR``/``TOP`` answer before it has been
  written to the client in full, and after a hang-up neither goes while one was not (RFC 1939 §6:
  QUIT is what commits deletions, and a client that never got a message must not lose it);
- flow control: each reason to stop handling a leg is a named ``Hold`` kept here, and the sockets
  are paused only when a leg's unhandled input passes ``max_buffered`` or the other leg cannot take
  more output, never during a leg's own TLS handshake.

Run to completion: an input changes state and records what became possible; the outermost input then
*settles* (writes the answers now at the head, sends what may go upstream, handles buffered command
lines) until nothing more can move. Inputs that arrive while an effect is being carried out (a
transport pausing its producer in the middle of a write, a hook that answers at once) are nested:
they change state and leave the settling to the outer input. Nothing is ever called back half-way
through a decision.
"""

from __future__ import annotations

import enum
import functools
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ParamSpec

from zope.interface import implementer

from ..config import ListenerConfig, ProxyConfig, UpstreamConfig, in_networks
from ..hooks.interfaces import Delivery, Verdict
from ..hooks.registry import BuiltHook
from ..pop3 import capa, sasl
from ..pop3.arguments import BadArguments, Checked, check, takes_checked_arguments
from ..pop3.framing import MAX_STATUS_LINE, TOO_LONG, CommandLines, LineTooLong, ResponseReader, body_limit
from ..pop3.wire import (
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    Command,
    err,
    has_forbidden_bytes,
    is_ok,
    multiline,
    ok,
    parse_command,
)
from .answers import (
    Answer,
    AnswerTooLarge,
    Capabilities,
    Discarded,
    Hooked,
    Listing,
    Metered,
    Rewritten,
    processed_answer,
)
from .effects import (
    AbortClient,
    AbortUpstream,
    AskPenalty,
    AskUserSlot,
    CancelLogin,
    CancelTimer,
    CloseClient,
    CloseUpstream,
    Effect,
    Hold,
    Log,
    Login,
    LookUp,
    Notify,
    PauseReading,
    RecordFailure,
    ReleaseUser,
    ResumeReading,
    Retrieved,
    RunHooks,
    Send,
    SetTimer,
    StartTLS,
    Timer,
    Write,
)
from .interfaces import IFlowTarget, IUpstreamReceiver, Leg
from .mailbox import MailboxView, MessageCache
from .spool import Spool

# -- fixed answers ------------------------------------------------------------------------------------

# The one answer to every credential failure, whatever the upstream said and whether the user exists
# (RFC 3206 §4 [AUTH]; the same text for an unknown user and a wrong password).
AUTH_FAILED = err("Authentication failed.", "AUTH")
UPSTREAM_DOWN = err("Mail server unavailable, try again later.", "SYS/TEMP")
# The same wording Dovecot uses, so that clients and admins recognise it.
TLS_REQUIRED = err("Plaintext authentication disallowed on non-secure (SSL/TLS) connections.", "AUTH")
SHUTTING_DOWN = err("Server shutting down, try again later.", "SYS/TEMP")
USER_IN_USE = err("Too many sessions for this user.", "IN-USE")
GREETING = ok("POP3 proxy ready.")
NOT_DELETED = err("Message was not delivered, so it is not deleted.", "SYS/TEMP")
UNRECORDED = err("Mail cannot be recorded now, so it is not moved; try again later.", "SYS/TEMP")
_MOVES_MAIL = (b"RETR", b"TOP", b"DELE")

# RFC 3206 codes from the upstream that the client must see as they are: they tell it to wait or to
# stop retrying, which [AUTH] would not.
PASSED_LOGIN_CODES = frozenset({"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"})
_LOGIN_CODE_TEXT = {
    "IN-USE": "Mailbox is locked by another session.",
    "LOGIN-DELAY": "Logged in too recently, try again later.",
    "SYS/TEMP": "Mail server unavailable, try again later.",
    "SYS/PERM": "Mail server refused the login; do not retry.",
}

#: What TOP asks the upstream for when the proxy needs the whole message (RFC 1939 §7: "If the
#: number of lines requested by the POP3 client is greater than than the number of lines in the body,
#: then the POP3 server sends the entire message"); RETR would mark it seen on some servers.
WHOLE_MESSAGE_LINES = 99999999

_P = ParamSpec("_P")
_FETCHES = (b"RETR", b"TOP")
_COMMITTING = (b"DELE", b"QUIT")  # must wait until every fetch before them was delivered


@dataclass(frozen=True)
class HookPlan:
    """What the session needs to know about the configured hooks, for a user."""

    hooks: tuple[BuiltHook, ...] = ()
    #: whether session hooks want RETR/TOP deliveries reported (``message_delivered``)
    report_deliveries: bool = False
    #: whether session hooks want command results (``command_done``)
    report_commands: bool = False
    #: headers to record for each delivered message
    wanted_headers: frozenset[str] = frozenset()
    #: session hooks that want the mailbox's UIDLs (read at login with LIST)
    wants_listing: Callable[[str], bool] = lambda user: False
    #: whether mail may move for a user now: False while a hook that must record it cannot
    #: (``IGatekeeper``, the audit log with ``on_write_error = "refuse"``)
    mail_may_move: Callable[[str], bool] = lambda user: True

    def message_hooks(self, user: str) -> list[BuiltHook]:
        return [built for built in self.hooks if built.is_message_hook and built.config.applies_to(user)]


@dataclass(frozen=True)
class MachineSettings:
    """The session's fixed inputs (a reload changes them for new sessions only)."""

    listener: ListenerConfig
    config: ProxyConfig
    stls_available: bool
    now: Callable[[], float]
    plan: HookPlan = HookPlan()
    cache: MessageCache | None = None


class State(enum.Enum):
    AUTHORIZATION = enum.auto()  # RFC 1939 §4
    SASL = enum.auto()  # waiting for an AUTH PLAIN continuation line (RFC 5034 §4)
    LOGGING_IN = enum.auto()  # credentials given, upstream login in flight
    TRANSACTION = enum.auto()  # RFC 1939 §5: relaying
    CLOSED = enum.auto()


class _Entry:
    """One answer the client is owed, in command order.

    Local answers are ``data`` (or ``render``, made only when the entry reaches the head: a message
    from the processed cache is not copied until it can be written). Relayed ones have an
    ``answer`` and a ``line`` for the upstream.
    """

    __slots__ = ("answer", "close", "data", "done", "fetch", "line", "number", "quit", "render", "stream", "ticket",
                 "verb", "written")

    def __init__(self, *, data: bytes = b"", render: Callable[[], bytes] | None = None, answer: Answer | None = None,
                 line: bytes = b"", verb: bytes = b"", number: int | None = None, close: str | None = None) -> None:
        self.data = data
        self.render = render
        self.answer = answer
        self.line = line
        self.verb = verb
        self.number = number  # the message number the command names, if any
        self.fetch = number if verb in _FETCHES else None  # a RETR/TOP answer the client is owed
        self.close = close  # a graceful close queued behind the answers before it
        self.done = answer is None
        self.quit = verb == b"QUIT"
        self.ticket = 0  # hooks in progress
        self.stream: Generator[bytes, None, None] | None = None  # a spooled message's answer, written as the client takes it
        self.written = 0  # octets of a relayed or rendered answer written so far

    @property
    def local(self) -> bool:
        return self.answer is None


def _settles(method: Callable[_P, None]) -> Callable[_P, None]:
    """Make ``method`` an input of the machine: when the outermost input is done, settle.

    Inputs that arrive while an effect is carried out (a transport pausing its producer in the
    middle of a write, a hook that answers at once) only change state; the outer input settles.
    """

    @functools.wraps(method)
    def input_(*args: _P.args, **kwargs: _P.kwargs) -> None:
        machine = args[0]
        assert isinstance(machine, SessionMachine)
        machine._nesting += 1
        try:
            method(*args, **kwargs)
        finally:
            machine._nesting -= 1
        if machine._nesting == 0:
            machine._settle()

    return input_


@implementer(IUpstreamReceiver, IFlowTarget)
class SessionMachine:
    """One client session, from greeting to close. See the module docstring."""

    def __init__(self, settings: MachineSettings, emit: Callable[[Effect], None], client_host: str = "") -> None:
        self.settings = settings
        self._emit = emit
        self._limits = settings.config.limits
        self.client_host = client_host
        self.state = State.AUTHORIZATION
        self._lines = CommandLines(MAX_COMMAND_LINE)
        self.tls_active = settings.listener.tls == "implicit"
        self._handshaking = self.tls_active  # the client leg's TLS handshake is under way
        self._user: bytes | None = None
        #: the session's one identity once known (``RoutingConfig.normalise``), and its upstream
        self.user: str | None = None
        self.upstream_name: str | None = None
        self.attempt: tuple[str, str] | None = None  # (user, upstream) of the latest login attempt
        # The guard's answers (it may be in another process): they arrive as inputs and are acted on
        # when the machine settles.
        self._pending_login: tuple[str, bytes] | None = None  # waiting for the penalty or its timer
        self._looking_up: tuple[str, bytes] | None = None  # waiting for the routing lookup's answer
        self._denied_closes = False  # a lookup's denial without Auth-Wait ends the session (as nginx)
        self._penalty: float | None = None  # the answer to AskPenalty, not acted on yet
        self._landed: tuple[tuple[dict[int, int], dict[int, str]] | None] | None = None  # logged in, slot asked
        self._slot: bool | None = None  # the answer to AskUserSlot, not acted on yet
        self._counted_user: str | None = None
        self.login_failures = 0
        self._bad_commands = 0
        self.closing = False
        self.hung_up = False
        self.end_reason = "client closed"
        self._draining = False
        self.quit_requested = False
        self.bytes_in = 0
        self.bytes_out = 0
        # answers owed to the client, in command order; commands not sent yet; sent and unanswered
        self._queue: deque[_Entry] = deque()
        self._outgoing: deque[_Entry] = deque()
        self._inflight: deque[_Entry] = deque()
        # Named reasons to stop handling each leg's input, and whether each socket is paused.
        self._client_holds: set[Hold] = set()
        self._upstream_holds: set[Hold] = set()
        self._client_paused = False
        self._upstream_paused = False
        self._upstream_blocked = False  # the upstream's write buffer is full
        self._client_backed_up = False  # the client went away with its write buffer full
        self._upstream_attached = False
        self._upstream_pipelining = False
        self._upstream_capabilities: frozenset[bytes] = frozenset()
        self._reader = ResponseReader(_ReaderEvents(self), MAX_STATUS_LINE, self._limits.upstream_max_line)
        self.mailbox: MailboxView | None = None
        self._hooked: dict[int, _Entry] = {}
        self._tickets = 0
        self._after_hangup: list[Checked] | None = None  # commands through QUIT, sent when the login lands
        self._nesting = 0
        self._close_queued = False
        self._session_seconds = settings.config.limits.login_timeout
        self._activity = 0.0  # the client's last command (idle timeout)
        self._progress_mark = -1  # bytes_out at the last idle check while an answer was pending
        self._upstream_activity = 0.0
        self._upstream_timer = False

    # ==================================================================================================
    # inputs
    # ==================================================================================================

    @_settles
    def connected(self, greet: bool = True) -> None:
        """The client connected (and was admitted, with ``greet``)."""
        self._set_session_timer(self._limits.login_timeout)
        if self._handshaking:
            self._emit(SetTimer(Timer.TLS, self._limits.tls_handshake_timeout))
        if greet:
            # RFC 1939 §4: the greeting. No APOP timestamp (APOP is not offered) and no software
            # name or version (nothing to fingerprint).
            self._write(GREETING)

    @_settles
    def refuse(self, answer: bytes, reason: str) -> None:
        """Turn the client away before anything else (a session limit)."""
        self._write(answer)
        self._close(reason)

    @_settles
    def client_tls_ready(self) -> None:
        """The client leg's TLS handshake is complete (application data arrived over it)."""
        if self._handshaking:
            self._handshaking = False
            self._emit(CancelTimer(Timer.TLS))
            self._emit(Notify("tls_started", ()))

    @_settles
    def client_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.bytes_in += len(data)
        self._lines.feed(data)

    @_settles
    def output_blocked(self, leg: Leg, blocked: bool) -> None:
        """A leg's transport asks its producer to pause (its write buffer is full) or resume."""
        if leg is Leg.CLIENT:
            for side in (Leg.CLIENT, Leg.UPSTREAM):
                self._set_hold(side, Hold.CLIENT_OUTPUT, blocked)
        else:
            self._upstream_blocked = blocked

    @_settles
    def output_gone(self, leg: Leg) -> None:
        """A leg's transport is going away. If the client's write buffer was backed up, answers in
        it never reached the client: remembered for the hang-up's decision."""
        if leg is Leg.CLIENT:
            self._client_backed_up |= Hold.CLIENT_OUTPUT in self._client_holds
            self.output_blocked(leg, False)
        else:
            self._upstream_blocked = False

    def upstream_attached(self, capabilities: Sequence[bytes]) -> None:
        """The logged-in upstream connection now sends its bytes here (``upstream_data``)."""
        self._upstream_attached = True
        self._upstream_capabilities = capa.names(capabilities)
        self._upstream_pipelining = b"PIPELINING" in self._upstream_capabilities

    @_settles
    def logged_in(self, listing: tuple[dict[int, int], dict[int, str]] | None = None) -> None:
        """The upstream accepted the credentials (and, if asked, sent LIST and UIDL)."""
        assert self.attempt is not None
        if self.state is State.CLOSED:
            self._release(Leg.CLIENT, Hold.LOGIN)
            self._after_late_login()
            return
        if self._draining:
            self._release(Leg.CLIENT, Hold.LOGIN)
            self._emit(AbortUpstream("shutdown"))
            self._write(SHUTTING_DOWN)
            self._close("shutdown")
            return
        # The per-user cap counts logged-in sessions across the whole proxy: ask the guard, and
        # go on when it answers (``user_slot``). The client's commands wait behind Hold.LOGIN.
        self._landed = (listing,)
        self._emit(AskUserSlot(self.attempt[0]))

    @_settles
    def lookup_routed(self, upstream: UpstreamConfig, login_name: str | None, password: bytes | None) -> None:
        """The routing lookup's answer to ``LookUp``: log in at ``upstream`` (``login_name`` and
        ``password``, where given, replace what the client sent: nginx's ``Auth-User``/``Auth-Pass``)."""
        pending, self._looking_up = self._looking_up, None
        if pending is None or self.state is State.CLOSED:
            return
        user, sent = pending
        self._log_in_at(user, password if password is not None else sent, upstream.name, upstream, login_name)

    @_settles
    def lookup_denied(self, reason: str, wait: float | None) -> None:
        """The lookup service refused the login (``Auth-Status`` other than OK). With ``wait``
        (``Auth-Wait``) the answer comes after that many seconds and the session goes on; without
        it the session ends after the answer, as nginx's mail proxy does."""
        pending, self._looking_up = self._looking_up, None
        if pending is None or self.state is State.CLOSED:
            return
        user = pending[0]
        self._log("info", "session {session_id}: login for {user} refused by the lookup: {reason}",
                  event="auth", user=user, result="refused", code="AUTH", reason=reason[:200])
        self._notify_authenticated("refused", "AUTH", user, None)
        if wait is not None and wait > 0:
            self._emit(SetTimer(Timer.AUTH_WAIT, wait))  # Hold.LOGIN stays until it fires
            return
        self._denied(closes=wait is None)

    @_settles
    def lookup_failed(self, reason: str) -> None:
        """The lookup could not say (down, slow, a bad or disallowed answer): ``[SYS/TEMP]``."""
        pending, self._looking_up = self._looking_up, None
        if pending is None or self.state is State.CLOSED:
            return
        self._release(Leg.CLIENT, Hold.LOGIN)
        self.state = State.AUTHORIZATION
        self._log("warn", "session {session_id}: login for {user}: routing lookup failed: {reason}",
                  event="auth", user=pending[0], result="unavailable", code="SYS/TEMP", reason=reason)
        self._notify_authenticated("unavailable", "SYS/TEMP", pending[0], None)
        self._answer(UPSTREAM_DOWN)

    def _denied(self, closes: bool) -> None:
        self._release(Leg.CLIENT, Hold.LOGIN)
        self.state = State.AUTHORIZATION
        self._login_refused(AUTH_FAILED)
        if closes and not self._close_queued:
            self._queue_close("login refused by the lookup")

    @_settles
    def user_slot(self, granted: bool) -> None:
        """The guard's answer to ``AskUserSlot``."""
        if self._landed is not None:
            self._slot = granted

    @_settles
    def penalty_known(self, delay: float) -> None:
        """The guard's answer to ``AskPenalty``: seconds the pending login waits before it is tried."""
        if self._pending_login is not None:
            self._penalty = delay

    def _guard_answered(self) -> bool:
        """Act on the guard's answers that came in; True if one did."""
        if self._pending_login is not None and self._penalty is not None:
            delay, self._penalty = self._penalty, None
            if delay > 0:
                self._emit(SetTimer(Timer.PENALTY, delay))  # the login stays pending until it fires
            else:
                pending, self._pending_login = self._pending_login, None
                self._route(*pending)
            return True
        if self._landed is not None and self._slot is not None:
            (listing,), granted = self._landed, self._slot
            self._landed = self._slot = None
            self._release(Leg.CLIENT, Hold.LOGIN)
            self._admitted(listing, granted)
            return True
        return False

    def _admitted(self, listing: tuple[dict[int, int], dict[int, str]] | None, granted: bool) -> None:
        """The login landed and the guard answered whether the user may have one more session."""
        assert self.attempt is not None
        user, upstream = self.attempt
        if granted and (self.state is State.CLOSED or self._draining):
            self._emit(ReleaseUser(user))  # the session ended while the guard was asked
        if self.state is State.CLOSED:
            self._after_late_login()
            return
        if self._draining:
            self._emit(AbortUpstream("shutdown"))
            self._write(SHUTTING_DOWN)
            self._close("shutdown")
            return
        if not granted:
            self._log("warn", "session {session_id}: {user} has too many sessions; refused", user=user)
            self._emit(AbortUpstream("too many sessions for user"))  # no QUIT: nothing reaches UPDATE
            self._notify_authenticated("refused", "IN-USE", user, upstream)
            self._answer(USER_IN_USE)
            self._close("too many sessions for user")
            self.state = State.AUTHORIZATION
            return
        self._counted_user = user
        self.state = State.TRANSACTION
        self.user, self.upstream_name = user, upstream
        if listing is not None:
            sizes, uidls = listing
            self.mailbox = MailboxView(sizes, uidls, self.settings.plan.message_hooks(user), self.settings.cache)
        self._log("info", "session {session_id}: {user} logged in to {upstream}",
                  event="auth", user=user, upstream=upstream, result="ok",
                  **({"plaintext_from": True} if self.plaintext_exempt else {}))
        self._set_session_timer(self._limits.idle_timeout)
        self._notify_authenticated("ok", None, user, upstream)
        if self.mailbox is not None:
            self._emit(Notify("mailbox_listed", (MappingProxyType(self.mailbox.uidls),)))
        self._answer(ok("Logged in."))

    @_settles
    def login_failed(self, refused: bool, code: str | None, reason: str) -> None:
        """The login did not succeed: ``refused`` by the upstream (with its RFC 3206 ``code``), or
        the upstream was unavailable (``reason`` says why, for the log)."""
        self._release(Leg.CLIENT, Hold.LOGIN)
        if self.state is State.CLOSED:
            return
        self.state = State.AUTHORIZATION
        assert self.attempt is not None
        user, upstream = self.attempt
        if refused and code in PASSED_LOGIN_CODES:
            answer, code, result = err(_LOGIN_CODE_TEXT[code], code), code, "refused"
        elif refused:
            answer, code, result = AUTH_FAILED, "AUTH", "refused"
        else:
            answer, code, result = UPSTREAM_DOWN, "SYS/TEMP", "unavailable"
        self._log("info", "session {session_id}: login for {user} at {upstream} failed: {reason}",
                  event="auth", user=user, upstream=upstream, result=result, code=code,
                  reason=reason if result == "unavailable" else f"upstream said {code or 'no'}")
        self._notify_authenticated(result, code, user, upstream)
        if result == "refused":
            self._login_refused(answer)
        else:
            # [SYS/TEMP]: the upstream is down; not the client's fault, not a failed login.
            self._answer(answer)

    @_settles
    def upstream_data(self, data: bytes) -> None:
        self._upstream_activity = self.settings.now()
        self._reader.feed(data)

    @_settles
    def upstream_lost(self, reason: str) -> None:
        """The upstream connection ended."""
        self._upstream_attached = False
        self._cancel_upstream_timer()
        # Owed and not coming any more (a message already with the hooks will still be answered).
        due = [entry for entry in self._queue if not entry.done and not entry.ticket]
        self._inflight.clear()
        self._outgoing.clear()
        if self.state is State.CLOSED or self.closing:
            return
        head = self._queue[0] if self._queue else None
        if head is not None and head.answer is not None and head.answer.in_body:
            # In the middle of an answer: abort, so that the client sees a broken connection
            # rather than a complete-looking, truncated message (no terminator follows).
            self._abort("upstream lost mid-answer")
            return
        if due:
            # Between answers: the complete answers before the broken one still go out.
            self._drop_from(due[0])
            self._queue_close("upstream lost")
            return
        if not self.quit_requested:
            self._log("warn", "session {session_id}: upstream connection lost: {reason}", reason=reason)
        self._queue_close("upstream closed")

    @_settles
    def hooks_done(self, ticket: int, message: bytes | Spool | None, verdicts: tuple[Verdict, ...],
                   notes: list[str]) -> None:
        """The hooks' result for ``RunHooks(ticket)``: the message to deliver (bytes, or still in its
        spool file), or None (refused)."""
        entry = self._hooked.pop(ticket, None)
        if entry is None or self.hung_up or not self._queue or self._queue[0] is not entry:
            if isinstance(message, Spool):
                message.close()
            return
        answer = entry.answer
        assert isinstance(answer, Hooked)
        result = answer.finish(message, verdicts, notes)
        if isinstance(result, bytes):
            entry.written += len(result)
            self._write(result)
            self._finish(entry)
        else:
            entry.stream = result  # written by _flush, a piece at a time, as the client takes it

    @_settles
    def hooks_crashed(self, ticket: int) -> None:
        """The hook pipeline itself failed (a bug): the session cannot go on safely."""
        if self._hooked.pop(ticket, None) is not None:
            self._abort("hook pipeline crashed")

    @_settles
    def timer_fired(self, timer: Timer) -> None:
        if self.state is State.CLOSED and timer is not Timer.UPSTREAM:
            return
        if timer is Timer.SESSION:
            self._session_timer_fired()
        elif timer is Timer.TLS:
            if self._handshaking:
                self._log("info", "session {session_id}: TLS handshake timed out")
                self._abort("TLS handshake timeout")
        elif timer is Timer.PENALTY:
            pending, self._pending_login = self._pending_login, None
            if pending is not None:
                self._route(*pending)
        elif timer is Timer.AUTH_WAIT:
            if self.state is State.LOGGING_IN:
                self._denied(closes=False)
        elif timer is Timer.UPSTREAM:
            self._upstream_timer_fired()

    @_settles
    def start_draining(self) -> None:
        """The proxy is stopping. A session that is not logged in ends now (it holds nothing); a
        logged-in one finishes what it is doing and may still QUIT, but new commands get
        ``-ERR [SYS/TEMP]``."""
        self._draining = True
        if self.state in (State.AUTHORIZATION, State.SASL) and not self.closing:
            self._write(SHUTTING_DOWN)
            self._close("shutdown")

    @_settles
    def client_lost(self) -> None:
        """The client's connection is gone (whatever the reason)."""
        previous = self.state
        self.hung_up = True
        self.state = State.CLOSED
        if self._counted_user is not None:
            self._emit(ReleaseUser(self._counted_user))
            self._counted_user = None
        if self.mailbox is not None:
            self.mailbox.forget()
        pending = self._buffered_through_quit()
        if previous is State.LOGGING_IN:
            if pending is not None and not any(c.verb in _FETCHES for c in pending):
                # A QUIT behind a login in flight is still delivered (RFC 1939 §6): let the login
                # finish, then send what the client sent through its QUIT.
                self._after_hangup = pending
                return
            if self.attempt is not None:
                user, upstream = self.attempt
                self._log("info", "session {session_id}: login for {user} at {upstream} abandoned: {reason}",
                          event="auth", user=user, upstream=upstream, result="abandoned", reason=self.end_reason)
            self._pending_login = self._looking_up = None
            self._emit(CancelLogin())
            return
        if previous is not State.TRANSACTION or not self._upstream_attached:
            self._cancel_upstream_timer()
            return
        self._hang_up_in_transaction(pending)

    # ==================================================================================================
    # settling
    # ==================================================================================================

    def _settle(self) -> None:
        self._nesting += 1
        try:
            while self._step():
                pass
        finally:
            self._nesting -= 1
        self._check_unsolicited()
        self._sync_sockets()

    def _step(self) -> bool:
        """One round of what may move now; True if something did."""
        moved = self._guard_answered()
        moved = self._flush() or moved
        moved = self._send_ready() or moved
        if not self._upstream_holds and self._reader.paused and self._upstream_attached:
            self._reader.resume()
            moved = True
        return self._handle_one_line() or moved

    def _handle_one_line(self) -> bool:
        if self.state is State.CLOSED or self.closing or self._close_queued or self._client_holds:
            return False
        line = self._lines.next_line()
        if line is None:
            return False
        self._line(line)
        return True

    def _check_unsolicited(self) -> None:
        """Bytes left over once every answer asked for was delivered (a partial line included)."""
        if self._upstream_attached and not self._inflight and self._reader.pending and not self._reader.paused:
            self._unsolicited()

    def _sync_sockets(self) -> None:
        """Pause a socket only when its leg's unhandled input passed ``max_buffered``, or the other
        leg cannot take more output; never the client's during its TLS handshake (the handshake
        itself needs the socket read)."""
        backlog = len(self._lines) > self._limits.max_buffered and bool(self._client_holds)
        client = not self._handshaking and not self.hung_up and (backlog or self._upstream_blocked)
        queued = self._reader.pending > self._limits.max_buffered and bool(self._upstream_holds)
        upstream = self._upstream_attached and (Hold.CLIENT_OUTPUT in self._upstream_holds or queued)
        if client != self._client_paused:
            self._client_paused = client
            self._emit(PauseReading(Leg.CLIENT) if client else ResumeReading(Leg.CLIENT))
        if upstream != self._upstream_paused:
            self._upstream_paused = upstream
            self._emit(PauseReading(Leg.UPSTREAM) if upstream else ResumeReading(Leg.UPSTREAM))

    def _set_hold(self, leg: Leg, hold: Hold, on: bool) -> None:
        if on:
            (self._client_holds if leg is Leg.CLIENT else self._upstream_holds).add(hold)
            if leg is Leg.UPSTREAM:
                self._reader.pause()  # at once: the rest of this chunk waits too
        else:
            (self._client_holds if leg is Leg.CLIENT else self._upstream_holds).discard(hold)

    def _release(self, leg: Leg, hold: Hold) -> None:
        self._set_hold(leg, hold, False)

    @property
    def holds(self) -> dict[Leg, frozenset[Hold]]:
        """The current holds, for tests and logs."""
        return {Leg.CLIENT: frozenset(self._client_holds), Leg.UPSTREAM: frozenset(self._upstream_holds)}

    @property
    def paused(self) -> dict[Leg, bool]:
        return {Leg.CLIENT: self._client_paused, Leg.UPSTREAM: self._upstream_paused}

    # ==================================================================================================
    # output
    # ==================================================================================================

    def _write(self, data: bytes) -> None:
        if data and not self.hung_up:
            self.bytes_out += len(data)
            self._emit(Write(data))

    def _answer(self, data: bytes) -> None:
        """A local answer, in order with the answers still owed."""
        if not self._queue:
            self._write(data)
        else:
            self._queue.append(_Entry(data=data))
            self._after_queueing()

    def _close(self, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.end_reason = reason
            if not self.hung_up:
                self._emit(CloseClient(reason))

    def _queue_close(self, reason: str) -> None:
        """Close once the answers owed before now are written; read no further command."""
        self._close_queued = True
        if self._queue:
            self._queue.append(_Entry(close=reason))
        else:
            self._close(reason)

    def _drop_upstream(self, reason: str) -> None:
        """Stop believing the upstream: drop its connection without QUIT."""
        self._upstream_attached = False
        self._cancel_upstream_timer()
        self._reader.take_buffer()
        self._reader.pause()
        self._emit(AbortUpstream(reason))

    def _abort(self, reason: str) -> None:
        self.closing = True
        self.end_reason = reason
        if not self.hung_up:
            self._emit(AbortClient(reason))

    def _flush(self) -> bool:
        """Write the local answers that reached the head; drop finished entries."""
        moved = False
        while self._queue:
            head = self._queue[0]
            if head.stream is not None:
                if not self._pump(head):
                    break
                moved = True
                continue  # finishing it flushed what follows (_finish): look at the head again
            if not head.done:
                break
            if head.local:
                if head.render is not None:
                    if Hold.CLIENT_OUTPUT in self._client_holds:
                        break  # a whole message: only once the client has taken what it was given
                    data = head.render()
                    self._write(data)
                    if head.fetch is not None:
                        head.written = len(data)
                        self._retrieved(head)
                elif head.data:
                    self._write(head.data)
                elif head.close is not None:
                    self._queue.popleft()
                    self._close(head.close)
                    return True
            self._queue.popleft()
            moved = True
        if len(self._queue) < self._limits.max_pipelined and Hold.PIPELINE in self._client_holds:
            self._release(Leg.CLIENT, Hold.PIPELINE)
            moved = True
        return moved

    def _pump(self, entry: _Entry) -> bool:
        """Write ``entry``'s streamed answer while the client takes it: a piece, then the next only
        if the client's write buffer is not full. True once it is all written."""
        assert entry.stream is not None
        if self.hung_up:
            # Never written in full: it stays undelivered (nothing behind it is committed), and its
            # spool file goes now rather than being read for nobody.
            entry.stream.close()
            entry.stream = None
            return False
        while Hold.CLIENT_OUTPUT not in self._client_holds:
            piece = next(entry.stream, None)
            if piece is None:
                entry.stream = None
                self._finish(entry)
                return True
            if piece:
                entry.written += len(piece)
                self._write(piece)
        return False

    def _log(self, level: str, text: str, **fields: object) -> None:
        self._emit(Log(level, text, fields))

    def _notify_authenticated(self, result: str, code: str | None, user: str, upstream: str | None) -> None:
        self._emit(Notify("authenticated", (result, code), user=user, upstream=upstream))

    # ==================================================================================================
    # commands
    # ==================================================================================================

    def _line(self, line: bytes | LineTooLong) -> None:
        if line is TOO_LONG:
            if self.state is State.SASL:
                # RFC 5034 §4: this -ERR ends the AUTH exchange; what follows is a command again.
                self._end_sasl()
            self._answer(err("Command line too long."))
            self._bad_command()
            return
        assert isinstance(line, bytes)
        if self.state is State.SASL:
            self._sasl_continuation(line)
            return
        command = parse_command(line)
        if command is None:
            self._answer(err("Empty command."))
            self._bad_command()
        elif self.state is State.TRANSACTION:
            self._transaction(command, line)
        else:
            self._authorization(command)

    def _bad_command(self) -> None:
        """Count a command that could not be served; too many and the client is cut off."""
        self._bad_commands += 1
        if self._bad_commands >= self._limits.max_bad_commands:
            self._log("info", "session {session_id}: too many bad commands; disconnecting")
            self._answer(err("Too many bad commands, goodbye."))
            self._queue_close("too many bad commands")

    # -- AUTHORIZATION (RFC 1939 §4) -----------------------------------------------------------------------

    @property
    def _login_allowed(self) -> bool:
        """RFC 2595 §2.2 / ``require_tls``: no credentials in clear text where TLS is required,
        except from the legacy devices the listener names in ``plaintext_from``."""
        listener = self.settings.listener
        return (self.tls_active or not (listener.tls == "starttls" and listener.require_tls)
                or self.plaintext_exempt)

    @property
    def plaintext_exempt(self) -> bool:
        """Whether this client may log in without TLS only because ``plaintext_from`` names it (its
        address as the PROXY header gave it, behind ``haproxy:``): its logins are marked as such."""
        listener = self.settings.listener
        return (not self.tls_active and listener.require_tls and bool(listener.plaintext_from)
                and bool(in_networks(self.client_host, listener.plaintext_from)))

    def _authorization(self, command: Command) -> None:
        verb = command.verb
        if verb == b"CAPA":
            lines = capa.before_login(
                stls=self.settings.listener.tls == "starttls" and not self.tls_active,
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
        if self.settings.listener.tls != "starttls" or self.tls_active or not self.settings.stls_available:
            self._answer(err("STLS not available."))
            return
        self._answer(ok("Begin TLS negotiation."))
        # RFC 2595 §4 (and CVE-2011-0411): anything the client sent after STLS arrived in plain text
        # and must not be executed as if it had come over TLS. Throw it away.
        injected = self._lines.clear()
        if injected:
            self._log("warn", "session {session_id}: {count} bytes pipelined after STLS in plain text; discarded",
                      count=len(injected))
        self._emit(StartTLS())
        self.tls_active = self._handshaking = True
        self._emit(SetTimer(Timer.TLS, self._limits.tls_handshake_timeout))
        # RFC 2595 §4: forget what was learnt before TLS.
        self._user = None

    def _user_command(self, command: Command) -> None:
        if not self._login_allowed:
            self._answer(TLS_REQUIRED)
        elif not command.rest:
            self._answer(err("USER needs a user name."))
        elif has_forbidden_bytes(command.rest) or not _is_utf8(command.rest):
            # A name the upstream would see differently from the proxy (a NUL, a bare CR) or that is
            # no name at all (not UTF-8, RFC 6856 §3) is refused here, not at PASS.
            self._answer(err("Invalid user name.", "AUTH"))
            self._bad_command()
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
            # Not in RFC 5034, but Outlook-era clients send a bare AUTH to list mechanisms. Like CAPA,
            # it lists PLAIN only where a login is allowed now (RFC 2595 §4).
            self._answer(multiline(ok("Mechanisms follow"), [b"PLAIN"] if self._login_allowed else []))
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

    def _end_sasl(self) -> None:
        self.state = State.AUTHORIZATION
        self._lines.max_length = MAX_COMMAND_LINE

    def _sasl_continuation(self, line: bytes) -> None:
        self._end_sasl()
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
        # No command injection upstream through credentials (nginx PR #1620 class): CR, LF and NUL
        # never appear in what we send. Line splitting already removed LF; SASL may carry any byte.
        # Passwords are otherwise opaque octets (legacy clients send Latin-1).
        if has_forbidden_bytes(user_bytes) or has_forbidden_bytes(password):
            self._login_refused(err("Credentials contain forbidden characters.", "AUTH"))
            return
        if not _is_utf8(user_bytes):
            self._login_refused(AUTH_FAILED)
            return
        # One identity per session, decided here and used for routing, limits, hooks and logs.
        user = self.settings.config.routing.normalise(user_bytes.decode("utf-8"))
        self.attempt = None
        self.state = State.LOGGING_IN
        self._set_hold(Leg.CLIENT, Hold.LOGIN, True)
        # The failed-login penalty is paid *before* anything is decided, by right and wrong
        # passwords, known and unknown users alike: a delay on failures only would tell a guesser
        # that no answer within it means success.
        self._pending_login = (user, password)
        self._penalty = None
        self._emit(AskPenalty(self.client_host, self.login_failures))

    def _route(self, user: str, password: bytes) -> None:
        routing = self.settings.config.routing
        route = routing.route(user)
        if route is None and routing.lookup is not None:
            # The organisation's auth service decides (nginx's auth_http protocol); Hold.LOGIN keeps
            # the client's next commands waiting until it answers.
            self._looking_up = (user, password)
            self._emit(LookUp(user, password, attempt=self.login_failures + 1))
            return
        if route is None:
            self._release(Leg.CLIENT, Hold.LOGIN)
            self.state = State.AUTHORIZATION
            self._log("info", "session {session_id}: login for {user} refused: no route",
                      event="auth", user=user, result="refused", code="AUTH")
            self._notify_authenticated("refused", "AUTH", user, None)
            self._login_refused(AUTH_FAILED)
            return
        self._log_in_at(user, password, route)

    def _log_in_at(self, user: str, password: bytes, route: str, target: UpstreamConfig | None = None,
                   login_name: str | None = None) -> None:
        self.attempt = (user, route)
        plan = self.settings.plan
        self._emit(Login(user, password, route, listing=bool(plan.message_hooks(user)) or plan.wants_listing(user),
                         target=target, login_name=login_name))

    def _login_refused(self, answer: bytes) -> None:
        """A failed login: counted for this connection and address (the next login from either waits
        longer before it is tried), and after ``max_login_failures`` the connection is closed."""
        self.login_failures += 1
        self._emit(RecordFailure(self.client_host))
        self._answer(answer)
        if self.login_failures >= self._limits.max_login_failures:
            self._log("info", "session {session_id}: {count} failed logins; disconnecting", count=self.login_failures)
            self._queue_close("too many failed logins")

    # -- TRANSACTION (RFC 1939 §5) ---------------------------------------------------------------------------

    def _transaction(self, command: Command, line: bytes) -> None:
        self._activity = self.settings.now()
        verb = command.verb
        if has_forbidden_bytes(line):
            self._answer(err("Command contains forbidden characters."))
            self._bad_command()
            return
        if self._draining and verb != b"QUIT":
            self._answer(SHUTTING_DOWN)
            return
        if verb in (b"STLS", b"USER", b"PASS", b"AUTH", b"APOP"):
            self._answer(err("Not allowed after login."))
            self._bad_command()
            return
        if takes_checked_arguments(verb):
            try:
                checked = check(command)
            except BadArguments as error:
                self._answer(err(str(error)))
                self._bad_command()
                return
            upstream_line = checked.to_line()
        elif verb in (b"UTF8", b"LANG") and verb in self._upstream_capabilities:
            # RFC 6856: relayed only where the upstream announced them; their framing is known.
            checked, upstream_line = Checked(verb), command.to_line()
        else:
            self._answer(err("Unknown command."))
            self._bad_command()
            return
        if verb in _MOVES_MAIL and self.user is not None and not self.settings.plan.mail_may_move(self.user):
            # Nothing is fetched or deleted that the audit trail could not record.
            self._log("warn", "session {session_id}: {verb} refused: a hook cannot record it now",
                      verb=verb.decode("ascii"), event="unrecorded")
            self._answer(UNRECORDED)
            return
        if verb == b"QUIT":
            self.quit_requested = True
            self.end_reason = "quit"
        self._relay(checked, upstream_line, command)

    def _relay(self, checked: Checked, line: bytes, command: Command) -> None:
        verb, number, mailbox = checked.verb, checked.number, self.mailbox
        plan = self.settings.plan
        report = self._report if plan.report_deliveries else None
        if verb in _FETCHES and mailbox is not None and number is not None and number not in mailbox.deleted:
            if self._too_large(mailbox, number):
                return
            cached = mailbox.cached(number)
            if cached is not None:
                # Already processed (TOP then RETR): answered from the cache, made when it is due.
                command_name, lines = verb.decode(), checked.lines
                self._queue.append(_Entry(verb=verb, number=number, render=lambda: processed_answer(
                    command_name, number, cached, lines, mailbox, report, plan.wanted_headers)))
                self._after_queueing()
                return
        answer = self._answer_for(checked, report)
        if isinstance(answer, Hooked) and verb == b"TOP":
            line = b"TOP %d %d\r\n" % (number or 0, WHOLE_MESSAGE_LINES)
        if plan.report_commands:
            answer.label = (verb.decode("ascii", "replace"), command.rest.decode("utf-8", "replace"))
        entry = _Entry(answer=answer, line=line, verb=verb, number=number)
        self._queue.append(entry)
        self._outgoing.append(entry)
        self._after_queueing()

    def _too_large(self, mailbox: MailboxView, number: int) -> bool:
        """Message ``number`` is larger than a hook that must see it can take (``oversize =
        "refuse"``): answer -ERR [SYS/PERM] (RFC 3206 §4: retrying will not help; RFC 2449 §8 lets
        a code stand in any -ERR), and refuse its DELE too. A message larger than a hook with
        ``oversize = "pass"`` streams through unseen, and is logged."""
        refusing = mailbox.too_large_for(number)
        if refusing:
            names = ", ".join(built.config.name for built in refusing)
            self._log("warn", "session {session_id}: message {number} ({size} octets) refused: larger than "
                      "max_size of {hooks}", number=number, size=mailbox.sizes[number], hooks=names, event="oversize")
            mailbox.refused.add(number)
            self._answer(err(f"Message too large to be checked ({mailbox.sizes[number]} octets); it stays on the "
                             "server.", "SYS/PERM"))
            return True
        note = mailbox.not_scanned_note(number)
        if note is not None:
            self._log("info", "session {session_id}: message {number} {note}", number=number, note=note,
                      event="oversize")
        return False

    def _after_queueing(self) -> None:
        # Every answer owed counts, local ones included (RFC 2449 §6.6 lets a client pipeline; the
        # proxy bounds how far).
        if len(self._queue) >= self._limits.max_pipelined:
            self._set_hold(Leg.CLIENT, Hold.PIPELINE, True)

    def _answer_for(self, checked: Checked, report: Callable[[Delivery], None] | None) -> Answer:
        verb, number, mailbox = checked.verb, checked.number, self.mailbox
        if verb == b"CAPA":
            return Capabilities()
        if verb in _FETCHES and number is not None:
            if mailbox is not None and number not in mailbox.deleted and mailbox.scanned(number):
                return Hooked(verb.decode(), number, checked.lines, mailbox, report, self.settings.plan.wanted_headers,
                              Spool(self._limits.spool_above, self._limits.spool_dir or None))
            if report is not None:
                return Metered(verb.decode(), number, report, self.settings.plan.wanted_headers, mailbox)
            return Answer()
        if mailbox is None:
            return Answer()
        if verb == b"STAT":
            return Rewritten(mailbox.stat_line)
        if verb == b"LIST":
            return Rewritten(mailbox.list_line) if number is not None else Listing(mailbox)
        if verb == b"DELE" and number is not None:
            return Rewritten(lambda status: _noting(status, mailbox.deleted.add, number))
        if verb == b"RSET":
            return Rewritten(lambda status: _noting(status, lambda _: mailbox.reset(), 0))
        return Answer()

    def _report(self, delivery: Delivery) -> None:
        self._emit(Notify("message_delivered", (delivery,)))

    def _send_ready(self) -> bool:
        """Send what may go upstream now, in order."""
        moved = False
        while self._outgoing and self._upstream_attached:
            entry = self._outgoing[0]
            if entry.verb in _COMMITTING and self._undelivered_before(entry):
                break  # RFC 1939 §6: nothing is committed for a message the client may not have
            if not self._upstream_pipelining and (self._inflight or self._reader.pending):
                break  # RFC 2449 §6.6: one at a time unless the upstream announced PIPELINING
            self._outgoing.popleft()
            moved = True
            if entry.verb == b"DELE" and self.mailbox is not None and entry.number in self.mailbox.refused:
                # The client was not given this message: a client that deletes blindly after RETR
                # must not lose it.
                entry.answer, entry.data, entry.done = None, NOT_DELETED, True
                continue
            self._inflight.append(entry)
            self._emit(Send(entry.line))
            self._arm_upstream_timer()
        return moved

    def _undelivered_before(self, entry: _Entry) -> bool:
        """Whether a RETR or TOP answer queued before ``entry`` is not completely written yet (the
        queue is at most ``max_pipelined`` long)."""
        for earlier in self._queue:
            if earlier is entry:
                return False
            if earlier.fetch is not None:
                return True  # still queued, so not completely written
        return False

    # -- upstream answers (from the reader) ------------------------------------------------------------

    def _status(self, line: bytes) -> bool:
        if not self._inflight:
            self._unsolicited()
            return False
        if not (line.startswith(b"+OK") or line.startswith(b"-ERR")):
            # RFC 1939 §3: every status line starts with +OK or -ERR. Anything else means the stream
            # is not what the proxy thinks it is; relaying it would hand the client nonsense.
            self._log("warn", "upstream sent a line that is neither +OK nor -ERR; closing")
            self._drop_upstream("not a status line")
            return False
        entry = self._inflight[0]
        assert entry.answer is not None
        has_body = _expects_body(entry) and is_ok(line)
        if has_body:
            self._reader.body_limit = body_limit(line)
        self._deliver(entry, lambda answer: answer.status(line, has_body))
        if not has_body:
            self._complete()
        return has_body

    def _body(self, data: bytes) -> None:
        entry = self._inflight[0]
        self._deliver(entry, lambda answer: answer.body(data))

    def _complete(self) -> None:
        entry = self._inflight.popleft()
        answer = entry.answer
        assert answer is not None
        if self._deliver(entry, lambda answer: answer.end()) is None:
            return
        message = answer.wants_hooks if not self.hung_up else None
        if isinstance(answer, Hooked) and message is not None:
            self._tickets += 1
            entry.ticket = self._tickets
            self._hooked[entry.ticket] = entry
            self._set_hold(Leg.UPSTREAM, Hold.HOOK, True)
            self._emit(RunHooks(entry.ticket, entry.fetch or 0, message))
            return
        if isinstance(answer, Hooked) and answer.overflow and answer.succeeded:
            self._log("warn", "upstream sent more than twice the {size} octets it listed for message {number}; refused",
                      size=self.mailbox.sizes.get(entry.fetch or 0, 0) if self.mailbox else 0, number=entry.fetch)
            self._write(answer.refuse(["upstream: message larger than listed; refused"]))
        self._finish(entry)

    def _deliver(self, entry: _Entry, step: Callable[[Answer], bytes]) -> bytes | None:
        """Give ``entry``'s answer the next piece; write what it returns. None if the answer broke
        its bounds (the upstream is dropped)."""
        assert entry.answer is not None
        if self._queue and self._queue[0] is not entry and not self.hung_up:
            # Cannot happen while the holds do their job; refuse to write out of order if it does.
            self._log("warn", "internal error: an answer arrived before the answers owed ahead of it")
            self._abort("internal error")
            return None
        try:
            data = step(entry.answer)
        except AnswerTooLarge as error:
            self._log("warn", "upstream answer beyond its bound ({reason}); closing", reason=str(error))
            self._drop_upstream("answer too large")
            self._abort("upstream answer too large")
            return None
        entry.written += len(data)
        self._write(data)
        return data

    def _finish(self, entry: _Entry) -> None:
        """``entry``'s answer is completely written."""
        entry.done = True
        if entry.ticket:
            entry.ticket = 0
            self._release(Leg.UPSTREAM, Hold.HOOK)
        answer = entry.answer
        if answer is not None and answer.label is not None:
            command, argument = answer.label
            self._emit(Notify("command_done", (command, argument, answer.succeeded)))
        if entry.fetch is not None and answer is not None and answer.succeeded:
            self._retrieved(entry)
        if entry.quit:
            self._emit(CloseUpstream())
            if self.state is not State.CLOSED:
                self._queue_close("quit")
        # The answers owed behind this one may be written now, before the upstream's next answer
        # (which belongs to the next relayed entry, and must find it at the head).
        self._flush()

    def _retrieved(self, entry: _Entry) -> None:
        self._emit(Retrieved(entry.verb.decode("ascii"), entry.written))

    def _too_long(self) -> None:
        self._log("warn", "upstream sent a line or an answer beyond the limits (status line {status} octets, "
                  "body line {body_line}, body twice its announced size); closing",
                  status=MAX_STATUS_LINE, body_line=self._limits.upstream_max_line)
        self._drop_upstream("line too long")

    def _unsolicited(self) -> None:
        # Nothing was asked: an upstream that talks out of turn would shift every later answer onto
        # the wrong command, so it is not believed any further.
        self._log("warn", "upstream sent an unsolicited line; closing")
        self._drop_upstream("unsolicited line")

    # -- timers ---------------------------------------------------------------------------------------------

    def _set_session_timer(self, seconds: float) -> None:
        self._session_seconds = seconds
        self._activity = self.settings.now()
        self._emit(SetTimer(Timer.SESSION, seconds))

    def _session_timer_fired(self) -> None:
        seconds = self._session_seconds
        reason = "idle timeout" if self.state is State.TRANSACTION else "login timeout"
        if self.state is State.TRANSACTION and self._queue:
            # An answer is still on its way to the client: that is not idleness as long as it moves.
            # A client that stops reading altogether is cut off after the same time without progress.
            if self.bytes_out != self._progress_mark:
                self._progress_mark = self.bytes_out
                self._emit(SetTimer(Timer.SESSION, seconds))
                return
            reason = "client stopped reading"
        elif self.state is State.TRANSACTION:
            remaining = self._activity + seconds - self.settings.now()
            if remaining > 0:
                # A command came since the timer was set (cheaper than a new timer per command).
                self._emit(SetTimer(Timer.SESSION, remaining))
                return
        self._log("info", "session {session_id}: {reason} after {seconds}s", reason=reason, seconds=seconds)
        # RFC 1939 §3: an autologout timer expiring closes the connection without entering UPDATE,
        # so the upstream is dropped without QUIT.
        self._write(err(f"Autologout: {reason}.", "SYS/TEMP"))
        self._close(reason)

    def _arm_upstream_timer(self) -> None:
        """A command was sent: an answer is due within ``upstream_timeout`` of now, or of the
        upstream's last byte if more answers were already due. One timer serves many commands: it
        is not cancelled when the answers are in (a timer per command costs more than the check
        when it fires), and when it fires it looks at what is due then."""
        if len(self._inflight) == 1:
            self._upstream_activity = self.settings.now()
        if not self._upstream_timer:
            self._upstream_timer = True
            self._emit(SetTimer(Timer.UPSTREAM, self._limits.upstream_timeout))

    def _cancel_upstream_timer(self) -> None:
        if self._upstream_timer:
            self._upstream_timer = False
            self._emit(CancelTimer(Timer.UPSTREAM))

    def _upstream_timer_fired(self) -> None:
        self._upstream_timer = False
        if not self._inflight or not self._upstream_attached:
            return
        timeout = self._limits.upstream_timeout
        remaining = self._upstream_activity + timeout - self.settings.now()
        if self._upstream_holds or self._upstream_paused or remaining > 0:
            # Data came since, or the proxy is not reading (a slow client, a hook at work): the
            # silence is ours. Look again later.
            self._upstream_timer = True
            self._emit(SetTimer(Timer.UPSTREAM, remaining if remaining > 0 else timeout))
            return
        self._log("warn", "upstream sent nothing for {seconds}s while an answer was due; closing", seconds=timeout)
        self._drop_upstream("upstream silent")

    # -- hang-ups ---------------------------------------------------------------------------------------------

    def _buffered_through_quit(self) -> list[Checked] | None:
        """The buffered commands up to and including a QUIT (canonical, unanswerable ones left
        out), or None if the client sent no QUIT."""
        pending: list[Checked] = []
        while (line := self._lines.next_line()) is not None:
            if not isinstance(line, bytes) or has_forbidden_bytes(line):
                continue
            command = parse_command(line)
            if command is None or not takes_checked_arguments(command.verb):
                continue
            try:
                checked = check(command)
            except BadArguments:
                continue
            pending.append(checked)
            if command.verb == b"QUIT":
                return pending
        return None

    def _hang_up_in_transaction(self, pending: list[Checked] | None) -> None:
        """Whether what the client asked for before hanging up may still be done upstream.

        RFC 1939 §6: a client that sent QUIT asked for UPDATE, even if it did not wait for the
        answer, so its QUIT (and the commands before it) still go. Unless a RETR or TOP answer was
        not completely written to it, or could not be written because its write buffer was backed
        up: then nothing is committed (no DELE, no QUIT), the upstream connection is dropped, and
        the messages stay on the server for the next session.
        """
        quit_requested = self.quit_requested or (pending is not None)
        undelivered = (any(entry.fetch is not None for entry in self._queue)
                       or self._client_backed_up or Hold.CLIENT_OUTPUT in self._client_holds
                       or (pending is not None and any(c.verb in _FETCHES for c in pending)))
        if not quit_requested or undelivered:
            if quit_requested:
                self._log("info", "session {session_id}: client hung up with a message not completely delivered; "
                          "nothing committed upstream (no DELE, no QUIT)")
            self._outgoing.clear()
            self._drop_upstream("client hung up")
            return
        for entry in self._queue:
            if entry.answer is not None:
                entry.answer = Discarded()
        for checked in pending or ():
            self._queue_discarded(checked)
        self.end_reason = "quit after hang-up" if pending is not None else "quit"
        self.quit_requested = True

    def _queue_discarded(self, checked: Checked) -> None:
        if checked.verb == b"DELE" and self.mailbox is not None and checked.number in self.mailbox.refused:
            self._log("info", "session {session_id}: client hung up; DELE {number} not forwarded, the client "
                      "cannot have the message", number=checked.number)
            return
        entry = _Entry(answer=Discarded(), line=checked.to_line(), verb=checked.verb, number=checked.number)
        self._queue.append(entry)
        self._outgoing.append(entry)

    def _after_late_login(self) -> None:
        """The login landed after the client hung up with a QUIT behind it: deliver that QUIT."""
        pending, self._after_hangup = self._after_hangup, None
        if pending is None:
            self._emit(AbortUpstream("client gone"))
            return
        self.user, self.upstream_name = self.attempt or (None, None)
        for checked in pending:
            self._queue_discarded(checked)
        self.quit_requested = True
        self.end_reason = "quit after hang-up"

    def _drop_from(self, entry: _Entry) -> None:
        """Forget ``entry`` and every answer after it (the upstream that owed them is gone)."""
        while self._queue and self._queue[-1] is not entry:
            self._queue.pop()
        if self._queue:
            self._queue.pop()


class _ReaderEvents:
    """The machine as the response reader's handler (``framing.ResponseHandler``)."""

    def __init__(self, machine: SessionMachine) -> None:
        self._machine = machine

    def status_received(self, line: bytes) -> bool:
        return self._machine._status(line)

    def body_received(self, data: bytes) -> None:
        self._machine._body(data)

    def body_ended(self) -> None:
        self._machine._complete()

    def line_too_long(self) -> None:
        self._machine._too_long()


def _expects_body(entry: _Entry) -> bool:
    """RFC 1939 §3: which positive answers are multi-line, by command and arguments."""
    verb = entry.verb
    if verb in (b"RETR", b"TOP", b"CAPA"):
        return True
    if verb in (b"LIST", b"UIDL", b"LANG"):
        return entry.line.count(b" ") == 0
    return False


def _noting(status: bytes, note: Callable[[int], None], number: int) -> bytes:
    if is_ok(status):
        note(number)
    return status


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
