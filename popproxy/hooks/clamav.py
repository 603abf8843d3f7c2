"""The ``clamav`` hook: has clamd scan each message (``INSTREAM``) and refuses or replaces one with a virus.

Settings (besides the common ``timeout``, ``on_error``, ``max_size``)::

    [[hook]]
    use = "clamav"
    address = "127.0.0.1:3310"    # clamd's TCPSocket: "host", "host:port" or "[IPv6]:port" (default)
    # socket = "/run/clamav/clamd.ctl"   # or its LocalSocket (not both)
    action = "refuse"             # a virus: "refuse" (-ERR [SYS/TEMP], the message stays on the server)
                                  # or "replace" (the client gets a short notice in its place)

**The protocol** (clamd(8), ``INSTREAM``): one request per connection, ``zINSTREAM\\0``, then the
message in chunks of at most 64 KiB, each preceded by its length in four octets, network byte order,
and a chunk of length zero to end it. clamd answers with one NUL-terminated line: ``stream: OK``,
``stream: <signature> FOUND``, or ``<reason> ERROR``. The chunks are written as the connection takes
them (a pull producer), so a message is never copied whole into the connection's buffer.

**clamd's own limit.** clamd reads at most ``StreamMaxLength`` octets of a stream (clamd.conf; 25M
in Debian's, 100M when unset), then answers ``INSTREAM size limit exceeded. ERROR`` and closes the
connection. popproxy treats that as a failure of the hook, like clamd down or too slow: the hook's
``on_error`` applies (``"pass"`` delivers the message unscanned, ``"refuse"`` keeps it on the
server). Keep the hook's ``max_size`` at or below ``StreamMaxLength``.

**A virus.** The verdict is ``Verdict(hook=name, details={"virus": "<signature>"})`` (``{"virus":
None}`` for a clean message), for the audit log and for later hooks. With ``action = "refuse"`` the
hook raises :class:`VirusFound`: the client gets ``-ERR [SYS/TEMP]`` for that RETR or TOP, its DELE
of the message is refused, and the message stays on the server, whatever ``on_error`` says. With
``action = "replace"`` the client gets :func:`replacement`: the original's header fields (From, To,
Subject, Date, Message-ID, Received, ...) except those that describe its body (``Content-*``,
``MIME-Version``), then a ``text/plain`` notice that names the signature. It is never larger than
the original plus the hook's ``reservation`` (:data:`NOTICE_RESERVATION`), so the size popproxy
announced stays exact: the filler header makes up the rest.

A connection that cannot be made, no answer within the hook's ``timeout``, an answer that is none of
the three forms above, or one over 4 KiB raise :class:`ClamdError`. Cancelling the Deferred that
:meth:`ClamavHook.process` returns (popproxy does when ``timeout`` expires) aborts the connection.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IConsumer, IPullProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import HookConfig
from ..quiet import connect_quietly
from .interfaces import (
    HookNotStarted,
    IChunkedHook,
    IHookFactory,
    IMessageHook,
    IStartable,
    MessageContext,
    MessageRefused,
    Verdict,
)
from .mimesplice import header_fields
from .spamheaders import ServerAddress, clean, read_server

__all__ = [
    "NOTICE_RESERVATION",
    "ClamavFactory",
    "ClamavHook",
    "ClamdError",
    "InstreamProtocol",
    "VirusFound",
    "factory",
    "parse_reply",
    "replacement",
]

DEFAULT_PORT: Final = 3310
ACTIONS: Final = ("refuse", "replace")
#: Octets of message per INSTREAM chunk.
CHUNK_SIZE: Final = 64 * 1024
#: Octets of a spooled message kept while it is scanned, for the header fields of a notice.
HEAD_KEPT: Final = 64 * 1024
#: The most octets of answer read from clamd; its answers are one short line.
MAX_REPLY: Final = 4096
#: The longest signature name written into a notice (longer ones are cut, ending in "...").
MAX_SIGNATURE: Final = 128

_END_OF_STREAM: Final = struct.pack(">I", 0)
_FOUND = re.compile(rb"stream: (.+) FOUND", re.DOTALL)
log = Logger()


class ClamdError(Exception):
    """clamd could not be asked, failed the scan (``... ERROR``), or gave an answer that is none of
    its own."""


class VirusFound(MessageRefused):
    """A virus, with ``action = "refuse"``: the message must not be delivered.

    ``signature`` is clamd's name for what it found.
    """

    def __init__(self, signature: str) -> None:
        super().__init__(f"virus {signature} found")
        self.signature = signature


@dataclass(frozen=True, slots=True)
class ClamdAnswer:
    """clamd's verdict on one stream: the signature it found, or None for ``stream: OK``."""

    virus: str | None


