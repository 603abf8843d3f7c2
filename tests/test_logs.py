"""The JSON log's one schema (``popproxy.logs``): flat records with the audit log's names, for
popproxy's events and Twisted's own alike."""

from __future__ import annotations

import io
import json
from datetime import datetime

from twisted.logger import Logger, LogLevel, LogPublisher, eventAsJSON, eventFromJSON
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from popproxy.logs import FlatJSONObserver, flat_record


def _logged(emit) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    publisher = LogPublisher(FlatJSONObserver(stream))
    emit(Logger(namespace="popproxy.protocol.client", observer=publisher))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_session_event_is_flat_with_the_audit_names() -> None:
    [record] = _logged(lambda log: log.info("session {session_id} opened from {client_host}:{client_port}",
                                            event="session_open", session_id="ab12", client_host="192.0.2.7",
                                            client_port=50412, listener="listen[0]"))
    assert record["event"] == "session_open"
    assert record["level"] == "info"
    assert record["message"] == "session ab12 opened from 192.0.2.7:50412"
    assert record["client_host"] == "192.0.2.7" and record["client_port"] == 50412
    assert datetime.fromisoformat(str(record["time"])).utcoffset() is not None
    assert not [key for key in record if key.startswith("log_")], record


def test_twisted_own_events_get_the_same_schema() -> None:
    """Twisted's events (here a legacy ``twisted.python.log`` message, as reactors and twistd still
    emit) name no ``event``: they get "log" and their logger, never ``log_flattened`` or class keys."""
    stream = io.StringIO()
    observer = FlatJSONObserver(stream)
    legacy = {"message": ("Starting factory", "<Factory>"), "isError": 0, "system": "-", "time": 1764625200.0,
              "log_namespace": "log_legacy", "log_level": LogLevel.info, "log_time": 1764625200.0,
              "log_format": "{log_text}", "log_text": "Starting factory <Factory>",
              "log_logger": object(), "log_source": object()}
    observer(legacy)
    record = json.loads(stream.getvalue())
    assert record == {"time": "2025-12-01T21:40:00+00:00", "level": "info", "event": "log",
                      "message": "Starting factory <Factory>", "logger": "log_legacy"}
    assert legacy_log  # the legacy module is what produces such events


def test_a_worker_event_forwarded_as_twisted_json_comes_out_flat() -> None:
    """Workers send their events to the parent as Twisted's JSON (``eventAsJSON``), which the parent
    republishes: the record must not carry ``log_flattened`` or the UUID-keyed class markers."""
    captured: list[dict[str, object]] = []
    Logger(namespace="popproxy.worker", observer=captured.append).warn(
        "worker {index} ready", event="worker_ready", index=1, thing=object())
    forwarded = eventFromJSON(eventAsJSON(captured[0]))
    forwarded["worker"] = 1
    record = flat_record(forwarded)
    assert record["message"] == "worker 1 ready" and record["level"] == "warn" and record["worker"] == 1
    text = json.dumps(record)
    assert "log_" not in text and "__class_uuid__" not in text and "unpersistable" not in text.lower(), text


def test_a_failure_becomes_error_and_traceback() -> None:
    try:
        raise ValueError("bad header")
    except ValueError:
        failure = Failure()
    [record] = _logged(lambda log: log.failure("hook {hook} failed", failure, hook="audit-log"))
    assert record["level"] == "critical"
    assert record["error"] == "ValueError: bad header"
    assert "Traceback" in str(record["traceback"]) and "bad header" in str(record["traceback"])
    assert record["message"] == "hook audit-log failed"


def test_values_json_cannot_hold_become_text() -> None:
    record = flat_record({"log_format": "x", "event": "worker_ready", "path": b"/tmp/\xff", "pair": (1, "a"),
                          "thing": LogLevel.warn})
    assert record["path"] == "/tmp/\ufffd" and record["pair"] == [1, "a"] and record["thing"] == str(LogLevel.warn)
    json.dumps(record)
