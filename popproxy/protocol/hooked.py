"""Response sinks for sessions with hooks: messages through the hook pipeline, sizes kept exact,
deliveries measured for session hooks.

``HookSink`` buffers one RETR or TOP answer (only for messages a message hook applies to, which were
chosen by their size at login, so the buffer is bounded by the hooks' ``max_size``), pauses the
upstream leg so that later answers wait their turn, runs the pipeline, and writes the whole answer
in one go: re-stuffed, padded to the size LIST announced, or ``-ERR [SYS/TEMP]`` when a hook refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..hooks.interfaces import Delivery, MessageContext, MessageFacts, SessionFacts, Verdict
from ..hooks.pipeline import HookFailure, PipelineResult, pad_to, run_message_hooks
from ..pop3.wire import CRLF, err, is_ok, ok, stuff_body, unstuff_body
from .mailbox import MailboxView, top_of
from .meter import DeliveryMeter
from .responses import AnswerQueue, RelaySink

log = Logger()

REFUSED = err("Message temporarily unavailable, try again later.", "SYS/TEMP")


@dataclass
class HookRuntime:
    """What hooked sinks need from their session."""

    clock: IReactorTime
    mailbox: MailboxView | None
    facts: Callable[[], SessionFacts]
    pause_upstream: Callable[[], None]
    resume_upstream: Callable[[], None]
    delivered: Callable[[Delivery], None] | None  # None: no session hook wants deliveries
    wanted_headers: frozenset[str] = frozenset()


class ObservedSink(RelaySink):
    """A relayed answer whose status line is shown to ``on_status`` and may be rewritten first."""

    def __init__(
        self,
        queue: AnswerQueue,
        write: Callable[[bytes], None],
        abort: Callable[[], None],
        on_status: Callable[[bytes], bytes],
    ) -> None:
        super().__init__(queue, write, abort)
        self._on_status = on_status

    def status(self, line: bytes, has_body: bool) -> None:
        super().status(self._on_status(line), has_body)


class ListSink(ObservedSink):
    """LIST: every ``n size`` line gets its message's reserved octets added, streaming line by line."""

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[[], None],
                 on_status: Callable[[bytes], bytes], rewrite: Callable[[bytes], bytes]) -> None:
        super().__init__(queue, write, abort, on_status)
        self._rewrite = rewrite
        self._partial = b""

    def body(self, data: bytes) -> None:
        complete, separator, self._partial = (self._partial + data).rpartition(CRLF)
        if separator:
            lines = (complete + CRLF).split(CRLF)[:-1]
            super().body(b"".join(self._rewrite(line) + CRLF for line in lines))


class MeteredSink(RelaySink):
    """A relayed RETR or TOP answer, measured as it streams for the session hooks."""

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[[], None],
                 runtime: HookRuntime, command: str, number: int) -> None:
        super().__init__(queue, write, abort)
        self._runtime = runtime
        self._command = command
        self._number = number
        self._meter = DeliveryMeter(runtime.wanted_headers)
        self._ok = False
        note = runtime.mailbox.not_scanned_note(number) if runtime.mailbox is not None else None
        self._notes = [note] if note else []

    def status(self, line: bytes, has_body: bool) -> None:
        self._ok = is_ok(line)
        super().status(line, has_body)

    def body(self, data: bytes) -> None:
        self._meter.feed_wire(data)
        super().body(data)

    def end(self) -> None:
        if self._ok:
            self._meter.finish_wire()
        super().end()
        _report(self._runtime, self._command, self._number, self._meter if self._ok else None,
                scanned=False, outcome="delivered" if self._ok else "error", notes=self._notes)


