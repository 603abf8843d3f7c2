"""An audit trail that says when it could not write (issue 10): ``on_write_error = "serve"`` (mail is
served, the failure logged once per episode) or ``"refuse"`` (RETR, TOP and DELE get ``-ERR
[SYS/TEMP]`` while records cannot be written: ``IGatekeeper``). Either way the records of the
episode are kept (bounded) and written once writing works again, after an ``audit_resumed`` record
that says since when, why, and how many were lost.

Tests run as root, which ignores file modes: the audit path is made unwritable by putting a
directory where the file should be (opening fails) or a link to ``/dev/full`` (writing fails).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from popproxy.hooks.audit import AuditLog
from popproxy.hooks.interfaces import IGatekeeper, IReopens, SessionFacts
from popproxy.testing import MemoryProxy

from support.configs import proxy_config

MESSAGES = [b"Message-ID: <one@example.org>\r\nSubject: one\r\n\r\nfirst\r\n",
            b"Message-ID: <two@example.org>\r\nSubject: two\r\n\r\nsecond\r\n"]
LOGIN = b"USER alice\r\nPASS pw\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def opened() -> Iterator[list[MemoryProxy]]:
    proxies: list[MemoryProxy] = []
    yield proxies
    for proxy in proxies:
        proxy.close()


def make(tmp_path: Path, opened: list[MemoryProxy], policy: str) -> tuple[MemoryProxy, AuditLog, Path]:
    log = tmp_path / "audit.jsonl"
    extra = f'[[hook]]\nuse = "audit-log"\npath = "{log}"\non_write_error = "{policy}"\n'
    proxy = MemoryProxy(proxy_config(tmp_path, extra=extra))
    opened.append(proxy)
    proxy.upstreams["main"].add_user("alice", "pw", MESSAGES)
    hook = proxy.hooks[0].hook
    assert isinstance(hook, AuditLog)
    return proxy, hook, log


def records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def episodes(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("event")) for e in events if e.get("event") in ("audit_write_failed", "audit_resumed")]


def test_serve_keeps_serving_logs_once_per_episode_and_catches_up(tmp_path: Path, opened: list[MemoryProxy],
                                                                  logged: list[dict[str, Any]]) -> None:
    proxy, hook, log = make(tmp_path, opened, "serve")
    assert not IGatekeeper.providedBy(hook) and IReopens.providedBy(hook)
    log.mkdir()  # a directory where the file should be: every open fails (EISDIR)
    client, _ = proxy.connect()
    answer = proxy.say(client, LOGIN + b"RETR 1\r\nDELE 1\r\n")
    assert b"+OK %d octets" % len(MESSAGES[0]) in answer and answer.endswith(b"+OK deleted\r\n")  # served, as before the hook
    assert episodes(logged) == ["audit_write_failed"]  # once, not once per record
    failure = next(e for e in logged if e.get("event") == "audit_write_failed")
    assert "Is a directory" in failure["error"] and failure["policy"] == "serve"
    log.rmdir()  # the administrator fixes it
    proxy.say(client, b"QUIT\r\n")  # the next record writes what was kept, after saying what happened
    assert episodes(logged) == ["audit_write_failed", "audit_resumed"]
    rows = records(log)
    assert [row["event"] for row in rows] == [
        "audit_resumed", "session_open", "auth", "retr", "dele", "commit", "session_close"]
    resumed = rows[0]
    assert (resumed["kept"], resumed["lost"]) == (4, 0) and "Is a directory" in resumed["error"]
    assert resumed["since"] <= resumed["ts"] and rows[1]["ts"] <= resumed["ts"]  # kept records keep their own time
    assert "session_id" not in resumed  # about the log, not a session
    assert not [e for e in logged if "session hook {hook} failed" in str(e.get("log_format", ""))]


def test_refuse_stops_mail_while_records_cannot_be_written(tmp_path: Path, opened: list[MemoryProxy],
                                                           logged: list[dict[str, Any]]) -> None:
    proxy, hook, log = make(tmp_path, opened, "refuse")
    verifyObject(IGatekeeper, hook)
    hook.clock = clock = Clock()
    client, _ = proxy.connect()
    assert b"+OK %d octets" % len(MESSAGES[0]) in proxy.say(client, LOGIN + b"RETR 1\r\n")  # writable: served
    assert hook.accepting
    # logrotate-style: the file is moved away, a directory takes its name, SIGHUP reopens: EISDIR.
    log.rename(tmp_path / "audit.jsonl.1")
    log.mkdir()
    hook.reopen()
    assert not hook.accepting
    for command in (b"RETR 2\r\n", b"TOP 2 0\r\n", b"DELE 1\r\n"):
        assert proxy.say(client, command) == b"-ERR [SYS/TEMP] Mail cannot be recorded now, so it is not moved; try again later.\r\n"
    clock.now += 0.5
    log.rmdir()
    assert not hook.accepting  # asked again within a second: no new attempt yet
    clock.now += 1
    assert hook.accepting  # a second later, asking tries again: the file opens, and mail moves
    assert proxy.say(client, b"RETR 2\r\n").startswith(b"+OK")
    assert proxy.say(client, b"QUIT\r\n") == b"+OK Bye\r\n"
    rows = records(log)
    assert rows[0]["event"] == "audit_resumed" and "Is a directory" in rows[0]["error"]
    assert (rows[0]["kept"], rows[0]["lost"]) == (0, 0)  # the reopen failed, no record did
    assert [row["event"] for row in rows[1:]] == ["retr", "session_close"]
    assert [row["event"] for row in records(tmp_path / "audit.jsonl.1")] == ["session_open", "auth", "retr"]
    assert episodes(logged) == ["audit_write_failed", "audit_resumed"]


def test_refuse_with_a_full_disk_from_the_first_record(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    """/dev/full: opening works, every write fails (ENOSPC). Nothing is fetched or deleted."""
    proxy, hook, log = make(tmp_path, opened, "refuse")
    log.symlink_to("/dev/full")
    client, _ = proxy.connect()
    answer = proxy.say(client, LOGIN + b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert answer.count(b"-ERR [SYS/TEMP]") == 2 and answer.endswith(b"+OK Bye\r\n")
    assert proxy.upstreams["main"].mailboxes[b"alice"].remaining() == MESSAGES
    assert not hook.accepting


class Failing:
    """A writer that fails while ``broken`` (as a full disk would) and records what it wrote."""

    def __init__(self) -> None:
        self.broken = True
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        self.lines.append(line)

    def close(self) -> None:
        pass


def test_what_is_kept_is_bounded(logged: list[dict[str, Any]]) -> None:
    writer = Failing()
    hook = AuditLog("audit-log", writer, ())
    total = hook.max_kept_records + 250
    for index in range(total):
        hook.session_opened(SessionFacts(f"s{index}", "192.0.2.1", 1, "listen[0]"))
    writer.broken = False
    hook.session_opened(SessionFacts("after", "192.0.2.1", 1, "listen[0]"))
    rows = [json.loads(line) for line in writer.lines]
    assert rows[0]["event"] == "audit_resumed"
    assert (rows[0]["kept"], rows[0]["lost"]) == (hook.max_kept_records, 250)
    assert [row["session_id"] for row in rows[1:]] == [f"s{i}" for i in range(hook.max_kept_records)] + ["after"]
    assert episodes(logged) == ["audit_write_failed", "audit_resumed"]


def test_kept_records_are_bounded_in_octets_too() -> None:
    writer = Failing()
    hook = AuditLog("audit-log", writer, ())
    big = "x" * 100_000
    for index in range(30):
        hook.session_opened(SessionFacts(f"s{index}", big, 1, "listen[0]"))
    writer.broken = False
    hook.session_opened(SessionFacts("after", "192.0.2.1", 1, "listen[0]"))
    resumed = json.loads(writer.lines[0])
    assert resumed["kept"] * 100_000 <= hook.max_kept_bytes < (resumed["kept"] + 1) * 100_100
    assert resumed["kept"] + resumed["lost"] == 30


def test_a_symlinked_dev_full_is_reported_as_enospc(tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    from popproxy.hooks.audit import FileWriter

    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    writer = FileWriter(link, "none", 1024, 1)
    with pytest.raises(OSError) as error:
        writer.write("{}")
    assert error.value.errno == 28
    writer.close()
    assert os.path.islink(link)
