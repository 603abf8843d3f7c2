"""What the proxy knows about a mailbox whose messages hooks may rewrite: sizes, UIDLs, reservations.

With message hooks active, the sizes the client sees must already include what the hooks may add
(``pipeline.reservation``), from the first LIST or STAT on: a fetcher compares them with what RETR
delivers. So at login the proxy asks the upstream for LIST and UIDL once (a few octets a message, not
the messages), and from then on rewrites the sizes in LIST and STAT answers, keeps track of DELE and
RSET for STAT, remembers which messages hooks refused (their DELE is never forwarded), and keeps the
processed messages that TOP fetched, so that a later RETR or TOP is answered without fetching and
scanning again.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

from ..hooks.pipeline import ordered, reservation
from ..hooks.registry import BuiltHook
from ..pop3.wire import CRLF

_LIST_LINE = re.compile(rb"^(\+OK )?(\d+) (\d+)(.*)$", re.DOTALL)
_STAT_LINE = re.compile(rb"^\+OK (\d+) (\d+)(.*)$", re.DOTALL)

#: Processed messages kept per session for TOP-then-RETR, at most this many octets in all.
CACHE_LIMIT = 16 * 1024 * 1024


def parse_listing(lines: Sequence[bytes]) -> dict[int, bytes]:
    """``n value`` lines of a LIST or UIDL answer, as {n: value}; malformed lines are skipped."""
    result = {}
    for line in lines:
        number, _, value = line.partition(b" ")
        if number.isdigit() and value:
            result[int(number)] = value.split(b" ", 1)[0]
    return result


class MailboxView:
    """Sizes and reservations for one session's mailbox, for the hooks that apply to its user."""

    def __init__(self, sizes: dict[int, int], uidls: dict[int, str], hooks: Sequence[BuiltHook]) -> None:
        self.sizes = sizes
        self.uidls = uidls
        self._hooks = ordered(hooks)
        self._extra = {n: reservation(self.hooks_for(n)) for n in sizes}
        self.deleted: set[int] = set()
        self.refused: set[int] = set()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached_bytes = 0

    def hooks_for(self, number: int) -> list[BuiltHook]:
        """The hooks that see message ``number``: those whose ``max_size`` it fits."""
        size = self.sizes.get(number)
        if size is None:
            return []
        return [built for built in self._hooks if size <= built.config.max_size]

    def scanned(self, number: int) -> bool:
        return bool(self.hooks_for(number))

    def not_scanned_note(self, number: int) -> str | None:
        """Why message hooks that apply to this user skip message ``number``, if they do."""
        size = self.sizes.get(number)
        if not self._hooks or size is None or self.scanned(number):
            return None
        largest = max(built.config.max_size for built in self._hooks)
        return f"not scanned: {size} octets, more than max_size {largest}"

    def extra(self, number: int) -> int:
        """Octets added to message ``number``'s size in what the client is told."""
        return self._extra.get(number, 0)

    def reported_size(self, number: int) -> int:
        return self.sizes[number] + self.extra(number)

    # -- answers rewritten on their way to the client ------------------------------------------------

    def list_line(self, line: bytes) -> bytes:
        """``n size`` (a LIST line) or ``+OK n size`` (LIST n) with the reserved octets added."""
        match = _LIST_LINE.match(line)
        if not match:
            return line
        status, number, size, rest = match.groups()
        extra = self.extra(int(number))
        if not extra:
            return line
        return (status or b"") + number + b" " + str(int(size) + extra).encode() + rest

    def stat_line(self, line: bytes) -> bytes:
        """``+OK count octets`` with the octets of every message not marked deleted adjusted."""
        match = _STAT_LINE.match(line)
        if not match:
            return line
        count, octets, rest = match.groups()
        extra = sum(self.extra(n) for n in self.sizes if n not in self.deleted)
        return b"+OK " + count + b" " + str(int(octets) + extra).encode() + rest

    # -- DELE / RSET bookkeeping ---------------------------------------------------------------------

    def deleted_ok(self, number: int) -> None:
        self.deleted.add(number)

    def reset(self) -> None:
        """RSET: RFC 1939 §5 unmarks every deleted message (refusals stand: the hook said no)."""
        self.deleted.clear()

    # -- processed messages --------------------------------------------------------------------------

    def cached(self, number: int) -> bytes | None:
        return self._cache.get(number)

    def remember(self, number: int, message: bytes) -> None:
        if len(message) > CACHE_LIMIT:
            return
        old = self._cache.pop(number, None)
        if old is not None:
            self._cached_bytes -= len(old)
        self._cache[number] = message
        self._cached_bytes += len(message)
        while self._cached_bytes > CACHE_LIMIT:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= len(evicted)


def top_of(message: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    head, separator, body = message.partition(CRLF + CRLF)
    if not separator:
        return message
    kept = body.split(CRLF)
    if kept and kept[-1] == b"":
        kept.pop()
    return head + CRLF + CRLF + b"".join(line + CRLF for line in kept[:lines])