class HookSink(RelaySink):
    """RETR n, or TOP n k fetched as ``TOP n <whole>``, of a message that message hooks see."""

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[[], None],
                 runtime: HookRuntime, command: str, number: int, top_lines: int | None = None,
                 on_done: Callable[[int], None] | None = None) -> None:
        super().__init__(queue, write, abort)
        assert runtime.mailbox is not None
        self._on_done = on_done
        self._runtime = runtime
        self._mailbox = runtime.mailbox
        self._command = command
        self._number = number
        self._top_lines = top_lines
        self._status_line = b""
        self._parts: list[bytes] = []
        self._size = 0
        # The upstream said the message has this many octets; allow for stuffing, refuse a flood.
        self._limit = 2 * self._mailbox.sizes[number] + 1024
        self._overflow = False

    def status(self, line: bytes, has_body: bool) -> None:
        self._status_line = line
        self.succeeded = is_ok(line)
        if not has_body:
            self._write(line)

    def body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._overflow = True
            self._parts.clear()
        elif not self._overflow:
            self._parts.append(data)

    def end(self) -> None:
        if not is_ok(self._status_line):
            if self._on_done is not None:
                self._on_done(self._number)
            self._queue.finished(self)
            _report(self._runtime, self._command, self._number, None, scanned=False, outcome="error")
            return
        self._runtime.pause_upstream()
        ensureDeferred(self._process()).addErrback(self._crashed)

    async def _process(self) -> None:
        if self._overflow:
            log.warn(
                "upstream sent more than twice the {size} octets it listed for message {number}; refused",
                size=self._mailbox.sizes[self._number], number=self._number,
                session_id=self._runtime.facts().session_id,
            )
            self._finish_refused(["upstream: message larger than listed; refused"])
            return
        message = unstuff_body(b"".join(self._parts))
        self._parts = []
        context = MessageContext(self._facts())
        result = await run_message_hooks(self._mailbox.hooks_for(self._number), message, context, self._runtime.clock)
        if result.refused:
            self._finish_refused(result.notes)
            return
        final = self._sized(result)
        if final is None:
            self._finish_refused(result.notes)
            return
        if self._top_lines is not None:
            self._mailbox.remember(self._number, final)
        deliver_processed(self._write, self._runtime, self._command, self._number, final, self._top_lines,
                          verdicts=result.verdicts, notes=result.notes)
        self._done()

    def _facts(self) -> MessageFacts:
        return MessageFacts(
            session=self._runtime.facts(),
            number=self._number,
            uidl=self._mailbox.uidls.get(self._number),
            upstream_size=self._mailbox.sizes[self._number],
        )

    def _sized(self, result: PipelineResult) -> bytes | None:
        """The processed message at exactly the size LIST announced, or None if that cannot be."""
        assert result.message is not None
        if not self._mailbox.extra(self._number):
            # No rewriting hook applies: the message must not have changed size; if the upstream's
            # LIST was off, the real size is what RETR says (there is nothing to pad with).
            return result.message
        try:
            return pad_to(result.message, self._mailbox.reported_size(self._number))
        except HookFailure as error:
            result.notes.append(f"size: {error}; refused")
            log.warn("message {number} cannot be padded to its listed size: {reason}; refused",
                     number=self._number, reason=str(error), session_id=self._runtime.facts().session_id)
            return None

    def _finish_refused(self, notes: list[str]) -> None:
        self.succeeded = False
        self._mailbox.refused.add(self._number)
        self._write(REFUSED)
        _report(self._runtime, self._command, self._number, None, scanned=True, outcome="refused", notes=notes)
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done(self._number)
        self._queue.finished(self)
        self._runtime.resume_upstream()

    def _crashed(self, failure: Failure) -> None:
        if self._on_done is not None:
            self._on_done(self._number)
        log.failure("message hook pipeline crashed; session closed", failure)
        self._abort()
        self._runtime.resume_upstream()


def deliver_processed(write: Callable[[bytes], None], runtime: HookRuntime, command: str, number: int,
                      message: bytes, top_lines: int | None, verdicts: tuple[Verdict, ...] = (),
                      notes: list[str] | None = None) -> None:
    """Write the answer to RETR n or TOP n k for an already processed ``message``, and report it."""
    if top_lines is None:
        delivered = message
        write(ok(f"{len(message)} octets") + stuff_body(message))
    else:
        delivered = top_of(message, top_lines)
        write(ok() + stuff_body(delivered))
    meter = DeliveryMeter(runtime.wanted_headers)
    meter.feed_message(delivered)
    _report(runtime, command, number, meter, scanned=True, outcome="delivered", verdicts=verdicts, notes=notes or [])


def _report(runtime: HookRuntime, command: str, number: int, meter: DeliveryMeter | None, *,
            scanned: bool, outcome: str, verdicts: tuple[Verdict, ...] = (), notes: list[str] | None = None) -> None:
    if runtime.delivered is None:
        return
    mailbox = runtime.mailbox
    runtime.delivered(
        Delivery(
            command=command,
            number=number,
            uidl=mailbox.uidls.get(number) if mailbox else None,
            size=meter.size if meter else 0,
            sha256=meter.sha256 if meter else None,
            headers=meter.headers() if meter else {},
            scanned=scanned,
            outcome=outcome,
            verdicts=verdicts,
            notes=tuple(notes or ()),
        )
    )


