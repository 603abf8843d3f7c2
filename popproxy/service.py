"""The running proxy: one listening service per ``[[listen]]`` table, and the live sessions."""

from __future__ import annotations

import dataclasses
import datetime
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType

from prometheus_client import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .config import ConfigError, ProxyConfig, config_digest, read_config
from .hooks.registry import BuiltHook, build_hooks, start_hooks
from .listeners import listener_service
from .lookup import HTTPRouteLookup, listener_addresses
from .metrics import NULL_METRICS, IMetrics, PrometheusMetrics
from .protocol.client import SessionSettings
from .protocol.connector import UpstreamConnector
from .protocol.factory import ProxyFactory
from .protocol.guard import Guard, ISessionGuard, LocalGuard
from .protocol.mailbox import MessageCache
from .protocol.spool import clean_spool_dir
from .tls import ServerTLS
from .web import IHealth, metrics_service

log = Logger()

#: Warn this long before a listener's certificate expires, at start and then once a day.
EXPIRY_WARNING = datetime.timedelta(days=30)
EXPIRY_CHECK_INTERVAL = 86400.0
#: How often (seconds) listeners' session-ticket keys are looked at for replacement.
TICKET_CHECK_INTERVAL = 60.0


@dataclass(frozen=True)
class PreparedReload:
    """A configuration read, checked and built (hooks, TLS contexts), not yet in use."""

    config: ProxyConfig
    hooks: tuple[BuiltHook, ...]
    server_tls: dict[str, ServerTLS]
    lookup: HTTPRouteLookup | None = None


