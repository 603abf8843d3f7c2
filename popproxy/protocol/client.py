"""The client leg: glue between one client connection, its upstream, and the session machine.

``ClientProtocol`` owns no decision. It turns what Twisted tells it (bytes, hang-ups, a full write
buffer, a login's result, a timer, a hook's verdict) into inputs of the session machine
(``machine.SessionMachine``), and carries out the machine's effects on the transports, the upstream
connector, the reactor's clock and the hook pipeline. What only a connection can know stays here:
admission against the proxy-wide limits, the PROXY-protocol header, TLS facts, logging with the
session's fields, and the session-hook events.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ..config import ListenerConfig, ProxyConfig
from ..hooks.events import SessionEvents
from ..hooks.interfaces import MessageContext, MessageFacts, SessionFacts
from ..hooks.pipeline import run_message_hooks
from ..hooks.registry import BuiltHook
from ..lookup import Denied, IRouteLookup, LookupAnswer, LookupFailed, LookupQuery, Routed
from ..metrics import IMetrics, NullMetrics
from ..pop3.wire import err
from ..proxyheader import HealthCheckAddress
from ..tls import ServerTLS, tls_facts
from .connector import ClientOrigin, LoggedIn, UpstreamConnector
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
from .flow import LegProducer
from .guard import ISessionGuard
from .interfaces import Leg, LegTransport
from .machine import (
    AUTH_FAILED,
    TLS_REQUIRED,
    UPSTREAM_DOWN,
    HookPlan,
    MachineSettings,
    SessionMachine,
    State,
)
from .mailbox import MessageCache
from .upstream import UpstreamProtocol, UpstreamRefused, UpstreamUnavailable, describe, set_no_delay

__all__ = ["AUTH_FAILED", "TLS_REQUIRED", "UPSTREAM_DOWN", "ClientProtocol", "SessionSettings", "State"]

TOO_MANY_SESSIONS = err("Too many sessions, try again later.", "SYS/TEMP")
# Seconds a closing connection may take to finish (TLS close_notify) before it is cut.
CLOSE_TIMEOUT = 5.0


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
    guard: ISessionGuard | None = None
    #: processed messages for TOP-then-RETR, shared by every session of the proxy
    cache: MessageCache | None = None
    #: the routing lookup service (``[routing] lookup``), if configured
    lookup: IRouteLookup | None = None
    metrics: IMetrics = field(default_factory=NullMetrics)
    plan: HookPlan = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", hook_plan(self.hooks))


def hook_plan(hooks: tuple[BuiltHook, ...]) -> HookPlan:
    """What sessions need to know about ``hooks``, worked out once per configuration."""
    events = SessionEvents(hooks)
    session_hooks = [built for built in hooks if built.is_session_hook]
    listing = [built for built in session_hooks if built.wants_listing]
    gatekeepers = [built for built in hooks if built.gatekeeper is not None]
    return HookPlan(
        hooks=hooks,
        report_deliveries=bool(events),
        report_commands=bool(events),
        wanted_headers=frozenset(events.wanted_headers),
        wants_listing=lambda user: any(built.config.applies_to(user) for built in listing),
        mail_may_move=lambda user: all(built.gatekeeper.accepting for built in gatekeepers  # type: ignore[union-attr]
                                       if built.config.applies_to(user)),
    )


def _same(before: tuple[object, ...], now: tuple[object, ...]) -> bool:
    """Names equal, and the same objects for the rest (see ``ClientProtocol.session_facts``)."""
    return before[:3] == now[:3] and all(a is b for a, b in zip(before[3:], now[3:], strict=True))


def peer_fields(address: IAddress | None) -> tuple[str, int]:
    """``(host, port)`` of a peer address, for logs and limits (a UNIX socket has its path)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name or b""
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)), 0
    return str(address), 0


