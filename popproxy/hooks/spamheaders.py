"""How spam verdicts become header lines, shared by the ``spamassassin`` and ``rspamd`` hooks.

popproxy writes the headers itself, the way SpamAssassin's ``report_safe 0`` does (its
``10_default_prefs.cf`` and ``PerMsgStatus.pm`` are the model), rather than letting a scanner
rewrite the message:

- ``X-Spam-Flag: YES`` for spam only;
- ``X-Spam-Level: ****``, one ``*`` per whole point of score, at most 50 (SpamAssassin's ``_STARS_``);
  present with an empty value below one point, as SpamAssassin writes it;
- ``X-Spam-Status: Yes, score=7.2 required=5.0 tests=GTUBE,MISSING_DATE`` with the tests sorted by
  name, or ``tests=none``; a hook may append ``key=value`` items (rspamd: ``action=add_header``).
  SpamAssassin's own ``autolearn=`` and ``version=`` items are not written: spamd's answer does
  not carry them;
- ``X-Spam-Report:`` (optional) with SpamAssassin's terse ``_REPORT_`` layout, one
  ``* score NAME description`` entry per line;
- and an optional subject tag for spam: ``Subject: [SPAM] original subject``.

**Where.** The new lines go at the top of the header block, after a leading ``Return-Path`` field
(with its continuation lines), which is where SpamAssassin puts them (its bug 3409). A message that
starts with an mbox ``From `` line keeps it first. Every other octet of the message stays as it
was, except the first line of the first ``Subject`` field when a tag is added. A message with no
header block at all (its first line is not a header field) gets an empty line after the new
header lines, so that its text becomes the body rather than a broken header.

**Folding.** Lines are folded at 78 columns (RFC 5322 §2.1.1) with CRLF and a tab, after a comma or
in place of a space, as SpamAssassin folds them. A single word longer than a line is never split;
names are cut to 64 characters and report entries to 200, so no line comes near RFC 5322's 998.

**Budget.** A hook must say in advance how many octets it may add (its reservation,
``IMessageHook.reservation``), so :class:`SpamMarkup` writes within ``max_added`` octets: the flag,
level and status lines and the subject tag always fit (``max_added`` is refused below
:meth:`SpamMarkup.minimum`); the test list is cut, ending in ``,...``, where the whole list would
not fit, and the report keeps as many entries as fit and says how many it left out (``* ... 3
more``) or is left out. So for any answer a scanner gives, the message grows by ``max_added``
octets at most, and the reservation is ``max_added``.

**Fields that came with the message** (an ``X-Spam-Status: No`` a spammer wrote, or the headers of
a SpamAssassin run at delivery) are left as they are, below ours: popproxy changes no octet it
did not add. Where forged fields matter, a ``rewrite`` hook with ``remove_header_matching =
["^X-Spam-"]`` placed before the spam hook takes them out (and has its own reservation).

The values come from a scanner: anything in them that is not printable ASCII (a CR or LF above all,
which would let a scanner or a rule description inject header lines) is replaced, and the scores
must be finite and below a million in size, or :class:`SpamMarkupError` is raised (a hook error).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ..config import HookOptions
from .mimesplice import fold_field

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = [
    "DEFAULT_PREFIX",
    "FOLD_AT",
    "MAX_STARS",
    "ReportEntry",
    "ServerAddress",
    "SpamMarkup",
    "SpamMarkupError",
    "SpamSummary",
    "clean",
    "fold",
    "format_template",
    "read_markup",
    "read_server",
    "read_template",
    "small",
    "sorted_tests",
]

DEFAULT_PREFIX: Final = "X-Spam-"
#: RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters, excluding the CRLF.
FOLD_AT: Final = 78
#: SpamAssassin's ``_STARS_`` stops at 50.
MAX_STARS: Final = 50
#: Longest test or symbol name written; a longer one is cut and ends in "...".
MAX_NAME: Final = 64
#: Longest report entry written (its score, name, description and details together).
MAX_ENTRY: Final = 200
#: Longest value of an extra status item (``action=...``).
MAX_EXTRA: Final = 32
#: Longest subject tag accepted.
MAX_TAG: Final = 64
#: Scores at or beyond this size are refused as garbage; it bounds the width of a written score.
SCORE_LIMIT: Final = 1e6

# At most 20 characters: "<prefix>Level: " and 50 stars must fit in 78 columns.
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,19}")
# A header field's first line: RFC 5322 §3.6.8 field name, optional obsolete WSP, colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_UNSAFE_NAME = re.compile(r"[^\x21-\x2b\x2d-\x7e]")  # printable, no space, no comma
_TEMPLATE_FIELDS: Final = ("user", "local", "domain")


class SpamMarkupError(ValueError):
    """The headers cannot be written: the scanner's numbers are unusable, or the budget is too small."""


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """One line of a report: a test (rule, symbol) that hit, with its score and description.

    ``details`` are the extra facts a test logged (SpamAssassin's ``[...]`` lines, rspamd's symbol
    options), each written on its own continuation line.
    """

    score: float
    name: str
    description: str = ""
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SpamSummary:
    """What a scanner said about a message, in the form the headers need.

    ``report`` holds :class:`ReportEntry` items, or plain text lines when the scanner's report has
    no table to read entries from (a customised SpamAssassin report template).
    """

    spam: bool
    score: float
    threshold: float
    tests: tuple[str, ...] = ()
    extras: tuple[tuple[str, str], ...] = ()
    report: tuple[ReportEntry | str, ...] = ()


