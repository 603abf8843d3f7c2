"""The ``rewrite`` hook and ``mimesplice``: rules from TOML, header edits, text replacement through
transfer encodings and charsets, and, above all, every byte nobody asked to change left as it was."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
import threading
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from popproxy.config import ConfigError, parse_config
from popproxy.hooks.interfaces import (
    HookNotStarted,
    MessageContext,
    MessageFacts,
    SessionFacts,
    Verdict,
)
from popproxy.hooks.mimesplice import Part, fold_field, parse, splice, walk
from popproxy.hooks.pipeline import ordered
from popproxy.hooks.registry import build_hooks
from popproxy.hooks.rewrite import THREAD_AT, RewriteHook, RewriteTooLarge

from support.configs import PREAMBLE

CONFIG_PATH = Path("/etc/popproxy/popproxy.toml")



def build(hook_toml: str) -> RewriteHook:
    """The first hook of a configuration made of ``PREAMBLE`` and ``hook_toml``, built for real."""
    built = build_hooks(parse_config(PREAMBLE + hook_toml, CONFIG_PATH))
    hook = built[0].hook
    assert isinstance(hook, RewriteHook)
    return hook


def config_error(hook_toml: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        build_hooks(parse_config(PREAMBLE + hook_toml, CONFIG_PATH))
    return caught.value


def context(user: str | None = "alice@example.org", *verdicts: Verdict) -> MessageContext:
    facts = MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user=user), 1, "uidl-1", 1000)
    result = MessageContext(facts)
    for verdict in verdicts:
        result.add_verdict(verdict)
    return result


def rewrite(hook: RewriteHook, message: bytes, ctx: MessageContext | None = None) -> bytes:
    out = hook.process(message, ctx if ctx is not None else context())
    assert isinstance(out, bytes)
    assert out.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n", out) is None, "a bare LF"
    return out


def rule(body: str, max_added: int = 512) -> RewriteHook:
    return build(f'[[hook]]\nuse = "rewrite"\nmax_added = {max_added}\n[[hook.rule]]\n{body}\n')


def parsed(message: bytes) -> email.message.EmailMessage:
    result = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(result, email.message.EmailMessage)
    return result


def raw_payload(part: email.message.Message) -> bytes:
    """A leaf's body as ``email`` holds it (``get_payload()`` would decode 8-bit text)."""
    payload: str = part._payload  # type: ignore[attr-defined]
    return payload.encode("ascii", "surrogateescape")


def parts_by_section(message: bytes) -> dict[str, tuple[str, bytes]]:
    """Every leaf entity's raw bytes (headers and body), by section."""
    return {
        part.section: (part.content_type, message[part.start : part.end])
        for part, _ in walk(parse(message))
        if not part.children
    }


SIMPLE = (
    b"Received: from mx.example.net by pop.example.org;\r\n"
    b"\tMon, 1 Jan 2024 10:00:00 +0000\r\n"
    b"From: Alice <alice@partner.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: Hello there\r\n"
    b"X-Mailer: Frobnicator 2.0\r\n"
    b"X-Spam-Score: 1.0\r\n"
    b"X-Spam-Report: a long report\r\n"
    b"  that is folded\r\n"
    b"\tover three lines\r\n"
    b"Message-ID: <1@example.net>\r\n"
    b"\r\n"
    b"Visit http://example.net/ now.\r\n"
    b"Bye\r\n"
)

# multipart/mixed
#   1    multipart/alternative
#   1.1    text/plain, utf-8, quoted-printable (a URL soft-broken over two lines)
#   1.2    text/html, utf-8, base64
#   2    image/png attachment, base64
#   3    text/plain attachment (a log file)
#   4    message/rfc822 attachment (a forwarded message with its own text)
#   5    text/plain, iso-8859-1, 8bit, inline, with a Content-Disposition: inline
HTML = '<p>Grüße, see <a href="http://example.net/a">http://example.net/a</a></p>\r\n'
PNG = bytes(range(256)) * 3
MIXED = (
    b"From: Alice <alice@partner.example>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from the team\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="==outer=="\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--==outer==\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b' boundary="alt-1"\r\n'
    b"\r\n"
    b"--alt-1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe,\r\n"
    b"\r\n"
    b"the report is at http://exa=\r\n"
    b"mple.net/a and the rest stays.\r\n"
    b"A line that does not change =3D kept as encoded, even if  \r\n"
    b"=E2=82=AC 5\r\n"
    b"--alt-1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(HTML.encode("utf-8") * 3).replace(b"\n", b"\r\n") + b"--alt-1--\r\n"
    b"\r\n"
    b"--==outer==\r\n"
    b"Content-Type: image/png\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="http.png"\r\n'
    b"\r\n" + base64.encodebytes(PNG).replace(b"\n", b"\r\n") + b"--==outer==\r\n"
    b"Content-Type: text/plain; charset=us-ascii; name=server.log\r\n"
    b"Content-Disposition: attachment; filename=server.log\r\n"
    b"\r\n"
    b"GET http://example.net/a 200\r\n"
    b"--==outer==\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: attachment; filename=fwd.eml\r\n"
    b"\r\n"
    b"From: carol@example.com\r\n"
    b"Subject: forwarded\r\n"
    b"\r\n"
    b"Old link: http://example.net/old\r\n"
    b"\r\n"
    b"--==outer==\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n"
    b"Caf\xe9 http://example.net/latin\r\n"
    b"--==outer==--\r\n"
    b"epilogue http://example.net/epilogue\r\n"
)


# --- mimesplice: locating ----------------------------------------------------------------------------


def test_parse_locates_every_part_of_a_real_world_message() -> None:
    top = parse(MIXED)
    assert [(p.section, p.content_type) for p, _ in walk(top)] == [
        ("", "multipart/mixed"),
        ("1", "multipart/alternative"),
        ("1.1", "text/plain"),
        ("1.2", "text/html"),
        ("2", "image/png"),
        ("3", "text/plain"),
        ("4", "message/rfc822"),
        ("4", "text/plain"),  # the forwarded message itself
        ("5", "text/plain"),
    ]
    found = {part.section: part for part, _ in walk(top) if part.content_type != "message/rfc822"}
    assert MIXED[found["1.1"].start :].startswith(b"Content-Type: text/plain; charset=utf-8\r\n")
    assert MIXED[found["1.1"].body_start : found["1.1"].end].endswith(b"=E2=82=AC 5")  # CRLF is the delimiter's
    assert MIXED[found["3"].body_start : found["3"].end] == b"GET http://example.net/a 200"
    assert base64.b64decode(MIXED[found["2"].body_start : found["2"].end]) == PNG
    assert MIXED[found["1"].end : found["1"].end + 2] == b"\r\n"  # the blank line before "--==outer=="
    assert found["1.1"].charset == "utf-8" and found["1.1"].transfer_encoding == "quoted-printable"
    assert found["5"].charset == "iso-8859-1" and found["5"].disposition == "inline"
    attached = {part.section for part, in_attachment in walk(top) if in_attachment}
    assert attached == {"2", "3", "4"}


