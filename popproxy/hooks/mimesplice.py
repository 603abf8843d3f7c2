# -*- test-case-name: tests.test_rewrite_hook -*-
"""Finding header fields and MIME parts in a message's raw bytes, and splicing new bytes in at their offsets.

Re-serialising a message with the ``email`` package changes bytes nobody asked it to change (header
folding, boundaries, line lengths, base64 layout), which breaks signatures and makes "what did the
proxy change?" hard to answer. So this module never re-serialises: :func:`parse` walks the MIME tree
over the raw bytes and records, for every entity, where its header fields, its body and its children
are (byte offsets into the message), and :func:`splice` replaces byte ranges. Everything outside the
replaced ranges stays byte-for-byte as it was. ``email`` is used only to read one header's parameters
(``Content-Type: text/plain; charset*=...``: quoting and RFC 2231 are its job, not ours).

The conventions, all from RFC 2046 §5.1.1 and RFC 5322 §2.2-2.3:

- An entity is a header block, an empty line, and a body. A line that is neither a header field nor
  a continuation line ends the header block early (as ``email`` does); with no empty line at all,
  the entity is all header and its body is empty.
- A header field runs from its name to the end of its last continuation line (lines starting with
  SP or HTAB), line ending included.
- A multipart body is cut at delimiter lines: ``--boundary`` followed by optional SP/HTAB, or the
  close delimiter ``--boundary--``. The CRLF *before* a delimiter line belongs to the delimiter, so a
  part's body ends before it. Preamble and epilogue belong to no part. A multipart with no delimiter
  line is opaque (no children); one without a close delimiter ends its last part at its own end.
- ``message/rfc822`` parts in 7bit/8bit/binary are entered: their body is parsed as a message.
- Parts of ``multipart/digest`` default to ``message/rfc822``, all others to ``text/plain``
  (RFC 2046 §5.1.5); a missing charset is ``us-ascii`` (RFC 2046 §4.1.2).

:func:`edit_text_body` rewrites the text of one part line by line through its transfer encoding and
charset, changing only the encoded lines whose text changed.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.message
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email import base64mime, quoprimime
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header

__all__ = [
    "CannotEdit",
    "Field",
    "LineEdit",
    "Part",
    "decoded_value",
    "edit_text_body",
    "encoded_word",
    "fold_field",
    "header_fields",
    "parse",
    "splice",
    "walk",
]

CRLF = b"\r\n"
WSP = b" \t"

#: RFC 5322 §2.2: field names are printable US-ASCII except ":". Obsolete syntax (§4.5) allows
#: white space before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
#: The longest a line may be, line ending excluded (RFC 5322 §2.1.1).
MAX_LINE = 998
#: Where new header lines are folded (RFC 5322 §2.1.1: "SHOULD be no more than 78 characters").
FOLD_AT = 78

_TOKEN = re.compile(r"[^\s;(]+")
_LINE_END = re.compile(r"\r\n|\r|\n")


class CannotEdit(Exception):
    """A text part that cannot be rewritten without breaking it; the reason is the message."""


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: ``[start, end)`` holds its lines, continuation lines and final line ending.

    ``name`` is as written (compare with ``lower()``); ``colon`` is the offset just after the colon.
    """

    name: str
    start: int
    colon: int
    end: int


