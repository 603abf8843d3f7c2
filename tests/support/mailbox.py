"""Deterministic test mail: RFC 5322 messages exactly as a POP3 client receives them.

Every message is returned as the bytes a client holds after un-dot-stuffing a ``RETR`` response
(RFC 1939 §3): CRLF line endings throughout, ending with CRLF, no bare CR or LF. The same ``seed`` always
gives the same bytes, so a failing test can be replayed, and each message carries a ``Message-ID``
that is unique across seeds.

The corpus deliberately covers what breaks POP3 proxies (dot-stuffing, RFC 1939 §3; line lengths;
exact sizes, RFC 1939 §5; large messages):
lines that are exactly ``.`` (also as the very last line), ``..``, ``.foo``; MIME multipart with base64
attachments; raw UTF-8 in headers and body (RFC 6532, 8-bit clean transport); lines of the full
998 octets RFC 5322 §2.1.1 allows; a message with an empty body; and optionally one message of several
megabytes.
"""

from __future__ import annotations

import base64
import datetime
import email.policy
import email.utils
import random
from collections.abc import Callable
from email.message import EmailMessage

CRLF = b"\r\n"

#: Size of the binary attachment in the large message (base64 makes the message about 6.9 MB).
LARGE_ATTACHMENT_BYTES = 5 * 1024 * 1024

#: The kinds of message, in the order the first messages of every corpus use them, so that even a
#: five-message mailbox holds one of each interesting kind.
KINDS = ("plain", "dots", "multipart", "utf8", "empty_body", "long_lines")

# Weights for messages after the first len(KINDS): mostly ordinary mail, like a real mailbox.
_LATER_WEIGHTS = {"plain": 50, "dots": 15, "multipart": 15, "utf8": 10, "empty_body": 5, "long_lines": 5}

_WORD_SOURCE = """
proxy mailbox octet greeting banner capability session upstream client server stuffing dot terminator
message header body attachment transport layer security certificate handshake pipeline command
response line length retrieve delete quit status list unique identifier the a of and to in is that
for it as with on be by this are or from at which
"""
_WORDS = tuple(_WORD_SOURCE.split())

_UTF8_SNIPPETS = (
    "Grüße aus Köln, schöne Straße",
    "Ça va très bien, merci à vous",
    "Привет, как дела?",
    "こんにちは、メールの試験です",
    "你好，这是一封测试邮件",  # noqa: RUF001 (CJK and Greek text on purpose)
    "Γειά σου Κόσμε",  # noqa: RUF001 (CJK and Greek text on purpose)
    "שלום עולם",
    "emoji: 📬 ✉️ 🔒",
)

_BASE_DATE = datetime.datetime(2024, 1, 1, 8, 0, 0, tzinfo=datetime.UTC)


