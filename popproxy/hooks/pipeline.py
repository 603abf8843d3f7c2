"""Running message hooks over one message: order, timeouts, error policies, and exact sizes.

The sizes a POP3 server reports must be exact (RFC 1939 §5 and §7: LIST, STAT and RETR's ``+OK n
octets``; real fetchers reject a message whose size does not match). popproxy reports each message
that rewriting hooks may touch as ``upstream size + reservation`` where the reservation is the sum of
the hooks' own reservations plus room for a filler header, and after the hooks ran it pads the
message with that filler header to exactly the reported size. A hook that grows a message beyond its
reservation has failed, and its ``on_error`` policy applies: ``"pass"`` goes on with the message as it
stood before that hook (never with a marker, which would break the size), ``"refuse"`` makes the
proxy answer ``-ERR [SYS/TEMP]`` so that the client leaves the message on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .interfaces import MessageContext, Verdict
from .registry import BuiltHook

log = Logger()

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

    message: bytes | None
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
    rank = {"received": 0, "delivered": 2}
    return sorted(hooks, key=lambda built: rank.get(getattr(built.hook, "stage", None), 1))


def _check(result: Any, before: bytes, allowed: int, name: str) -> bytes:
    """The hook's result, in the form the proxy relays, or ``HookFailure``."""
    if not isinstance(result, (bytes, bytearray, memoryview)):
        raise HookFailure(f"returned {type(result).__name__}, not bytes")
    result = bytes(result)
    # POP3 needs the message to end with CRLF (RFC 1939 §3). Bare LFs elsewhere are left alone: they
    # may be the untouched bytes of a binary part, and they cannot forge a terminator.
    if result and not result.endswith(CRLF):
        result += CRLF
    if len(result) > len(before) + allowed:
        raise HookFailure(f"grew the message by {len(result) - len(before)} octets, more than its reservation of {allowed}")
    return result


async def run_message_hooks(
    hooks: Sequence[BuiltHook], message: bytes, context: MessageContext, clock: IReactorTime
) -> PipelineResult:
    """Run ``hooks`` in order over ``message``; each sees what the one before returned.

    Never raises: every failure becomes a note and is handled by the failing hook's policy.
    """
    notes: list[str] = []
    for built in hooks:
        config = built.config
        if context.facts.upstream_size > config.max_size:
            notes.append(f"{config.name}: not scanned, {context.facts.upstream_size} octets > max_size {config.max_size}")
            continue
        try:
            pending = maybeDeferred(built.hook.process, message, context)
            pending.addTimeout(config.timeout, clock)
            result = _check(await pending, message, built.hook.reservation, config.name)
        except (TimeoutError, CancelledError):
            failure = f"timed out after {config.timeout:g}s"
        except HookFailure as error:
            failure = str(error)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"[:300]
        else:
            message = result
            continue
        log.warn(
            "hook {hook} failed on message {number} of {user}: {reason}; {policy}",
            hook=config.name,
            number=context.facts.number,
            user=context.facts.session.user,
            session_id=context.facts.session.session_id,
            reason=failure,
            policy="refused (-ERR [SYS/TEMP])" if config.on_error == "refuse" else "passed as it stood",
        )
        if config.on_error == "refuse":
            notes.append(f"{config.name}: {failure}; refused")
            return PipelineResult(None, tuple(context.verdicts.values()), notes)
        notes.append(f"{config.name}: {failure}; passed as it stood before this hook")
    return PipelineResult(message, tuple(context.verdicts.values()), notes)