@dataclass(frozen=True, slots=True)
class Part:
    """One MIME entity, located in the message's bytes.

    ``[start, body_start)`` is the header block with the empty line after it (if any);
    ``[body_start, end)`` the body, without the CRLF that belongs to the next delimiter.
    ``content_type`` is lower case, ``charset`` lower case or None, ``disposition`` lower case
    (``"attachment"``, ``"inline"``) or None, ``transfer_encoding`` lower case (default ``"7bit"``).
    ``children`` are a multipart's parts, or the one message inside a ``message/rfc822`` part.
    ``section`` numbers parts as IMAP does (RFC 3501 §6.4.5): ``""`` for the message, then
    ``"1"``, ``"1.2"``...
    """

    start: int
    body_start: int
    end: int
    fields: tuple[Field, ...]
    content_type: str
    charset: str | None
    disposition: str | None
    transfer_encoding: str
    boundary: str | None
    section: str
    children: tuple[Part, ...] = ()

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    def field(self, name: str) -> Field | None:
        """The first field called ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((f for f in self.fields if f.name.lower() == wanted), None)


# --- header blocks ---------------------------------------------------------------------------------


def _header_block(data: bytes, start: int, end: int) -> tuple[tuple[Field, ...], int]:
    """The fields of the header block at ``start``, and where the body begins."""
    fields: list[Field] = []
    pos = start
    while pos < end:
        newline = data.find(b"\n", pos, end)
        line_end = end if newline < 0 else newline + 1
        if data[pos:line_end] in (CRLF, b"\n"):
            return tuple(fields), line_end
        if data[pos] in WSP:
            if fields:  # a continuation line: the field grows
                last = fields[-1]
                fields[-1] = Field(last.name, last.start, last.colon, line_end)
            else:  # continuation of nothing: keep it as a nameless field so its bytes stay accounted
                fields.append(Field("", pos, pos, line_end))
        else:
            match = _FIELD.match(data, pos, line_end)
            if match is None:  # not a header line: the body starts here (no empty line)
                return tuple(fields), pos
            fields.append(Field(match.group(1).decode("ascii"), pos, match.end(), line_end))
        pos = line_end
    return tuple(fields), end


def _raw_value(data: bytes, field: Field) -> str:
    """A field's value as text: unfolded (RFC 5322 §2.2.3), outer white space removed, not decoded."""
    raw = data[field.colon : field.end]
    unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", raw).rstrip(b"\r\n")
    return unfolded.decode("utf-8", "replace").strip(" \t")


