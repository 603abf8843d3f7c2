"""Log observers for ``twistd --logger``: structured events as flat JSON lines.

``twistd -n --logger popproxy.logs.json_stdout popproxy -c FILE`` writes one JSON object per event to
standard output (journald under systemd keeps each as one entry). Every record has the same schema,
whoever logged it (popproxy, a worker process, Twisted itself)::

    {"time": "2026-12-01T21:40:02.123456+00:00", "level": "info", "event": "auth",
     "message": "session 3f2a…: alice logged in to dovecot", "session_id": "3f2a…",
     "client_host": "192.0.2.7", "client_port": 50412, "user": "alice", "upstream": "dovecot", ...}

``event`` and the field names are the audit log's (``session_open``, ``auth``, ``session_close``,
``client_host``, ``client_port``, ``user``, ``upstream``, ``bytes_to_client``, ``client_tls_version``,
...), so one query works on both. Events that name none (Twisted's own, say) have ``event`` ``"log"``
and their logger's namespace in ``logger``. A failure adds ``error`` and ``traceback``. Twisted's
bookkeeping (``log_format``, ``log_flattened``, class and UUID keys) is left out.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

#: Keys of Twisted's own (``log_*``) and of legacy ``twisted.python.log`` events that are either
#: restated as ``time``/``level``/``message``/``logger`` or are bookkeeping nobody queries.
_LEGACY_KEYS = frozenset({"message", "isError", "format", "time", "failure", "system", "printed"})


def flat_record(event: LogEvent) -> dict[str, Any]:
    """``event`` as one flat, JSON-ready record (see the module docstring)."""
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, UTC).isoformat() if isinstance(when, (int, float)) else None,
        "level": level.name if level is not None else "info",
        "event": str(event.get("event") or "log"),
        "message": _message(event),
    }
    if "event" not in event and event.get("log_namespace"):
        record["logger"] = event["log_namespace"]
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure") or event.get("failure")
    if isinstance(failure, Failure):
        record["error"] = f"{type(failure.value).__name__}: {failure.value}"[:1000]
        record["traceback"] = failure.getTraceback()
    return record


def _message(event: LogEvent) -> str:
    try:
        return formatEvent(event)
    except Exception:  # noqa: BLE001  # a broken format string must not lose the record
        return str(event.get("log_format", ""))


def _plain(value: object) -> object:
    """JSON's own types as they are; anything else as its text (never a class name or an id)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        if "__class_uuid__" in value or "unpersistable" in value:
            # Twisted's JSON marker for an object it could not serialise (an event forwarded from a
            # worker): there is no text of it left to show.
            return None
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(ILogObserver)
class FlatJSONObserver:
    """Writes each event as one line of ``flat_record`` JSON to ``stream``."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        self._stream.write(json.dumps(flat_record(event), ensure_ascii=False, default=str) + "\n")
        self._stream.flush()


def json_stdout() -> ILogObserver:
    """Flat JSON lines on standard output (no RFC 7464 record separator: one object per line)."""
    return FlatJSONObserver(sys.stdout)
