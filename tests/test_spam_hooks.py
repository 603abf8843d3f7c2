"""The ``spamassassin`` and ``rspamd`` hooks against real servers (the ``spamd`` and ``rspamd``
fixtures), the header writer they share (``spamheaders``), and every way a scanner can fail them:
refused, silent past the timeout, or answering garbage (small fake servers in this file)."""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from popproxy.config import ConfigError, parse_config
from popproxy.hooks.interfaces import (
    IMessageHook,
    MessageContext,
    MessageFacts,
    SessionFacts,
)
from popproxy.hooks.registry import build_hooks, start_hooks
from popproxy.hooks.rspamd import RspamdError, RspamdHook
from popproxy.hooks.spamassassin import SpamAssassinHook, SpamdError
from popproxy.hooks.spamheaders import (
    FOLD_AT,
    ReportEntry,
    SpamMarkup,
    SpamMarkupError,
    SpamSummary,
)

from support.configs import PREAMBLE
from support.rspamd import GTUBE_ACTIONS, RspamdServer
from support.spamd import GTUBE, SpamdServer, free_port

CONFIG_PATH = Path("/etc/popproxy/popproxy.toml")


HAM_BODY = (
    b"Hi Bob,\r\n"
    b"\r\n"
    b"shall we meet for lunch on Thursday at the usual place? I will bring the notes from\r\n"
    b"the planning meeting, so we can go through the open points before the review.\r\n"
    b"\r\n"
    b"Alice\r\n"
)


def mail(body: bytes, subject: bytes | None = b"Lunch on Thursday", *, folded: bool = False) -> bytes:
    """A message as a POP3 server delivers it: Return-Path first, CRLF line endings."""
    lines = [
        b"Return-Path: <alice@example.org>",
        b"Received: from mx.example.org (mx.example.org [192.0.2.25])",
        b"\tby pop.example.org with ESMTP id 4F2A1; Thu, 26 Nov 2026 09:58:12 +0000",
        b"From: Alice Example <alice@example.org>",
        b"To: Bob Example <bob@example.org>",
        b"Date: Thu, 26 Nov 2026 09:58:10 +0000",
        b"Message-ID: <lunch-20261126-0958@example.org>",
    ]
    if subject is not None:
        lines.append(b"Subject: " + subject)
        if folded:
            lines.append(b"\tand the notes from the planning meeting")
    lines += [b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=us-ascii"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def context(user: str | None = "bob@example.org", message: bytes = b"", uidl: str | None = "u1") -> MessageContext:
    facts = MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user=user), 1, uidl, len(message))
    return MessageContext(facts)


def build(hook_toml: str) -> Any:
    """The first hook of a configuration made of ``PREAMBLE`` and ``hook_toml``, built for real and
    started with the reactor, as the service does."""
    return start_hooks(build_hooks(parse_config(PREAMBLE + hook_toml, CONFIG_PATH)), reactor)[0].hook


def spamassassin(where: str, **settings: object) -> SpamAssassinHook:
    hook = build(f'[[hook]]\nuse = "spamassassin"\ntimeout = 20\n{where}\n' + toml(settings))
    assert isinstance(hook, SpamAssassinHook)
    return hook


def rspamd_hook(where: str, **settings: object) -> RspamdHook:
    hook = build(f'[[hook]]\nuse = "rspamd"\ntimeout = 20\n{where}\n' + toml(settings))
    assert isinstance(hook, RspamdHook)
    return hook


def toml(settings: dict[str, object]) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


def tcp(server: SpamdServer | RspamdServer) -> str:
    return f'address = "{server.address}"'


def unix(server: SpamdServer | RspamdServer) -> str:
    return f'socket = "{server.socket_path}"'


