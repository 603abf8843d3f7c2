"""Routing from an HTTP lookup service that speaks nginx's mail ``auth_http`` protocol.

An admin who runs an authentication service for nginx's mail proxy
(https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html) points ``[routing.lookup] url`` at it
and it works unchanged: popproxy sends what nginx sends for a POP3 ``USER``/``PASS`` or SASL ``PLAIN``
login and reads the same answer headers. What nginx does is taken from its source
(``src/mail/ngx_mail_auth_http_module.c``); where popproxy is stricter, the docstring says so.

The protocol decisions are pure code, tested by event sequences without a reactor:

- :func:`escape_auth` and :func:`request_headers`: the request (``Auth-User``/``Auth-Pass`` escaped
  as nginx's ``ngx_escape_uri(..., NGX_ESCAPE_MAIL_AUTH)`` does);
- :func:`parse_answer`: the answer headers, validated, to :class:`AuthOK` / :class:`Denied` /
  :class:`AuthWait` / :class:`LookupFailed`;
- :func:`route_answer`: ``allowed_upstreams`` and popproxy's own listeners, so that the service can
  never make popproxy an open proxy or route it to itself;
- :class:`LookupCache`: a bounded LRU with a TTL, keyed on (user, client address, HMAC of the password).

:class:`HTTPRouteLookup` is the Twisted glue: one ``GET`` through ``twisted.web.client.Agent`` per
uncached login, with a connect timeout, a whole-answer timeout and a cap on the octets read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import Interface, implementer

if TYPE_CHECKING:  # exported at run time as twisted.internet.ssl.IOpenSSLTrustRoot, untyped there
    from twisted.internet._sslverify import IOpenSSLTrustRoot

from .config import Address, ConfigError, LookupConfig, UpstreamConfig, ip_of

__all__ = [
    "MAX_ANSWER_OCTETS",
    "AnswerTooLarge",
    "AuthOK",
    "AuthWait",
    "Denied",
    "HTTPRouteLookup",
    "IRouteLookup",
    "LookupAnswer",
    "LookupCache",
    "LookupFailed",
    "LookupQuery",
    "Routed",
    "escape_auth",
    "is_local_address",
    "parse_answer",
    "request_headers",
    "route_answer",
]

log = Logger()

#: nginx's ``Auth-Method`` for ``USER``/``PASS``, SASL ``PLAIN`` and ``LOGIN`` (its
#: ``ngx_mail_auth_http_method`` table maps all three to "plain").
METHOD_PLAIN: Final = "plain"
#: The most octets read from the service for one request, status line, headers and body together;
#: past it the connection is aborted and the lookup fails. nginx reads the answer into a 1 KiB
#: buffer (its ``ngx_create_temp_buf(..., 1024)``); this leaves room for long rewrites and headers a
#: web framework adds. Memory per lookup in flight: at most this plus one read (64 KiB) of Twisted's.
MAX_ANSWER_OCTETS: Final = 16 * 1024
#: The longest ``Auth-Wait`` accepted (seconds); more is a malformed answer. nginx takes any number.
MAX_AUTH_WAIT: Final = 3600
#: ``Auth-Status: WAIT`` answers followed before the lookup fails (nginx follows them for ever).
MAX_WAIT_ROUNDS: Final = 3
#: The most characters of an ``Auth-Status`` text kept for the log.
MAX_REASON: Final = 200


# --- what is asked and what comes back --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupQuery:
    """One login to route: the request's ``Auth-*`` and ``Client-IP`` headers come from here."""

    user: str  # the session's normalised identity (RoutingConfig.normalise)
    password: bytes
    client_host: str  # "" when unknown: Client-IP is then left out
    attempt: int  # Auth-Login-Attempt: 1 for the first login on this connection
    method: str = METHOD_PLAIN


@dataclass(frozen=True, slots=True)
class Routed:
    """``Auth-Status: OK``: log in to ``upstream``, the ``template`` upstream with the answer's
    address (``addresses=(Address(Auth-Server, Auth-Port),)``) and everything else its own."""

    upstream: UpstreamConfig
    login_user: str | None  # Auth-User rewrite, sent upstream as is (None: no rewrite)
    password: bytes | None  # Auth-Pass rewrite (None: no rewrite)
    cached: bool


