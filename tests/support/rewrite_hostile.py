"""Hostile messages for the ``rewrite`` hook (issue 10, findings 1 and 2), and how to read the MIME
tree a client sees, for the unit tests and the end-to-end tests alike."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
from email.policy import Policy
from pathlib import Path

from popproxy.config import parse_config
from popproxy.hooks.interfaces import MessageContext, MessageFacts, SessionFacts
from popproxy.hooks.registry import build_hooks
from popproxy.hooks.rewrite import RewriteHook

from support.configs import PREAMBLE

#: The rules the findings were made with: a subject tag, a header, and link defanging.
RULES = (
    "[[hook.rule]]\n"
    'subject_prefix = "[EXT] "\n'
    'add_header = "X-Scanned: popproxy"\n'
    "[[hook.rule.replace]]\n"
    'pattern = "http://"\n'
    'with = "hxxp://"\n'
)

#: No "=" in it: a boundary holding "=_" cannot occur in quoted-printable text (RFC 2045 §6.7, last
#: note), so a sender who wants the decoded text to hold a delimiter picks one without.
SMUGGLE_BOUNDARY = "----_NextPart_4711_0815"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4


def smuggling_message() -> bytes:
    """Finding 1: a quoted-printable text part whose one long line holds ``=0D=0A``, then a delimiter
    of the enclosing multipart and the header of an executable "attachment", all encoded, so that
    every scanner sees one text part and one PDF. The line also holds a link, so that a ``replace``
    rule edits it."""
    boundary = SMUGGLE_BOUNDARY.encode()
    smuggled = (
        b"Please see the invoice at http://invoices.example.com/4711 today.=0D=0A=0D=0A--" + boundary
        + b"=0D=0AContent-Type: application/x-msdownload=0D=0AContent-Transfer-Encoding: base64=0D=0A"
        + b"Content-Disposition: attachment=0D=0A=0D=0ATVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAA=0D=0A"
    )
    # Soft line breaks (RFC 2045 §6.7 rule 5) keep the encoded lines under 76 characters, never
    # inside an =XX.
    lines, rest = [], smuggled
    while len(rest) > 72:
        cut = 72
        while b"=" in rest[cut - 2 : cut]:
            cut -= 1
        lines.append(rest[:cut] + b"=")
        rest = rest[cut:]
    lines.append(rest)
    return (
        b"From: Accounts <accounts@supplier.example>\r\n"
        b"To: hooky@example.org\r\n"
        b"Subject: Invoice 4711\r\n"
        b"Message-ID: <smuggle@popproxy.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n'
        b"\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n" + b"\r\n".join(lines) + b"\r\n"
        b"Regards, accounts\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: application/pdf; name=invoice.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=invoice.pdf\r\n"
        b"\r\n" + base64.encodebytes(PDF).replace(b"\n", b"\r\n") + b"--" + boundary + b"--\r\n"
    )


def deep_message(levels: int = 500) -> bytes:
    """Finding 2: a text part with a link, then ``levels`` multiparts each inside the one before (about
    32 KB for 500), with one more link at the bottom."""
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n" % (level, level)
        for level in range(1, levels)
    )
    closing = b"".join(b"\r\n--n%d--" % level for level in reversed(range(1, levels)))
    return (
        b"From: Newsletter <news@partner.example>\r\n"
        b"To: hooky@example.org\r\n"
        b"Subject: Deep news\r\n"
        b"Message-ID: <deep@popproxy.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=n0\r\n"
        b"\r\n"
        b"--n0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"Read http://news.example.com/today now.\r\n"
        b"--n0\r\n" + opening + b"Content-Type: text/plain\r\n\r\nhttp://deep.example.com/" + closing
        + b"\r\n--n0--\r\n"
    )


def mime_tree(message: bytes, policy: Policy = email.policy.compat32) -> list[tuple[int, str]]:
    """The MIME tree as Python's ``email`` parser reads it: ``(depth, content type)`` per entity, in
    order. Walked without recursion (``Message.walk`` recurses), so that any depth can be read."""
    tree = []
    todo: list[tuple[int, email.message.Message]] = [(0, email.message_from_bytes(message, policy=policy))]
    while todo:
        depth, entity = todo.pop()
        tree.append((depth, entity.get_content_type()))
        payload = entity.get_payload()
        if isinstance(payload, list):
            todo += [(depth + 1, child) for child in reversed(payload)]
    return tree


def rewrite_hook(rules: str, max_added: int = 512) -> RewriteHook:
    """A ``rewrite`` hook with these ``[[hook.rule]]`` tables, built from TOML the way popproxy does."""
    config = f'{PREAMBLE}[[hook]]\nuse = "rewrite"\nmax_added = {max_added}\n{rules}'
    hook = build_hooks(parse_config(config, Path("/etc/popproxy/popproxy.toml")))[0].hook
    assert isinstance(hook, RewriteHook)
    return hook


def message_context(user: str = "hooky@example.org") -> MessageContext:
    return MessageContext(MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user=user), 1, "uidl-1", 1000))
