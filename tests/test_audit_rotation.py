"""The audit-log file and its rotation (issue 10): daily rotation keeps the newest files by date
(finding 7); with ``rotate = "none"`` logrotate moves the file and popproxy opens it again by name
(finding 8, with a real ``logrotate`` run on ``conf/popproxy.logrotate``); lines stay whole."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from popproxy.hooks.audit import FileWriter
from popproxy.hooks.interfaces import IReopens, SessionFacts
from popproxy.hooks.registry import build_hooks

from support.configs import proxy_config

LOGROTATE = shutil.which("logrotate", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
SHIPPED = Path(__file__).resolve().parent.parent / "conf" / "popproxy.logrotate"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- finding 7: "keep" keeps the newest days, by date -------------------------------------------------


def test_daily_rotation_keeps_the_newest_dates_not_the_largest_strings(tmp_path: Path) -> None:
    """Twisted names a day's file ``<name>.2025_9_30``: as strings, ``2025_10_1`` sorts before
    ``2025_9_28``, so the newest days were deleted and the oldest kept."""
    log = tmp_path / "audit.jsonl"
    for day in ("2025_9_28", "2025_9_29", "2025_9_30", "2025_10_1"):
        (tmp_path / f"audit.jsonl.{day}").write_text(f'{{"day":"{day}"}}\n')
    (tmp_path / "audit.jsonl.notes").write_text("not a rotated file: left alone\n")
    log.write_text('{"day":"2025_10_2"}\n')
    stamp = datetime.datetime(2025, 10, 2, 12, 0).timestamp()  # local time, as DailyLogFile reads it
    os.utime(log, (stamp, stamp))
    writer = FileWriter(log, "daily", 1024, 3)
    writer.write('{"day":"today"}')  # the first write after midnight rotates
    writer.close()
    kept = sorted(p.name for p in tmp_path.glob("audit.jsonl.*"))
    assert kept == ["audit.jsonl.2025_10_1", "audit.jsonl.2025_10_2", "audit.jsonl.2025_9_30", "audit.jsonl.notes"]
    assert lines(log) == ['{"day":"today"}']
    assert log.stat().st_mode & 0o777 == 0o600


# --- finding 8: reopen by name ----------------------------------------------------------------------


def facts(session_id: str) -> SessionFacts:
    return SessionFacts(session_id, "192.0.2.1", 40000, "listen[0]")


def build_file_hook(tmp_path: Path, log: Path) -> Any:
    (built,) = build_hooks(proxy_config(tmp_path, extra=f'[[hook]]\nuse = "audit-log"\npath = "{log}"\n'))
    assert IReopens.providedBy(built.hook)
    return built


def test_reopen_follows_a_moved_file_and_creates_it_0600(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    built = build_file_hook(tmp_path, log)
    hook = built.hook
    old_umask = os.umask(0)  # whatever the umask, the new file is 0600
    try:
        hook.session_opened(facts("one"))
        log.rename(tmp_path / "audit.jsonl.1")
        hook.session_opened(facts("two"))  # still the moved file: nobody said to reopen
        hook.reopen()
        assert log.exists() and log.stat().st_mode & 0o777 == 0o600
        hook.session_opened(facts("three"))
    finally:
        os.umask(old_umask)
        built.close()
    assert [json.loads(line)["session_id"] for line in lines(tmp_path / "audit.jsonl.1")] == ["one", "two"]
    assert [json.loads(line)["session_id"] for line in lines(log)] == ["three"]


def test_reopen_before_the_first_record_creates_nothing(tmp_path: Path) -> None:
    """The file is opened at the first record (so that it belongs to the user popproxy runs as);
    a SIGHUP before that changes nothing."""
    log = tmp_path / "audit.jsonl"
    built = build_file_hook(tmp_path, log)
    built.hook.reopen()
    assert not log.exists()
    built.close()


def test_two_writers_of_one_file_append_and_never_overwrite(tmp_path: Path) -> None:
    """A reload that changes the hook's settings keeps the old hook for the sessions that started
    with it: two writers of one file for a while. Each line must land after the other's."""
    log = tmp_path / "audit.jsonl"
    first, second = FileWriter(log, "none", 1024, 1), FileWriter(log, "none", 1024, 1)
    for index in range(5):
        first.write(f'{{"w":1,"n":{index}}}')
        second.write(f'{{"w":2,"n":{index}}}')
    first.close()
    second.close()
    assert len(lines(log)) == 10 and all(json.loads(line) for line in lines(log))