@dataclass(frozen=True, slots=True)
class Denied:
    """``Auth-Status`` other than OK: the login is refused.

    ``wait``: ``Auth-Wait`` seconds, the time to wait before answering ``-ERR`` and accepting the
    next login on the connection. None when absent *or 0*: nginx then answers and closes the
    connection (``timer == 0`` -> ``s->quit``), and so should popproxy.
    """

    reason: str  # the Auth-Status text, for the log (never shown to the client verbatim)
    wait: float | None
    cached: bool


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """No answer to act on: the service is down, slow, malformed, not 2xx, or named an address
    outside ``allowed_upstreams`` or one of popproxy's own listeners. The client gets
    ``-ERR [SYS/TEMP]`` (RFC 3206 §4). Never cached."""

    reason: str  # for the log


LookupAnswer = Routed | Denied | LookupFailed


@dataclass(frozen=True, slots=True)
class AuthOK:
    """A valid ``Auth-Status: OK`` answer, before the address is checked (:func:`route_answer`)."""

    server: str  # an IP address literal, IPv6 without brackets
    port: int
    login_user: str | None
    password: bytes | None


@dataclass(frozen=True, slots=True)
class AuthWait:
    """``Auth-Status: WAIT``: ask again after ``wait`` seconds (nginx's undocumented ``s->auth_wait``)."""

    wait: float


ServiceAnswer = AuthOK | Denied | AuthWait | LookupFailed


# --- the request ---------------------------------------------------------------------------------------


def _must_escape(octet: int) -> bool:
    # nginx's NGX_ESCAPE_MAIL_AUTH table ("mail_auth is the same as memcached"): %00-%1F, " " and "%".
    # DEL and octets >= 0x80 go as they are.
    return octet <= 0x20 or octet == 0x25


def escape_auth(value: bytes) -> bytes:
    """``value`` escaped exactly as nginx escapes ``Auth-User`` and ``Auth-Pass``: control octets,
    space and ``%`` as ``%XX`` (upper-case hex), every other octet unchanged (so a service that
    URL-decodes the header gets the original octets back)."""
    if not any(_must_escape(octet) for octet in value):
        return value
    return b"".join(b"%%%02X" % octet if _must_escape(octet) else bytes((octet,)) for octet in value)


def request_headers(config: LookupConfig, query: LookupQuery) -> list[tuple[bytes, bytes]]:
    """The request headers in nginx's order, ``Host`` aside (the HTTP client writes it from the URL).

    As nginx's ``ngx_mail_auth_http_create_request`` for POP3 with a plain-text login: ``Auth-Method``,
    ``Auth-User``, ``Auth-Pass`` (left out with ``send_password = false``), ``Auth-Protocol: pop3``,
    ``Auth-Login-Attempt``, ``Client-IP`` (left out when the address is unknown), then the configured
    extra headers (``auth_http_header``). No ``Client-Host``: nginx sends it for SMTP only (POP3 sessions
    never resolve the client's name), and popproxy does no reverse DNS. No ``Auth-SSL*`` or
    ``Proxy-Protocol-*`` headers: the query does not carry those facts.
    """
    headers = [
        (b"Auth-Method", query.method.encode("ascii")),
        (b"Auth-User", escape_auth(query.user.encode("utf-8"))),
    ]
    if config.send_password:
        headers.append((b"Auth-Pass", escape_auth(query.password)))
    headers += [(b"Auth-Protocol", b"pop3"), (b"Auth-Login-Attempt", b"%d" % query.attempt)]
    if query.client_host:
        headers.append((b"Client-IP", query.client_host.encode("ascii", "replace")))
    headers += [(name.encode("ascii"), value.encode("ascii")) for name, value in config.headers]
    return headers


# --- the answer ----------------------------------------------------------------------------------------

_ANSWER_HEADERS: Final = (b"auth-status", b"auth-server", b"auth-port", b"auth-user", b"auth-pass", b"auth-wait")