def test_parse_agrees_with_email_on_the_leaf_bodies() -> None:
    ours = [MIXED[p.body_start : p.end] for p, _ in walk(parse(MIXED)) if not p.children]
    theirs = [
        raw_payload(part)
        for part in email.message_from_bytes(MIXED).walk()
        if not part.is_multipart()
    ]
    assert ours == theirs


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # transport padding after the boundary, and LWSP after the close delimiter
        (b"--b \t\r\nA: 1\r\n\r\none\r\n--b--  \r\n", [b"A: 1\r\n\r\none"]),
        # no close delimiter: the last part runs to the end
        (b"--b\r\n\r\none\r\n--b\r\n\r\ntwo\r\n", [b"\r\none", b"\r\ntwo\r\n"]),
        # "--bx" and "--b-" are not delimiters of "b"
        (b"--b\r\n\r\n--bx\r\n--b-\r\n--b--\r\n", [b"\r\n--bx\r\n--b-"]),
        # two delimiters in a row: an empty part
        (b"--b\r\n--b\r\n\r\nx\r\n--b--\r\n", [b"", b"\r\nx"]),
        # no delimiter at all: opaque
        (b"just text\r\n", []),
    ],
)
def test_multipart_delimiters(body: bytes, expected: list[bytes]) -> None:
    message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body
    top = parse(message)
    assert [message[child.start : child.end] for child in top.children] == expected


def test_header_block_without_an_empty_line_and_digest_defaults() -> None:
    no_blank = b"Subject: x\r\nnot a header line\r\nmore\r\n"
    top = parse(no_blank)
    assert [f.name for f in top.fields] == ["Subject"]
    assert no_blank[top.body_start :] == b"not a header line\r\nmore\r\n"
    digest = b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: inner\r\n\r\nhi\r\n--d--\r\n"
    (child,) = parse(digest).children
    assert child.content_type == "message/rfc822"
    assert child.children[0].field("subject") is not None


def test_splice_replaces_inserts_in_order_and_refuses_overlaps() -> None:
    assert splice(b"abcdef", [(4, 5, b"E"), (0, 0, b"1"), (0, 0, b"2"), (1, 3, b"")]) == b"12adEf"
    with pytest.raises(ValueError, match="overlaps"):
        splice(b"abcdef", [(0, 3, b""), (2, 4, b"")])


def test_fold_field() -> None:
    value = "external sender: " + " ".join(f"word{i}" for i in range(40))
    folded = fold_field("X-Warning", value)
    lines = folded.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) <= 78 for line in lines)
    assert lines[1].startswith(b" ")
    assert folded[len("X-Warning: ") : -2].replace(b"\r\n", b"").decode() == value  # unfolds exactly
    assert fold_field("X-Long", "a" * 100) == b"X-Long: " + b"a" * 100 + b"\r\n"  # a word is never cut
    encoded = fold_field("X-Note", "Grüße aus Köln, " * 6)
    assert encoded.isascii() and all(len(line) <= 78 for line in encoded.split(b"\r\n"))
    assert str(parsed(encoded + b"\r\n")["X-Note"]) == "Grüße aus Köln, " * 6
    for bad in ("X Bad", "X:Bad", "Ünicode", ""):
        with pytest.raises(ValueError):
            fold_field(bad, "v")
    with pytest.raises(ValueError, match="line break"):
        fold_field("X-Inject", "a\r\nBcc: evil@example.net")


# --- configuration -----------------------------------------------------------------------------------


def test_factory_builds_from_toml_through_the_registry() -> None:
    config = parse_config(
        PREAMBLE
        + """
[[hook]]
use = "rewrite"
name = "defang"
max_added = 300
[[hook.rule]]
when_spam = true
when_users = "@example.org"
when_header = [{ name = "From", matches = "(?i)@partner\\\\.example>?$" }]
unless_header = [{ name = "X-Warning" }]
when_verdict = [{ hook = "rspamd", spam = true, min_score = 5, action = "add header" }]
remove_header = ["X-Mailer", "x-originating-ip"]
remove_header_matching = "^X-Spam-"
set_header = "X-Spam-Flag: YES"
add_header = ["X-Warning: external", "X-Other: 1"]
subject_prefix = "[SPAM] "
[[hook.rule.replace]]
pattern = "(?i)\\\\bhttp(s?)://"
with = "hxxp\\\\1://"
in = ["text/html"]
attachments = true
[[hook.rule]]
add_header = "X-Seen: yes"
""",
        CONFIG_PATH,
    )
    (built,) = build_hooks(config)
    hook = built.hook
    assert built.is_message_hook and not built.is_session_hook
    assert isinstance(hook, RewriteHook)
    assert (hook.name, hook.reservation, len(hook.rules)) == ("defang", 300, 2)
    first = hook.rules[0]
    assert first.when_users == ("@example.org",)
    assert first.remove_header == {"x-mailer", "x-originating-ip"}
    assert first.set_header == (("x-spam-flag", b"X-Spam-Flag: YES\r\n"),)
    assert first.add_header == (b"X-Warning: external\r\n", b"X-Other: 1\r\n")
    assert first.when_verdict[0].actions == ("add header",) and first.when_verdict[0].min_score == 5.0
    (replacement,) = first.replace
    assert replacement.types == {"text/html"} and replacement.attachments
    assert replacement.pattern.sub(replacement.template, "HTTPS://x") == "hxxpS://x"


def test_max_added_defaults_to_512() -> None:
    assert rule('add_header = "X-A: 1"').reservation == 512
    hook = build('[[hook]]\nuse = "rewrite"\n[[hook.rule]]\nadd_header = "X-A: 1"\n')
    assert hook.reservation == 512


