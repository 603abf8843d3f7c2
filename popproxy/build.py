"""From a checked configuration to the running pieces: one function for ``--check``, start and reload.

``build(config, reactor)`` makes everything a configuration needs before a connection comes: the
endpoints' canonical forms (and that no two listeners want the same address), every listener's TLS
context, every upstream's trust roots, the hooks, the routing lookup. ``--check``
(``tap.validated_config``) builds and throws the result away; start hands it to the service
(``ProxyService``, or each worker's); a reload builds the new file the same way, and
``reload_refusal`` says whether it may replace the running one. The three cannot disagree, because
they are the same code.

Listeners are known by their **normalised endpoint** (``ListenEndpoint``), never by their position in
the file: ``tcp:110``, ``tcp:port=110`` and ``tcp:110:interface=0.0.0.0`` are one endpoint. The
normal form comes from Twisted's own endpoint-string parser,
``twisted.internet.endpoints._parseServer`` (private, but the code behind ``serverFromString`` since
Twisted 10.2; ``tests/test_build.py`` pins what popproxy relies on). It returns, for ``tcp:`` and
``unix:``, the arguments of ``listenTCP``/``listenUNIX`` with their defaults applied (port as an int,
``interface``/``backlog``, ``mode``/``backlog``/``wantPID``), and for plugin types (``tcp6:``,
``systemd:``) the plugin and its raw arguments, which are bound here to the signature of the plugin's
own parser so that the defaults are Twisted's too.

Files a reload reads are read by the user twistd drops to (``-u``/``-g``): ``unreadable_files`` checks,
as that user, that it can read each of them (``--check`` and start refuse otherwise).
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import endpoints as _endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import ConfigError, ListenerConfig, ProxyConfig, ip_of
from .hooks.registry import BuiltHook, build_hooks
from .lookup import HTTPRouteLookup
from .tls import ServerTLS, client_tls

log = Logger()

__all__ = [
    "Built",
    "ListenEndpoint",
    "SocketAddress",
    "build",
    "check_addresses",
    "close_hooks",
    "files_read",
    "listener_addresses",
    "normalise_endpoint",
    "pair_listeners",
    "reload_refusal",
    "route_lookup",
    "unreadable_files",
]


# --- endpoints in one canonical form ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """Where a server endpoint listens, in one canonical form.

    :ivar kind: ``tcp`` (IPv4), ``tcp6``, ``unix`` or ``systemd``.
    :ivar host: ``tcp``/``tcp6``: the interface, an IP address in its compressed form (``0.0.0.0``
        and ``::`` for every address) or a host name, lowercased; ``unix``: the path, absolute ones
        with their folder's symbolic links resolved, relative ones (taken by Twisted relative to the
        directory twistd runs in) only tidied; ``systemd``: the address family (``INET``).
    :ivar port: ``tcp``/``tcp6``: the port (0: any free one, so never the same as another's).
    :ivar selector: ``systemd``: ``index=N`` or ``name=NAME`` of the inherited socket.
    """

    kind: str
    host: str
    port: int = 0
    selector: str = ""

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"{self.host}:{self.port}"
        if self.kind == "tcp6":
            return f"[{self.host}]:{self.port}"
        if self.kind == "unix":
            return self.host
        return f"systemd socket {self.host} {self.selector}"

    @property
    def _ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The interface as an IP address (an IPv4-mapped IPv6 one as IPv4); None for a host name."""
        return ip_of(self.host)

    def overlaps(self, other: SocketAddress) -> bool:
        """Whether listening on both at once would fail (or one would take the other's clients).

        TCP: the same port (not 0) and the same address, or a wildcard covering the other: ``0.0.0.0``
        covers every IPv4 address, ``::`` every address, IPv4 included (Twisted's ``tcp6:`` endpoints
        leave ``IPV6_V6ONLY`` at the system's default, which on Linux is dual-stack: ipv6(7),
        ``bindv6only``). Host names are compared as written. Others: the same path or socket.
        """
        tcp = ("tcp", "tcp6")
        if self.kind in tcp and other.kind in tcp:
            if self.port != other.port or self.port == 0:
                return False
            if self.kind == other.kind and self.host == other.host:
                return True
            mine, theirs = self._ip, other._ip
            if mine is None or theirs is None:
                return False
            return mine == theirs or _covers(self, mine, theirs) or _covers(other, theirs, mine)
        return (self.kind, self.host, self.selector) == (other.kind, other.host, other.selector)


def _covers(wild: SocketAddress, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
            other: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not address.is_unspecified:
        return False
    return wild.kind == "tcp6" or other.version == 4  # "::" (dual-stack) covers all; 0.0.0.0 all IPv4


@dataclass(frozen=True, slots=True)
class ListenEndpoint:
    """A ``[[listen]] endpoint`` (or ``[metrics] endpoint``) in canonical form: what identifies a
    listener across reloads. Two strings that Twisted would listen with identically are equal.

    :ivar options: the other arguments that shape the listening socket, with Twisted's defaults
        filled in (``backlog``; for ``unix:`` also ``mode`` and ``lockfile``): changing one needs a
        new socket, so it is part of the identity.
    """

    address: SocketAddress
    haproxy: bool = False
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        """A Twisted endpoint string for it, with every argument spelt out."""
        address = self.address
        if address.kind in ("tcp", "tcp6"):
            text = f"{address.kind}:{address.port}:interface={_endpoints.quoteStringArgument(address.host)}"
        elif address.kind == "unix":
            text = f"unix:{_endpoints.quoteStringArgument(address.host)}"
        else:
            text = f"systemd:domain={address.host}:{address.selector}"
        text += "".join(f":{name}={value}" for name, value in self.options)
        return ("haproxy:" if self.haproxy else "") + text


def normalise_endpoint(description: str) -> ListenEndpoint:
    """The canonical form of a server endpoint string (see the module docstring for how).

    :raises ValueError: for a string Twisted cannot parse, or a type popproxy does not listen on.
    """
    haproxy = description.startswith("haproxy:")
    inner = description.removeprefix("haproxy:")
    try:
        name_or_plugin, args, kwargs = _endpoints._parseServer(inner, None)
        if name_or_plugin == "TCP":
            port, _factory = args
            host = _interface(kwargs["interface"], 4)
            return ListenEndpoint(SocketAddress("tcp", host, port), haproxy, (("backlog", str(kwargs["backlog"])),))
        if name_or_plugin == "UNIX":
            path, _factory = args
            options = (("mode", f"{kwargs['mode']:o}"), ("backlog", str(kwargs["backlog"])),
                       ("lockfile", str(int(kwargs["wantPID"]))))
            return ListenEndpoint(SocketAddress("unix", _unix_path(path)), haproxy, options)
        if isinstance(name_or_plugin, str):  # "SSL": refused by the configuration already
            raise ValueError(f"{name_or_plugin.lower()}: endpoints are not listened on by popproxy")
        plugin = name_or_plugin
        # The plugin's own parser, bound (not called: a systemd one would look its socket up).
        bound = inspect.signature(plugin._parseServer).bind(None, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        if plugin.prefix == "tcp6":
            host = _interface(str(given["interface"]), 6)
            return ListenEndpoint(SocketAddress("tcp6", host, int(given["port"])), haproxy,
                                  (("backlog", str(int(given["backlog"]))),))
        if plugin.prefix == "systemd":
            index, name = given["index"], given["name"]
            if (index is None) == (name is None):
                raise ValueError("give exactly one of index= and name=")
            selector = f"index={int(index)}" if index is not None else f"name={name}"
            return ListenEndpoint(SocketAddress("systemd", str(given["domain"]).upper(), selector=selector), haproxy)
        raise ValueError(f"{plugin.prefix}: endpoints are not listened on by popproxy")
    except TypeError as error:  # an argument the parser does not take, or one missing
        raise ValueError(str(error)) from None


def _interface(text: str, version: int) -> str:
    if not text:
        return "0.0.0.0" if version == 4 else "::"  # Twisted's defaults: every address
    host, percent, scope = text.partition("%") if version == 6 else (text, "", "")  # fe80::1%eth0
    try:
        return str(ipaddress.ip_address(host)) + percent + scope
    except ValueError:
        return text.lower()  # a host name


def _unix_path(path: str) -> str:
    if not os.path.isabs(path):
        return os.path.normpath(path)  # relative to wherever twistd runs: resolved there, not here
    folder, name = os.path.split(os.path.normpath(path))
    return os.path.join(os.path.realpath(folder), name)


def listen_endpoint(listener: ListenerConfig) -> ListenEndpoint:
    """``listener``'s endpoint, normalised (the configuration was checked: it parses)."""
    return normalise_endpoint(listener.endpoint)


def check_addresses(config: ProxyConfig) -> None:
    """Parse every endpoint and refuse two that would listen on the same address (a listener and
    ``[metrics]`` included): the second would fail to bind at start, or, with a wildcard, take the
    other's clients.

    :raises ConfigError: naming the second endpoint's key, both endpoints and the address.
    """
    seen: list[tuple[str, str, SocketAddress]] = []
    endpoints = [(f"{listener.key}.endpoint", listener.endpoint) for listener in config.listeners]
    if config.metrics is not None:
        endpoints.append(("metrics.endpoint", config.metrics.endpoint))
    for key, text in endpoints:
        try:
            address = normalise_endpoint(text).address
        except ValueError as error:
            raise ConfigError(config.path, key, f"invalid endpoint: {error}") from None
        for other_key, other_text, other in seen:
            if address.overlaps(other):
                where = f"both listen on {address}" if address == other else f"{other} and {address} overlap"
                raise ConfigError(config.path, key, f"{text!r} and {other_key.removesuffix('.endpoint')} ({other_text!r}) "
                                                    f"{where}: every listener needs an address of its own")
        seen.append((key, text, address))


def pair_listeners(running: Sequence[ListenerConfig],
                   new: Sequence[ListenerConfig]) -> list[tuple[ListenerConfig, ListenerConfig]] | None:
    """Each running listener with the new table for the same normalised endpoint, in the running
    order; None unless both name the same endpoints. Endpoints on port 0 (which are never the same
    socket twice) pair in the order they come."""
    waiting: dict[ListenEndpoint, list[ListenerConfig]] = {}
    for listener in new:
        waiting.setdefault(listen_endpoint(listener), []).append(listener)
    pairs = []
    for listener in running:
        queue = waiting.get(listen_endpoint(listener))
        if not queue:
            return None
        pairs.append((listener, queue.pop(0)))
    if any(waiting.values()):
        return None
    return pairs


def reload_refusal(running: ProxyConfig, new: ProxyConfig) -> str | None:
    """Why ``new`` cannot replace ``running`` without a restart, or None if it can.

    Listen sockets are bound once, before twistd drops privileges: a reload may change everything
    about a listener (``tls``, ``require_tls``, certificates, ``tls_min_version``, ``proxy_from``,
    ``plaintext_from``, session tickets) but not its endpoint, which identifies it. Adding, removing
    or changing an endpoint, or ``[metrics] endpoint``, refuses the whole reload.
    """
    if pair_listeners(running.listeners, new.listeners) is None:
        before = [listen_endpoint(listener) for listener in running.listeners]
        after = [listen_endpoint(listener) for listener in new.listeners]
        changes = [f"{listener.key} ({listener.endpoint!r}) is new" for listener, endpoint in zip(new.listeners, after, strict=True)
                   if endpoint not in before]
        changes += [f"{listener.endpoint!r} ({listener.key} of the running configuration) is gone"
                    for listener, endpoint in zip(running.listeners, before, strict=True) if endpoint not in after]
        if not changes:
            changes = [f"{len(after)} listener(s) instead of {len(before)}"]
        return (f"{new.path}: listen: {'; '.join(changes)}: adding, removing or changing a listener's endpoint "
                "needs a restart (nothing was changed)")
    if _metrics_endpoint(running) != _metrics_endpoint(new):
        was = running.metrics.endpoint if running.metrics is not None else "none"
        now = new.metrics.endpoint if new.metrics is not None else "none"
        return (f"{new.path}: metrics.endpoint: changed from {was!r} to {now!r}: [metrics] changes need a "
                "restart (nothing was changed)")
    return None


def _metrics_endpoint(config: ProxyConfig) -> ListenEndpoint | None:
    return normalise_endpoint(config.metrics.endpoint) if config.metrics is not None else None


# --- the running pieces -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """What ``build`` made from ``config``: ready for sessions, nothing started, nothing bound.

    :ivar server_tls: each TLS listener's context, by its key in ``config``.
    :ivar lookup: the ``[routing.lookup]`` client, if configured.
    """

    config: ProxyConfig
    hooks: tuple[BuiltHook, ...]
    server_tls: dict[str, ServerTLS]
    lookup: HTTPRouteLookup | None = None

    def close(self) -> None:
        """Throw the pieces away unused (``--check``, a refused reload)."""
        close_hooks(self.hooks)


def build(config: ProxyConfig, reactor: IReactorTime) -> Built:
    """Build everything ``config`` needs to serve, checking all that can be checked without
    listening: endpoint strings and their addresses (``check_addresses``), every listener's
    certificates (a key that does not match its certificate fails here, not at the first handshake),
    every TLS upstream's trust roots and name, every hook, and the routing lookup.

    Nothing is started and nothing is bound; hooks do no I/O until started (``start_hooks``).

    :raises ConfigError: naming the file, the key and the reason.
    """
    check_addresses(config)
    server_tls = {
        listener.key: ServerTLS.from_listener(listener, config.path)
        for listener in config.listeners
        if listener.tls != "none"
    }
    for upstream in config.upstreams.values():
        if upstream.tls != "none":
            client_tls(upstream, config_path=config.path)
    hooks = build_hooks(config)
    try:
        for built in hooks:
            if config.process.workers > 1 and built.gatekeeper is not None:
                # A worker's audit lines are written by the parent, which cannot yet tell the worker
                # that a write failed: refusing mail while records are lost needs one process.
                raise ConfigError(config.path, f"{built.config.key}.on_write_error",
                                  '"refuse" needs [process] workers = 1 (the workers\' parent writes the '
                                  "audit file and cannot stop them moving mail yet)")
        lookup = route_lookup(config, reactor)
    except BaseException:
        close_hooks(hooks)
        raise
    return Built(config, hooks, server_tls, lookup)


def listener_addresses(config: ProxyConfig) -> list[tuple[str, int]]:
    """``(interface, port)`` of every TCP listener (``tcp:``/``tcp6:``, behind ``haproxy:`` too), in
    the normal form (``0.0.0.0``/``::`` for every address): the ``own_listeners`` a routing lookup
    must never send a user to. Port 0 and other kinds (``unix:``, ``systemd:``) are left out."""
    found = []
    for listener in config.listeners:
        address = listen_endpoint(listener).address
        if address.kind in ("tcp", "tcp6") and address.port != 0:
            found.append((address.host, address.port))
    return found


def route_lookup(config: ProxyConfig, reactor: IReactorTime) -> HTTPRouteLookup | None:
    """The ``[routing.lookup]`` service client for ``config``, if it has one."""
    lookup = config.routing.lookup
    if lookup is None:
        return None
    return HTTPRouteLookup(lookup, config.upstreams, reactor, own_listeners=listener_addresses(config))


def close_hooks(hooks: Iterable[BuiltHook]) -> None:
    """Close each hook; one that fails to close is logged, and the others are still closed."""
    for built in hooks:
        try:
            built.close()
        except Exception:
            log.failure("hook {hook} failed to close", hook=built.config.name)


# --- files a reload reads, as the user it runs as -----------------------------------------------------


def files_read(config: ProxyConfig) -> list[tuple[str, Path]]:
    """Every file a reload of ``config`` reads, with the key that names it: the configuration file
    itself, listener certificates and keys, upstream and lookup CA files, and files hooks take with
    ``HookOptions.file``."""
    found: list[tuple[str, Path]] = [("-", config.path)]
    for listener in config.listeners:
        several = len(listener.certificates) > 1
        found += [(f"{listener.key}.certificate" + (f"[{index}]" if several else ""), path)
                  for index, path in enumerate(listener.certificates)]
    found += [(f"upstream.{name}.ca", upstream.ca) for name, upstream in config.upstreams.items()
              if upstream.ca is not None and upstream.tls != "none" and upstream.verify]
    lookup = config.routing.lookup
    if lookup is not None and lookup.ca is not None:
        found.append(("routing.lookup.ca", lookup.ca))
    for hook in config.hooks:
        found += [(f"{hook.key}.{name}", path) for name, path in hook.options.files.items()]
    return found


# Runs as root, becomes the user exactly as twistd does (``switchUID``: setgid, initgroups, setuid),
# then opens each file: the kernel's own permission check, ACLs and all.
_PROBE = """
import json, sys, warnings
from twisted.python.util import switchUID
uid, gid, euid = json.loads(sys.argv[1])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # switchUID warns when uid is already ours
    switchUID(uid, gid, euid)
for path in sys.argv[2:]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        print(json.dumps(None))
    except OSError as error:
        print(json.dumps(error.strerror or str(error)))
"""


def unreadable_files(config: ProxyConfig, uid: int | None, gid: int | None, euid: bool = False) -> list[ConfigError]:
    """The files of ``files_read(config)`` that twistd's ``-u uid``/``-g gid`` could not read, one
    ``ConfigError`` each, naming the file, its key and the user. Empty when there is no such user to
    become, or this process could not become it anyway (it is not root: twistd would fail to drop).

    The check is real: a short child process becomes that user as twistd does and opens each file.

    :raises ConfigError: if the check itself could not run.
    """
    if (uid is None and gid is None) or os.geteuid() != 0:
        return []
    files = files_read(config)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([uid, gid, euid]), *(str(path) for _, path in files)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    if result.returncode != 0 or len(answers) != len(files):
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(config.path, "-", f"could not check which files {_who(uid, gid)} can read: {last}")
    return [
        ConfigError(config.path, key, f"{path}: {_who(uid, gid)} cannot read it ({error}), and reloads read it as "
                                      "that user: make it readable to that user or group (e.g. owner root, group "
                                      "the service's, mode 0640)")
        for (key, path), error in zip(files, answers, strict=True)
        if error is not None
    ]


def _who(uid: int | None, gid: int | None) -> str:
    import grp
    import pwd

    parts = []
    if uid is not None:
        try:
            parts.append(f"user {pwd.getpwuid(uid).pw_name}")
        except KeyError:
            parts.append(f"uid {uid}")
    if gid is not None:
        try:
            parts.append(f"group {grp.getgrgid(gid).gr_name}")
        except KeyError:
            parts.append(f"gid {gid}")
    return " and ".join(parts) if len(parts) < 2 else f"{parts[0]} ({parts[1]})"

