"""The audit-log hook: JSON Lines records for a scripted session, rotation, syslog, no secrets."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import syslog
from pathlib import Path
from typing import Any

import pytest

from popproxy.config import ConfigError
from popproxy.hooks.registry import build_hooks
from popproxy.pop3.wire import unstuff_body
from popproxy.testing import MemoryProxy

from support.configs import proxy_config

MESSAGES = [
    b"Message-ID: <one@example.org>\r\nFrom: =?utf-8?q?Ann?=\r\n <ann@example.org>\r\nSubject: f\xc3\xafrst\r\n\r\n.dot\r\nbody\r\n",
    b"Message-ID: <two@example.org>\r\nFrom: Bo <bo@example.org>\r\nSubject: =?utf-8?q?s=C3=A9cond?=\r\n\r\nbody 2\r\n",
]
PASSWORD = "Sekr1t-Passw0rd"


OPEN: list[MemoryProxy] = []


@pytest.fixture(autouse=True)
def close_proxies() -> Any:
    yield
    while OPEN:
        OPEN.pop().close()


def make(tmp_path: Path, settings: str, message_hook: bool = False) -> MemoryProxy:
    extra = '[[hook]]\nuse = "audit-log"\n' + settings
    if message_hook:
        extra += '[[hook]]\nuse = "support.samplehooks:tagger"\nreservation = 32\n'
    config = proxy_config(tmp_path, upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}}, extra=extra)
    proxy = MemoryProxy(config)
    OPEN.append(proxy)
    proxy.upstreams["main"].add_user("alice", PASSWORD, MESSAGES)
    return proxy


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("message_hook", [False, True])
def test_scripted_session_records(tmp_path: Path, message_hook: bool) -> None:
    log = tmp_path / "audit.jsonl"
    proxy = make(tmp_path, f'path = "{log}"\nheaders = ["From", "Subject"]\n', message_hook)
    client, _ = proxy.connect()
    proxy.say(client, b"USER alice\r\nPASS wrong\r\n")
    auth = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
    proxy.say(client, b"AUTH PLAIN " + auth + b"\r\n")
    retr = proxy.say(client, b"RETR 1\r\n")
    proxy.say(client, b"TOP 2 0\r\nDELE 1\r\nQUIT\r\n")
    delivered = unstuff_body(retr.partition(b"\r\n")[2])
    text = log.read_text()
    assert PASSWORD not in text and auth.decode() not in text and "wrong" not in text
    rows = records(log)
    assert [row["event"] for row in rows] == ["session_open", "auth", "auth", "retr", "top", "dele", "commit",
                                              "session_close"]
    for row in rows:
        assert row["session_id"] == rows[0]["session_id"]
        assert row["ts"].endswith("Z") and "T" in row["ts"]
        assert row["client_host"] and isinstance(row["client_port"], int)
    opened, failed, ok, retr_row, top_row, dele_row, commit_row, closed = rows
    assert opened["listener"] == "listen[0]" and "user" not in opened
    assert (failed["user"], failed["result"], failed["code"], failed["upstream"]) == ("alice", "refused", "AUTH", "main")
    assert (ok["result"], ok["code"], ok["upstream"]) == ("ok", None, "main")
    assert retr_row["number"] == 1 and retr_row["sha256"] == hashlib.sha256(delivered).hexdigest()
    assert retr_row["size"] == len(delivered)
    assert retr_row["message_id"] == "<one@example.org>"
    # Folded, encoded-word and raw UTF-8 (RFC 6532) values, all readable.
    assert retr_row["headers"] == {"From": "Ann <ann@example.org>", "Subject": "fïrst"}
    assert retr_row["uidl"] == hashlib.sha1(MESSAGES[0]).hexdigest()[:16]
    assert retr_row["scanned"] is message_hook
    assert [v["hook"] for v in retr_row["verdicts"]] == (["support.samplehooks:tagger"] if message_hook else [])
    assert top_row["number"] == 2 and top_row["message_id"] == "<two@example.org>"
    assert top_row["headers"]["Subject"] == "sécond"  # RFC 2047 decoded for the reader
    assert dele_row["number"] == 1 and dele_row["result"] == "ok"
    assert dele_row["message_id"] == "<one@example.org>" and dele_row["sha256"] == retr_row["sha256"]
    assert dele_row["uidl"] == retr_row["uidl"]
    assert (commit_row["outcome"], commit_row["numbers"], commit_row["uidls"]) == ("committed", [1], [retr_row["uidl"]])
    assert closed["ended"] == "quit" and closed["user"] == "alice" and closed["upstream"] == "main"
    assert closed["bytes_to_client"] > len(delivered) and closed["duration"] >= 0


def test_size_rotation_keeps_files(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    proxy = make(tmp_path, f'path = "{log}"\nrotate = "size"\nmax_bytes = 2048\nkeep = 2\n')
    for _ in range(12):
        client, _ = proxy.connect()
        proxy.say(client, b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nRETR 1\r\nQUIT\r\n")
    rotated = sorted(p.name for p in tmp_path.glob("audit.jsonl.*"))
    assert rotated == ["audit.jsonl.1", "audit.jsonl.2"]
    for path in [log, *tmp_path.glob("audit.jsonl.*")]:
        assert path.stat().st_mode & 0o777 == 0o600
        records(path)  # every line of every file is whole JSON


def test_syslog_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records go through the hook's own datagram socket, never the process-wide ``syslog`` module
    (more in test_audit_syslog.py)."""
    monkeypatch.setattr(syslog, "syslog", lambda *args: pytest.fail("the syslog module was used"))
    path = f"/tmp/popproxy-audit-hook-{os.getpid()}.sock"
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(path)
    daemon.settimeout(5)
    try:
        proxy = make(tmp_path, f'syslog = true\nsyslog_socket = "{path}"\n')
        client, _ = proxy.connect()
        proxy.say(client, b"QUIT\r\n")
        sent = [daemon.recv(65536) for _ in range(2)]
    finally:
        daemon.close()
        os.unlink(path)
    prefix = b"<22>popproxy-audit[%d]: " % os.getpid()  # RFC 3164: mail.info
    assert all(datagram.startswith(prefix) for datagram in sent)
    assert [json.loads(datagram[len(prefix) :])["event"] for datagram in sent] == ["session_open", "session_close"]


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ("", "hook[0].path", "exactly one"),
        ('path = "a.jsonl"\nsyslog = true\n', "hook[0].path", "exactly one"),
        ('path = "missing/a.jsonl"\n', "hook[0].path", "no such directory"),
        ('path = "a.jsonl"\nrotate = "hourly"\n', "hook[0].rotate", "must be one of"),
        ('path = "a.jsonl"\nheaders = "From"\n', "hook[0].headers", "must be an array"),
    ],
)
def test_bad_settings(tmp_path: Path, settings: str, key: str, reason: str) -> None:
    config = proxy_config(tmp_path, upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}},
                          extra='[[hook]]\nuse = "audit-log"\n' + settings)
    with pytest.raises(ConfigError) as error:
        build_hooks(config)
    assert error.value.key == key and reason in error.value.reason


def test_audit_log_on_a_full_disk_does_not_stop_the_session(tmp_path: Path) -> None:
    """/dev/full: every write fails with ENOSPC. The session is served (``on_write_error = "serve"``,
    the default), the failure is logged once for the whole episode, and no mail is affected (tests
    run as root, so file modes cannot make a path unwritable). test_audit_write_errors.py has more."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        proxy = make(tmp_path, 'path = "/dev/full"\n')
        client, _ = proxy.connect()
        proxy.say(client, b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        answer = proxy.say(client, b"RETR 1\r\nQUIT\r\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert answer.startswith(b"+OK %d octets\r\n" % len(MESSAGES[0])) and answer.endswith(b"+OK Bye\r\n")
    failures = [e for e in seen if e.get("event") == "audit_write_failed"]
    assert len(failures) == 1 and failures[0]["hook"] == "audit-log"  # once, not once per record
    assert "No space left on device" in failures[0]["error"]
    assert not [e for e in seen if "session hook {hook} failed" in str(e.get("log_format", ""))]
