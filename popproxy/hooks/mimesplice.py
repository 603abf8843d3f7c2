# -*- test-case-name: tests.test_rewrite_hook,tests.test_rewrite_structure -*-
"""Finding header fields and MIME parts in a message's raw bytes, and splicing new bytes in at their offsets.

Re-serialising a message with the ``email`` package changes bytes nobody asked it to change (header
folding, boundaries, line lengths, base64 layout), which breaks signatures and makes "what did the
proxy change?" hard to answer. So this module never re-serialises: :func:`parse` walks the MIME tree
over the raw bytes and records, for every entity, where its header fields, its body and its children
are (byte offsets into the message), and :func:`splice` replaces byte ranges. Everything outside the
replaced ranges stays byte-for-byte as it was. ``email`` is used only to read one header's parameters
(``Content-Type: text/plain; charset*=...``: quoting and RFC 2231 are its job, not ours).

The conventions, all from RFC 2046 §5.1.1 and RFC 5322 §2.2-2.3:

- A line ends at CRLF, and also at a bare LF or a bare CR. Bare ones are not allowed in mail (RFC
  5322 §2.3, RFC 2045 §2.7-2.8), but they occur, and Python's ``email`` (like other lenient parsers)
  reads each as a line break: where a header field or a delimiter line is found must agree with
  what clients find, or an edit could land in a part the client reads as something else.
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
- Entities nested deeper than :data:`MAX_DEPTH`, or past :data:`MAX_PARTS` in one message, are not
  looked into (``Part.opaque`` says why). :func:`parse` and :func:`walk` use no recursion.

:func:`edit_text_body` rewrites the text of one part line by line through its transfer encoding and
charset, changing only the encoded lines whose text changed, and never so that the MIME structure
around the part changes.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.message
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email import base64mime, quoprimime
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header
from typing import NamedTuple

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "CannotEdit",
    "Edited",
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
    "walk_enclosed",
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
#: How deep entities may nest, and how many a message may hold, for :func:`parse` to look inside
#: them: Dovecot's message parser stops at the same numbers (``max_nested_mime_parts``,
#: ``max_total_mime_parts``). Each level costs at most one scan of the message, so parsing costs
#: at most ``MAX_DEPTH`` scans, whatever the message holds.
MAX_DEPTH = 100
MAX_PARTS = 10_000

_TOKEN = re.compile(r"[^\s;(]+")
_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_LINE_BREAK_BEFORE_WSP = re.compile(rb"(?:\r\n|\r|\n)(?=[ \t])")


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
    ``header_closed`` is false when no empty line ended the header block: then where the body
    starts is a guess (see :func:`edit_text_body`). ``opaque`` says why a multipart or
    ``message/rfc822`` was not looked into (:data:`MAX_DEPTH`, :data:`MAX_PARTS`), or is None.
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
    header_closed: bool = True
    opaque: str | None = None

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    def field(self, name: str) -> Field | None:
        """The first field called ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((f for f in self.fields if f.name.lower() == wanted), None)


# --- header blocks ---------------------------------------------------------------------------------


def _header_block(data: bytes, start: int, end: int) -> tuple[tuple[Field, ...], int, bool]:
    """The fields of the header block at ``start``, where the body begins, and whether an empty line
    ended the block."""
    fields: list[Field] = []
    pos = start
    while pos < end:
        line_break = _LINE_BREAK.search(data, pos, end)
        line_end = end if line_break is None else line_break.end()
        if line_break is not None and line_break.start() == pos:  # the empty line
            return tuple(fields), line_end, True
        if data[pos] in WSP:
            if fields:  # a continuation line: the field grows
                last = fields[-1]
                fields[-1] = Field(last.name, last.start, last.colon, line_end)
            else:  # continuation of nothing: keep it as a nameless field so its bytes stay accounted
                fields.append(Field("", pos, pos, line_end))
        else:
            match = _FIELD.match(data, pos, line_end)
            if match is None:  # not a header line: the body starts here (no empty line)
                return tuple(fields), pos, False
            fields.append(Field(match.group(1).decode("ascii"), pos, match.end(), line_end))
        pos = line_end
    return tuple(fields), end, False