def parse_reply(data: bytes, where: str) -> ClamdAnswer:
    """clamd's answer to INSTREAM (its NUL or line ending removed), as a verdict.

    :raises ClamdError: for ``... ERROR`` (``INSTREAM size limit exceeded. ERROR`` among them) and
        for anything that is not ``stream: OK`` or ``stream: <signature> FOUND``.
    """
    line = data.rstrip(b"\0\r\n")
    if line == b"stream: OK":
        return ClamdAnswer(None)
    found = _FOUND.fullmatch(line)
    if found is not None:
        return ClamdAnswer(clean(found.group(1).decode("utf-8", "replace"), MAX_SIGNATURE))
    text = clean(line.decode("utf-8", "replace"), 200)
    if line.endswith(b" ERROR"):
        raise ClamdError(f"clamd at {where} could not scan the message: {text}")
    if not line:
        raise ClamdError(f"clamd at {where} closed the connection without an answer")
    raise ClamdError(f"clamd at {where} answered something that is not clamd's: {text!r}")


@implementer(IPullProducer)
class _Chunks:
    """Writes the message as INSTREAM chunks, one each time the connection asks for more."""

    def __init__(self, consumer: IConsumer, pieces: Iterator[bytes]) -> None:
        self._consumer = consumer
        self._pieces = pieces
        self.done = False

    def resumeProducing(self) -> None:
        if self.done:
            return
        chunk = next(self._pieces, b"")
        if chunk:
            self._consumer.write(struct.pack(">I", len(chunk)) + chunk)
            return
        self.done = True
        self._consumer.write(_END_OF_STREAM)
        self._consumer.unregisterProducer()

    def stopProducing(self) -> None:
        self.done = True