HOOK = '[[hook]]\nuse = "rewrite"\n'


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        (HOOK, "hook[0].rule", "at least one"),
        (HOOK + "max_added = -1\n[[hook.rule]]\nadd_header = 'X: 1'\n", "hook[0].max_added", "at least 0"),
        (HOOK + "colour = 'red'\n[[hook.rule]]\nadd_header = 'X: 1'\n", "hook[0].colour", "unknown key"),
        (HOOK + "[[hook.rule]]\n", "hook[0].rule[0]", "at least one action"),
        (HOOK + "[[hook.rule]]\nwhen_spam = true\n", "hook[0].rule[0]", "at least one action"),
        (HOOK + "[[hook.rule]]\nadd_header = 'X: 1'\nadd_headers = 'Y: 2'\n", "hook[0].rule[0].add_headers", "unknown"),
        (HOOK + "[[hook.rule]]\nadd_header = 'X-Warning'\n", "hook[0].rule[0].add_header", '"Name: value"'),
        (HOOK + "[[hook.rule]]\nadd_header = ['X: 1', 'Bad Name: 2']\n", "hook[0].rule[0].add_header[1]", "not a header"),
        (HOOK + "[[hook.rule]]\nadd_header = []\n", "hook[0].rule[0].add_header", "empty"),
        (HOOK + "[[hook.rule]]\nadd_header = 7\n", "hook[0].rule[0].add_header", "must be"),
        (HOOK + "[[hook.rule]]\nset_header = 'From: Jörg <j@example.org>'\n", "hook[0].rule[0].set_header", "RFC 2047"),
        (HOOK + "[[hook.rule]]\nremove_header = 'Content-Type'\n", "hook[0].rule[0].remove_header", "body"),
        (HOOK + "[[hook.rule]]\nset_header = 'MIME-Version: 2.0'\n", "hook[0].rule[0].set_header", "body"),
        (HOOK + "[[hook.rule]]\nremove_header_matching = '(unclosed'\n", "hook[0].rule[0].remove_header_matching",
         "regular expression"),
        (HOOK + "[[hook.rule]]\nsubject_prefix = ''\n", "hook[0].rule[0].subject_prefix", "empty"),
        (HOOK + "[[hook.rule]]\nsubject_prefix = \"[X]\\n\"\n", "hook[0].rule[0].subject_prefix", "line break"),
        (HOOK + "[[hook.rule]]\nsubject_prefix = '" + "ü" * 40 + "'\n", "hook[0].rule[0].subject_prefix", "75"),
        (HOOK + "[[hook.rule]]\nwhen_users = ['bob', 'a b']\nadd_header = 'X: 1'\n", "hook[0].rule[0].when_users[1]",
         "user name"),
        (HOOK + "[[hook.rule]]\nwhen_spam = 'yes'\nadd_header = 'X: 1'\n", "hook[0].rule[0].when_spam", "boolean"),
        (HOOK + "[[hook.rule]]\nwhen_header = { name = 'From' }\nadd_header = 'X: 1'\n", "hook[0].rule[0].when_header",
         "when_header = [{ ... }]"),
        (HOOK + "[[hook.rule]]\nwhen_header = [{ name = 'From', matches = '[' }]\nadd_header = 'X: 1'\n",
         "hook[0].rule[0].when_header[0].matches", "regular expression"),
        (HOOK + "[[hook.rule]]\nwhen_header = [{ name = 'From', match = 'x' }]\nadd_header = 'X: 1'\n",
         "hook[0].rule[0].when_header[0].match", "unknown"),
        (HOOK + "[[hook.rule]]\nwhen_verdict = [{ spam = true }]\nadd_header = 'X: 1'\n",
         "hook[0].rule[0].when_verdict[0].hook", "required"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = '(?P<x>a'\nwith = ''\n",
         "hook[0].rule[0].replace[0].pattern", "regular expression"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = ''\nwith = 'x'\n",
         "hook[0].rule[0].replace[0].pattern", "empty"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = 'a'\n", "hook[0].rule[0].replace[0].with", "required"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = '(a)'\nwith = '\\2'\n",
         "hook[0].rule[0].replace[0].with", "replacement"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = '(a)'\nwith = '\\g<name>'\n",
         "hook[0].rule[0].replace[0].with", "replacement"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = 'a'\nwith = 'b'\nin = ['text/calendar']\n",
         "hook[0].rule[0].replace[0].in[0]", "text/plain"),
        (HOOK + "[[hook.rule]]\n[[hook.rule.replace]]\npattern = 'a'\nwith = 'b'\nin = []\n",
         "hook[0].rule[0].replace[0].in", "empty"),
        (HOOK + "[[hook]]\nuse = 'rewrite'\nname = 'two'\n[[hook.rule]]\n[[hook.rule.replace]]\npattern = 'a'\n"
         "with = 'b'\nattachment = true\n", "hook[1].rule[0].replace[0].attachment", "unknown"),
    ],
)
def test_configuration_errors_name_the_key(toml: str, key: str, reason: str) -> None:
    if toml.count("[[hook]]") == 2:  # the error is in the second hook; make the first one valid
        toml = toml.replace("[[hook]]\nuse = 'rewrite'", "[[hook.rule]]\nadd_header = 'X: 1'\n[[hook]]\nuse = 'rewrite'", 1)
    error = config_error(toml)
    assert (error.key, error.path) == (key, str(CONFIG_PATH))
    assert reason in error.reason


def test_verbose_patterns_with_comments_and_named_groups_are_accepted() -> None:
    hook = rule("[[hook.rule.replace]]\npattern = '''(?x) (?P<scheme>http) :// # the scheme'''\nwith = '\\g<scheme>[:]//'\n")
    assert rewrite(hook, SIMPLE).endswith(b"Visit http[:]//example.net/ now.\r\nBye\r\n")


# --- header edits ------------------------------------------------------------------------------------


def test_add_header_goes_on_top_and_nothing_else_moves() -> None:
    ctx = context()
    out = rewrite(rule('add_header = ["X-Warning: external", "X-Second: 2"]'), SIMPLE, ctx)
    assert out == b"X-Warning: external\r\nX-Second: 2\r\n" + SIMPLE
    assert ctx.verdicts["rewrite"] == Verdict(hook="rewrite", details={"rules": [0]})


def test_remove_header_takes_continuation_lines_with_it() -> None:
    out = rewrite(rule('remove_header = ["x-spam-report", "RECEIVED"]'), SIMPLE)
    assert out == SIMPLE.replace(
        b"X-Spam-Report: a long report\r\n  that is folded\r\n\tover three lines\r\n", b""
    ).replace(b"Received: from mx.example.net by pop.example.org;\r\n\tMon, 1 Jan 2024 10:00:00 +0000\r\n", b"")


def test_remove_header_matching_is_a_case_insensitive_search_in_names() -> None:
    out = rewrite(rule('remove_header_matching = ["^x-spam-", "mailer$"]'), SIMPLE)
    assert b"X-Spam" not in out and b"X-Mailer" not in out
    assert out.endswith(b"Subject: Hello there\r\nMessage-ID: <1@example.net>\r\n\r\nVisit http://example.net/ now.\r\nBye\r\n")
    message = b"Content-Type: text/plain\r\nX-C: 1\r\n\r\nbody\r\n"
    assert rewrite(rule('remove_header_matching = "^(content|x)-"'), message) == b"Content-Type: text/plain\r\n\r\nbody\r\n"