def _raw_value(data: bytes, field: Field) -> str:
    """A field's value as text: unfolded (RFC 5322 §2.2.3), outer white space removed, not decoded."""
    raw = data[field.colon : field.end]
    unfolded = _LINE_BREAK_BEFORE_WSP.sub(b"", raw).rstrip(b"\r\n")
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


@dataclass(slots=True)
class _Found:
    """An entity :func:`parse` has read the header of, waiting for its children to be built."""

    start: int
    end: int
    section: str
    depth: int
    fields: tuple[Field, ...]
    body_start: int
    header_closed: bool
    content_type: str
    charset: str | None
    disposition: str | None
    transfer_encoding: str
    boundary: str | None
    children: list[int]  # indices into parse's list
    opaque: str | None = None


def parse(data: bytes) -> Part:
    """The message's MIME tree, every entity located by byte offsets into ``data``.

    Entities are found top-down with a list of the ranges still to read, not by recursion, so no
    nesting can exhaust Python's stack; a Part is frozen, so they are then built bottom-up (in
    pre-order every entity comes after its parent). Beyond :data:`MAX_DEPTH` levels, or
    :data:`MAX_PARTS` entities, a multipart or ``message/rfc822`` gets no children and an ``opaque``
    reason instead.
    """
    found: list[_Found] = []
    #: (index of the parent in ``found``, start, end, default Content-Type, section, depth)
    todo: list[tuple[int, int, int, str, str, int]] = [(-1, 0, len(data), "text/plain", "", 0)]
    room = MAX_PARTS - 1  # how many more entities the message may have
    while todo:
        parent, start, end, default_type, section, depth = todo.pop()
        entity = _read_entity(data, start, end, default_type, section, depth)
        if parent >= 0:
            found[parent].children.append(len(found))
        found.append(entity)
        inside = _inside(data, entity, room)
        room -= len(inside)
        todo += [(len(found) - 1, *child, depth + 1) for child in reversed(inside)]

    built: dict[int, Part] = {}
    for index in range(len(found) - 1, -1, -1):
        e = found[index]
        built[index] = Part(
            start=e.start,
            body_start=e.body_start,
            end=e.end,
            fields=e.fields,
            content_type=e.content_type,
            charset=e.charset,
            disposition=e.disposition,
            transfer_encoding=e.transfer_encoding,
            boundary=e.boundary,
            section=e.section,
            children=tuple(built.pop(child) for child in e.children),
            header_closed=e.header_closed,
            opaque=e.opaque,
        )
    return built[0]


def _read_entity(data: bytes, start: int, end: int, default_type: str, section: str, depth: int) -> _Found:
    """The entity at ``[start, end)``, its header read."""
    fields, body_start, header_closed = _header_block(data, start, end)
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
    return _Found(
        start=start,
        end=end,
        section=section,
        depth=depth,
        fields=fields,
        body_start=body_start,
        header_closed=header_closed,
        content_type=content_type,
        charset=charset,
        disposition=disposition,
        transfer_encoding=transfer_encoding,
        boundary=boundary,
        children=[],
    )