@implementer(IHealth)
class ProxyService(MultiService):
    """Listeners for every ``[[listen]]`` table, each with its own factory and TLS context.

    :param connector: how sessions reach upstreams; tests pass one with in-memory endpoints.
    :param guard: the proxy-wide limits, when they are kept elsewhere (a worker asks its parent);
        by default a ``Guard`` in this process.
    :param endpoints: where each listener (by key) accepts connections, when not its own endpoint
        string (a worker adopts the socket its parent bound).
    :param metrics: where sessions report what they did, when not this service's own: by default,
        with a ``[metrics]`` table, a ``PrometheusMetrics`` served on its endpoint by this service
        (``/metrics``, ``/healthz``); without one, nothing. A worker passes its own (its parent serves them).
    """

    #: install a SIGHUP handler (twistd); tests that build services in-process turn it off
    handle_signals = True
    _previous_hup: Callable[[int, FrameType | None], object] | int | None = None

    def __init__(self, config: ProxyConfig, reactor: IReactorTime, connector: UpstreamConnector | None = None,
                 *, handle_signals: bool = True, guard: ISessionGuard | None = None,
                 endpoints: Mapping[str, IStreamServerEndpoint] | None = None,
                 metrics: IMetrics | None = None) -> None:
        super().__init__()
        #: the ``[metrics]`` HTTP service, when this service serves its own figures; started and stopped
        #: by hand, not as a child, so that ``/healthz`` says 503 until the last session has drained
        self.web: StreamServerEndpointService | None = None
        self._stopping = False
        #: this service's own figures (None when ``metrics`` was given or there is no ``[metrics]``)
        self.registry: CollectorRegistry | None = None
        if metrics is None and config.metrics is not None:
            self.registry = CollectorRegistry()
            metrics = PrometheusMetrics(self.registry)
            self.web = metrics_service(config.metrics.endpoint, self.registry, self, reactor)
        self.metrics: IMetrics = metrics if metrics is not None else NULL_METRICS
        self.config = config
        self.reactor = reactor
        self.handle_signals = handle_signals
        self.factories: list[ProxyFactory] = []
        self.server_tls: dict[str, ServerTLS] = {}
        connector = connector or UpstreamConnector(
            reactor, response_timeout=config.limits.upstream_timeout, max_body_line=config.limits.upstream_max_line
        )
        self.connector = connector
        self.hooks = build_hooks(config)
        self._retiring: list[BuiltHook] = []  # replaced by a reload, still serving older sessions
        #: the limits kept in this process (None when ``guard`` is another's)
        self.guard: Guard | None = None
        if guard is None:
            self.guard = Guard(config.limits, reactor)
            guard = LocalGuard(self.guard)
        self.sessions_guard = guard
        # Processed messages for TOP-then-RETR: one bound for the whole proxy, not one per session.
        self.cache = MessageCache(config.limits.message_cache)
        self.lookup = route_lookup(config, reactor)
        for listener in config.listeners:
            server_tls = ServerTLS.from_listener(listener, config.path) if listener.tls != "none" else None
            if server_tls is not None:
                server_tls.built_at = reactor.seconds()
                self.server_tls[listener.key] = server_tls
            factory = ProxyFactory(SessionSettings(listener, config, server_tls, connector, reactor, self.hooks, self.sessions_guard,
                                                      self.cache, lookup=self.lookup, metrics=self.metrics))
            self.factories.append(factory)
            endpoint = endpoints.get(listener.key) if endpoints is not None else None
            listener_service(reactor, listener, factory, server_tls, endpoint).setServiceParent(self)
        expiry = TimerService(EXPIRY_CHECK_INTERVAL, self.warn_expiring_certificates)
        expiry.clock = reactor
        expiry.setName("certificate expiry")
        expiry.setServiceParent(self)
        tickets = TimerService(TICKET_CHECK_INTERVAL, self.rotate_ticket_keys)
        tickets.clock = reactor
        tickets.setName("session ticket keys")
        tickets.setServiceParent(self)

    def rotate_ticket_keys(self) -> None:
        """Replace each TLS listener's session-ticket key once it is ``ticket_key_lifetime`` old."""
        now = self.reactor.seconds()
        for listener in self.config.listeners:
            server_tls = self.server_tls.get(listener.key)
            if server_tls is not None and server_tls.rotate_if_due(now, listener.ticket_key_lifetime):
                log.info("session ticket key of {listener} replaced", listener=listener.key, event="ticket_key_rotated")

    def warn_expiring_certificates(self) -> None:
        """Log a warning for each listener certificate that expires within ``EXPIRY_WARNING``."""
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)
        for key, server_tls in self.server_tls.items():
            for path, not_after in server_tls.expiring(EXPIRY_WARNING, now):
                log.warn(
                    "certificate {path} of {listener} expires on {expires} ({days} days left): renew it",
                    event="certificate_expiring",
                    path=str(path),
                    listener=key,
                    expires=not_after.isoformat(),
                    days=(not_after - now).days,
                )

    def serving(self) -> bool:
        """``IHealth``: listeners accept from ``startService`` until ``stopService`` begins."""
        return bool(self.running) and not self._stopping

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.web is not None:
            self.web.privilegedStartService()  # bound now, as the listeners are, before twistd drops privileges

    def startService(self) -> None:
        if self.web is not None and not self.web.running:
            self.web.startService()  # binds here when privilegedStartService was not called
        clean_spool_dir(self.config.limits.spool_dir)
        start_hooks(self.hooks, self.reactor)
        super().startService()
        log.info(
            "popproxy serving {count} listener(s) from {config}",
            count=len(self.config.listeners),
            config=str(self.config.path),
        )
        if self.handle_signals:
            # twistd installs no SIGHUP handler. Python runs signal handlers between bytecodes (the
            # ``signal`` module's docs), anywhere in the reactor's work: hop onto the reactor with
            # callFromThread, its one thread-safe entry point, before touching anything.
            self._previous_hup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload)  # type: ignore[attr-defined]
            )

    # -- SIGHUP ---------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration: new certificates, routing, limits and hooks for new sessions;
        live sessions keep what they started with. A configuration that does not validate changes
        nothing and is logged. Listener addresses cannot change without a restart. Files that hooks
        write are opened again by name first, whatever becomes of the reload (logrotate's SIGHUP)."""
        self.reopen_files()
        prepared = self.prepare_reload()
        if isinstance(prepared, str):
            log.error("reload refused, keeping the running configuration: {error}", error=prepared, event="reload_failed")
            return False
        self.commit_reload(prepared)
        return True

    def reopen_files(self) -> None:
        """Every hook that writes a file opens it again by name (``IReopens``), retired ones that
        still serve older sessions included."""
        for built in (*self.hooks, *self._retiring):
            try:
                built.reopen()
            except Exception:
                log.failure("hook {hook} could not open its file again", hook=built.config.name)

    def prepare_reload(self, digest: str | None = None) -> PreparedReload | str:
        """The first half of a reload: read and build everything, use nothing. Returns what was
        built, or why the configuration cannot be used. With ``digest`` (``config.config_digest``),
        the file must still be the one the parent of several workers checked."""
        from .tap import validated_config  # the same checks as at start

        try:
            data = read_config(self.config.path)
            if digest is not None and config_digest(data) != digest:
                raise ConfigError(self.config.path, "-", "changed while it was being reloaded; reload again")
            config = validated_config(str(self.config.path), data)
            hooks = build_hooks(config)
            server_tls = {
                listener.key: ServerTLS.from_listener(listener, config.path)
                for listener in config.listeners
                if listener.tls != "none"
            }
            if config.metrics != self.config.metrics:
                _close_hooks(hooks)
                raise ConfigError(config.path, "metrics.endpoint", _metrics_change(self.config, config))
        except ConfigError as error:
            return str(error)
        return PreparedReload(config, hooks, server_tls, route_lookup(config, self.reactor))

    def abandon_reload(self, prepared: PreparedReload) -> None:
        """A prepared reload that will not be used (another worker refused it)."""
        _close_hooks(prepared.hooks)

    def commit_reload(self, prepared: PreparedReload) -> None:
        """The second half of a reload: new sessions use what ``prepare_reload`` built."""
        config, hooks, server_tls = prepared.config, prepared.hooks, prepared.server_tls
        old = [(listener.key, listener.endpoint, listener.tls) for listener in self.config.listeners]
        new = [(listener.key, listener.endpoint, listener.tls) for listener in config.listeners]
        if old != new:
            log.warn("reload: listener changes take effect only after a restart; other changes applied")
        # A hook configured exactly as before keeps running (its open files, its state); the others
        # are replaced, and retired once the sessions that use them are over.
        kept = []
        for index, built in enumerate(hooks):
            same = next((old for old in self.hooks if old.config.same_settings(built.config)), None)
            if same is not None:
                _close_hooks((built,))
                hooks = hooks[:index] + (same,) + hooks[index + 1 :]
                kept.append(same)
        retired = tuple(old for old in self.hooks if all(old is not k for k in kept))
        start_hooks(tuple(built for built in hooks if all(built is not k for k in kept)), self.reactor)
        # A new lookup (and an empty cache): the service, its templates or its limits may have changed.
        self.config, self.hooks, self.lookup = config, hooks, prepared.lookup
        if self.guard is not None:
            self.guard.reconfigure(config.limits)
        self.cache.limit = config.limits.message_cache
        self.connector.response_timeout = config.limits.upstream_timeout
        self.connector.max_body_line = config.limits.upstream_max_line
        live: list[Deferred[None]] = []
        for factory in self.factories:
            key = factory.settings.listener.key
            listener = next((item for item in config.listeners if item.key == key), factory.settings.listener)
            current_tls = self.server_tls.get(key)
            if current_tls is not None and key in server_tls:
                server_tls[key].built_at = self.reactor.seconds()
                current_tls.reload(server_tls[key])  # new handshakes only
            factory.settings = dataclasses.replace(
                factory.settings, listener=listener, config=config, hooks=hooks, guard=self.sessions_guard,
                lookup=prepared.lookup,
            )
            live.extend(session.when_closed() for session in factory.sessions)
        # The old hooks serve the sessions that started with them: close them when those are over.
        self._retiring.extend(retired)

        def close_retired(_: object) -> None:
            _close_hooks(retired)
            self._retiring = [built for built in self._retiring if all(built is not old for old in retired)]

        gatherResults(live).addCallback(close_retired)
        log.info("configuration reloaded from {config}", config=str(config.path), event="reloaded")

    # -- SIGTERM --------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop listening at once; let sessions finish for ``shutdown_grace`` seconds (in-flight
        commands complete, new ones other than QUIT get -ERR [SYS/TEMP]); then close the rest
        without QUIT upstream, so that nothing is deleted that a client did not ask to delete."""
        self._stopping = True  # /healthz: 503 from now on
        if self.handle_signals and self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        stopped: Deferred[None] = super().stopService()
        sessions = [session for factory in self.factories for session in factory.sessions]
        if sessions:
            log.info("stopping: {count} session(s) get {grace}s to finish", count=len(sessions),
                     grace=self.config.limits.shutdown_grace)
        for session in sessions:
            session.start_draining()
        drained = gatherResults([session.when_closed() for session in sessions])
        drained.addTimeout(self.config.limits.shutdown_grace, self.reactor)

        def force(_: object) -> None:
            for session in [session for factory in self.factories for session in factory.sessions]:
                session.shut_down()

        drained.addErrback(force)
        closed = drained.addCallback(lambda _: _close_hooks(self.hooks))  # drained itself, now a Deferred[None]
        closed.addCallback(lambda _: clean_spool_dir(self.config.limits.spool_dir))
        done = gatherResults([stopped, closed]).addCallback(lambda _: None)
        web = self.web
        if web is not None and web.running:
            done.addCallback(lambda _: web.stopService())  # the last thing to stop: 503 until here
        return done


def _metrics_change(running: ProxyConfig, new: ProxyConfig) -> str:
    """Why a reload that changes ``[metrics]`` is refused (the port is bound once, before privileges drop)."""
    before = running.metrics.endpoint if running.metrics is not None else "none"
    after = new.metrics.endpoint if new.metrics is not None else "none"
    return f"changed from {before!r} to {after!r}: [metrics] changes need a restart (nothing was changed)"


def route_lookup(config: ProxyConfig, reactor: IReactorTime) -> HTTPRouteLookup | None:
    """The ``[routing.lookup]`` service client for ``config``, if it has one."""
    lookup = config.routing.lookup
    if lookup is None:
        return None
    return HTTPRouteLookup(lookup, config.upstreams, reactor, own_listeners=listener_addresses(config))


def _close_hooks(hooks: tuple[BuiltHook, ...]) -> None:
    for built in hooks:
        try:
            built.close()
        except Exception:
            log.failure("hook {hook} failed to close", hook=built.config.name)