def test_set_header_replaces_in_place_drops_duplicates_or_adds() -> None:
    hook = rule('set_header = "X-Spam-Report: none"')
    out = rewrite(hook, SIMPLE)
    assert out == SIMPLE.replace(
        b"X-Spam-Report: a long report\r\n  that is folded\r\n\tover three lines\r\n", b"X-Spam-Report: none\r\n"
    )
    doubled = b"X-Flag: a\r\nSubject: s\r\nx-flag: b\r\n\tcontinued\r\n\r\nbody\r\n"
    assert rewrite(rule('set_header = "X-Flag: YES"'), doubled) == b"X-Flag: YES\r\nSubject: s\r\n\r\nbody\r\n"
    assert rewrite(rule('set_header = "X-New: 1"'), SIMPLE) == b"X-New: 1\r\n" + SIMPLE
    ctx = context()
    assert rewrite(rule('set_header = "X-Mailer: Frobnicator 2.0"'), SIMPLE, ctx) == SIMPLE  # already so
    assert "rewrite" not in ctx.verdicts


def test_new_headers_are_folded_and_encoded() -> None:
    value = "this message comes from outside the organisation; " * 3
    out = rewrite(rule(f'add_header = "X-Warning: {value}"\nset_header = "X-Hinweis: Äußerst verdächtig"'), SIMPLE)
    header_block = out.split(b"\r\n\r\n")[0]
    assert header_block.isascii()
    assert all(len(line) <= 78 for line in header_block.split(b"\r\n"))
    message = parsed(out)
    assert message["X-Warning"] == value.strip()
    assert message["X-Hinweis"] == "Äußerst verdächtig"
    assert out.endswith(SIMPLE)


def test_an_empty_header_block_and_a_message_without_one() -> None:
    assert rewrite(rule('add_header = "X-A: 1"'), b"\r\nbody\r\n") == b"X-A: 1\r\n\r\nbody\r\n"
    assert rewrite(rule('remove_header = "Subject"'), b"Subject: s\r\n\r\nbody\r\n") == b"\r\nbody\r\n"


# --- the subject prefix ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        b"Subject: Hello there\r\n",
        b"Subject:Hello\r\n",
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus K=?utf-8?q?=C3=B6?=ln\r\n",
        b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n",
        b"Subject:\r\n =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?q?_und_mehr?=\r\n",
        b"Subject: " + b"word " * 14 + b"end\r\n",
        b"Subject: a long first line that is already quite close to the limit of 78 co\r\n lumns\r\n",
    ],
)
@pytest.mark.parametrize("prefix", ["[SPAM] ", "[SPAM]", "***Spam*** ", "[Verdächtig] ", "[Späm]"])
def test_subject_prefix_reads_as_prefix_plus_the_old_subject(subject: bytes, prefix: str) -> None:
    message = b"From: a@example.net\r\n" + subject + b"To: b@example.org\r\n\r\nbody\r\n"
    before = str(parsed(message)["Subject"]).lstrip()  # email keeps a continuation line's leading space
    out = rewrite(rule(f'subject_prefix = "{prefix}"'), message)
    after = str(parsed(out)["Subject"])
    if prefix.endswith(" "):
        assert after == prefix + before
        assert all(len(line) <= 78 for line in out.split(b"\r\n"))
    else:  # glued on where RFC 2047 allows it, else after a space
        assert after in (prefix + before, prefix + " " + before)
    assert out.startswith(b"From: a@example.net\r\n") and out.endswith(b"To: b@example.org\r\n\r\nbody\r\n")
    assert out.isascii()
    # and once is enough
    assert rewrite(rule(f'subject_prefix = "{prefix}"'), out) == out


