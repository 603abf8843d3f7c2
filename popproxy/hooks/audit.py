# -*- test-case-name: tests.test_audit_hook -*-
"""The ``audit-log`` hook: who fetched what, when, from where, with which verdict, as JSON Lines.

One self-contained JSON object per line and event, each with the session id, a UTC timestamp, the
client's address and the user where known, so that any single line can be read on its own (grep,
jq, a SIEM). Records:

- ``session_open``: client address and port, listener.
- ``tls``: the client leg's TLS version and cipher, once the handshake is done.
- ``auth``: user, upstream, result (``ok``, ``refused``, ``unavailable``), the response code sent.
- ``retr`` / ``top``: message number, UIDL, octets delivered, Message-ID and the configured extra
  headers, SHA-256 of the octets delivered (as the client stores them: un-dot-stuffed), whether hooks
  scanned it, the verdicts of the message hooks, and notes (a hook that failed, a message too large).
- ``dele``: message number, UIDL (from the fetch, or from the mailbox listing read at login), the
  result, and the Message-ID (and the SHA-256, after a RETR) if this session fetched it.
- ``commit``: what became of the messages marked deleted (RFC 1939 §6: only QUIT removes them):
  ``outcome`` is ``committed`` (QUIT answered +OK), ``failed`` (QUIT answered -ERR: "some deleted
  messages not removed"), ``undone`` (RSET, or the session ended without QUIT) or ``unknown`` (QUIT
  was sent but its answer was not seen, e.g. the client hung up right after it); with ``reason``,
  ``deleted`` (how many), and ``numbers`` and ``uidls`` in step (the first 100; ``omitted`` counts
  the rest, which their ``dele`` records name). Written once per QUIT, RSET or session end that had
  deletions pending.
- ``session_close``: TLS version and cipher on both legs, the upstream's certificate fingerprint,
  octets each way, duration, and how the session ended.
- ``audit_resumed`` (no session fields): records could not be written from ``since`` until ``ts``
  because of ``error``; the ``kept`` records of that time follow it, with their own ``ts``, and
  ``lost`` records were dropped (more than ``max_kept_records`` or ``max_kept_bytes``).

**One record, one line.** A sender controls the headers recorded. JSON escapes quotes, backslashes
and C0 controls; on top of that every record escapes, as ``\\uXXXX``, lone surrogates (an encoded
word such as ``=?utf-7?q?+2AA-?=`` decodes to U+D800, which has no UTF-8 form, RFC 3629 §3: the
record used to be lost), DEL and the C1 controls (U+0085 NEL among them) and U+2028/U+2029, which end
a line for Python's ``str.splitlines()``, for JavaScript-based tools and for some log shippers. The
JSON still reads back to the same text (RFC 8259 §7).

The hook sees no message bodies: popproxy measures deliveries as they stream past, so auditing alone
never buffers a message. It never sees a password or SASL data either, so it cannot log one.

**Files.** ``path`` is opened at the first record (so that under ``twistd -u/-g`` the user popproxy
runs as creates it), append-only (``O_APPEND``: two writers of one file, a retired hook and its
replacement after a reload, never overwrite each other), mode 0600. A last line left torn by a crash
or a full disk is ended before the next record. ``rotate = "daily"`` or ``"size"`` rotates in
process (Twisted's log files; ``keep`` files are kept, the oldest by date or number deleted).
``rotate = "none"`` (the default) leaves rotation to logrotate: ``conf/popproxy.logrotate`` moves the
file and sends SIGHUP, and on every SIGHUP (``IReopens``, even when the reload itself is refused)
the hook closes the file and opens it again by name, creating it 0600. With ``[process] workers``,
the parent writes the files (``AuditLogFactory.files``).

**Syslog.** ``syslog = true`` sends each record as one datagram through the hook's own
non-blocking Unix datagram socket to ``syslog_socket`` (default ``/dev/log``), framed as glibc's
``syslog()`` frames it for the local daemon (RFC 3164 §4.1): ``<22>popproxy-audit[PID]: {...}``
(PRI 22 = facility mail (2) * 8 + severity info (6)). glibc also puts an RFC 3164 TIMESTAMP after the
PRI; it is left out, as local daemons stamp what they receive (rsyslog's imuxsock ignores a sent
timestamp by default, journald uses its own) and each record has its own ``ts``. The hook never
touches the process-wide ``openlog``/``closelog``, so retiring one hook on reload leaves the others
(and Twisted's own logging) as they were. What syslog may drop, and popproxy cannot see:

- rate limits: journald drops a service's messages beyond ``RateLimitBurst`` per
  ``RateLimitIntervalSec`` (10000 per 30 s by default in current systemd); rsyslog's imuxsock has
  rate limiting off unless ``SysSock.RateLimit.Interval`` is set;
- length: rsyslog cuts messages longer than ``$MaxMessageSize`` (8 KiB by default), which leaves
  the JSON unparseable; records with many or long ``headers`` come close;
- a full queue: when the daemon does not keep up, the kernel refuses the datagram (EAGAIN) and
  popproxy counts it as a write failure (below) rather than wait.

For an audit trail that must be complete, prefer ``path``.

**Write failures.** A record that cannot be written (full disk, the path made a directory, syslog
not reading) starts an episode: it is logged once (event ``audit_write_failed``), the record and
those after it are kept in memory, up to ``max_kept_records`` records and ``max_kept_bytes``
octets (further ones are counted as lost), and every new record tries again (a file is opened again
by name first). The first write that works writes an ``audit_resumed`` record, then the kept ones,
and the episode ends (logged once: ``audit_resumed``). ``on_write_error`` decides what mail does
meanwhile: ``"serve"`` (the default) goes on serving; ``"refuse"`` makes the hook an
``IGatekeeper`` whose ``accepting`` is false during an episode, so RETR, TOP and DELE get ``-ERR
[SYS/TEMP]`` and nothing is fetched or deleted unrecorded. Asking ``accepting`` during an episode
also tries again, at most once a second, so a session whose commands are refused sees writing come
back without waiting for another record; so does a SIGHUP.

**Per-session state** (what a session fetched, its deletions pending, the mailbox listing) exists
from the session's first fetch or DELE to its ``session_closed``, and is bounded by the mailbox;
at most ``max_sessions_tracked`` sessions are tracked (the oldest are forgotten first).

Settings::

    [[hook]]
    use = "audit-log"
    path = "/var/log/popproxy/audit.jsonl"   # or syslog = true (facility mail, ident popproxy-audit)
    syslog_socket = "/dev/log"              # with syslog = true: the daemon's datagram socket
    rotate = "daily"                        # "daily" | "size" | "none" (default "none": logrotate's job)
    max_bytes = 104857600                   # rotate = "size": rotate at this size
    keep = 30                               # rotated files kept (size and daily rotation)
    headers = ["From", "Subject"]           # recorded for each RETR/TOP besides Message-ID
    on_write_error = "serve"                # "serve" | "refuse": RETR/TOP/DELE wait for the log
"""

