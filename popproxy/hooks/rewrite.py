# -*- test-case-name: tests.test_rewrite_hook -*-
r"""The ``rewrite`` message hook: edit headers, prefix the subject and replace text, rule by rule.

Everything the rules do not touch stays byte-for-byte as it was: header fields are inserted, replaced
and removed as whole lines (continuation lines included), and text is replaced inside the encoded
lines of the parts it targets; nothing is re-serialised (see ``mimesplice``).

Configuration::

    [[hook]]
    use = "rewrite"
    max_added = 512              # octets a rewrite may add to a message, at most (default 512)

    [[hook.rule]]                # rules run in order, each on the message as the ones before left it
    # Conditions (all optional; all given must hold):
    when_spam = true             # only if an earlier hook judged the message spam (false: only if none did)
    when_users = ["@example.org", "bob"]   # user names (normalised by [routing] user_case), or @domain
    when_header = [{ name = "From", matches = "(?i)@partner\\.example>?$" }]  # some From matches
    unless_header = [{ name = "X-Warning" }]    # no X-Warning field (with `matches`: none matches)
    when_verdict = [{ hook = "rspamd", spam = true, min_score = 8.0, action = ["reject", "add header"] }]
    # Actions (at least one), applied in this order:
    remove_header = ["X-Mailer"]             # a name or an array of names (case-insensitive)
    remove_header_matching = ["^X-Spam-"]    # regexes searched in field names, case-insensitively
    set_header = "X-Spam-Flag: YES"          # replaces the first such field in place and drops the
                                             # others, or adds it if there is none
    add_header = ["X-Warning: external sender"]   # "Name: value", a string or an array
    subject_prefix = "[EXTERNAL] "           # unless the subject starts with it already
    [[hook.rule.replace]]                    # or replace = [{ pattern = ..., with = ... }, ...]
    pattern = "(?i)\\bhttp://"                 # a Python regex, applied to each line of text
    with = "hxxp://"                         # a re.sub template: \\1, \\g<name> refer to groups
    in = ["text/plain", "text/html"]         # which parts (default both)
    attachments = false                      # also text parts that are (or are inside) attachments

The rules' semantics:

- ``when_header`` / ``unless_header``: ``matches`` is searched (``re.search``) in the field's value,
  unfolded and with RFC 2047 encoded-words decoded; without ``matches`` the field need only exist.
  Only the message's own header block is looked at, as it stands when the rule runs.
- ``when_verdict``: the named hook must have recorded a verdict; ``spam``, ``min_score`` (score at
  least) and ``action`` (one of) narrow it. ``when_spam`` asks all earlier hooks (``is_spam()``).
- New fields (``add_header``, and ``set_header`` when there is none) go to the top of the header
  block, in the order written, folded at 78 columns; non-ASCII values become RFC 2047 encoded-words
  in UTF-8 (refused in address fields such as From or To, whose display names would need encoding
  on their own). ``Content-Type``, ``Content-Transfer-Encoding`` and ``MIME-Version`` are never
  added, set or removed: changing them changes what the body means.
- ``subject_prefix`` is inserted before the first word of every Subject field (RFC 2047-encoded if
  not ASCII, and folded if the line would pass 78 columns); a message without a Subject gets one.
- ``replace`` applies to *inline* text/plain and text/html parts: a part with ``Content-Disposition:
  attachment``, or inside a message forwarded as an attachment, is an attachment and left alone
  unless ``attachments = true``. Text is decoded from its transfer encoding (7bit, 8bit, binary,
  quoted-printable, base64) and charset (us-ascii when none is given), each line is replaced on its
  own (``^`` and ``$`` are the line's ends; a match never spans lines), and only the lines that
  changed are encoded again, in the same encoding and charset. HTML is replaced in its source, tags
  included. A part that cannot take a replacement (it cannot be encoded in the part's charset,
  8-bit text in a 7bit part, an unknown charset or encoding, a line over 998 octets) is left as it
  was and named in the verdict's ``skipped`` list.
- A replacement never changes the MIME structure, whatever the text holds. A CR or LF already in
  the text (a bare CR, or ``=0D``/``=0A`` in quoted-printable) ends a line for the patterns and
  stays what it was, encoded where it was encoded; only line breaks a template writes are new
  lines. A line that, changed, would start with the delimiter of a multipart it is in, or that
  starts with one already, is left as it was (RFC 2046 §5.1.1), and so is the first line of a
  body after a header without an empty line if it would read as a header field; the verdict's
  ``skipped`` counts them. Multiparts nested more than 100 levels deep, or beyond 10000 parts in a
  message, are not looked into (named in ``skipped``); header edits apply to such messages as to
  any other.

A message that a rule changed gets a verdict ``Verdict(hook=name, details={"rules": [0, 2]})`` (the
indices of the rules that changed it; ``"skipped"`` lists the parts left alone). A rewrite that adds
more than ``max_added`` octets raises ``RewriteTooLarge``: the hook's ``on_error`` policy applies
(``max_added`` is also the hook's reservation, the room popproxy adds to the sizes it reports).

The hook does no I/O. Its work grows with the message (``max_size`` bounds it): messages of
``THREAD_AT`` (256 KiB) or more are rewritten in the thread pool of the reactor the service starts
the hook with (``twisted.internet.threads.deferToThreadPool``), smaller ones at once. Rules only read the context
there; the verdict is recorded back in the reactor thread. If the hook's ``timeout`` expires, the
pipeline goes on without the result, and the thread's work is discarded when it ends.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from ..config import ConfigError, HookConfig, HookOptions, user_listed
from .interfaces import HookNotStarted, IHookFactory, IMessageHook, IStartable, MessageContext, Verdict
from .mimesplice import (
    FOLD_AT,
    CannotEdit,
    Field,
    LineEdit,
    decoded_value,
    edit_text_body,
    encoded_word,
    fold_field,
    header_fields,
    parse,
    splice,
    walk_enclosed,
)

__all__ = ["DEFAULT_MAX_ADDED", "THREAD_AT", "RewriteHook", "RewriteTooLarge", "Rule", "factory"]

DEFAULT_MAX_ADDED = 512
TEXT_TYPES = ("text/plain", "text/html")
#: Fields whose values hold addresses: a non-ASCII value cannot simply become one encoded-word.
ADDRESS_FIELDS = frozenset(
    f"{resent}{name}" for resent in ("", "resent-") for name in ("from", "sender", "reply-to", "to", "cc", "bcc")
)
#: Fields that say what the body is: no rule adds, sets or removes them.
PROTECTED_FIELDS = frozenset(("content-type", "content-transfer-encoding", "mime-version"))

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


#: Messages this large or larger are rewritten in a thread: a few hundred milliseconds of regular
#: expressions over a multi-megabyte message must not stall every other session.
THREAD_AT = 256 * 1024


def _thread_runner(reactor: Any) -> Callable[..., Deferred[Any]]:
    """How a started hook runs a large rewrite: in the reactor's thread pool, or (a reactor with no
    threads, such as the in-memory ones of tests) in the calling thread."""
    if IReactorThreads.providedBy(reactor):
        return functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
    return functools.partial(maybeDeferred)


class RewriteTooLarge(Exception):
    """A rewrite grew the message by more than the hook's ``max_added``."""