@pytest.mark.parametrize(
    ("prefix", "subject", "expected"),
    [
        ("[SPAM] ", b"Subject: Hi", b"Subject: [SPAM] Hi"),
        ("[SPAM]", b"Subject: Hi", b"Subject: [SPAM]Hi"),
        ("[SPAM]", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"Subject: [SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?="),
        ("[Späm] ", b"Subject: Hi", b"Subject: =?utf-8?b?W1Nww6RtXQ==?= Hi"),  # base64 is shorter here
        ("[Späm] ", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"Subject: =?utf-8?b?W1Nww6RtXSA=?= =?utf-8?q?Gr=C3=BC=C3=9Fe?="),
        ("[Spam!] ", b"Subject: Hi", b"Subject: [Spam!] Hi"),
        ("[Spam für dich] ", b"Subject: Hi", b"Subject: =?utf-8?q?=5BSpam_f=C3=BCr_dich=5D?= Hi"),
        ("[SPAM] ", b"Subject:\r\n =?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"Subject: [SPAM]\r\n =?utf-8?q?Gr=C3=BC=C3=9Fe?="),
        ("[SPAM] ", b"Subject: " + b"x" * 66 + b" y", b"Subject: [SPAM]\r\n " + b"x" * 66 + b" y"),
    ],
)
def test_subject_prefix_bytes(prefix: str, subject: bytes, expected: bytes) -> None:
    out = rewrite(rule(f'subject_prefix = "{prefix}"'), subject + b"\r\n\r\nbody\r\n")
    assert out == expected + b"\r\n\r\nbody\r\n"


def test_subject_prefix_on_every_subject_and_on_a_missing_or_empty_one() -> None:
    two = b"Subject: one\r\nSubject: two\r\n\r\nbody\r\n"
    assert rewrite(rule('subject_prefix = "[X] "'), two) == b"Subject: [X] one\r\nSubject: [X] two\r\n\r\nbody\r\n"
    assert rewrite(rule('subject_prefix = "[X] "'), b"From: a\r\n\r\nb\r\n") == b"Subject: [X]\r\nFrom: a\r\n\r\nb\r\n"
    assert rewrite(rule('subject_prefix = "[X] "'), b"Subject:\r\n\r\nb\r\n") == b"Subject: [X]\r\n\r\nb\r\n"
    assert rewrite(rule('subject_prefix = "[X] "'), b"Subject: \r\n\r\nb\r\n") == b"Subject: [X]\r\n\r\nb\r\n"


# --- conditions --------------------------------------------------------------------------------------

SPAM = Verdict(hook="rspamd", spam=True, score=12.5, threshold=6.0, action="add header")
HAM = Verdict(hook="rspamd", spam=False, score=0.5, threshold=6.0, action="no action")


@pytest.mark.parametrize(
    ("condition", "ctx", "applies"),
    [
        ("when_spam = true", context(None, SPAM), True),
        ("when_spam = true", context(None, HAM), False),
        ("when_spam = true", context(None), False),
        ("when_spam = false", context(None, HAM), True),
        ("when_spam = false", context(None, SPAM), False),
        ("when_verdict = [{ hook = 'rspamd' }]", context(None, HAM), True),
        ("when_verdict = [{ hook = 'spamassassin' }]", context(None, SPAM), False),
        ("when_verdict = [{ hook = 'rspamd', min_score = 12.5 }]", context(None, SPAM), True),
        ("when_verdict = [{ hook = 'rspamd', min_score = 13 }]", context(None, SPAM), False),
        ("when_verdict = [{ hook = 'rspamd', action = ['reject', 'add header'] }]", context(None, SPAM), True),
        ("when_verdict = [{ hook = 'rspamd', action = 'reject' }]", context(None, SPAM), False),
        ("when_verdict = [{ hook = 'rspamd', spam = false }]", context(None, SPAM), False),
        ("when_users = ['@EXAMPLE.org']", context("alice@example.org"), True),
        ("when_users = ['@example.org']", context("alice@sub.example.org"), False),
        # Entries are normalised as the session's user is ([routing] user_case, "lower" here):
        ("when_users = ['Alice@Example.ORG']", context("alice@example.org"), True),
        ("when_users = 'bob'", context("bob"), True),
        ("when_users = ['@example.org']", context("example.org"), False),
        ("when_users = ['@example.org']", context(None), False),
        ("when_header = [{ name = 'from', matches = '(?i)@PARTNER\\.example>$' }]", context(), True),
        ("when_header = [{ name = 'From', matches = '@partner\\.example$' }]", context(), False),
        ("when_header = [{ name = 'Subject', matches = '^Grüße from' }]", context(), True),  # decoded
        ("when_header = [{ name = 'X-Absent' }]", context(), False),
        ("when_header = [{ name = 'To' }, { name = 'From', matches = 'alice' }]", context(), True),
        ("when_header = [{ name = 'To' }, { name = 'From', matches = 'bob' }]", context(), False),
        ("unless_header = [{ name = 'X-Absent' }]", context(), True),
        ("unless_header = [{ name = 'MIME-Version' }]", context(), False),
        ("unless_header = [{ name = 'MIME-Version', matches = '^2' }]", context(), True),
        ("when_spam = true\nwhen_users = '@example.org'", context("x@example.org", SPAM), True),
        ("when_spam = true\nwhen_users = '@example.org'", context("x@example.com", SPAM), False),
    ],
)
def test_conditions(condition: str, ctx: MessageContext, applies: bool) -> None:
    out = rewrite(rule(f'{condition}\nadd_header = "X-Hit: 1"'), MIXED, ctx)
    assert out == (b"X-Hit: 1\r\n" + MIXED if applies else MIXED)
    assert ("rewrite" in ctx.verdicts) is applies


def test_rules_run_in_order_each_on_what_the_one_before_left() -> None:
    hook = build(
        HOOK
        + """
[[hook.rule]]
when_spam = true
add_header = "X-Warning: spam"
[[hook.rule]]
unless_header = [{ name = "X-Warning" }]
add_header = "X-Warning: clean"
[[hook.rule]]
when_header = [{ name = "X-Warning", matches = "spam" }]
subject_prefix = "[SPAM] "
"""
    )
    spam = context("u", SPAM)
    out = rewrite(hook, SIMPLE, spam)
    assert out == b"X-Warning: spam\r\n" + SIMPLE.replace(b"Subject: Hello", b"Subject: [SPAM] Hello")
    assert spam.verdicts["rewrite"].details == {"rules": [0, 2]}
    ham = context("u", HAM)
    assert rewrite(hook, SIMPLE, ham) == b"X-Warning: clean\r\n" + SIMPLE
    assert ham.verdicts["rewrite"].details == {"rules": [1]}


# --- text replacement --------------------------------------------------------------------------------

DEFANG = '[[hook.rule.replace]]\npattern = "http://"\nwith = "hxxp://"\n'


def test_replace_touches_inline_text_parts_only_and_nothing_else() -> None:
    ctx = context()
    out = rewrite(rule(DEFANG), MIXED, ctx)
    before, after = parts_by_section(MIXED), parts_by_section(out)
    assert before.keys() == after.keys()
    changed = {section for section in before if before[section] != after[section]}
    assert changed == {"1.1", "1.2", "5"}
    # Outside the changed parts, every byte is where it was: cut the changed bodies out and compare.
    top_before, top_after = parse(MIXED), parse(out)
    bodies = {p.section: p for p, _ in walk(top_before) if not p.children and p.section in changed}
    bodies_after = {p.section: p for p, _ in walk(top_after) if not p.children and p.section in changed}
    assert splice(MIXED, [(p.body_start, p.end, b"") for p in bodies.values()]) == splice(
        out, [(p.body_start, p.end, b"") for p in bodies_after.values()]
    )
    message = parsed(out)
    texts = [
        part.get_content().replace("\r\n", "\n") for part in message.walk() if part.get_content_type() == "text/plain"
    ]
    assert texts[0] == (
        "Grüße,\n\nthe report is at hxxp://example.net/a and the rest stays.\n"
        "A line that does not change = kept as encoded, even if  \n€ 5"
    )
    assert texts[1] == "GET http://example.net/a 200"  # the attachment
    assert texts[3] == "Café hxxp://example.net/latin"
    html = next(part for part in message.walk() if part.get_content_type() == "text/html")
    assert html.get_content() == (HTML * 3).replace("http://", "hxxp://")
    assert b"epilogue http://example.net/epilogue" in out
    assert ctx.verdicts["rewrite"].details == {"rules": [0]}


def test_quoted_printable_rewrites_only_the_lines_that_changed() -> None:
    out = rewrite(rule(DEFANG), MIXED)
    part = next(p for p, _ in walk(parse(out)) if p.section == "1.1")
    assert out[part.body_start : part.end] == (
        b"Gr=C3=BC=C3=9Fe,\r\n"
        b"\r\n"
        b"the report is at hxxp://example.net/a and the rest stays.\r\n"
        b"A line that does not change =3D kept as encoded, even if  \r\n"
        b"=E2=82=AC 5"
    )


def test_base64_keeps_its_line_length_and_line_ending() -> None:
    out = rewrite(rule(DEFANG), MIXED)
    part = next(p for p, _ in walk(parse(out)) if p.section == "1.2")
    body = out[part.body_start : part.end]
    lines = body.split(b"\r\n")
    assert len(lines) > 3 and all(len(line) == 76 for line in lines[:-1]) and len(lines[-1]) <= 76
    assert base64.b64decode(body).decode("utf-8") == (HTML * 3).replace("http://", "hxxp://")


def test_attachments_only_when_asked() -> None:
    out = rewrite(rule(DEFANG + "attachments = true\n"), MIXED)
    before, after = parts_by_section(MIXED), parts_by_section(out)
    assert {s for s in before if before[s] != after[s]} == {"1.1", "1.2", "3", "4", "5"}
    assert before["2"] == after["2"]  # the PNG: not text
    assert b"GET hxxp://example.net/a 200" in out and b"Old link: hxxp://example.net/old" in out


def test_replace_in_html_only() -> None:
    out = rewrite(rule(DEFANG + 'in = ["text/html"]\n'), MIXED)
    before, after = parts_by_section(MIXED), parts_by_section(out)
    assert {s for s in before if before[s] != after[s]} == {"1.2"}


def test_a_message_that_is_one_text_part() -> None:
    ctx = context()
    out = rewrite(rule(DEFANG), SIMPLE, ctx)
    assert out == SIMPLE.replace(b"Visit http://", b"Visit hxxp://")
    assert ctx.verdicts["rewrite"].details == {"rules": [0]}


@pytest.mark.parametrize(
    ("charset", "encoding", "body", "replacement", "expected"),
    [
        ("iso-8859-1", "8bit", b"Caf\xe9 X\r\n", "é", b"Caf\xe9 \xe9\r\n"),
        ("iso-8859-1", "quoted-printable", b"Caf=E9 X\r\n", "é", b"Caf=E9 =E9\r\n"),
        ("windows-1252", "8bit", b"\x80 X\r\n", "€", b"\x80 \x80\r\n"),
        ("utf-8", "8bit", b"\xe2\x82\xac X\r\n", "€", b"\xe2\x82\xac \xe2\x82\xac\r\n"),
        ("utf-8", "7bit", b"plain X\r\n", "ascii", b"plain ascii\r\n"),
        # octets that are not us-ascii survive a change to their line (surrogateescape)
        (None, "8bit", b"raw \xff\xfe X\r\n", "ok", b"raw \xff\xfe ok\r\n"),
        ("shift_jis", "8bit", "日本 X\r\n".encode("shift_jis"), "語", "日本 語\r\n".encode("shift_jis")),
        ("iso-2022-jp", "7bit", "日本 X\r\n".encode("iso-2022-jp"), "語", "日本 語\r\n".encode("iso-2022-jp")),
    ],
)
def test_charsets_and_encodings(
    charset: str | None, encoding: str, body: bytes, replacement: str, expected: bytes
) -> None:
    params = f"; charset={charset}" if charset else ""
    head = f"Content-Type: text/plain{params}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode()
    out = rewrite(rule(f'[[hook.rule.replace]]\npattern = "X"\nwith = "{replacement}"\n'), head + body)
    assert out == head + expected


@pytest.mark.parametrize(
    ("charset", "encoding", "body", "replacement", "reason"),
    [
        ("iso-8859-1", "8bit", b"Caf\xe9 X\r\n", "€", "cannot be encoded in iso8859-1"),
        ("us-ascii", "8bit", b"X\r\n", "é", "cannot be encoded in ascii"),
        ("utf-8", "7bit", b"X\r\n", "é", "8-bit octets in a 7bit part"),
        ("x-made-up", "8bit", b"X\r\n", "y", "unknown charset 'x-made-up'"),
        ("utf-8", "x-uuencode", b"X\r\n", "y", "unknown Content-Transfer-Encoding 'x-uuencode'"),
        ("utf-16", "8bit", "X".encode("utf-16"), "y", "needs base64"),
        ("utf-8", "base64", b"not base64!\r\n", "y", "malformed base64"),
        ("utf-8", "8bit", b"X" + b"a" * 990 + b"\r\n", "bbbbbbbbbbb", "longer than 998"),
    ],
)
def test_parts_that_cannot_take_a_replacement_are_left_alone_and_named(
    charset: str, encoding: str, body: bytes, replacement: str, reason: str
) -> None:
    message = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        + f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode()
        + body
        + b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nX\r\n--b--\r\n"
    )
    ctx = context()
    out = rewrite(rule(f'[[hook.rule.replace]]\npattern = "X"\nwith = "{replacement}"\n'), message, ctx)
    if replacement.isascii():
        assert out == message.replace(b"\r\n\r\nX\r\n--b--", f"\r\n\r\n{replacement}\r\n--b--".encode())
    else:
        assert out == message  # the us-ascii part 2 cannot take it either
    details = ctx.verdicts["rewrite"].details
    assert any(item.startswith("rule 0: part 1 (text/plain): ") and reason in item for item in details["skipped"])


