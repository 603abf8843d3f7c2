"""Test doubles shipped with popproxy: a scriptable fake POP3 upstream and an in-memory proxy harness.

Public on purpose (like ``treq.testing``): hook authors can drive a whole client ↔ proxy ↔ upstream
session in memory, with no sockets and no real time, using the same pieces as popproxy's own tests.
The fake upstream also runs on real sockets, for TLS tests that need a real handshake.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from .config import Address, ProxyConfig, UpstreamConfig
from .hooks.registry import BuiltHook, build_hooks, start_hooks
from .lookup import IRouteLookup
from .metrics import NULL_METRICS, IMetrics
from .pop3.framing import CommandLines
from .pop3.wire import CRLF, err, multiline, ok, parse_command, stuff_body
from .protocol.client import ClientProtocol, SessionSettings
from .protocol.connector import UpstreamConnector
from .protocol.factory import ProxyFactory
from .protocol.guard import Guard, LocalGuard
from .protocol.interfaces import LegTransport
from .protocol.mailbox import MessageCache


@dataclass
class FakeMailbox:
    """One user's mail on the fake upstream. ``messages`` are as a client receives them (CRLF,
    un-stuffed); a message deleted and committed by QUIT becomes None, keeping numbering stable
    the way a real server's next session would not: tests look at ``remaining()``."""

    password: bytes
    messages: list[bytes | None] = field(default_factory=list)

    def remaining(self) -> list[bytes]:
        return [m for m in self.messages if m is not None]


