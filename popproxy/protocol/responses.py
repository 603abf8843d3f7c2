"""Where upstream answers go: response sinks, and the client's ordered queue of answers.

Every command sent upstream carries a *sink* that receives its answer. This is the one place where
the answers to RETR, TOP, LIST and STAT can be intercepted: the client leg chooses the sink for each
relayed command (``ClientProtocol.sink_for``), so message hooks and size accounting plug in by
providing another sink, without touching the relay.

Answers reach the client in the order the client sent its commands (RFC 2449 §6.6), including the
ones the proxy gives itself in TRANSACTION state (an ``-ERR`` for an unknown command pipelined behind
a RETR must follow that RETR's message): ``AnswerQueue`` keeps that order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..pop3.wire import CRLF, stuff_line, unstuff_lines


class ResponseSink(Protocol):
    """Receives one upstream answer, in order: ``status``, then ``body`` chunks, then ``end``."""

    def status(self, line: bytes, has_body: bool) -> None:
        """The status line, with its CRLF; ``has_body`` if a multi-line body follows."""

    def body(self, data: bytes) -> None:
        """Body bytes as on the wire, dot-stuffed; the last chunk ends with ``CRLF.CRLF``."""

    def end(self) -> None:
        """The answer is complete."""

    def failed(self, reason: Failure) -> None:
        """The upstream went away before the answer was complete."""


class AnswerQueue:
    """The client's answers in command order: relayed ones stream, local ones wait their turn.

    ``write`` sends bytes to the client; ``on_idle`` is called whenever the queue empties (the client
    leg then resumes reading pipelined commands it held back).
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        on_idle: Callable[[], None],
        on_finished: Callable[[RelaySink], None] | None = None,
    ) -> None:
        self._write = write
        self._on_idle = on_idle
        self._on_finished = on_finished
        # Each entry is a RelaySink (still streaming or waiting) or bytes (a local answer).
        self._entries: deque[RelaySink | bytes] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def local(self, answer: bytes) -> None:
        """An answer the proxy gives itself: written now, or after the answers before it."""
        if self._entries:
            self._entries.append(answer)
        else:
            self._write(answer)

    def relay(self, sink: RelaySink) -> None:
        self._entries.append(sink)

    def finished(self, sink: RelaySink) -> None:
        """``sink``, the head of the queue, is complete: send the local answers queued behind it."""
        assert self._entries and self._entries[0] is sink, "answers finished out of order"
        self._entries.popleft()
        if self._on_finished is not None:
            self._on_finished(sink)
        ready = []
        while self._entries and isinstance(self._entries[0], bytes):
            ready.append(self._entries.popleft())
        if ready:
            self._write(b"".join(ready))
        if not self._entries:
            self._on_idle()


class RelaySink:
    """Passes an answer to the client byte for byte as it arrives (no buffering, RFC 1939 §3 framing
    untouched). If the upstream breaks in the middle of a body the client connection is aborted, so
    that no client stores a truncated message as complete."""

    #: what the answer is for, as (command, argument), for session hooks; set by the client leg
    label: tuple[str, str] | None = None
    #: whether the status line was +OK
    succeeded = False

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[..., None]) -> None:
        self._queue = queue
        self._write = write
        self._abort = abort
        self._in_body = False
        queue.relay(self)

    def status(self, line: bytes, has_body: bool) -> None:
        self._in_body = has_body
        self.succeeded = line.startswith(b"+OK")
        self._write(line)

    def body(self, data: bytes) -> None:
        self._write(data)

    def end(self) -> None:
        self._in_body = False
        self._queue.finished(self)

    def failed(self, reason: Failure) -> None:
        # In the middle of a body: abort, so no terminator follows and the client sees a broken
        # connection. Before this answer began: close normally, so the complete answers before it
        # still reach the client.
        self._abort(not self._in_body)


class FilteringSink(RelaySink):
    """Collects a small multi-line answer, rewrites its lines, then sends it whole.

    Used for CAPA in TRANSACTION state, where the upstream's list is relayed minus what does not pass
    through the proxy. Bounded: an answer larger than ``limit`` breaks the session.
    """

    def __init__(
        self,
        queue: AnswerQueue,
        write: Callable[[bytes], None],
        abort: Callable[[], None],
        rewrite: Callable[[list[bytes]], list[bytes]],
        limit: int = 65536,
    ) -> None:
        super().__init__(queue, write, abort)
        self._rewrite = rewrite
        self._limit = limit
        self._status = b""
        self._parts: list[bytes] = []
        self._size = 0

    def status(self, line: bytes, has_body: bool) -> None:
        self.succeeded = line.startswith(b"+OK")
        if has_body:
            self._status = line
        else:
            self._write(line)

    def body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._abort()
            return
        self._parts.append(data)

    def end(self) -> None:
        if self._status:
            lines = unstuff_lines(b"".join(self._parts))
            body = b"".join(stuff_line(line) + CRLF for line in self._rewrite(lines))
            self._write(self._status + body + b"." + CRLF)
        self._queue.finished(self)


class CollectSink:
    """Collects a whole (small) answer for the proxy's own use: the upstream's greeting, CAPA, the
    replies to USER, PASS and STLS while logging in. Fires ``result`` with ``(status, lines)``."""

    def __init__(self, limit: int = 65536) -> None:
        self.result: Deferred[tuple[bytes, list[bytes]]] = Deferred()
        self._limit = limit
        self._status = b""
        self._parts: list[bytes] = []
        self._size = 0

    def status(self, line: bytes, has_body: bool) -> None:
        self._status = line

    def body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)
        elif not self.result.called:
            # Fail now rather than at an end that may never come (an endless answer).
            self._parts.clear()
            self.result.errback(ValueError(f"answer larger than {self._limit} bytes"))

    def end(self) -> None:
        if self.result.called:
            return
        if self._size > self._limit:
            self.result.errback(ValueError(f"answer larger than {self._limit} bytes"))
        else:
            self.result.callback((self._status, unstuff_lines(b"".join(self._parts))))

    def failed(self, reason: Failure) -> None:
        if not self.result.called:
            self.result.errback(reason)
