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

from ..hooks.registry import BuiltHook
from ..hooks.sizing import ordered, reservation
from ..pop3.wire import CRLF

_LIST_LINE = re.compile(rb"^(\+OK )?(\d+) (\d+)(.*)$", re.DOTALL)
_STAT_LINE = re.compile(rb"^\+OK (\d+) (\d+)(.*)$", re.DOTALL)



def parse_listing(lines: Sequence[bytes]) -> dict[int, bytes]:
    """``n value`` lines of a LIST or UIDL answer, as {n: value}; malformed lines are skipped."""
    result = {}
    for line in lines:
        number, _, value = line.partition(b" ")
        if number.isdigit() and value:
            result[int(number)] = value.split(b" ", 1)[0]
    return result


class MessageCache:
    """Processed messages kept for TOP-then-RETR, for all sessions of the proxy together.

    One bound for the whole process (``[limits] message_cache`` octets), least recently used first
    out, so that the memory it takes does not grow with the number of sessions. Keys are
    ``(session, number)``; a session drops its own entries when it ends.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[tuple[object, int], bytes] = OrderedDict()
        self.size = 0

    def get(self, session: object, number: int) -> bytes | None:
        key = (session, number)
        message = self._entries.get(key)
        if message is not None:
            self._entries.move_to_end(key)
        return message

    def put(self, session: object, number: int, message: bytes) -> None:
        if len(message) > self.limit:
            return
        self._drop((session, number))
        self._entries[(session, number)] = message
        self.size += len(message)
        while self.size > self.limit:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def drop(self, session: object, number: int) -> None:
        self._drop((session, number))

    def _drop(self, key: tuple[object, int]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old)

    def __len__(self) -> int:
        return len(self._entries)


class MailboxView:
    """Sizes and reservations for one session's mailbox, for the hooks that apply to its user."""

    def __init__(self, sizes: dict[int, int], uidls: dict[int, str], hooks: Sequence[BuiltHook],
                 cache: MessageCache | None = None) -> None:
        self.sizes = sizes
        self.uidls = uidls
        self._hooks = ordered(hooks)
        self._extra = {n: reservation(self.hooks_for(n)) for n in sizes}
        self.deleted: set[int] = set()
        self.refused: set[int] = set()
        self._cache = cache if cache is not None else MessageCache(0)
        self._cached: set[int] = set()  # numbers this session put in the cache (some may be evicted)

    def hooks_for(self, number: int) -> list[BuiltHook]:
        """The hooks that see message ``number``: those whose ``max_size`` it fits."""
        size = self.sizes.get(number)
        if size is None:
            return []
        return [built for built in self._hooks if size <= built.config.max_size]

    def scanned(self, number: int) -> bool:
        return bool(self.hooks_for(number))

    def too_large_for(self, number: int) -> list[BuiltHook]:
        """The hooks with ``oversize = "refuse"`` that message ``number`` is too large for: while
        there is one, the message is not delivered."""
        size = self.sizes.get(number)
        if size is None:
            return []
        return [built for built in self._hooks if size > built.config.max_size and built.config.oversize == "refuse"]

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
        return self._cache.get(self, number)

    def remember(self, number: int, message: bytes) -> None:
        self._cache.put(self, number, message)
        self._cached.add(number)

    def forget(self) -> None:
        """The session is over: its processed messages leave the shared cache."""
        for number in self._cached:
            self._cache.drop(self, number)
        self._cached.clear()


def top_of(message: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    head, separator, body = message.partition(CRLF + CRLF)
    if not separator:
        return message
    kept = body.split(CRLF)
    if kept and kept[-1] == b"":
        kept.pop()
    return head + CRLF + CRLF + b"".join(line + CRLF for line in kept[:lines])
