"""Load and validate popproxy's TOML configuration into frozen dataclasses.

Pure on purpose: stdlib only, no Twisted, so every rule is unit tested without a reactor and a
configuration can be checked before anything listens. The loader is strict. An unknown key, a value
outside its allowed set, or a key that has no effect where it is written (``require_tls`` on a plain
listener, ``verify`` on a plain upstream) is an error, because a proxy that carries passwords must
never run with settings the operator believes in but that do nothing. Every error names the file,
the key (``listen[0].certificate``, ``upstream.legacy.tls``) and the reason.

``conf/popproxy.toml`` documents every key; ``tests/test_config.py`` checks that it loads.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import math
import os
import re
import string
import tomllib
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "Address",
    "AllowedUpstream",
    "ConfigError",
    "HookConfig",
    "HookOptions",
    "LimitsConfig",
    "ListenerConfig",
    "LookupConfig",
    "MetricsConfig",
    "ProxyConfig",
    "RoutingConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

TLS_MODES: Final = ("none", "starttls", "implicit")
#: How an upstream learns the client's address: not at all, Dovecot's XCLIENT command, or a PROXY
#: protocol header (v1 text, v2 binary) before anything else on the connection.
FORWARD_CLIENT_MODES: Final = ("none", "xclient", "proxy-v1", "proxy-v2")
TLS_VERSIONS: Final = ("1.2", "1.3")
ENDPOINT_TYPES: Final = ("tcp", "tcp6", "unix", "systemd")
LOGIN_PLACEHOLDERS: Final = ("user", "local", "domain")
USER_CASES: Final = ("lower", "preserve")
DEFAULT_PROXY_FROM: Final = ("127.0.0.1/32", "::1/128")
DEFAULT_LOGIN_TIMEOUT: Final = 60.0
DEFAULT_IDLE_TIMEOUT: Final = 600.0  # RFC 1939 §3: an autologout timer "MUST be of at least 10 minutes"
# Listener session-ticket keys are replaced this often (seconds): a stolen key opens at most this
# long a stretch of recorded resumed sessions.
DEFAULT_TICKET_KEY_LIFETIME: Final = 43200.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The default of a key that must be present.
_REQUIRED: Final[Any] = object()

# Upstream names appear in keys ("upstream.NAME.tls"), logs and metric labels: keep them plain.
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """A configuration that popproxy refuses to run with.

    :ivar path: the configuration file.
    :ivar key: where in it, e.g. ``listen[0].certificate``; ``-`` for the file as a whole.
    :ivar reason: what is wrong, in words an operator can act on.
    """

    path: str
    key: str
    reason: str

    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        super().__init__(str(path), key, reason)
        self.path = str(path)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.reason}"


def user_listed(entries: Collection[str], user: str) -> bool:
    """Whether the normalised ``user`` is among ``entries``: user names (normalised at load time by
    ``[routing] user_case``) equal to it, or ``@domain`` entries (lowercased at load time) for the
    domain after its last ``@``, case-insensitively. The one matcher for every hook's user lists."""
    _, at, domain = user.rpartition("@")
    domain = domain.lower()
    return any((at and entry[1:] == domain) if entry.startswith("@") else entry == user for entry in entries)


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as the IP address a client there has: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``,
    what a dual-stack ``tcp6`` listener reports for an IPv4 client) as its IPv4 address; None if
    ``host`` is not an IP address (a UNIX socket's path, a name). The one place addresses from peers,
    PROXY headers and lookups are read, so that limits, routing checks and what goes upstream agree."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(host: str, networks: Collection[IPNetwork]) -> bool | None:
    """Whether ``host`` lies in one of ``networks`` (see ``ip_of``); None if ``host`` is not an IP
    address at all."""
    address = ip_of(host)
    if address is None:
        return None
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class Address:
    """One upstream ``host:port``; ``host`` holds an IPv6 address without its brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listen]]`` table: where clients connect and how TLS is offered to them."""

    key: str
    endpoint: str
    tls: str
    certificates: tuple[Path, ...]
    tls_min_version: str
    require_tls: bool
    proxy_from: tuple[IPNetwork, ...]
    #: TLS session tickets for returning clients (RFC 8446 §2.2, RFC 5077), and how often their key
    #: is replaced (seconds); False turns resumption off
    session_tickets: bool = True
    ticket_key_lifetime: float = DEFAULT_TICKET_KEY_LIFETIME
    #: legacy devices that may log in without STLS although ``require_tls`` is on (their address as
    #: a PROXY header gives it behind ``haproxy:``); each network at most a /24 (IPv4) or /56 (IPv6)
    plaintext_from: tuple[IPNetwork, ...] = ()

    @property
    def haproxy(self) -> bool:
        """Whether clients arrive through a load balancer that sends a PROXY protocol header."""
        return self.endpoint.startswith("haproxy:")

    @property
    def inner_endpoint(self) -> str:
        """The endpoint without ``haproxy:``.

        Implicit TLS behind HAProxy must listen on the inner endpoint and wrap TLS itself: the
        ``haproxy:`` wrapper expects the PROXY header inside TLS, while HAProxy sends it before the
        ClientHello (the PROXY protocol spec, §2: the header is the first thing on the connection).
        """
        return self.endpoint.removeprefix("haproxy:")

    def allows_proxy_peer(self, ip: str) -> bool:
        """Whether the peer at ``ip`` may send a PROXY header, i.e. may claim any client address.

        IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``, seen on dual-stack ``tcp6`` listeners)
        count as their IPv4 address. Anything that is not an IP address is not allowed by this
        check; peers on ``haproxy:unix:`` sockets, which have no address, are left to the socket's
        file permissions by the listener.
        """
        return bool(in_networks(ip, self.proxy_from))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One ``[upstream.NAME]`` table: a POP3 server that users are routed to."""

    name: str
    addresses: tuple[Address, ...]
    tls: str
    connect_timeout: float
    verify: bool
    ca: Path | None
    server_name: str
    login_as: str
    #: one of ``FORWARD_CLIENT_MODES``: how the client's address is passed to this upstream
    forward_client: str = "none"

    def login_name(self, user: str) -> str:
        """The name to send upstream for ``user``, by the ``login_as`` template.

        ``user`` is the session's normalised identity (``RoutingConfig.normalise``), so the
        placeholders get the normalised name too.
        ``{local}`` and ``{domain}`` split at the *last* ``@`` (``a@b@c`` -> ``a@b`` and ``c``),
        the same split that routing uses. Without an ``@``, ``{local}`` is the whole name and
        ``{domain}`` is empty, so the result can be empty: callers must refuse an empty name.
        """
        local, at, domain = user.rpartition("@")
        if not at:
            local, domain = user, ""
        return self.login_as.format(user=user, local=local, domain=domain)


def _normalise_user(user: str, user_case: str) -> str:
    """``user`` as the session's one identity, by a ``user_case`` of ``USER_CASES``.

    ``"lower"``: ``str.lower`` of the whole name (not ``casefold``: Dovecot's ``%Lu`` lowercases).
    ``"preserve"``: the name as sent, except that the domain after the last ``@`` is lowercased,
    since domains are case-insensitive (DNS). Both are idempotent.
    """
    if user_case == "lower":
        return user.lower()
    if user_case != "preserve":
        raise ValueError(f"unknown user_case {user_case!r}")
    local, at, domain = user.rpartition("@")
    return f"{local}@{domain.lower()}" if at else user


@dataclass(frozen=True, slots=True)
class AllowedUpstream:
    """One ``[routing.lookup] allowed_upstreams`` entry: a lookup may route to an address in
    ``network`` on one of ``ports``, and nowhere else."""

    network: IPNetwork
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LookupConfig:
    """``[routing.lookup]``: ask an HTTP service speaking nginx's mail ``auth_http`` protocol where a
    user goes (``popproxy.lookup``), for users that no ``[routing.users]`` entry names.

    ``template`` names the ``[upstream.NAME]`` whose TLS mode, ``verify``, ``ca``, ``server_name``,
    ``connect_timeout`` and ``login_as`` apply to the address the service answers with.
    ``headers`` are extra request headers (name, value), e.g. a shared secret; ``ca`` is the
    trust root for an ``https`` URL (None: the system's). Seconds are floats; ``cache_size`` 0
    turns the cache off.
    """

    url: str
    template: str
    allowed_upstreams: tuple[AllowedUpstream, ...]
    timeout: float = 10.0
    connect_timeout: float = 5.0
    cache_ttl: float = 60.0
    cache_size: int = 10000
    headers: tuple[tuple[str, str], ...] = ()
    send_password: bool = True
    ca: Path | None = None

    def allows(self, host: str, port: int) -> bool:
        """Whether the IP address ``host`` (an IPv4-mapped IPv6 address counting as its IPv4
        address) and ``port`` fall within one ``allowed_upstreams`` entry."""
        return any(port in entry.ports and in_networks(host, (entry.network,)) for entry in self.allowed_upstreams)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Which upstream serves which user (``[routing]``).

    ``users`` holds exact names already normalised by ``user_case``, ``domains`` lowercase domains
    without their ``@``. ``lookup``: the HTTP lookup asked for users that ``route`` finds no
    upstream for (``default`` is then None: the two are exclusive).
    """

    default: str | None
    users: Mapping[str, str]
    domains: Mapping[str, str]
    user_case: str = "lower"
    lookup: LookupConfig | None = None

    def normalise(self, user: str) -> str:
        """The session's one identity for the name ``user`` a client logged in with.

        Routing, per-user limits, hooks' ``users``, logs, audit records and the name sent upstream
        (``login_as``) all use this, so that one mailbox is one user however its name is typed.
        ``"lower"``: ``user.lower()``; ``"preserve"``: the name as sent with its domain (after the
        last ``@``) lowercased.
        """
        return _normalise_user(user, self.user_case)

    def route(self, user: str) -> str | None:
        """The upstream name for the normalised ``user``, or None to refuse the login.

        Precedence: the exact user name (``users``' keys are normalised at load time, so pass
        ``normalise(name)``), then the domain after the last ``@`` (case-insensitive, as DNS is),
        then ``default``.

        With ``lookup`` set, ``default`` is always None, and None means "no static route: ask the
        lookup" (``popproxy.lookup.HTTPRouteLookup``); without ``lookup``, None means "refuse".
        Static entries always win over the lookup, so a few users can be pinned by hand.
        """
        if user in self.users:
            return self.users[user]
        _, at, domain = user.rpartition("@")
        if at and domain.lower() in self.domains:
            return self.domains[domain.lower()]
        return self.default


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Limits and timeouts (``[limits]``): every one has a safe default, documented in
    ``conf/popproxy.toml``. Seconds are floats, counts are ints.

    RFC 1939 §3 requires a server's inactivity autologout timer to be at least 10 minutes, so the
    ``idle_timeout`` default is 600. Shorter values are accepted, for proxies whose clients are
    known, but they break the RFC's promise to slow clients.
    """

    login_timeout: float = DEFAULT_LOGIN_TIMEOUT  # connect to logged in
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # client silence in TRANSACTION
    tls_handshake_timeout: float = 30.0  # a TLS handshake, either leg
    proxy_header_timeout: float = 10.0  # a "haproxy:" listener's PROXY protocol header
    upstream_timeout: float = 120.0  # an upstream answer that does not start or stalls
    max_sessions: int = 1000  # at once, in all
    max_sessions_per_ip: int = 20  # at once, per client address (IPv6: per /64)
    max_sessions_per_user: int = 10  # logged-in sessions at once, per user
    max_pipelined: int = 64  # commands a client may have waiting for answers
    max_buffered: int = 65536  # octets of a client's unhandled input before its socket is paused
    upstream_max_line: int = 1048576  # octets of one line in an upstream's multi-line answer
    max_listing: int = 8 * 1024 * 1024  # octets of the LIST answer, and of the UIDL one, read at login
    message_cache: int = 64 * 1024 * 1024  # octets of hook-processed messages kept for TOP-then-RETR, all sessions
    max_bad_commands: int = 10  # over-long, unknown or out-of-state commands before disconnect
    max_login_failures: int = 3  # per connection, then disconnect
    login_failure_delay: float = 1.0  # after the first failure; doubled for each further one
    ip_table_size: int = 65536  # client addresses whose counters are kept (least recent dropped)
    ip_allowlist: tuple[IPNetwork, ...] = ()  # exempt from per-address limits and penalties (NAT)
    shutdown_grace: float = 30.0  # SIGTERM: seconds sessions get to finish
    spool_above: int = 1048576  # octets of a message for hooks kept in memory; beyond, in a temporary file
    spool_dir: str = ""  # where those files are made (empty: the system's temporary directory)


class HookOptions:
    """A ``[[hook]]`` table's own settings, for the hook's factory to read with type checks.

    Every getter names the file and key in its ``ConfigError``. Call ``finish()`` once everything
    was read: keys nobody asked for are refused, so that a misspelt setting never goes unnoticed.
    Third-party hooks use the same getters.
    """

    def __init__(self, data: dict[str, object], key: str, path: Path, user_case: str = "lower") -> None:
        self._table = _Table(data, key, path, tuple(data))
        self._read: set[str] = set()
        self.key = key
        #: the configuration file, which relative paths are resolved against
        self.config_path = path
        #: ``[routing] user_case``, for hooks that list user names of their own (``normalise_user``)
        self.user_case = user_case
        #: the files ``file()`` returned, by key: a reload reads them (``build.files_read``)
        self.files: dict[str, Path] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._table.data

    @property
    def raw(self) -> dict[str, object]:
        """The table as written (for comparing two configurations)."""
        return self._table.data

    def error(self, name: str, reason: str) -> ConfigError:
        return self._table.error(name, reason)

    def normalise_user(self, entry: str) -> str:
        """A user name (or ``@domain``) the hook lists, normalised as sessions' users are, so that
        comparing it with a session's user is exact (``@domain`` entries: lowercase)."""
        return _normalise_entry(entry, self.user_case)

    def _take(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self._read.add(name)
        return self._table.take(name, kind, default)

    def string(self, name: str, default: Any = _REQUIRED) -> str:
        return self._take(name, str, default)  # type: ignore[no-any-return]

    def boolean(self, name: str, default: Any = _REQUIRED) -> bool:
        return self._take(name, bool, default)  # type: ignore[no-any-return]

    def integer(self, name: str, default: Any = _REQUIRED, minimum: int | None = None) -> int:
        value = self._take(name, int, default)
        if minimum is not None and value is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value  # type: ignore[no-any-return]

    def number(self, name: str, default: Any = _REQUIRED) -> float:
        value = self._take(name, (int, float), default)
        if value is not None and not math.isfinite(value):
            raise self.error(name, f"must be a finite number, not {value!r}")
        return float(value) if value is not None else value  # type: ignore[return-value]

    def seconds(self, name: str, default: float) -> float:
        self._read.add(name)
        return _seconds(self._table, name, default)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> str:
        self._read.add(name)
        return _choice(self._table, name, choices, default)

    def strings(self, name: str, default: Any = _REQUIRED) -> list[str]:
        value = self._take(name, list, default)
        for index, item in enumerate(value or ()):
            if not isinstance(item, str):
                raise self.error(f"{name}[{index}]", f"must be a string, not {_toml_type(item)}")
        return list(value) if value is not None else value  # type: ignore[return-value]

    def file(self, name: str, default: Any = _REQUIRED) -> Path | None:
        """An existing regular file, relative to the configuration file's folder."""
        value = self._take(name, str, default)
        if value is None:
            return None
        self.files[name] = found = _file(self._table, name, value, self.config_path.parent)
        return found

    def path(self, name: str, default: Any = _REQUIRED) -> Path | None:
        """A path that need not exist yet (a folder or file to write), relative to the config's folder."""
        value: str | None = self._take(name, str, default)
        if value is None:
            return None
        if not value:
            raise self.error(name, "must not be empty")
        return self.config_path.parent / value

    def tables(self, name: str) -> list[HookOptions]:
        """An array of tables (``[[hook.rule]]``), each read with its own getters and ``finish()``."""
        value = self._take(name, list, [])
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{name}[{index}]", f"must be a table, not {_toml_type(item)}")
            result.append(HookOptions(item, f"{self.key}.{name}[{index}]", self.config_path, self.user_case))
        return result

    def finish(self) -> None:
        """Refuse the keys that no getter read."""
        for name in self._table.data:
            if name not in self._read:
                raise self.error(name, "unknown key for this hook")


@dataclass(frozen=True, slots=True)
class HookConfig:
    """One ``[[hook]]`` table: the settings every hook has, and its own ``options``.

    :ivar use: a built-in hook name, an entry point name (group ``popproxy.hooks``) or ``module:attr``.
    :ivar name: how the hook is called in logs and verdicts (default: ``use``); unique.
    :ivar users: user names and ``@domain`` entries the hook applies to; empty means everyone. Names
        are normalised by ``[routing] user_case`` at load time, domains lowercased.
    :ivar timeout: seconds a message hook may take over one message.
    :ivar on_error: ``"pass"`` delivers the message as it stood before the hook; ``"refuse"`` answers
        ``-ERR [SYS/TEMP]`` so that the client leaves the message on the server.
    :ivar max_size: a message hook sees messages up to this many octets (upstream size).
    :ivar oversize: what happens to a larger one: ``"pass"`` streams it through without the hook
        (logged, and noted in the audit record); ``"refuse"`` answers its RETR and TOP ``-ERR
        [SYS/PERM]``, so that nothing this hook must see reaches the client unseen.
    """

    key: str
    use: str
    name: str
    users: tuple[str, ...]
    timeout: float
    on_error: str
    max_size: int
    options: HookOptions = field(compare=False, repr=False)
    oversize: str = "pass"

    def same_settings(self, other: HookConfig) -> bool:
        """True if ``other`` configures the same hook the same way (a reload may keep it running)."""
        return (
            self == other
            and self.options.raw == other.options.raw
            and self.options.config_path == other.options.config_path
        )

    def applies_to(self, user: str) -> bool:
        """Whether the hook applies to the normalised ``user`` (``RoutingConfig.normalise``).

        User entries, normalised at load time, must equal ``user``; ``@domain`` entries match the
        domain after the last ``@`` case-insensitively.
        """
        return not self.users or user_listed(self.users, user)


#: The most worker processes ``[process] workers`` may ask for.
MAX_WORKERS = 64
#: The admin socket when ``[process] admin_socket`` is not set.
DEFAULT_ADMIN_SOCKET: Final = "/run/popproxy/admin.sock"
#: The longest path a Unix socket may have on Linux (``sun_path`` less its NUL, unix(7)).
MAX_UNIX_PATH: Final = 107


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    """How the proxy runs (``[process]``). ``workers``: 1 serves sessions in the twistd process
    itself; N > 1 makes it a parent that binds the listeners and the N worker processes serve them
    (``popproxy.workers``).

    ``admin_socket``: the Unix socket of ``popproxy sessions`` / ``popproxy reload``
    (``popproxy.admin``): None when the file does not set it (``DEFAULT_ADMIN_SOCKET``, used if it can
    be), "" for none, else an absolute path (which must then be usable, or the proxy does not start)."""

    workers: int = 1
    admin_socket: str | None = None


#: The endpoint types ``[metrics] endpoint`` may use (no TLS, no PROXY header: a scraper on a trusted network).
METRICS_ENDPOINT_TYPES: Final = ("tcp", "tcp6", "unix")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: where Prometheus scrapes ``/metrics`` and a load balancer asks ``/healthz``.

    ``endpoint`` is a Twisted server endpoint string (``tcp:9110:interface=127.0.0.1``); its type is
    checked here, the rest when it is parsed (``build.check_addresses``). Changing it takes a
    restart: a reload that changes it is refused."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The whole configuration. ``upstreams`` is read-only (a ``MappingProxyType``)."""

    path: Path
    listeners: tuple[ListenerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    routing: RoutingConfig
    limits: LimitsConfig
    hooks: tuple[HookConfig, ...] = ()
    process: ProcessConfig = ProcessConfig()
    metrics: MetricsConfig | None = None


def load_config(path: str | os.PathLike[str], data: bytes | None = None) -> ProxyConfig:
    """Read and validate the configuration file at ``path``.

    The path is made absolute first, so relative file names inside it keep meaning the same
    files after the process changes directory (twistd's ``--rundir``) and on reload.

    ``data``: the file's content, read before (a worker is given what its parent checked, so that
    every worker runs the same configuration whatever the file holds now).

    :raises ConfigError: for any problem, an unreadable file included (key ``-``).
    """
    path = Path(path).absolute()
    if data is None:
        data = read_config(path)
    try:
        text = data.decode("utf-8")  # TOML 1.0: "A TOML file must be a valid UTF-8 encoded Unicode document"
    except UnicodeDecodeError as error:
        raise ConfigError(path, "-", f"not UTF-8: {error}") from None
    return parse_config(text, path)


def read_config(path: Path) -> bytes:
    """The configuration file's bytes. :raises ConfigError: if it cannot be read (key ``-``)."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(path, "-", f"cannot read: {error.strerror or error}") from None


def config_digest(data: bytes) -> str:
    """What names one version of a configuration file between a parent and its workers."""
    return hashlib.sha256(data).hexdigest()


def parse_config(text: str, path: Path) -> ProxyConfig:
    """Validate TOML ``text``; ``path`` names it in errors and anchors relative file names.

    :raises ConfigError: for any problem.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message carries "(at line L, column C)"
        raise ConfigError(path, "-", f"TOML syntax error: {error}") from None
    root = _Table(data, "", path, ("listen", "upstream", "routing", "limits", "hook", "process", "metrics"))
    listeners = _listeners(root, path.parent)
    upstreams = _upstreams(root, path.parent)
    routing = _routing(
        _Table(root.take("routing", dict, {}), "routing", path, ("default", "user_case", "users", "lookup")), upstreams
    )
    limits = _limits(_Table(root.take("limits", dict, {}), "limits", path, _LIMIT_KEYS))
    hooks = _hooks(root, routing.user_case)  # after [routing]: hooks' users are normalised by its user_case
    process = _process(_Table(root.take("process", dict, {}), "process", path, ("workers", "admin_socket")))
    metrics = _metrics(_Table(root.take("metrics", dict), "metrics", path, ("endpoint",))) if "metrics" in root.data else None
    return ProxyConfig(path, listeners, MappingProxyType(upstreams), routing, limits, hooks, process, metrics)


def _metrics(t: _Table) -> MetricsConfig:
    endpoint: str = t.take("endpoint", str)
    kind = endpoint.partition(":")[0]
    if kind not in METRICS_ENDPOINT_TYPES:
        shown = ", ".join(f'"{name}:"' for name in METRICS_ENDPOINT_TYPES)
        raise t.error("endpoint", f"must be a {shown} endpoint, not {endpoint!r}")
    return MetricsConfig(endpoint)


def _process(t: _Table) -> ProcessConfig:
    workers = t.take("workers", int, 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise t.error("workers", f"must be between 1 and {MAX_WORKERS}, not {workers}")
    admin_socket: str | None = t.take("admin_socket", str, None)
    if admin_socket:
        if not admin_socket.startswith("/"):
            raise t.error("admin_socket", f"must be an absolute path (or \"\" for none), not {admin_socket!r}")
        if len(os.fsencode(admin_socket)) > MAX_UNIX_PATH:  # sun_path: 108 octets with the final NUL (unix(7))
            raise t.error("admin_socket", f"is longer than a Unix socket path may be ({MAX_UNIX_PATH} octets)")
    return ProcessConfig(workers, admin_socket)


# --- one function per table ------------------------------------------------------------------------


def _listeners(root: _Table, base: Path) -> tuple[ListenerConfig, ...]:
    tables = root.take("listen", list, [])
    if not tables:
        raise root.error("listen", "at least one [[listen]] table is required")
    return tuple(
        _listener(_Table(table, f"listen[{index}]", root.path, _LISTENER_KEYS), base)
        for index, table in enumerate(tables)
    )


_LISTENER_KEYS = ("endpoint", "tls", "certificate", "tls_min_version", "require_tls", "proxy_from", "session_tickets",
                  "ticket_key_lifetime", "plaintext_from")

#: The widest network ``plaintext_from`` accepts, by IP version: an exception for a few named legacy
#: devices, never for a whole site.
PLAINTEXT_FROM_MAX_PREFIX = {4: 24, 6: 56}


def _listener(t: _Table, base: Path) -> ListenerConfig:
    endpoint = _endpoint(t)
    tls = _choice(t, "tls", TLS_MODES)
    if tls == "none":
        t.reject_if_present(("certificate", "tls_min_version", "session_tickets", "ticket_key_lifetime"),
                            'has no effect with tls = "none"')
        certificates: tuple[Path, ...] = ()
    else:
        certificates = tuple(_file(t, key, name, base) for key, name in _strings(t, "certificate"))
    tls_min_version = _choice(t, "tls_min_version", TLS_VERSIONS, "1.2")
    if tls != "starttls":
        # implicit TLS is always on; on a plain listener "require_tls = true" would be a lie
        t.reject_if_present(("require_tls",), 'only applies to tls = "starttls" listeners')
    require_tls = t.take("require_tls", bool, True) if tls == "starttls" else False
    haproxy = endpoint.startswith("haproxy:")
    if not haproxy:
        t.reject_if_present(("proxy_from",), 'only applies to "haproxy:" endpoints')
    proxy_from = _networks(t, "proxy_from", DEFAULT_PROXY_FROM) if haproxy else ()
    session_tickets = t.take("session_tickets", bool, True)
    if not session_tickets:
        t.reject_if_present(("ticket_key_lifetime",), "has no effect with session_tickets = false")
    lifetime = _seconds(t, "ticket_key_lifetime", DEFAULT_TICKET_KEY_LIFETIME)
    if not require_tls:
        t.reject_if_present(("plaintext_from",), 'only applies to tls = "starttls" listeners with require_tls = true')
    plaintext_from = _networks(t, "plaintext_from", (), allow_empty=True)
    for index, network in enumerate(plaintext_from):
        widest = PLAINTEXT_FROM_MAX_PREFIX[network.version]
        if network.prefixlen < widest:
            raise t.error(f"plaintext_from[{index}]",
                          f"{network} is wider than a /{widest}: name the legacy devices, not a whole network")
    return ListenerConfig(t.key, endpoint, tls, certificates, tls_min_version, require_tls, proxy_from,
                          session_tickets, lifetime, plaintext_from)


def _endpoint(t: _Table) -> str:
    """Check the endpoint's type only; Twisted parses the rest when the listener starts."""
    endpoint: str = t.take("endpoint", str)
    kind, _, arguments = endpoint.removeprefix("haproxy:").partition(":")
    if kind in ("ssl", "tls"):
        raise t.error(
            "endpoint",
            f'"{kind}:" endpoints are not allowed: TLS comes from the listener\'s tls key '
            '(tls = "implicit" with a tcp: endpoint)',
        )
    if kind not in ENDPOINT_TYPES:
        raise t.error(
            "endpoint",
            f'endpoint type must be one of {", ".join(ENDPOINT_TYPES)} (optionally behind "haproxy:"), '
            f"not {kind!r}",
        )
    if not arguments:
        raise t.error("endpoint", f'{endpoint!r} lacks its arguments, e.g. "tcp:110"')
    return endpoint


def _networks(t: _Table, name: str, default: tuple[str, ...], allow_empty: bool = False) -> tuple[IPNetwork, ...]:
    values = t.take(name, list, list(default))
    if not values and not allow_empty:
        raise t.error(name, "must not be empty: no load balancer could connect")
    networks = []
    for index, value in enumerate(values):
        key = f"{name}[{index}]"
        if not isinstance(value, str):
            raise t.error(key, f"must be a string, not {_toml_type(value)}")
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as error:  # e.g. "10.0.0.1/8 has host bits set"
            raise t.error(key, str(error)) from None
    return tuple(networks)


def _upstreams(root: _Table, base: Path) -> dict[str, UpstreamConfig]:
    tables = root.take("upstream", dict, {})
    if not tables:
        raise root.error("upstream", "at least one [upstream.NAME] table is required")
    upstreams = {}
    for name, table in tables.items():
        key = f"upstream.{name}"
        if not _UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(root.path, key, "upstream names may only use letters, digits, '_' and '-'")
        upstreams[name] = _upstream(name, _Table(table, key, root.path, _UPSTREAM_KEYS), base)
    return upstreams


_UPSTREAM_KEYS = ("address", "tls", "connect_timeout", "verify", "ca", "server_name", "login_as", "forward_client")


def _upstream(name: str, t: _Table, base: Path) -> UpstreamConfig:
    addresses = tuple(_address(t, key, text) for key, text in _strings(t, "address"))
    tls = _choice(t, "tls", TLS_MODES)
    connect_timeout = _seconds(t, "connect_timeout", 10.0)
    if tls == "none":
        t.reject_if_present(("verify", "ca", "server_name"), 'has no effect with tls = "none"')
    verify = t.take("verify", bool, True)
    ca_name = t.take("ca", str, None)
    if ca_name is not None and not verify:
        raise t.error("ca", "has no effect with verify = false")
    ca = None if ca_name is None else _file(t, "ca", ca_name, base)
    server_name = t.take("server_name", str, addresses[0].host)
    if not server_name or server_name != server_name.strip() or server_name.startswith("["):
        raise t.error("server_name", f"{server_name!r} is not a host name or IP address (no brackets)")
    login_as = _login_as(t)
    forward_client = _choice(t, "forward_client", FORWARD_CLIENT_MODES, "none")
    return UpstreamConfig(name, addresses, tls, connect_timeout, verify, ca, server_name, login_as, forward_client)


def _address(t: _Table, key: str, text: str) -> Address:
    """Parse ``host:port`` or ``[IPv6]:port``; no default port, since it depends on the TLS mode."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise t.error(key, f'{text!r}: expected "[IPv6 address]:port"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise t.error(key, f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon or not host:
            raise t.error(key, f'{text!r}: expected "host:port"')
        if ":" in host:
            raise t.error(key, f'{text!r}: put an IPv6 address in brackets, as in "[::1]:110"')
    if any(c.isspace() for c in host):
        raise t.error(key, f"{text!r}: the host contains white space")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise t.error(key, f"{text!r}: the port must be a number from 1 to 65535")
    return Address(host, int(port))


def _login_as(t: _Table) -> str:
    template: str = t.take("login_as", str, "{user}")
    allowed = ", ".join(f"{{{name}}}" for name in LOGIN_PLACEHOLDERS)
    if not template:
        raise t.error("login_as", f"must not be empty; use {allowed}")
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
        ]
    except ValueError as error:  # "{user" and friends
        raise t.error("login_as", f"{template!r} is not a valid template: {error}") from None
    for name, spec, conversion in fields:
        if name is None:
            continue  # literal text only
        if name not in LOGIN_PLACEHOLDERS or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise t.error("login_as", f"{shown} is not allowed: the only placeholders are {allowed}")
    return template


def _routing(t: _Table, upstreams: Mapping[str, UpstreamConfig]) -> RoutingConfig:
    def check_target(key: str, target: object) -> str:
        if not isinstance(target, str):
            raise ConfigError(t.path, key, f"must be an upstream name (a string), not {_toml_type(target)}")
        if target not in upstreams:
            known = ", ".join(sorted(upstreams))
            raise ConfigError(t.path, key, f"unknown upstream {target!r} (defined: {known})")
        return target

    default = t.take("default", str, None)
    if default is not None:
        check_target("routing.default", default)
    user_case = _choice(t, "user_case", USER_CASES, "lower")
    users: dict[str, str] = {}
    user_keys: dict[str, str] = {}
    domains: dict[str, str] = {}
    domain_keys: dict[str, str] = {}
    for name, target in t.take("users", dict, {}).items():
        key = f"routing.users.{name}"
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise ConfigError(
                t.path, key, "a user name must be non-empty, without spaces or control characters"
            )
        target = check_target(key, target)
        if not name.startswith("@"):
            user = _normalise_user(name, user_case)
            if user in users:
                raise ConfigError(
                    t.path,
                    key,
                    f"same user as {user_keys[user]!r} once normalised to {user!r} "
                    f'(user_case = "{user_case}")',
                )
            users[user] = target
            user_keys[user] = name
            continue
        domain = name[1:].lower()
        if not domain or "@" in domain:
            raise ConfigError(t.path, key, 'a domain entry must look like "@example.org"')
        if domain in domains:
            raise ConfigError(
                t.path, key, f"same domain as {domain_keys[domain]!r}: domains match case-insensitively"
            )
        domains[domain] = target
        domain_keys[domain] = name
    lookup = None
    if "lookup" in t.data:
        lookup = _lookup(_Table(t.take("lookup", dict), "routing.lookup", t.path, _LOOKUP_KEYS), upstreams)
        if default is not None:
            raise ConfigError(
                t.path, "routing.default",
                "cannot be combined with routing.lookup: users without a [routing.users] entry are "
                "routed by the lookup (route the rest with a catch-all in the lookup service)",
            )
    if default is None and not users and not domains and lookup is None:
        raise ConfigError(
            t.path, "routing", "no routes: set routing.default, add [routing.users] entries or configure routing.lookup"
        )
    return RoutingConfig(default, MappingProxyType(users), MappingProxyType(domains), user_case, lookup)


_LOOKUP_KEYS: Final = ("url", "template", "allowed_upstreams", "timeout", "connect_timeout", "cache_ttl",
                       "cache_size", "headers", "send_password", "ca")
# RFC 9110 §5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Request headers popproxy writes itself (nginx's auth_http request): extra headers may not replace them.
_LOOKUP_OWN_HEADERS: Final = ("host", "auth-method", "auth-user", "auth-pass", "auth-protocol", "auth-login-attempt",
                              "client-ip", "client-host", "connection", "content-length", "transfer-encoding")


def _lookup(t: _Table, upstreams: Mapping[str, UpstreamConfig]) -> LookupConfig:
    url: str = t.take("url", str)
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise t.error("url", f"{url!r}: only printable ASCII without spaces (percent-encode the rest)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise t.error("url", f'{url!r}: expected "http://host[:port]/path" or "https://..."')
    if "@" in parts.netloc or parts.fragment:
        raise t.error("url", f"{url!r}: no user name, password or #fragment in the URL (send a secret in headers)")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as error:
        raise t.error("url", f"{url!r}: {error}") from None
    if not parts.hostname:
        raise t.error("url", f"{url!r}: no host")
    scheme = parts.scheme
    template: str = t.take("template", str)
    if template not in upstreams:
        known = ", ".join(sorted(upstreams))
        raise t.error("template", f"unknown upstream {template!r} (defined: {known})")
    allowed = _allowed_upstreams(t)
    timeout = _seconds(t, "timeout", 10.0)
    connect_timeout = _seconds(t, "connect_timeout", min(5.0, timeout))
    if connect_timeout > timeout:
        raise t.error("connect_timeout", f"must not exceed timeout ({timeout:g} s), which bounds the whole answer")
    cache_ttl = _seconds(t, "cache_ttl", 60.0)
    cache_size = t.take("cache_size", int, 10000)
    if cache_size < 0:
        raise t.error("cache_size", f"must be a number of entries, 0 or more (0 turns the cache off), not {cache_size}")
    headers: list[tuple[str, str]] = []
    for name, value in t.take("headers", dict, {}).items():
        key = f"headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise t.error(key, "not a valid HTTP header name (RFC 9110 §5.1: letters, digits and !#$%&'*+.^_`|~-)")
        if name.lower() in _LOOKUP_OWN_HEADERS:
            raise t.error(key, "popproxy sends this header itself (as nginx's auth_http does)")
        if not isinstance(value, str):
            raise t.error(key, f"must be a string, not {_toml_type(value)}")
        if not value.isascii() or any(not c.isprintable() for c in value) or value != value.strip():
            raise t.error(key, "the value must be printable ASCII without leading or trailing spaces")
        headers.append((name, value))
    send_password = t.take("send_password", bool, True)
    ca_name = t.take("ca", str, None)
    if ca_name is not None and scheme != "https":
        raise t.error("ca", "only applies to an https:// url")
    ca = None if ca_name is None else _file(t, "ca", ca_name, t.path.parent)
    return LookupConfig(url, template, allowed, timeout, connect_timeout, cache_ttl, cache_size, tuple(headers),
                        send_password, ca)


def _allowed_upstreams(t: _Table) -> tuple[AllowedUpstream, ...]:
    """``allowed_upstreams = [{ network = "10.0.0.0/8", ports = [110, 995] }, ...]``: required and
    non-empty, so that no answer of the lookup service can make popproxy connect anywhere else."""
    entries = t.take("allowed_upstreams", list)
    if not entries:
        raise t.error("allowed_upstreams", 'must list at least one { network = "...", ports = [...] }')
    allowed = []
    for index, entry in enumerate(entries):
        e = _Table(entry, f"{t.key}.allowed_upstreams[{index}]", t.path, ("network", "ports"))
        text = e.take("network", str)
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as error:  # e.g. "10.0.0.1/8 has host bits set", or a host name
            raise e.error("network", f"{text!r}: {error}") from None
        ports = e.take("ports", list)
        if not ports:
            raise e.error("ports", "must list at least one port, e.g. [110, 995]")
        for number, port in enumerate(ports):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise e.error(f"ports[{number}]", f"must be a port number from 1 to 65535, not {_toml_type(port)}")
        allowed.append(AllowedUpstream(network, tuple(ports)))
    return tuple(allowed)


DEFAULT_HOOK_TIMEOUT: Final = 10.0
DEFAULT_HOOK_MAX_SIZE: Final = 4 * 1024 * 1024
HOOK_ERROR_POLICIES: Final = ("pass", "refuse")
_HOOK_KEYS: Final = ("use", "name", "users", "timeout", "on_error", "max_size", "oversize")


def _hooks(root: _Table, user_case: str) -> tuple[HookConfig, ...]:
    tables = root.take("hook", list, [])
    hooks: list[HookConfig] = []
    for index, table in enumerate(tables):
        key = f"hook[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(root.path, key, f"must be a table, not {_toml_type(table)}")
        common = {name: value for name, value in table.items() if name in _HOOK_KEYS}
        own = {name: value for name, value in table.items() if name not in _HOOK_KEYS}
        t = _Table(common, key, root.path, _HOOK_KEYS)
        use = t.take("use", str)
        if not use:
            raise t.error("use", "must name a hook")
        name = t.take("name", str, use)
        if any(hook.name == name for hook in hooks):
            raise t.error("name", f"another hook is already called {name!r}: give each a distinct name")
        users = []
        for entry_key, entry in _strings(t, "users") if "users" in common else []:
            if not entry or entry == "@" or any(c.isspace() for c in entry):
                raise t.error(entry_key, f"must be a user name or @domain, not {entry!r}")
            users.append(_normalise_entry(entry, user_case))
        max_size = t.take("max_size", int, DEFAULT_HOOK_MAX_SIZE)
        if max_size < 1:
            raise t.error("max_size", f"must be a number of octets greater than 0, not {max_size}")
        hooks.append(
            HookConfig(
                key=key,
                use=use,
                name=name,
                users=tuple(users),
                timeout=_seconds(t, "timeout", DEFAULT_HOOK_TIMEOUT),
                on_error=_choice(t, "on_error", HOOK_ERROR_POLICIES, "pass"),
                max_size=max_size,
                options=HookOptions(own, key, root.path, user_case),
                oversize=_choice(t, "oversize", ("pass", "refuse"), "pass"),
            )
        )
    return tuple(hooks)


def _normalise_entry(entry: str, user_case: str) -> str:
    """A hook's ``users`` entry as sessions' users are compared: ``@domain`` lowercased, a user name
    normalised by ``user_case``."""
    return entry.lower() if entry.startswith("@") else _normalise_user(entry, user_case)


_LIMIT_KEYS: Final = tuple(f.name for f in fields(LimitsConfig))


def _limits(t: _Table) -> LimitsConfig:
    values: dict[str, Any] = {}
    for spec in fields(LimitsConfig):
        name, default = spec.name, spec.default
        if name not in t.data:
            continue
        if name == "ip_allowlist":
            values[name] = _networks(t, name, (), allow_empty=True)
        elif name == "spool_dir":
            folder = t.take(name, str)
            path = (t.path.parent / folder) if folder else None
            if path is not None and not path.is_dir():
                raise t.error(name, f"{path}: no such directory")
            values[name] = str(path) if path is not None else ""
        elif isinstance(default, float):
            values[name] = _seconds(t, name, default)
        else:
            value = t.take(name, int)
            if value < 1:
                raise t.error(name, f"must be a whole number of at least 1, not {value}")
            values[name] = value
    return LimitsConfig(**values)


# --- typed access to one table -----------------------------------------------------------------------

class _Table:
    """One TOML table being read: unknown keys are refused up front, then ``take`` type-checks.

    Checking unknown keys first means a misspelt key is reported as such ("did you mean ...")
    rather than as the required key it was meant to be.
    """

    def __init__(self, data: object, key: str, path: Path, keys: Collection[str]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, key or "-", f"must be a table, not {_toml_type(data)}")
        self.data: dict[str, object] = data
        self.key = key
        self.path = path
        for name in data:
            if name not in keys:
                close = difflib.get_close_matches(name, keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(keys)}"
                raise self.error(name, "unknown key" + hint)

    def error(self, name: str, reason: str) -> ConfigError:
        """An error about ``name`` in this table (``name`` may carry an index: ``address[1]``)."""
        return ConfigError(self.path, f"{self.key}.{name}" if self.key else name, reason)

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        """The value of ``name`` if it is a ``kind`` (a bool is never an int), else ``default``."""
        if name not in self.data:
            if default is _REQUIRED:
                raise self.error(name, "required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        bool_refused = isinstance(value, bool) and bool not in kinds and object not in kinds
        if not isinstance(value, kinds) or bool_refused:
            expected = _TYPE_NAMES.get(kinds) or " or ".join(_TYPE_NAMES[(k,)] for k in kinds)
            raise self.error(name, f"must be {expected}, not {_toml_type(value)}")
        return value

    def reject_if_present(self, names: tuple[str, ...], reason: str) -> None:
        for name in names:
            if name in self.data:
                raise self.error(name, reason)


_TYPE_NAMES: Final[dict[tuple[type, ...], str]] = {
    (str,): "a string",
    (int,): "an integer",
    (float,): "a number",
    (bool,): "a boolean (true or false)",
    (list,): "an array",
    (dict,): "a table",
    (int, float): "a number",
    (str, list): "a string or an array of strings",
}


def _toml_type(value: object) -> str:
    """How TOML calls the type of ``value``, for messages."""
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string")):
        if isinstance(value, kind):
            return f"{name} {value!r}"
    if isinstance(value, list):
        return "an array"
    return "a table" if isinstance(value, dict) else "a date/time"


def _choice(t: _Table, name: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> str:
    value = t.take(name, object, default)
    if value not in choices or not isinstance(value, str):
        shown = ", ".join(f'"{choice}"' for choice in choices)
        raise t.error(name, f"must be one of {shown}, not {_toml_type(value)}")
    return value


def _seconds(t: _Table, name: str, default: float) -> float:
    value = t.take(name, (int, float), default)
    if not (math.isfinite(value) and value > 0):
        raise t.error(name, f"must be a number of seconds greater than 0, not {value!r}")
    return float(value)


def _strings(t: _Table, name: str) -> list[tuple[str, str]]:
    """A required string, or non-empty array of strings, as ``(key, string)`` pairs for messages."""
    value = t.take(name, (str, list))
    if isinstance(value, str):
        return [(name, value)]
    if not value:
        raise t.error(name, "must not be an empty array")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise t.error(f"{name}[{index}]", f"must be a string, not {_toml_type(item)}")
    return [(f"{name}[{index}]", item) for index, item in enumerate(value)]


def _file(t: _Table, key: str, name: str, base: Path) -> Path:
    """Resolve ``name`` against the config file's directory and require a regular file there."""
    if not name:
        raise t.error(key, "must not be empty")
    path = base / name  # an absolute name replaces base
    if not path.is_file():
        reason = "not a regular file" if path.exists() else "no such file"
        raise t.error(key, f"{path}: {reason}")
    return path
