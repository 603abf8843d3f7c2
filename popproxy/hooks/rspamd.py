"""The ``rspamd`` hook: asks rspamd (``POST /checkv2``) for a verdict and writes the X-Spam headers itself.

Settings (besides the common ``timeout``, ``on_error``, ``max_size``)::

    [[hook]]
    use = "rspamd"
    address = "127.0.0.1:11333"   # rspamd's normal worker: "host", "host:port", "[IPv6]:port" (default)
    # socket = "/run/rspamd/normal.sock"   # or its Unix socket (not both)
    spam_actions = ["reject", "add header", "rewrite subject", "discard", "quarantine"]   # (default)
    # deliver_to = "{user}"       # Deliver-To header (rspamd's per-user settings): {user}, {local}, {domain}
    # settings_id = "pop3"        # Settings-ID header: apply one of rspamd's settings blocks
    headers = true                # false: record the verdict only, leave the message as it is
    header_prefix = "X-Spam-"
    report = false                # also write X-Spam-Report: one line per symbol, the largest score first
    # subject_tag = "[SPAM]"
    max_added = 1024              # octets the headers may add at most (default 1024, 4096 with report)

**What counts as spam** is rspamd's ``action``, not its score: its actions already encode the site's
thresholds (``add header`` at 6, ``reject`` at 15 by default) and its pre-results (GTUBE, a
settings rule, a blocklist) set an action without a score to match. By default ``reject``, ``add
header``, ``rewrite subject``, ``discard`` and ``quarantine`` are spam; ``no action``,
``greylist`` (an SMTP-time delay, meaningless for mail already delivered) and ``soft reject`` (a
temporary failure, e.g. a rate limit) are not. Names are written as rspamd's JSON writes them;
``add_header`` (the config spelling) is accepted too.

The headers follow SpamAssassin's (see ``spamheaders``): ``X-Spam-Status: Yes, score=15.0
required=15.0 tests=GTUBE action=reject``, where ``required`` is rspamd's ``required_score`` (its
``reject`` threshold) and ``action`` is written with ``_`` for spaces. The verdict records
``action`` and ``details={"tests": [...], "symbols": {name: score}}``.

The request carries no ``Pass: all`` (it only makes rspamd run every rule after a pre-result has
decided), no ``IP``/``Helo``/``From``/``Rcpt`` (unknown to a POP3 proxy; never the POP3 user as
``User``, which means an authenticated *sender* to rspamd), and ``Queue-Id: <UIDL>`` so that
rspamd's log can be matched with popproxy's. The message is sent with a Content-Length, in one
write (it is in memory already).

A connection that cannot be made, an HTTP status other than 200, an answer that is not rspamd's
JSON (an ``error`` member, a missing ``action`` or ``score``), or one over 1 MiB raise
:class:`RspamdError`; the hook's ``on_error`` policy applies. Cancelling the Deferred returned by
:meth:`RspamdHook.process` (popproxy does when ``timeout`` expires) aborts the connection.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Final, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ..config import HookConfig
from .interfaces import HookNotStarted, IHookFactory, IMessageHook, IStartable, MessageContext, Verdict
from .spamheaders import (
    ReportEntry,
    ServerAddress,
    SpamMarkup,
    SpamSummary,
    format_template,
    read_markup,
    read_server,
    read_template,
    small,
    sorted_tests,
)

__all__ = ["RspamdError", "RspamdFactory", "RspamdHook", "RspamdResult", "factory", "parse_result", "read_body"]

DEFAULT_PORT: Final = 11333
DEFAULT_MAX_ADDED: Final = 1024
DEFAULT_MAX_ADDED_REPORT: Final = 4096
#: rspamd's actions, as its JSON names them.
ACTIONS: Final = (
    "reject", "soft reject", "rewrite subject", "add header", "greylist", "no action", "discard", "quarantine",
)
DEFAULT_SPAM_ACTIONS: Final = ("reject", "add header", "rewrite subject", "discard", "quarantine")
#: The most octets of answer read from rspamd.
MAX_ANSWER: Final = 1024 * 1024
MAX_VERDICT_TESTS: Final = 200

_T = TypeVar("_T")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UIDL = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 §7


class RspamdError(Exception):
    """rspamd could not be asked, or answered something other than its /checkv2 JSON."""


class RspamdResult:
    """The parts of rspamd's answer the hook uses."""

    __slots__ = ("action", "score", "symbols", "threshold")

    def __init__(self, action: str, score: float, threshold: float, symbols: Sequence[ReportEntry]) -> None:
        self.action = action
        self.score = score
        self.threshold = threshold
        self.symbols = tuple(symbols)


