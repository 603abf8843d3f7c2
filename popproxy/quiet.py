"""Connecting one protocol instance without Twisted's per-connection log lines.

``twisted.internet.endpoints.connectProtocol`` builds a ``Factory`` whose ``noisy`` default logs
"Starting factory" and "Stopping factory" for every connection: two lines per login, per spamd
scan. A proxy makes such connections all day; these say nothing an admin needs.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory

_P = TypeVar("_P", bound=IProtocol)


class _QuietFactory(Factory):
    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> IProtocol:  # type: ignore[override]
        return self._protocol


def connect_quietly(endpoint: IStreamClientEndpoint, protocol: _P) -> Deferred[_P]:
    """Like ``connectProtocol``: connect ``endpoint`` to ``protocol``; fires with ``protocol``."""
    return endpoint.connect(_QuietFactory(protocol))  # type: ignore[return-value]
