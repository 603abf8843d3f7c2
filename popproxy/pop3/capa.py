"""CAPA answers (RFC 2449 §5): the proxy's own before login, the upstream's filtered after it."""

from __future__ import annotations

from collections.abc import Iterable

# What the proxy itself does whatever the upstream is: it answers these before login, and relays
# TOP and UIDL (RFC 1939 §7), queues pipelined commands (RFC 2449 §6.6) and sends response codes
# (RFC 2449 §6.5, RFC 3206 §6 for AUTH-RESP-CODE).
_PROXY_CAPABILITIES = (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING")

# Upstream capabilities that still hold when the client talks through the proxy. Everything else is
# dropped: STLS and SASL (the upstream's TLS and mechanisms are not the client's), USER (login is
# over), IMPLEMENTATION (names the upstream's software and version), and any extension whose
# commands the proxy would refuse to relay because it does not know their framing.
_PASSED_AFTER_LOGIN = frozenset(
    {b"TOP", b"UIDL", b"RESP-CODES", b"EXPIRE", b"LOGIN-DELAY", b"UTF8", b"LANG"}
)


def capability_name(line: bytes) -> bytes:
    """The tag of one CAPA line, upper-cased: ``b"SASL PLAIN LOGIN"`` -> ``b"SASL"``."""
    return line.split(b" ", 1)[0].upper()


def before_login(*, stls: bool, user: bool, sasl_plain: bool) -> list[bytes]:
    """The proxy's CAPA in AUTHORIZATION state.

    RFC 2595 §4 and RFC 2449 §5: a client must be able to tell from CAPA whether it may log in now,
    so USER and SASL PLAIN are listed only where login is allowed at this moment (after STLS on a
    listener that requires TLS), and STLS only where it is offered and not yet active.
    """
    lines = []
    if stls:
        lines.append(b"STLS")
    if user:
        lines.append(b"USER")
    if sasl_plain:
        lines.append(b"SASL PLAIN")
    lines.extend(_PROXY_CAPABILITIES)
    return lines


def after_login(upstream_lines: Iterable[bytes]) -> list[bytes]:
    """The upstream's CAPA lines that hold through the proxy, plus PIPELINING, which the proxy
    provides to the client itself whether or not the upstream does."""
    lines = [line for line in upstream_lines if capability_name(line) in _PASSED_AFTER_LOGIN]
    lines.append(b"PIPELINING")
    return lines


def names(lines: Iterable[bytes]) -> frozenset[bytes]:
    return frozenset(capability_name(line) for line in lines)
