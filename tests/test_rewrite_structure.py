"""Issue 10, findings 1 and 2: whatever a message holds, the ``rewrite`` hook neither makes nor unmakes
MIME parts, and no message switches it off.

1. An edit never changes the MIME structure: CR and LF that were encoded stay encoded, a bare CR
   is a line break as for ``email``, a line that would start (or started) with the delimiter of an
   enclosing multipart (RFC 2046 §5.1.1) is left as it was, and so is a first body line that would
   become a header field where no empty line ends the header.
2. Nesting deeper than ``MAX_DEPTH`` is opaque, not a ``RecursionError``: header edits and the
   shallower parts are rewritten as usual.

The property test at the end generates hostile MIME messages and checks, with Python's ``email``
parser, that the rewritten message has the original's MIME tree and that parts no rule touched are
byte-for-byte the original's.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import email.policy
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.hooks.mimesplice import MAX_DEPTH, MAX_PARTS, parse, walk

from support.rewrite_hostile import (
    PDF,
    RULES,
    SMUGGLE_BOUNDARY,
    deep_message,
    message_context,
    mime_tree,
    rewrite_hook,
    smuggling_message,
)

DEFANG = rewrite_hook(RULES)


def rewritten(message: bytes, rules: str = RULES) -> tuple[bytes, dict[str, object]]:
    """The message as the hook delivers it, and the hook's verdict details (empty without one)."""
    context = message_context()
    out = (DEFANG if rules is RULES else rewrite_hook(rules)).process(message, context)
    assert isinstance(out, bytes)
    verdict = context.verdicts.get("rewrite")
    return out, dict(verdict.details) if verdict else {}


def texts(message: bytes) -> list[str]:
    """The decoded text of every text/plain part, in order."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    return [part.get_content() for part in parsed.walk() if part.get_content_type() == "text/plain"]


# --- finding 1: edits do not make MIME parts ----------------------------------------------------------


def test_encoded_crlf_in_an_edited_quoted_printable_line_stays_encoded() -> None:
    """The finding as reported: the line holding the link also holds ``=0D=0A--boundary=0D=0A`` and
    an executable's header. Edited, its CR and LF stay ``=0D=0A``: the client sees the text part and
    the PDF, as every scanner before did, and no ``application/x-msdownload``."""
    message = smuggling_message()
    out, details = rewritten(message)
    assert mime_tree(out) == mime_tree(message) == [(0, "multipart/mixed"), (1, "text/plain"), (1, "application/pdf")]
    assert b"\r\n--" + SMUGGLE_BOUNDARY.encode() + b"\r\nContent-Type: application/x-msdownload" not in out
    (text,) = texts(out)
    assert text.startswith("Please see the invoice at hxxp://invoices.example.com/4711 today.\r\n\r\n--")
    assert "http://" not in text and text == texts(message)[0].replace("http://", "hxxp://")
    assert details == {"rules": [0]}
    pdf = email.message_from_bytes(out).get_payload()[1]
    assert pdf.get_payload(decode=True) == PDF


BOUNDED = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"


def two_parts(text: bytes, head: bytes = b"Content-Type: text/plain\r\n\r\n") -> bytes:
    """``text`` as the body of part 1 of a multipart with boundary ``B``; part 2 is a PDF."""
    return (
        b"Subject: s\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n" + head + text
        + b"\r\n--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"%PDF") + b"\r\n--B--\r\n"
    )


UNQUOTE = '[[hook.rule]]\n[[hook.rule.replace]]\npattern = "^> ?"\nwith = ""\n'
BREAK = '[[hook.rule]]\n[[hook.rule.replace]]\npattern = " NL "\nwith = "\\n"\n'


def test_a_line_the_edit_would_turn_into_a_delimiter_is_left_as_it_was() -> None:
    """RFC 2046 §5.1.1: unquoting ``> --B`` would make a delimiter line (and a new part), a line
    break before ``--B--`` a close delimiter. Those lines stay; the others change."""
    message = two_parts(b"> first\r\n> --B\r\n> --B--\r\n> last")
    out, details = rewritten(message, UNQUOTE)
    assert mime_tree(out) == mime_tree(message)
    assert texts(out) == ["first\r\n> --B\r\n> --B--\r\nlast"]
    assert details["skipped"] == [
        "rule 0: part 1 (text/plain): 2 lines left as they were: changed, they could change the MIME "
        "structure (RFC 2046 §5.1.1)"
    ]
    out, _ = rewritten(two_parts(b"one NL --B--\r\ntwo NL three"), BREAK)
    assert texts(out) == ["one NL --B--\r\ntwo\r\nthree"]


def test_the_delimiters_of_every_enclosing_multipart_count() -> None:
    inner = (
        b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n--inner\r\n"
        b"Content-Type: text/plain\r\n\r\n> --B\r\n> --inner\r\n> --Bx\r\n> plain\r\n--inner--"
    )
    message = two_parts(b"", head=inner)
    out, _ = rewritten(message, UNQUOTE)
    assert mime_tree(out) == mime_tree(message)
    assert b"\r\n\r\n> --B\r\n> --inner\r\n> --Bx\r\nplain\r\n--inner--" in out


def test_a_line_that_already_starts_like_a_delimiter_is_not_edited() -> None:
    """``--Bhttp://...`` is no delimiter for ``email``, but RFC 2046 §5.1.1 forbids it as "the prefix
    of any line", and lenient parsers take it for one: it stays as it is."""
    message = two_parts(b"--Bhttp://a.example/\r\nhttp://b.example/")
    out, details = rewritten(message)
    assert b"\r\n--Bhttp://a.example/\r\nhxxp://b.example/\r\n--B\r\n" in out
    assert "1 line left as it was" in str(details["skipped"])