def parse_result(body: bytes, where: str) -> RspamdResult:
    """rspamd's /checkv2 JSON answer. :raises RspamdError: for anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        raise RspamdError(f"rspamd at {where} answered something that is not JSON: {_shown(body)}") from None
    if not isinstance(data, dict):
        raise RspamdError(f"rspamd at {where} answered JSON that is not an object: {_shown(body)}")
    if "error" in data:
        raise RspamdError(f"rspamd at {where} could not check the message: {str(data['error'])[:200]}")
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise RspamdError(f"rspamd at {where} answered without an action: {_shown(body)}")
    score = _number(data.get("score"), "score", where)
    threshold = _number(data.get("required_score", 0.0), "required_score", where)
    symbols = data.get("symbols", {})
    if not isinstance(symbols, dict):
        raise RspamdError(f"rspamd at {where} answered symbols that are not an object")
    entries = []
    for key, symbol in symbols.items():
        if not isinstance(symbol, dict):
            raise RspamdError(f"rspamd at {where} answered a symbol {key[:80]!r} that is not an object")
        name = symbol.get("name", key)
        description = symbol.get("description", "")
        options = symbol.get("options", [])
        if not isinstance(name, str) or not isinstance(description, str) or not isinstance(options, list):
            raise RspamdError(f"rspamd at {where} answered a malformed symbol {key[:80]!r}")
        details = (f"[{', '.join(str(option) for option in options)}]",) if options else ()
        entries.append(ReportEntry(_number(symbol.get("score", 0.0), f"{name}.score", where), name, description, details))
    entries.sort(key=lambda entry: (-entry.score, entry.name))
    return RspamdResult(action, score, threshold, entries)


def _normal_action(action: str) -> str:
    """``add_header``, ``Add Header`` and ``add header`` are the same action."""
    return " ".join(action.lower().replace("_", " ").split())


def _number(value: object, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RspamdError(f"rspamd at {where} answered a {what} that is not a number: {str(value)[:40]!r}")
    return float(value)


def _shown(data: bytes, limit: int = 80) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


def _cancellable(pending: Deferred[_T]) -> Deferred[_T]:
    """A Deferred that fires as ``pending`` does, but fails with ``CancelledError`` once cancelled.

    Cancelling it cancels ``pending``. An ``Agent`` request that is cancelled fails with whatever
    the aborted connection produced (``ConnectionLost``, ``ResponseNeverReceived``,
    ``ConnectingCancelledError``), and popproxy's pipeline only recognises a timeout by the
    ``CancelledError`` that ``Deferred.addTimeout`` turns into a ``TimeoutError``.
    """
    cancelled = False

    def cancel(_: Deferred[_T]) -> None:
        nonlocal cancelled
        cancelled = True
        pending.cancel()

    follower: Deferred[_T] = Deferred(cancel)

    def settle(result: object) -> None:
        if follower.called:
            return  # Deferred.cancel failed it already
        if cancelled:
            follower.errback(CancelledError())
        elif isinstance(result, Failure):
            follower.errback(result)
        else:
            follower.callback(result)  # type: ignore[arg-type]

    pending.addBoth(settle)
    return follower


def _reason(error: BaseException) -> str:
    # twisted.web's client failures carry the underlying failures in ``reasons``.
    if isinstance(error, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)) and error.reasons:
        return "; ".join(reason.getErrorMessage() for reason in error.reasons)
    return f"{type(error).__name__}: {error}"


class _BodyReader(Protocol):
    """Collects a response body, at most ``limit`` octets of it, and fires ``finished``."""

    # IResponse.deliverBody connects it to a TransportProxyProducer: an IPushProducer, not the
    # ITransport that Protocol declares.
    transport: IPushProducer | None  # type: ignore[assignment]

    def __init__(self, finished: Deferred[bytes], limit: int, where: str) -> None:
        self._finished = finished
        self._limit = limit
        self._where = where
        self._buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._finished.errback(RspamdError(f"rspamd at {self._where} sent more than {self._limit} octets"))
            self.close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # PotentialDataLoss: HTTP/1.0 without a length
            self._finished.callback(bytes(self._buffer))
        else:
            self._finished.errback(reason)

    def close(self) -> None:
        """Close the connection (the response's transport can stop, not abort: it is a proxy)."""
        if self.transport is not None:
            self.transport.stopProducing()


def read_body(response: IResponse, limit: int, where: str) -> Deferred[bytes]:
    """The body of ``response``, or :class:`RspamdError` past ``limit`` octets. Cancelling the
    Deferred closes the connection.

    ``twisted.web.client.readBody`` would do but for the limit, and in Twisted 26.10 it warns
    ("Using readBody with a transport that does not have an abortConnection method",
    DeprecationWarning) on every response an ``Agent`` returns: the response's transport is a
    ``TransportProxyProducer``, which has no ``abortConnection``.
    """
    reader: _BodyReader | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if reader is not None:
            reader.close()

    finished: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(finished, limit, where)
    response.deliverBody(reader)
    return finished


@implementer(IBodyProducer)
class _BytesProducer:
    """The request body, written at once: the message is in memory already."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _OneEndpoint:
    """An ``IAgentEndpointFactory`` that always connects to the scanner's address."""

    def __init__(self, endpoint: object) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> object:
        return self._endpoint


@implementer(IMessageHook, IStartable)
class RspamdHook:
    """Asks rspamd about each message; records its verdict and, unless ``markup`` is None, writes
    the headers. ``reservation`` is ``markup.max_added`` (0 without markup)."""

    def __init__(
        self,
        name: str,
        server: ServerAddress,
        markup: SpamMarkup | None,
        *,
        spam_actions: Sequence[str] = DEFAULT_SPAM_ACTIONS,
        deliver_to: str | None = None,
        settings_id: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.server = server
        self.markup = markup
        self.reservation = markup.max_added if markup is not None else 0
        self.spam_actions = frozenset(spam_actions)
        self._deliver_to = deliver_to
        self._settings_id = settings_id
        self._connect_timeout = connect_timeout
        self._agent: Agent | None = None  # made by ``start``
        authority = "localhost" if server.socket is not None else str(server)
        self._url = f"http://{authority}/checkv2".encode("ascii")

    def start(self, reactor: Any) -> None:
        """``IStartable``: the HTTP client rspamd is asked with. One connection per message
        (``persistent=False``): nothing is left open between messages, and cancelling a request
        can simply abort its connection."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        endpoint = self.server.endpoint(reactor, self._connect_timeout)
        self._agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint), pool=pool)

    def process(self, message: bytes, context: MessageContext) -> Deferred[bytes]:
        """A Deferred firing with the message, marked up; cancelling it aborts the connection."""
        return Deferred.fromCoroutine(self._process(message, context))

    async def _process(self, message: bytes, context: MessageContext) -> bytes:
        result = await self.check(message, context)
        spam = _normal_action(result.action) in self.spam_actions
        tests = sorted_tests(entry.name for entry in result.symbols)
        context.add_verdict(
            Verdict(
                hook=self.name,
                spam=spam,
                score=result.score,
                threshold=result.threshold,
                action=result.action,
                details={
                    "tests": list(tests[:MAX_VERDICT_TESTS]),
                    "symbols": small({entry.name: entry.score for entry in result.symbols}),
                },
            )
        )
        if self.markup is None:
            return message
        summary = SpamSummary(
            spam, result.score, result.threshold, tests, (("action", result.action.replace(" ", "_")),), result.symbols
        )
        return self.markup.apply(message, summary)

    def request_headers(self, context: MessageContext) -> Headers:
        """The protocol headers sent with a message (rspamd's ``Deliver-To``, ``Settings-ID``, ...)."""
        headers = Headers({b"User-Agent": [b"popproxy"]})
        deliver_to = format_template(self._deliver_to, context.facts.session.user)
        if deliver_to is not None:
            headers.addRawHeader(b"Deliver-To", deliver_to.encode("ascii"))
        if self._settings_id is not None:
            headers.addRawHeader(b"Settings-ID", self._settings_id.encode("ascii"))
        uidl = context.facts.uidl
        if uidl is not None and _UIDL.fullmatch(uidl):
            headers.addRawHeader(b"Queue-Id", uidl.encode("ascii"))
        return headers

    async def check(self, message: bytes, context: MessageContext) -> RspamdResult:
        """POST ``message`` to ``/checkv2`` and return rspamd's parsed answer."""
        if self._agent is None:
            raise HookNotStarted(f"hook {self.name} was not started")
        where = str(self.server)
        try:
            response = await _cancellable(
                self._agent.request(b"POST", self._url, self.request_headers(context), _BytesProducer(message))
            )
            body = await _cancellable(read_body(response, MAX_ANSWER, where))
        except (RspamdError, CancelledError):
            raise
        except Exception as error:
            raise RspamdError(f"cannot ask rspamd at {where}: {_reason(error)}") from error
        if response.code != 200:
            raise RspamdError(f"rspamd at {where} answered HTTP {response.code}: {_shown(body)}")
        return parse_result(body, where)


@implementer(IHookFactory)
class RspamdFactory:
    """Builds :class:`RspamdHook` from a ``[[hook]]`` table with ``use = "rspamd"``."""

    def build(self, config: HookConfig) -> RspamdHook:
        options = config.options
        server = read_server(options, DEFAULT_PORT)
        spam_actions = []
        for index, action in enumerate(options.strings("spam_actions", list(DEFAULT_SPAM_ACTIONS))):
            normal = _normal_action(action)
            if normal not in ACTIONS:
                known = ", ".join(f'"{known}"' for known in ACTIONS)
                raise options.error(f"spam_actions[{index}]", f"{action!r} is not an rspamd action; known: {known}")
            spam_actions.append(normal)
        deliver_to = read_template(options, "deliver_to")
        settings_id = options.string("settings_id", None)
        if settings_id is not None and not _TOKEN.fullmatch(settings_id):
            raise options.error("settings_id", f"{settings_id!r} must be 1 to 64 letters, digits, '_', '.' or '-'")
        markup = read_markup(
            options,
            default_max_added=DEFAULT_MAX_ADDED,
            default_max_added_report=DEFAULT_MAX_ADDED_REPORT,
            extras=("action",),
        )
        options.finish()
        return RspamdHook(
            config.name,
            server,
            markup,
            spam_actions=spam_actions,
            deliver_to=deliver_to,
            settings_id=settings_id,
            connect_timeout=config.timeout,
        )


factory = RspamdFactory()
