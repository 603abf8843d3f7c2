"""Turning ``[[listen]]`` tables into listening endpoints: plain, STLS, implicit TLS, PROXY protocol.

The PROXY header is read by ``ProxyHeaderProtocol`` (glue around ``popproxy.proxyheader``), not by
``twisted.protocols.haproxy``, whose public API cannot tell a load balancer's health check (a v2
``LOCAL`` header) from a relayed client.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import unix
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReadDescriptor,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ListenerConfig
from .proxyheader import HealthCheckAddress, InvalidProxyHeader, ProxyHeader, ProxyHeaderReader, host_port
from .tls import ServerTLS

log = Logger()


class LiveListener:
    """What one listening socket serves now: its ``[[listen]]`` table and TLS context.

    The socket is bound once; a reload (``ProxyService.commit_reload``) replaces ``listener`` and
    ``server_tls`` here, and every connection accepted afterwards is built from the new ones: its
    TLS wrapping (``ListeningFactory``), its PROXY-header peer filter (``AllowedPeersFactory``).
    """

    def __init__(self, listener: ListenerConfig, server_tls: ServerTLS | None) -> None:
        self.listener = listener
        self.server_tls = server_tls


class AllowedPeersFactory(Factory):
    """Refuses connections from peers outside ``allowed`` before any byte is read.

    Used in front of the PROXY-protocol wrapper: only the load balancers named in ``proxy_from`` may
    tell popproxy who the client is; anyone else could claim any address.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, live: LiveListener) -> None:
        self._wrapped = wrapped
        self._live = live

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else None
        listener = self._live.listener  # as it is now: a reload may have changed proxy_from
        if host is not None and not listener.allows_proxy_peer(host):
            log.warn(
                "refused PROXY-protocol connection on {listener} from {client_host}: not in proxy_from",
                listener=listener.key,
                client_host=host,
            )
            return None
        # Twisted's Factory takes IAddress | None and returns a Protocol; IProtocolFactory takes an IAddress and
        # returns an IProtocol.
        return self._wrapped.buildProtocol(addr)  # type: ignore[arg-type,return-value]


