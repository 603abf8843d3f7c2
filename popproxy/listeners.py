"""Turning ``[[listen]]`` tables into listening endpoints: plain, STLS, implicit TLS, PROXY protocol."""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from .config import ConfigError, ListenerConfig, ProxyConfig
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


def listening_endpoint(reactor: object, listener: ListenerConfig,
                       endpoint: IStreamServerEndpoint | None = None) -> IStreamServerEndpoint:
    """The endpoint for ``listener``: its own string (or ``endpoint``, a socket bound elsewhere),
    behind a peer filter and the PROXY-header reader when it starts with ``haproxy:``."""
    if endpoint is None:
        endpoint = serverFromString(reactor, listener.inner_endpoint)
    if listener.haproxy:
        endpoint = proxyEndpoint(AllowedPeersEndpoint(endpoint, listener))
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


