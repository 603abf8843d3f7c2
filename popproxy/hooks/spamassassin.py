"""The ``spamassassin`` hook: asks spamd for a verdict over SPAMC/1.5 and writes the X-Spam headers itself.

Settings (besides the common ``timeout``, ``on_error``, ``max_size``)::

    [[hook]]
    use = "spamassassin"
    address = "127.0.0.1:783"     # spamd's TCP address: "host", "host:port" or "[IPv6]:port" (default)
    # socket = "/run/spamd.sock"  # or its Unix socket (not both)
    # user = "{user}"             # User header for spamd's per-user settings: {user}, {local}, {domain}
    headers = true                # false: record the verdict only, leave the message as it is
    header_prefix = "X-Spam-"     # the added fields are <prefix>Flag, Level, Status, Report
    report = false                # also write X-Spam-Report (asks spamd for REPORT instead of SYMBOLS)
    # subject_tag = "[SPAM]"      # put in front of the Subject of spam (a Subject is added if none)
    max_added = 1024              # octets the headers may add at most (default 1024, 4096 with report)

Why not ``PROCESS``: spamd rewrites the message with its site's settings, and with ``report_safe 1``
(SpamAssassin's default) it wraps spam in a new MIME message, which would change everything a POP3
client sees. popproxy asks ``SYMBOLS`` (the verdict and the names of the tests that hit) or, with
``report = true``, ``REPORT`` (the verdict and the report, whose table of tests is read for the
names, scores and descriptions), and writes the headers itself, within ``max_added`` octets (see
``spamheaders``). If the site's report template has no table of tests, a second ``SYMBOLS``
request gets the names, and the report's own lines go into ``X-Spam-Report``.

Each message is one connection (spamd answers one request per connection). A connection that
cannot be made, an answer that is not ``SPAMD/1.x 0 EX_OK`` with a ``Spam:`` header, one cut short,
or one over 1 MiB raise :class:`SpamdError`; the hook's ``on_error`` policy applies. Cancelling the
Deferred that :meth:`SpamAssassinHook.process` returns (popproxy does when ``timeout`` expires)
aborts the connection.

The verdict: ``Verdict(hook=name, spam=..., score=..., threshold=..., details={"tests": [...]})``,
with ``"scores"`` (test name → points, the largest first) too when the report was asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import HookConfig
from ..quiet import connect_quietly
from .interfaces import HookNotStarted, IHookFactory, IMessageHook, IStartable, MessageContext, Verdict
from .spamheaders import (
    ReportEntry,
    ServerAddress,
    SpamMarkup,
    SpamSummary,
    format_template,
    read_markup,
    read_server,
    read_template,
    small,
    sorted_tests,
)

__all__ = [
    "SpamAssassinFactory",
    "SpamAssassinHook",
    "SpamcProtocol",
    "SpamdAnswer",
    "SpamdError",
    "factory",
    "parse_answer",
    "parse_report",
    "parse_symbols",
]

DEFAULT_PORT: Final = 783
DEFAULT_MAX_ADDED: Final = 1024
DEFAULT_MAX_ADDED_REPORT: Final = 4096
#: The most octets of answer read from spamd; a REPORT is a few KiB.
MAX_ANSWER: Final = 1024 * 1024
#: The most test names recorded in a verdict.
MAX_VERDICT_TESTS: Final = 200

_STATUS = re.compile(rb"SPAMD/(\d+)\.(\d+) +(\d+)(?: +(.*))?")
_SPAM = re.compile(rb"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)")
# SpamAssassin rule names: letters, digits and "_" (plugins add "." or ":" at times).
_TEST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}")
# A row of the report's table: the score ("%4.1f", or "%4.0f" from 10 up), the name, the description.
_ROW = re.compile(r" {0,3}(-?\d+(?:\.\d+)?) +([A-Za-z0-9_][A-Za-z0-9_.:+-]*)(?: +(.*))?")
_TABLE_RULE = re.compile(r"-{3,}(?: +-{3,})+")


class SpamdError(Exception):
    """spamd could not be asked, refused, or gave an answer that is not SPAMD/1.x."""


@dataclass(frozen=True, slots=True)
class SpamdAnswer:
    """A successful answer: spamd's ``Spam: True ; 7.2 / 5.0`` header and the body after the headers."""

    spam: bool
    score: float
    threshold: float
    body: bytes


