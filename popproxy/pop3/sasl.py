"""SASL PLAIN (RFC 4616) as carried by POP3 AUTH (RFC 5034)."""

from __future__ import annotations

import binascii
from dataclasses import dataclass


class SaslError(ValueError):
    """The client's SASL data is malformed. The message never contains the data itself."""


@dataclass(frozen=True, slots=True)
class PlainCredentials:
    authzid: bytes
    authcid: bytes
    password: bytes

    def __repr__(self) -> str:  # never let a password reach a log or a traceback
        return f"PlainCredentials(authcid={self.authcid!r}, password=<hidden>)"


def decode_plain(response: bytes) -> PlainCredentials:
    """Decode a PLAIN initial or continuation response.

    RFC 5034 §4: a response of ``=`` stands for an empty one. RFC 4616 §2: the message is
    ``[authzid] NUL authcid NUL passwd``.
    """
    if response == b"=":
        raise SaslError("empty PLAIN response")
    try:
        message = binascii.a2b_base64(response, strict_mode=True)
    except binascii.Error:
        raise SaslError("invalid base64") from None
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN needs authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SaslError("empty user name or password")
    return PlainCredentials(authzid, authcid, password)