def test_a_bare_cr_is_a_line_break_as_for_email() -> None:
    """A bare CR before a delimiter ends the part, as ``email`` reads it: the parts are the ones the
    client sees, each edited as what it is."""
    head = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    message = two_parts(b"http://a.example/\r--B\rContent-Type: text/html\r\rhttp://b.example/", head=head)
    assert mime_tree(message) == [(0, "multipart/mixed"), (1, "text/plain"), (1, "text/html"), (1, "application/pdf")]
    out, _ = rewritten(message)
    assert mime_tree(out) == mime_tree(message)
    assert b"\r\n\r\nhxxp://a.example/\r--B\rContent-Type: text/html\r\rhxxp://b.example/\r\n--B\r\n" in out
    # Inside a line, it cuts the line for the patterns ("^" matches after it), and stays where it was.
    out, _ = rewritten(two_parts(b"a\r> b http://x\r\n", head=head), UNQUOTE)
    assert b"\r\n\r\na\rb http://x\r\n\r\n--B\r\n" in out
    # "." matches a CR: with the whole line as one text, the CR would become a line break.
    grouping = '[[hook.rule]]\n[[hook.rule.replace]]\npattern = "a(.*)"\nwith = "[\\\\1]"\n'
    out, _ = rewritten(two_parts(b"x ab\rc", head=head), grouping)
    assert b"\r\n\r\nx [b]\rc\r\n--B\r\n" in out


def test_a_new_line_in_quoted_printable_never_starts_with_a_hyphen() -> None:
    """RFC 2045 §6.7 (its closing note): an encoded line starting with "-" could be a delimiter. A
    line the edit makes, by a line break or a soft break, spells it ``=2D``."""
    head = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    message = two_parts(b"one NL --B--=0D=0A--B NL two", head=head)
    out, _ = rewritten(message, BREAK)
    assert mime_tree(out) == mime_tree(message)
    assert texts(out) == ["one\r\n--B--\r\n--B\r\ntwo"]
    assert b"\r\n\r\none\r\n=2D-B--=0D=0A--B\r\ntwo\r\n--B\r\n" in out
    # 75 characters up to the "--B": the soft break that keeps the line at 76 falls just before it.
    message = two_parts(b"x" * 68 + b"http:=\r\n//--B more", head=head)
    out, _ = rewritten(message)
    assert mime_tree(out) == mime_tree(message)
    assert texts(out) == ["x" * 68 + "hxxp://--B more"]
    assert b"\r\n" + b"x" * 68 + b"hxxp://=\r\n=2D-B more\r\n--B\r\n" in out