from __future__ import annotations

import datetime
import errno
import glob
import json
import os
import re
import socket
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from twisted.logger import Logger
from twisted.python.logfile import DailyLogFile, LogFile
from zope.interface import alsoProvides, implementer

from ..config import HookConfig
from .interfaces import (
    Delivery,
    IClosable,
    IGatekeeper,
    IHookFactory,
    IListingObserver,
    IRecordsHeaders,
    IReopens,
    ISessionHook,
    IStartable,
    SessionFacts,
    Verdict,
)

log = Logger()

#: ``on_write_error`` values.
POLICIES = ("serve", "refuse")

#: Escaped as ``\\uXXXX`` besides what JSON escapes: lone surrogates (no UTF-8 form), DEL and the C1
#: controls (U+0085 NEL ends a line), U+2028 LINE SEPARATOR and U+2029 PARAGRAPH SEPARATOR.
_UNSAFE = re.compile("[\ud800-\udfff\x7f-\x9f\u2028\u2029]")

#: RFC 3164 §4.1.1 PRI for facility mail (2) and severity informational (6).
_SYSLOG_PRI = 2 * 8 + 6
#: Errors of a connected datagram socket whose daemon went away or restarted: connect again, once.
_RECONNECT = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ENOENT,
                        errno.EDESTADDRREQ})

