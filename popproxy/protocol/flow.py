"""Back-pressure glue: each leg's transport tells the session machine when it is full.

Flow control has one owner per session, the session machine (``machine.SessionMachine``): it keeps
every named reason to stop handling a leg (``machine.Hold``) and decides when a socket is paused.
What it cannot know by itself is when a transport's write buffer is full. Twisted says so by
pausing the transport's registered producer (``IConsumer.registerProducer``; a ``FileDescriptor``
pauses it once more than ``bufferSize``, 64 KiB, is waiting, and resumes it when the buffer drains).
So each leg's transport gets a ``LegProducer`` when the session takes it: the client's as soon as it
connects, the upstream's when the login hands it over (before that, only the login's few short
commands are written to it). The producer only reports; the machine answers with
``PauseReading``/``ResumeReading`` effects for the *other* leg's socket, and with holds on its own
work.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from .interfaces import IFlowTarget, Leg


@implementer(IPushProducer)
class LegProducer:
    """Registered (streaming) on ``leg``'s transport; reports its write buffer to ``target``.

    ``stopProducing`` (the transport is going away; Twisted calls it before the protocol hears of
    the lost connection) is reported as such: what was still in the buffer never reached the peer.
    """

    def __init__(self, target: IFlowTarget, leg: Leg) -> None:
        self._target = target
        self._leg = leg

    def pauseProducing(self) -> None:
        self._target.output_blocked(self._leg, True)

    def resumeProducing(self) -> None:
        self._target.output_blocked(self._leg, False)

    def stopProducing(self) -> None:
        self._target.output_gone(self._leg)
