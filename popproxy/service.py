"""The running proxy: one listening service per ``[[listen]]`` table, and the live sessions."""

from __future__ import annotations

import datetime

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import ProxyConfig
from .hooks.registry import build_hooks
from .listeners import listener_service
from .protocol.client import SessionSettings
from .protocol.connector import UpstreamConnector
from .protocol.factory import ProxyFactory
from .protocol.guard import Guard
from .tls import ServerTLS

log = Logger()

#: Warn this long before a listener's certificate expires, at start and then once a day.
EXPIRY_WARNING = datetime.timedelta(days=30)
EXPIRY_CHECK_INTERVAL = 86400.0


class ProxyService(MultiService):
    """Listeners for every ``[[listen]]`` table, each with its own factory and TLS context.

    :param connector: how sessions reach upstreams; tests pass one with in-memory endpoints.
    """

    def __init__(self, config: ProxyConfig, reactor: IReactorTime, connector: UpstreamConnector | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.factories: list[ProxyFactory] = []
        self.server_tls: dict[str, ServerTLS] = {}
        connector = connector or UpstreamConnector(reactor, response_timeout=config.limits.upstream_timeout)
        self.hooks = build_hooks(config)
        self.guard = Guard(config.limits, reactor)
        for listener in config.listeners:
            server_tls = ServerTLS.from_listener(listener, config.path) if listener.tls != "none" else None
            if server_tls is not None:
                self.server_tls[listener.key] = server_tls
            factory = ProxyFactory(SessionSettings(listener, config, server_tls, connector, reactor, self.hooks, self.guard))
            self.factories.append(factory)
            listener_service(reactor, listener, factory, server_tls).setServiceParent(self)
        expiry = TimerService(EXPIRY_CHECK_INTERVAL, self.warn_expiring_certificates)
        expiry.clock = reactor
        expiry.setName("certificate expiry")
        expiry.setServiceParent(self)

    def warn_expiring_certificates(self) -> None:
        """Log a warning for each listener certificate that expires within ``EXPIRY_WARNING``."""
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)
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

    def startService(self) -> None:
        super().startService()
        log.info(
            "popproxy serving {count} listener(s) from {config}",
            count=len(self.config.listeners),
            config=str(self.config.path),
        )

    def stopService(self) -> Deferred[None]:
        """Stop listening, then end the live sessions without QUIT upstream, so that nothing is deleted
        that a client did not ask to delete."""
        stopped: Deferred[None] = super().stopService()  # type: ignore[assignment]
        for factory in self.factories:
            for session in list(factory.sessions):
                session.shut_down()
        for built in self.hooks:
            close = getattr(built.hook, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.failure("hook {hook} failed to close", hook=built.config.name)
        return stopped