def test_base64_text_with_a_delimiter_in_it_stays_one_part() -> None:
    text = "see http://a.example/\r\n--B\r\nContent-Type: application/x-msdownload\r\n\r\nTVqQ\r\n"
    head = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    message = two_parts(base64.encodebytes(text.encode()).replace(b"\n", b"\r\n").rstrip(), head=head)
    out, _ = rewritten(message)
    assert mime_tree(out) == mime_tree(message)
    assert texts(out) == [text.replace("http://", "hxxp://")]


def test_a_body_after_a_header_without_an_empty_line_cannot_become_a_header() -> None:
    """RFC 2046 §5.1.1 wants an empty line after a part's header; without one, the body starts at
    the first line that is not a header field. Editing that line into a header field would give the
    part a new Content-Type."""
    rule = '[[hook.rule]]\n[[hook.rule.replace]]\npattern = "^Please open: "\nwith = ""\n'
    message = two_parts(b"Please open: Content-Type: application/x-msdownload\r\nPlease open: x", head=b"X-Part: 1\r\n")
    out, details = rewritten(message, rule)
    assert mime_tree(out) == mime_tree(message) == [(0, "multipart/mixed"), (1, "text/plain"), (1, "application/pdf")]
    assert b"X-Part: 1\r\nPlease open: Content-Type: application/x-msdownload\r\nx\r\n" in out
    assert "1 line left as it was" in str(details["skipped"])
    # A first line that some parser may read as a header field already: the part is left alone.
    message = two_parts(b":odd\r\nPlease open: x", head=b"X-Part: 1\r\n")
    out, details = rewritten(message, rule)
    assert out == message
    assert "no empty line ends the header" in str(details["skipped"])


# --- finding 2: deep nesting -------------------------------------------------------------------------


def test_500_nested_multiparts_are_rewritten_down_to_max_depth() -> None:
    """The finding as reported: 500 nested multiparts raised RecursionError, and with on_error =
    "pass" the message went out with no tag and live links. Now the tag and the header are added,
    the shallow link is defanged, and what lies deeper than MAX_DEPTH stays as it was, said so in
    the verdict."""
    message = deep_message(500)
    out, details = rewritten(message)
    assert out.startswith(b"X-Scanned: popproxy\r\n")
    assert b"\r\nSubject: [EXT] Deep news\r\n" in out
    assert b"Read hxxp://news.example.com/today now." in out
    assert b"http://deep.example.com/" in out  # deeper than MAX_DEPTH: opaque
    assert out.endswith(message[message.rindex(b"\r\n--n0\r\n") :])
    assert mime_tree(out) == mime_tree(message)
    section = ".".join(["2"] + ["1"] * (MAX_DEPTH - 1))
    reason = f"not looked into: its parts would be nested more than {MAX_DEPTH} levels deep"
    assert details == {"rules": [0], "skipped": [f"rule 0: part {section} (multipart/mixed): {reason}"]}


def test_parse_and_walk_need_no_recursion() -> None:
    top = parse(deep_message(5000))
    entities = list(walk(top))
    assert len(entities) == MAX_DEPTH + 2  # the top, part 1, and the chain down to the opaque one
    deepest = entities[-1][0]
    assert deepest.opaque and deepest.children == () and deepest.content_type == "multipart/mixed"


def test_at_max_depth_the_innermost_text_is_still_rewritten() -> None:
    out, details = rewritten(deep_message(MAX_DEPTH))
    assert b"hxxp://deep.example.com/" in out and "skipped" not in details


