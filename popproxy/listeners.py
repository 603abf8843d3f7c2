"""Turning ``[[listen]]`` tables into listening endpoints: plain, STLS, implicit TLS, PROXY protocol.

The PROXY header is read by ``ProxyHeaderProtocol`` (glue around ``popproxy.proxyheader``), not by
``twisted.protocols.haproxy``, whose public API cannot tell a load balancer's health check (a v2
``LOCAL`` header) from a relayed client.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .config import ConfigError, ListenerConfig, ProxyConfig
from .proxyheader import HealthCheckAddress, InvalidProxyHeader, ProxyHeader, ProxyHeaderReader, host_port
from .tls import ServerTLS

log = Logger()


class AllowedPeersFactory(Factory):
    """Refuses connections from peers outside ``allowed`` before any byte is read.

    Used in front of the PROXY-protocol wrapper: only the load balancers named in ``proxy_from`` may
    tell popproxy who the client is; anyone else could claim any address.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, listener: ListenerConfig) -> None:
        self._wrapped = wrapped
        self._listener = listener

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else None
        if host is not None and not self._listener.allows_proxy_peer(host):
            log.warn(
                "refused PROXY-protocol connection on {listener} from {client_host}: not in proxy_from",
                listener=self._listener.key,
                client_host=host,
            )
            return None
        # Twisted's Factory takes IAddress | None and returns a Protocol; IProtocolFactory takes an IAddress and
        # returns an IProtocol.
        return self._wrapped.buildProtocol(addr)  # type: ignore[arg-type,return-value]


@implementer(IStreamServerEndpoint)
class AllowedPeersEndpoint:
    """An endpoint whose connections pass through ``AllowedPeersFactory`` first."""

    def __init__(self, endpoint: IStreamServerEndpoint, listener: ListenerConfig) -> None:
        self._endpoint = endpoint
        self._listener = listener

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(AllowedPeersFactory(factory, self._listener))


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


def listening_endpoint(reactor: object, listener: ListenerConfig,
                       endpoint: IStreamServerEndpoint | None = None) -> IStreamServerEndpoint:
    """The endpoint for ``listener``: its own string (or ``endpoint``, a socket bound elsewhere),
    behind a peer filter and the PROXY-header reader when it starts with ``haproxy:``."""
    if endpoint is None:
        endpoint = serverFromString(reactor, listener.inner_endpoint)
    if listener.haproxy:
        # The peer filter outside the header reader: it sees the real peer, the load balancer.
        endpoint = ProxyHeaderEndpoint(AllowedPeersEndpoint(endpoint, listener), listener.key)
    return endpoint


def listening_factory(
    listener: ListenerConfig, factory: IProtocolFactory, server_tls: ServerTLS | None
) -> IProtocolFactory:
    """Add implicit TLS to ``factory`` where the listener asks for it.

    TLS is added here rather than with an ``ssl:`` endpoint so that it sits *inside* the PROXY-header
    reader: load balancers send the header in clear text before the ClientHello (the PROXY protocol
    spec, §2: the header is the first thing on the connection).
    """
    if listener.tls == "implicit":
        assert server_tls is not None
        return TLSMemoryBIOFactory(server_tls, False, factory)
    return factory


def listener_service(
    reactor: object, listener: ListenerConfig, factory: IProtocolFactory, server_tls: ServerTLS | None,
    endpoint: IStreamServerEndpoint | None = None,
) -> StreamServerEndpointService:
    """A service that binds in ``privilegedStartService``, before twistd drops privileges."""
    service = StreamServerEndpointService(
        listening_endpoint(reactor, listener, endpoint), listening_factory(listener, factory, server_tls)
    )
    # Fail the start (and twistd) when the port cannot be bound, rather than logging and running on.
    service._raiseSynchronously = True
    service.setName(listener.key)
    return service


def check_endpoints(reactor: object, config: ProxyConfig) -> None:
    """Parse every listener's endpoint string, so that a typo fails ``--check`` and start-up."""
    for listener in config.listeners:
        try:
            serverFromString(reactor, listener.inner_endpoint)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(config.path, f"{listener.key}.endpoint", f"invalid endpoint: {error}") from None
    if config.metrics is not None:  # [metrics] endpoint: the same check
        try:
            serverFromString(reactor, config.metrics.endpoint)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(config.path, "metrics.endpoint", f"invalid endpoint: {error}") from None


