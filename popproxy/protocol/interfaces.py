"""What the pieces of a session read from each other, declared (zope interfaces)."""

from __future__ import annotations

import enum
import typing

from zope.interface import Interface

if typing.TYPE_CHECKING:  # the session machine imports this module and must not import Twisted
    from twisted.internet.interfaces import IAddress, IPushProducer


class Leg(enum.Enum):
    """The two connections of a session."""

    CLIENT = "client"
    UPSTREAM = "upstream"


class LegTransport(typing.Protocol):
    """What a session uses of either leg's transport: TCP (or UNIX), perhaps inside TLS and the
    PROXY wrapper, all of which provide these (``ITCPTransport``, ``ITLSTransport``, ``IConsumer``,
    ``IPushProducer``)."""

    disconnecting: bool

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def startTLS(self, contextFactory: object) -> None: ...
    def getHandle(self) -> object: ...


class IUpstreamReceiver(Interface):
    """Receives a logged-in upstream connection's bytes: the session, once attached."""

    def upstream_data(data: bytes) -> None:
        """Bytes from the upstream, as received."""

    def upstream_lost(reason: str) -> None:
        """The upstream connection ended; ``reason`` is a short, credential-free description."""


class IFlowTarget(Interface):
    """Told when a leg's transport can take no more output (its write buffer is full) and when it
    can again: what ``flow.LegProducer`` reports."""

    def output_blocked(leg: Leg, blocked: bool) -> None:
        """``leg``'s transport paused (``blocked``) or resumed its producer."""

    def output_gone(leg: Leg) -> None:
        """``leg``'s transport stopped its producer: the connection is going away, whatever was
        still in its write buffer with it."""
