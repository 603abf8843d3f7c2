"""Arguments of TRANSACTION-state commands, checked and put in canonical form (RFC 1939 §5, §7).

A proxy that passes a message number on as the client wrote it, while deciding things about it by
its own reading, can be made to disagree with the upstream: ``RETR 1_0`` is message 10 to Python's
``int()`` and something else (or an error) to the server. So every message number is checked here
once, the proxy decides with the parsed value, and only the canonical form built from that value is
ever sent upstream.

Canonical: 1 to 10 decimal digits, no sign, no leading zero (RFC 1939 §7 "msg" is a message number;
"n" of TOP a non-negative number of lines, so ``0`` is allowed there and nowhere else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .wire import CRLF, Command

_MESSAGE_NUMBER = re.compile(rb"[1-9][0-9]{0,9}")
_LINE_COUNT = re.compile(rb"0|[1-9][0-9]{0,9}")


@dataclass(frozen=True, slots=True)
class Checked:
    """A TRANSACTION command with its arguments checked: what the proxy decides with, and the exact
    line it sends upstream."""

    verb: bytes
    number: int | None = None  # the message number, for commands that take one
    lines: int | None = None  # TOP's line count

    def to_line(self) -> bytes:
        parts = [self.verb]
        if self.number is not None:
            parts.append(b"%d" % self.number)
        if self.lines is not None:
            parts.append(b"%d" % self.lines)
        return b" ".join(parts) + CRLF


class BadArguments(ValueError):
    """The command's arguments are not what RFC 1939 allows; the text is the client's answer."""


def message_number(raw: bytes) -> int:
    if not _MESSAGE_NUMBER.fullmatch(raw):
        raise BadArguments("Invalid message number.")
    return int(raw)


def line_count(raw: bytes) -> int:
    if not _LINE_COUNT.fullmatch(raw):
        raise BadArguments("Invalid number of lines.")
    return int(raw)


# verb -> (required message number, optional message number, line count)
_SHAPES: dict[bytes, tuple[str, ...]] = {
    b"RETR": ("msg",),
    b"DELE": ("msg",),
    b"TOP": ("msg", "lines"),
    b"LIST": ("msg?",),
    b"UIDL": ("msg?",),
    b"STAT": (),
    b"NOOP": (),
    b"RSET": (),
    b"QUIT": (),
    b"LAST": (),
    b"CAPA": (),
}


def takes_checked_arguments(verb: bytes) -> bool:
    return verb in _SHAPES


def check(command: Command) -> Checked:
    """The canonical form of ``command`` (one of ``_SHAPES``), or ``BadArguments``.

    Arguments are separated by single spaces exactly as RFC 1939 §3 writes them; extra arguments
    are refused rather than dropped, so that nothing the client sent is silently reinterpreted.
    """
    shape = _SHAPES[command.verb]
    args = command.rest.split(b" ") if command.rest else []
    required = sum(1 for kind in shape if not kind.endswith("?"))
    if not required <= len(args) <= len(shape):
        raise BadArguments("Wrong number of arguments.")
    number = lines = None
    for kind, raw in zip(shape, args, strict=False):  # optional arguments may be missing
        if kind == "lines":
            lines = line_count(raw)
        else:
            number = message_number(raw)
    return Checked(command.verb, number, lines)