#: What TOP asks the upstream for when the proxy needs the whole message (RFC 1939 §7: "If the
#: number of lines requested by the POP3 client is greater than than the number of lines in the body,
#: then the POP3 server sends the entire message"); RETR would mark it seen on some servers.
WHOLE_MESSAGE_LINES = 99999999


class TransactionHooks:
    """The TRANSACTION-state side of message hooks and delivery reporting, for one session.

    The client leg asks it, for each command, whether the proxy answers locally (a DELE of a message a
    hook refused; RETR or TOP of a message already processed), what to send upstream (TOP of a hooked
    message becomes ``TOP n <whole>``), and which sink carries the answer.
    """

    def __init__(self, runtime: HookRuntime, queue: AnswerQueue, write: Callable[[bytes], None],
                 abort: Callable[[], None]) -> None:
        self.runtime = runtime
        self._queue = queue
        self._write = write
        self._abort = abort
        #: messages whose hooked RETR/TOP answer is not written yet
        self.in_flight: set[int] = set()

    def must_wait(self, command: Any) -> bool:
        """True for ``DELE n`` while message n's hooks have not decided: whether it may be forwarded
        depends on that decision, so the client leg holds it (and what follows) until then."""
        return command.verb == b"DELE" and self._number(command) in self.in_flight

    @staticmethod
    def _number(command: Any) -> int | None:
        try:
            return int(command.args[0]) if command.args else None
        except ValueError:
            return None

    def local_answer(self, command: Any) -> bytes | None:
        mailbox = self.runtime.mailbox
        number = self._number(command)
        if mailbox is None or number is None:
            return None
        if command.verb == b"DELE" and number in mailbox.refused:
            # The client was not given this message: a client that deletes blindly after RETR must
            # not lose it.
            return err("Message was not delivered, so it is not deleted.", "SYS/TEMP")
        if command.verb in (b"RETR", b"TOP") and number not in mailbox.deleted:
            cached = mailbox.cached(number)
            if cached is not None:
                top_lines = self._top_lines(command)
                if command.verb == b"TOP" and top_lines is None:
                    return None
                answer: list[bytes] = []
                deliver_processed(answer.append, self.runtime, command.verb.decode(), number, cached, top_lines)
                return b"".join(answer)
        return None

    @staticmethod
    def _top_lines(command: Any) -> int | None:
        if command.verb != b"TOP":
            return None
        try:
            lines = int(command.args[1])
        except (IndexError, ValueError):
            return None
        return lines if lines >= 0 else None

    def _hooked(self, command: Any) -> int | None:
        """The message number if ``command`` fetches a message that hooks see."""
        mailbox = self.runtime.mailbox
        number = self._number(command)
        if mailbox is None or number is None or number in mailbox.deleted or not mailbox.scanned(number):
            return None
        if command.verb == b"TOP" and self._top_lines(command) is None:
            return None  # malformed TOP: let the upstream answer -ERR
        return number

    def upstream_line(self, command: Any) -> bytes:
        number = self._hooked(command) if command.verb == b"TOP" else None
        if number is not None:
            return b"TOP %d %d\r\n" % (number, WHOLE_MESSAGE_LINES)
        return command.to_line()

    def sink_for(self, command: Any) -> RelaySink | None:
        """A sink for ``command``, or None for a plain relay."""
        mailbox = self.runtime.mailbox
        verb = command.verb
        args = (self._queue, self._write, self._abort)
        if verb in (b"RETR", b"TOP"):
            number = self._hooked(command)
            if number is not None:
                self.in_flight.add(number)
                return HookSink(*args, self.runtime, verb.decode(), number, self._top_lines(command),
                                on_done=self.in_flight.discard)
            if self.runtime.delivered is not None and self._number(command) is not None:
                return MeteredSink(*args, self.runtime, verb.decode(), self._number(command) or 0)
            return None
        if mailbox is None:
            return None
        if verb == b"STAT":
            return ObservedSink(*args, mailbox.stat_line)
        if verb == b"LIST":
            if command.args:
                return ObservedSink(*args, mailbox.list_line)
            return ListSink(*args, lambda line: line, mailbox.list_line)
        if verb == b"DELE":
            number = self._number(command)

            def deleted(line: bytes) -> bytes:
                if is_ok(line) and number is not None:
                    mailbox.deleted_ok(number)
                return line

            return ObservedSink(*args, deleted)
        if verb == b"RSET":

            def reset(line: bytes) -> bytes:
                if is_ok(line):
                    mailbox.reset()
                return line

            return ObservedSink(*args, reset)
        return None
