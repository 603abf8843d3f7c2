"""The factory that turns accepted connections into client sessions, and keeps track of them."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory

from .client import ClientProtocol, SessionSettings


class ProxyFactory(ServerFactory):
    """Builds a ``ClientProtocol`` per connection from the current ``settings``.

    ``settings`` may be replaced (a reload): sessions keep the settings they started with.
    ``sessions`` holds the live sessions, for shutdown and accounting.
    """

    noisy = False

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.sessions: set[ClientProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        session = ClientProtocol(self.settings, self.sessions.discard)
        self.sessions.add(session)
        return session