# --- rules -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderTest:
    """A field called ``name`` exists (and, with a ``pattern``, its decoded value matches)."""

    name: str  # lower case
    pattern: re.Pattern[str] | None

    def found(self, data: bytes, fields: Sequence[Field]) -> bool:
        for field in fields:
            if field.name.lower() == self.name and (
                self.pattern is None or self.pattern.search(decoded_value(data, field))
            ):
                return True
        return False


@dataclass(frozen=True, slots=True)
class VerdictTest:
    """The hook ``hook`` recorded a verdict, with these properties."""

    hook: str
    spam: bool | None = None
    min_score: float | None = None
    actions: tuple[str, ...] = ()

    def holds(self, verdicts: Mapping[str, Verdict]) -> bool:
        verdict = verdicts.get(self.hook)
        if verdict is None:
            return False
        if self.spam is not None and verdict.spam is not self.spam:
            return False
        if self.min_score is not None and (verdict.score is None or verdict.score < self.min_score):
            return False
        return not self.actions or verdict.action in self.actions


@dataclass(frozen=True, slots=True)
class Replacement:
    """``pattern`` replaced by the ``re.sub`` template ``template`` in each line of the parts chosen."""

    pattern: re.Pattern[str]
    template: str
    types: frozenset[str]
    attachments: bool = False

    def targets(self, content_type: str, in_attachment: bool) -> bool:
        return content_type in self.types and (self.attachments or not in_attachment)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[hook.rule]]``: conditions, and the edits made when they all hold."""

    index: int
    when_spam: bool | None = None
    when_users: tuple[str, ...] = ()
    when_header: tuple[HeaderTest, ...] = ()
    unless_header: tuple[HeaderTest, ...] = ()
    when_verdict: tuple[VerdictTest, ...] = ()
    remove_header: frozenset[str] = frozenset()  # lower-case names
    remove_header_matching: tuple[re.Pattern[str], ...] = ()
    set_header: tuple[tuple[str, bytes], ...] = ()  # (lower-case name, the folded field)
    add_header: tuple[bytes, ...] = ()  # folded fields
    subject_prefix: str | None = None
    replace: tuple[Replacement, ...] = ()

    def holds(self, data: bytes, context: MessageContext) -> bool:
        """Whether every condition holds for the message ``data`` as it stands."""
        if self.when_spam is not None and context.is_spam() is not self.when_spam:
            return False
        user = context.facts.session.user
        if self.when_users and (user is None or not user_listed(self.when_users, user)):
            return False
        if not all(test.holds(context.verdicts) for test in self.when_verdict):
            return False
        if self.when_header or self.unless_header:
            fields = header_fields(data)
            if not all(test.found(data, fields) for test in self.when_header):
                return False
            if any(test.found(data, fields) for test in self.unless_header):
                return False
        return True

    def apply(self, data: bytes, skipped: list[str]) -> bytes:
        """``data`` with this rule's edits made; parts left alone are described in ``skipped``."""
        if self.remove_header or self.remove_header_matching:
            data = splice(data, ((f.start, f.end, b"") for f in header_fields(data) if self._removes(f.name)))
        for name, folded in self.set_header:
            data = _set_field(data, name, folded)
        if self.add_header:
            data = splice(data, ((0, 0, folded) for folded in self.add_header))
        if self.subject_prefix is not None:
            data = _prefix_subjects(data, self.subject_prefix)
        if self.replace:
            data = self._replace(data, skipped)
        return data

    def _removes(self, name: str) -> bool:
        lower = name.lower()
        if not name or lower in PROTECTED_FIELDS:
            return False
        return lower in self.remove_header or any(p.search(name) for p in self.remove_header_matching)

    def _replace(self, data: bytes, skipped: list[str]) -> bytes:
        edits = []
        for part, in_attachment, boundaries in walk_enclosed(parse(data)):
            where = f"rule {self.index}: part {part.section or 'body'} ({part.content_type})"
            if part.opaque is not None:  # too deep, or too many parts: what is inside stays as it is
                skipped.append(f"{where}: not looked into: {part.opaque}")
                continue
            if part.children or part.content_type not in TEXT_TYPES:
                continue
            replacements = [r for r in self.replace if r.targets(part.content_type, in_attachment)]
            if not replacements:
                continue
            body = data[part.body_start : part.end]
            try:
                edited = edit_text_body(
                    body,
                    part.transfer_encoding,
                    part.charset,
                    _line_editor(replacements),
                    boundaries=boundaries,
                    header_closed=part.header_closed,
                )
            except CannotEdit as error:
                skipped.append(f"{where}: {error}")
                continue
            if edited.kept:  # lines that, changed, could make or unmake a part
                skipped.append(f"{where}: {_kept_lines(edited.kept)} (RFC 2046 §5.1.1)")
            if edited.body != body:
                edits.append((part.body_start, part.end, edited.body))
        return splice(data, edits)