_DAY_SUFFIX = re.compile(r"(\d+)_(\d+)_(\d+)")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_record(record: Mapping[str, Any]) -> str:
    """``record`` as one line of JSON (RFC 8259) that any text can go in: it always encodes as UTF-8
    and ``str.splitlines()`` sees one line. Non-ASCII text that is safe stays readable."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    return _UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _verdict(verdict: Verdict) -> dict[str, Any]:
    record: dict[str, Any] = {"hook": verdict.hook}
    for key in ("spam", "score", "threshold", "action"):
        value = getattr(verdict, key)
        if value is not None:
            record[key] = value
    if verdict.details:
        record["details"] = dict(verdict.details)
    return record


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


# -- per-session state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fetched:
    uidl: str | None
    message_id: str | None
    sha256: str | None  # of a whole message (RETR); None after a TOP only


@dataclass(slots=True)
class _SessionAudit:
    """What a session did that later records refer to."""

    listing: Mapping[int, str] | None = None  # number -> UIDL, the session's own mapping (not copied)
    fetched: dict[int, _Fetched] = field(default_factory=dict)
    deleted: dict[int, str | None] = field(default_factory=dict)  # marked deleted since login or RSET


@dataclass(slots=True)
class _Trouble:
    """An episode of records that could not be written."""

    since: str  # when it began (UTC, as ``ts``)
    error: str
    tried: float  # clock() of the last attempt
    lost: int = 0


@implementer(ISessionHook, IRecordsHeaders, IListingObserver, IClosable, IReopens, IStartable)
class AuditLog:
    """Writes one JSON line per session event to a file (optionally rotated) or to syslog.

    :ivar on_write_error: ``"serve"`` or ``"refuse"`` (then the hook also provides ``IGatekeeper``).
    :ivar clock: seconds; paces the retries that asking ``accepting`` makes (``time.monotonic``
        until ``start`` gives the reactor's).
    """

    #: records kept in memory while they cannot be written, at most (then they are counted as lost)
    max_kept_records = 1000
    #: octets (UTF-8) of those records, at most
    max_kept_bytes = 1 << 20
    #: sessions with state (fetched messages, pending deletions) at most; the oldest go first
    max_sessions_tracked = 100_000
    #: seconds between the retries that asking ``accepting`` makes during an episode
    retry_interval = 1.0
    #: message numbers and UIDLs listed in one ``commit`` record, at most
    commit_list_limit = 100

    def __init__(self, name: str, writer: Any, headers: tuple[str, ...], *, on_write_error: str = "serve",
                 target: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        if on_write_error not in POLICIES:
            raise ValueError(f"on_write_error must be one of {POLICIES}, not {on_write_error!r}")
        self.name = name
        self._writer = writer
        self.wanted_headers = headers
        self.on_write_error = on_write_error
        self.target = target or name
        self.clock = clock
        self._sessions: OrderedDict[str, _SessionAudit] = OrderedDict()
        self._kept: deque[str] = deque()
        self._kept_bytes = 0
        self._trouble: _Trouble | None = None
        if on_write_error == "refuse":
            alsoProvides(self, IGatekeeper)

    def start(self, reactor: Any) -> None:
        """``IStartable``: the reactor's clock paces retries (the hook does no I/O of its own beyond
        its writer's, which never waits)."""
        self.clock = reactor.seconds

    # -- IGatekeeper ------------------------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False while records cannot be written. Asking during an episode tries again, at most once
        every ``retry_interval`` seconds."""
        trouble = self._trouble
        if trouble is not None:
            now = self.clock()
            if now - trouble.tried >= self.retry_interval or now < trouble.tried:  # (or the clock went back)
                self._catch_up()
        return self._trouble is None

    @property
    def sessions_tracked(self) -> int:
        """Sessions this hook holds state for (for tests and metrics)."""
        return len(self._sessions)

    # -- writing ---------------------------------------------------------------------------------------

    def _record(self, event: str, session: SessionFacts, **fields: Any) -> None:
        record: dict[str, Any] = {
            "ts": _now(),
            "event": event,
            "session_id": session.session_id,
            "client_host": session.client_host,
            "client_port": session.client_port,
        }
        if session.user is not None:
            record["user"] = session.user
        record.update(fields)
        self._emit(encode_record(record))

    def _emit(self, line: str) -> None:
        if self._trouble is not None:
            self._catch_up(line)
            return
        try:
            self._writer.write(line)
        except Exception as error:
            self._failed(error)
            if not _unsendable(error):
                self._keep(line)
            elif self._trouble is not None:
                self._trouble.lost += 1

    def _failed(self, error: BaseException) -> None:
        """A write failed: an episode begins (logged once)."""
        self._trouble = _Trouble(since=_now(), error=_describe(error), tried=self.clock())
        log.error(
            "audit log {hook}: cannot write to {target}: {error}; records are kept (up to {limit}) and written "
            "when writing works again; meanwhile mail is {doing}",
            event="audit_write_failed", hook=self.name, target=self.target, error=self._trouble.error,
            limit=self.max_kept_records, policy=self.on_write_error,
            doing="served" if self.on_write_error == "serve" else "not moved (RETR, TOP, DELE get -ERR [SYS/TEMP])",
        )

    def _keep(self, line: str) -> None:
        trouble = self._trouble
        assert trouble is not None
        size = len(line.encode("utf-8"))
        if len(self._kept) >= self.max_kept_records or self._kept_bytes + size > self.max_kept_bytes:
            trouble.lost += 1
            return
        self._kept.append(line)
        self._kept_bytes += size

    def _catch_up(self, pending: str | None = None) -> None:
        """During an episode: write ``audit_resumed``, the kept records, then ``pending``. Whatever
        cannot be written yet stays kept."""
        trouble = self._trouble
        assert trouble is not None
        trouble.tried = self.clock()
        resumed = {"ts": _now(), "event": "audit_resumed", "hook": self.name, "since": trouble.since,
                   "error": trouble.error, "kept": len(self._kept), "lost": trouble.lost}
        try:
            self._writer.write(encode_record(resumed))
        except Exception as error:
            trouble.error = _describe(error)
            if pending is not None:
                self._keep(pending)
            return
        self._trouble = None
        log.info("audit log {hook}: writing to {target} again; {kept} kept record(s) follow, {lost} lost since {since}",
                 event="audit_resumed", hook=self.name, target=self.target, kept=resumed["kept"],
                 lost=resumed["lost"], since=resumed["since"])
        while self._kept:
            line = self._kept.popleft()
            self._kept_bytes -= len(line.encode("utf-8"))
            try:
                self._writer.write(line)
            except Exception as error:
                if _unsendable(error):
                    continue  # counted in no episode: the line itself cannot go, the log can
                self._kept.appendleft(line)
                self._kept_bytes += len(line.encode("utf-8"))
                self._failed(error)
                if pending is not None:
                    self._keep(pending)
                return
        if pending is not None:
            self._emit(pending)

    # -- per-session state --------------------------------------------------------------------------------

    def _state(self, session: SessionFacts) -> _SessionAudit:
        state = self._sessions.get(session.session_id)
        if state is None:
            state = self._sessions[session.session_id] = _SessionAudit()
            while len(self._sessions) > self.max_sessions_tracked:
                self._sessions.popitem(last=False)
        return state

    def _commit(self, session: SessionFacts, state: _SessionAudit, outcome: str, reason: str) -> None:
        numbers = sorted(state.deleted)
        listed = numbers[: self.commit_list_limit]
        fields: dict[str, Any] = {"outcome": outcome, "reason": reason, "deleted": len(numbers), "numbers": listed,
                                  "uidls": [state.deleted[number] for number in listed]}
        if len(numbers) > len(listed):
            fields["omitted"] = len(numbers) - len(listed)
        state.deleted.clear()
        self._record("commit", session, **fields)

    # -- ISessionHook ----------------------------------------------------------------------------------

    def session_opened(self, session: SessionFacts) -> None:
        self._record("session_open", session, listener=session.listener)

    def tls_started(self, session: SessionFacts) -> None:
        self._record("tls", session, leg="client", **_tls(session.client_tls, ""))

    def authenticated(self, session: SessionFacts, result: str, code: str | None) -> None:
        fields: dict[str, Any] = {"upstream": session.upstream, "result": result, "code": code}
        if session.plaintext_exempt and not session.client_tls:
            fields["plaintext_from"] = True  # logged in without TLS, as a listed legacy device
        self._record("auth", session, **fields)

    def mailbox_listed(self, session: SessionFacts, uidls: Mapping[int, str]) -> None:
        """The mailbox's UIDLs, read at login (the hook is ``IWantsListing``): so that a DELE of a
        message the session never fetched still names it. Kept by reference until the session ends."""
        self._state(session).listing = uidls

    def command_done(self, session: SessionFacts, command: str, argument: str, ok: bool) -> None:
        if command == "DELE":
            self._dele(session, argument, ok)
            return
        state = self._sessions.get(session.session_id)
        if state is None or not state.deleted or (not ok and command == "RSET"):
            return
        if command == "RSET":  # RFC 1939 §5: unmarks every message marked deleted
            self._commit(session, state, "undone", "RSET")
        elif command == "QUIT":  # RFC 1939 §6: +OK after UPDATE removed them; -ERR if some were not
            self._commit(session, state, "committed" if ok else "failed", f"QUIT answered {'+OK' if ok else '-ERR'}")

    def _dele(self, session: SessionFacts, argument: str, ok: bool) -> None:
        try:
            number: int | None = int(argument.split()[0])
        except (ValueError, IndexError):
            number = None
        state = self._sessions.get(session.session_id)
        if ok and number is not None:
            state = self._state(session)
        fetched = state.fetched.get(number) if state is not None and number is not None else None
        listing = state.listing if state is not None else None
        uidl = fetched.uidl if fetched is not None and fetched.uidl else None
        if uidl is None and listing is not None and number is not None:
            uidl = listing.get(number)
        fields: dict[str, Any] = {"number": number, "result": "ok" if ok else "error", "uidl": uidl}
        if fetched is not None:
            fields["message_id"] = fetched.message_id
            if fetched.sha256 is not None:
                fields["sha256"] = fetched.sha256
        if ok and state is not None and number is not None:
            state.deleted[number] = uidl
        self._record("dele", session, **fields)

    def message_delivered(self, session: SessionFacts, delivery: Delivery) -> None:
        fields: dict[str, Any] = {
            "number": delivery.number,
            "uidl": delivery.uidl,
            "outcome": delivery.outcome,
            "size": delivery.size,
            "sha256": delivery.sha256,
            "message_id": _header(delivery.headers, "Message-ID"),
            "headers": {k: v for k, v in delivery.headers.items() if k.lower() != "message-id"},
            "scanned": delivery.scanned,
            "verdicts": [_verdict(v) for v in delivery.verdicts],
        }
        if delivery.notes:
            fields["notes"] = list(delivery.notes)
        if delivery.outcome == "delivered":
            fetched = self._state(session).fetched
            before = fetched.get(delivery.number)
            whole = delivery.sha256 if delivery.command == "RETR" else before.sha256 if before is not None else None
            fetched[delivery.number] = _Fetched(delivery.uidl, fields["message_id"], whole)
        self._record(delivery.command.lower(), session, **fields)

    def session_closed(self, session: SessionFacts, summary: Mapping[str, Any]) -> None:
        state = self._sessions.pop(session.session_id, None)
        ended = summary.get("ended")
        if state is not None and state.deleted:
            if ended in ("quit", "quit after hang-up"):
                self._commit(session, state, "unknown", f"QUIT sent, its answer not seen ({ended})")
            else:
                self._commit(session, state, "undone", f"session ended without QUIT ({ended})")
        fields = {
            "listener": session.listener,
            "upstream": session.upstream,
            "ended": ended,
            "duration": summary.get("duration"),
            "bytes_from_client": summary.get("bytes_from_client"),
            "bytes_to_client": summary.get("bytes_to_client"),
            "bytes_from_upstream": summary.get("bytes_from_upstream"),
            "bytes_to_upstream": summary.get("bytes_to_upstream"),
            **_tls(session.client_tls, "client_"),
            **_tls(session.upstream_tls, "upstream_"),
        }
        self._record("session_close", session, **fields)

    # -- IReopens, IClosable ------------------------------------------------------------------------------

    def reopen(self) -> None:
        """SIGHUP (logrotate moved the file): open it again by name; during an episode, try again."""
        if isinstance(self._writer, Reopenable):
            try:
                self._writer.reopen()
            except Exception as error:
                if self._trouble is None:
                    self._failed(error)
                else:
                    self._trouble.error, self._trouble.tried = _describe(error), self.clock()
                return
        if self._trouble is not None:
            self._catch_up()

    def close(self) -> None:
        if self._trouble is not None:
            self._catch_up()
        if self._trouble is not None:
            log.error("audit log {hook}: closed with {count} record(s) never written to {target}",
                      event="audit_records_lost", hook=self.name, target=self.target,
                      count=len(self._kept) + self._trouble.lost)
        self._kept.clear()
        self._kept_bytes = 0
        self._writer.close()


def _unsendable(error: BaseException) -> bool:
    """The record itself cannot be written (too long for a datagram), however long one waits."""
    return isinstance(error, OSError) and error.errno == errno.EMSGSIZE


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _tls(facts: Mapping[str, str], prefix: str) -> dict[str, str]:
    names = {"tls_version": "tls_version", "tls_cipher": "tls_cipher", "peer_cert_sha256": "cert_sha256"}
    return {prefix + names[key]: value for key, value in facts.items() if key in names and value}


# -- files ----------------------------------------------------------------------------------------------


def _write_all(file: Any, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file (a raw write may take part of it: a filling disk)."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:
            raise OSError(errno.EIO, "the file took none of the data")
        view = view[written:]


class _AppendingFile:
    """What popproxy changes in Twisted's log files: opened ``O_APPEND`` (two writers of one file
    never overwrite each other) and 0600 (a regular file only: never chmod a device), a torn last line
    ended first, each line written whole."""

    path: str
    closed: bool
    _file: Any

    def _open_appending(self) -> os.stat_result:
        """Open ``path``; return its status as found (before a torn line was ended)."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            found = os.fstat(fd)
            if stat.S_ISREG(found.st_mode):
                if stat.S_IMODE(found.st_mode) != 0o600:
                    try:
                        os.fchmod(fd, 0o600)
                    except OSError:
                        pass  # not ours to change: write to it as it is
                if found.st_size and os.pread(fd, 1, found.st_size - 1) != b"\n":
                    os.write(fd, b"\n")
            self._file = os.fdopen(fd, "ab", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        self.closed = False
        return found


class _KeptLogFile(_AppendingFile, LogFile):
    """No rotation (``rotateLength`` None: logrotate's job), or rotation by size (Twisted's)."""

    def _openFile(self) -> None:
        self._open_appending()
        self.size = os.fstat(self._file.fileno()).st_size

    def write(self, data: str) -> None:
        if self.shouldRotate():
            self.flush()
            self.rotate()
        raw = data.encode("utf-8")
        _write_all(self._file, raw)
        self.size += len(raw)


class _KeptDailyLogFile(_AppendingFile, DailyLogFile):
    """Twisted's daily log file, deleting the oldest dated files beyond ``keep``, by date."""

    def __init__(self, name: str, directory: str, keep: int) -> None:
        self.keep = keep
        super().__init__(name, directory, defaultMode=0o600)

    def _openFile(self) -> None:
        found = self._open_appending()
        self.lastDate = self.toDate(found.st_mtime)

    def write(self, data: str) -> None:
        if self.shouldRotate():
            self.flush()
            self.rotate()
        _write_all(self._file, data.encode("utf-8"))
        self.lastDate = max(self.lastDate, self.toDate())

    def rotate(self) -> None:
        super().rotate()
        # Twisted names a day's file "<name>.2026_9_30" (no zero padding): sort by the date itself.
        dated = []
        for found in glob.glob(glob.escape(self.path) + ".*"):
            match = _DAY_SUFFIX.fullmatch(found[len(self.path) + 1 :])
            if match:
                dated.append((tuple(int(part) for part in match.groups()), found))
        dated.sort()
        for _day, old in dated[: max(0, len(dated) - self.keep)]:
            try:
                os.unlink(old)
            except FileNotFoundError:
                pass


@runtime_checkable
class Reopenable(Protocol):
    """An audit file that can be opened again by name (``FileWriter``; a worker's forwarded file,
    written by the parent, cannot)."""

    def reopen(self) -> None: ...


class FileWriter:
    """JSON lines to a file, through Twisted's rotating log files (0600, created if missing).

    The file is opened at the first record, not when the hook is built: building also happens for
    ``--check`` and on reload, and under ``twistd -u/-g`` the file must be created by (and so belong
    to) the user the proxy runs as, or it could not rotate it later. ``write`` raises ``OSError``
    when the line could not be written whole; the file is then closed, and the next ``write`` opens
    it again by name (a fixed disk, a path that is a file again).
    """

    def __init__(self, path: Path, rotate: str, max_bytes: int, keep: int) -> None:
        self._path, self._rotate, self._max_bytes, self._keep = path, rotate, max_bytes, keep
        self._file: Any = None
        self._started = False  # a record was written (or tried): the file is wanted

    def _open(self) -> Any:
        directory, name = str(self._path.parent), self._path.name
        if self._rotate == "daily":
            return _KeptDailyLogFile(name, directory, self._keep)
        return _KeptLogFile(
            name, directory,
            rotateLength=self._max_bytes if self._rotate == "size" else None,
            maxRotatedFiles=self._keep if self._rotate == "size" else None,
            defaultMode=0o600,
        )

    def write(self, line: str) -> None:
        self._started = True
        if self._file is None:
            self._file = self._open()
        try:
            self._file.write(line + "\n")
        except BaseException:
            self._drop()
            raise

    def reopen(self) -> None:
        """Close the file and open it again by its path (logrotate moved it; 0600 if created). Does
        nothing before the first record. Raises ``OSError`` if it cannot be opened; the next
        ``write`` tries again."""
        if not self._started:
            return
        self._drop()
        self._file = self._open()

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> None:
        self._drop()


class SyslogWriter:
    """JSON lines to the local syslog daemon, facility mail, through this writer's own socket.

    A non-blocking ``AF_UNIX``/``SOCK_DGRAM`` socket connected to ``socket_path`` at the first record
    (and again when the daemon restarted), one datagram per record, ``<22>popproxy-audit[pid]: line``
    (RFC 3164 §4.1; see the module docstring). ``write`` raises ``OSError`` if the daemon is not
    there or does not keep up (``BlockingIOError``): it never waits.
    """

    def __init__(self, socket_path: str = "/dev/log", ident: str = "popproxy-audit") -> None:
        self.socket_path = socket_path
        self._ident = ident.encode("ascii")
        self._socket: socket.socket | None = None

    def _connected(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(self.socket_path)
            except BaseException:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def write(self, line: str) -> None:
        datagram = b"<%d>%s[%d]: %s" % (_SYSLOG_PRI, self._ident, os.getpid(), line.encode("utf-8"))
        try:
            self._connected().send(datagram)
        except OSError as error:
            if error.errno not in _RECONNECT:
                raise
            self.close()  # the daemon restarted (a new socket at the same path) or went away
            self._connected().send(datagram)

    def reopen(self) -> None:
        """Connect again at the next record (the daemon may have a new socket)."""
        self.close()

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


class AuditFile(Protocol):
    """Where an audit hook's lines for a file go."""

    def write(self, line: str) -> None: ...
    def close(self) -> None: ...


@implementer(IHookFactory)
class AuditLogFactory:
    #: How a hook with ``path`` opens its file. A worker process (``[process] workers`` > 1) sets
    #: this to send its lines to the parent, the file's one writer (``popproxy.ipc.ForwardedFile``).
    files: Callable[[Path, str, int, int], AuditFile] = FileWriter

    def build(self, config: HookConfig) -> AuditLog:
        options = config.options
        use_syslog = options.boolean("syslog", False)
        path = options.path("path", None)
        syslog_socket: str | None = options.string("syslog_socket", None)
        rotate = options.choice("rotate", ("none", "daily", "size"), "none")
        max_bytes = options.integer("max_bytes", 100 * 1024 * 1024, minimum=1024)
        keep = options.integer("keep", 30, minimum=1)
        headers = tuple(options.strings("headers", ["From", "Subject"]))
        on_write_error = options.choice("on_write_error", POLICIES, "serve")
        options.finish()
        if use_syslog == (path is not None):
            raise options.error("path", "set exactly one of path and syslog = true")
        if syslog_socket is not None and not use_syslog:
            raise options.error("syslog_socket", "only with syslog = true")
        if path is None:
            if syslog_socket == "":
                raise options.error("syslog_socket", "must not be empty")
            target = syslog_socket or "/dev/log"
            return AuditLog(config.name, SyslogWriter(target), headers, on_write_error=on_write_error,
                            target=f"syslog ({target})")
        if not path.parent.is_dir():
            raise options.error("path", f"{path.parent}: no such directory")
        if not os.access(path.parent, os.W_OK):
            raise options.error("path", f"{path.parent}: not writable")
        return AuditLog(config.name, self.files(path, rotate, max_bytes, keep), headers, on_write_error=on_write_error,
                        target=str(path))


factory = AuditLogFactory()
