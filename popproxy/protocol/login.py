"""Logging in upstream, as a machine with no I/O and no Twisted: greeting, then STLS and the TLS
handshake where the upstream is configured for it, CAPA, USER, PASS, and LIST and UIDL when the
hooks need them.

Each answer is collected whole and bounded. Requests go one at a time, except that USER and PASS
(and LIST and UIDL, when asked for) go in one write where the upstream's CAPA lists PIPELINING
(RFC 2449 §6.6), which saves round trips on every login. Once every answer asked for is in, anything
already received beyond them was sent before anything was asked: it is an unsolicited line and the
upstream is not believed any further. After ``+OK`` to STLS the same bytes are the RFC 2595 §4 /
RFC 3207 §6 injection: discarded, and the handshake starts.

No credential is ever sent before the upstream's TLS handshake has completed (with the certificate
verified) where the upstream is configured for STLS: USER is only asked after ``tls_ready``.

With ``xclient`` (``forward_client = "xclient"``), Dovecot's XCLIENT command goes after STLS, the
handshake and CAPA, and before USER, alone: its answer is checked before any credential is sent. An
upstream that does not offer it, refuses it or does not trust the proxy fails the login as
unavailable with a ``Misconfigured`` effect (an error for the operator), never a silent fallback.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ip_of
from ..pop3 import capa
from ..pop3.framing import MAX_STATUS_LINE, ResponseReader, body_limit
from ..pop3.wire import CRLF, is_ok, response_code, unstuff_lines
from .mailbox import parse_listing

#: The largest login answer collected (CAPA, the greeting); LIST and UIDL have their own bound.
ANSWER_LIMIT = 65536

#: The hop count sent as XCLIENT ``TTL``. Dovecot 2.3 starts every client at ``LOGIN_PROXY_TTL`` (5,
#: src/login-common/login-proxy.h), sends ``TTL=`` one less when it proxies (src/pop3-login/
#: pop3-proxy.c), and refuses to proxy a connection whose TTL is down to 1 ("TTL reached zero -
#: proxies appear to be looping?", src/login-common/login-proxy.c). popproxy is the first hop, as a
#: Dovecot proxy in its place would be: 4, so a loop between Dovecot proxies behind it ends.
XCLIENT_TTL = 4

# Dovecot 2.3's answer to XCLIENT from an address outside login_trusted_networks: "+OK", and the
# parameters ignored (cmd_xclient in src/pop3-login/client.c).
_XCLIENT_UNTRUSTED = b"You are not from trusted IP"

# XCLIENT values are split at single spaces with no escaping (Dovecot's cmd_xclient uses
# t_strsplit(args, " ")); a SESSION longer than 64 octets (LOGIN_MAX_SESSION_ID_LEN) is ignored.
_XCLIENT_SESSION = re.compile(r"[\x21-\x7e]{1,64}")

Listing = tuple[dict[int, int], dict[int, str]]


@dataclass(frozen=True, slots=True)
class SendLine:
    line: bytes = field(repr=False)  # USER and PASS lines carry credentials


@dataclass(frozen=True, slots=True)
class BeginTLS:
    """Start TLS on the upstream connection (its ``+OK`` to STLS arrived)."""


@dataclass(frozen=True, slots=True)
class Warn:
    text: str
    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class Misconfigured:
    """Something an operator must fix (the upstream does not trust the proxy for XCLIENT, say): for
    an error-level log. The login fails as unavailable right after."""

    text: str
    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class Succeeded:
    capabilities: list[bytes]
    listing: Listing | None


@dataclass(frozen=True, slots=True)
class Failed:
    """``refused``: the upstream's verdict on the credentials (``code``, RFC 3206); otherwise the
    upstream is unavailable and ``reason`` says why (never holding a credential)."""

    refused: bool
    code: str | None
    reason: str


LoginEffect = SendLine | BeginTLS | Warn | Misconfigured | Succeeded | Failed


def xclient_command(host: str, port: int, session_id: str, ttl: int = XCLIENT_TTL) -> bytes:
    """The XCLIENT line (without CRLF) for a client at ``host``:``port``, as Dovecot 2.3's pop3-login
    reads it: ``ADDR``, ``PORT``, ``SESSION`` and ``TTL`` (``cmd_xclient``, src/pop3-login/client.c).

    ``ADDR`` is only sent for a real IP address (an IPv4-mapped IPv6 address as its IPv4 address, as
    the upstream would see that client directly), ``PORT`` only with it. A client whose address is
    unknown (a UNIX socket listener) gets no ``ADDR``: the upstream then keeps the proxy's address,
    which is true, rather than a made-up one. ``SESSION`` is left out unless it is 1 to 64 visible
    ASCII characters (Dovecot neither escapes nor accepts longer ones).
    """
    parts = [b"XCLIENT"]
    address = ip_of(host)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = None  # "fe80::1%eth0": Dovecot's net_addr2ip takes no scope
    if address is not None:
        parts.append(b"ADDR=" + str(address).encode("ascii"))
        if 0 < port < 65536:
            parts.append(b"PORT=%d" % port)
    if _XCLIENT_SESSION.fullmatch(session_id):
        parts.append(b"SESSION=" + session_id.encode("ascii"))
    parts.append(b"TTL=%d" % ttl)
    return b" ".join(parts)


class Step(enum.Enum):
    GREETING = "greeting"
    CAPA = "CAPA"
    STLS = "STLS"
    HANDSHAKE = "TLS handshake"
    XCLIENT = "XCLIENT"
    USER = "USER"
    PASS = "PASS"
    LIST = "LIST"
    UIDL = "UIDL"
    DONE = "done"


_MULTILINE = (Step.CAPA, Step.LIST, Step.UIDL)


class UpstreamLogin:
    """One login conversation. Feed it the upstream's bytes (``data``), the end of its TLS handshake
    (``tls_ready``) and the end of the connection (``lost``); it emits what to send and, once, how
    it ended (``Succeeded`` or ``Failed``).

    :param xclient: the XCLIENT line to send before USER (``xclient_command``), or None.
    """

    def __init__(self, name: bytes, password: bytes, emit: Callable[[LoginEffect], None], *, starttls: bool,
                 listing_limit: int | None = None, max_body_line: int | None = None,
                 xclient: bytes | None = None) -> None:
        self._xclient = xclient
        self._greeting_offers_xclient = False
        self._name = name
        self._password = password
        self._emit = emit
        self._starttls = starttls
        self._listing_limit = listing_limit
        self._reader = ResponseReader(_Answers(self), MAX_STATUS_LINE, max_body_line)
        self._expect: deque[Step] = deque([Step.GREETING])  # answers due, in order
        self._state = Step.GREETING  # DONE or HANDSHAKE when no answer is due
        self._tls_done = False
        self.capabilities: list[bytes] = []
        self._sizes: dict[int, int] = {}
        self._status = b""
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def step(self) -> Step:
        """The step whose answer is due next (``HANDSHAKE`` or ``DONE`` when none is)."""
        return self._expect[0] if self._expect else self._state

    @property
    def finished(self) -> bool:
        return self._state is Step.DONE

    @property
    def waiting(self) -> bool:
        """An answer is due (for the glue's watchdog)."""
        return bool(self._expect) and not self.finished

    # -- inputs ---------------------------------------------------------------------------------------

    def data(self, data: bytes) -> None:
        if not self.finished:
            self._reader.feed(data)

    def tls_ready(self) -> None:
        if self._state is Step.HANDSHAKE and not self._expect:
            self._tls_done = True
            self._ask((Step.CAPA, b"CAPA"))

    def lost(self, reason: str) -> None:
        if not self.finished:
            self._fail(f"TLS handshake failed: {reason}" if self.step is Step.HANDSHAKE else reason)

    def leftover(self) -> bytes:
        """What arrived after the last answer: for the session, which treats it as unsolicited."""
        return self._reader.take_buffer()

    # -- the conversation -------------------------------------------------------------------------------

    def _ask(self, *requests: tuple[Step, bytes]) -> None:
        """Send ``requests`` in one write (more than one only where the upstream pipelines)."""
        self._expect.extend(step for step, _ in requests)
        self._emit(SendLine(b"".join(line + CRLF for _, line in requests)))

    def _ask_next(self, step: Step, line: bytes) -> None:
        """Ask for ``step`` unless it was already asked for, pipelined."""
        if step not in self._expect:
            self._ask((step, line))

    def _answered(self, status: bytes, lines: list[bytes]) -> None:
        step = self._expect.popleft()
        if self._reader.pending and not self._expect and step is not Step.STLS:
            # Received before the next request was even sent: not an answer to anything.
            self._emit(Warn("upstream sent an unsolicited line; closing", {}))
            self._fail("unsolicited line during login")
            return
        if step is Step.GREETING:
            if not is_ok(status):
                self._fail("greeting was not +OK")
                return
            # Dovecot announces XCLIENT in its greeting to trusted addresses (and not in CAPA,
            # pop3_client_notify_auth_ready in src/pop3-login/client.c). Over STLS this was read
            # before TLS; believing it only decides whether XCLIENT is tried, inside TLS, and its
            # answer is checked.
            self._greeting_offers_xclient = status.startswith(b"+OK [XCLIENT]")
            if self._starttls:
                # STLS at once: RFC 2595 §4 has the client forget every capability learnt before
                # TLS, so a CAPA before STLS would only cost a round trip. An upstream without STLS
                # answers -ERR, and nothing else is ever sent to it.
                self._ask((Step.STLS, b"STLS"))
            else:
                self._ask((Step.CAPA, b"CAPA"))
        elif step is Step.CAPA:
            self.capabilities = lines if is_ok(status) else []
            if self._xclient is None:
                self._ask_credentials()
            elif self._greeting_offers_xclient or b"XCLIENT" in capa.names(self.capabilities):
                # Alone, never pipelined with USER: no credential goes before its answer is known.
                self._ask((Step.XCLIENT, self._xclient))
            else:
                self._misconfigured(
                    "upstream does not offer XCLIENT (forward_client = \"xclient\"): add the proxy's "
                    "address to the upstream's login_trusted_networks, or set forward_client = \"none\"")
        elif step is Step.XCLIENT:
            if not is_ok(status):
                self._misconfigured("upstream refused XCLIENT (forward_client = \"xclient\")", status)
            elif _XCLIENT_UNTRUSTED in status:
                self._misconfigured(
                    "upstream ignored XCLIENT, it does not trust the proxy: add the proxy's address to "
                    "the upstream's login_trusted_networks, or set forward_client = \"none\"", status)
            else:
                self._ask_credentials()
        elif step is Step.STLS:
            if not is_ok(status):
                self._fail("upstream refused STLS (does it offer it?)")
                return
            # RFC 2595 §4 / RFC 3207 §6: whatever followed the +OK in plain text was not protected
            # by TLS; a man in the middle may have appended answers to commands not sent yet.
            injected = self._reader.take_buffer()
            if injected:
                self._emit(Warn("upstream sent {count} bytes in plain text after +OK to STLS; discarded",
                                {"count": len(injected)}))
            self._state = Step.HANDSHAKE
            self._emit(BeginTLS())
        elif step is Step.USER:
            if is_ok(status):
                self._ask_next(Step.PASS, b"PASS " + self._password)
            else:
                self._refused(status)
        elif step is Step.PASS:
            if not is_ok(status):
                self._refused(status)
            elif self._listing_limit is not None:
                self._ask_next(Step.LIST, b"LIST")
            else:
                self._succeed(None)
        elif step is Step.LIST:
            if not is_ok(status):
                self._fail("LIST/UIDL at login failed: LIST refused")
                return
            self._sizes = {n: int(value) for n, value in parse_listing(lines).items() if value.isdigit()}
            self._ask_next(Step.UIDL, b"UIDL")
        elif step is Step.UIDL:
            uidls = ({n: value.decode("ascii", "replace") for n, value in parse_listing(lines).items()}
                     if is_ok(status) else {})
            self._succeed((self._sizes, uidls))

    def _ask_credentials(self) -> None:
        """USER, and where the upstream pipelines, PASS (and LIST and UIDL) with it."""
        requests = [(Step.USER, b"USER " + self._name)]
        if b"PIPELINING" in capa.names(self.capabilities):
            requests.append((Step.PASS, b"PASS " + self._password))
            if self._listing_limit is not None:
                requests += [(Step.LIST, b"LIST"), (Step.UIDL, b"UIDL")]
        self._ask(*requests)

    def _misconfigured(self, text: str, answer: bytes | None = None) -> None:
        """Fail as unavailable (the client gets ``-ERR [SYS/TEMP]``), telling the operator why."""
        if answer is None:
            self._emit(Misconfigured(text, {}))
        else:
            shown = answer.rstrip(b"\r\n")[:160].decode("ascii", "replace")
            self._emit(Misconfigured(text + "; its answer: {answer}", {"answer": shown}))
        self._fail(text.split(":", 1)[0])

    def _refused(self, status: bytes) -> None:
        code = response_code(status)
        if code is None and b"AUTH-RESP-CODE" in capa.names(self.capabilities):
            # RFC 3206 §6: an upstream that announces AUTH-RESP-CODE marks credential failures with
            # [AUTH]; a refusal without it is about something else (shutting down, say).
            self._fail("login refused without [AUTH] by an AUTH-RESP-CODE upstream")
            return
        self._finish()
        self._emit(Failed(True, code, f"upstream said {code or 'no'}"))

    def _succeed(self, listing: Listing | None) -> None:
        self._finish()
        self._emit(Succeeded(self.capabilities, listing))

    def _fail(self, reason: str) -> None:
        self._finish()
        self._emit(Failed(False, None, reason))

    def _finish(self) -> None:
        self._state = Step.DONE
        self._expect.clear()
        self._reader.pause()

    # -- answers (from the reader) ------------------------------------------------------------------------

    def _status_line(self, line: bytes) -> bool:
        if not self._expect or self.finished:
            self._emit(Warn("upstream sent an unsolicited line; closing", {}))
            self._fail("unsolicited line during login")
            return False
        if self.step is not Step.GREETING and not (line.startswith(b"+OK") or line.startswith(b"-ERR")):
            # RFC 1939 §3: every status line starts with +OK or -ERR. (A bad greeting is refused by
            # name when it is looked at.)
            self._emit(Warn("upstream sent a line that is neither +OK nor -ERR; closing", {}))
            self._fail(f"not a status line in answer to {self.step.value}")
            return False
        has_body = self.step in _MULTILINE and is_ok(line)
        if not has_body:
            self._answered(line, [])
            return False
        self._status, self._parts, self._size = line, [], 0
        self._reader.body_limit = body_limit(line)
        return True

    def _body(self, data: bytes) -> None:
        self._size += len(data)
        limit = self._listing_limit if self.step in (Step.LIST, Step.UIDL) else ANSWER_LIMIT
        if limit is not None and self._size > limit:
            self._fail(f"{self.step.value} answer larger than {limit} bytes")
            return
        self._parts.append(data)

    def _body_ended(self) -> None:
        if self.finished:
            return
        body, self._parts = b"".join(self._parts), []
        self._answered(self._status, unstuff_lines(body))

    def _too_long(self) -> None:
        self._emit(Warn("upstream sent a line or an answer beyond the limits while logging in; closing", {}))
        self._fail("line too long during login")


class _Answers:
    """The login as the response reader's handler (``framing.ResponseHandler``)."""

    def __init__(self, login: UpstreamLogin) -> None:
        self._login = login

    def status_received(self, line: bytes) -> bool:
        return self._login._status_line(line)

    def body_received(self, data: bytes) -> None:
        self._login._body(data)

    def body_ended(self) -> None:
        self._login._body_ended()

    def line_too_long(self) -> None:
        self._login._too_long()
