"""Opening a logged-in upstream connection: addresses in order, TLS as configured, deadlines, and the
client's address passed on as the upstream's ``forward_client`` says (XCLIENT or a PROXY header)."""

from __future__ import annotations

# Resolving a host name needs the IDNA codec, which Python imports on first use. Import it now, while
# twistd still runs as root: after -u/-g the Python installation may not be readable any more.
import encodings.idna  # noqa: F401
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from ..config import Address, UpstreamConfig, ip_of
from ..proxyheader import build_v1, build_v2, build_v2_local
from ..quiet import connect_quietly
from ..tls import client_tls
from .login import xclient_command
from .upstream import UpstreamProtocol, UpstreamRefused, UpstreamUnavailable, describe

EndpointFactory = Callable[[Address, UpstreamConfig], IStreamClientEndpoint]

#: ``forward_client`` modes that put a PROXY protocol header before anything else.
PROXY_HEADER_MODES = ("proxy-v1", "proxy-v2")


@dataclass(frozen=True)
class ClientOrigin:
    """Where a session's client is, for ``forward_client``.

    :ivar host: the client's IP address as the session knows it (after any inbound PROXY header);
        ``""`` when unknown (a UNIX socket listener).
    :ivar port: the client's port (0 when unknown).
    :ivar dest_host: the address the client connected to (``""`` when unknown).
    :ivar dest_port: the port the client connected to (0 when unknown).
    :ivar session_id: the session's id, sent as XCLIENT ``SESSION`` so both logs can be matched.
    """

    host: str
    port: int
    dest_host: str
    dest_port: int
    session_id: str


@dataclass(frozen=True)
class LoggedIn:
    """A logged-in upstream connection, and its LIST sizes and UIDLs if they were asked for.

    :ivar connect_seconds: the TCP connect of the attempt that succeeded, plus its TLS handshake for
        an implicit-TLS upstream (from the start of that attempt), by the reactor's clock.
    :ivar login_seconds: the whole ``open()``, from its start until logged in.
    """

    protocol: UpstreamProtocol
    listing: tuple[dict[int, int], dict[int, str]] | None
    connect_seconds: float = 0.0
    login_seconds: float = 0.0

# How long the upstream may take over greeting, CAPA, STLS, USER and PASS together, after the TCP
# connection is up. Generous: Dovecot alone delays a failed login by 2 s.
LOGIN_DEADLINE = 60.0

log = Logger()


