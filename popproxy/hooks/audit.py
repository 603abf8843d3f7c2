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
- ``dele``: message number, UIDL, the result, and the Message-ID and SHA-256 if this session fetched it.
- ``session_close``: TLS version and cipher on both legs, the upstream's certificate fingerprint,
  octets each way, duration, and how the session ended.

The hook sees no message bodies: popproxy measures deliveries as they stream past, so auditing alone
never buffers a message. It never sees a password or SASL data either, so it cannot log one.

Settings::

    [[hook]]
    use = "audit-log"
    path = "/var/log/popproxy/audit.jsonl"   # or syslog = true (facility mail, ident popproxy-audit)
    rotate = "daily"                        # "daily" | "size" | "none" (default "none": logrotate's job)
    max_bytes = 104857600                   # rotate = "size": rotate at this size
    keep = 30                               # rotated files kept (size and daily rotation)
    headers = ["From", "Subject"]           # recorded for each RETR/TOP besides Message-ID
"""

from __future__ import annotations

import datetime
import json
import os
import syslog as syslog_module
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from twisted.python.logfile import DailyLogFile, LogFile
from zope.interface import implementer

from ..config import HookConfig
from .interfaces import (
    Delivery,
    IClosable,
    IHookFactory,
    IRecordsHeaders,
    ISessionHook,
    IWantsListing,
    SessionFacts,
    Verdict,
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _verdict(verdict: Verdict) -> dict[str, Any]:
    record: dict[str, Any] = {"hook": verdict.hook}
    for key in ("spam", "score", "threshold", "action"):
        value = getattr(verdict, key)
        if value is not None:
            record[key] = value
    if verdict.details:
        record["details"] = dict(verdict.details)
    return record


class _KeptDailyLogFile(DailyLogFile):
    """Twisted's daily log file, deleting the oldest dated files beyond ``keep``."""

    def __init__(self, name: str, directory: str, keep: int) -> None:
        self.keep = keep
        super().__init__(name, directory, defaultMode=0o600)

    def rotate(self) -> None:
        super().rotate()
        rotated = sorted(Path(self.directory).glob(self.name + ".*"))
        for old in rotated[: max(0, len(rotated) - self.keep)]:
            old.unlink(missing_ok=True)


@implementer(ISessionHook, IRecordsHeaders, IWantsListing, IClosable)
class AuditLog:
    """Writes one JSON line per session event to a file (optionally rotated) or to syslog."""

    def __init__(self, name: str, writer: Any, headers: tuple[str, ...]) -> None:
        self.name = name
        self._writer = writer
        self.wanted_headers = headers
        # Per session: what it fetched, so that a DELE record can say which message went.
        self._fetched: dict[str, dict[int, dict[str, Any]]] = {}

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
        self._writer.write(json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str))

    # -- ISessionHook ----------------------------------------------------------------------------------

    def session_opened(self, session: SessionFacts) -> None:
        self._fetched[session.session_id] = {}
        self._record("session_open", session, listener=session.listener)

    def tls_started(self, session: SessionFacts) -> None:
        self._record("tls", session, leg="client", **_tls(session.client_tls, ""))

    def authenticated(self, session: SessionFacts, result: str, code: str | None) -> None:
        self._record("auth", session, upstream=session.upstream, result=result, code=code)

    def command_done(self, session: SessionFacts, command: str, argument: str, ok: bool) -> None:
        if command != "DELE":
            return
        try:
            number = int(argument.split()[0])
        except (ValueError, IndexError):
            number = None
        fetched = self._fetched.get(session.session_id, {}).get(number or -1, {})
        self._record("dele", session, number=number, result="ok" if ok else "error", **fetched)

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
        if delivery.outcome == "delivered" and delivery.command == "RETR":
            self._fetched.setdefault(session.session_id, {})[delivery.number] = {
                "uidl": delivery.uidl, "message_id": fields["message_id"], "sha256": delivery.sha256,
            }
        self._record(delivery.command.lower(), session, **fields)

    def session_closed(self, session: SessionFacts, summary: Mapping[str, Any]) -> None:
        self._fetched.pop(session.session_id, None)
        fields = {
            "listener": session.listener,
            "upstream": session.upstream,
            "ended": summary.get("ended"),
            "duration": summary.get("duration"),
            "bytes_from_client": summary.get("bytes_from_client"),
            "bytes_to_client": summary.get("bytes_to_client"),
            "bytes_from_upstream": summary.get("bytes_from_upstream"),
            "bytes_to_upstream": summary.get("bytes_to_upstream"),
            **_tls(session.client_tls, "client_"),
            **_tls(session.upstream_tls, "upstream_"),
        }
        self._record("session_close", session, **fields)

    def close(self) -> None:
        self._writer.close()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _tls(facts: Mapping[str, str], prefix: str) -> dict[str, str]:
    names = {"tls_version": "tls_version", "tls_cipher": "tls_cipher", "peer_cert_sha256": "cert_sha256"}
    return {prefix + names[key]: value for key, value in facts.items() if key in names and value}


class FileWriter:
    """JSON lines to a file, through Twisted's rotating log files (0600, created if missing).

    The file is opened at the first record, not when the hook is built: building also happens for
    ``--check`` and on reload, and under ``twistd -u/-g`` the file must be created by (and so belong
    to) the user the proxy runs as, or it could not rotate it later.
    """

    def __init__(self, path: Path, rotate: str, max_bytes: int, keep: int) -> None:
        self._path, self._rotate, self._max_bytes, self._keep = path, rotate, max_bytes, keep
        self._file: Any = None

    def _open(self) -> Any:
        directory, name = str(self._path.parent), self._path.name
        if self._rotate == "daily":
            return _KeptDailyLogFile(name, directory, self._keep)
        return LogFile(
            name, directory,
            rotateLength=self._max_bytes if self._rotate == "size" else None,
            maxRotatedFiles=self._keep if self._rotate == "size" else None,
            defaultMode=0o600,
        )

    def write(self, line: str) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SyslogWriter:
    """JSON lines to the local syslog daemon, facility mail."""

    def __init__(self) -> None:
        syslog_module.openlog("popproxy-audit", syslog_module.LOG_PID, syslog_module.LOG_MAIL)

    def write(self, line: str) -> None:
        syslog_module.syslog(syslog_module.LOG_INFO, line)

    def close(self) -> None:
        syslog_module.closelog()


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
        rotate = options.choice("rotate", ("none", "daily", "size"), "none")
        max_bytes = options.integer("max_bytes", 100 * 1024 * 1024, minimum=1024)
        keep = options.integer("keep", 30, minimum=1)
        headers = tuple(options.strings("headers", ["From", "Subject"]))
        options.finish()
        if use_syslog == (path is not None):
            raise options.error("path", "set exactly one of path and syslog = true")
        if path is None:
            return AuditLog(config.name, SyslogWriter(), headers)
        if not path.parent.is_dir():
            raise options.error("path", f"{path.parent}: no such directory")
        if not os.access(path.parent, os.W_OK):
            raise options.error("path", f"{path.parent}: not writable")
        return AuditLog(config.name, self.files(path, rotate, max_bytes, keep), headers)


factory = AuditLogFactory()