def test_more_than_max_parts_make_the_multipart_opaque() -> None:
    many = b"".join(b"--m\r\n\r\nhttp://x\r\n" for _ in range(MAX_PARTS))
    message = b"Subject: many\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n" + many + b"--m--\r\n"
    out, details = rewritten(message)
    assert out == b"X-Scanned: popproxy\r\n" + message.replace(b"Subject: many", b"Subject: [EXT] many")
    reason = f"not looked into: the message would hold more than {MAX_PARTS} parts"
    assert details["skipped"] == [f"rule 0: part body (multipart/mixed): {reason}"]
    fewer = message.replace(b"--m\r\n\r\nhttp://x\r\n", b"", 1)
    out, details = rewritten(fewer)
    assert out.count(b"hxxp://x") == MAX_PARTS - 1 and "skipped" not in details


# --- the property: same MIME tree, untouched parts untouched -------------------------------------------

PROPERTY_RULES = (
    RULES
    + '[[hook.rule.replace]]\npattern = "^> ?"\nwith = ""\n'
    + '[[hook.rule.replace]]\npattern = " ?NL ?"\nwith = "\\n"\n'
    + '[[hook.rule]]\n[[hook.rule.replace]]\npattern = "^.*?cut"\nwith = ""\nattachments = true\n'
)
PROPERTY_HOOK = rewrite_hook(PROPERTY_RULES, max_added=1 << 20)
#: What the rules look for; a part whose text holds none of it must come out unchanged.
TRIGGERS = re.compile(rb">|http://|NL|cut")
ATTACHMENT_TRIGGERS = re.compile(rb"cut")

_word = st.sampled_from(["", "x", "Hello", "a b", "=", "=3D", ".", "From x", "\t", "é", "€", "http://e.example/"])


@st.composite
def text_line(draw: st.DrawFn, boundaries: tuple[str, ...]) -> str:
    """A line of text; the hostile ones put an enclosing multipart's delimiter where an edit (or a
    decoder) could bring it to the start of a line."""
    if not boundaries or draw(st.integers(0, 3)):
        return " ".join(draw(st.lists(_word, max_size=4)))
    delimiter = "--" + draw(st.sampled_from(boundaries)) + draw(st.sampled_from(["", "--", " ", "x"]))
    return draw(
        st.sampled_from(
            [
                f"> {delimiter}",
                f"see NL {delimiter}",
                f"junk cut{delimiter}",
                f"http://e.example/\r\n{delimiter}\r\nContent-Type: application/x-msdownload\r\n",
                f"> x\r\n{delimiter}",
                f"x\r> {delimiter}",
                f"{delimiter}http://e.example/",
                "x" * draw(st.integers(60, 80)) + f" NL {delimiter}",
            ]
        )
    )


LEAVES = [
    ("text/plain", "us-ascii", "7bit"),
    ("text/plain", "utf-8", "8bit"),
    ("text/plain", "iso-8859-1", "quoted-printable"),
    ("text/plain", "utf-8", "quoted-printable"),
    ("text/plain", "utf-8", "base64"),
    ("text/html", "utf-8", "quoted-printable"),
    ("text/html", "windows-1252", "8bit"),
    ("application/octet-stream", None, "base64"),
]


@st.composite
def leaf(draw: st.DrawFn, boundaries: tuple[str, ...]) -> bytes:
    content_type, charset, encoding = draw(st.sampled_from(LEAVES))
    lines = draw(st.lists(text_line(boundaries), max_size=5))
    codec = charset or "latin-1"
    if encoding == "quoted-printable":  # a CR or LF inside a line is encoded, =0D and =0A
        body = b"\r\n".join(
            binascii.b2a_qp(line.encode(codec, "replace"), istext=False).replace(b"=\n", b"=\r\n") for line in lines
        )
    elif encoding == "base64":
        raw = "\r\n".join(lines).encode(codec, "replace")
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n").rstrip()
    else:  # 7bit and 8bit: no LF inside a line, and now and then a bare CR
        text = "\r\n".join(line.replace("\r\n", "\r" if draw(st.booleans()) else " ") for line in lines)
        body = text.encode(codec if encoding == "8bit" else "ascii", "replace")
    header = f"Content-Type: {content_type}" + (f"; charset={charset}" if charset else "") + "\r\n"
    if encoding != "7bit" or draw(st.booleans()):
        header += f"Content-Transfer-Encoding: {encoding}\r\n"
    if draw(st.integers(0, 3)) == 0:
        header += "Content-Disposition: attachment; filename=f\r\n"
    if draw(st.integers(0, 7)) == 0:  # no empty line: the body starts at the first non-header line
        return header.encode() + body
    return header.encode() + b"\r\n" + body