class UpstreamConnector:
    """Makes logged-in ``UpstreamProtocol`` connections.

    :param endpoint_for: builds the client endpoint for one address; tests pass an in-memory one.
    """

    def __init__(self, reactor: IReactorTime, endpoint_for: EndpointFactory | None = None,
                 response_timeout: float = 120.0, max_body_line: int | None = None) -> None:
        self._reactor = reactor
        self._endpoint_for = endpoint_for or self._default_endpoint
        self.response_timeout = response_timeout
        self.max_body_line = max_body_line

    def _default_endpoint(self, address: Address, upstream: UpstreamConfig) -> IStreamClientEndpoint:
        reactor: IReactorTCP = self._reactor  # type: ignore[assignment]
        endpoint: IStreamClientEndpoint
        literal = ip_literal(address.host)
        if literal == 4:
            # An address needs no resolving: HostnameEndpoint would still hand it to the resolver's
            # thread pool (getaddrinfo) on every login.
            endpoint = TCP4ClientEndpoint(reactor, address.host, address.port, timeout=upstream.connect_timeout)
        elif literal == 6:
            endpoint = TCP6ClientEndpoint(reactor, address.host, address.port, timeout=upstream.connect_timeout)
        else:
            endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=upstream.connect_timeout)
        if upstream.tls == "implicit" and upstream.forward_client not in PROXY_HEADER_MODES:
            # With a PROXY header the endpoint stays plain: the header must precede the ClientHello,
            # and the protocol starts TLS itself once it is written (``tls_at_connect``).
            endpoint = wrapClientTLS(client_tls(upstream), endpoint)
        return endpoint

    def open(
        self,
        upstream: UpstreamConfig,
        user: str,
        password: bytes,
        *,
        log_fields: dict[str, object],
        listing_limit: int | None = None,
        client: ClientOrigin | None = None,
        login_name: str | None = None,
    ) -> Deferred[LoggedIn]:
        """Connect to ``upstream`` and log in as ``user``; with ``listing_limit``, read LIST and
        UIDL too (each answer at most that many octets).

        ``client`` is passed on as ``upstream.forward_client`` says (None: the client is unknown,
        as for a UNIX socket). ``login_name``, when given, is sent upstream as it is instead of
        ``upstream.login_name(user)``.

        Fires with the protocol, ready to relay, and the listing; fails with ``UpstreamRefused``
        (the upstream's verdict) or ``UpstreamUnavailable`` (everything else). Cancelling drops any
        connection made.
        """
        return ensureDeferred(self._open(upstream, user, password, log_fields, listing_limit, client, login_name))

    async def _open(
        self,
        upstream: UpstreamConfig,
        user: str,
        password: bytes,
        log_fields: dict[str, object],
        listing_limit: int | None,
        client: ClientOrigin | None,
        login_name: str | None,
    ) -> LoggedIn:
        started = self._reactor.seconds()
        name = upstream.login_name(user) if login_name is None else login_name
        if not name:
            # login_as = "{domain}" for a user without a domain, say: nothing to log in as.
            raise UpstreamRefused(None)
        protocol, connect_seconds = await self._connect(upstream, name.encode("utf-8"), password, log_fields,
                                                        listing_limit, client)
        login = protocol.login_result
        login.addTimeout(LOGIN_DEADLINE, self._reactor)
        try:
            succeeded = await login
        except UpstreamRefused:
            protocol.quit()
            raise
        except (TwistedTimeoutError, CancelledError):
            protocol.abort()
            raise UpstreamUnavailable("no answer while logging in") from None
        except UpstreamUnavailable:
            protocol.abort()
            raise
        except Exception as error:
            protocol.abort()
            raise UpstreamUnavailable(describe(error)) from None
        if upstream.tls != "none":
            # The login's answers came after the handshake, so a TLS 1.3 ticket is in by now: the
            # next login to this upstream resumes the session.
            client_tls(upstream).remember(protocol.transport.getHandle())
        if upstream.tls == "implicit" and protocol.handshake_at is not None and protocol.connected_at is not None:
            # The greeting came through TLS, so the handshake is done; its time counts as connecting.
            connect_seconds += protocol.handshake_at - protocol.connected_at
        return LoggedIn(protocol, succeeded.listing, connect_seconds, self._reactor.seconds() - started)

    async def _connect(self, upstream: UpstreamConfig, name: bytes, password: bytes, log_fields: dict[str, object],
                       listing_limit: int | None, client: ClientOrigin | None) -> tuple[UpstreamProtocol, float]:
        """Try each address in turn; the first that accepts the TCP connection wins. Returns it and
        the seconds its TCP connect took."""
        failures = []
        xclient = None
        if upstream.forward_client == "xclient":
            origin = client or ClientOrigin("", 0, "", 0, "")
            xclient = xclient_command(origin.host, origin.port, origin.session_id)
        preamble = proxy_header(upstream.forward_client, client)
        tls_at_connect = (client_tls(upstream) if upstream.tls == "implicit" and upstream.forward_client in PROXY_HEADER_MODES
                          else None)
        for address in upstream.addresses:
            protocol = UpstreamProtocol(
                name,
                password,
                starttls=upstream.tls == "starttls",
                listing_limit=listing_limit,
                tls=client_tls(upstream) if upstream.tls == "starttls" else None,
                log_fields=log_fields,
                clock=self._reactor,
                response_timeout=self.response_timeout,
                max_body_line=self.max_body_line,
                xclient=xclient,
                preamble=preamble,
                tls_at_connect=tls_at_connect,
            )
            attempt_started = self._reactor.seconds()
            attempt = connect_quietly(self._endpoint_for(address, upstream), protocol)
            attempt.addTimeout(upstream.connect_timeout, self._reactor)
            try:
                await attempt
            except CancelledError:
                raise
            except Exception as error:
                reason = "timed out" if isinstance(error, TwistedTimeoutError) else describe(error)
                failures.append(f"{address}: {reason}")
                # log_fields may hold "upstream" already (the client leg puts it there): merge,
                # never pass a key twice (that raised, and stopped the failover to the next address).
                log.warn(
                    "upstream {upstream} at {address} unreachable: {reason}",
                    **{**log_fields, "upstream": upstream.name, "address": str(address), "reason": reason},
                )
                continue
            return protocol, self._reactor.seconds() - attempt_started
        raise UpstreamUnavailable("; ".join(failures) or "no address")


def proxy_header(mode: str, client: ClientOrigin | None) -> bytes:
    """The PROXY protocol header for ``forward_client = mode`` (empty for the other modes).

    Source: the client's address; destination: the address it connected to (an IPv4 one of the
    pair is sent IPv4-mapped when the other is IPv6: ``proxyheader.build_v1``). When either is
    unknown (a UNIX socket listener, no ``client`` given) the header says the addresses are
    unknown: v1 ``PROXY UNKNOWN``, v2 ``LOCAL``; the upstream then uses the connection's own
    addresses, the proxy's, rather than made-up ones.
    """
    if mode not in PROXY_HEADER_MODES:
        return b""
    addresses = _header_addresses(client)
    if mode == "proxy-v1":
        return build_v1(*addresses) if addresses else _V1_UNKNOWN
    return build_v2(*addresses) if addresses else build_v2_local()


# The PROXY protocol spec, 2.1: "PROXY UNKNOWN" with nothing else is allowed when the sender does not
# know the addresses (and the receiver must then use the connection's real ones).
_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def _header_addresses(client: ClientOrigin | None) -> tuple[tuple[str, int], tuple[str, int]] | None:
    if client is None:
        return None
    ends = []
    for host, port in ((client.host, client.port), (client.dest_host, client.dest_port)):
        address = ip_of(host)  # a dual-stack listener's IPv4 client goes as TCP4
        if address is None or (isinstance(address, ipaddress.IPv6Address) and address.scope_id):
            return None  # no address, or a link-local scope, which no header can carry
        if not 0 < port < 65536:
            return None
        ends.append((str(address), port))
    return ends[0], ends[1]


def ip_literal(host: str) -> int | None:
    """4 or 6 if ``host`` is an IPv4 or IPv6 address written out, None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None