def _ip_literal(text: str) -> str | None:
    """``text`` if it is an IPv4 address in dotted-quad form or an IPv6 address without brackets or
    zone (what nginx's ``ngx_parse_addr`` accepts), as Python writes it; None otherwise."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    return str(address)


def _digits(value: bytes, limit: int) -> int | None:
    """A decimal number of at most ``limit`` like nginx's ``ngx_atoi`` (ASCII digits only, no sign)."""
    if not value or not value.isdigit() or len(value) > 10:
        return None
    number = int(value)
    return number if number <= limit else None


def parse_answer(code: int, headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> ServiceAnswer:
    """The service's answer from its HTTP status ``code`` and ``headers`` (name, values).

    The body is never looked at (nginx: "the data in the response body is ignored"). Header names
    are case-insensitive; unknown headers are ignored; values are taken without their surrounding
    spaces and *not* URL-decoded (nginx copies ``Auth-User``/``Auth-Pass`` as they come).

    Stricter than nginx, so that a broken service fails closed (``LookupFailed``) instead of routing:

    - the HTTP status must be 2xx (nginx skips the status line: a 200 or a 204 with the headers works);
    - ``Auth-Status`` is required (nginx routes an answer without one) and non-empty;
    - each ``Auth-*`` header at most once (nginx takes the last);
    - ``Auth-Wait`` must be a number (nginx ignores a bad one, which closes the connection) of at
      most :data:`MAX_AUTH_WAIT` seconds.

    As nginx: ``OK`` and ``WAIT`` are case-sensitive; ``OK`` needs ``Auth-Server`` (an IP address:
    nginx refuses a host name, and so does popproxy: no DNS answer can steer it) and ``Auth-Port``
    (1-65535); ``Auth-Wait`` with ``OK`` is ignored; ``Auth-Wait: 0`` with an error is as if absent
    (answer, then close).
    """
    if not 200 <= code <= 299:
        return LookupFailed(f"the lookup service answered HTTP {code}")
    found: dict[bytes, bytes] = {}
    for name, values in headers:
        key = name.lower()
        if key not in _ANSWER_HEADERS:
            continue
        if len(values) != 1 or key in found:
            return LookupFailed(f"malformed answer: {name.decode('ascii', 'replace')} sent more than once")
        value = values[0].strip(b" \t")
        if any(octet < 0x20 or octet == 0x7F for octet in value):  # NUL, CR, LF and the like
            return LookupFailed(f"malformed answer: {name.decode('ascii', 'replace')} has control characters")
        found[key] = value
    status = found.get(b"auth-status")
    if not status:
        return LookupFailed("malformed answer: no Auth-Status")
    if status == b"WAIT":
        wait = _wait(found)
        return wait if isinstance(wait, LookupFailed) else AuthWait(wait or 0.0)
    if status != b"OK":
        wait = _wait(found)
        if isinstance(wait, LookupFailed):
            return wait
        return Denied(status.decode("utf-8", "replace")[:MAX_REASON], wait, cached=False)
    server_text = found.get(b"auth-server", b"").decode("ascii", "replace")
    port_text = found.get(b"auth-port", b"")
    if not server_text or not port_text:
        return LookupFailed("malformed answer: Auth-Status OK without Auth-Server and Auth-Port")
    server = _ip_literal(server_text)
    if server is None:
        return LookupFailed(f"malformed answer: Auth-Server {server_text[:80]!r} is not an IP address")
    port = _digits(port_text, 65535)
    if not port:
        return LookupFailed(f"malformed answer: Auth-Port {port_text[:20].decode('ascii', 'replace')!r} is not 1-65535")
    login_user = None
    if b"auth-user" in found:
        try:
            login_user = found[b"auth-user"].decode("utf-8")
        except UnicodeDecodeError:
            return LookupFailed("malformed answer: Auth-User is not UTF-8")
        if not login_user:
            return LookupFailed("malformed answer: empty Auth-User")
    return AuthOK(server, port, login_user, found.get(b"auth-pass"))


def _wait(found: Mapping[bytes, bytes]) -> float | LookupFailed | None:
    if b"auth-wait" not in found:
        return None
    seconds = _digits(found[b"auth-wait"], MAX_AUTH_WAIT)
    if seconds is None:
        shown = found[b"auth-wait"][:20].decode("ascii", "replace")
        return LookupFailed(f"malformed answer: Auth-Wait {shown!r} is not a number of seconds up to {MAX_AUTH_WAIT}")
    return float(seconds) or None


# --- where an answer may send popproxy -----------------------------------------------------------------


def _same_ip(a: str, b: str) -> bool:
    x, y = ip_of(a), ip_of(b)
    if x is None or y is None:
        return a == b
    return x == y


_WILDCARDS: Final = ("", "0.0.0.0", "::")


def is_local_address(host: str) -> bool:
    """Whether the IP address ``host`` belongs to this machine: binding a UDP socket to it succeeds
    only then (EADDRNOTAVAIL otherwise). No packet is sent. 127.0.0.0/8 and ::1 are local."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def route_answer(
    answer: AuthOK,
    config: LookupConfig,
    template: UpstreamConfig,
    own_listeners: Sequence[tuple[str, int]] = (),
    is_local: Callable[[str], bool] = is_local_address,
) -> Routed | LookupFailed:
    """The upstream for a valid OK ``answer``, or why it is refused.

    Refused: an unspecified, multicast or broadcast address (``0.0.0.0`` reaches this machine); an
    address and port outside ``config.allowed_upstreams``; one of ``own_listeners`` (host "" or a
    wildcard address standing for every local address, decided by ``is_local``), which would loop.
    """
    address = ipaddress.ip_address(answer.server)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        return LookupFailed(f"refused: the lookup named {answer.server}, which is not a unicast address")
    shown = str(Address(answer.server, answer.port))
    if not config.allows(answer.server, answer.port):
        return LookupFailed(f"refused: the lookup named {shown}, outside allowed_upstreams")
    for host, port in own_listeners:
        if port != answer.port:
            continue
        if (host in _WILDCARDS and is_local(answer.server)) or _same_ip(host, answer.server):
            return LookupFailed(f"refused: the lookup named {shown}, where popproxy itself listens (a loop)")
    upstream = dataclasses.replace(template, addresses=(Address(answer.server, answer.port),))
    return Routed(upstream, answer.login_user, answer.password, cached=False)


# --- the cache -------------------------------------------------------------------------------------------

CacheKey = tuple[str, str, str, bytes]


class LookupCache:
    """Answers kept for a while: an LRU of at most ``size`` entries (0: nothing is kept).

    Keyed on (user, client address, method, HMAC-SHA256 of the password under a random key of this
    process), never on the user alone: an answer, and the ``Auth-Pass`` rewrite in it, is only
    reused for the password that earned it, and the cache holds no password nor a hash that could
    be tested offline. ``Routed`` answers live ``ttl`` seconds; ``Denied`` ones no longer than their
    ``Auth-Wait`` (not at all without one, since the connection is then closed); ``LookupFailed``
    ones are never kept.

    Memory bound: ``size`` x (key + answer), each answer within :data:`MAX_ANSWER_OCTETS`.
    """

    def __init__(self, size: int, ttl: float, secret: bytes | None = None) -> None:
        self.size = size
        self.ttl = ttl
        self._secret = secret if secret is not None else os.urandom(32)
        self._entries: OrderedDict[CacheKey, tuple[float, Routed | Denied]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, query: LookupQuery) -> CacheKey:
        mac = hmac.new(self._secret, query.password, hashlib.sha256).digest()
        return (query.user, query.client_host, query.method, mac)

    def get(self, key: CacheKey, now: float) -> Routed | Denied | None:
        """The answer kept for ``key`` and not expired at ``now``, marked ``cached``; None otherwise."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return dataclasses.replace(answer, cached=True)

    def put(self, key: CacheKey, answer: LookupAnswer, now: float) -> None:
        """Keep ``answer`` for ``key`` as the rules above say (evicting the least recently used)."""
        if self.size <= 0:
            return
        if isinstance(answer, Routed):
            lifetime = self.ttl
        elif isinstance(answer, Denied) and answer.wait:
            lifetime = min(self.ttl, answer.wait)
        else:
            self._entries.pop(key, None)
            return
        self._entries[key] = (now + lifetime, dataclasses.replace(answer, cached=False))
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


# --- the Twisted side --------------------------------------------------------------------------------------


class IRouteLookup(Interface):
    """Where a login goes, asked of something outside popproxy's configuration."""

    def lookup(query: LookupQuery) -> Deferred[LookupAnswer]:
        """Fires with ``Routed``, ``Denied`` or ``LookupFailed``; never errbacks (unless the caller
        cancels it: it then errbacks at once with ``CancelledError`` and the request is aborted)."""


class AnswerTooLarge(Exception):
    """The lookup service sent more than :data:`MAX_ANSWER_OCTETS`; the connection was aborted."""


class _CountingProtocol(ProtocolWrapper):
    """Aborts the connection once more than ``limit`` octets have arrived, and tells the HTTP
    client why (:class:`AnswerTooLarge`) instead of a bare "connection aborted"."""

    limit = MAX_ANSWER_OCTETS

    def __init__(self, factory: WrappingFactory[_CountingProtocol], wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.received = 0
        self.exceeded = False

    def dataReceived(self, data: bytes) -> None:
        if self.exceeded:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.exceeded = True
            cast(ITCPTransport, self.transport).abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.exceeded:
            reason = Failure(AnswerTooLarge(f"more than {self.limit} octets"))
        super().connectionLost(reason)


class _CountingFactory(WrappingFactory[_CountingProtocol]):
    protocol = _CountingProtocol


@implementer(IStreamClientEndpoint)
class _LimitedEndpoint:
    """``endpoint`` with every connection's incoming octets capped (:class:`_CountingProtocol`)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._endpoint.connect(_CountingFactory(protocolFactory))
        return connecting.addCallback(lambda wrapper: cast(ProtocolWrapper, wrapper).wrappedProtocol)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """HTTP(S) endpoints for the Agent: TLS checked against ``ca`` (or the system's roots) and the
    URL's host name (RFC 6125, by ``optionsForClientTLS``), a connect timeout, and the octet cap."""

    def __init__(self, reactor: object, config: LookupConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._trust_root = _trust_root(config.ca) if config.ca is not None else None

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, timeout=self._config.connect_timeout
        )
        if uri.scheme == b"https":
            options = optionsForClientTLS(
                host, trustRoot=self._trust_root, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
            )
            endpoint = wrapClientTLS(options, endpoint)
        return _LimitedEndpoint(endpoint)


def _trust_root(ca: Path) -> IOpenSSLTrustRoot:
    try:
        roots = x509.load_pem_x509_certificates(ca.read_bytes())
    except OSError as error:
        raise ConfigError(ca, "routing.lookup.ca", f"cannot read: {error.strerror or error}") from None
    except ValueError:
        raise ConfigError(ca, "routing.lookup.ca", "no PEM certificates found") from None
    return trustRootFromCertificates(  # type: ignore[no-any-return]
        [Certificate.loadPEM(root.public_bytes(serialization.Encoding.PEM)) for root in roots]
    )


class _Discard(Protocol):
    """Takes the response body and drops the connection: the answer is in the headers."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass  # the end of the body, or the abort above: nothing is waiting for it


@implementer(IRouteLookup)
class HTTPRouteLookup:
    """Ask an nginx ``auth_http`` service where a login goes (see the module docstring).

    :param upstreams: the configuration's upstreams; ``config.template`` must be one of them.
    :param reactor: for the HTTP client, its timeouts and ``Auth-Status: WAIT`` rounds.
    :param own_listeners: ``(host, port)`` popproxy listens on (``build.listener_addresses``); host
        "", "0.0.0.0" or "::" for every local address. Answers naming one are refused.
    :param clock: the cache's time (default: ``reactor``), so tests can use ``task.Clock``.
    :param is_local: whether an address is this machine's (for wildcard listeners).
    :raises ConfigError: if ``config.ca`` cannot be read.
    """

    def __init__(
        self,
        config: LookupConfig,
        upstreams: Mapping[str, UpstreamConfig],
        reactor: IReactorTime,
        *,
        own_listeners: Sequence[tuple[str, int]] = (),
        clock: IReactorTime | None = None,
        is_local: Callable[[str], bool] = is_local_address,
    ) -> None:
        self.config = config
        self.template = upstreams[config.template]
        self.own_listeners = tuple(own_listeners)
        self._reactor = reactor
        self._clock = clock or reactor
        self._is_local = is_local
        self.cache = LookupCache(config.cache_size, config.cache_ttl)
        self._url = config.url.encode("ascii")
        self._agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(reactor, config))

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self.cache.clear()

    def lookup(self, query: LookupQuery) -> Deferred[LookupAnswer]:
        key = self.cache.key(query)
        cached = self.cache.get(key, self._clock.seconds())
        if cached is not None:
            return succeed(cached)
        running = ensureDeferred(self._lookup(query, key))

        def cancel(answer: Deferred[LookupAnswer]) -> None:
            answer.errback(Failure(CancelledError()))
            running.cancel()  # aborts the request; what it then returns is dropped below

        answer: Deferred[LookupAnswer] = Deferred(cancel)

        def deliver(result: LookupAnswer | Failure) -> None:
            if answer.called:
                return
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        running.addBoth(deliver)
        return answer

    async def _lookup(self, query: LookupQuery, key: CacheKey) -> LookupAnswer:
        try:
            answer = await self._resolve(query)
        except CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - never errback: a failed lookup is an answer
            log.failure("lookup for {user} failed unexpectedly", Failure(), event="lookup", user=query.user)
            answer = LookupFailed(f"unexpected error: {error.__class__.__name__}")
        if isinstance(answer, LookupFailed):
            # Refusals (allowed_upstreams, own listeners) land here too: an operator must see them.
            log.warn("lookup for {user} failed: {reason}", event="lookup", user=query.user,
                     client_host=query.client_host, reason=answer.reason, result="failed")
        self.cache.put(key, answer, self._clock.seconds())
        return answer

    async def _resolve(self, query: LookupQuery) -> LookupAnswer:
        for _ in range(MAX_WAIT_ROUNDS + 1):
            parsed = await self._ask(query)
            if isinstance(parsed, AuthOK):
                return route_answer(parsed, self.config, self.template, self.own_listeners, self._is_local)
            if not isinstance(parsed, AuthWait):
                return parsed
            # nginx: Auth-Status WAIT -> sleep Auth-Wait seconds, then ask again with the same request.
            # Each sleep at most `timeout`, so a lookup takes at most (MAX_WAIT_ROUNDS + 1) x 2 x timeout.
            await deferLater(self._reactor, min(parsed.wait, self.config.timeout))
        return LookupFailed(f"the lookup service answered WAIT more than {MAX_WAIT_ROUNDS} times")

    async def _ask(self, query: LookupQuery) -> ServiceAnswer:
        headers = Headers()
        for name, value in request_headers(self.config, query):
            headers.addRawHeader(name, value)
        requesting = self._agent.request(b"GET", self._url, headers)
        # The whole answer's deadline: connecting, TLS, sending, and the status line and headers.
        deadline = self._reactor.callLater(self.config.timeout, requesting.cancel)
        try:
            response = cast(IResponse, await requesting)
        except Exception as error:  # noqa: BLE001 - refused, reset, TLS failures, oversized answers
            if not deadline.active():
                return LookupFailed(f"no answer from the lookup service within {self.config.timeout:g} s")
            if _caused_by(error, CancelledError):
                raise CancelledError() from error  # the caller cancelled: not a failure to log
            return LookupFailed(f"lookup service failed: {_describe(error)}")
        finally:
            if deadline.active():
                deadline.cancel()
        response.deliverBody(_Discard())
        return parse_answer(response.code, response.headers.getAllRawHeaders())


def _caused_by(error: Exception, kind: type[Exception]) -> bool:
    if isinstance(error, kind):
        return True
    if isinstance(error, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        return any(reason.check(kind) for reason in error.reasons)
    return False


def _describe(error: Exception) -> str:
    """A short text for a connection error. The HTTP client wraps the cause (a refused connection,
    a TLS verification failure, :class:`AnswerTooLarge`) in ``ResponseNeverReceived`` and the like,
    which hold Failures in ``reasons``."""
    if isinstance(error, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)) and error.reasons:
        inner = error.reasons[0].value
        return f"{inner.__class__.__name__}: {inner}"[:300]
    return f"{error.__class__.__name__}: {error}"[:300]