@st.composite
def entity(draw: st.DrawFn, boundaries: tuple[str, ...] = (), depth: int = 0) -> bytes:
    """An entity: a leaf, a forwarded message, or a multipart whose close delimiter may be missing."""
    kind = draw(st.integers(0, 5)) if depth < 3 else 0
    if kind <= 2 and depth > 0:
        return draw(leaf(boundaries))
    if kind == 3 and depth > 0:
        disposition = draw(st.sampled_from([b"", b"Content-Disposition: attachment\r\n"]))
        inner = draw(entity(boundaries, depth + 1))
        return b"Content-Type: message/rfc822\r\n" + disposition + b"\r\nSubject: inner\r\n" + inner
    boundary = draw(st.sampled_from(["b", "=_Part_", "outer b"])) + str(depth)
    enclosing = (*boundaries, boundary)
    out = f'Content-Type: multipart/{draw(st.sampled_from(["mixed", "alternative"]))}; boundary="{boundary}"\r\n\r\n'
    chunks = [out.encode()]
    for child in draw(st.lists(entity(enclosing, depth + 1), min_size=1, max_size=3)):
        chunks.append(f"--{boundary}\r\n".encode() + child + b"\r\n")
    if draw(st.integers(0, 3)):  # else: no close delimiter, the last part runs to the end
        chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    data = b"From: a@example.net\r\nSubject: Hello\r\nMIME-Version: 1.0\r\n" + draw(entity())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if draw(st.integers(0, 4)) == 0:  # stored with LF line ends, as some servers hand them out
        data = data.replace(b"\r\n", b"\n")
    return data


def leaves(message: bytes) -> list[tuple[email.message.Message, bool]]:
    """Every entity as ``email`` reads it, in order, with whether it is, or is inside, an attachment."""
    found = []
    todo = [(email.message_from_bytes(message, policy=email.policy.compat32), False)]
    while todo:
        part, attached = todo.pop()
        attached = attached or part.get_content_disposition() == "attachment"
        found.append((part, attached))
        payload = part.get_payload()
        if isinstance(payload, list):
            todo += [(child, attached) for child in reversed(payload)]
    return found


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_message())
def test_rewriting_keeps_the_mime_tree_and_leaves_untouched_parts_alone(message: bytes) -> None:
    """Parsed with ``email``, under both policies: they share the FeedParser that finds the structure,
    but read the Content-Type parameters (the boundary) with different header parsers, compat32 with
    the one ``mimesplice`` itself uses, ``default`` with the RFC 5322 one that newer clients get. The
    tree must be the same under each; the parts no rule could touch must keep every byte."""
    context = message_context()
    out = PROPERTY_HOOK.process(message, context)
    assert isinstance(out, bytes)
    for policy in (email.policy.compat32, email.policy.default):
        assert mime_tree(out, policy) == mime_tree(message, policy)
    assert out.startswith(b"X-Scanned: popproxy\r\n") and re.search(rb"\nSubject: \[EXT\] Hello\r?\n", out)
    for (old, attached), (new, _) in zip(leaves(message)[1:], leaves(out)[1:], strict=True):
        assert old.items() == new.items()  # no header of any part changes
        if old.is_multipart():
            assert (old.preamble, old.epilogue) == (new.preamble, new.epilogue)
            continue
        payload_before, payload_after = old.get_payload(), new.get_payload()
        if payload_before != payload_after:
            assert old.get_content_type() in ("text/plain", "text/html")
            decoded = old.get_payload(decode=True)
            assert (ATTACHMENT_TRIGGERS if attached else TRIGGERS).search(decoded), (payload_before, payload_after)
