"""Small hooks for tests, enabled by dotted path (``use = "support.samplehooks:tagger"``).

``CLOCK`` must be set by a test that uses ``slow`` (the MemoryProxy's clock), and ``RECORDED`` collects
what the ``recorder`` session hook saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from popproxy.hooks.interfaces import (
    IClosable,
    IHookFactory,
    IMessageHook,
    IRecordsHeaders,
    ISessionHook,
    IStartable,
    MessageContext,
    Verdict,
)

CLOCK: Any = None
RECORDED: list[tuple[Any, ...]] = []
CANCELLED: list[int] = []


@implementer(IMessageHook)
class Tagger:
    """Adds a header line at the top; optionally a body line that starts with a dot."""

    def __init__(self, name: str, text: str, reservation: int, dot_line: bool, mode: str, delay: float) -> None:
        self.name = name
        self.text = text.encode()
        self.reservation = reservation
        self.dot_line = dot_line
        self.mode = mode
        self.delay = delay

    def _rewrite(self, message: bytes, context: MessageContext) -> Any:
        if self.mode == "raise":
            raise RuntimeError("this hook always fails")
        if self.mode == "garbage":
            return "not bytes"
        if self.mode == "hang":
            number = context.facts.number
            return Deferred(lambda d: CANCELLED.append(number))
        context.add_verdict(Verdict(hook=self.name, spam=b"SPAM" in message, details={"number": context.facts.number}))
        result = b"X-Tag: " + self.text + b"\r\n" + message
        if self.dot_line:
            head, _, body = result.partition(b"\r\n\r\n")
            result = head + b"\r\n\r\n.\r\n.forged\r\n" + body
        return result

    def process(self, message: bytes, context: MessageContext) -> Any:
        if self.delay:
            return deferLater(CLOCK, self.delay, self._rewrite, message, context)
        return self._rewrite(message, context)


@implementer(IHookFactory)
class TaggerFactory:
    def build(self, config: Any) -> Tagger:
        options = config.options
        hook = Tagger(
            config.name,
            options.string("text", "yes"),
            options.integer("reservation", 64, minimum=0),
            options.boolean("dot_line", False),
            options.choice("mode", ("ok", "raise", "garbage", "hang"), "ok"),
            options.number("delay", 0),
        )
        options.finish()
        return hook


tagger = TaggerFactory()


@implementer(ISessionHook, IRecordsHeaders)
class Recorder:
    wanted_headers = ("Subject",)

    def session_opened(self, session: Any) -> None:
        RECORDED.append(("opened", session))

    def tls_started(self, session: Any) -> None:
        RECORDED.append(("tls", session))

    def authenticated(self, session: Any, result: str, code: Any) -> None:
        RECORDED.append(("authenticated", session, result, code))

    def command_done(self, session: Any, command: str, argument: str, ok: bool) -> None:
        RECORDED.append(("command", session, command, argument, ok))

    def message_delivered(self, session: Any, delivery: Any) -> None:
        RECORDED.append(("delivered", session, delivery))

    def session_closed(self, session: Any, summary: Any) -> None:
        RECORDED.append(("closed", session, summary))


@implementer(IHookFactory)
class RecorderFactory:
    def build(self, config: Any) -> Recorder:
        config.options.finish()
        return Recorder()


recorder = RecorderFactory()


@implementer(IHookFactory)
class PickyFactory:
    """A session hook that will not build in a process whose pid is in the file ``refuse_pids``
    (one per line): a configuration that one worker of several cannot load while the others can."""

    def build(self, config: Any) -> Recorder:
        import os
        import sys

        options = config.options
        listed = options.path("refuse_pids", None)
        in_workers = options.boolean("refuse_in_workers", False)  # build in the parent, not in a worker
        options.finish()
        if listed is not None and listed.exists() and str(os.getpid()) in listed.read_text().split():
            raise options.error("refuse_pids", f"this process ({os.getpid()}) is listed")
        if in_workers and Path(sys.argv[0]).name == "worker.py":  # python -m popproxy.worker
            raise options.error("refuse_in_workers", "this process is a worker")
        return Recorder()


picky = PickyFactory()


#: (hook name, reactor) for every IStartable.start call, and the names closed
STARTED: list[tuple[str, Any]] = []
CLOSED: list[str] = []


@implementer(ISessionHook, IStartable, IClosable)
class Starter(Recorder):
    """A session hook that records being started (``IStartable``) and closed (``IClosable``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, reactor: Any) -> None:
        STARTED.append((self.name, reactor))

    def close(self) -> None:
        CLOSED.append(self.name)


@implementer(IHookFactory)
class StarterFactory:
    def build(self, config: Any) -> Starter:
        config.options.string("tag", "")  # a setting, so that a reload can change it
        config.options.finish()
        return Starter(config.name)


starter = StarterFactory()
