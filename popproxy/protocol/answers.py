"""How each upstream answer is shaped on its way to the client (pure: no I/O, no Twisted).

Every command the session machine sends upstream gets an ``Answer``: the machine hands it the
status line, the body chunks and the end as they arrive, and writes what the answer returns to the
client. This is the one place where answers are intercepted: CAPA is filtered, LIST and STAT get the
octets that rewriting hooks may add (so that sizes stay exact, RFC 1939 §5), RETR and TOP are
measured for the audit trail or collected for the message hooks.

Every answer that collects is bounded: CAPA by ``CAPA_LIMIT``, a hooked message by twice the size the
upstream listed for it (dot-stuffing can add, never double), a LIST line being rewritten by the
upstream's body-line limit which the reader enforces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterator

from ..hooks.interfaces import Delivery, Verdict
from ..hooks.sizing import FILLER_MIN, HookFailure, filler, pad_to
from ..pop3 import capa
from ..pop3.wire import CRLF, err, is_ok, ok, stuff_body, stuff_line, unstuff_lines
from .mailbox import MailboxView, top_of
from .meter import DeliveryMeter, StreamingUnstuffer
from .spool import Spool, StreamingStuffer, top_chunks

#: The answer to RETR or TOP of a message that a hook refused (the client leaves it on the server).
REFUSED = err("Message temporarily unavailable, try again later.", "SYS/TEMP")
#: The largest CAPA answer relayed (it is collected to be filtered).
CAPA_LIMIT = 65536

Report = Callable[[Delivery], None]


class AnswerTooLarge(Exception):
    """An answer that must be collected outgrew its bound: the upstream cannot be trusted."""


class Answer:
    """A relayed answer passed on byte for byte (RFC 1939 §3 framing untouched)."""

    #: what the answer is for, as (command, argument), for session hooks
    label: tuple[str, str] | None = None

    def __init__(self) -> None:
        self.succeeded = False
        self.in_body = False

    def status(self, line: bytes, has_body: bool) -> bytes:
        self.succeeded = is_ok(line)
        self.in_body = has_body
        return line

    def body(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        self.in_body = False
        return b""

    @property
    def wants_hooks(self) -> bytes | Spool | None:
        """After ``end``: the message the hooks must see before the answer can be written, if any."""
        return None


class Discarded(Answer):
    """An answer nobody reads: commands forwarded after the client hung up (RFC 1939 §6 QUIT)."""

    def status(self, line: bytes, has_body: bool) -> bytes:
        super().status(line, has_body)
        return b""

    def body(self, data: bytes) -> bytes:
        return b""


class Rewritten(Answer):
    """A status line shown to ``on_status`` and replaced by what it returns (STAT, LIST n, DELE,
    RSET with rewriting hooks)."""

    def __init__(self, on_status: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self._on_status = on_status

    def status(self, line: bytes, has_body: bool) -> bytes:
        return super().status(self._on_status(line), has_body)


class Capabilities(Answer):
    """CAPA after login: the upstream's list minus what does not hold through the proxy (RFC 2449
    §5), collected (bounded) and written whole."""

    def __init__(self) -> None:
        super().__init__()
        self._status = b""
        self._parts: list[bytes] = []
        self._size = 0

    def status(self, line: bytes, has_body: bool) -> bytes:
        super().status(line, has_body)
        if has_body:
            self._status = line
            return b""
        return line

    def body(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > CAPA_LIMIT:
            raise AnswerTooLarge(f"CAPA answer over {CAPA_LIMIT} octets")
        self._parts.append(data)
        return b""

    def end(self) -> bytes:
        super().end()
        if not self._status:
            return b""
        lines = capa.after_login(unstuff_lines(b"".join(self._parts)))
        return self._status + b"".join(stuff_line(line) + CRLF for line in lines) + b"." + CRLF


class Listing(Answer):
    """LIST with rewriting hooks: every ``n size`` line gets its message's reserved octets added.

    Complete lines are rewritten as they stream, each keeping its own line ending; only the start of
    a line whose end has not arrived is held (bounded by the reader's ``upstream_max_line``), as a
    list of pieces joined once the line is complete, so no chunk costs more than its own length.
    """

    def __init__(self, mailbox: MailboxView) -> None:
        super().__init__()
        self._mailbox = mailbox
        self._pending: list[bytes] = []  # the current line's pieces

    def body(self, data: bytes) -> bytes:
        end = data.rfind(b"\n")
        if end == -1:
            self._pending.append(data)
            return b""
        complete = b"".join([*self._pending, data[: end + 1]]) if self._pending else data[: end + 1]
        self._pending = [data[end + 1 :]] if end + 1 < len(data) else []
        out = []
        for line in complete.split(b"\n")[:-1]:
            if line.endswith(b"\r"):
                out.append(self._mailbox.list_line(line[:-1]) + CRLF)
            else:
                out.append(self._mailbox.list_line(line) + b"\n")
        return b"".join(out)

    def end(self) -> bytes:
        super().end()
        rest, self._pending = b"".join(self._pending), []
        return rest


class Metered(Answer):
    """RETR or TOP relayed as it streams, measured for the session hooks (size, SHA-256, headers)."""

    def __init__(self, command: str, number: int, report: Report, wanted_headers: frozenset[str],
                 mailbox: MailboxView | None) -> None:
        super().__init__()
        self.number = number
        self._command = command
        self._report = report
        self._mailbox = mailbox
        self._meter = DeliveryMeter(wanted_headers)
        note = mailbox.not_scanned_note(number) if mailbox is not None else None
        self._notes = [note] if note else []

    def body(self, data: bytes) -> bytes:
        self._meter.feed_wire(data)
        return data

    def end(self) -> bytes:
        super().end()
        if self.succeeded:
            self._meter.finish_wire()
        self._report(delivery(self._command, self.number or 0, self._mailbox, self._meter if self.succeeded else None,
                              scanned=False, outcome="delivered" if self.succeeded else "error", notes=self._notes))
        return b""


class Hooked(Answer):
    """RETR n, or TOP n k fetched as ``TOP n <whole>``, of a message that message hooks see.

    The body is un-stuffed as it arrives and collected (at most twice the listed size plus 1 KiB, as
    some servers list sizes before their LF-to-CRLF conversion; an upstream that sends more is
    refused, not buffered), then offered to the hooks (``wants_hooks``); ``finish`` turns their
    result into the client's answer, padded to the size LIST announced.
    """

    def __init__(self, command: str, number: int, top_lines: int | None, mailbox: MailboxView,
                 report: Report | None, wanted_headers: frozenset[str], spool: Spool | None = None) -> None:
        """``spool``: where the message is collected (in memory up to its threshold, then in a file);
        by default all in memory."""
        super().__init__()
        self.number = number
        self.command = command
        self.top_lines = top_lines
        self._mailbox = mailbox
        self._report = report
        self._wanted = wanted_headers
        self._unstuffer = StreamingUnstuffer()
        self._collected = spool if spool is not None else Spool(threshold=1 << 62)
        self._limit = 2 * mailbox.sizes[number] + 1024
        self.overflow = False
        self._message: bytes | Spool | None = None

    def status(self, line: bytes, has_body: bool) -> bytes:
        super().status(line, has_body)
        return b"" if has_body else line

    def body(self, data: bytes) -> bytes:
        if not self.overflow:
            self._collected.write(self._unstuffer.feed(data))
            if self._collected.size > self._limit:
                self.overflow = True
                self._collected.close()
        return b""

    def end(self) -> bytes:
        super().end()
        if not self.succeeded:
            if self._report is not None:
                self._report(delivery(self.command, self.number or 0, self._mailbox, None, scanned=False, outcome="error"))
            return b""
        if not self.overflow:
            self._collected.write(self._unstuffer.finish())
            if self._collected.spooled:
                self._message = self._collected  # stays in its file
            else:
                self._message = self._collected.read()
                self._collected.close()
        return b""

    @property
    def wants_hooks(self) -> bytes | Spool | None:
        return self._message

    def refuse(self, notes: list[str], verdicts: tuple[Verdict, ...] = ()) -> bytes:
        """The answer when the message cannot be delivered: the client keeps it on the server.
        ``verdicts`` are the hooks' so far (a virus that made one refuse it), for the session hooks."""
        assert self.number is not None
        self.succeeded = False
        self._message = None
        self._collected.close()
        self._mailbox.refused.add(self.number)
        if self._report is not None:
            self._report(delivery(self.command, self.number, self._mailbox, None, scanned=True, outcome="refused",
                                  verdicts=verdicts, notes=notes))
        return REFUSED

    def finish(self, message: bytes | Spool | None, verdicts: tuple[Verdict, ...],
               notes: list[str]) -> bytes | Generator[bytes, None, None]:
        """The client's answer for what the hooks made of the message (None: a hook refused it): bytes,
        or, for a message still in its spool file, the answer's pieces to write as the client takes
        them."""
        assert self.number is not None
        self._message = None
        if message is None:
            return self.refuse(notes, verdicts)
        if isinstance(message, Spool):
            return self._from_spool(message, verdicts, notes)
        self._collected.close()
        if self._mailbox.extra(self.number) and len(message) != self._mailbox.reported_size(self.number):
            try:
                message = pad_to(message, self._mailbox.reported_size(self.number))
            except HookFailure as error:
                return self.refuse([*notes, f"size: {error}; refused"], verdicts)
        if self.top_lines is not None:
            self._mailbox.remember(self.number, message)
        return processed_answer(self.command, self.number, message, self.top_lines, self._mailbox, self._report,
                                self._wanted, verdicts=verdicts, notes=notes)


    def _from_spool(self, spool: Spool, verdicts: tuple[Verdict, ...],
                    notes: list[str]) -> bytes | Generator[bytes, None, None]:
        assert self.number is not None
        prefix = b""
        if self._mailbox.extra(self.number):
            missing = self._mailbox.reported_size(self.number) - spool.size
            if missing < FILLER_MIN:
                return self.refuse([*notes, f"size: message is {spool.size} octets, more than fit; refused"],
                                   verdicts)
            prefix = filler(missing)
        return self._streamed(spool, prefix, verdicts, notes)

    def _streamed(self, spool: Spool, prefix: bytes, verdicts: tuple[Verdict, ...],
                  notes: list[str]) -> Generator[bytes, None, None]:
        """The answer, a chunk at a time from the spool file: the status line, the message
        dot-stuffed as it is read (the filler header in front where sizes were reserved), the
        terminator; then the delivery is reported, measured as it went out."""
        assert self.number is not None
        try:
            meter = DeliveryMeter(self._wanted) if self._report is not None else None
            chunks: Iterator[bytes] = itertools.chain([prefix] if prefix else [], spool.chunks())
            if self.top_lines is None:
                yield ok(f"{spool.size + len(prefix)} octets")
            else:
                yield ok()
                chunks = top_chunks(chunks, self.top_lines)
            stuffer = StreamingStuffer()
            for chunk in chunks:
                if meter is not None:
                    meter.feed_message(chunk)
                yield stuffer.feed(chunk)
            yield stuffer.finish()
            if self._report is not None:
                self._report(delivery(self.command, self.number, self._mailbox, meter, scanned=True,
                                      outcome="delivered", verdicts=verdicts, notes=notes))
        finally:
            spool.close()


def processed_answer(command: str, number: int, message: bytes, top_lines: int | None, mailbox: MailboxView,
                     report: Report | None, wanted_headers: frozenset[str], *, verdicts: tuple[Verdict, ...] = (),
                     notes: list[str] | None = None) -> bytes:
    """The answer to RETR n or TOP n k for an already processed ``message`` (and its report)."""
    if top_lines is None:
        delivered = message
        answer = ok(f"{len(message)} octets") + stuff_body(message)
    else:
        delivered = top_of(message, top_lines)
        answer = ok() + stuff_body(delivered)
    if report is not None:
        meter = DeliveryMeter(wanted_headers)
        meter.feed_message(delivered)
        report(delivery(command, number, mailbox, meter, scanned=True, outcome="delivered", verdicts=verdicts,
                        notes=notes or []))
    return answer


def delivery(command: str, number: int, mailbox: MailboxView | None, meter: DeliveryMeter | None, *, scanned: bool,
             outcome: str, verdicts: tuple[Verdict, ...] = (), notes: list[str] | None = None) -> Delivery:
    return Delivery(
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
