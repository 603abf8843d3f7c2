"""Measuring a message as it streams past: the octets a client stores, their SHA-256, and headers.

For the audit log, without buffering the message: the wire body is un-dot-stuffed on the fly (RFC
1939 §3) with a few octets held back at each chunk's end, so that a ``CRLF..`` or the terminator
split across chunks is still seen whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..hooks.mimesplice import decoded_value, header_fields

_STUFFED = b"\r\n.."
_HEADER_LIMIT = 65536  # octets of the header block kept for parsing; the rest of a huge header is ignored


class StreamingUnstuffer:
    """Turns a wire body (terminator included) into the message octets, chunk by chunk."""

    def __init__(self) -> None:
        # A virtual CRLF before the body, so that a first line starting with ".." is un-stuffed too.
        self._carry = b"\r\n"
        self._skip = 2

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        # Hold back anything that could be the start of "\r\n.." or of the terminator "\r\n.\r\n".
        keep = 5
        cut = max(0, len(data) - keep)
        ready, self._carry = data[:cut], data[cut:]
        return self._emit(ready)

    def _emit(self, ready: bytes, final: bool = False) -> bytes:
        if not final:
            # A "\r\n.." straddling ``ready`` and the carry: move the partial pattern into the carry.
            for size in (3, 2, 1):
                if ready.endswith(_STUFFED[:size]):
                    self._carry = ready[-size:] + self._carry
                    ready = ready[:-size]
                    break
        out = ready.replace(_STUFFED, b"\r\n.")
        if self._skip:
            dropped = min(self._skip, len(out))
            out = out[dropped:]
            self._skip -= dropped
        return out

    def finish(self) -> bytes:
        """The rest of the message, without the terminator (which must be what is left)."""
        data = self._carry
        if data.endswith(b".\r\n"):
            data = data[:-3]
        self._carry = b""
        return self._emit(data, final=True) if data else b""


class DeliveryMeter:
    """Counts, hashes and reads the headers of one message, given as wire chunks or whole."""

    def __init__(self, wanted_headers: Iterable[str] = ()) -> None:
        self._unstuffer = StreamingUnstuffer()
        self._hash = hashlib.sha256()
        self.size = 0
        self._wanted = {name.lower() for name in wanted_headers} | {"message-id"}
        self._head = bytearray()
        self._head_done = False

    def feed_wire(self, chunk: bytes) -> None:
        self._take(self._unstuffer.feed(chunk))

    def finish_wire(self) -> None:
        self._take(self._unstuffer.finish())

    def feed_message(self, message: bytes) -> None:
        """A whole, un-stuffed message (the hooked path already has it)."""
        self._take(message)

    def _take(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self._hash.update(data)
        if not self._head_done:
            start = max(0, len(self._head) - 3)  # a blank line may straddle the previous piece
            self._head += data[: _HEADER_LIMIT - len(self._head)]
            if self._head.find(b"\r\n\r\n", start) != -1 or len(self._head) >= _HEADER_LIMIT:
                self._head_done = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def headers(self) -> dict[str, str]:
        """The wanted headers (first occurrence each), unfolded and decoded for people to read: raw
        8-bit values as UTF-8 (RFC 6532), encoded words (RFC 2047) decoded; bytes that do not decode
        are replaced, never dropped silently."""
        head = bytes(self._head)
        found: dict[str, str] = {}
        seen: set[str] = set()
        for field in header_fields(head):  # the hooks' one header scanner
            if field.name.lower() not in self._wanted or field.name.lower() in seen:
                continue
            seen.add(field.name.lower())
            found[field.name] = " ".join(decoded_value(head, field).split())[:1000]
        return found