def _kept_lines(count: int) -> str:
    if count == 1:
        return "1 line left as it was: changed, it could change the MIME structure"
    return f"{count} lines left as they were: changed, they could change the MIME structure"


def _line_editor(replacements: Sequence[Replacement]) -> LineEdit:
    """The edit that ``edit_text_body`` applies to each line: every replacement, in order. Line
    breaks a template puts in become the part's own line ending."""

    def edit(line: str, newline: str) -> str:
        for replacement in replacements:
            template = replacement.template
            if "\\" in template or "\r" in template or "\n" in template:
                line = replacement.pattern.sub(_expander(template, newline), line)
            else:  # a plain string: re.sub takes it as it is, and much faster
                line = replacement.pattern.sub(template, line)
        return line

    return edit


def _expander(template: str, newline: str) -> Callable[[re.Match[str]], str]:
    return lambda match: _LINE_BREAK.sub(newline, match.expand(template))


def _set_field(data: bytes, name: str, folded: bytes) -> bytes:
    """The first field called ``name`` replaced by ``folded``, the others removed; or ``folded`` added."""
    found = [f for f in header_fields(data) if f.name.lower() == name]
    if not found:
        return splice(data, [(0, 0, folded)])
    first, *others = found
    return splice(data, [(first.start, first.end, folded)] + [(f.start, f.end, b"") for f in others])