def fields(message: bytes) -> list[bytes]:
    """The header fields of ``message``, each with its continuation lines, unfolded (CRLF removed)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    return re.split(rb"\r\n(?![ \t])", head.replace(b"\r\n\t", b"\t").replace(b"\r\n ", b" "))


def field(message: bytes, name: bytes) -> bytes | None:
    for line in fields(message):
        if line.lower().startswith(name.lower() + b":"):
            return line.split(b":", 1)[1].strip()
    return None


def without_markup(message: bytes, prefix: bytes = b"X-Spam-", tag: bytes | None = None) -> bytes:
    """``message`` with the fields named ``prefix...`` (and their continuation lines) taken out of
    its header block and ``tag`` taken out of its first Subject line: what it was before the hook."""
    head, separator, body = message.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line.startswith((b" ", b"\t")):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.startswith(prefix)
        if not skipping:
            kept.append(line)
    text = b"\r\n".join(kept) + separator + body
    if tag is not None:
        text = re.sub(rb"(?im)^(Subject:[ \t]*)" + re.escape(tag) + rb" ?", rb"\1", text, count=1)
    return text


def check_growth(hook: Any, before: bytes, after: bytes) -> None:
    assert len(after) - len(before) <= hook.reservation
    assert re.search(rb"(?<!\r)\n", after) is None, "a bare LF"
    for line in fields(after):
        if line.startswith(b"X-Spam-"):
            assert re.fullmatch(rb"[\x20-\x7e\t]*", line), line


# --- the header writer ----------------------------------------------------------------------------


SUMMARY = SpamSummary(True, 7.25, 5.0, ("BAYES_99", "GTUBE", "MISSING_DATE"), (), ())


def test_headers_go_after_return_path_and_leave_every_other_octet() -> None:
    original = mail(HAM_BODY)
    out = SpamMarkup().apply(original, SUMMARY)
    assert out.startswith(
        b"Return-Path: <alice@example.org>\r\n"
        b"X-Spam-Flag: YES\r\n"
        b"X-Spam-Level: *******\r\n"
        b"X-Spam-Status: Yes, score=7.2 required=5.0 tests=BAYES_99,GTUBE,MISSING_DATE\r\n"
        b"Received: from mx.example.org"
    )
    assert without_markup(out) == original


def test_headers_go_first_without_return_path_and_after_an_mbox_from_line() -> None:
    assert SpamMarkup().apply(b"From: a@example.org\r\n\r\nhi\r\n", SUMMARY).startswith(b"X-Spam-Flag: YES\r\n")
    mbox = b"From alice@example.org Thu Nov 26 09:58:10 2026\r\nFrom: a@example.org\r\n\r\nhi\r\n"
    out = SpamMarkup().apply(mbox, SUMMARY)
    assert out.startswith(b"From alice@example.org Thu Nov 26 09:58:10 2026\r\nX-Spam-Flag: YES\r\n")


def test_ham_has_no_flag_and_an_empty_level_below_one_point() -> None:
    out = SpamMarkup(subject_tag="[SPAM]").apply(mail(HAM_BODY), SpamSummary(False, 0.4, 5.0))
    assert field(out, b"X-Spam-Flag") is None
    assert b"\r\nX-Spam-Level: \r\n" in out  # as SpamAssassin writes it
    assert field(out, b"X-Spam-Status") == b"No, score=0.4 required=5.0 tests=none"
    assert field(out, b"Subject") == b"Lunch on Thursday"


def test_level_has_one_star_per_whole_point_up_to_fifty() -> None:
    for score, stars in ((-3.0, 0), (0.99, 0), (1.0, 1), (7.9, 7), (50.0, 50), (1000.0, 50)):
        out = SpamMarkup().apply(b"\r\n", SpamSummary(True, score, 5.0))
        assert field(out, b"X-Spam-Level") == b"*" * stars


@pytest.mark.parametrize(
    ("subject_lines", "expected"),
    [
        ([b"Subject: Lunch"], [b"Subject: [SPAM] Lunch"]),
        ([b"subject:Lunch"], [b"subject: [SPAM] Lunch"]),
        ([b"Subject:\t Lunch"], [b"Subject:\t [SPAM] Lunch"]),
        ([b"Subject: Lunch", b"\ton Thursday"], [b"Subject: [SPAM] Lunch", b"\ton Thursday"]),
        ([b"Subject:", b" Lunch"], [b"Subject: [SPAM]", b" Lunch"]),
        ([b"Subject: "], [b"Subject: [SPAM]"]),
        ([b"Subject: [SPAM] Lunch"], [b"Subject: [SPAM] Lunch"]),  # tagged already: left alone
        ([b"Subject: [SPAM]"], [b"Subject: [SPAM]"]),
    ],
)
def test_subject_tag_rewrites_only_the_first_line_of_the_subject(
    subject_lines: list[bytes], expected: list[bytes]
) -> None:
    def message(subject: list[bytes]) -> bytes:
        return b"From: a@example.org\r\n" + b"".join(line + b"\r\n" for line in subject) + b"To: b@example.org\r\n\r\nbody\r\n"

    markup = SpamMarkup(subject_tag="[SPAM]")
    out = markup.apply(message(subject_lines), SUMMARY)
    assert out.endswith(message(expected)[len(b"From: a@example.org\r\n") :])
    assert len(out) - len(message(subject_lines)) <= markup.max_added


def test_subject_tag_adds_a_subject_to_spam_without_one() -> None:
    original = b"From: a@example.org\r\n\r\nbody\r\n"
    out = SpamMarkup(subject_tag="[SPAM]").apply(original, SUMMARY)
    assert field(out, b"Subject") == b"[SPAM]"
    assert out.endswith(b"\r\nSubject: [SPAM]\r\nFrom: a@example.org\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    ("original", "expected_tail"),
    [
        # No header block: the text becomes the body, after an empty line of ours.
        (b"just some text\r\nand more\r\n", b"tests=none\r\n\r\njust some text\r\nand more\r\n"),
        (b"", b"tests=none\r\n\r\n"),
        # Headers only, no empty line: still a header block; nothing is added after it.
        (b"From: a@example.org\r\nTo: b@example.org\r\n", b"tests=none\r\nFrom: a@example.org\r\nTo: b@example.org\r\n"),
        # An empty header block: the empty line is there already.
        (b"\r\nbody\r\n", b"tests=none\r\n\r\nbody\r\n"),
    ],
)
def test_messages_without_a_separator(original: bytes, expected_tail: bytes) -> None:
    out = SpamMarkup().apply(original, SpamSummary(False, 0.0, 5.0))
    assert out.startswith(b"X-Spam-Level: \r\nX-Spam-Status: No, score=0.0 required=5.0 ")
    assert out.endswith(expected_tail)


def test_status_folds_at_78_columns_after_commas_with_crlf_tab() -> None:
    tests = tuple(f"RULE_NUMBER_{n:03d}" for n in range(30))
    out = SpamMarkup(max_added=4096).apply(b"\r\nbody\r\n", SpamSummary(True, 12.5, 5.0, tests))
    status = out[out.index(b"X-Spam-Status:") : out.index(b"\r\n\r\nbody")]
    lines = status.split(b"\r\n")
    assert len(lines) > 5
    assert all(len(line) <= FOLD_AT for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])
    assert all(line.endswith(b",") for line in lines[:-1])
    unfolded = status.replace(b"\r\n\t", b"")
    assert unfolded == b"X-Spam-Status: Yes, score=12.5 required=5.0 tests=" + ",".join(tests).encode()


def test_a_huge_test_list_and_report_are_cut_to_the_budget() -> None:
    tests = tuple(f"SYMBOL_{n:04d}" for n in range(2000))
    report = tuple(ReportEntry(n / 10, f"SYMBOL_{n:04d}", "a description " * 12, ("[option]",)) for n in range(2000))
    markup = SpamMarkup(report=True, subject_tag="[SPAM]", max_added=4096)
    original = mail(HAM_BODY)
    out = markup.apply(original, SpamSummary(True, 9.0, 5.0, tests, (), report))
    assert len(original) < len(out) <= len(original) + 4096
    status = field(out, b"X-Spam-Status")
    assert status is not None and status.endswith(b",...")
    assert re.search(rb"\* \.\.\. \d+ more$", field(out, b"X-Spam-Report") or b"")
    assert without_markup(out, tag=b"[SPAM]") == original


def test_scanner_text_cannot_inject_header_lines() -> None:
    evil = SpamSummary(
        True, 6.0, 5.0, ("OK\r\nX-Injected: 1", "B,C"), (("action", "add\r\nheader"),),
        (ReportEntry(6.0, "R\nX-Injected: 2", "text\r\nX-Injected: 3\x00\xe9", ("[\r\nX-Injected: 4]",)),),
    )
    out = SpamMarkup(report=True, max_added=4096).apply(b"Subject: x\r\n\r\nbody\r\n", evil)
    assert b"\r\nX-Injected" not in out
    status = (field(out, b"X-Spam-Status") or b"").replace(b"\t", b" ")  # folded at the space
    assert status == b"Yes, score=6.0 required=5.0 tests=OK__X-Injected:_1,B_C action=add__header"


def test_implausible_scores_are_refused() -> None:
    for score in (float("nan"), float("inf"), 1e7, -1e6):
        with pytest.raises(SpamMarkupError):
            SpamMarkup().apply(b"\r\n", SpamSummary(True, score, 5.0))


def test_max_added_below_the_minimum_cannot_write_even_the_status() -> None:
    markup = SpamMarkup(max_added=40)
    with pytest.raises(SpamMarkupError):
        markup.apply(b"\r\nbody\r\n", SUMMARY)
    assert SpamMarkup(max_added=SpamMarkup().minimum()).apply(b"\r\nbody\r\n", SUMMARY)


_NAMES = st.sampled_from(["From", "To", "Date", "Message-ID", "Received", "Subject", "subject", "X-Mailer", "Cc"])
_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_FIELD = st.tuples(_NAMES, _TEXT, st.lists(_TEXT, max_size=2))
_ANY = st.text(max_size=120)  # scanner text: anything at all, control characters and non-ASCII too
# Body lines that can never pass for a header field, for messages without an empty line.
_BODY_LINE = st.binary(max_size=40).map(lambda b: b"~ ~ " + b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str]]]:
    """A message, and the (name, value) of its header fields in order."""
    lines = []
    heads = []
    if draw(st.booleans()):
        value = "<" + draw(_TEXT) + ">"
        lines.append(b"Return-Path: " + value.encode())
        heads.append(("Return-Path", value))
    for name, value, continuations in draw(st.lists(_FIELD, max_size=8)):
        lines.append(f"{name}: {value}".encode())
        lines += [b"\t" + continuation.encode() for continuation in continuations]
        heads.append((name, value))
    separator = draw(st.sampled_from([b"\r\n", b""]))
    body = draw(st.lists(_BODY_LINE, max_size=4))
    return b"".join(line + b"\r\n" for line in lines) + separator + b"".join(line + b"\r\n" for line in body), heads


@st.composite
def summaries(draw: st.DrawFn) -> SpamSummary:
    score = draw(st.floats(min_value=-999_999, max_value=999_999, allow_nan=False))
    threshold = draw(st.floats(min_value=-999_999, max_value=999_999, allow_nan=False))
    tests = tuple(draw(st.lists(_ANY, max_size=300)))
    extras = tuple(draw(st.lists(st.tuples(st.just("action"), _ANY), max_size=1)))
    report = tuple(
        draw(
            st.lists(
                st.one_of(
                    _ANY,
                    st.builds(ReportEntry, st.floats(-1e5, 1e5), _ANY, _ANY, st.lists(_ANY, max_size=3).map(tuple)),
                ),
                max_size=60,
            )
        )
    )
    return SpamSummary(draw(st.booleans()), score, threshold, tests, extras, report)


@st.composite
def markups(draw: st.DrawFn) -> SpamMarkup:
    markup = SpamMarkup(
        prefix=draw(st.sampled_from(["X-Spam-", "X-Scan-", "X-Popproxy-Scanner-"])),
        report=draw(st.booleans()),
        subject_tag=draw(st.sampled_from([None, "[SPAM]", "*** SPAM ***", "x" * 64])),
        extras=("action",),
    )
    extra = draw(st.integers(min_value=0, max_value=3000))
    return SpamMarkup(markup.prefix, markup.report, markup.subject_tag, markup.minimum() + extra, markup.extras)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generated=messages(), summary=summaries(), markup=markups())
def test_markup_never_exceeds_its_budget_and_changes_nothing_else(
    generated: tuple[bytes, list[tuple[str, str]]], summary: SpamSummary, markup: SpamMarkup
) -> None:
    message, heads = generated
    out = markup.apply(message, summary)
    assert len(out) - len(message) <= markup.max_added
    prefix = markup.prefix.encode()
    tag = markup.subject_tag.encode() if markup.subject_tag and summary.spam else None
    subject = next((value for name, value in heads if name.lower() == "subject"), None)
    # 1. Everything before the insertion point (a leading Return-Path line) is as it was.
    at = message.index(b"\r\n") + 2 if heads and heads[0][0] == "Return-Path" else 0
    assert out[:at] == message[:at]
    # 2. Then our lines: fields named <prefix>..., their folds, a created Subject, an empty line.
    lines = out[at:].split(b"\r\n")
    block: list[list[bytes]] = []  # each field's physical lines
    while lines and (lines[0].startswith(prefix) or (block and lines[0].startswith(b"\t"))):
        line = lines.pop(0)
        if line.startswith(b"\t"):
            block[-1].append(line)
        else:
            block.append([line])
    names = [field_lines[0].split(b":")[0][len(prefix) :] for field_lines in block]
    expected_names = [b"Flag"] if summary.spam else []
    expected_names += [b"Level", b"Status"]
    assert names in (expected_names, [*expected_names, b"Report"])
    if names[-1] == b"Report":
        assert markup.report and summary.report
    if tag is not None and subject is None:
        assert lines.pop(0) == b"Subject: " + tag
    if not heads and not message.startswith(b"\r\n"):
        assert lines.pop(0) == b"", "the empty line after a message with no header block"
    for name, field_lines in zip(names, block, strict=True):
        for line in field_lines:
            assert re.fullmatch(rb"[\x20-\x7e\t]*", line), line
            # Names are cut to 64 characters, so only a report line may be longer than 78.
            assert len(line) <= (998 if name == b"Report" else FOLD_AT), line
    # 3. And the rest is the message, with the tag in front of its first Subject's value.
    rest = b"\r\n".join(lines)
    expected = message[at:]
    if tag is not None and subject is not None:
        name = next(name for name, _ in heads if name.lower() == "subject").encode()
        old = name + b": " + subject.encode() + b"\r\n"
        value = subject.encode().lstrip(b" ")
        space = b" " * (len(subject) - len(value) + 1)
        if value == tag or value.startswith(tag + b" "):
            new = old
        else:
            new = name + b":" + space + tag + (b" " + value if value else b"") + b"\r\n"
        expected = expected.replace(old, new, 1)
    assert rest == expected


# --- spamassassin against a real spamd ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_spamd_tags_gtube_as_spam_with_headers_and_subject_tag(spamd: SpamdServer) -> None:
    hook = spamassassin(tcp(spamd), subject_tag="[SPAM]")
    verifyObject(IMessageHook, hook)
    original = mail(GTUBE + b"\r\n" + HAM_BODY)
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    verdict = ctx.verdicts["spamassassin"]
    assert verdict.spam is True
    assert verdict.score is not None and verdict.score >= 1000
    assert verdict.threshold == 5.0
    assert "GTUBE" in verdict.details["tests"]
    assert field(out, b"X-Spam-Flag") == b"YES"
    assert field(out, b"X-Spam-Level") == b"*" * 50
    status = field(out, b"X-Spam-Status")
    assert status is not None
    assert re.fullmatch(rb"Yes, score=\d+\.\d required=5\.0 tests=[A-Z0-9_,\t]*GTUBE[A-Z0-9_,\t]*", status), status
    assert field(out, b"Subject") == b"[SPAM] Lunch on Thursday"
    assert out.startswith(b"Return-Path: <alice@example.org>\r\nX-Spam-Flag: YES\r\n")
    assert without_markup(out, tag=b"[SPAM]") == original  # not wrapped, though spamd has report_safe 1
    check_growth(hook, original, out)


@pytest_twisted.ensureDeferred
async def test_spamd_over_its_unix_socket_finds_an_ordinary_message_is_ham(spamd: SpamdServer) -> None:
    hook = spamassassin(unix(spamd), subject_tag="[SPAM]")
    original = mail(HAM_BODY)
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    verdict = ctx.verdicts["spamassassin"]
    assert verdict.spam is False and verdict.score is not None and verdict.score < 5.0
    assert field(out, b"X-Spam-Flag") is None
    status = field(out, b"X-Spam-Status")
    assert status is not None and status.startswith(b"No, score=") and b" required=5.0 tests=" in status
    assert field(out, b"Subject") == b"Lunch on Thursday"
    assert without_markup(out) == original
    check_growth(hook, original, out)


@pytest_twisted.ensureDeferred
async def test_spamd_report_becomes_a_folded_x_spam_report(spamd: SpamdServer) -> None:
    hook = spamassassin(tcp(spamd), report=True, subject_tag="[SPAM]")
    assert hook.reservation == 4096
    original = mail(GTUBE + b"\r\n", folded=True)
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    report = out[out.index(b"X-Spam-Report:") :].split(b"\r\n")
    assert report[0] == b"X-Spam-Report: "
    entries = []
    for line in report[1:]:
        if not line.startswith(b"\t"):
            break
        assert len(line) <= FOLD_AT
        entries.append(line)
    assert b"\t* 1000 GTUBE BODY: Generic Test for Unsolicited Bulk Email" in entries
    verdict = ctx.verdicts["spamassassin"]
    assert verdict.details["scores"]["GTUBE"] == 1000.0
    assert "GTUBE" in verdict.details["tests"]
    assert b"Subject: [SPAM] Lunch on Thursday\r\n\tand the notes from the planning meeting\r\n" in out
    assert without_markup(out, tag=b"[SPAM]") == original
    check_growth(hook, original, out)


@pytest_twisted.ensureDeferred
async def test_spamd_headers_false_records_the_verdict_only(spamd: SpamdServer) -> None:
    hook = spamassassin(tcp(spamd), headers=False, user="{local}")
    assert hook.reservation == 0
    original = mail(GTUBE + b"\r\n")
    ctx = context(user="carol@example.org", message=original)
    assert await hook.process(original, ctx) == original
    assert ctx.verdicts["spamassassin"].spam is True
    # The User header reached spamd: it logs the user each message was checked for.
    assert re.search(r"checking message <lunch-20261126-0958@example\.org> for carol:", spamd.log_text())


@pytest_twisted.ensureDeferred
async def test_spamd_refused_connection_raises(tmp_path: Path) -> None:
    hook = spamassassin(f'address = "127.0.0.1:{free_port()}"')
    with pytest.raises(SpamdError, match=r"cannot connect to spamd at 127\.0\.0\.1:\d+: .*refused"):
        await hook.process(mail(HAM_BODY), context())
    hook = spamassassin(f'socket = "{tmp_path / "none.sock"}"')
    with pytest.raises(SpamdError, match="cannot connect to spamd at unix:"):
        await hook.process(mail(HAM_BODY), context())


# --- fake servers: silent, or answering garbage --------------------------------------------------------


class FakeSpamd(Protocol):
    """Reads one SPAMC request; answers with ``answers[command]`` and closes, or, with no answer
    for the command, says nothing at all. ``lost`` fires when the connection closes."""

    def __init__(self, answers: dict[bytes, bytes], requests: list[bytes], lost: list[Deferred[None]]) -> None:
        self.answers = answers
        self.requests = requests
        self.buffer = b""
        self.lost: Deferred[None] = Deferred()
        lost.append(self.lost)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, separator, body = self.buffer.partition(b"\r\n\r\n")
        length = re.search(rb"Content-length: (\d+)", head)
        if not separator or length is None or len(body) < int(length.group(1)):
            return
        self.requests.append(self.buffer)
        answer = self.answers.get(head.split(b" ", 1)[0])
        if answer is not None:
            assert self.transport is not None
            self.transport.write(answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


@asynccontextmanager
async def listening(factory: Any) -> Any:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        yield port.getHost().port
    finally:
        await port.stopListening()


def fake_spamd(answers: dict[bytes, bytes]) -> tuple[Factory, list[bytes], list[Deferred[None]]]:
    requests: list[bytes] = []
    lost: list[Deferred[None]] = []
    return Factory.forProtocol(lambda: FakeSpamd(answers, requests, lost)), requests, lost


def spamd_answer(body: bytes, spam: bytes = b"True ; 7.5 / 5.0") -> bytes:
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s\r\n\r\n%s" % (len(body), spam, body)


@pytest_twisted.ensureDeferred
async def test_spamd_silent_past_the_timeout_is_cancelled_and_disconnected() -> None:
    factory, requests, lost = fake_spamd({})  # accepts, reads, never answers
    async with listening(factory) as port:
        hook = spamassassin(f'address = "127.0.0.1:{port}"')
        pending = hook.process(mail(HAM_BODY), context())
        pending.addTimeout(0.3, reactor)  # as popproxy's pipeline does with the hook's timeout
        with pytest.raises(TimeoutError):
            await pending
        await lost[0].addTimeout(2, reactor)  # the connection was aborted, not left open
        assert requests and requests[0].startswith(b"SYMBOLS SPAMC/1.5\r\nContent-length: ")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.0 200 OK\r\n\r\nhello", r"answered garbage: b'HTTP/1\.0 200 OK'"),
        (b"SPAMD/1.0 76 Bad header line: (Content-Length mismatch)\r\n", r"refused the request: 76 Bad header line"),
        (b"", r"closed the connection without an answer"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 1.0 / 5.0\r\n\r\nGTU", r"cut its answer short: 3 of 50"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-len", r"cut its answer short in the headers"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\n\r\nGTUBE", r"no usable Spam header"),
        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: Maybe ; 1 / 5\r\n\r\nGTUBE", r"no usable Spam header"),
        (spamd_answer(b"GTUBE,\x00\xff"), r"test names that are not ASCII"),
        (spamd_answer(b"GTUBE,<script>"), r"a test name that is none: '<script>'"),
        (b"SPAMD/1.1 0 EX_OK\r\n" + b"X" * (2 * 1024 * 1024), r"more than 1048576 octets"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_spamd_garbage_raises(answer: bytes, message: str) -> None:
    factory, _, lost = fake_spamd({b"SYMBOLS": answer})
    async with listening(factory) as port:
        hook = spamassassin(f'address = "127.0.0.1:{port}"')
        with pytest.raises(SpamdError, match=message):
            await hook.process(mail(HAM_BODY), context())
        await lost[0]


@pytest_twisted.ensureDeferred
async def test_spamd_custom_report_template_and_a_huge_symbol_list() -> None:
    names = b",".join(b"LOCAL_RULE_%04d" % n for n in range(3000))
    factory, requests, _ = fake_spamd(
        {
            b"REPORT": spamd_answer(b"Our own report.\nScore: 7.5\n\nAsk postmaster@example.org.\n"),
            b"SYMBOLS": spamd_answer(names),
        }
    )
    async with listening(factory) as port:
        hook = spamassassin(f'address = "127.0.0.1:{port}"', report=True, user="{user}", subject_tag="[SPAM]")
        original = mail(HAM_BODY)
        ctx = context(message=original)
        out = await hook.process(original, ctx)
    assert [request.split(b"\r\n")[:3] for request in requests] == [
        [b"REPORT SPAMC/1.5", b"Content-length: %d" % len(original), b"User: bob@example.org"],
        [b"SYMBOLS SPAMC/1.5", b"Content-length: %d" % len(original), b"User: bob@example.org"],
    ]
    assert field(out, b"X-Spam-Report") == b"Our own report.\tScore: 7.5\tAsk postmaster@example.org."
    status = field(out, b"X-Spam-Status")
    assert status is not None and status.startswith(b"Yes, score=7.5 required=5.0 tests=LOCAL_RULE_0000,")
    assert status.endswith(b",...")
    assert len(ctx.verdicts["spamassassin"].details["tests"]) == 200
    check_growth(hook, original, out)
    assert without_markup(out, tag=b"[SPAM]") == original


# --- rspamd against a real rspamd ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rspamd_tags_gtube_as_spam_with_headers_and_subject_tag(rspamd: RspamdServer) -> None:
    hook = rspamd_hook(tcp(rspamd), subject_tag="[SPAM]")
    verifyObject(IMessageHook, hook)
    original = mail(GTUBE + b"\r\n")
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    verdict = ctx.verdicts["rspamd"]
    assert (verdict.spam, verdict.action, verdict.score, verdict.threshold) == (True, "reject", 15.0, 15.0)
    assert verdict.details["tests"] == ["GTUBE"]
    assert field(out, b"X-Spam-Flag") == b"YES"
    assert field(out, b"X-Spam-Level") == b"*" * 15
    assert field(out, b"X-Spam-Status") == b"Yes, score=15.0 required=15.0 tests=GTUBE action=reject"
    assert field(out, b"Subject") == b"[SPAM] Lunch on Thursday"
    assert without_markup(out, tag=b"[SPAM]") == original
    check_growth(hook, original, out)


@pytest.mark.parametrize(("action", "spam"), [("add header", True), ("rewrite subject", True), ("no action", False)])
@pytest_twisted.ensureDeferred
async def test_rspamd_spam_is_judged_by_action(rspamd: RspamdServer, action: str, spam: bool) -> None:
    hook = rspamd_hook(unix(rspamd))
    original = mail(GTUBE_ACTIONS[action] + b"\r\n")
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    verdict = ctx.verdicts["rspamd"]
    assert (verdict.action, verdict.spam) == (action, spam)
    status = field(out, b"X-Spam-Status")
    assert status is not None and status.startswith(b"Yes, " if spam else b"No, ")
    assert status.endswith(b" action=" + action.replace(" ", "_").encode())
    # With spam_actions narrowed to "reject", the same answer is not spam.
    narrow = rspamd_hook(unix(rspamd), spam_actions=["reject"])
    ctx = context(message=original)
    await narrow.process(original, ctx)
    assert ctx.verdicts["rspamd"].spam is False


@pytest_twisted.ensureDeferred
async def test_rspamd_ordinary_message_is_ham_with_a_report(rspamd: RspamdServer) -> None:
    hook = rspamd_hook(tcp(rspamd), report=True, subject_tag="[SPAM]")
    original = mail(HAM_BODY)
    ctx = context(message=original)
    out = await hook.process(original, ctx)
    verdict = ctx.verdicts["rspamd"]
    assert (verdict.spam, verdict.action) == (False, "no action")
    assert "RCVD_COUNT_ONE" in verdict.details["tests"]  # rspamd.lua rules ran, not just GTUBE
    status = field(out, b"X-Spam-Status")
    assert status is not None and status.startswith(b"No, score=") and status.endswith(b" action=no_action")
    report = field(out, b"X-Spam-Report") or b""
    for test in verdict.details["tests"]:
        assert f"* {verdict.details['symbols'][test]:4.1f} {test} ".encode() in report.replace(b"\t", b"")
    assert field(out, b"Subject") == b"Lunch on Thursday"
    assert without_markup(out) == original
    check_growth(hook, original, out)


@pytest_twisted.ensureDeferred
async def test_rspamd_refused_connection_raises() -> None:
    hook = rspamd_hook(f'address = "127.0.0.1:{free_port()}"')
    with pytest.raises(RspamdError, match=r"cannot ask rspamd at 127\.0\.0\.1:\d+: .*refused"):
        await hook.process(mail(HAM_BODY), context())


class FakeRspamd(Resource):
    """Answers every POST with ``status`` and ``body``; with ``body`` None it never answers, and
    ``lost`` fires when the client goes away."""

    isLeaf = True

    def __init__(self, body: bytes | None, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []
        self.lost: Deferred[object] = Deferred()

    def render_POST(self, request: Any) -> bytes | int:
        content = request.content.read()
        self.requests.append((request.uri, dict(request.requestHeaders.getAllRawHeaders()), content))
        if self.body is None:
            request.notifyFinish().addBoth(lambda result: self.lost.callback(getattr(result, "value", result)))
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return self.body


@pytest_twisted.ensureDeferred
async def test_rspamd_silent_past_the_timeout_is_cancelled_and_disconnected() -> None:
    resource = FakeRspamd(None)
    async with listening(Site(resource)) as port:
        hook = rspamd_hook(f'address = "127.0.0.1:{port}"')
        pending = hook.process(mail(HAM_BODY), context())
        pending.addTimeout(0.3, reactor)
        with pytest.raises(TimeoutError):
            await pending
        reason = await resource.lost.addTimeout(2, reactor)
        assert isinstance(reason, ConnectionLost)  # the client aborted the connection
        assert resource.requests[0][0] == b"/checkv2"


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, b'{"error": "internal"}', r"answered HTTP 500"),
        (200, b"<html>not json</html>", r"answered something that is not JSON"),
        (200, b"[1, 2]", r"JSON that is not an object"),
        (200, b'{"error": "cannot parse message"}', r"could not check the message: cannot parse message"),
        (200, b'{"score": 1.0, "required_score": 15.0}', r"answered without an action"),
        (200, b'{"action": "reject", "score": "high"}', r"a score that is not a number"),
        (200, b'{"action": "reject", "score": 1, "symbols": {"A": 3}}', r"a symbol 'A' that is not an object"),
        (200, b"x" * (2 * 1024 * 1024), r"sent more than 1048576 octets"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_rspamd_garbage_raises(status: int, body: bytes, message: str) -> None:
    async with listening(Site(FakeRspamd(body, status))) as port:
        hook = rspamd_hook(f'address = "127.0.0.1:{port}"')
        with pytest.raises(RspamdError, match=message):
            await hook.process(mail(HAM_BODY), context())


@pytest_twisted.ensureDeferred
async def test_rspamd_request_headers_and_a_huge_symbol_list() -> None:
    symbols = {
        f"SYMBOL_{n:04d}": {"name": f"SYMBOL_{n:04d}", "score": n / 100, "description": "words " * 30, "options": ["x" * 90]}
        for n in range(2000)
    }
    answer = {"action": "add header", "score": 8.5, "required_score": 15.0, "symbols": symbols}
    resource = FakeRspamd(json.dumps(answer).encode())
    async with listening(Site(resource)) as port:
        hook = rspamd_hook(
            f'address = "127.0.0.1:{port}"',
            report=True,
            subject_tag="[SPAM]",
            deliver_to="{local}",
            settings_id="pop3",
            spam_actions=["reject", "add_header"],
        )
        original = mail(HAM_BODY)
        ctx = context(message=original, uidl="00000001000004d2")
        out = await hook.process(original, ctx)
    uri, headers, content = resource.requests[0]
    assert (uri, content) == (b"/checkv2", original)
    assert headers[b"Deliver-To"] == [b"bob"]
    assert headers[b"Settings-Id"] == [b"pop3"]
    assert headers[b"Queue-Id"] == [b"00000001000004d2"]
    assert headers[b"Content-Length"] == [str(len(original)).encode()]
    assert b"User" not in headers and b"Pass" not in headers
    verdict = ctx.verdicts["rspamd"]
    assert (verdict.spam, verdict.action, verdict.score) == (True, "add header", 8.5)
    assert len(verdict.details["tests"]) == 200 and len(verdict.details["symbols"]) == 100
    assert (field(out, b"X-Spam-Status") or b"").endswith(b",... action=add_header")
    report = (field(out, b"X-Spam-Report") or b"").split(b"\t")
    assert report[0].startswith(b"*   20 SYMBOL_1999 words words")  # the largest score first
    assert re.fullmatch(rb"\* \.\.\. \d+ more", report[-1])
    check_growth(hook, original, out)
    assert without_markup(out, tag=b"[SPAM]") == original


# --- factories and settings ---------------------------------------------------------------------------


def test_factories_build_from_toml_with_their_defaults() -> None:
    hooks = [
        built.hook
        for built in build_hooks(
            parse_config(
                PREAMBLE
                + '[[hook]]\nuse = "spamassassin"\n'
                + '[[hook]]\nuse = "rspamd"\nname = "rs"\nsocket = "/run/rspamd/normal.sock"\nheaders = false\n',
                CONFIG_PATH,
            )
        )
    ]
    sa, rs = hooks
    assert isinstance(sa, SpamAssassinHook) and isinstance(rs, RspamdHook)
    assert (sa.name, str(sa.server), sa.reservation) == ("spamassassin", "127.0.0.1:783", 1024)
    assert sa.markup == SpamMarkup("X-Spam-", False, None, 1024, ())
    assert (rs.name, str(rs.server), rs.reservation, rs.markup) == ("rs", "unix:/run/rspamd/normal.sock", 0, None)
    assert rs.spam_actions == {"reject", "add header", "rewrite subject", "discard", "quarantine"}
    sa6 = spamassassin('address = "[::1]"', header_prefix="X-Scan-", max_added=300)
    assert (str(sa6.server), sa6.reservation) == ("[::1]:783", 300)


@pytest.mark.parametrize(
    ("use", "settings", "key", "reason"),
    [
        ("spamassassin", 'address = "127.0.0.1:99999"', "address", "port must be a number"),
        ("spamassassin", 'address = "::1"', "address", "brackets"),
        ("spamassassin", 'address = "a:1"\nsocket = "/s"', "socket", "not both"),
        ("spamassassin", 'header_prefix = "X Spam"', "header_prefix", "letters, digits"),
        ("spamassassin", 'subject_tag = ""', "subject_tag", "printable ASCII"),
        ("spamassassin", 'subject_tag = "[SPAM]\\r\\nBcc: x"', "subject_tag", "printable ASCII"),
        ("spamassassin", "max_added = 100", "max_added", "must be at least"),
        ("spamassassin", 'report = "yes"', "report", "must be"),
        ("spamassassin", "headers = false\nreport = true", "report", "no effect with headers = false"),
        ("spamassassin", 'user = "{password}"', "user", "only placeholders"),
        ("spamassassin", "reports = true", "reports", "unknown key"),
        ("rspamd", 'spam_actions = ["reject", "rejected"]', "spam_actions[1]", "not an rspamd action"),
        ("rspamd", 'settings_id = "a b"', "settings_id", "letters, digits"),
        ("rspamd", 'deliver_to = "{local"', "deliver_to", "not a valid template"),
        ("rspamd", "subject_tag = 7", "subject_tag", "must be"),
    ],
)
def test_bad_settings_name_their_key(use: str, settings: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(f'[[hook]]\nuse = "{use}"\n{settings}\n')
    assert caught.value.key == f"hook[0].{key}"
    assert reason in caught.value.reason
