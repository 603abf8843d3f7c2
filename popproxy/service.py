"""The running proxy: one listening service per ``[[listen]]`` table, and the live sessions."""

from __future__ import annotations

import dataclasses
import datetime
import signal
from collections.abc import Callable, Mapping
from types import FrameType

from prometheus_client import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import classImplements, implementer

from .admin import END_REASON, IAdminTarget, SessionPage, page_of_sessions
from .build import Built, build, close_hooks, pair_listeners, reload_refusal
from .config import ConfigError, ProxyConfig, config_digest, load_config, read_config
from .hooks.registry import BuiltHook, start_hooks
from .listeners import LiveListener, bind_now, listener_service
from .metrics import NULL_METRICS, IMetrics, PrometheusMetrics
from .protocol.client import SessionSettings
from .protocol.connector import UpstreamConnector
from .protocol.factory import ProxyFactory
from .protocol.guard import Guard, ISessionGuard, LocalGuard
from .protocol.mailbox import MessageCache
from .protocol.spool import clean_spool_dir
from .systemd import INotifier, SystemdNotifier, notifier_from_environment
from .tls import ServerTLS
from .web import IHealth, metrics_service

log = Logger()

#: Warn this long before a listener's certificate expires, at start and then once a day.
EXPIRY_WARNING = datetime.timedelta(days=30)
EXPIRY_CHECK_INTERVAL = 86400.0
#: How often (seconds) listeners' session-ticket keys are looked at for replacement.
TICKET_CHECK_INTERVAL = 60.0