class FakePOP3Server(Protocol):
    """A small, strict POP3 server (RFC 1939 with CAPA, STLS, PIPELINING) that records every line.

    Behaviour is set on its ``FakePOP3Factory``.
    """

    transport: LegTransport  # type: ignore[assignment]  # set by makeConnection

    def __init__(self, factory: FakePOP3Factory) -> None:
        self.factory = factory
        self._lines = CommandLines(1024)
        self._user_name: bytes | None = None
        self._mailbox: FakeMailbox | None = None
        self._visible: list[int] = []
        self._deleted: set[int] = set()
        self._tls = False

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        self._lines.feed(data)
        while (line := self._lines.next_line()) is not None:
            if not isinstance(line, bytes):
                self.transport.write(err("line too long"))
                continue
            self.factory.received.append(line)
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        command = parse_command(line)
        if command is None:
            self.transport.write(err("empty"))
            return
        if command.verb in self.factory.stall:
            return
        handler = getattr(self, "_" + command.verb.decode("ascii", "replace").lower(), None)
        if handler is None:
            self.transport.write(err("unknown command"))
            return
        self.transport.write(handler(command.args, command.rest))

    # -- AUTHORIZATION

    def _capa(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        lines = [b"USER", b"TOP", b"UIDL", b"RESP-CODES", b"IMPLEMENTATION FakePOP3 1.0", b"SASL PLAIN"]
        if self.factory.pipelining:
            lines.append(b"PIPELINING")
        if self.factory.tls is not None and self.factory.offer_stls and not self._tls:
            lines.append(b"STLS")
        return multiline(ok("Capability list follows"), lines)

    def _stls(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self.factory.tls is None or self._tls or self._mailbox is not None or not self.factory.accept_stls:
            return err("STLS not available")
        self._lines.clear()
        self.transport.write(ok("Begin TLS") + self.factory.inject_after_stls)
        self.transport.startTLS(self.factory.tls)
        self._tls = True
        return b""

    def _user(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self._mailbox is not None:
            return err("already logged in")
        self._user_name = rest
        return ok()

    def _pass(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        mailbox = self.factory.mailboxes.get(self._user_name or b"")
        answer: bytes | None = self.factory.login_answer
        if answer is not None:
            return answer
        if mailbox is None or mailbox.password != rest:
            return err("Authentication failed", "AUTH")
        self._mailbox = mailbox
        self._visible = [i for i, m in enumerate(mailbox.messages) if m is not None]
        return ok("Logged in")

    def _quit(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self._mailbox is not None:
            for n in self._deleted:
                self._mailbox.messages[self._visible[n - 1]] = None
        self.transport.write(ok("Bye"))
        self.transport.loseConnection()
        return b""

    def _noop(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        return ok()

    # -- TRANSACTION

    def _message(self, args: tuple[bytes, ...]) -> tuple[int, bytes] | bytes:
        if self._mailbox is None:
            return err("not logged in")
        try:
            n = int(args[0])
            if not 1 <= n <= len(self._visible) or n in self._deleted:
                raise IndexError
        except (ValueError, IndexError):
            return err("no such message")
        message = self._mailbox.messages[self._visible[n - 1]]
        assert message is not None
        return n, message

    def _listing(self, args: tuple[bytes, ...], value: Callable[[int, bytes], bytes]) -> bytes:
        if args:
            found = self._message(args)
            if isinstance(found, bytes):
                return found
            return ok(f"{found[0]} ".encode().decode() + value(*found).decode())
        assert self._mailbox is not None
        lines = []
        for n in range(1, len(self._visible) + 1):
            if n not in self._deleted:
                message = self._mailbox.messages[self._visible[n - 1]]
                assert message is not None
                lines.append(b"%d " % n + value(n, message))
        return multiline(ok(), lines)

    def _stat(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self._mailbox is None:
            return err("not logged in")
        sizes = [len(self._mailbox.messages[self._visible[n - 1]] or b"")
                 for n in range(1, len(self._visible) + 1) if n not in self._deleted]
        return ok(f"{len(sizes)} {sum(sizes)}")

    def _list(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self._mailbox is None:
            return err("not logged in")
        return self._listing(args, lambda n, m: b"%d" % len(m))

    def _uidl(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        if self._mailbox is None:
            return err("not logged in")
        return self._listing(args, lambda n, m: hashlib.sha1(m).hexdigest()[:16].encode())

    def _retr(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        found = self._message(args)
        if isinstance(found, bytes):
            return found
        _, message = found
        answer = ok(f"{len(message)} octets") + wire_body(message)
        if self.factory.cut_retr_after is not None:
            # Fault injection: the upstream dies part-way through the message.
            self.transport.write(answer[: self.factory.cut_retr_after])
            self.transport.abortConnection()
            return b""
        return answer

    def _top(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        found = self._message(args)
        if isinstance(found, bytes):
            return found
        try:
            count = int(args[1])
        except (IndexError, ValueError):
            return err("TOP needs a line count")
        headers, _, body = found[1].partition(CRLF + CRLF)
        lines = body.split(CRLF)[:-1][:count]
        return ok() + wire_body(headers + CRLF + CRLF + b"".join(line + CRLF for line in lines))

    def _dele(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        found = self._message(args)
        if isinstance(found, bytes):
            return found
        self._deleted.add(found[0])
        return ok("deleted")

    def _rset(self, args: tuple[bytes, ...], rest: bytes) -> bytes:
        self._deleted.clear()
        return ok()


def wire_body(message: bytes) -> bytes:
    """A message (CRLF line endings, ending in CRLF) as a multi-line body: stuffed, terminated."""
    return stuff_body(message)


class FakePOP3Factory(Factory):
    """Makes ``FakePOP3Server`` connections that share mailboxes and a record of what was received.

    :ivar received: every command line any connection received, in order.
    :ivar connections: how many connections were made.
    """

    noisy = False

    def __init__(
        self,
        mailboxes: dict[bytes, FakeMailbox] | None = None,
        *,
        pipelining: bool = True,
        tls: IOpenSSLServerConnectionCreator | None = None,
        offer_stls: bool = True,
        accept_stls: bool = True,
        inject_after_stls: bytes = b"",
        greeting: bytes = b"+OK FakePOP3 ready <1.2@fake>\r\n",
        login_answer: bytes | None = None,
        cut_retr_after: int | None = None,
        stall: frozenset[bytes] = frozenset(),
    ) -> None:
        self.mailboxes = mailboxes if mailboxes is not None else {}
        self.pipelining = pipelining
        self.tls = tls
        self.offer_stls = offer_stls
        self.accept_stls = accept_stls
        self.inject_after_stls = inject_after_stls
        self.greeting = greeting
        self.login_answer = login_answer
        self.cut_retr_after = cut_retr_after
        #: commands (upper-case keywords) this upstream receives and never answers
        self.stall = stall
        self.received: list[bytes] = []
        self.connections = 0

    def add_user(self, name: str, password: str, messages: Iterable[bytes]) -> FakeMailbox:
        mailbox = FakeMailbox(password.encode(), list(messages))
        self.mailboxes[name.encode()] = mailbox
        return mailbox

    def buildProtocol(self, addr: Any) -> FakePOP3Server:
        return FakePOP3Server(self)


class RecordingClient(Protocol):
    """The client end of an in-memory session: collects what the proxy sends."""

    transport: LegTransport  # type: ignore[assignment]  # set by makeConnection

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def take(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data


class MemoryProxy:
    """A whole proxy in memory: a ``MemoryReactorClock``, fake upstreams listening on it, and client
    sessions connected through ``iosim`` pumps. Nothing touches a socket or the real clock.

    Use ``connect()`` for a client session, ``pump()`` to move bytes both ways until quiet, and
    ``clock.advance()`` for timeouts. ``upstreams`` maps each ``[upstream.NAME]`` to its fake.
    """

    def __init__(self, config: ProxyConfig, listener_index: int = 0, server_tls: Any = None,
                 hooks: tuple[BuiltHook, ...] | None = None, hook_reactor: Any = None,
                 lookup: IRouteLookup | None = None, metrics: IMetrics | None = None) -> None:
        """``hook_reactor``: what hooks that do I/O are started with (``IStartable``); by default the
        in-memory clock, which runs their timers and threads nowhere: pass the real reactor for a
        hook that talks to a real scanner. ``lookup`` answers for ``[routing.lookup]`` (an
        in-memory stand-in for the HTTP service); ``metrics`` receives what sessions report."""
        self.clock = MemoryReactorClock()
        self.config = config
        self.upstreams: dict[str, FakePOP3Factory] = {}
        self._ports: dict[tuple[str, int], FakePOP3Factory] = {}
        self._pumps: list[iosim.IOPump] = []
        for upstream in config.upstreams.values():
            fake = FakePOP3Factory()
            self.upstreams[upstream.name] = fake
            for address in upstream.addresses:
                TCP4ServerEndpoint(self.clock, address.port, interface=address.host).listen(fake)
        self.connector = UpstreamConnector(self.clock, self._endpoint_for, config.limits.upstream_timeout,
                                           config.limits.upstream_max_line)
        self.hooks = start_hooks(build_hooks(config) if hooks is None else hooks, hook_reactor or self.clock)
        self.guard = Guard(config.limits, self.clock)
        self.cache = MessageCache(config.limits.message_cache)
        self.factory = ProxyFactory(
            SessionSettings(config.listeners[listener_index], config, server_tls, self.connector, self.clock,
                            self.hooks, LocalGuard(self.guard), self.cache, lookup=lookup,
                            metrics=metrics if metrics is not None else NULL_METRICS)
        )
        self.refuse: set[Address] = set()

    def close(self) -> None:
        """Close what the hooks hold open (audit log files, ...), as the service does at stop."""
        for built in self.hooks:
            built.close()

    def _endpoint_for(self, address: Address, upstream: UpstreamConfig) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.clock, address.host, address.port, timeout=upstream.connect_timeout)

    def connect(self, peer: str = "192.0.2.1", port: int = 50000) -> tuple[RecordingClient, ClientProtocol]:
        """A client session from ``peer`` (an IPv4 or IPv6 address), connected and greeted."""
        kind = IPv6Address if ":" in peer else IPv4Address
        address = kind("TCP", peer, port)
        session = self.factory.buildProtocol(address)
        client = RecordingClient()
        pump = iosim.connect(
            session,
            iosim.FakeTransport(session, isServer=True, peerAddress=address),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self._pumps.append(pump)
        self.pump()
        return client, session

    def pump(self, rounds: int = 50) -> None:
        """Complete pending upstream connections and move bytes until nothing moves."""
        for _ in range(rounds):
            moved = self._complete_connections()
            for pump in list(self._pumps):
                moved = pump.pump() or moved
            if not moved:
                return

    def say(self, client: RecordingClient, data: bytes) -> bytes:
        """``client`` sends ``data``; everything settles; what the client received since it last
        looked."""
        client.send(data)
        self.settle()
        return client.take()

    def settle(self, horizon: float = 30.0) -> None:
        """Pump, and let time pass through every timer due within ``horizon`` seconds of now
        (login penalties, slow hooks), until nothing moves. Longer timers (login and idle
        timeouts) are left alone: tests advance ``clock`` themselves for those."""
        self.pump()
        while True:
            now = self.clock.seconds()
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() - now < horizon]
            if not due:
                return
            self.clock.advance(max(0.0, min(due) - now))
            self.pump()

    def _complete_connections(self) -> bool:
        moved = False
        completer = iosim.ConnectionCompleter(self.clock)
        while self.clock.tcpClients:
            host, port = self.clock.tcpClients[0][:2]
            if Address(host, port) in self.refuse or not any(p[0] == port for p in self.clock.tcpServers):
                completer.failOnce()
            else:
                pump = completer.succeedOnce(greet=False)
                assert pump is not None
                self._pumps.append(pump)
            moved = True
        return moved
