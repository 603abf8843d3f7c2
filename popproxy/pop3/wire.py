"""Command lines, status lines and response codes (RFC 1939 §3, RFC 2449 §8, RFC 3206)."""

from __future__ import annotations

import re
from dataclasses import dataclass

CRLF = b"\r\n"

# RFC 2449 §4: "The maximum length of a command is increased from 47 characters (4 character command,
# single space, 40 character argument, CRLF) to 255 octets, including the terminating CRLF."
MAX_COMMAND_LINE = 255

# RFC 5034 §4: AUTH continuation lines carry base64 SASL data and are not bound by the command limit.
MAX_SASL_LINE = 8192

_RESPONSE_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/\-]+)\]")


@dataclass(frozen=True, slots=True)
class Command:
    """One client command line: the keyword upper-cased, the arguments as sent.

    ``rest`` keeps everything after the first space untouched, because PASS takes the whole remainder
    of the line as the password (RFC 1939 §7: "a server may treat spaces in the argument as part of
    the password").
    """

    verb: bytes
    args: tuple[bytes, ...]
    rest: bytes

    def to_line(self) -> bytes:
        """The command as it is sent upstream: keyword, the client's arguments, CRLF."""
        if self.rest:
            return self.verb + b" " + self.rest + CRLF
        return self.verb + CRLF


def parse_command(line: bytes) -> Command | None:
    """Parse a line (without its terminator). Return None for a blank line.

    Keywords are case-insensitive (RFC 1939 §3); arguments keep their case.
    """
    verb, _, rest = line.lstrip(b" ").partition(b" ")
    if not verb:
        return None
    return Command(verb.upper(), tuple(rest.split()), rest)


def has_forbidden_bytes(data: bytes) -> bool:
    """True if ``data`` holds CR, LF or NUL: never allowed inside a command we send upstream."""
    return b"\r" in data or b"\n" in data or b"\0" in data


def is_ok(line: bytes) -> bool:
    """True for a positive status line (``+OK``, RFC 1939 §3)."""
    return line.startswith(b"+OK")


def response_code(line: bytes) -> str | None:
    """The RFC 2449 §8 response code of an ``-ERR`` line, upper-cased, e.g. ``"SYS/TEMP"``."""
    match = _RESPONSE_CODE.match(line)
    return match.group(1).decode("ascii").upper() if match else None


def ok(text: str = "") -> bytes:
    return b"+OK" + (b" " + text.encode("ascii") if text else b"") + CRLF


def err(text: str, code: str | None = None) -> bytes:
    """An ``-ERR`` line, with an RFC 2449 §8 response code where one fits."""
    prefix = f"[{code}] " if code else ""
    return f"-ERR {prefix}{text}".encode("ascii") + CRLF


def multiline(status: bytes, lines: list[bytes]) -> bytes:
    """A whole multi-line response, each line dot-stuffed (RFC 1939 §3), with its terminator."""
    return status + b"".join(stuff_line(item) + CRLF for item in lines) + b"." + CRLF


def stuff_line(line: bytes) -> bytes:
    """RFC 1939 §3: a line that starts with the termination octet gets one more in front."""
    return b"." + line if line.startswith(b".") else line


def unstuff_lines(body: bytes) -> list[bytes]:
    """The lines of a complete wire body (terminator included), dot-stuffing removed."""
    if not body:
        return []
    lines = body[: -len(b"." + CRLF)].split(CRLF)[:-1]
    return [line[1:] if line.startswith(b".") else line for line in lines]


def stuff_body(message: bytes) -> bytes:
    """A message (CRLF line endings, ending in CRLF) as a multi-line body: dot-stuffed, terminated
    (RFC 1939 §3). A message that does not end with CRLF gets one, as POP3 requires."""
    if message and not message.endswith(CRLF):
        message += CRLF
    return (CRLF + message).replace(b"\r\n.", b"\r\n..")[2:] + b"." + CRLF


def unstuff_body(body: bytes) -> bytes:
    """The message in a complete wire body (terminator included): the inverse of ``stuff_body``."""
    return (CRLF + body[: -len(b"." + CRLF)]).replace(b"\r\n..", b"\r\n.")[2:]
