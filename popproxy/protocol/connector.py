"""Opening a logged-in upstream connection: addresses in order, TLS as configured, deadlines."""

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

from ..config import Address, UpstreamConfig
from ..quiet import connect_quietly
from ..tls import client_tls
from .upstream import UpstreamProtocol, UpstreamRefused, UpstreamUnavailable, describe

EndpointFactory = Callable[[Address, UpstreamConfig], IStreamClientEndpoint]


@dataclass(frozen=True)
class LoggedIn:
    """A logged-in upstream connection, and its LIST sizes and UIDLs if they were asked for."""

    protocol: UpstreamProtocol
    listing: tuple[dict[int, int], dict[int, str]] | None

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
        if upstream.tls == "implicit":
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
    ) -> Deferred[LoggedIn]:
        """Connect to ``upstream`` and log in as ``user``; with ``listing_limit``, read LIST and
        UIDL too (each answer at most that many octets).

        Fires with the protocol, ready to relay, and the listing; fails with ``UpstreamRefused``
        (the upstream's verdict) or ``UpstreamUnavailable`` (everything else). Cancelling drops any
        connection made.
        """
        return ensureDeferred(self._open(upstream, user, password, log_fields, listing_limit))

    async def _open(
        self,
        upstream: UpstreamConfig,
        user: str,
        password: bytes,
        log_fields: dict[str, object],
        listing_limit: int | None,
    ) -> LoggedIn:
        name = upstream.login_name(user)
        if not name:
            # login_as = "{domain}" for a user without a domain, say: nothing to log in as.
            raise UpstreamRefused(None)
        protocol = await self._connect(upstream, name.encode("utf-8"), password, log_fields, listing_limit)
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
        return LoggedIn(protocol, succeeded.listing)

    async def _connect(self, upstream: UpstreamConfig, name: bytes, password: bytes, log_fields: dict[str, object],
                       listing_limit: int | None) -> UpstreamProtocol:
        """Try each address in turn; the first that accepts the TCP connection wins."""
        failures = []
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
            )
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
            return protocol
        raise UpstreamUnavailable("; ".join(failures) or "no address")


def ip_literal(host: str) -> int | None:
    """4 or 6 if ``host`` is an IPv4 or IPv6 address written out, None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None
