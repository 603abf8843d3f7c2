"""Splitting byte streams into POP3 lines and responses, with bounded memory.

Two readers, one per direction:

- ``CommandLines`` splits what a client sends into command lines. A line over the limit is reported
  once and then discarded up to its end, so a client that never sends a line feed cannot grow memory.
- ``ResponseReader`` splits what an upstream sends into status lines and multi-line bodies. Bodies are
  passed on chunk by chunk, still dot-stuffed, so relaying never holds a whole message in memory; only
  the terminator ``CRLF.CRLF`` (RFC 1939 §3) is looked for, across chunk boundaries.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Protocol

from .wire import CRLF

TERMINATOR = b"\r\n.\r\n"
# RFC 1939 §3 caps a status line at 512 octets; leave room for servers that exceed it a little.
MAX_STATUS_LINE = 8192
_OCTETS = re.compile(rb"^\+OK (\d+) octets")


class LineTooLong:
    """Returned by ``CommandLines.next_line`` in place of a line that exceeded the limit."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = LineTooLong()


class CommandLines:
    """A client's byte stream as command lines (without their terminators).

    Lines end with LF; a CR before it is dropped. Lines are handed out one at a time by
    ``next_line`` so that the caller can stop in the middle of a packet (pipelined commands while a
    login is in flight, STLS) and leave the rest buffered or throw it away.

    Linear time: the search for a line feed resumes where the last one stopped, so a line arriving
    one byte at a time is scanned once, and deleting a consumed prefix of a ``bytearray`` costs no
    copy of the rest (CPython moves the buffer's start).
    """

    def __init__(self, max_length: int) -> None:
        #: longest accepted line, terminator included (RFC 2449 §4 counts the CRLF)
        self.max_length = max_length
        self._buffer = bytearray()
        self._scanned = 0  # octets at the front of the buffer known to hold no line feed
        self._discarding = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | LineTooLong | None:
        """The next complete line, ``TOO_LONG`` once per over-long line, or None for "need more"."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if self._discarding:
                if end == -1:
                    self._buffer.clear()
                    self._scanned = 0
                    return None
                self._consume(end + 1)
                self._discarding = False
                continue
            if end == -1:
                if len(self._buffer) >= self.max_length:
                    # Report now, not at the line's end, which may never come.
                    self._buffer.clear()
                    self._scanned = 0
                    self._discarding = True
                    return TOO_LONG
                self._scanned = len(self._buffer)
                return None
            if end + 1 > self.max_length:
                self._consume(end + 1)
                return TOO_LONG
            line = bytes(self._buffer[:end])
            self._consume(end + 1)
            return line[:-1] if line.endswith(b"\r") else line

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._scanned = 0

    def clear(self) -> bytes:
        """Throw away whatever is buffered and return it (STLS: RFC 2595 §4 injection defence)."""
        pending = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        self._discarding = False
        return pending

    def __len__(self) -> int:
        return len(self._buffer)


def body_limit(status: bytes) -> int | None:
    """The most octets a body may have: twice what ``+OK n octets`` announced (stuffing and CRLF
    can add, but never double it), plus room for small messages; None without an announcement."""
    match = _OCTETS.match(status)
    return 2 * int(match.group(1)) + 65536 if match else None


class ResponseHandler(Protocol):
    """Receives what ``ResponseReader`` finds, in order."""

    def status_received(self, line: bytes) -> bool:
        """A status line, with its CRLF. Return True if a multi-line body follows it."""

    def body_received(self, data: bytes) -> None:
        """Body bytes as on the wire (dot-stuffed); the last chunk ends with the terminator."""

    def body_ended(self) -> None:
        """The terminator has been passed to ``body_received``."""

    def line_too_long(self) -> None:
        """A status line, a body line or a body exceeded its limit: the stream cannot be trusted
        any more (and must not be allowed to exhaust memory)."""


class BodyScanner:
    """Finds the end of one multi-line body across chunks, copying nothing larger than 4 bytes.

    The scan starts as if a CRLF had just been seen (the status line's), so that an empty body, a
    lone ``.CRLF``, is found too.
    """

    def __init__(self) -> None:
        self._tail = CRLF

    def feed(self, data: bytes) -> int:
        """Return how many bytes of ``data`` belong to the body (terminator included), or -1."""
        # A terminator straddling the previous chunk and this one.
        seam = self._tail + data[: len(TERMINATOR) - 1]
        index = seam.find(TERMINATOR)
        if index != -1:
            return index + len(TERMINATOR) - len(self._tail)
        index = data.find(TERMINATOR)
        if index != -1:
            return index + len(TERMINATOR)
        self._tail = (self._tail + data)[-(len(TERMINATOR) - 1) :]
        return -1


class ResponseReader:
    """An upstream's byte stream as status lines and bodies, delivered to a ``ResponseHandler``.

    ``pause()`` stops delivery at the next boundary (the rest stays buffered) until ``resume()``;
    ``take_buffer()`` removes whatever has not been delivered yet (upstream STLS: anything after the
    ``+OK`` was sent in plain text and must not be believed, RFC 2595 §4).

    Linear time whatever the chunking: received chunks are queued as they are, never joined; each
    octet is looked at once by the line search or the terminator scan, and copied at most once (when
    a body chunk is cut at its terminator). Only a status line split across chunks is assembled, and
    that is bounded by ``max_line_length``. ``pending`` is what the owner uses to bound the queue.
    """

    def __init__(self, handler: ResponseHandler, max_line_length: int = MAX_STATUS_LINE,
                 max_body_line: int | None = None) -> None:
        self._handler = handler
        self._max_line_length = max_line_length
        #: the longest line a body may hold (None: no limit); checked per chunk with one rfind
        self.max_body_line = max_body_line
        #: the most octets the current body may have (None: no limit); set by the handler for each
        #: multi-line answer in ``status_received``
        self.body_limit: int | None = None
        self._body_size = 0
        self._line_run = 0
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # octets of ``_chunks[0]`` already delivered
        self._queued = 0  # octets in ``_chunks`` not delivered yet
        self._partial: list[bytes] = []  # the pieces of a status line whose end has not arrived
        self._partial_size = 0
        self._body: BodyScanner | None = None
        self._paused = False
        self._broken = False

    def feed(self, data: bytes) -> None:
        if data and not self._broken:
            self._chunks.append(data)
            self._queued += len(data)
        self._deliver()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._deliver()

    def take_buffer(self) -> bytes:
        """Remove and return everything received and not delivered."""
        pending = b"".join(self._partial) + b"".join(self._chunks)[self._offset :]
        self._chunks.clear()
        self._offset = self._queued = 0
        self._partial, self._partial_size = [], 0
        return pending

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def pending(self) -> int:
        """Octets received and not delivered yet."""
        return self._queued + self._partial_size

    @property
    def in_body(self) -> bool:
        return self._body is not None

    def _advance(self, count: int) -> None:
        self._offset += count
        self._queued -= count
        if self._offset == len(self._chunks[0]):
            self._chunks.popleft()
            self._offset = 0

    def _deliver(self) -> None:
        while self._chunks and not self._paused and not self._broken:
            chunk = self._chunks[0]
            if self._body is not None:
                self._deliver_body(chunk[self._offset :] if self._offset else chunk)
            else:
                self._deliver_status(chunk)

    def _within_limits(self, data: bytes) -> bool:
        """Count ``data`` against the body's limits; False (and the stream broken) past one."""
        self._body_size += len(data)
        last = data.rfind(b"\n")
        self._line_run = self._line_run + len(data) if last == -1 else len(data) - last - 1
        too_long = self.max_body_line is not None and self._line_run > self.max_body_line
        too_big = self.body_limit is not None and self._body_size > self.body_limit
        if too_long or too_big:
            self._break()
            return False
        return True

    def _deliver_body(self, data: bytes) -> None:
        assert self._body is not None
        end = self._body.feed(data)
        if end == -1:
            self._advance(len(data))
            if self._within_limits(data):
                self._handler.body_received(data)
            return
        self._body = None
        self._advance(end)
        self._handler.body_received(data[:end] if end < len(data) else data)
        self._handler.body_ended()

    def _deliver_status(self, chunk: bytes) -> None:
        """Deliver one status line, or move an incomplete one into ``_partial``."""
        start = self._offset
        end = chunk.find(b"\n", start)
        if end == -1:
            if self._partial_size + len(chunk) - start > self._max_line_length:
                self._break()
                return
            self._partial.append(chunk[start:] if start else chunk)
            self._partial_size += len(chunk) - start
            self._advance(len(chunk) - start)
            return
        if self._partial_size + end + 1 - start > self._max_line_length:
            self._break()
            return
        line = b"".join([*self._partial, chunk[start : end + 1]]) if self._partial else chunk[start : end + 1]
        self._partial, self._partial_size = [], 0
        self._advance(end + 1 - start)
        if not line.endswith(CRLF):
            line = line[:-1] + CRLF
        self.body_limit = None
        if self._handler.status_received(line):
            self._body = BodyScanner()
            self._body_size = self._line_run = 0

    def _break(self) -> None:
        self._broken = True
        self._chunks.clear()
        self._offset = self._queued = 0
        self._partial, self._partial_size = [], 0
        self._handler.line_too_long()
