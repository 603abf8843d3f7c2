"""Sizes of messages that hooks may rewrite: reservations, the filler header, exact padding.

Pure (no Twisted): the session machine uses it to keep LIST, STAT and RETR sizes exact, and the hook
pipeline to enforce what each hook may add. See ``pipeline`` for the policy these serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .interfaces import IStaged, Verdict

if TYPE_CHECKING:
    from ..protocol.spool import Spool
    from .registry import BuiltHook

CRLF = b"\r\n"

_PAD_NAME = b"X-Popproxy-Pad: "
_PAD_LINE = 76  # characters of filler per line: lines stay well under RFC 5322's 78
#: The shortest filler header: name, one character, CRLF.
FILLER_MIN = len(_PAD_NAME) + 1 + len(CRLF)


class HookFailure(Exception):
    """A hook did not produce a usable message: it raised, timed out, or broke the contract."""


@dataclass
class PipelineResult:
    """What the hooks made of one message.

    ``message`` is None when a hook with ``on_error = "refuse"`` failed: the proxy then answers
    ``-ERR [SYS/TEMP]``. ``notes`` say what went wrong and what the proxy did about it (for the audit
    log and the operator's log).
    """

    message: bytes | Spool | None
    verdicts: tuple[Verdict, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.message is None


def filler(length: int) -> bytes:
    """A header of exactly ``length`` octets (at least ``FILLER_MIN``), folded into lines of at most
    ``len(_PAD_NAME) + _PAD_LINE + 2`` octets, holding only ``x`` characters."""
    if length < FILLER_MIN:
        raise ValueError(f"a filler header needs at least {FILLER_MIN} octets, not {length}")
    first = min(length - len(_PAD_NAME) - 2, _PAD_LINE)
    rest = length - (len(_PAD_NAME) + first + 2)
    if 0 < rest < 4:  # too little for a continuation line: move some filler from the first line
        first -= 4 - rest
        rest = 4
    lines = []
    while rest:
        # Continuation lines are TAB + filler + CRLF: at least 4 octets, at most _PAD_LINE + 3.
        size = min(rest, _PAD_LINE + 3)
        if 0 < rest - size < 4:  # leave enough for one more valid continuation line
            size = rest - 4
        lines.append(b"\t" + b"x" * (size - 3) + CRLF)
        rest -= size
    return _PAD_NAME + b"x" * first + CRLF + b"".join(lines)


def pad_to(message: bytes, size: int) -> bytes:
    """``message`` with a filler header in front, exactly ``size`` octets long.

    Raises ``HookFailure`` if the message is too long for that (its hooks outgrew their reservation).
    """
    missing = size - len(message)
    if missing < FILLER_MIN:
        raise HookFailure(f"message is {len(message)} octets, more than the {size - FILLER_MIN} that fit")
    return filler(missing) + message


def reservation(hooks: Sequence[BuiltHook]) -> int:
    """Octets to add to the size of a message that ``hooks`` process: theirs, plus the filler's."""
    total = sum(built.hook.reservation for built in hooks)
    return total + FILLER_MIN if total else 0


def ordered(hooks: Sequence[BuiltHook]) -> list[BuiltHook]:
    """Configured order, except hooks that ask to see the message as received (``stage =
    "received"``) run first and those that want it as delivered (``"delivered"``) run last."""
    rank: dict[str | None, int] = {"received": 0, "delivered": 2}
    return sorted(hooks, key=lambda built: rank.get(built.hook.stage if IStaged.providedBy(built.hook) else None, 1))