@implementer(IStreamServerEndpoint)
class AllowedPeersEndpoint:
    """An endpoint whose connections pass through ``AllowedPeersFactory`` first."""

    def __init__(self, endpoint: IStreamServerEndpoint, live: LiveListener) -> None:
        self._endpoint = endpoint
        self._live = live

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(AllowedPeersFactory(factory, self._live))


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the PROXY header in front of the wrapped protocol's bytes (glue; the reading is
    ``ProxyHeaderReader``'s).

    The wrapped protocol is connected at once, as with ``twisted.protocols.haproxy``: popproxy greets
    before the header has come. Its ``dataReceived`` sees nothing until the header is complete, then
    what followed the header, in the same call. An invalid header closes the connection, and the
    wrapped protocol never sees a byte of it (the spec, §2.1: "Any sequence which does not exactly
    match the protocol must be discarded and cause the receiver to abort the connection").

    ``getPeer()``/``getHost()``: the real addresses until the header is complete; then, after a
    PROXY header, its source and destination; after one naming no client (v2 LOCAL or UNSPEC, v1
    UNKNOWN), a ``HealthCheckAddress`` of the real peer and the real local address.

    Buffering: what ``ProxyHeaderReader`` holds (at most 16 + 216 octets); nothing else is kept.
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._reader: ProxyHeaderReader | None = ProxyHeaderReader()
        self._header: ProxyHeader | None = None
        self._health_check: HealthCheckAddress | None = None

    def _real(self) -> ITransport:
        """The connection's own transport (set by ``makeConnection`` before any of this is called)."""
        assert self.transport is not None
        return self.transport

    @property
    def proxy_header(self) -> ProxyHeader | None:
        """The header, once read (with ``rest`` emptied: those bytes were passed on, not kept)."""
        return self._header

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            if self._header is not None:
                self.wrappedProtocol.dataReceived(data)
            return  # the header was invalid: the connection is closing, its bytes are dropped
        try:
            header = reader.feed(data)
        except InvalidProxyHeader as error:
            self._reader = None
            host, port = host_port(self._real().getPeer())
            log.info(
                "closing connection from {client_host}:{client_port} on {listener}: invalid PROXY header: {error}",
                client_host=host,
                client_port=port,
                listener=self.factory.listener_key,
                error=str(error),
            )
            self.loseConnection()
            return
        if header is None:
            return
        self._reader = None
        if header.is_health_check:
            self._health_check = HealthCheckAddress.of(self._real().getPeer())
        self._header = replace(header, rest=b"")
        if header.rest:
            self.wrappedProtocol.dataReceived(header.rest)

    def getPeer(self) -> IAddress:
        if self._health_check is not None:
            return self._health_check
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self._real().getPeer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self._real().getHost()


class ProxyHeaderFactory(WrappingFactory[ProxyHeaderProtocol]):
    """Wraps each of ``wrappedFactory``'s protocols in a ``ProxyHeaderProtocol``."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, listener_key: str = "") -> None:
        super().__init__(wrappedFactory)
        self.listener_key = listener_key

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if ILoggingContext.providedBy(wrapped) else type(wrapped).__name__
        return f"{prefix} (PROXY)"

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:  # the wrapped factory refused the connection
            return None
        return self.protocol(self, wrapped)


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """An endpoint whose connections start with a PROXY header (``ProxyHeaderFactory``)."""

    def __init__(self, endpoint: IStreamServerEndpoint, listener_key: str = "") -> None:
        self._endpoint = endpoint
        self._listener_key = listener_key

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(ProxyHeaderFactory(factory, self._listener_key))


def listening_endpoint(reactor: object, live: LiveListener,
                       endpoint: IStreamServerEndpoint | None = None) -> IStreamServerEndpoint:
    """The endpoint for ``live``'s listener: its own string (or ``endpoint``, a socket bound elsewhere),
    behind a peer filter and the PROXY-header reader when it starts with ``haproxy:``."""
    listener = live.listener
    if endpoint is None:
        endpoint = EndpointString(reactor, listener.inner_endpoint)
    if listener.haproxy:
        # The peer filter outside the header reader: it sees the real peer, the load balancer.
        endpoint = ProxyHeaderEndpoint(AllowedPeersEndpoint(endpoint, live), listener.key)
    return endpoint


@implementer(IStreamServerEndpoint)
class EndpointString:
    """``serverFromString(reactor, description)``, parsed when listened on rather than before.

    A ``systemd:`` endpoint looks its inherited socket up when parsed (``LISTEN_FDS``, sd_listen_fds(3)):
    parsed here, a socket systemd did not pass is that listener's bind error, in one line, and
    ``--check`` (which never listens) can check the file outside systemd.
    """

    def __init__(self, reactor: object, description: str) -> None:
        self._reactor = reactor
        self._description = description

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            endpoint = serverFromString(self._reactor, self._description)
        except (IndexError, KeyError):  # _SystemdParser: no such index, no such FileDescriptorName
            return fail(CannotListenError(None, self._description, "systemd passed no such socket (sd_listen_fds(3): "
                                          "is the socket unit running, and does this match its ListenStream= lines?)"))
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening


class ListeningFactory(Factory):
    """What a listening socket builds each connection with: the sessions' factory, inside TLS when
    the listener is ``tls = "implicit"`` *now* (``live``), so that a reload that switches a port
    between ``starttls``/``none`` and ``implicit`` changes what the next connection gets.

    TLS is added here rather than with an ``ssl:`` endpoint so that it sits *inside* the PROXY-header
    reader: load balancers send the header in clear text before the ClientHello (the PROXY protocol
    spec, §2: the header is the first thing on the connection). One ``TLSMemoryBIOFactory`` per TLS
    context (``twisted.protocols.tls``: it takes an ``IOpenSSLServerConnectionCreator``, which
    ``ServerTLS`` is; its certificates reload in place).
    """

    noisy = False

    def __init__(self, live: LiveListener, sessions: IProtocolFactory) -> None:
        self._live = live
        self._sessions = sessions
        self._tls: tuple[ServerTLS, TLSMemoryBIOFactory] | None = None

    def doStart(self) -> None:
        self._sessions.doStart()

    def doStop(self) -> None:
        self._sessions.doStop()

    def logPrefix(self) -> str:
        sessions = self._sessions
        return sessions.logPrefix() if ILoggingContext.providedBy(sessions) else type(sessions).__name__

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        server_tls = self._live.server_tls
        if self._live.listener.tls != "implicit" or server_tls is None:
            return self._sessions.buildProtocol(addr)  # type: ignore[arg-type,return-value]
        if self._tls is None or self._tls[0] is not server_tls:
            self._tls = (server_tls, TLSMemoryBIOFactory(server_tls, False, self._sessions))
        return self._tls[1].buildProtocol(addr)


def listener_service(
    reactor: object, live: LiveListener, factory: IProtocolFactory, endpoint: IStreamServerEndpoint | None = None,
) -> StreamServerEndpointService:
    """A service that binds in ``privilegedStartService``, before twistd drops privileges (or
    earlier still, ``bind_now``)."""
    service = StreamServerEndpointService(listening_endpoint(reactor, live, endpoint), ListeningFactory(live, factory))
    # Fail the start (and twistd) when the port cannot be bound, rather than logging and running on.
    service._raiseSynchronously = True
    service.setName(live.listener.key)
    return service


# --- binding before twistd daemonizes --------------------------------------------------------------


class BindError(Exception):
    """An endpoint that cannot listen: which one (``key``, e.g. ``listen[1].endpoint`` or
    ``metrics.endpoint``), its endpoint string, and why, in one line."""

    def __init__(self, config_path: object, key: str, endpoint: str, reason: str) -> None:
        super().__init__(str(config_path), key, endpoint, reason)
        self.config_path, self.key, self.endpoint, self.reason = str(config_path), key, endpoint, reason

    def __str__(self) -> str:
        return f"{self.config_path}: {self.key}: cannot listen on {self.endpoint!r}: {self.reason}"


#: What an operator can do about the usual bind errors (errno(3), ip(7)).
_HINTS = {
    errno.EADDRINUSE: "another process listens there",
    errno.EADDRNOTAVAIL: "not an address of this host",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; unix sockets, a folder one may write",
}


def bind_reason(error: object) -> str:
    """The reason a listen failed, in words (``CannotListenError`` wraps the ``OSError``)."""
    inner: object = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(inner, OSError):
        text = inner.strerror or str(inner)
        hint = _HINTS.get(inner.errno or 0)
        return f"{text} ({hint})" if hint else text
    return str(inner)


def bind_now(reactor: object, service: StreamServerEndpointService, config_path: object, key: str,
             endpoint: str) -> IListeningPort:
    """Listen on ``service``'s endpoint now, not accepting yet: ``service`` starts accepting when
    it starts (``BoundEndpoint``).

    twistd calls the plugin's ``makeService`` before it daemonizes, writes its PID file and drops
    privileges (``twisted.scripts._twistd_unix.UnixApplicationRunner``: ``createOrGetApplication``,
    then ``postApplication``): binding there reports a port in use or an address this host does
    not have on the terminal, in one line, with nothing left behind. The socket is taken off the
    reactor at once (``IReactorFDSet.removeReader``), so it is in no poll set while twistd forks.

    :raises BindError: naming ``key``, ``endpoint`` and the reason.
    """
    port = listen_now(reactor, service.endpoint, service.factory, config_path, key, endpoint)
    service.endpoint = BoundEndpoint(reactor, port)
    return port


def listen_now(reactor: object, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, config_path: object,
               key: str, text: str) -> IListeningPort:
    """Listen on ``endpoint`` (whose string is ``text``) with ``factory``, synchronously, and take
    the socket off the reactor: it accepts nothing until given back (``IReactorFDSet.addReader``).

    :raises BindError: naming ``key``, ``text`` and the reason.
    """
    results: list[object] = []
    endpoint.listen(factory).addBoth(results.append)
    if not results:  # every endpoint type popproxy listens on binds synchronously
        raise BindError(config_path, key, text, "the endpoint did not bind at once")
    result = results[0]
    if isinstance(result, Failure):
        raise BindError(config_path, key, text, bind_reason(result.value))
    port = IListeningPort(result)
    IReactorFDSet(reactor).removeReader(IReadDescriptor(port))
    return port


def take_over(port: IListeningPort, bound_by: int) -> None:
    """Make this process the owner of ``port``, bound by process ``bound_by`` (twistd's daemon mode
    forks between binding and serving): see ``_own_lock``."""
    if os.getpid() != bound_by:
        _own_lock(port)


@implementer(IStreamServerEndpoint)
class BoundEndpoint:
    """A socket ``bind_now`` bound: ``listen`` starts accepting on it (the factory it was bound
    with is the service's own; the one given here is the same and ignored)."""

    def __init__(self, reactor: object, port: IListeningPort) -> None:
        self._reactor = IReactorFDSet(reactor)
        self._port = port
        self._pid = os.getpid()

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        take_over(self._port, self._pid)
        self._reactor.addReader(IReadDescriptor(self._port))
        return succeed(self._port)


def _own_lock(port: IListeningPort) -> None:
    """A ``unix:`` listener's lock file (``lockfile=1``, the default) names the process that bound
    it, and only that process may release it (``twisted.python.lockfile.FilesystemLock``); twistd's
    daemon mode forks after binding, so the lock is taken again in the new process."""
    if isinstance(port, unix.Port) and port.lockFile is not None:
        lock = port.lockFile
        try:
            os.remove(lock.name)
        except OSError:
            pass
        lock.lock()