def decoded_value(data: bytes, field: Field) -> str:
    """A field's value for people and patterns: unfolded, with RFC 2047 encoded-words decoded.

    Raw 8-bit octets are read as UTF-8 (RFC 6532), anything undecodable as U+FFFD.
    """
    raw = _raw_value(data, field)
    if "=?" not in raw:
        return raw
    try:
        return str(make_header(decode_header(raw)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return raw


def _parameters(name: str, value: str) -> email.message.Message:
    message = email.message.Message()
    message[name] = value
    return message


# --- the MIME tree ---------------------------------------------------------------------------------


def header_fields(data: bytes) -> tuple[Field, ...]:
    """The fields of the message's own header block (cheaper than :func:`parse` when that is all)."""
    return _header_block(data, 0, len(data))[0]


def parse(data: bytes) -> Part:
    """The message's MIME tree, every entity located by byte offsets into ``data``."""
    return _entity(data, 0, len(data), "text/plain", "")


def _entity(data: bytes, start: int, end: int, default_type: str, section: str) -> Part:
    fields, body_start = _header_block(data, start, end)
    by_name: dict[str, Field] = {}
    for field in fields:
        by_name.setdefault(field.name.lower(), field)

    content_type, charset, boundary = default_type, None, None
    if "content-type" in by_name:
        message = _parameters("Content-Type", _raw_value(data, by_name["content-type"]))
        message.set_default_type(default_type)
        content_type = message.get_content_type()
        charset = message.get_content_charset()
        boundary = message.get_boundary()
    disposition = None
    if "content-disposition" in by_name:
        disposition = _parameters(
            "Content-Disposition", _raw_value(data, by_name["content-disposition"])
        ).get_content_disposition()
    transfer_encoding = "7bit"
    if "content-transfer-encoding" in by_name:
        token = _TOKEN.match(_raw_value(data, by_name["content-transfer-encoding"]))
        transfer_encoding = token.group(0).lower() if token else "7bit"

    children: tuple[Part, ...] = ()
    if content_type.startswith("multipart/") and boundary:
        child_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        children = tuple(
            _entity(data, child_start, child_end, child_type, f"{section}.{index}".lstrip("."))
            for index, (child_start, child_end) in enumerate(_parts(data, body_start, end, boundary), 1)
        )
    elif content_type == "message/rfc822" and transfer_encoding in ("7bit", "8bit", "binary"):
        children = (_entity(data, body_start, end, "text/plain", section),)

    return Part(
        start=start,
        body_start=body_start,
        end=end,
        fields=fields,
        content_type=content_type,
        charset=charset,
        disposition=disposition,
        transfer_encoding=transfer_encoding,
        boundary=boundary,
        section=section,
        children=children,
    )


def _parts(data: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of the parts of the multipart body ``[start, end)``."""
    delimiter = re.compile(
        rb"(?m)^--" + re.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    for match in delimiter.finditer(data, start, end):
        if part_start is not None:
            # RFC 2046 §5.1.1: the CRLF before the delimiter line belongs to the delimiter.
            part_end = match.start()
            if data[part_end - 2 : part_end] == CRLF:
                part_end -= 2
            elif data[part_end - 1 : part_end] == b"\n":
                part_end -= 1
            ranges.append((part_start, max(part_start, part_end)))
        if match.group(1):  # the close delimiter: the rest is epilogue
            return ranges
        part_start = match.end()
    if part_start is not None:  # no close delimiter: the last part runs to the end
        ranges.append((part_start, end))
    return ranges


def walk(part: Part, in_attachment: bool = False) -> Iterator[tuple[Part, bool]]:
    """Every entity under ``part`` (itself included), depth first, with whether it sits in an
    attachment: it is one (``Content-Disposition: attachment``) or is inside one (a message
    forwarded as an attachment)."""
    in_attachment = in_attachment or part.disposition == "attachment"
    yield part, in_attachment
    for child in part.children:
        yield from walk(child, in_attachment)


# --- splicing ---------------------------------------------------------------------------------------


def splice(data: bytes, edits: Iterable[tuple[int, int, bytes]]) -> bytes:
    """``data`` with each ``(start, end, replacement)`` range replaced; ``start == end`` inserts.

    Edits may come in any order but must not overlap; insertions at one offset keep their order.
    Without edits, ``data`` itself is returned.
    """
    ordered = sorted(edits, key=lambda edit: (edit[0], edit[1]))
    if not ordered:
        return data
    pieces: list[bytes] = []
    pos = 0
    for start, end, replacement in ordered:
        if not pos <= start <= end <= len(data):
            raise ValueError(f"edit [{start}, {end}) overlaps an earlier one or lies outside 0..{len(data)}")
        pieces += (data[pos:start], replacement)
        pos = end
    pieces.append(data[pos:])
    return b"".join(pieces)


# --- new header fields ------------------------------------------------------------------------------


def fold_field(name: str, value: str) -> bytes:
    """A complete header field ``name: value`` with its CRLF, folded at 78 columns.

    ASCII values are folded at spaces (unfolding gives the value back exactly; a word longer than a
    line stays whole). Other values become RFC 2047 encoded-words in UTF-8, which only suits
    unstructured fields (Subject, Comments, X-...): address fields need their display names encoded
    on their own, which is the caller's to refuse.

    :raises ValueError: for a bad name, a line break or control character in the value, or a line
        longer than RFC 5322 allows.
    """
    if not _FIELD.fullmatch(name.encode("utf-8") + b":") or any(c in name for c in " \t"):
        raise ValueError(f"{name!r} is not a header field name (printable ASCII, no colon or space)")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        raise ValueError("the value holds a line break or control character")
    if value.isascii():
        lines = [f"{name}:"]
        for index, word in enumerate(value.split(" ")):
            candidate = f"{lines[-1]} {word}"
            # Fold before a word when the line would pass 78 columns, unless the line holds no
            # word yet or the word is empty (a whitespace-only continuation line is obsolete syntax).
            if len(candidate) > FOLD_AT and index > 0 and word and lines[-1].strip():
                lines.append(f" {word}")
            else:
                lines[-1] = candidate
        folded = "\r\n".join(lines).encode("ascii")
    else:
        encoded = Header(value, "utf-8", maxlinelen=FOLD_AT, header_name=name).encode(linesep="\r\n")
        folded = f"{name}: {encoded}".encode("ascii")
    if any(len(line) > MAX_LINE for line in folded.split(CRLF)):
        raise ValueError(f"a line of the field would be longer than {MAX_LINE} octets")
    return folded + CRLF


def encoded_word(text: str) -> str:
    """``text`` as one RFC 2047 encoded-word in UTF-8, Q or base64, whichever is shorter."""
    octets = text.encode("utf-8")
    q, b = quoprimime.header_encode(octets, "utf-8"), base64mime.header_encode(octets, "utf-8")
    return q if len(q) <= len(b) else b


# --- rewriting the text of one part -----------------------------------------------------------------


def _lines(body: bytes) -> list[tuple[bytes, bytes]]:
    """``body`` as ``(content, line ending)`` pairs; the last ending may be empty."""
    result = []
    pos = 0
    while pos < len(body):
        newline = body.find(b"\n", pos)
        if newline < 0:
            result.append((body[pos:], b""))
            break
        cut = newline - 1 if newline > pos and body[newline - 1] == 0x0D else newline
        result.append((body[pos:cut], body[cut : newline + 1]))
        pos = newline + 1
    return result


def _codec(charset: str | None) -> str:
    name = charset or "us-ascii"
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise CannotEdit(f"unknown charset {name!r}") from None


def _ascii_compatible(codec: str) -> bool:
    try:
        return "a=\r\n.".encode(codec) == b"a=\r\n." and b"a=\r\n.".decode(codec) == "a=\r\n."
    except UnicodeError:
        return False


def _decode(raw: bytes, codec: str) -> str:
    """``raw`` as text; octets the charset cannot decode become surrogates (PEP 383)."""
    try:
        return raw.decode(codec, "surrogateescape")
    except UnicodeError:
        raise CannotEdit(f"text cannot be decoded as {codec}") from None


def _to_text(raw: bytes, codec: str) -> str:
    """``raw`` as text, checked to come back unchanged when encoded again: octets the charset cannot
    decode survive as surrogates, and a stateful or non-canonical encoding is refused rather than
    silently normalised."""
    text = _decode(raw, codec)
    try:
        back = text.encode(codec, "surrogateescape")
    except UnicodeError:
        back = None
    if back != raw:
        raise CannotEdit(f"text in {codec} does not survive decoding and re-encoding unchanged")
    return text


def _to_bytes(text: str, codec: str) -> bytes:
    try:
        return text.encode(codec, "surrogateescape")
    except UnicodeError:
        raise CannotEdit(f"the replacement cannot be encoded in {codec}") from None


#: ``edit(line, newline)``: a line of text without its line ending, and the line ending to use for
#: any line break the edit adds; returns the line (possibly several) as it should be.
LineEdit = Callable[[str, str], str]


def edit_text_body(body: bytes, transfer_encoding: str, charset: str | None, edit: LineEdit) -> bytes:
    """The body of a text part with ``edit`` applied to each line of its text, re-encoded.

    The body is decoded from its transfer encoding (7bit, 8bit, binary, quoted-printable, base64)
    and charset; ``edit`` sees each line without its line ending (so ``^`` and ``$`` mean the line's
    ends, and no change spans lines), and the part's line ending for any line break it adds.
    For 7bit, 8bit and quoted-printable only the encoded lines whose text changed are rewritten; a
    base64 body is re-encoded whole with its original line length. Returns ``body`` itself when
    nothing changed.

    :raises CannotEdit: when the part cannot take the change and stay valid: an unknown transfer
        encoding or charset, text that does not survive re-encoding, a replacement the charset cannot
        encode, 8-bit octets in a 7bit part, a line longer than 998 octets, malformed base64.
    """
    if transfer_encoding == "base64":
        return _edit_base64(body, charset, edit)
    if transfer_encoding not in ("7bit", "8bit", "binary", "quoted-printable"):
        raise CannotEdit(f"unknown Content-Transfer-Encoding {transfer_encoding!r}")
    codec = _codec(charset)
    if not _ascii_compatible(codec):
        raise CannotEdit(f"charset {codec} needs base64 to travel in {transfer_encoding}")
    if transfer_encoding == "quoted-printable":
        return _edit_quoted_printable(body, codec, edit)
    pieces: list[bytes] = []
    changed = False
    for content, ending in _lines(body):
        text = _decode(content, codec)
        new = edit(text, (ending or CRLF).decode("ascii"))
        if new == text:
            pieces += (content, ending)
            continue
        _to_text(content, codec)  # only lines that change must round-trip
        encoded = _to_bytes(new, codec)
        if transfer_encoding == "7bit" and not encoded.isascii() and content.isascii():
            raise CannotEdit("the replacement needs 8-bit octets in a 7bit part")
        if any(len(line) > MAX_LINE for line, _ in _lines(encoded)):
            raise CannotEdit(f"the replacement makes a line longer than {MAX_LINE} octets")
        pieces += (encoded, ending)
        changed = True
    return b"".join(pieces) if changed else body


def _edit_quoted_printable(body: bytes, codec: str, edit: LineEdit) -> bytes:
    """Quoted-printable (RFC 2045 §6.7), one logical line at a time: physical lines joined at soft
    line breaks (``=`` at the end of a line) decode to one line of text."""
    pieces: list[bytes] = []
    changed = False
    logical: list[bytes] = []  # the physical lines of the logical line being read, endings included
    decoded: list[bytes] = []
    for content, ending in _lines(body):
        logical.append(content + ending)
        stripped = content.rstrip(WSP)  # rule 3: trailing white space is transport padding
        soft = stripped.endswith(b"=")
        decoded.append(binascii.a2b_qp(stripped[:-1] if soft else stripped))
        if soft and ending:
            continue
        raw_text = b"".join(decoded)
        text = _decode(raw_text, codec)
        new = edit(text, "\r\n")
        if new == text:
            pieces += logical
        else:
            _to_text(raw_text, codec)
            # Line breaks the edit added become hard line breaks (a CR or LF that was in the
            # text already, encoded as =0D or =0A, stays encoded).
            encoded = CRLF.join(_qp_line(_to_bytes(line, codec)) for line in new.split("\r\n"))
            pieces += (encoded, b"=" if soft else b"", ending)
            changed = True
        logical, decoded = [], []
    return b"".join(pieces) if changed else body


def _qp_line(raw: bytes) -> bytes:
    """One line of octets in quoted-printable, soft-broken at 76 characters, with CRLF soft breaks."""
    # istext=False encodes CR and LF as =0D/=0A, so every LF in the result is a soft break's.
    return binascii.b2a_qp(raw, quotetabs=False, istext=False, header=False).replace(b"\n", b"\r\n")


def _edit_base64(body: bytes, charset: str | None, edit: LineEdit) -> bytes:
    """Base64 (RFC 2045 §6.8): decoded whole, edited line by line, re-encoded with the original
    line length and line ending; white space after the last line is kept as it was."""
    core = body.rstrip(b" \t\r\n")
    tail = body[len(core) :]
    compact = re.sub(rb"[ \t\r\n]", b"", core)
    if len(compact) % 4 or not re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", compact):
        raise CannotEdit("malformed base64")
    raw = base64.b64decode(compact)
    codec = _codec(charset)
    text = _to_text(raw, codec)
    lines_of_text = _text_lines(text)
    newline = next((ending for _, ending in lines_of_text if ending), "\r\n")
    pieces: list[str] = []
    changed = False
    for line, ending in lines_of_text:
        new = edit(line, ending or newline)
        changed = changed or new != line
        pieces += (new, ending)
    if not changed:
        return body
    encoded = base64.b64encode(_to_bytes("".join(pieces), codec))
    lines = _lines(core)
    if len(lines) > 1:
        width, separator = len(lines[0][0]), lines[0][1]
    else:
        width, separator = max(76, len(core)), b"\r\n"
    if width <= 0 or width % 4:
        width = 76
    return separator.join(encoded[i : i + width] for i in range(0, len(encoded), width)) + tail


def _text_lines(text: str) -> list[tuple[str, str]]:
    result = []
    pos = 0
    for match in _LINE_END.finditer(text):
        result.append((text[pos : match.start()], match.group(0)))
        pos = match.end()
    if pos < len(text):
        result.append((text[pos:], ""))
    return result