def corpus(count: int, *, seed: int, large: bool) -> list[bytes]:
    """``count`` messages as a POP3 client must receive them, message 1 first.

    The first messages take the kinds in :data:`KINDS` order; later ones are drawn at random (mostly
    plain text). With ``large``, the message at index ``count // 2`` is replaced by one carrying a
    :data:`LARGE_ATTACHMENT_BYTES` base64 attachment.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = random.Random(seed)
    later_kinds = list(_LATER_WEIGHTS)
    later_weights = list(_LATER_WEIGHTS.values())
    messages: list[bytes] = []
    for index in range(count):
        if large and index == count // 2:
            kind = "large"
        elif index < len(KINDS):
            kind = KINDS[index]
        else:
            kind = rng.choices(later_kinds, later_weights)[0]
        message = _BUILDERS[kind](rng, seed, index)
        check_wire_form(message)
        messages.append(message)
    return messages


def check_wire_form(message: bytes) -> None:
    """Raise ``ValueError`` unless ``message`` has CRLF line endings only and ends with CRLF."""
    if not message.endswith(CRLF):
        raise ValueError("message does not end with CRLF")
    bare = message.replace(CRLF, b"")
    if b"\r" in bare or b"\n" in bare:
        raise ValueError("message contains a bare CR or LF")


def to_lf(message: bytes) -> bytes:
    """The message with LF line endings: how a Unix MTA (Dovecot's LDA among them) stores it."""
    return message.replace(CRLF, b"\n")


def message_id(message: bytes) -> str:
    """The ``Message-ID`` header value of a corpus message."""
    for line in message.split(CRLF):
        if not line:
            break
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii")
    raise ValueError("message has no Message-ID")


# --- building blocks -------------------------------------------------------------------------------


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _paragraphs(rng: random.Random, count: int) -> list[str]:
    """Plain ASCII lines wrapped near 72 columns, paragraphs separated by empty lines."""
    lines: list[str] = []
    for p in range(count):
        if p:
            lines.append("")
        words = " ".join(_sentence(rng, rng.randint(5, 14)) for _ in range(rng.randint(1, 5))).split()
        line = ""
        for word in words:
            if line and len(line) + 1 + len(word) > 72:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def _envelope(rng: random.Random, seed: int, index: int, subject: str) -> dict[str, str]:
    """The headers every message has, in a stable order."""
    sender = rng.choice(("alice", "bob", "carol", "dave", "eve", "mallory"))
    date = _BASE_DATE + datetime.timedelta(days=seed % 1000, minutes=index)
    return {
        "From": f"{sender.title()} Example <{sender}@example.org>",
        "To": "Mailbox Owner <owner@example.net>",
        "Subject": f"[{seed}/{index + 1}] {subject}",
        "Date": email.utils.format_datetime(date),
        "Message-ID": f"<corpus.{seed}.{index + 1}.{rng.getrandbits(48):012x}@popproxy.test>",
    }


def _assemble(headers: dict[str, str], body_lines: list[bytes]) -> bytes:
    """Headers and body joined with CRLF; every line, the last included, ends with CRLF."""
    head = b"".join(f"{name}: {value}".encode() + CRLF for name, value in headers.items())
    return head + CRLF + b"".join(line + CRLF for line in body_lines)


def _from_email(msg: EmailMessage) -> bytes:
    data = msg.as_bytes()
    return data if data.endswith(CRLF) else data + CRLF


# --- the kinds -------------------------------------------------------------------------------------


def _plain(rng: random.Random, seed: int, index: int) -> bytes:
    headers = _envelope(rng, seed, index, _sentence(rng, rng.randint(2, 6)))
    headers["MIME-Version"] = "1.0"
    headers["Content-Type"] = "text/plain; charset=us-ascii"
    lines = _paragraphs(rng, rng.randint(1, 6))
    return _assemble(headers, [line.encode("ascii") for line in lines])


def _dots(rng: random.Random, seed: int, index: int) -> bytes:
    """Lines a POP3 server must dot-stuff (RFC 1939 §3), the body's last line being exactly "."."""
    headers = _envelope(rng, seed, index, "lines that start with dots")
    headers["Content-Type"] = "text/plain; charset=us-ascii"
    tricky = [".", "..", ".foo", "...", ". leading dot and space", ".\t", "..bar", ".", ".", " ."]
    rng.shuffle(tricky)
    lines = [".."]  # the very first body line is stuffed too
    for line in tricky:
        lines.append(line)
        if rng.random() < 0.5:
            lines.extend(_paragraphs(rng, 1))
    lines.append("Text before a final line that is a single dot:")
    lines.append(".")
    return _assemble(headers, [line.encode("ascii") for line in lines])


def _multipart(rng: random.Random, seed: int, index: int) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    for name, value in _envelope(rng, seed, index, "report with attachments").items():
        msg[name] = value
    msg.set_content("\n".join(_paragraphs(rng, rng.randint(1, 3))) + "\n")
    for n in range(rng.randint(1, 2)):
        msg.add_attachment(
            rng.randbytes(rng.randint(100, 40_000)),
            maintype="application",
            subtype="octet-stream",
            filename=f"blob-{seed}-{index + 1}-{n}.bin",
        )
    msg.set_boundary(f"=_corpus_{seed}_{index + 1}_{rng.getrandbits(64):016x}")
    return _from_email(msg)


def _utf8(rng: random.Random, seed: int, index: int) -> bytes:
    """Raw UTF-8 in the headers (RFC 6532) and an 8-bit body: the transport must be 8-bit clean."""
    msg = EmailMessage(policy=email.policy.SMTPUTF8)
    headers = _envelope(rng, seed, index, rng.choice(_UTF8_SNIPPETS))
    headers["From"] = "Zoë Ünïcödé <zoe@example.org>"
    for name, value in headers.items():
        msg[name] = value
    snippets = rng.sample(_UTF8_SNIPPETS, k=4)
    msg.set_content("\n".join(snippets + _paragraphs(rng, 1)) + "\n", cte="8bit")
    return _from_email(msg)


def _empty_body(rng: random.Random, seed: int, index: int) -> bytes:
    """Headers, the empty separator line, and nothing after it."""
    return _assemble(_envelope(rng, seed, index, "no body at all"), [])


def _long_lines(rng: random.Random, seed: int, index: int) -> bytes:
    """Lines of exactly 998 octets (the RFC 5322 §2.1.1 limit), in a header and in the body."""
    headers = _envelope(rng, seed, index, "long lines")
    headers["X-Long-Header"] = "x" * (998 - len("X-Long-Header: "))
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    lines = [
        "".join(rng.choice(alphabet) for _ in range(998)),
        "." + "d" * 997,  # stuffed, it is 999 octets on the wire
        *_paragraphs(rng, 1),
        "y" * 997,
    ]
    return _assemble(headers, [line.encode("ascii") for line in lines])


def _large(rng: random.Random, seed: int, index: int) -> bytes:
    """A multipart message with a :data:`LARGE_ATTACHMENT_BYTES` attachment, built by hand for speed."""
    headers = _envelope(rng, seed, index, "large attachment")
    boundary = f"=_corpus_large_{seed}_{index + 1}"
    headers["MIME-Version"] = "1.0"
    headers["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    text = _paragraphs(rng, 2)
    payload = base64.encodebytes(rng.randbytes(LARGE_ATTACHMENT_BYTES)).replace(b"\n", CRLF)
    body = [
        f"--{boundary}".encode(),
        b"Content-Type: text/plain; charset=us-ascii",
        b"",
        *(line.encode("ascii") for line in text),
        f"--{boundary}".encode(),
        b"Content-Type: application/octet-stream",
        b"Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="large-{seed}-{index + 1}.bin"'.encode(),
        b"",
    ]
    closing = [f"--{boundary}--".encode()]
    return _assemble(headers, body) + payload + b"".join(line + CRLF for line in closing)


_BUILDERS: dict[str, Callable[[random.Random, int, int], bytes]] = {
    "plain": _plain,
    "dots": _dots,
    "multipart": _multipart,
    "utf8": _utf8,
    "empty_body": _empty_body,
    "long_lines": _long_lines,
    "large": _large,
}
