"""Which commands popproxy relays in TRANSACTION state, and how their responses are framed.

A proxy that relays a command whose response framing it does not know would desynchronise the session
the first time the answer is multi-line, so only commands listed here are relayed; anything else gets
``-ERR`` from the proxy itself.
"""

from __future__ import annotations

import enum

from .wire import Command


class Body(enum.Enum):
    """When a positive answer to a command is multi-line."""

    NEVER = enum.auto()
    ALWAYS = enum.auto()
    WITHOUT_ARGS = enum.auto()


# RFC 1939 §5 and §7, RFC 2449 §5, RFC 6856 (UTF8, LANG).
_FRAMING: dict[bytes, Body] = {
    b"STAT": Body.NEVER,
    b"LIST": Body.WITHOUT_ARGS,
    b"UIDL": Body.WITHOUT_ARGS,
    b"RETR": Body.ALWAYS,
    b"TOP": Body.ALWAYS,
    b"DELE": Body.NEVER,
    b"RSET": Body.NEVER,
    b"NOOP": Body.NEVER,
    b"QUIT": Body.NEVER,
    b"CAPA": Body.ALWAYS,
    b"LAST": Body.NEVER,
    b"UTF8": Body.NEVER,
    b"LANG": Body.WITHOUT_ARGS,
}

# Relayed whether or not the upstream's CAPA lists them: RFC 1939's own commands (TOP and UIDL are
# optional there, and the upstream answers -ERR itself when it lacks them) and CAPA.
_ALWAYS_RELAYED = frozenset(
    {b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"QUIT", b"CAPA"}
)
# Relayed only when the upstream advertises the capability of the same name.
_RELAYED_IF_ADVERTISED = frozenset({b"UTF8", b"LANG"})


def is_relayable(command: Command, upstream_capabilities: frozenset[bytes]) -> bool:
    """True if ``command`` may be sent upstream in TRANSACTION state."""
    if command.verb in _ALWAYS_RELAYED:
        return True
    return command.verb in _RELAYED_IF_ADVERTISED and command.verb in upstream_capabilities


def expects_body(command: Command) -> bool:
    """True if a ``+OK`` answer to ``command`` is followed by a multi-line body (RFC 1939 §3)."""
    framing = _FRAMING.get(command.verb, Body.NEVER)
    if framing is Body.WITHOUT_ARGS:
        return not command.args
    return framing is Body.ALWAYS