def test_utf16_in_base64_round_trips() -> None:
    text = "Hello X\r\nSecond X line\r\n"
    body = base64.encodebytes(text.encode("utf-16")).replace(b"\n", b"\r\n")
    head = b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    out = rewrite(rule('[[hook.rule.replace]]\npattern = "X"\nwith = "Y"\n'), head + body)
    assert base64.b64decode(out[len(head) :]).decode("utf-16") == text.replace("X", "Y")


def test_base64_text_with_lf_line_ends_keeps_them() -> None:
    text = "one X\ntwo X\n"
    head = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    message = head + base64.b64encode(text.encode()) + b"\r\n"
    out = rewrite(rule('[[hook.rule.replace]]\npattern = "X$"\nwith = "Y\\nZ"\n'), message)
    assert base64.b64decode(out[len(head) :]) == b"one Y\nZ\ntwo Y\nZ\n"


def test_patterns_see_one_line_at_a_time_and_line_breaks_become_crlf() -> None:
    message = b"Content-Type: text/plain\r\n\r\nfirst\r\n> quoted\r\nlast\r\n"
    out = rewrite(rule("[[hook.rule.replace]]\npattern = '^> (.*)$'\nwith = '[\\1]\\n--'\n"), message)
    assert out == b"Content-Type: text/plain\r\n\r\nfirst\r\n[quoted]\r\n--\r\nlast\r\n"
    crossing = rule("[[hook.rule.replace]]\npattern = 'first\\s+>'\nwith = 'x'\n")
    assert rewrite(crossing, message) == message


def test_quoted_printable_soft_breaks_and_long_lines() -> None:
    long_line = "word " * 30 + "http://example.net/" + "x" * 60
    encoded = binascii.b2a_qp(long_line.encode(), istext=False).replace(b"\n", b"\r\n")
    head = b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    message = head + encoded + b"\r\nnext line\r\n"
    out = rewrite(rule(DEFANG), message)
    assert all(len(line) <= 76 for line in out.split(b"\r\n"))
    assert parsed(out).get_content() == long_line.replace("http://", "hxxp://") + "\r\nnext line\r\n"
    assert out.endswith(b"\r\nnext line\r\n")