def _prefix_subjects(data: bytes, prefix: str) -> bytes:
    subjects = [f for f in header_fields(data) if f.name.lower() == "subject"]
    if not subjects:
        return splice(data, [(0, 0, fold_field("Subject", prefix.strip()))])
    edits = [
        _prefix_edit(data, field, prefix)
        for field in subjects
        if not decoded_value(data, field).startswith(prefix.rstrip())
    ]
    return splice(data, edits)


def _prefix_edit(data: bytes, field: Field, prefix: str) -> tuple[int, int, bytes]:
    """Where and what to insert so that the Subject ``field`` reads ``prefix`` + what it said.

    The insertion goes before the value's first non-blank octet, or at the end of the field's first
    line when the value starts on a continuation line. RFC 2047 §5-6 shape it: an encoded-word must
    stand apart from other words by white space, and white space between two encoded-words is
    dropped when decoding.
    """
    value_end = len(data[: field.end].rstrip(b"\r\n"))
    first = field.colon
    while first < value_end and data[first] in b" \t\r\n":
        first += 1
    stripped = prefix.rstrip()
    trailing = prefix[len(stripped) :]
    if first == value_end:  # an empty subject: the prefix becomes the subject
        text = stripped if stripped.isascii() else encoded_word(stripped)
        lead = "" if data[first - 1 : first] in (b" ", b"\t") else " "
        return first, first, (lead + text).encode("ascii")
    next_is_encoded = data.startswith(b"=?", first)
    first_line = data.find(b"\n", field.start, field.end)
    first_line_end = len(data[: field.end if first_line < 0 else first_line].rstrip(b"\r"))
    if first > first_line_end:
        # The value starts on a continuation line: the prefix goes at the end of the first line,
        # and the fold separates it from the value (some parsers keep a continuation line's
        # leading white space, so inserting there would make the subject start with a space).
        if prefix.isascii():
            head = stripped
        else:
            head = encoded_word(prefix if next_is_encoded else stripped)
        lead = "" if data[first_line_end - 1 : first_line_end] in (b" ", b"\t") else " "
        return first_line_end, first_line_end, (lead + head).encode("ascii")
    if prefix.isascii():
        head, gap = stripped, trailing or (" " if next_is_encoded else "")
    elif next_is_encoded:  # the gap will be dropped: the prefix's own white space goes inside the word
        head, gap = encoded_word(prefix), " "
    else:
        head, gap = encoded_word(stripped), trailing or " "
    line_start = data.rfind(b"\n", field.start, first) + 1 or field.start
    line_end = data.find(b"\n", first, field.end)
    line_length = len(data[line_start : field.end if line_end < 0 else line_end].rstrip(b"\r"))
    if gap and line_length + len(head) + len(gap) > FOLD_AT:
        gap = "\r\n" + gap  # fold at the gap: unfolding gives the same text back
    return first, first, (head + gap).encode("ascii")


# --- the hook ----------------------------------------------------------------------------------------