#: A reload prepared (``prepare_reload``): the new configuration built, not yet in use.
PreparedReload = Built


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
    :param built: what ``build.build(config, reactor)`` made (``--check`` built it at start already);
        by default it is built here.

    Listeners are known by their normalised endpoint (``build.ListenEndpoint``): a reload gives each
    listening socket the new ``[[listen]]`` table with the same endpoint, wherever it now is in the
    file, and refuses a file that adds, removes or changes an endpoint (``build.reload_refusal``).
    """

    #: install a SIGHUP handler (twistd); tests that build services in-process turn it off
    handle_signals = True
    #: why the last reload that was refused was refused
    last_refusal: str | None = None
    _previous_hup: Callable[[int, FrameType | None], object] | int | None = None

    def __init__(self, config: ProxyConfig, reactor: IReactorTime, connector: UpstreamConnector | None = None,
                 *, handle_signals: bool = True, guard: ISessionGuard | None = None,
                 endpoints: Mapping[str, IStreamServerEndpoint] | None = None,
                 metrics: IMetrics | None = None, built: Built | None = None) -> None:
        super().__init__()
        built = built if built is not None else build(config, reactor)
        assert built.config is config, "built from another configuration"
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
        #: start, reloads and stop, told to systemd (sd_notify): only by twistd's own service, which
        #: handles the signals; a worker's or a test's sends nothing
        self.notifier: INotifier = notifier_from_environment() if handle_signals else SystemdNotifier(None)
        self.factories: list[ProxyFactory] = []
        self.server_tls: dict[str, ServerTLS] = {}
        connector = connector or UpstreamConnector(
            reactor, response_timeout=config.limits.upstream_timeout, max_body_line=config.limits.upstream_max_line
        )
        self.connector = connector
        self.hooks = built.hooks
        self._retiring: list[BuiltHook] = []  # replaced by a reload, still serving older sessions
        #: the limits kept in this process (None when ``guard`` is another's)
        self.guard: Guard | None = None
        if guard is None:
            self.guard = Guard(config.limits, reactor)
            guard = LocalGuard(self.guard)
        self.sessions_guard = guard
        # Processed messages for TOP-then-RETR: one bound for the whole proxy, not one per session.
        self.cache = MessageCache(config.limits.message_cache)
        self.lookup = built.lookup
        #: what each listening socket serves now, in the order of ``factories`` (a reload updates them)
        self.live: list[LiveListener] = []
        self._listening: list[StreamServerEndpointService] = []
        self._bound: list[IListeningPort] = []  # by bind(), before the service started
        for listener in config.listeners:
            server_tls = built.server_tls.get(listener.key)
            if server_tls is not None:
                server_tls.built_at = reactor.seconds()
                self.server_tls[listener.key] = server_tls
            factory = ProxyFactory(SessionSettings(listener, config, server_tls, connector, reactor, self.hooks, self.sessions_guard,
                                                      self.cache, lookup=self.lookup, metrics=self.metrics))
            self.factories.append(factory)
            live = LiveListener(listener, server_tls)
            self.live.append(live)
            endpoint = endpoints.get(listener.key) if endpoints is not None else None
            listening = listener_service(reactor, live, factory, endpoint)
            listening.setServiceParent(self)
            self._listening.append(listening)
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

    def bind(self) -> None:
        """Listen on every listener's endpoint and ``[metrics]``'s now, accepting only once the
        service starts (``listeners.bind_now``): ``tap.makeService`` calls this before twistd
        daemonizes, writes its PID file and drops privileges, so that a port in use or an address
        this host does not have ends the start with one line and nothing left behind.

        :raises listeners.BindError: for the first endpoint that cannot listen (those bound before it
            are closed again).
        """
        bound = self._bound
        targets = [(f"{listener.key}.endpoint", listener.endpoint, service)
                   for listener, service in zip(self.config.listeners, self._listening, strict=True)]
        if self.web is not None and self.config.metrics is not None:
            targets.append(("metrics.endpoint", self.config.metrics.endpoint, self.web))
        try:
            for key, endpoint, service in targets:
                bound.append(bind_now(self.reactor, service, self.config.path, key, endpoint))
        except Exception:
            self.unbind()
            raise

    def unbind(self) -> Deferred[None]:
        """Close what ``bind`` bound, for a service that is not going to start."""
        closing = [port.stopListening() for port in self._bound]
        self._bound.clear()
        return gatherResults([d for d in closing if d is not None]).addCallback(lambda _: None)

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
        # Every listener is bound (by privilegedStartService under twistd, else just now, synchronously).
        self.notifier.ready(f"serving {len(self.config.listeners)} listener(s)")

    # -- SIGHUP ---------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the configuration: new certificates, routing, limits and hooks for new sessions;
        live sessions keep what they started with. A configuration that does not validate changes
        nothing and is logged. Listener addresses cannot change without a restart. Files that hooks
        write are opened again by name first, whatever becomes of the reload (logrotate's SIGHUP)."""
        self.notifier.reloading()
        self.reopen_files()
        prepared = self.prepare_reload()
        if isinstance(prepared, str):
            log.error("reload refused, keeping the running configuration: {error}", error=prepared, event="reload_failed")
            self.last_refusal = prepared  # for the admin socket's Reload (request_reload)
            self.notifier.reloaded(prepared)
            return False
        self.commit_reload(prepared)
        self.notifier.reloaded(None)
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
        """The first half of a reload: read and build everything (``build.build``, as at start),
        use nothing. Returns what was built, or why the configuration cannot be used: it does not
        build, or it adds, removes or changes a listener's endpoint or ``[metrics]``
        (``build.reload_refusal``). With ``digest`` (``config.config_digest``), the file must still
        be the one the parent of several workers checked."""
        try:
            data = read_config(self.config.path)
            if digest is not None and config_digest(data) != digest:
                raise ConfigError(self.config.path, "-", "changed while it was being reloaded; reload again")
            prepared = build(load_config(self.config.path, data), self.reactor)
        except ConfigError as error:
            return str(error)
        refusal = reload_refusal(self.config, prepared.config)
        if refusal is not None:
            prepared.close()
            return refusal
        return prepared

    def abandon_reload(self, prepared: PreparedReload) -> None:
        """A prepared reload that will not be used (another worker refused it)."""
        prepared.close()

    def commit_reload(self, prepared: PreparedReload) -> None:
        """The second half of a reload: new sessions use what ``prepare_reload`` built.

        Each listening socket gets the new table with its endpoint (``build.pair_listeners``), with
        everything in it: ``tls`` (a port switched to or from ``implicit`` wraps the next connection
        accordingly: ``listeners.ListeningFactory``), ``require_tls``, certificates and
        ``tls_min_version`` (the same ``ServerTLS`` swaps them for new handshakes), ``proxy_from``,
        ``plaintext_from``, session tickets. Live sessions keep what they started with.
        """
        config, hooks, server_tls = prepared.config, prepared.hooks, prepared.server_tls
        pairs = pair_listeners([live.listener for live in self.live], config.listeners)
        assert pairs is not None, "prepare_reload refuses other endpoints"
        # A hook configured exactly as before keeps running (its open files, its state); the others
        # are replaced, and retired once the sessions that use them are over.
        kept = []
        for index, built in enumerate(hooks):
            same = next((old for old in self.hooks if old.config.same_settings(built.config)), None)
            if same is not None:
                close_hooks((built,))
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
        live_sessions: list[Deferred[None]] = []
        self.server_tls = {}
        for factory, live, (_, listener) in zip(self.factories, self.live, pairs, strict=True):
            new_tls = server_tls.get(listener.key)
            if new_tls is not None:
                new_tls.built_at = self.reactor.seconds()
                if live.server_tls is not None:
                    live.server_tls.reload(new_tls)  # new handshakes only, STLS of live sessions included
                    new_tls = live.server_tls
            live.listener, live.server_tls = listener, new_tls
            if new_tls is not None:
                self.server_tls[listener.key] = new_tls
            factory.settings = dataclasses.replace(
                factory.settings, listener=listener, config=config, server_tls=new_tls, hooks=hooks,
                guard=self.sessions_guard, lookup=prepared.lookup,
            )
            live_sessions.extend(session.when_closed() for session in factory.sessions)
        # The old hooks serve the sessions that started with them: close them when those are over.
        self._retiring.extend(retired)

        def close_retired(_: object) -> None:
            close_hooks(retired)
            self._retiring = [built for built in self._retiring if all(built is not old for old in retired)]

        gatherResults(live_sessions).addCallback(close_retired)
        log.info("configuration reloaded from {config}", config=str(config.path), event="reloaded")

    # -- the admin socket (popproxy.admin.IAdminTarget) ------------------------------------------------

    def sessions(self, after: str | None, limit: int) -> Deferred[SessionPage]:
        """``IAdminTarget``: this process's live sessions, one page."""
        return succeed(page_of_sessions((session for factory in self.factories for session in factory.sessions),
                                        after, limit))

    def end_session(self, session_id: str) -> Deferred[bool]:
        """``IAdminTarget``: cut session ``session_id``, without QUIT upstream (``ClientProtocol.shut_down``)."""
        for factory in self.factories:
            for session in list(factory.sessions):
                if session.session_id == session_id:
                    session.shut_down(END_REASON)
                    return succeed(True)
        return succeed(False)

    def request_reload(self) -> Deferred[str | None]:
        """``IAdminTarget``: ``reload`` (as SIGHUP); None if applied, else why it was refused."""
        self.last_refusal = None
        return succeed(None if self.reload() else self.last_refusal or "refused (see the log)")

    # -- SIGTERM --------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Stop listening at once; let sessions finish for ``shutdown_grace`` seconds (in-flight
        commands complete, new ones other than QUIT get -ERR [SYS/TEMP]); then close the rest
        without QUIT upstream, so that nothing is deleted that a client did not ask to delete."""
        self._stopping = True  # /healthz: 503 from now on
        self.notifier.stopping()
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
        closed = drained.addCallback(lambda _: close_hooks(self.hooks))  # drained itself, now a Deferred[None]
        closed.addCallback(lambda _: clean_spool_dir(self.config.limits.spool_dir))
        done = gatherResults([stopped, closed]).addCallback(lambda _: None)
        web = self.web
        if web is not None and web.running:
            done.addCallback(lambda _: web.stopService())  # the last thing to stop: 503 until here
        return done


classImplements(ProxyService, IAdminTarget)  # the admin socket's target in one process (popproxy.admin)
