"""The hook contract: what popproxy gives a hook, and what it expects back.

Two kinds of hook, and one object may be both:

- ``IMessageHook`` sees each retrieved message whole (un-dot-stuffed, CRLF line endings), with
  read-only facts about it, and returns it unchanged or rewritten, at once or through a Deferred.
  popproxy buffers a message only when a message hook applies to it, runs the hooks in their
  configured order, enforces each hook's ``timeout`` and ``on_error`` policy, re-stuffs the result
  and keeps the sizes it reported (LIST, STAT, ``+OK n octets``) exact.
- ``ISessionHook`` observes the session: opened, TLS up, authenticated, each command and its outcome,
  each delivered message (with its SHA-256, computed as it streams), closed. Observers are called
  synchronously and must not block; an exception is logged and contained.

A hook is built from its ``[[hook]]`` table by an ``IHookFactory``, found by the table's ``use`` key:
a built-in name, the name of an entry point in the ``popproxy.hooks`` group, or ``"module:attribute"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What is known about a session when an event happens. A snapshot: later events carry newer ones."""

    session_id: str
    client_host: str
    client_port: int
    listener: str
    user: str | None = None
    upstream: str | None = None
    client_tls: Mapping[str, str] = field(default_factory=dict)
    upstream_tls: Mapping[str, str] = field(default_factory=dict)
    #: the client may log in without TLS only because its listener's ``plaintext_from`` names it
    plaintext_exempt: bool = False


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """Read-only facts about one retrieved message."""

    session: SessionFacts
    number: int
    uidl: str | None
    upstream_size: int  # octets, as the upstream's LIST reported them


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a hook concluded about a message, for the audit log and for later hooks' conditions.

    ``spam`` is None for hooks that do not judge spam. ``details`` holds anything else worth
    recording (symbols, the rspamd action, the rewrite rules that matched); keep it small and made of
    JSON types.
    """

    hook: str
    spam: bool | None = None
    score: float | None = None
    threshold: float | None = None
    action: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class MessageContext:
    """Handed to each message hook with the message: the facts, and the verdicts so far.

    Hooks run in order, so a hook sees the verdicts of the hooks before it (a rewrite rule may
    apply "only when spam"). A hook records its own with ``add_verdict``.
    """

    def __init__(self, facts: MessageFacts) -> None:
        self.facts = facts
        self._verdicts: dict[str, Verdict] = {}

    @property
    def verdicts(self) -> Mapping[str, Verdict]:
        return dict(self._verdicts)

    def add_verdict(self, verdict: Verdict) -> None:
        self._verdicts[verdict.hook] = verdict

    def is_spam(self) -> bool:
        """True if any hook so far judged the message spam."""
        return any(v.spam for v in self._verdicts.values())


class MessageRefused(Exception):
    """Raised by a message hook that decided the message must not be delivered (the ``clamav`` hook
    with ``action = "refuse"`` when it finds a virus): not a failure, so ``on_error`` does not apply.

    The client gets ``-ERR [SYS/TEMP]`` for that RETR or TOP, a DELE of the message is refused, and
    the message stays on the server. The verdicts recorded before (the hook's own among them) go to
    the session hooks with the refused delivery; the exception's text becomes its note.
    """


class IMessageHook(Interface):
    """Sees each retrieved message whole, and may rewrite it."""

    name = Attribute("The hook's name in logs and verdicts: the [[hook]] table's `name`, or its `use`.")
    reservation = Attribute(
        """How many octets this hook may add to a message, at most (an int >= 0; 0 if it never grows one).

        popproxy adds the reservations of the hooks that apply to a message to the size it reports in
        LIST, STAT and RETR, so that the sizes stay exact (RFC 1939 §5: real fetchers reject a message
        whose size does not match). A rewrite that would grow a message by more counts as a failure
        of this hook (its `on_error` policy applies)."""
    )

    def process(message: bytes, context: MessageContext) -> Any:
        """Return the message, unchanged or rewritten, as ``bytes`` or a Deferred firing with bytes.

        ``message`` is un-dot-stuffed, with CRLF line endings, ending with CRLF; return the same
        form. Raise (or fail the Deferred) when the message cannot be processed; the hook's
        ``on_error`` policy then applies. Raise ``MessageRefused`` to keep the message from the
        client whatever ``on_error`` says. A returned Deferred may be cancelled when the hook's
        ``timeout`` expires: give it a canceller that drops whatever connection it holds.
        """


class IChunkedHook(IMessageHook):
    """A message hook that can read a message in chunks (a scanner that streams it, as clamd's
    INSTREAM does). A message larger than ``[limits] spool_above`` is kept in a temporary file, not
    in memory; such a hook is then given its chunks, and the message is delivered from the file
    unless the hook returns a new one. A hook that only has ``process`` is given the message whole,
    in memory, as ever (its ``max_size`` bounds what that costs)."""

    def process_chunks(chunks: Iterator[bytes], size: int, context: MessageContext) -> Any:
        """Read the message (``size`` octets, un-dot-stuffed, CRLF line endings) from ``chunks``;
        return None (or a Deferred firing with None) to leave it as it is, or the whole new message
        as bytes, as ``process`` would. Raise as ``process`` would (``on_error``, ``MessageRefused``)."""


class ISessionHook(Interface):
    """Observes a session's events. Called synchronously; must not block or raise."""

    def session_opened(session: SessionFacts) -> None:
        """A client connected."""

    def tls_started(session: SessionFacts) -> None:
        """The client leg finished a TLS handshake (STLS or implicit TLS); see ``session.client_tls``."""

    def authenticated(session: SessionFacts, result: str, code: str | None) -> None:
        """A login attempt ended: ``result`` is "ok", "refused" (credentials) or "unavailable"
        (upstream down; the client may try again). ``code`` is the RFC 3206 code sent to the client."""

    def command_done(session: SessionFacts, command: str, argument: str, ok: bool) -> None:
        """A command relayed in TRANSACTION state was answered (``ok``: +OK). Never carries a
        credential: USER, PASS and AUTH are reported by ``authenticated`` only."""

    def message_delivered(session: SessionFacts, delivery: Delivery) -> None:
        """The answer to a RETR or TOP was delivered (or refused) to the client."""

    def session_closed(session: SessionFacts, summary: Mapping[str, Any]) -> None:
        """The session ended; ``summary`` has bytes each way, duration and how it ended."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One RETR or TOP answer as the client got it."""

    command: str  # "RETR" or "TOP"
    number: int
    uidl: str | None
    size: int  # octets delivered to the client (un-stuffed), 0 if refused
    sha256: str | None  # of the octets delivered (un-stuffed), None if refused
    headers: Mapping[str, str]  # Message-ID and the configured extra headers, as found
    scanned: bool  # whether message hooks ran on it (False: too large, or none applies)
    outcome: str  # "delivered", "refused" (a hook said so, -ERR [SYS/TEMP]), "error" (upstream -ERR)
    verdicts: tuple[Verdict, ...] = ()
    notes: tuple[str, ...] = ()  # e.g. "spamd: timed out, passed unchanged"


class IRecordsHeaders(Interface):
    """A session hook that wants headers of each delivered message in its ``Delivery``."""

    wanted_headers = Attribute("Header names (str) to record for each RETR/TOP besides Message-ID.")


class IWantsListing(Interface):
    """A session hook that wants every delivery to carry its message's UIDL: popproxy then reads
    LIST and UIDL once at login (a few octets a message), as it does for message hooks."""


class IListingObserver(IWantsListing):
    """A session hook that wants the mailbox's UIDLs themselves (the audit log: a DELE of a message
    never fetched is named by its UIDL)."""

    def mailbox_listed(session: SessionFacts, uidls: Mapping[int, str]) -> None:
        """The UIDL of each message number, read once at login; a read-only view of the session's
        own mapping, valid until ``session_closed``."""


class IStaged(Interface):
    """A message hook that must see the message at a particular point of the pipeline."""

    stage = Attribute(
        """``"received"``: before every other hook (the upstream's bytes); ``"delivered"``: after
        them (what the client gets); anything else: in configured order."""
    )


class IClosable(Interface):
    """A hook that holds something open (a file, a connection) and must be closed when the proxy
    stops or a reload retires it."""

    def close() -> None:
        """Release what the hook holds; called once."""


class IStartable(Interface):
    """A hook that does I/O (talks to a scanner, uses threads). Building a hook does none, so that
    ``--check`` and a reload that is refused start nothing; the service starts the hook with its
    reactor before the hook's first message, and closes it (``IClosable``) when it is retired."""

    def start(reactor: Any) -> None:
        """Begin: keep ``reactor`` (``IReactorTCP``, ``IReactorUNIX``, ``IReactorTime``,
        ``IReactorThreads``) for everything the hook does. Called once, before ``process``."""


class HookNotStarted(Exception):
    """A hook that needs ``IStartable.start`` was used before it."""


class IReopens(Interface):
    """A hook that writes to a file another program may move (logrotate): on every SIGHUP, even when
    the reload itself is refused, popproxy asks it to open its file again by name."""

    def reopen() -> None:
        """Close the file and open it again by its path (created if it was moved away)."""


class IGatekeeper(Interface):
    """A session hook whose records must exist before mail moves (the audit log with
    ``on_write_error = "refuse"``): while ``accepting`` is false, RETR, TOP and DELE are answered
    ``-ERR [SYS/TEMP]`` and never reach the upstream, so nothing is fetched or deleted unrecorded."""

    accepting = Attribute("bool: whether the hook can record what happens now (its last write succeeded).")


class IHookFactory(Interface):
    """Builds hooks from ``[[hook]]`` tables. Register one under the ``popproxy.hooks`` entry point
    group (or name it as ``"module:attribute"``) to make a hook available to ``use``."""

    def build(config: Any) -> Any:
        """Return a hook (``IMessageHook`` and/or ``ISessionHook`` provider) for ``config``, a
        ``popproxy.config.HookConfig``. Read the hook's own settings with ``config.options`` (typed
        getters whose errors name the file and key) and call ``config.options.finish()`` last, so that
        unknown keys are refused. Raise ``ConfigError`` for anything else that is wrong.
        """