@implementer(IMessageHook, IStartable)
class RewriteHook:
    """Applies its rules in order to each message; see the module docstring for what they do."""

    def __init__(
        self,
        name: str,
        max_added: int,
        rules: Sequence[Rule],
        *,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``run_in_thread``: how large rewrites run; by default the thread pool of the reactor the
        hook is started with (``IStartable``)."""
        self.name = name
        self.reservation = max_added
        self.rules = tuple(rules)
        self._run_in_thread = run_in_thread

    def start(self, reactor: Any) -> None:
        if self._run_in_thread is None:
            self._run_in_thread = _thread_runner(reactor)

    def rewrite(self, message: bytes, context: MessageContext) -> tuple[bytes, list[int], list[str]]:
        """The rewritten message, the indices of the rules that changed it, and the parts skipped."""
        data = message
        applied: list[int] = []
        skipped: list[str] = []
        for rule in self.rules:
            if not rule.holds(data, context):
                continue
            new = rule.apply(data, skipped)
            if new != data:
                applied.append(rule.index)
                data = new
        return data, applied, skipped

    def process(self, message: bytes, context: MessageContext) -> bytes | Deferred[bytes]:
        """The rewritten message: at once for small messages, through a Deferred for those of
        ``THREAD_AT`` octets or more, which are rewritten in the reactor's thread pool."""
        if len(message) < THREAD_AT:
            return self._finish(message, context, self.rewrite(message, context))
        if self._run_in_thread is None:
            raise HookNotStarted(f"hook {self.name} was not started")
        pending = self._run_in_thread(self.rewrite, message, context)
        return pending.addCallback(lambda result: self._finish(message, context, result))

    def _finish(self, message: bytes, context: MessageContext, result: tuple[bytes, list[int], list[str]]) -> bytes:
        """Check the growth and record the verdict (in the reactor thread: the context is not shared)."""
        data, applied, skipped = result
        grown = len(data) - len(message)
        if grown > self.reservation:
            raise RewriteTooLarge(
                f"rules {applied} would grow message {context.facts.number} by {grown} octets, "
                f"more than max_added = {self.reservation}"
            )
        if applied or skipped:
            details: dict[str, Any] = {"rules": applied}
            if skipped:
                details["skipped"] = skipped
            context.add_verdict(Verdict(hook=self.name, details=details))
        return data


# --- configuration -----------------------------------------------------------------------------------


@implementer(IHookFactory)
class RewriteHookFactory:
    """Builds a ``RewriteHook`` from a ``[[hook]]`` table with ``use = "rewrite"``."""

    def build(self, config: HookConfig) -> RewriteHook:
        options = config.options
        max_added = options.integer("max_added", DEFAULT_MAX_ADDED, minimum=0)
        tables = _tables(options, "rule")
        options.finish()
        if not tables:
            raise options.error("rule", "at least one [[hook.rule]] table is required")
        return RewriteHook(config.name, max_added, [_rule(index, table) for index, table in enumerate(tables)])


factory = RewriteHookFactory()


def _rule(index: int, t: HookOptions) -> Rule:
    rule = Rule(
        index=index,
        when_spam=t.boolean("when_spam", None),
        when_users=tuple(_user_entry(t, key, entry) for key, entry in _one_or_more(t, "when_users")),
        when_header=tuple(_header_test(table) for table in _tables(t, "when_header")),
        unless_header=tuple(_header_test(table) for table in _tables(t, "unless_header")),
        when_verdict=tuple(_verdict_test(table) for table in _tables(t, "when_verdict")),
        remove_header=frozenset(
            _field_name(t, key, name).lower() for key, name in _one_or_more(t, "remove_header")
        ),
        remove_header_matching=tuple(
            _regex(t, key, pattern, re.IGNORECASE) for key, pattern in _one_or_more(t, "remove_header_matching")
        ),
        set_header=tuple(
            (name.lower(), folded)
            for name, folded in (_new_field(t, key, value) for key, value in _one_or_more(t, "set_header"))
        ),
        add_header=tuple(_new_field(t, key, value)[1] for key, value in _one_or_more(t, "add_header")),
        subject_prefix=_subject_prefix(t),
        replace=tuple(_replacement(table) for table in _tables(t, "replace")),
    )
    t.finish()
    actions = ("remove_header", "remove_header_matching", "set_header", "add_header", "subject_prefix", "replace")
    if not any(getattr(rule, name) for name in actions):
        raise ConfigError(t.config_path, t.key, f"a rule needs at least one action: {', '.join(actions)}")
    return rule


def _one_or_more(t: HookOptions, name: str) -> list[tuple[str, str]]:
    """A string or a non-empty array of strings, as ``(key, string)`` pairs for error messages."""
    if name not in t:
        return []
    try:
        return [(name, t.string(name))]
    except ConfigError:
        values = t.strings(name)  # raises for anything but an array of strings
    if not values:
        raise t.error(name, "must not be an empty array")
    return [(f"{name}[{index}]", value) for index, value in enumerate(values)]


def _tables(t: HookOptions, name: str) -> list[HookOptions]:
    try:
        return t.tables(name)
    except ConfigError as error:
        if error.key == f"{t.key}.{name}":  # a single table where an array of them belongs
            raise ConfigError(
                error.path, error.key, f"{error.reason}: write {name} = [{{ ... }}] or [[...{name}]]"
            ) from None
        raise


def _regex(t: HookOptions, key: str, pattern: str, flags: int = 0) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as error:
        raise t.error(key, f"not a valid regular expression: {error}") from None


def _field_name(t: HookOptions, key: str, name: str) -> str:
    if not _FIELD_NAME.fullmatch(name):
        raise t.error(key, f"{name!r} is not a header field name (printable ASCII, no colon or space)")
    if name.lower() in PROTECTED_FIELDS:
        raise t.error(key, f"{name} says what the body is: rules do not add, set or remove it")
    return name


def _user_entry(t: HookOptions, key: str, entry: str) -> str:
    if not entry or entry == "@" or any(c.isspace() for c in entry):
        raise t.error(key, f"must be a user name or @domain, not {entry!r}")
    return t.normalise_user(entry)  # as the session's user is: one identity, one comparison


def _new_field(t: HookOptions, key: str, text: str) -> tuple[str, bytes]:
    """``"Name: value"`` as ``(name, the folded field)``."""
    name, colon, value = text.partition(":")
    if not colon:
        raise t.error(key, f'must be "Name: value", not {text!r}')
    _field_name(t, key, name)
    value = value.strip(" \t")
    if not value.isascii() and name.lower() in ADDRESS_FIELDS:
        raise t.error(key, f"{name} holds addresses: write non-ASCII display names as RFC 2047 encoded-words")
    try:
        return name, fold_field(name, value)
    except ValueError as error:
        raise t.error(key, str(error)) from None


def _subject_prefix(t: HookOptions) -> str | None:
    prefix = t.string("subject_prefix", None)
    if prefix is None:
        return None
    if not prefix.strip():
        raise t.error("subject_prefix", "must not be empty")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in prefix):
        raise t.error("subject_prefix", "must not hold line breaks or control characters")
    if not prefix.isascii() and len(encoded_word(prefix)) > 75:  # RFC 2047 §2
        raise t.error("subject_prefix", "is too long to be one RFC 2047 encoded-word (75 characters)")
    return prefix


