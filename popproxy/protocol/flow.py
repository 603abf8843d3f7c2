"""Back-pressure plumbing: pausing a transport's reads for more than one reason at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer


class PauseGate:
    """Pauses reading from a transport while any reason to hold it back remains.

    One leg's reads can be held back for several independent reasons (the other leg's write buffer is
    full, too many pipelined commands are waiting, a login is in flight); resuming for one reason must
    not undo another.
    """

    def __init__(self) -> None:
        self._transport: Any = None
        self._reasons: set[str] = set()

    def attach(self, transport: Any) -> None:
        self._transport = transport
        if self._reasons:
            transport.pauseProducing()

    def hold(self, reason: str) -> None:
        if not self._reasons and self._transport is not None:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and self._transport is not None:
            self._transport.resumeProducing()

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._reasons)


@implementer(IPushProducer)
class HoldProducer:
    """An ``IPushProducer`` that a consuming transport pauses when its write buffer is full.

    Registered on the *other* leg's transport, it holds this leg's reads back under ``reason`` (TCP
    back-pressure across the proxy: a slow client slows the upstream down, not the proxy's memory).
    When the consuming transport goes away (``stopProducing``) the hold is released, so that this leg
    can finish whatever it still has to do.
    """

    def __init__(
        self,
        hold: Callable[[str], None],
        release: Callable[[str], None],
        reason: str,
    ) -> None:
        self._hold = hold
        self._release = release
        self._reason = reason

    def pauseProducing(self) -> None:
        self._hold(self._reason)

    def resumeProducing(self) -> None:
        self._release(self._reason)

    def stopProducing(self) -> None:
        self._release(self._reason)
