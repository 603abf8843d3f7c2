"""Running message hooks over one message: order, timeouts, error policies, and exact sizes.

The sizes a POP3 server reports must be exact (RFC 1939 §5 and §7: LIST, STAT and RETR's ``+OK n
octets``; real fetchers reject a message whose size does not match). popproxy reports each message
that rewriting hooks may touch as ``upstream size + reservation`` where the reservation is the sum of
the hooks' own reservations plus room for a filler header, and after the hooks ran it pads the
message with that filler header to exactly the reported size. A hook that grows a message beyond its
reservation has failed, and its ``on_error`` policy applies: ``"pass"`` goes on with the message as it
stood before that hook (never with a marker, which would break the size), ``"refuse"`` makes the
proxy answer ``-ERR [SYS/TEMP]`` so that the client leaves the message on the server. A hook that
raises ``MessageRefused`` (a virus) gets that answer whatever its ``on_error`` says.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import CancelledError, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..metrics import NULL_METRICS, IMetrics
from ..protocol.spool import Spool
from .interfaces import IChunkedHook, IStaged, MessageContext, MessageRefused, Verdict
from .registry import BuiltHook
from .sizing import (  # noqa: F401  (re-exported: the pipeline's public names)
    CRLF,
    FILLER_MIN,
    HookFailure,
    PipelineResult,
    filler,
    ordered,
    pad_to,
    reservation,
)

log = Logger()


def _check(result: object, before: int, allowed: int, name: str) -> bytes:
    """The hook's result, in the form the proxy relays, or ``HookFailure``."""
    if not isinstance(result, (bytes, bytearray, memoryview)):
        raise HookFailure(f"returned {type(result).__name__}, not bytes")
    result = bytes(result)
    # POP3 needs the message to end with CRLF (RFC 1939 §3). Bare LFs elsewhere are left alone: they
    # may be the untouched bytes of a binary part, and they cannot forge a terminator.
    if result and not result.endswith(CRLF):
        result += CRLF
    if len(result) > before + allowed:
        raise HookFailure(f"grew the message by {len(result) - before} octets, more than its reservation of {allowed}")
    return result


def verdict_label(verdict: Verdict | None) -> str | None:
    """What a hook concluded, as ``IMetrics.hook_ran`` reports it: ``spam``/``ham`` (a spam filter),
    ``virus``/``clean`` (a virus scanner), ``recorded`` (any other verdict), None (no verdict)."""
    if verdict is None:
        return None
    if verdict.spam is not None:
        return "spam" if verdict.spam else "ham"
    if "virus" in verdict.details:
        return "virus" if verdict.details["virus"] else "clean"
    return "recorded"


class _Run:
    """One hook's run over one message, as reported to ``IMetrics.hook_ran``."""

    def __init__(self, metrics: IMetrics, clock: IReactorTime, context: MessageContext, name: str) -> None:
        self._metrics, self._clock, self._context, self._name = metrics, clock, context, name
        self._started = clock.seconds()
        self._before = context.verdicts.get(name)  # a verdict of an earlier run is not this one's

    def report(self, failed: bool, refused: bool = False) -> None:
        verdict = self._context.verdicts.get(self._name)
        label = "refused" if refused else verdict_label(verdict if verdict is not self._before else None)
        self._metrics.hook_ran(self._name, label, self._clock.seconds() - self._started, failed)


async def run_message_hooks(
    hooks: Sequence[BuiltHook], message: bytes | Spool, context: MessageContext, clock: IReactorTime,
    size: int | None = None, metrics: IMetrics = NULL_METRICS
) -> PipelineResult:
    """Run ``hooks`` in order over ``message``; each sees what the one before returned.

    A message kept in a ``Spool`` file (larger than ``[limits] spool_above``) goes in chunks to the
    hooks that read chunks (``IChunkedHook``) and stays in its file while they leave it unchanged;
    a hook that takes bytes gets it whole, and from then on the message is bytes.

    Never raises: every failure becomes a note and is handled by the failing hook's policy.

    Each hook that runs is reported to ``metrics`` (``hook_ran``): its verdict, its time by ``clock``,
    and whether it failed. A hook skipped for ``max_size`` did not run and is not reported.
    """
    notes: list[str] = []
    padded = size is None
    for built in hooks:
        config = built.config
        if not padded and IStaged.providedBy(built.hook) and built.hook.stage == "delivered":
            # What the client gets, filler included: one message, one SHA-256 (archive, audit log).
            padded = True
            if isinstance(message, Spool):
                message = message.read()  # the delivered stage takes bytes: its hooks' max_size bounds it
            try:
                message = pad_to(message, size)  # type: ignore[arg-type]
            except HookFailure as error:
                notes.append(f"size: {error}; refused")
                return PipelineResult(None, tuple(context.verdicts.values()), notes)
        if context.facts.upstream_size > config.max_size:
            notes.append(f"{config.name}: not scanned, {context.facts.upstream_size} octets > max_size {config.max_size}")
            continue
        run = _Run(metrics, clock, context, config.name)
        try:
            if isinstance(message, Spool) and IChunkedHook.providedBy(built.hook):
                pending = maybeDeferred(built.hook.process_chunks, message.chunks(), message.size, context)
                pending.addTimeout(config.timeout, clock)
                outcome = await pending
                result = message if outcome is None else _check(outcome, message.size, built.hook.reservation,
                                                                config.name)
            else:
                data = message.read() if isinstance(message, Spool) else message
                pending = maybeDeferred(built.hook.process, data, context)
                pending.addTimeout(config.timeout, clock)
                result = _check(await pending, len(data), built.hook.reservation, config.name)
        except MessageRefused as refusal:  # the hook's decision, not its failure: on_error does not apply
            run.report(failed=False, refused=True)
            log.info(
                "hook {hook} refused message {number} of {user}: {reason}",
                hook=config.name,
                number=context.facts.number,
                user=context.facts.session.user,
                session_id=context.facts.session.session_id,
                reason=str(refusal),
            )
            notes.append(f"{config.name}: {refusal}; refused")
            return PipelineResult(None, tuple(context.verdicts.values()), notes)
        except (TimeoutError, CancelledError):
            failure = f"timed out after {config.timeout:g}s"
        except HookFailure as error:
            failure = str(error)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"[:300]
        else:
            run.report(failed=False)
            message = result
            continue
        run.report(failed=True)
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
