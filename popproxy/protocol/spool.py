"""A message that message hooks must see, kept on disk once it is large (``[limits] spool_above``).

A ``Hooked`` RETR collects the un-stuffed message here: in memory up to ``spool_above`` octets, then
in a temporary file in ``spool_dir`` (Python's ``tempfile.TemporaryFile``: mode 0600, and on Linux
opened with ``O_TMPFILE``, so the file has no name and nothing is left behind by a crash; where
that flag is missing it is unlinked as soon as it is created). A hook that can read a message in
chunks (``IChunkedHook``) is given the spool; one that wants bytes gets the whole message, which its
``max_size`` bounds; an unchanged spooled message is delivered from the file a chunk at a time, as
the client takes it (``machine.SessionMachine``), so a 50 MB message is scanned and delivered in
memory of a few chunks.

Also here: the streaming counterparts of ``stuff_body`` and ``top_of`` for such deliveries.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from ..pop3.wire import CRLF

#: Octets read from a spool file at a time.
CHUNK = 65536
#: How spool files start (where the system has no O_TMPFILE they have a name for an instant).
PREFIX = "popproxy-spool-"


class Spool:
    """The octets of one message, in memory up to ``threshold`` octets and in a temporary file
    beyond. Not thread-safe; blocking file I/O of page-cache speed, in the reactor's thread."""

    def __init__(self, threshold: int, directory: str | None = None) -> None:
        self._threshold = threshold
        self._directory = directory or None
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0

    @property
    def spooled(self) -> bool:
        """Whether the message went to disk."""
        return self._file is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._memory += data
        if len(self._memory) > self._threshold:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix=PREFIX)
            self._file.write(self._memory)
            self._memory = bytearray()

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The message from its start, ``size`` octets at a time."""
        if self._file is None:
            for start in range(0, len(self._memory), size):
                yield bytes(self._memory[start : start + size])
            return
        self._file.flush()
        position = 0
        while True:
            self._file.seek(position)
            chunk = self._file.read(size)
            if not chunk:
                return
            position += len(chunk)
            yield chunk

    def read(self) -> bytes:
        """The whole message in memory (for a hook that takes bytes: its ``max_size`` bounds it)."""
        return bytes(self._memory) if self._file is None else b"".join(self.chunks())

    def close(self) -> None:
        """Let the file go (it has no name: closing it frees the space)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()


def clean_spool_dir(directory: str) -> list[str]:
    """Remove spool files a process that died left in ``directory`` (the system's temporary folder
    if empty): at start and at stop. Spool files have no name while in use, so any found is stale.
    Returns the names removed."""
    folder = Path(directory or tempfile.gettempdir())
    removed = []
    for path in folder.glob(PREFIX + "*"):
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path.name)
    return removed


class StreamingStuffer:
    """``stuff_body`` a chunk at a time (RFC 1939 §3: a line that starts with "." gets one more),
    for a message whose chunks arrive in order; ``finish`` ends it with CRLF and the terminator."""

    def __init__(self) -> None:
        self._last = CRLF  # the last two octets given so far: a message starts as after a line break

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n.", b"\r\n..")
        # A "CRLF." split between this chunk and the ones before it.
        if chunk[:1] == b"." and self._last.endswith(CRLF):
            out = b"." + out
        elif chunk[:2] == b"\n." and self._last.endswith(b"\r"):
            out = b"\n.." + out[2:]
        self._last = (self._last + chunk)[-2:]
        return out

    def finish(self) -> bytes:
        return (b"" if self._last == CRLF else CRLF) + b"." + CRLF


def top_chunks(chunks: Iterable[bytes], lines: int) -> Iterator[bytes]:
    """What ``top_of(message, lines)`` returns, from the message's chunks: the header block, the empty
    line, and the first ``lines`` lines of the body (RFC 1939 §7)."""
    tail = b""
    in_header = True
    remaining = lines
    carried_cr = False
    for chunk in chunks:
        if in_header:
            window = tail + chunk
            end = window.find(b"\r\n\r\n")
            if end == -1:
                tail = window[-3:]
                yield chunk
                continue
            cut = end + 4 - len(tail)
            yield chunk[:cut]
            chunk, in_header = chunk[cut:], False
        if remaining <= 0:
            return
        # Body lines end with CRLF (as top_of splits them); one may straddle two chunks.
        position = 0
        if carried_cr and chunk[:1] == b"\n":
            position, remaining = 1, remaining - 1
        while remaining > 0:
            line_end = chunk.find(CRLF, position)
            if line_end == -1:
                break
            position, remaining = line_end + 2, remaining - 1
        if remaining <= 0:
            yield chunk[:position]
            return
        carried_cr = chunk.endswith(b"\r")
        yield chunk