def _pieces(message: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(message)
    for start in range(0, len(message), size):
        yield view[start : start + size].tobytes()


class InstreamProtocol(Protocol):
    """One ``INSTREAM`` request on one connection: sends the message, reads clamd's answer, fires
    ``answer`` with a :class:`ClamdAnswer` or fails it with :class:`ClamdError`.

    clamd may answer before it has read everything (``INSTREAM size limit exceeded``): the answer
    counts, and the rest of the message is not sent. Cancelling ``answer`` aborts the connection.
    """

    # A TCP or UNIX connection: both provide ITCPTransport (abortConnection) and IConsumer.
    transport: ITCPTransport | None

    def __init__(self, message: bytes | Iterable[bytes], where: str, chunk_size: int = CHUNK_SIZE) -> None:
        """``message``: bytes, or its pieces (a spooled message read from its file), in order."""
        self._pieces = _pieces(message, chunk_size) if isinstance(message, bytes) else iter(message)
        self._where = where
        self._chunks: _Chunks | None = None
        self._buffer = bytearray()
        self.answer: Deferred[ClamdAnswer] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        assert self.transport is not None
        consumer = IConsumer(self.transport)
        consumer.write(b"zINSTREAM\0")
        self._chunks = _Chunks(consumer, self._pieces)
        consumer.registerProducer(self._chunks, False)

    def dataReceived(self, data: bytes) -> None:
        if self.answer.called:
            return
        self._buffer += data
        end = self._buffer.find(b"\0")
        if end < 0 and len(self._buffer) <= MAX_REPLY:
            return
        assert self.transport is not None
        if end < 0:
            self.answer.errback(ClamdError(f"clamd at {self._where} sent more than {MAX_REPLY} octets"))
            self.transport.abortConnection()
            return
        try:
            result = parse_reply(bytes(self._buffer[:end]), self._where)
        except ClamdError as error:
            self.answer.errback(error)
        else:
            self.answer.callback(result)
        if self._chunks is not None and self._chunks.done:
            self.transport.loseConnection()
        else:  # clamd answered early: what is left of the message is not sent
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.answer.called:
            return
        try:
            if not self._buffer:
                raise ClamdError(
                    f"clamd at {self._where} closed the connection without an answer: {reason.getErrorMessage()}"
                )
            result = parse_reply(bytes(self._buffer), self._where)  # an answer without its NUL
        except ClamdError as error:
            self.answer.errback(error)
        else:
            self.answer.callback(result)

    def _cancel(self, _: Deferred[ClamdAnswer]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


# --- the notice that replaces an infected message ------------------------------------------------------

#: Header fields of the original that describe its body: the notice has a body of its own.
_BODY_FIELDS = re.compile(r"(?i)content-.*|mime-version")

_NOTICE_HEAD = (
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "X-Popproxy-Virus: {signature}\r\n"
    "\r\n"
)
_NOTICE_BODY = (
    "This message was replaced by the mail proxy: its virus scanner found a\r\n"
    "virus in it.\r\n"
    "\r\n"
    "    Virus: {signature}\r\n"
    "\r\n"
    "The original message was not delivered. Its header is above. If you\r\n"
    "expected it, ask the sender to send it again, or ask your mail\r\n"
    "administrator.\r\n"
)


def _notice(signature: str) -> bytes:
    return (_NOTICE_HEAD + _NOTICE_BODY).format(signature=signature).encode("ascii")


#: The most octets :func:`replacement` adds to the original's header fields: the hook's reservation
#: with ``action = "replace"``. (Two more for a last header line without its CRLF, which gets one.)
NOTICE_RESERVATION: Final = len(_notice("x" * MAX_SIGNATURE)) + 2


def replacement(message: bytes, signature: str) -> bytes:
    """The notice delivered in place of ``message``: its header fields, as they were, except those
    that describe its body (``Content-*``, ``MIME-Version``), then a ``text/plain`` body naming
    ``signature``. Never longer than ``len(message) + NOTICE_RESERVATION``.

    An mbox ``From `` line in front of the header is kept in front of it.
    """
    signature = clean(signature, MAX_SIGNATURE)
    start = 0
    if message.startswith(b"From "):
        newline = message.find(b"\n")
        start = len(message) if newline < 0 else newline + 1
    head = message[start:]
    kept = [head[f.start : f.end] for f in header_fields(head) if f.name and not _BODY_FIELDS.fullmatch(f.name)]
    kept = [line if line.endswith(b"\n") else line + b"\r\n" for line in kept]  # a last line without CRLF
    return message[:start] + b"".join(kept) + _notice(signature)


# --- the hook --------------------------------------------------------------------------------------


@implementer(IMessageHook, IChunkedHook, IStartable)
class ClamavHook:
    """Has clamd scan each message; records the verdict and refuses or replaces a message with a
    virus (``action``). ``reservation`` is :data:`NOTICE_RESERVATION` to replace, 0 to refuse.
    Building it does no I/O; the service gives it the reactor with ``start``."""

    def __init__(
        self,
        name: str,
        server: ServerAddress,
        action: str = "refuse",
        *,
        timeout: float = 10.0,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        self.name = name
        self.server = server
        self.action = action
        self.reservation = NOTICE_RESERVATION if action == "replace" else 0
        self._reactor: Any = None  # given by ``start``
        self._timeout = timeout
        self._chunk_size = chunk_size

    def start(self, reactor: Any) -> None:
        """``IStartable``: the reactor clamd is reached with, and the clock of the hook's timeout."""
        self._reactor = reactor

    def process(self, message: bytes, context: MessageContext) -> Deferred[bytes]:
        """A Deferred firing with the message (clean), or its notice (a virus, ``replace``); it fails
        with :class:`VirusFound` (a virus, ``refuse``) or :class:`ClamdError`. Cancelling it aborts
        the connection."""
        return Deferred.fromCoroutine(self._process(message, context))

    def process_chunks(self, chunks: Iterator[bytes], size: int, context: MessageContext) -> Deferred[bytes | None]:
        """``IChunkedHook``: a spooled message, scanned as it is read from its file; None if it is
        clean (it is delivered from the file), else as ``process``. The notice of ``replace`` keeps
        the header fields found in the first ``HEAD_KEPT`` octets."""
        head = bytearray()

        def keeping_the_head(chunks: Iterator[bytes]) -> Iterator[bytes]:
            for chunk in chunks:
                if len(head) < HEAD_KEPT:
                    head.extend(chunk[: HEAD_KEPT - len(head)])
                yield chunk

        async def judged() -> bytes | None:
            answer = await self.scan(keeping_the_head(chunks))
            return self._judge(answer, bytes(head), context)

        return Deferred.fromCoroutine(judged())

    async def _process(self, message: bytes, context: MessageContext) -> bytes:
        answer = await self.scan(message)
        return self._judge(answer, message, context) or message

    def _judge(self, answer: ClamdAnswer, message: bytes, context: MessageContext) -> bytes | None:
        """None for a clean message; the notice (``replace``); or ``VirusFound`` (``refuse``)."""
        context.add_verdict(Verdict(hook=self.name, details={"virus": answer.virus}))
        if answer.virus is None:
            return None
        facts = context.facts
        log.info(
            "{hook}: virus {virus} in message {number} of {user}; {action}",
            hook=self.name,
            virus=answer.virus,
            number=facts.number,
            uidl=facts.uidl,
            user=facts.session.user,
            session_id=facts.session.session_id,
            action="refused" if self.action == "refuse" else "replaced by a notice",
        )
        if self.action == "refuse":
            raise VirusFound(answer.virus)
        return replacement(message, answer.virus)

    async def scan(self, message: bytes | Iterator[bytes]) -> ClamdAnswer:
        """Send ``message`` (or its pieces) to clamd with ``INSTREAM`` on a connection of its own;
        return its verdict.

        Connecting and waiting for the answer share the hook's ``timeout``.
        """
        if self._reactor is None:
            raise HookNotStarted(f"hook {self.name} was not started")
        clock: IReactorTime = self._reactor
        deadline = clock.seconds() + self._timeout
        protocol = InstreamProtocol(message, str(self.server), self._chunk_size)
        endpoint = self.server.endpoint(self._reactor, self._timeout)
        try:
            await connect_quietly(endpoint, protocol)
        except (CancelledError, ConnectingCancelledError) as error:
            raise CancelledError(f"connecting to clamd at {self.server} was cancelled") from error
        except Exception as error:
            raise ClamdError(f"cannot connect to clamd at {self.server}: {error}") from error
        try:
            return await protocol.answer.addTimeout(max(deadline - clock.seconds(), 0), clock)
        except TimeoutError:
            raise ClamdError(f"clamd at {self.server} did not answer within {self._timeout:g}s") from None


@implementer(IHookFactory)
class ClamavFactory:
    """Builds :class:`ClamavHook` from a ``[[hook]]`` table with ``use = "clamav"``."""

    def build(self, config: HookConfig) -> ClamavHook:
        options = config.options
        server = read_server(options, DEFAULT_PORT)
        action = options.choice("action", ACTIONS, "refuse")
        options.finish()
        return ClamavHook(config.name, server, action, timeout=config.timeout)


factory = ClamavFactory()