def test_a_torn_last_line_is_ended_before_the_next_record(tmp_path: Path) -> None:
    """A crash or a full disk can leave half a line: the next record starts on a line of its own."""
    log = tmp_path / "audit.jsonl"
    log.write_text('{"whole":1}\n{"torn":')
    writer = FileWriter(log, "none", 1024, 1)
    writer.write('{"next":2}')
    writer.close()
    assert lines(log) == ['{"whole":1}', '{"torn":', '{"next":2}']


# --- finding 8: a real logrotate run with the shipped configuration ----------------------------------


def logrotate_config(tmp_path: Path, log: Path, postrotate: str) -> Path:
    """``conf/popproxy.logrotate`` for a test: its path and its postrotate command replaced."""
    text = SHIPPED.read_text()
    assert "/var/log/popproxy/audit.jsonl" in text and "postrotate" in text
    text = text.replace("/var/log/popproxy/audit.jsonl", str(log))
    head, _, rest = text.partition("postrotate\n")
    _, _, tail = rest.partition("endscript")
    config = tmp_path / "logrotate.conf"
    config.write_text(f"{head}postrotate\n        {postrotate}\n    endscript{tail}")
    return config


def run_logrotate(config: Path, state: Path) -> subprocess.CompletedProcess[str]:
    assert LOGROTATE is not None, "logrotate is not installed: run scripts/setup (Debian package logrotate)"
    # -f: rotate now, whatever the daily schedule says; -s: our own state file, not the system's.
    return subprocess.run([LOGROTATE, "-f", "-s", str(state), str(config)], capture_output=True, text=True, timeout=60)


def test_the_shipped_logrotate_configuration_parses_and_says_what_it_must() -> None:
    text = SHIPPED.read_text()
    for directive in ("daily", "rotate ", "compress", "delaycompress", "missingok", "notifempty", "postrotate",
                      "endscript"):
        assert directive in text, directive
    assert "kill -HUP" in text and "/run/popproxy.pid" in text
    assert "copytruncate" not in text.split("#")[0]  # popproxy reopens; copytruncate would lose lines


def test_logrotate_moves_the_file_and_the_hook_reopens_it(tmp_path: Path) -> None:
    """logrotate's postrotate sends SIGHUP; here to this test process, whose handler does what the
    service does on SIGHUP (``IReopens.reopen`` on each hook). Run twice: the second run compresses
    the first rotation (``delaycompress``)."""
    log = tmp_path / "audit.jsonl"
    built = build_file_hook(tmp_path, log)
    hook = built.hook
    config = logrotate_config(tmp_path, log, f"kill -HUP {os.getpid()}")
    hups: list[int] = []

    def on_hup(signum: int, frame: object) -> None:
        hups.append(signum)
        hook.reopen()

    previous = signal.signal(signal.SIGHUP, on_hup)
    try:
        hook.session_opened(facts("day-1"))
        first = run_logrotate(config, tmp_path / "state")
        assert first.returncode == 0, first.stderr
        assert hups == [signal.SIGHUP]
        hook.session_opened(facts("day-2"))
        time.sleep(0.01)
        second = run_logrotate(config, tmp_path / "state")
        assert second.returncode == 0, second.stderr
        assert len(hups) == 2
        hook.session_opened(facts("day-3"))
    finally:
        signal.signal(signal.SIGHUP, previous)
        built.close()
    assert log.stat().st_mode & 0o777 == 0o600
    assert [json.loads(line)["session_id"] for line in lines(log)] == ["day-3"]
    assert [json.loads(line)["session_id"] for line in lines(tmp_path / "audit.jsonl.1")] == ["day-2"]
    import gzip

    assert json.loads(gzip.open(tmp_path / "audit.jsonl.2.gz").read())["session_id"] == "day-1"


def test_notifempty_and_missingok(tmp_path: Path) -> None:
    """No file yet, or an empty one: logrotate does nothing and is content."""
    log = tmp_path / "audit.jsonl"
    config = logrotate_config(tmp_path, log, "false")  # a postrotate that runs would fail the run
    assert run_logrotate(config, tmp_path / "state").returncode == 0
    log.touch(mode=0o600)
    assert run_logrotate(config, tmp_path / "state").returncode == 0
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*")) == ["audit.jsonl"]