def parse_answer(data: bytes, where: str, *, complete: bool) -> SpamdAnswer | None:
    """spamd's answer in ``data``, or None while it is incomplete and more may come.

    ``complete`` says the connection has closed, so nothing more will come.

    :raises SpamdError: for an error answer (a non-zero ``EX_`` code), garbage, or, when
        ``complete``, an answer cut short.
    """
    line_end = data.find(b"\r\n")
    if line_end < 0:
        if len(data) > 512 or (data and not b"SPAMD/".startswith(data[:6])):
            raise SpamdError(f"spamd at {where} answered garbage: {_shown(data)}")
        if complete:
            what = "closed the connection without an answer" if not data else f"cut its answer short: {_shown(data)}"
            raise SpamdError(f"spamd at {where} {what}")
        return None
    status = _STATUS.fullmatch(data[:line_end])
    if status is None:
        raise SpamdError(f"spamd at {where} answered garbage: {_shown(data[:line_end])}")
    code = int(status.group(3))
    if code != 0:  # spamd sends the status line alone, then closes
        text = (status.group(4) or b"").decode("ascii", "replace")
        raise SpamdError(f"spamd at {where} refused the request: {code} {text}".rstrip())
    header_end = data.find(b"\r\n\r\n", line_end)
    if header_end < 0:
        if complete:
            raise SpamdError(f"spamd at {where} cut its answer short in the headers: {_shown(data)}")
        return None
    headers: dict[bytes, bytes] = {}
    for line in data[line_end + 2 : header_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise SpamdError(f"spamd at {where} sent a header line that is not 'Name: value': {_shown(line)}")
        headers[name.strip().lower()] = value.strip()
    spam = _SPAM.fullmatch(headers.get(b"spam", b""))
    if spam is None:
        raise SpamdError(f"spamd at {where} sent no usable Spam header: {_shown(data[:header_end])}")
    body = data[header_end + 4 :]
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise SpamdError(f"spamd at {where} sent a bad Content-length: {_shown(length)}")
        expected = int(length)
        if len(body) > expected:
            raise SpamdError(f"spamd at {where} sent {len(body)} octets after a Content-length of {expected}")
        if len(body) < expected:
            if complete:
                raise SpamdError(f"spamd at {where} cut its answer short: {len(body)} of {expected} octets")
            return None
    elif not complete:
        return None  # no length: the answer ends when spamd closes the connection
    score, threshold = float(spam.group(2)), float(spam.group(3))
    if not (math.isfinite(score) and math.isfinite(threshold)):
        raise SpamdError(f"spamd at {where} sent a score that is not a number: {_shown(spam.group(0))}")
    return SpamdAnswer(spam.group(1) in (b"True", b"Yes"), score, threshold, body)


def _shown(data: bytes, limit: int = 80) -> str:
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


def parse_symbols(body: bytes, where: str) -> tuple[str, ...]:
    """The test names of a ``SYMBOLS`` answer (``GTUBE,MISSING_DATE``), sorted."""
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SpamdError(f"spamd at {where} sent test names that are not ASCII: {_shown(body)}") from None
    if not text:
        return ()
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if not _TEST.fullmatch(name):
            raise SpamdError(f"spamd at {where} sent a test name that is none: {name[:80]!r}")
    return sorted_tests(names)


def parse_report(body: bytes) -> tuple[ReportEntry, ...] | None:
    """The rows of the table in a ``REPORT`` answer (SpamAssassin's ``_SUMMARY_``), or None if the
    report has no such table (a site's own report template).

    A row is ``" pts rule name  description"``; a description too long for its row goes on in lines
    indented by 28 spaces, and facts a rule logged (SpamAssassin's ``[...]``) in lines of their own.
    """
    lines = body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
    start = next((index for index, line in enumerate(lines) if _TABLE_RULE.fullmatch(line.strip())), None)
    if start is None:
        return None
    rows: list[tuple[float, str, list[str], list[str]]] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        row = _ROW.fullmatch(line.rstrip())
        if row is not None:
            rows.append((float(row.group(1)), row.group(2), [row.group(3) or ""], []))
        elif rows and line[:1].isspace():
            text = line.strip()
            (rows[-1][3] if text.startswith("[") else rows[-1][2]).append(text)
    return tuple(
        ReportEntry(score, name, " ".join(part for part in description if part), tuple(details))
        for score, name, description, details in rows
    )


class SpamcProtocol(Protocol):
    """One SPAMC/1.5 request on one connection: sends it, reads spamd's answer, fires ``answer``.

    ``answer`` fires with a :class:`SpamdAnswer` or fails with :class:`SpamdError`; cancelling it
    aborts the connection.
    """

    # A TCP or UNIX connection: both provide ITCPTransport (abortConnection), not just ITransport.
    transport: ITCPTransport | None

    def __init__(self, request: bytes, where: str) -> None:
        self._request = request
        self._where = where
        self._buffer = bytearray()
        self.answer: Deferred[SpamdAnswer] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.answer.called:
            return
        self._buffer += data
        try:
            if len(self._buffer) > MAX_ANSWER:
                raise SpamdError(f"spamd at {self._where} sent more than {MAX_ANSWER} octets")
            result = parse_answer(bytes(self._buffer), self._where, complete=False)
        except SpamdError as error:
            self.answer.errback(error)
            self._abort()
            return
        if result is not None:
            self.answer.callback(result)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.answer.called:
            return
        try:
            result = parse_answer(bytes(self._buffer), self._where, complete=True)
        except SpamdError as error:
            self.answer.errback(error)
        else:
            assert result is not None  # complete=True: an answer, or an error
            self.answer.callback(result)

    def _cancel(self, _: Deferred[SpamdAnswer]) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


@implementer(IMessageHook, IStartable)
class SpamAssassinHook:
    """Asks spamd about each message; records its verdict and, unless ``markup`` is None, writes
    the headers. ``reservation`` is ``markup.max_added`` (0 without markup)."""

    def __init__(
        self,
        name: str,
        server: ServerAddress,
        markup: SpamMarkup | None,
        *,
        user: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.server = server
        self.markup = markup
        self.reservation = markup.max_added if markup is not None else 0
        self._reactor: Any = None  # given by ``start``
        self._user = user
        self._connect_timeout = connect_timeout

    def start(self, reactor: Any) -> None:
        """``IStartable``: the reactor spamd is reached with."""
        self._reactor = reactor

    def process(self, message: bytes, context: MessageContext) -> Deferred[bytes]:
        """A Deferred firing with the message, marked up; cancelling it aborts the connection."""
        return Deferred.fromCoroutine(self._process(message, context))

    async def _process(self, message: bytes, context: MessageContext) -> bytes:
        if self._reactor is None:
            raise HookNotStarted(f"hook {self.name} was not started")
        user = format_template(self._user, context.facts.session.user)
        where = str(self.server)
        table: tuple[ReportEntry, ...] | None = None
        report: tuple[ReportEntry | str, ...] = ()
        if self.markup is not None and self.markup.report:
            answer = await self.ask(b"REPORT", message, user)
            table = parse_report(answer.body)
            if table is not None:
                tests = sorted_tests(row.name for row in table)
                # spamd lists rules of equal score in no stable order: sort, so that the same
                # message always gets the same bytes (and a fetcher that compares sees no change).
                ranked = sorted(table, key=lambda row: (-row.score, row.name))
                report = tuple(ranked)
            else:  # a site's own report template: its text goes in as it is, the names come apart
                text = answer.body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
                report = tuple(line for line in text if line.strip())
                tests = parse_symbols((await self.ask(b"SYMBOLS", message, user)).body, where)
        else:
            answer = await self.ask(b"SYMBOLS", message, user)
            tests = parse_symbols(answer.body, where)
        details: dict[str, Any] = {"tests": list(tests[:MAX_VERDICT_TESTS])}
        if table:
            details["scores"] = small({row.name: row.score for row in table})
        context.add_verdict(
            Verdict(hook=self.name, spam=answer.spam, score=answer.score, threshold=answer.threshold, details=details)
        )
        if self.markup is None:
            return message
        return self.markup.apply(message, SpamSummary(answer.spam, answer.score, answer.threshold, tests, (), report))

    async def ask(self, command: bytes, message: bytes, user: str | None = None) -> SpamdAnswer:
        """Send ``command`` (``SYMBOLS``, ``REPORT``, ``CHECK``) about ``message`` to spamd, on a
        connection of its own, and return the answer."""
        head = [command + b" SPAMC/1.5", b"Content-length: %d" % len(message)]  # spamd wants this spelling
        if user is not None:
            head.append(b"User: " + user.encode("ascii"))
        protocol = SpamcProtocol(b"\r\n".join(head) + b"\r\n\r\n" + message, str(self.server))
        endpoint = self.server.endpoint(self._reactor, self._connect_timeout)
        try:
            await connect_quietly(endpoint, protocol)
        except (CancelledError, ConnectingCancelledError) as error:
            raise CancelledError(f"connecting to spamd at {self.server} was cancelled") from error
        except Exception as error:
            raise SpamdError(f"cannot connect to spamd at {self.server}: {error}") from error
        return await protocol.answer


@implementer(IHookFactory)
class SpamAssassinFactory:
    """Builds :class:`SpamAssassinHook` from a ``[[hook]]`` table with ``use = "spamassassin"``."""

    def build(self, config: HookConfig) -> SpamAssassinHook:
        options = config.options
        server = read_server(options, DEFAULT_PORT)
        user = read_template(options, "user")
        markup = read_markup(
            options, default_max_added=DEFAULT_MAX_ADDED, default_max_added_report=DEFAULT_MAX_ADDED_REPORT
        )
        options.finish()
        return SpamAssassinHook(config.name, server, markup, user=user, connect_timeout=config.timeout)


factory = SpamAssassinFactory()