def _header_test(t: HookOptions) -> HeaderTest:
    name = t.string("name")
    if not _FIELD_NAME.fullmatch(name):
        raise t.error("name", f"{name!r} is not a header field name (printable ASCII, no colon or space)")
    matches = t.string("matches", None)
    t.finish()
    return HeaderTest(name.lower(), None if matches is None else _regex(t, "matches", matches))


def _verdict_test(t: HookOptions) -> VerdictTest:
    hook = t.string("hook")
    if not hook:
        raise t.error("hook", "must name a hook")
    test = VerdictTest(
        hook=hook,
        spam=t.boolean("spam", None),
        min_score=t.number("min_score", None),
        actions=tuple(action for _, action in _one_or_more(t, "action")),
    )
    t.finish()
    return test


def _replacement(t: HookOptions) -> Replacement:
    pattern_text = t.string("pattern")
    if not pattern_text:
        raise t.error("pattern", "must not be empty")
    pattern = _regex(t, "pattern", pattern_text)
    template = t.string("with")
    # Check the template against the pattern's groups now, not on the first message: matching the
    # pattern's alternative with an empty one gives a match to expand (unmatched groups expand to
    # ""). The newline keeps a verbose pattern's trailing comment from swallowing the "|".
    try:
        re.compile(pattern_text + "\n|").match("").expand(template)  # type: ignore[union-attr]
    except (re.error, IndexError) as error:
        raise t.error("with", f"not a valid replacement for this pattern: {error}") from None
    types = t.strings("in", list(TEXT_TYPES))
    for index, kind in enumerate(types):
        if kind.lower() not in TEXT_TYPES:
            raise t.error(f"in[{index}]", f"must be one of {', '.join(TEXT_TYPES)}, not {kind!r}")
    if not types:
        raise t.error("in", "must not be an empty array")
    attachments = t.boolean("attachments", False)
    t.finish()
    return Replacement(pattern, template, frozenset(kind.lower() for kind in types), attachments)