def test_a_line_starting_with_a_dot_survives() -> None:
    """The proxy dot-stuffs after the hooks; the hook itself must neither stuff nor drop dots."""
    message = b"Subject: s\r\n\r\nfirst\r\nSTOP\r\n.already a dot line\r\n"
    out = rewrite(rule("[[hook.rule.replace]]\npattern = '^STOP$'\nwith = '.\\n..\\n.x'\n"), message)
    assert out == b"Subject: s\r\n\r\nfirst\r\n.\r\n..\r\n.x\r\n.already a dot line\r\n"
    head = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    out = rewrite(rule("[[hook.rule.replace]]\npattern = '^STOP$'\nwith = '.\\n.x'\n"), head + b"STOP\r\n")
    assert out == head + b"=2E\r\n.x\r\n"  # a lone "." is spelled =2E, as binascii does: the same text
    assert parsed(out).get_content() == ".\r\n.x\r\n"


def test_replacement_growth_is_limited_by_max_added() -> None:
    message = b"Subject: s\r\n\r\n" + b"http://x\r\n" * 10  # +10 octets with "hxxxp://"
    hook = rule("[[hook.rule.replace]]\npattern = 'http://'\nwith = 'hxxxp://'\n", max_added=10)
    assert rewrite(hook, message) == message.replace(b"http://", b"hxxxp://")
    tight = rule("[[hook.rule.replace]]\npattern = 'http://'\nwith = 'hxxxp://'\n", max_added=9)
    with pytest.raises(RewriteTooLarge, match=r"rules \[0\] would grow message 1 by 10 octets, more than max_added = 9"):
        tight.process(message, context())
    shrinking = rule('remove_header = "Subject"\nadd_header = "X-Longer-Than-Subject: 1"', max_added=0)
    with pytest.raises(RewriteTooLarge):
        shrinking.process(message, context())
    assert rule('remove_header = "Subject"', max_added=0).process(message, context()) == message[12:]


def test_no_matching_rule_means_the_same_bytes_and_no_verdict() -> None:
    hook = build(
        HOOK
        + """
[[hook.rule]]
when_spam = true
add_header = "X-Spam: yes"
[[hook.rule]]
unless_header = [{ name = "From" }]
subject_prefix = "Grüße"
[[hook.rule]]
remove_header = "X-Absent"
[[hook.rule.replace]]
pattern = "never-present"
with = "x"
attachments = true
"""
    )
    for message in (SIMPLE, MIXED):
        ctx = context()
        assert hook.process(message, ctx) is message  # not even a copy
        assert ctx.verdicts == {}


def test_stage_and_ordering_are_left_to_the_configuration() -> None:
    (built,) = build_hooks(parse_config(PREAMBLE + HOOK + "[[hook.rule]]\nadd_header = 'X: 1'\n", CONFIG_PATH))
    assert getattr(built.hook, "stage", None) is None
    assert ordered([built]) == [built]


# --- properties --------------------------------------------------------------------------------------

# Body lines never start with "-", so that no body line can be a delimiter line.
_line = st.text(
    st.characters(codec="latin-1", exclude_characters="\r\n-", exclude_categories=["Cc"]), max_size=40
) | st.sampled_from(["", " ", ".", "..", "MARK", "a MARK b", "=", "=3D", "From x", "x=", "\t"])
_lines = st.lists(_line, max_size=6)
_ws = st.sampled_from(["", " ", "\t", " \t "])

LEAF_TYPES = [
    ("text/plain", "us-ascii", "7bit"),
    ("text/plain", "utf-8", "8bit"),
    ("text/plain", "iso-8859-1", "quoted-printable"),
    ("text/plain", "utf-8", "base64"),
    ("text/html", "utf-8", "quoted-printable"),
    ("text/html", "windows-1252", "8bit"),
    ("application/octet-stream", None, "base64"),
    ("image/gif", None, "base64"),
    ("text/plain", "x-unknown", "8bit"),
    ("text/calendar", "utf-8", "7bit"),
]


@st.composite
def leaf(draw: st.DrawFn, index: int) -> tuple[bytes, list[bytes]]:
    """A leaf entity's bytes, and its extra headers (so that conditions have something to look at)."""
    content_type, charset, encoding = draw(st.sampled_from(LEAF_TYPES))
    text = "\r\n".join(draw(_lines))
    if draw(st.booleans()):
        text += "\r\n"
    raw = text.encode(charset if charset and charset != "x-unknown" else "latin-1", "replace")
    if encoding == "base64":
        body = base64.encodebytes(raw if charset else draw(st.binary(max_size=200))).replace(b"\n", b"\r\n")
    elif encoding == "quoted-printable":
        body = binascii.b2a_qp(raw, istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    else:
        body = raw if encoding == "8bit" else raw.decode("latin-1").encode("ascii", "replace")
    headers = []
    if draw(st.booleans()) or content_type != "text/plain":
        params = f"; charset={charset}" if charset else ""
        headers.append(f"Content-Type: {content_type}{params}".encode())
    if encoding != "7bit" or draw(st.booleans()):
        headers.append(f"Content-Transfer-Encoding: {encoding}".encode())
    if draw(st.booleans()):
        headers.append(draw(st.sampled_from([b"Content-Disposition: attachment; filename=f", b"Content-Disposition: inline"])))
    if draw(st.booleans()):
        headers.append(b"X-Note-" + str(index).encode() + b": folded\r\n\tvalue" + draw(_ws).encode())
    return b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body, headers


@st.composite
def entity(draw: st.DrawFn, depth: int = 0, counter: list[int] | None = None) -> tuple[bytes, list[tuple[int, int, int]]]:
    """An entity's bytes, and the ``(start, body_start, end)`` of it and each entity inside it, in
    ``walk`` order, relative to its own start."""
    counter = counter if counter is not None else [0]
    counter[0] += 1
    if depth >= 3 or draw(st.integers(0, 2)) < (1 if depth == 0 else 2):
        data, _ = draw(leaf(counter[0]))
        split = data.index(b"\r\n\r\n") + 4 if not data.startswith(b"\r\n") else 2
        return data, [(0, split, len(data))]
    boundary = draw(st.sampled_from(["b", "=_Part_", "simple boundary", "x'()+_,./:=?"])) + f"{counter[0]}z"
    head = f'Content-Type: multipart/{draw(st.sampled_from(["mixed", "alternative", "related"]))}; boundary="{boundary}"\r\n\r\n'
    out = bytearray(head.encode())
    spans: list[tuple[int, int, int]] = []
    preamble = "\r\n".join(draw(st.lists(_line, max_size=2)))
    if preamble:
        out += preamble.encode("latin-1") + b"\r\n"
    children = draw(st.lists(entity(depth + 1, counter), min_size=1, max_size=4))
    for child, child_spans in children:
        out += f"--{boundary}{draw(_ws)}\r\n".encode()
        spans += [(len(out) + s, len(out) + b, len(out) + e) for s, b, e in child_spans]
        out += child + b"\r\n"
    out += f"--{boundary}--{draw(_ws)}\r\n".encode()
    out += "\r\n".join(draw(st.lists(_line, max_size=2))).encode("latin-1")
    return bytes(out), [(0, len(head), len(out))] + spans


@st.composite
def message(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int, int]]]:
    top = b"From: someone@example.net\r\nSubject: " + draw(_line).encode("latin-1") + b"\r\n"
    data, spans = draw(entity())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
        spans[0] = (spans[0][0], spans[0][1], spans[0][2] + 2)
    shift = len(top)
    return top + data, [(0, spans[0][1] + shift, spans[0][2] + shift)] + [
        (s + shift, b + shift, e + shift) for s, b, e in spans[1:]
    ]


