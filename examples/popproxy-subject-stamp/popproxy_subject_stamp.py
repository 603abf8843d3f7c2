"""An example third-party popproxy message hook: puts a stamp in front of every Subject.

Enable it with::

    [[hook]]
    use = "subject-stamp"         # the entry point name (or "popproxy_subject_stamp:factory")
    stamp = "[external]"          # default "[stamped]"

What every message hook must get right (docs/hooks.md has the whole contract):

- ``reservation``: the most octets the hook ever adds to a message. popproxy announces each message
  that much larger in LIST, STAT and RETR, so that sizes stay exact; a result larger than the
  original plus the reservation counts as a failure of the hook.
- ``process`` gets the message un-dot-stuffed with CRLF line endings, ending with CRLF, and returns
  the same form (bytes, or a Deferred that fires with bytes). A hook that does I/O returns a Deferred
  with a canceller that drops its connection: popproxy cancels it when the hook's ``timeout`` expires.
- The factory reads the hook's own settings through ``config.options`` (typed getters whose errors
  name the file and key) and calls ``finish()`` last, so that a misspelt setting is refused.
"""

from __future__ import annotations

import re
from typing import Any

from zope.interface import implementer

from popproxy.hooks.interfaces import IHookFactory, IMessageHook, MessageContext, Verdict

# The Subject field at the start of a header line (RFC 5322 §3.6.5), with the space after its colon.
_SUBJECT = re.compile(rb"^Subject:[ \t]?", re.IGNORECASE | re.MULTILINE)


@implementer(IMessageHook)
class SubjectStamp:
    """Puts ``stamp`` and a space in front of the first Subject; adds a Subject if there is none."""

    def __init__(self, name: str, stamp: str) -> None:
        self.name = name
        self._stamp = stamp.encode("utf-8") + b" "
        # The most this hook adds: the stamp, or a whole Subject field where there was none.
        self.reservation = len(b"Subject: ") + len(self._stamp) + 2

    def process(self, message: bytes, context: MessageContext) -> bytes:
        head, separator, body = message.partition(b"\r\n\r\n")
        match = _SUBJECT.search(head)
        if match:
            head = head[: match.end()] + self._stamp + head[match.end() :]
        else:
            head = head + b"\r\nSubject: " + self._stamp.rstrip()
        # A verdict goes to the audit log and to the hooks after this one (their conditions).
        context.add_verdict(Verdict(hook=self.name, details={"stamped": True}))
        return head + separator + body


@implementer(IHookFactory)
class SubjectStampFactory:
    """Builds :class:`SubjectStamp` from its ``[[hook]]`` table."""

    def build(self, config: Any) -> SubjectStamp:
        stamp = config.options.string("stamp", "[stamped]")
        config.options.finish()  # refuse settings this hook does not know
        if not stamp or "\r" in stamp or "\n" in stamp:
            raise config.options.error("stamp", "must be a non-empty single line")
        return SubjectStamp(config.name, stamp)


factory = SubjectStampFactory()