# --- the header writer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpamMarkup:
    """How a hook marks messages up, and the most octets it may add (``max_added``).

    :ivar extras: the names of the ``key=value`` items the hook appends to the status line; each
        value is cut to ``MAX_EXTRA`` characters. Needed in advance to compute :meth:`minimum`.
    """

    prefix: str = DEFAULT_PREFIX
    report: bool = False
    subject_tag: str | None = None
    max_added: int = 1024
    extras: tuple[str, ...] = ()

    def minimum(self) -> int:
        """The fewest octets ``max_added`` may be: what the flag, level and status lines (with
        no test names, and the widest scores and extras), a created ``Subject`` field with the tag,
        and the empty line after a message with no header block can take together."""
        widest = -(SCORE_LIMIT - 0.1)  # "-999999.9"
        extras = tuple((name, "x" * MAX_EXTRA) for name in self.extras)
        fixed = sum(len(line) for line in self._fixed_lines(SpamSummary(True, SCORE_LIMIT - 0.1, 0.0)))
        status = max(
            len(self._status_line(SpamSummary(True, widest, widest, tests, extras), 0))
            for tests in ((), ("X",))  # "tests=none" or "tests=..."
        )
        subject = len(b"Subject: \r\n") + len(self._tag())
        # Folding replaces a space by CRLF TAB (+2) or adds CRLF TAB after a comma (+3); a few
        # octets of slack cover a fold that shorter values would place differently.
        return fixed + status + subject + len(b"\r\n") + 8

    def _tag(self) -> bytes:
        return self.subject_tag.encode("ascii") if self.subject_tag else b""

    def apply(self, message: bytes, summary: SpamSummary) -> bytes:
        """``message`` with the header lines for ``summary`` added (and its subject tagged).

        :raises SpamMarkupError: for scores that are not finite or too large to be real, or when
            even the shortest markup would exceed ``max_added`` (only possible for a ``SpamMarkup``
            built in code with a ``max_added`` below :meth:`minimum`).
        """
        for what, value in (("score", summary.score), ("threshold", summary.threshold)):
            if not (abs(round(value, 1)) < SCORE_LIMIT):  # as written; also refuses NaN
                raise SpamMarkupError(f"implausible {what} {value!r}")
        layout = _Layout.of(message)
        edited, subject_growth, subject_line = message, 0, b""
        tag = self._tag()
        if summary.spam and tag:
            if layout.subject is None:
                subject_line = b"Subject: " + tag + b"\r\n"
                subject_growth = len(subject_line)
            else:
                edited, subject_growth = _tag_subject(message, layout.subject, tag)
        separator = b"" if layout.has_separator_or_fields else b"\r\n"
        budget = self.max_added - subject_growth - len(separator)
        lines = self._lines_within(summary, budget)
        block = b"".join(lines) + subject_line + separator
        at = layout.insert_at
        result = edited[:at] + block + edited[at:]
        assert len(result) - len(message) <= self.max_added, "the budget arithmetic is wrong"
        return result

    # -- the lines ------------------------------------------------------------------------------

    def _fixed_lines(self, summary: SpamSummary) -> list[bytes]:
        lines = []
        if summary.spam:
            lines.append(f"{self.prefix}Flag: YES\r\n".encode("ascii"))
        stars = "*" * max(0, min(MAX_STARS, int(summary.score)))
        lines.append(f"{self.prefix}Level: {stars}\r\n".encode("ascii"))
        return lines

    def _status_line(self, summary: SpamSummary, keep: int) -> bytes:
        """The status field with the first ``keep`` test names (all of them: ``keep`` = their count)."""
        names = [_name(test) for test in summary.tests]
        if not names:
            tests = "none"
        elif keep >= len(names):
            tests = ",".join(names)
        else:
            tests = ",".join([*names[:keep], "..."])
        value = (
            f"{'Yes' if summary.spam else 'No'}, score={_score(summary.score)} "
            f"required={_score(summary.threshold)} tests={tests}"
        )
        for key, extra in summary.extras:
            value += f" {_name(key)}={_name(extra, MAX_EXTRA)}"
        return fold(f"{self.prefix}Status", value)

    def _report_line(self, entries: Sequence[ReportEntry | str], keep: int) -> bytes:
        """The report field with the first ``keep`` entries, and a note of how many were left out."""
        lines: list[str] = []
        for entry in entries[:keep]:
            lines.extend(_report_entry(entry))
        if keep < len(entries):
            lines.append(f"* ... {len(entries) - keep} more")
        # SpamAssassin's _REPORT_ starts with a newline: "X-Spam-Report: " CRLF TAB "* ..." CRLF ...
        text = f"{self.prefix}Report: " + "".join(f"\r\n\t{line}" for line in lines) + "\r\n"
        return text.encode("ascii")

    def _lines_within(self, summary: SpamSummary, budget: int) -> list[bytes]:
        """The header lines for ``summary``, cut to ``budget`` octets: tests first, then report."""
        lines = self._fixed_lines(summary)
        budget -= sum(len(line) for line in lines)
        count = len(summary.tests)
        reporting = self.report and bool(summary.report)
        # With a report to write as well, the test list may take half of what is left.
        share = max(budget // 2, len(self._status_line(summary, 0))) if reporting else budget
        status = self._status_line(summary, count)
        if len(status) > share:
            keep = _most(lambda k: len(self._status_line(summary, k)) <= share, count - 1)
            if keep < 0:
                raise SpamMarkupError(f"max_added = {self.max_added} leaves no room for the status line")
            status = self._status_line(summary, keep)
        lines.append(status)
        budget -= len(status)
        if reporting:
            entries = summary.report
            keep = _most(lambda k: len(self._report_line(entries, k)) <= budget, len(entries))
            if keep >= 0:
                lines.append(self._report_line(entries, keep))
        return lines


def _most(fits: Callable[[int], bool], upper: int) -> int:
    """The largest ``k`` in ``0..upper`` for which ``fits(k)``, given that it holds for a prefix of
    that range (longer lists never take fewer octets); -1 if it holds for none. Only a ``k`` that
    was seen to fit is ever returned."""
    low, high = 0, upper
    if upper < 0 or not fits(0):
        return -1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _score(value: float) -> str:
    """SpamAssassin's ``%2.1f``."""
    return f"{value:.1f}"


def _report_score(value: float) -> str:
    """SpamAssassin's report column: ``%4.0f`` from 10 points up (either sign), else ``%4.1f``."""
    return f"{value:4.0f}" if abs(value) >= 10 else f"{value:4.1f}"


def clean(text: str, limit: int = MAX_ENTRY) -> str:
    """``text`` made safe for a header: printable ASCII only (anything else becomes ``?``,
    line breaks and tabs a space), runs of spaces squeezed, cut to ``limit`` with ``...``."""
    text = re.sub(r"[\t\r\n]+", " ", text)
    text = _UNSAFE.sub("?", text)
    text = re.sub(r" {2,}", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name(text: str, limit: int = MAX_NAME) -> str:
    """A test name or status value: no spaces or commas (they separate), cut to ``limit``."""
    text = _UNSAFE_NAME.sub("_", text) or "_"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _report_entry(entry: ReportEntry | str) -> list[str]:
    """One report entry as physical lines (without the leading TAB), SpamAssassin's terse layout:
    ``* score NAME description``, wrapped with ``*      `` continuations."""
    if isinstance(entry, str):
        return _wrap(clean(entry), "", "  ")
    head = f"* {_report_score(entry.score)} {_name(entry.name)}"  # "*  2.5 NAME": the score is 4 wide
    description = clean(entry.description, max(MAX_ENTRY - len(head) - 1, 8))
    text = f"{head} {description}" if description else head
    lines = _wrap(text, "", "*      ")
    budget = MAX_ENTRY - len(text)
    for detail in entry.details:
        detail = clean(detail, max(budget, 8))
        budget -= len(detail)
        lines.extend(_wrap(detail, "*      ", "*      "))
        if budget <= 0:
            break
    return lines


def _wrap(text: str, first: str, rest: str, width: int = FOLD_AT - 1) -> list[str]:
    """Greedy word wrap of ``text`` (words are never split); ``width`` excludes the leading TAB."""
    lines: list[str] = []
    line, empty = first, True
    for word in text.split(" "):
        if empty:
            line, empty = line + word, False
        elif len(line) + 1 + len(word) > width:
            lines.append(line)
            line = rest + word
        else:
            line = f"{line} {word}"
    lines.append(line)
    return lines


def fold(name: str, value: str, width: int = FOLD_AT) -> bytes:
    """The field ``name: value`` CRLF as SpamAssassin lays it out: folded at ``width`` columns
    after commas or at spaces, continuation lines starting with a TAB (``mimesplice.fold_field``,
    the one folder of every hook)."""
    return fold_field(name, value, width=width, after_commas=True)


# --- where the lines go -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: bytes  # lower case
    start: int  # offset of the field's first line
    end: int  # offset after its first line's line ending


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a message's header block is, found without parsing more than its header lines."""

    insert_at: int
    subject: _Field | None
    has_separator_or_fields: bool

    @classmethod
    def of(cls, message: bytes) -> _Layout:
        pos = 0
        if message.startswith(b"From "):  # an mbox From_ line stays first
            pos = _line_end(message, 0)
        start = pos
        fields: list[_Field] = []
        blank = False
        while pos < len(message):
            end = _line_end(message, pos)
            content = message[pos:end].rstrip(b"\r\n")
            if not content:
                blank = True
                break
            if content[:1] in (b" ", b"\t") and fields:
                pos = end
                continue
            match = _FIELD.match(content)
            if match is None:
                break  # text without a separating empty line: the header block ended
            fields.append(_Field(match.group(1).lower(), pos, end))
            pos = end
        insert_at = start
        if fields and fields[0].name == b"return-path":
            insert_at = fields[1].start if len(fields) > 1 else pos
        subject = next((field for field in fields if field.name == b"subject"), None)
        return cls(insert_at, subject, bool(fields) or blank)


def _line_end(message: bytes, pos: int) -> int:
    """The offset after the line ending of the line at ``pos`` (the end of the message if none)."""
    newline = message.find(b"\n", pos)
    return len(message) if newline < 0 else newline + 1


def _tag_subject(message: bytes, subject: _Field, tag: bytes) -> tuple[bytes, int]:
    """``message`` with ``tag`` put in front of the subject's value on its first line, and the
    growth. A subject that starts with the tag already is left alone; continuation lines of a
    folded subject are never touched."""
    line = message[subject.start : subject.end]
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :]
    colon = body.index(b":") + 1
    value = body[colon:]
    rest = value.lstrip(b" \t")
    space = value[: len(value) - len(rest)] or b" "
    if rest == tag or rest.startswith(tag + b" "):
        return message, 0
    new_value = space + tag + (b" " + rest if rest else b"")
    new_line = body[:colon] + new_value + ending
    return message[: subject.start] + new_line + message[subject.end :], len(new_line) - len(line)


# --- settings shared by the spam hooks ---------------------------------------------------------------


def read_markup(
    options: HookOptions, *, default_max_added: int, default_max_added_report: int, extras: Sequence[str] = ()
) -> SpamMarkup | None:
    """Read ``headers``, ``header_prefix``, ``report``, ``subject_tag`` and ``max_added``.

    Returns None for ``headers = false`` (verdict only: the message is passed on unchanged, the
    reservation is 0); the other four keys are then refused, since they would do nothing.
    """
    headers = options.boolean("headers", True)
    if not headers:
        for name in ("header_prefix", "report", "subject_tag", "max_added"):
            if name in options:
                raise options.error(name, "has no effect with headers = false (verdict only)")
        return None
    prefix = options.string("header_prefix", DEFAULT_PREFIX)
    if not _PREFIX.fullmatch(prefix):
        raise options.error(
            "header_prefix",
            f"{prefix!r} must be 1 to 20 letters, digits and '-' that start a header field name, "
            'as in "X-Spam-"',
        )
    report = options.boolean("report", False)
    tag = options.string("subject_tag", None)
    if tag is not None and (not tag or len(tag) > MAX_TAG or _UNSAFE.search(tag) or tag != tag.strip()):
        raise options.error(
            "subject_tag",
            f"{tag!r} must be 1 to {MAX_TAG} printable ASCII characters, without spaces at either end",
        )
    default = default_max_added_report if report else default_max_added
    max_added = options.integer("max_added", default)
    markup = SpamMarkup(prefix, report, tag, max_added, tuple(extras))
    if max_added < markup.minimum():
        raise options.error(
            "max_added",
            f"must be at least {markup.minimum()} octets for these settings, not {max_added}",
        )
    return markup


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where a scanner listens: ``host`` and ``port``, or a Unix ``socket`` path."""

    host: str | None = None
    port: int | None = None
    socket: str | None = None

    def __str__(self) -> str:
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def endpoint(self, reactor: object, timeout: float) -> IStreamClientEndpoint:
        """A Twisted client endpoint for this address."""
        from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

        if self.socket is not None:
            return UNIXClientEndpoint(reactor, self.socket, timeout=timeout)
        assert self.host is not None and self.port is not None
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def read_server(options: HookOptions, default_port: int) -> ServerAddress:
    """Read ``address`` (``host``, ``host:port``, ``[IPv6]:port``) or ``socket`` (a path), not both.
    Without either, the scanner is at 127.0.0.1 on ``default_port``."""
    if "address" in options and "socket" in options:
        raise options.error("socket", "give address (TCP) or socket (Unix), not both")
    socket_path = options.path("socket", None)
    if socket_path is not None:
        return ServerAddress(socket=str(socket_path))
    text = options.string("address", f"127.0.0.1:{default_port}")
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise options.error("address", f'{text!r}: expected "[IPv6 address]:port"')
        port = tail[1:] if tail else str(default_port)
    elif text.count(":") > 1:
        raise options.error("address", f'{text!r}: put an IPv6 address in brackets, as in "[::1]:{default_port}"')
    else:
        host, colon, port = text.partition(":")
        port = port if colon else str(default_port)
    if not host or any(c.isspace() for c in host):
        raise options.error("address", f'{text!r}: expected "host:port"')
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise options.error("address", f"{text!r}: the port must be a number from 1 to 65535")
    return ServerAddress(host=host, port=int(port))


def read_template(options: HookOptions, name: str) -> str | None:
    """An optional template of the POP3 user name: ``{user}`` (as logged in), ``{local}`` and
    ``{domain}`` (its parts around the last ``@``), and literal text."""
    template = options.string(name, None)
    if template is None:
        return None
    allowed = ", ".join(f"{{{field}}}" for field in _TEMPLATE_FIELDS)
    if not template:
        raise options.error(name, f"must not be empty; leave it out, or use {allowed}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise options.error(name, f"{template!r} is not a valid template: {error}") from None
    for _, field, spec, conversion in parsed:
        if field is not None and (field not in _TEMPLATE_FIELDS or spec or conversion):
            raise options.error(name, f"{{{field}}} is not allowed: the only placeholders are {allowed}")
    if _UNSAFE.search(template) or " " in template:
        raise options.error(name, f"{template!r} must be printable ASCII without spaces")
    return template


def format_template(template: str | None, user: str | None) -> str | None:
    """``template`` filled in for ``user``; None when there is no template, no user, or the result
    would be empty or unsafe to send as a protocol header value."""
    if template is None or user is None:
        return None
    local, at, domain = user.rpartition("@")
    if not at:
        local, domain = user, ""
    value = template.format(user=user, local=local, domain=domain)
    if not value or re.search(r"[^\x21-\x7e]", value):
        return None
    return value


def sorted_tests(names: Iterable[str]) -> tuple[str, ...]:
    """Test names without duplicates, sorted as SpamAssassin's ``_TESTS_`` sorts them."""
    return tuple(sorted(set(names)))


def small(mapping: Mapping[str, float], limit: int = 100) -> dict[str, float]:
    """At most ``limit`` items of ``mapping`` (the largest scores first), for a verdict's details."""
    items = sorted(mapping.items(), key=lambda item: (-abs(item[1]), item[0]))[:limit]
    return dict(items)