class ClientProtocol(Protocol):
    """One client session. ``on_closed`` is called once, when the session is over."""

    log = Logger()
    transport: LegTransport  # type: ignore[assignment]  # set by makeConnection, never None after

    def __init__(self, settings: SessionSettings, on_closed: Callable[[ClientProtocol], None]) -> None:
        self.settings = settings
        self._on_closed = on_closed
        self.session_id = secrets.token_hex(6)
        limits = settings.config.limits
        self._limits = limits
        self.machine = SessionMachine(
            MachineSettings(
                listener=settings.listener,
                config=settings.config,
                stls_available=settings.server_tls is not None,
                now=settings.clock.seconds,
                plan=settings.plan,
                cache=settings.cache,
            ),
            self._carry_out,
        )
        self._events = SessionEvents(settings.hooks)
        self._upstream: UpstreamProtocol | None = None
        self._login: Deferred[LoggedIn] | None = None
        self._timers: dict[Timer, IDelayedCall] = {}
        self._close_timer: IDelayedCall | None = None
        self._header_timer: IDelayedCall | None = None
        self._started = settings.clock.seconds()
        self._close_waiters: list[Deferred[None]] = []
        self._opened_logged = False
        self._client_tls: dict[str, str] = {}
        self._admitted = False  # counted by the guard
        self._admitted_host: str | None = None  # counted by the guard under this address
        # While the guard is asked whether to admit (or to count the address a PROXY header gave),
        # the client's bytes wait here and its socket is paused: at most one read's worth.
        self._gate: list[bytes] | None = None
        self._gate_paused = False
        self._facts: tuple[tuple[object, ...], SessionFacts] | None = None  # the last session_facts()
        self._address_known = not settings.listener.haproxy
        self._lb_peer: IAddress | None = None
        #: a load balancer's health check (a PROXY header with the LOCAL command): no session is
        #: logged, audited or counted per address for it
        self._health_check = False
        self._closed = False

    @property
    def user(self) -> str | None:
        """The session's one normalised identity, once logged in."""
        return self.machine.user

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def started(self) -> float:
        """When the connection was accepted (the clock's seconds since the epoch)."""
        return self._started

    # -- log fields and facts ---------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        host, port = peer_fields(self.transport.getPeer() if self.transport is not None else None)
        return {"session_id": self.session_id, "client_host": host, "client_port": port, "listener": self.settings.listener.key}

    def session_facts(self, user: str | None = None, upstream: str | None = None) -> SessionFacts:
        """A snapshot of what is known about this session, for hooks. Made again only when
        something in it changed: session hooks get one per command and per message."""
        machine = self.machine
        attempt = machine.attempt
        user = user or machine.user or (attempt[0] if attempt else None)
        upstream = upstream or machine.upstream_name or (attempt[1] if attempt else None)
        upstream_tls = self._upstream.tls_facts if self._upstream is not None else None
        # The TLS facts are replaced, never changed in place: the same objects mean the same facts.
        made_of = (user, upstream, self._address_known, self._client_tls, upstream_tls, machine.plaintext_exempt)
        if self._facts is not None and _same(self._facts[0], made_of):
            return self._facts[1]
        fields = self._fields()
        facts = SessionFacts(
            session_id=self.session_id,
            client_host=str(fields["client_host"]),
            client_port=int(fields["client_port"] or 0),
            listener=self.settings.listener.key,
            user=user,
            upstream=upstream,
            client_tls=dict(self._client_tls),
            upstream_tls=dict(upstream_tls) if upstream_tls is not None else {},
            plaintext_exempt=machine.plaintext_exempt,
        )
        self._facts = (made_of, facts)
        return facts

    def _log_opened(self) -> None:
        if not self._opened_logged and not self._health_check:
            self._opened_logged = True
            self.settings.metrics.session_opened(self.settings.listener.key)
            self.log.info(
                "session {session_id} opened from {client_host}:{client_port} on {listener}",
                event="session_open",
                endpoint=self.settings.listener.endpoint,
                **self._fields(),
            )
            if self._events:
                self._events.emit("session_opened", self.session_facts())

    # -- Twisted callbacks ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        # Flow control from the first byte: answers the proxy writes itself are held back by a full
        # write buffer like relayed ones.
        self.transport.registerProducer(LegProducer(self.machine, Leg.CLIENT), True)
        if self.settings.listener.haproxy:
            # Behind a PROXY-protocol listener the real peer is known only once the header has come
            # (twisted.protocols.haproxy): count the connection now against max_sessions, its
            # address once known, and give the header ``proxy_header_timeout`` seconds.
            self._lb_peer = self.transport.getPeer()
            self._header_timer = self.settings.clock.callLater(self._limits.proxy_header_timeout, self._header_timed_out)
            self._admit(None, first=True)
        else:
            self._log_opened()
            host = self._fields()["client_host"]
            self.machine.client_host = host
            self._admit(host, first=True)

    def _admit(self, host: str | None, first: bool) -> None:
        """Ask the guard to count this session (``first``), or to count it under the client address
        a PROXY header gave; the session goes on when it answers."""
        guard = self.settings.guard
        if guard is None:
            self._admitted_answer(None, host, first)
            return
        if not first and not self._admitted:
            return
        self._gate = []
        answer = guard.admit(host) if first else guard.admit_address(host)  # type: ignore[arg-type]
        answer.addCallbacks(self._admitted_answer, self._guard_failed, callbackArgs=(host, first),
                            errbackArgs=(host, first))
        if self._gate is not None and not self._closed:  # not answered at once: hold the socket
            self._gate_paused = True
            self.transport.pauseProducing()

    def _admitted_answer(self, refusal: str | None, host: str | None, first: bool) -> None:
        guard = self.settings.guard
        if guard is not None and refusal is None:
            self._admitted, self._admitted_host = True, host
        gate, self._gate = self._gate or [], None
        if self._closed:  # gone while the guard was asked: nothing more to count
            if guard is not None and self._admitted:
                guard.left(self._admitted_host)
                self._admitted = False
            return
        if self._gate_paused:
            self._gate_paused = False
            self.transport.resumeProducing()
        if first:
            self.machine.connected(greet=refusal is None)
        if refusal is not None:
            self.settings.metrics.limit_hit("max_sessions_per_ip" if "address" in refusal else "max_sessions")
            self.log.warn("session {session_id} refused: {refusal}", refusal=refusal, **self._fields())
            self.machine.refuse(TOO_MANY_SESSIONS, refusal)
            return
        for data in gate:
            self.dataReceived(data)

    def _guard_failed(self, failure: Failure, host: str | None, first: bool) -> None:
        """The guard could not be asked (a worker that lost its parent): refuse, SYS/TEMP."""
        self.log.failure("session {session_id}: the session guard failed", failure, **self._fields())
        self._admitted_answer("session guard unavailable", host, first)

    def _address_arrived(self, data: bytes | None) -> None:
        """The PROXY header has been read: count the session under the real client address, then
        handle ``data``, what came after the header."""
        self._address_known = True
        self._cancel(self._header_timer)
        if isinstance(self.transport.getPeer(), HealthCheckAddress):
            self._health_checked(data)
            return
        self._log_opened()
        host = self._fields()["client_host"]
        self.machine.client_host = host
        self._gate = None
        self._admit(host, first=False)
        if data is not None:
            self.dataReceived(data)

    def _health_checked(self, data: bytes | None) -> None:
        """A PROXY header with the LOCAL command: the load balancer checking that we answer (HAProxy's
        ``check-send-proxy``). It got the greeting; it may not log in, and it is not a session."""
        self._health_check = True
        self.settings.metrics.health_check()
        self._gate = None
        if data:
            self.machine.refuse(err("Health checks cannot log in.", "SYS/PERM"), "health check")

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._address_known or self._closed:
            return
        if self.transport.getPeer() != self._lb_peer:
            self._address_arrived(None)  # a header and nothing after it yet: the client may be slow
            return
        self.log.info("session {session_id}: no PROXY header within {seconds}s; closing",
                      seconds=self._limits.proxy_header_timeout, **self._fields())
        self.machine.end_reason = "no PROXY header"
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._gate is not None:  # the guard has not answered yet
            self._gate.append(data)
            return
        if not self._address_known:
            self._address_arrived(data)
            return
        if self._health_check:
            return
        if self.machine.tls_active and not self._client_tls:
            # Application data arrived over TLS, so the handshake is complete: record its facts now
            # (behind the PROXY wrapper no handshake callback arrives).
            self._note_client_tls()
            if self._client_tls:
                self.machine.client_tls_ready()
        self.machine.client_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        previous = self.machine.state
        self.machine.client_lost()
        # The session's own timers end with it; the upstream's watchdog is the machine's to cancel
        # (a QUIT delivered after the hang-up still has an answer due).
        for name in [name for name in self._timers if name is not Timer.UPSTREAM]:
            self._cancel(self._timers.pop(name))
        for timer in (self._close_timer, self._header_timer):
            self._cancel(timer)
        guard = self.settings.guard
        if guard is not None and self._admitted and self._gate is None:  # else the answer releases it
            guard.left(self._admitted_host)
        if not self._address_known and isinstance(self.transport.getPeer(), HealthCheckAddress):
            self._health_check = True  # a LOCAL header and nothing after it: a TCP health check
            self.settings.metrics.health_check()
        if not self._health_check:
            self._log_opened()
            summary = self._log_ended(previous)
            if self._events:
                self._events.emit("session_closed", self.session_facts(), summary)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._on_closed(self)

    # -- the machine's effects --------------------------------------------------------------------------

    def _carry_out(self, effect: Effect) -> None:
        if isinstance(effect, Write):
            if not self._closed:
                self.transport.write(effect.data)
        elif isinstance(effect, Send):
            if self._upstream is not None:
                self._upstream.send(effect.line)
        elif isinstance(effect, (PauseReading, ResumeReading)):
            self._pause(effect.leg, isinstance(effect, PauseReading))
        elif isinstance(effect, SetTimer):
            self._cancel(self._timers.pop(effect.timer, None))
            self._timers[effect.timer] = self.settings.clock.callLater(effect.seconds, self._timer_fired, effect.timer)
        elif isinstance(effect, CancelTimer):
            self._cancel(self._timers.pop(effect.timer, None))
        elif isinstance(effect, Log):
            level = LogLevel.warn if effect.level == "warn" else LogLevel.info
            self.log.emit(level, effect.text, **{**self._fields(), **effect.fields})
        elif isinstance(effect, Notify):
            if effect.event == "authenticated":
                self.settings.metrics.login(str(effect.args[0]), self.machine.plaintext_exempt)
            if self._events:
                self._events.emit(effect.event, self.session_facts(effect.user, effect.upstream), *effect.args)
        elif isinstance(effect, Retrieved):
            self.settings.metrics.retrieved(effect.command, effect.octets)
        elif isinstance(effect, (AskPenalty, AskUserSlot, RecordFailure, ReleaseUser)):
            self._ask_guard(effect)
        elif isinstance(effect, RunHooks):
            self._run_hooks(effect)
        elif isinstance(effect, Login):
            self._start_login(effect)
        elif isinstance(effect, LookUp):
            self._look_up(effect)
        elif isinstance(effect, CancelLogin):
            if self._login is not None:
                self._login.cancel()
        elif isinstance(effect, StartTLS):
            self.transport.startTLS(self.settings.server_tls)
        elif isinstance(effect, CloseClient):
            self._close()
        elif isinstance(effect, AbortClient):
            if not self._closed:
                self.transport.abortConnection()
        elif isinstance(effect, CloseUpstream):
            if self._upstream is not None and not self._upstream.closed:
                self._upstream.transport.loseConnection()
        elif isinstance(effect, AbortUpstream):
            if self._upstream is not None:
                self._upstream.abort()
        else:  # pragma: no cover - every effect is handled above
            raise TypeError(f"unknown effect {effect!r}")

    def _ask_guard(self, effect: AskPenalty | AskUserSlot | RecordFailure | ReleaseUser) -> None:
        """The machine's questions to the proxy-wide guard; with none configured, nothing is limited."""
        guard = self.settings.guard
        if isinstance(effect, AskPenalty):
            if guard is None:
                self.machine.penalty_known(0.0)
            else:
                guard.failure_delay(effect.host, effect.failures).addCallbacks(
                    self.machine.penalty_known, self._guard_lost)
        elif isinstance(effect, AskUserSlot):
            if guard is None:
                self.machine.user_slot(True)
            else:
                guard.user_admit(effect.user).addCallbacks(self._user_slot, self._guard_lost)
        elif guard is None:
            return
        elif isinstance(effect, RecordFailure):
            guard.login_failed(effect.host)
        else:
            guard.user_left(effect.user)

    def _user_slot(self, granted: bool) -> None:
        if not granted:
            self.settings.metrics.limit_hit("max_sessions_per_user")
        self.machine.user_slot(granted)

    def _guard_lost(self, failure: Failure) -> None:
        self.log.failure("session {session_id}: the session guard failed", failure, **self._fields())
        if not self._closed:
            self.transport.abortConnection()

    def _pause(self, leg: Leg, pause: bool) -> None:
        if leg is Leg.CLIENT:
            if not self._closed:
                (self.transport.pauseProducing if pause else self.transport.resumeProducing)()
        elif self._upstream is not None:
            (self._upstream.pause_reading if pause else self._upstream.resume_reading)()

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self.machine.timer_fired(timer)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    def _close(self) -> None:
        """Close after what was written has gone out. Over TLS that waits for the client's
        close_notify, which a client may never send: after ``CLOSE_TIMEOUT`` the connection is cut."""
        if self._closed or self._close_timer is not None:
            return
        self.transport.loseConnection()
        self._close_timer = self.settings.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self._closed:
            self.transport.abortConnection()

    # -- logging in -------------------------------------------------------------------------------------

    def _look_up(self, effect: LookUp) -> None:
        lookup = self.settings.lookup
        assert lookup is not None, "LookUp without [routing] lookup"
        query = LookupQuery(effect.user, effect.password, self.machine.client_host, effect.attempt)
        lookup.lookup(query).addCallback(self._looked_up)

    def _looked_up(self, answer: LookupAnswer) -> None:
        metrics = self.settings.metrics
        if isinstance(answer, Routed):
            metrics.lookup_done("hit" if answer.cached else "miss")
            self.machine.lookup_routed(answer.upstream, answer.login_user, answer.password)
        elif isinstance(answer, Denied):
            metrics.lookup_done("denied")
            self.machine.lookup_denied(answer.reason, answer.wait)
        else:
            assert isinstance(answer, LookupFailed)
            metrics.lookup_done("failed")
            self.machine.lookup_failed(answer.reason)

    def _origin(self) -> ClientOrigin:
        """Where the client is and what it connected to, for ``forward_client``; the PROXY header's
        addresses behind ``haproxy:``. A host is "" where it has none (a UNIX socket)."""
        peer, local = self.transport.getPeer(), self.transport.getHost()
        host, port = peer_fields(peer) if isinstance(peer, (IPv4Address, IPv6Address)) else ("", 0)
        dest_host, dest_port = peer_fields(local) if isinstance(local, (IPv4Address, IPv6Address)) else ("", 0)
        return ClientOrigin(host, port, dest_host, dest_port, self.session_id)

    def _start_login(self, login: Login) -> None:
        self._note_client_tls()
        upstream = login.target or self.settings.config.upstreams[login.upstream]
        self._login = self.settings.connector.open(
            upstream,
            login.user,
            login.password,
            log_fields={"session_id": self.session_id, "upstream": upstream.name},
            listing_limit=self._limits.max_listing if login.listing else None,
            client=self._origin(),
            login_name=login.login_name,
        )
        self._login.addCallbacks(self._logged_in, self._login_failed)

    def _note_client_tls(self) -> None:
        """Record the client leg's TLS facts once its handshake is over (and count its version)."""
        if self.machine.tls_active and not self._client_tls:
            self._client_tls = tls_facts(self.transport)
            if self._client_tls:
                self.settings.metrics.tls_established("client", self._client_tls.get("tls_version", ""))

    def _logged_in(self, result: LoggedIn) -> None:
        self._login = None
        upstream = result.protocol
        self._upstream = upstream
        metrics, name = self.settings.metrics, self.machine.attempt[1] if self.machine.attempt else ""
        metrics.upstream_connected(name, result.connect_seconds)
        metrics.upstream_logged_in(name, result.login_seconds)
        if upstream.tls_facts:
            metrics.tls_established("upstream", upstream.tls_facts.get("tls_version", ""))
        upstream.transport.registerProducer(LegProducer(self.machine, Leg.UPSTREAM), True)
        leftover = upstream.attach(self.machine)
        self.machine.upstream_attached(upstream.capabilities)
        self.machine.logged_in(result.listing)
        if leftover:
            self.machine.upstream_data(leftover)

    def _login_failed(self, failure: Failure) -> None:
        self._login = None
        error = failure.value
        if isinstance(error, CancelledError):
            return
        if isinstance(error, UpstreamRefused):
            self.machine.login_failed(True, error.code, describe(failure))
        elif isinstance(error, UpstreamUnavailable):
            self.machine.login_failed(False, None, error.reason)
        else:
            self.machine.login_failed(False, None, describe(failure))

    # -- message hooks ----------------------------------------------------------------------------------

    def _run_hooks(self, effect: RunHooks) -> None:
        mailbox = self.machine.mailbox
        assert mailbox is not None
        number = effect.number
        facts = MessageFacts(session=self.session_facts(), number=number, uidl=mailbox.uidls.get(number),
                             upstream_size=mailbox.sizes[number])
        size = mailbox.reported_size(number) if mailbox.extra(number) else None
        running = ensureDeferred(run_message_hooks(mailbox.hooks_for(number), effect.message,
                                                   MessageContext(facts), self.settings.clock, size,
                                                   metrics=self.settings.metrics))

        def done(result: Any) -> None:
            self.machine.hooks_done(effect.ticket, result.message, result.verdicts, result.notes)

        def crashed(failure: Failure) -> None:
            self.log.failure("message hook pipeline crashed; session closed", failure, **self._fields())
            self.machine.hooks_crashed(effect.ticket)

        running.addCallback(done).addErrback(crashed)

    # -- the end ----------------------------------------------------------------------------------------

    def shut_down(self, reason: str = "shutdown") -> None:
        """End the session now (the proxy is stopping, or an admin ended it: ``reason``): the client's
        connection is cut, and the upstream's too, without QUIT unless the client sent one, so that
        nothing it did is committed (RFC 1939 §6: the UPDATE state only follows a QUIT)."""
        self.machine.end_reason = reason
        if not self._closed:
            self.transport.abortConnection()

    def start_draining(self) -> None:
        """The proxy is stopping: see ``SessionMachine.start_draining``."""
        self.machine.start_draining()

    def when_closed(self) -> Deferred[None]:
        """A fresh Deferred that fires when the session is over (one per caller)."""
        waiter: Deferred[None] = Deferred()
        if self._closed:
            waiter.callback(None)
        else:
            self._close_waiters.append(waiter)
        return waiter

    def _log_ended(self, state: State) -> dict[str, Any]:
        machine = self.machine
        fields = self._fields()
        fields.update(
            event="session_close",
            user=machine.user,
            upstream=machine.upstream_name,
            bytes_from_client=machine.bytes_in,
            bytes_to_client=machine.bytes_out,
            duration=round(self.settings.clock.seconds() - self._started, 3),
            ended=machine.end_reason,
            authenticated=state is State.TRANSACTION or self._upstream is not None,
        )
        self._note_client_tls()
        fields.update(_prefixed("client_", self._client_tls))
        if self._upstream is not None:
            fields.update(_prefixed("upstream_", self._upstream.tls_facts))
            fields.update(bytes_from_upstream=self._upstream.bytes_in,
                          bytes_to_upstream=self._upstream.bytes_out)
        self.log.info(
            "session {session_id} ended ({ended}): user {user}, upstream {upstream}, "
            "{bytes_from_client} bytes in, {bytes_to_client} bytes out, {duration}s",
            **fields,
        )
        metrics = self.settings.metrics
        metrics.session_closed(self.settings.listener.key, machine.end_reason, bool(fields["authenticated"]),
                               float(fields["duration"]))
        metrics.transferred(machine.bytes_in, machine.bytes_out, int(fields.get("bytes_from_upstream", 0)),
                            int(fields.get("bytes_to_upstream", 0)))
        if machine.end_reason == "too many failed logins":
            metrics.limit_hit("max_login_failures")
        return {key: value for key, value in fields.items() if key != "event"}


def _prefixed(prefix: str, facts: dict[str, str]) -> dict[str, str]:
    return {prefix + key: value for key, value in facts.items()}