def _located(part: Part) -> list[tuple[int, int, int]]:
    return [(p.start, p.body_start, p.end) for p, _ in walk(part) if p.content_type != "message/rfc822"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message())
def test_parse_finds_exactly_the_generated_parts(generated: tuple[bytes, list[tuple[int, int, int]]]) -> None:
    data, spans = generated
    assert _located(parse(data)) == spans
    ours = [data[p.body_start : p.end] for p, _ in walk(parse(data)) if not p.children]
    theirs = [
        raw_payload(part)
        for part in email.message_from_bytes(data).walk()
        if not part.is_multipart()
    ]
    assert ours == theirs


NOTHING_MATCHES = build(
    HOOK
    + """
[[hook.rule]]
when_header = [{ name = "Subject", matches = "^never$" }]
add_header = "X-Never: 1"
[[hook.rule]]
unless_header = [{ name = "From" }]
subject_prefix = "[never] "
[[hook.rule]]
remove_header = "X-Absent"
remove_header_matching = "^X-Also-Absent-"
[[hook.rule.replace]]
pattern = "NEVER|^-{3}$"
with = "x"
attachments = true
"""
)
MARKING = build(
    HOOK
    + """
[[hook.rule]]
[[hook.rule.replace]]
pattern = "MARK"
with = "mark"
in = ["text/plain"]
"""
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message())
def test_without_a_matching_rule_the_output_is_the_input(generated: tuple[bytes, list[tuple[int, int, int]]]) -> None:
    data, _ = generated
    ctx = context()
    out = NOTHING_MATCHES.process(data, ctx)
    assert out == data
    if "rewrite" in ctx.verdicts:  # parts in x-unknown cannot be looked into: said so, but no rule applied
        assert ctx.verdicts["rewrite"].details["rules"] == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message())
def test_a_replacement_changes_only_the_parts_it_targets(generated: tuple[bytes, list[tuple[int, int, int]]]) -> None:
    data, _ = generated
    out = rewrite(MARKING, data)
    before, after = parse(data), parse(out)
    pairs = list(zip(walk(before), walk(after), strict=True))
    edits_before, edits_after = [], []
    for (old, in_attachment), (new, _) in pairs:
        if old.children:
            continue
        targeted = old.content_type == "text/plain" and not in_attachment
        if not targeted:
            assert data[old.start : old.end] == out[new.start : new.end]
        elif data[old.body_start : old.end] != out[new.body_start : new.end]:
            assert data[old.start : old.body_start] == out[new.start : new.body_start]
            edits_before.append((old.body_start, old.end, b""))
            edits_after.append((new.body_start, new.end, b""))
            assert b"MARK" in data[old.body_start : old.end] or b"MA=\r\nRK" in data[old.body_start : old.end] or (
                old.transfer_encoding == "base64"
            )
    assert splice(data, edits_before) == splice(out, edits_after)
    assert out.endswith(b"\r\n")


# --- large messages are rewritten in a thread --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_large_messages_are_rewritten_in_a_thread() -> None:
    body = b"see http://example.net/\r\n" * (THREAD_AT // 25 + 1)
    message = b"Subject: big\r\n\r\n" + body
    threads: list[str] = []
    hook = rule(DEFANG + '[[hook.rule]]\nadd_header = "X-Big: yes"\n', max_added=100)
    real_rewrite = hook.rewrite

    def rewrite_recording(message: bytes, context: MessageContext) -> tuple[bytes, list[int], list[str]]:
        threads.append(threading.current_thread().name)
        return real_rewrite(message, context)

    hook.rewrite = rewrite_recording  # type: ignore[method-assign]
    ctx = context()
    with pytest.raises(HookNotStarted):  # large rewrites need the thread pool of a started hook
        hook.process(message, ctx)
    hook.start(reactor)  # as the service does
    pending = hook.process(message, ctx)
    assert isinstance(pending, Deferred)
    out = await pending
    assert out == b"X-Big: yes\r\n" + message.replace(b"http://", b"hxxp://")
    assert threads and threads[0] != threading.main_thread().name
    assert ctx.verdicts["rewrite"].details == {"rules": [0, 1]}
    small = hook.process(SIMPLE, context())
    assert isinstance(small, bytes) and len(threads) == 2  # small ones at once, in this thread


@pytest_twisted.ensureDeferred
async def test_a_large_message_that_grows_too_much_fails_the_deferred() -> None:
    message = b"Subject: big\r\n\r\n" + b"http://\r\n" * (THREAD_AT // 9 + 1)
    hook = rule('[[hook.rule.replace]]\npattern = "http://"\nwith = "https://"\n', max_added=10)
    hook.start(reactor)
    ctx = context()
    pending = hook.process(message, ctx)
    assert isinstance(pending, Deferred)
    with pytest.raises(RewriteTooLarge):
        await pending
    assert ctx.verdicts == {}


def test_a_message_forwarded_inline_is_text_and_its_header_is_not_the_message_header() -> None:
    message = (
        b"Subject: fwd\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n"
        b"--m\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: inner\r\nX-Mailer: inner\r\n\r\nhttp://inner\r\n"
        b"--m--\r\n"
    )
    out = rewrite(rule('remove_header = "X-Mailer"\nsubject_prefix = "[F] "\n' + DEFANG), message)
    assert out == message.replace(b"http://inner", b"hxxp://inner").replace(b"Subject: fwd", b"Subject: [F] fwd")


def test_a_7bit_part_that_already_holds_8bit_octets_can_still_change() -> None:
    message = b"Content-Type: text/plain; charset=utf-8\r\n\r\nCaf\xc3\xa9 X\r\n"
    assert rewrite(rule('[[hook.rule.replace]]\npattern = "X"\nwith = "Y"\n'), message) == message.replace(b"X", b"Y")
