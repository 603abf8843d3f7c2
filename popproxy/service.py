"""The running proxy: one listening service per ``[[listen]]`` table, and the live sessions."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import ProxyConfig
from .listeners import listener_service
from .protocol.client import SessionSettings
from .protocol.connector import UpstreamConnector
from .protocol.factory import ProxyFactory
from .tls import ServerTLS

log = Logger()


class ProxyService(MultiService):
    """Listeners for every ``[[listen]]`` table, each with its own factory and TLS context.

    :param connector: how sessions reach upstreams; tests pass one with in-memory endpoints.
    """

    def __init__(self, config: ProxyConfig, reactor: IReactorTime, connector: UpstreamConnector | None = None) -> None:
        super().__init__()
        self.config = config
        self.factories: list[ProxyFactory] = []
        connector = connector or UpstreamConnector(reactor)
        for listener in config.listeners:
            server_tls = ServerTLS.from_listener(listener, config.path) if listener.tls != "none" else None
            factory = ProxyFactory(SessionSettings(listener, config, server_tls, connector, reactor))
            self.factories.append(factory)
            listener_service(reactor, listener, factory, server_tls).setServiceParent(self)

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
        return stopped