def _inside(data: bytes, entity: _Found, room: int) -> list[tuple[int, int, str, str]]:
    """The ``(start, end, default Content-Type, section)`` of the entities directly inside
    ``entity``, unless that would pass a limit (then ``entity.opaque`` says which)."""
    multipart = entity.content_type.startswith("multipart/") and bool(entity.boundary)
    message = entity.content_type == "message/rfc822" and entity.transfer_encoding in ("7bit", "8bit", "binary")
    if not (multipart or message):
        return []
    if entity.depth >= MAX_DEPTH:  # checked first: then no level deeper than MAX_DEPTH is scanned
        entity.opaque = f"its parts would be nested more than {MAX_DEPTH} levels deep"
        return []
    if message:
        ranges: list[tuple[int, int]] | None = [(entity.body_start, entity.end)]
    else:
        ranges = _parts(data, entity.body_start, entity.end, entity.boundary or "", room)
    if ranges is None or len(ranges) > room:
        entity.opaque = f"the message would hold more than {MAX_PARTS} parts"
        return []
    if message:  # the message inside has the same section number (RFC 3501 §6.4.5)
        return [(entity.body_start, entity.end, "text/plain", entity.section)]
    inside_type = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
    return [(start, end, inside_type, f"{entity.section}.{n}".lstrip(".")) for n, (start, end) in enumerate(ranges, 1)]


