"""An example third-party popproxy message hook: puts a stamp in front of every Subject.

Enable it with::

    [[hook]]
    use = "subject-stamp"        # the entry point name (or "popproxy_subject_stamp:factory")
    stamp = "[external]"          # default "[stamped]"
"""

from __future__ import annotations

import re
from typing import Any

from zope.interface import implementer

from popproxy.hooks.interfaces import IHookFactory, IMessageHook, MessageContext, Verdict

_SUBJECT = re.compile(rb"^Subject:[ \t]?", re.IGNORECASE | re.MULTILINE)


@implementer(IMessageHook)
class SubjectStamp:
    def __init__(self, name: str, stamp: str) -> None:
        self.name = name
        self._stamp = stamp.encode("utf-8") + b" "
        # The most this hook adds: the stamp, or a whole Subject header where there was none.
        self.reservation = len(b"Subject: ") + len(self._stamp) + 2

    def process(self, message: bytes, context: MessageContext) -> bytes:
        head, separator, body = message.partition(b"\r\n\r\n")
        match = _SUBJECT.search(head)
        if match:
            head = head[: match.end()] + self._stamp + head[match.end() :]
        else:
            head = head + b"\r\nSubject: " + self._stamp.rstrip()
        context.add_verdict(Verdict(hook=self.name, details={"stamped": True}))
        return head + separator + body


@implementer(IHookFactory)
class SubjectStampFactory:
    def build(self, config: Any) -> SubjectStamp:
        stamp = config.options.string("stamp", "[stamped]")
        config.options.finish()  # refuse settings this hook does not know
        if not stamp or "\r" in stamp or "\n" in stamp:
            raise config.options.error("stamp", "must be a non-empty single line")
        return SubjectStamp(config.name, stamp)


factory = SubjectStampFactory()


@implementer(IMessageHook)
class Exploding:
    """A hook that always fails: popproxy must contain it."""

    reservation = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def process(self, message: bytes, context: MessageContext) -> bytes:
        raise RuntimeError("this example hook always fails")


@implementer(IHookFactory)
class ExplodingFactory:
    def build(self, config: Any) -> Exploding:
        config.options.finish()
        return Exploding(config.name)


exploding = ExplodingFactory()