def _parts(data: bytes, start: int, end: int, boundary: str, room: int) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` ranges of the parts of the multipart body ``[start, end)``; None if
    there are more than ``room``.

    RFC 2046 §5.1.1: a delimiter line is ``--boundary`` at the start of a line, then optional
    transport padding (SP, HTAB), then the line break; the close delimiter has ``--`` after the
    boundary. ``--boundary`` is searched for as a literal (many times faster than a pattern that
    starts with ``^``), then checked to start a line: ``[start, end)`` starts with one.
    """
    delimiter = re.compile(re.escape(b"--" + boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*(?=[\r\n]|\Z)")
    ranges: list[tuple[int, int]] = []
    part_start: int | None = None
    for match in delimiter.finditer(data, start, end):
        line_start = match.start()
        if line_start > start and data[line_start - 1] not in b"\r\n":
            continue
        if part_start is not None:
            # RFC 2046 §5.1.1: the line break before the delimiter line belongs to the delimiter.
            part_end = line_start - (2 if data[line_start - 2 : line_start] == CRLF else 1)
            ranges.append((part_start, max(part_start, part_end)))
            if len(ranges) > room:
                return None
        if match.group(1):  # the close delimiter: the rest is epilogue
            return ranges
        line_break = _LINE_BREAK.match(data, match.end(), end)
        part_start = match.end() if line_break is None else line_break.end()
    if part_start is not None:  # no close delimiter: the last part runs to the end
        ranges.append((part_start, end))
    return ranges if len(ranges) <= room else None


def walk(part: Part, in_attachment: bool = False) -> Iterator[tuple[Part, bool]]:
    """Every entity under ``part`` (itself included), depth first, with whether it sits in an
    attachment: it is one (``Content-Disposition: attachment``) or is inside one (a message
    forwarded as an attachment)."""
    for entity, attached, _ in walk_enclosed(part, in_attachment):
        yield entity, attached


def walk_enclosed(part: Part, in_attachment: bool = False) -> Iterator[tuple[Part, bool, tuple[str, ...]]]:
    """As :func:`walk`, with the boundaries of the multiparts each entity is inside (outermost
    first): the delimiter lines its body must not hold (RFC 2046 §5.1.1). Without recursion."""
    todo: list[tuple[Part, bool, tuple[str, ...]]] = [(part, in_attachment, ())]
    while todo:
        entity, attached, boundaries = todo.pop()
        attached = attached or entity.disposition == "attachment"
        yield entity, attached, boundaries
        if entity.is_multipart and entity.boundary and entity.children:
            boundaries = (*boundaries, entity.boundary)
        todo += [(child, attached, boundaries) for child in reversed(entity.children)]


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


def fold_field(name: str, value: str, *, width: int = FOLD_AT, after_commas: bool = False) -> bytes:
    """A complete header field ``name: value`` with its CRLF, folded at ``width`` (78) columns: the
    one field folder of every hook.

    ASCII values are folded at spaces (unfolding gives the value back exactly; a word longer than a
    line stays whole). With ``after_commas`` (SpamAssassin's own layout of ``X-Spam-Status``, which
    the spam hooks copy), a line may also end after a comma, and a continuation line starts with a
    TAB in place of the spaces before it. Other values become RFC 2047 encoded-words in UTF-8, which
    only suits unstructured fields (Subject, Comments, X-...): address fields need their display
    names encoded on their own, which is the caller's to refuse.

    :raises ValueError: for a bad name, a line break or control character in the value, or a line
        longer than RFC 5322 allows.
    """
    if not _FIELD.fullmatch(name.encode("utf-8") + b":") or any(c in name for c in " \t"):
        raise ValueError(f"{name!r} is not a header field name (printable ASCII, no colon or space)")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        raise ValueError("the value holds a line break or control character")
    if value.isascii():
        pieces = (re.findall(r"( *)([^ ,]*,?)", value) if after_commas
                  else [(" ", word) for word in value.split(" ")])
        lines = [f"{name}:"]
        first = True
        for space, word in pieces:
            if after_commas and not space and not word:
                continue  # findall's empty match at the end
            candidate = f"{lines[-1]} {word}" if first else lines[-1] + space + word
            # Fold before a word when the line would pass the width, unless the line holds no word
            # yet or the word is empty (a whitespace-only continuation line is obsolete syntax).
            if len(candidate) > width and not first and word and lines[-1].strip():
                lines.append(("\t" if after_commas else space) + word)
            else:
                lines[-1] = candidate
            first = False
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
#: any line break the edit adds; returns the line (possibly several) as it should be. The line
#: holds no CR or LF: every line break in what ``edit`` returns is one it made.
LineEdit = Callable[[str, str], str]


class Edited(NamedTuple):
    """What :func:`edit_text_body` made of a body: ``body`` (the one given, when nothing changed),
    and how many lines it left as they were because, changed, they could change the MIME structure."""

    body: bytes
    kept: int


#: Where a line may begin in an edited line's octets: at its start, and after any CR or LF, since
#: Python's ``email`` and other parsers take a bare CR for a line break.
_LINE_STARTS = re.compile(rb"(?:^|(?<=[\r\n]))--")
#: A line that some parser could take for a header field: a field name (RFC 5322 §2.2, with
#: ``email``'s empty name and obsolete white space before the colon, §4.5), a continuation line, or an
#: mbox ``From`` line.
_HEADER_LIKE = re.compile(rb"[ \t]|From |[^\s:]*[ \t]*:")
#: The CR and LF octets of text, the pieces of a line an edit sees one at a time.
_CR_OR_LF = re.compile(rb"(\r\n|\r|\n)")


@dataclass(frozen=True, slots=True)
class _Guard:
    """What an edited line must not do to the MIME structure around its part.

    - RFC 2046 §5.1.1: a delimiter line is ``--`` and the boundary of a multipart at the start of a
      line, and the boundary "must not appear inside any of the encapsulated parts, on a line by
      itself or as the prefix of any line". So a line that, changed, would start with ``--`` and
      the boundary of a multipart the part is in, or that starts so already (some parsers take any
      such line for a delimiter), is left as it was: the edit neither makes a part nor unmakes one.
    - RFC 2046 §5.1.1 also wants an empty line after a part's header. Without one, every parser
      guesses where the body starts (at the first line that is not a header field, by its own idea
      of a header field), so the first line of the body must not become one. If it could be one
      already, parsers may disagree on where the body starts, and the part is not edited at all.
    """

    delimiters: tuple[bytes, ...]
    header_closed: bool

    def check_body(self, body: bytes) -> None:
        """:raises CannotEdit: for a body whose start parsers may place elsewhere."""
        if not self.header_closed and _HEADER_LIKE.match(body):
            raise CannotEdit("no empty line ends the header, and the body's first line could be read as a header field")

    def allows(self, old: bytes, new: Sequence[bytes], first: bool) -> bool:
        """Whether a line may change from ``old`` to ``new`` (its encoded lines, line ending excluded;
        ``first``: the body's first line)."""
        if self._delimits(old) or any(self._delimits(line) for line in new):
            return False
        return self.header_closed or not first or not _HEADER_LIKE.match(new[0])

    def _delimits(self, octets: bytes) -> bool:
        if not self.delimiters or b"--" not in octets:
            return False
        return any(
            octets.startswith(delimiter, match.start())
            for match in _LINE_STARTS.finditer(octets)
            for delimiter in self.delimiters
        )


def edit_text_body(
    body: bytes,
    transfer_encoding: str,
    charset: str | None,
    edit: LineEdit,
    *,
    boundaries: Collection[str] = (),
    header_closed: bool = True,
) -> Edited:
    """The body of a text part with ``edit`` applied to each line of its text, re-encoded.

    The body is decoded from its transfer encoding (7bit, 8bit, binary, quoted-printable, base64)
    and charset; ``edit`` sees each line without its line ending (so ``^`` and ``$`` mean the line's
    ends, and no change spans lines), and the part's line ending for any line break it adds.
    For 7bit, 8bit and quoted-printable only the encoded lines whose text changed are rewritten; a
    base64 body is re-encoded whole with its original line length.

    No edit changes the MIME structure around the part, whatever the text: a CR or LF octet
    already in a line (a bare CR in 8bit text, ``=0D`` or ``=0A`` in quoted-printable) cuts it into
    pieces that ``edit`` sees one at a time, and stays in its line as it was (encoded, in
    quoted-printable); only the line breaks ``edit`` makes are line breaks. ``boundaries`` are those
    of the multiparts the part is in; ``header_closed`` is ``Part.header_closed``. A line that
    changed could break either (see :class:`_Guard`) is left as it was, and counted in ``kept``.

    :raises CannotEdit: when the part cannot take the change and stay valid: an unknown transfer
        encoding or charset, text that does not survive re-encoding, a replacement the charset cannot
        encode, 8-bit octets in a 7bit part, a line longer than 998 octets, malformed base64, a
        body whose start parsers may not agree on.
    """
    guard = _Guard(tuple(b"--" + b.encode("utf-8", "surrogateescape") for b in boundaries), header_closed)
    guard.check_body(body)
    if transfer_encoding == "base64":
        # The base64 alphabet has no "-", ":" or white space (RFC 2045 §6.8): no line of it can be a
        # delimiter or a header field.
        return Edited(_edit_base64(body, charset, edit), 0)
    if transfer_encoding not in ("7bit", "8bit", "binary", "quoted-printable"):
        raise CannotEdit(f"unknown Content-Transfer-Encoding {transfer_encoding!r}")
    codec = _codec(charset)
    if not _ascii_compatible(codec):
        raise CannotEdit(f"charset {codec} needs base64 to travel in {transfer_encoding}")
    if transfer_encoding == "quoted-printable":
        return _edit_quoted_printable(body, codec, edit, guard)
    pieces: list[bytes] = []
    changed = False
    kept = 0
    for number, (content, ending) in enumerate(_lines(body)):
        new = _edit_line(content, codec, edit, (ending or CRLF).decode("ascii"))
        if new is None:
            pieces += (content, ending)
            continue
        if not guard.allows(content, new, number == 0):
            pieces += (content, ending)
            kept += 1
            continue
        if transfer_encoding == "7bit" and content.isascii() and not all(line.isascii() for line in new):
            raise CannotEdit("the replacement needs 8-bit octets in a 7bit part")
        if any(len(line) > MAX_LINE for line in new):
            raise CannotEdit(f"the replacement makes a line longer than {MAX_LINE} octets")
        pieces += ((ending or CRLF).join(new), ending)
        changed = True
    return Edited(b"".join(pieces) if changed else body, kept)


def _edit_line(raw: bytes, codec: str, edit: LineEdit, newline: str) -> list[bytes] | None:
    """The line of text octets ``raw`` (its line ending excluded) edited, as the octets of each line
    it became; None if nothing changed.

    CR and LF octets in ``raw`` cut it into pieces, each edited on its own; they stay inside their
    line. Only a line break that ``edit`` returns separates two lines of the result.
    """
    pieces = _CR_OR_LF.split(raw)  # text, separator, text, ..., text
    lines = [b""]
    changed = False
    for index, piece in enumerate(pieces):
        if index % 2:
            lines[-1] += piece
            continue
        text = _decode(piece, codec)
        new = edit(text, newline)
        if new == text:
            lines[-1] += piece
            continue
        _to_text(piece, codec)  # only text that changes must round-trip
        first, *more = (_to_bytes(line, codec) for line in _LINE_END.split(new))
        lines[-1] += first
        lines += more
        changed = True
    return lines if changed else None


def _edit_quoted_printable(body: bytes, codec: str, edit: LineEdit, guard: _Guard) -> Edited:
    """Quoted-printable (RFC 2045 §6.7), one logical line at a time: physical lines joined at soft
    line breaks (``=`` at the end of a line, rule 5) decode to one line of text. Only the hard line
    breaks of the encoding are the text's line breaks (rule 4); an encoded CR or LF (``=0D``,
    ``=0A``) is an octet of the line, and stays encoded."""
    pieces: list[bytes] = []
    changed = False
    kept = 0
    logical: list[bytes] = []  # the physical lines of the logical line being read, endings included
    decoded: list[bytes] = []
    first = True
    for content, ending in _lines(body):
        logical.append(content + ending)
        stripped = content.rstrip(WSP)  # rule 3: trailing white space is transport padding
        soft = stripped.endswith(b"=")
        decoded.append(binascii.a2b_qp(stripped[:-1] if soft else stripped))
        if soft and ending:
            continue
        old = b"".join(logical)
        new = _edit_line(b"".join(decoded), codec, edit, "\r\n")
        encoded = None if new is None else [_qp_line(line) for line in new]
        if encoded is None:
            pieces.append(old)
        elif not guard.allows(old, encoded, first):
            pieces.append(old)
            kept += 1
        else:
            pieces += (CRLF.join(encoded), b"=" if soft else b"", ending)
            changed = True
        logical, decoded, first = [], [], False
    return Edited(b"".join(pieces) if changed else body, kept)


def _qp_line(raw: bytes) -> bytes:
    """One line of octets in quoted-printable (RFC 2045 §6.7), with soft line breaks (``=`` CRLF) so
    that no encoded line is longer than 76 characters (rule 5).

    Octets 33-126 but "=" stand for themselves (rule 2), and so do SP and HTAB except at the end of
    the line (rule 3); all others are ``=XX`` (rule 1), CR and LF included: they are octets of the
    line, not line breaks. Two more are encoded where they would begin an encoded line: "-",
    because a line of quoted-printable starting with "-" could be taken for a multipart delimiter
    (the note at the end of §6.7; RFC 2046 §5.1.1), and a "." that would be the whole line, as
    ``binascii`` does (a line of one "." ends a message in SMTP and POP3).
    """
    last = len(raw) - 1
    lines: list[bytes] = []
    line = b""
    for index, octet in enumerate(raw):
        literal = (33 <= octet <= 126 and octet != 0x3D) or (octet in (0x09, 0x20) and index < last)
        token = bytes((octet,)) if literal else b"=%02X" % octet
        if line and len(line) + len(token) > (76 if index == last else 75):  # room for the "=" of a soft break
            lines.append(line)
            line = b""
        if not line and (token == b"-" or (token == b"." and index == last)):
            token = b"=%02X" % octet
        line += token
    lines.append(line)
    return b"=\r\n".join(lines)


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
