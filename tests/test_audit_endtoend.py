"""The audit trail through the whole chain (issue 10): real Dovecot with hostile messages in the
mailbox → ``twistd -n popproxy`` → ``poplib``; logrotate moving the file under a running proxy.

- Finding 3: a Subject that decodes to a lone surrogate (``=?utf-7?q?+2AA-?=``), or that holds
  U+2028/U+2029/U+0085, still gets its ``retr`` record, on one line.
- Finding 8: after a real ``logrotate`` run with ``conf/popproxy.logrotate`` (its postrotate sends
  SIGHUP to the pid in the pidfile), records go to a new file, 0600, also when the reload that the
  SIGHUP starts is refused, with one process and with workers.
- Finding 9: ``dele`` records name the message by UIDL; a ``commit`` record says what became of the
  deletions.
"""

from __future__ import annotations

import hashlib
import json
import os
import poplib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.dovecot import DovecotServer, MailUser
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

LOGROTATE = shutil.which("logrotate", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
SHIPPED = Path(__file__).resolve().parent.parent / "conf" / "popproxy.logrotate"

HOSTILE_USER, HOSTILE_PASSWORD = "auditee", "auditee-pw-7c1e"
DELETER, DELETER_PASSWORD = "deleter", "deleter-pw-51aa"
HOSTILE = [
    b"Message-ID: <surrogate@popproxy.test>\r\nFrom: Mallory <mallory@example.net>\r\n"
    b"Subject: =?utf-7?q?+2AA-?=\r\n\r\nThis message should not be in the audit log.\r\n",
    b"Message-ID: <separators@popproxy.test>\r\nFrom: =?utf-8?q?Eve=E2=80=A8{=22event=22:=22forged=22}?= <e@example.net>\r\n"
    b"Subject: =?utf-8?q?line=E2=80=A8para=E2=80=A9nel=C2=85end?=\r\n\r\nSplit me.\r\n",
    b"Message-ID: <plain@popproxy.test>\r\nFrom: Ann <ann@example.org>\r\nSubject: after them\r\n\r\nStill here.\r\n",
]
PLAIN = [b"Message-ID: <d%d@popproxy.test>\r\nSubject: number %d\r\n\r\nbody %d\r\n" % (n, n, n) for n in (1, 2, 3)]


def records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.splitlines() == text.split("\n")[:-1], "a record spans more than one line for splitlines()"
    return [json.loads(line) for line in text.splitlines()]


def write_config(folder: Path, port: int, dovecot: DovecotServer, audit: Path, workers: int = 1) -> Path:
    config = folder / "popproxy.toml"
    config.write_text(
        f'[process]\nworkers = {workers}\n'
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{audit}"\nheaders = ["From", "Subject"]\n'
    )
    return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer) -> Iterator[tuple[ProxyProcess, int, Path]]:
    folder = tmp_path_factory.mktemp("audit-e2e")
    dovecot.add_user(HOSTILE_USER, HOSTILE_PASSWORD, HOSTILE)
    dovecot.add_user(DELETER, DELETER_PASSWORD, PLAIN)
    port = free_port()
    audit = folder / "audit.jsonl"
    proxy = ProxyProcess(write_config(folder, port, dovecot, audit), [port], folder)
    try:
        yield proxy, port, audit
    finally:
        proxy.stop()


def log_in(port: int, user: str, password: str) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(user)
    client.pass_(password)
    return client


# --- finding 3 ------------------------------------------------------------------------------------


def test_hostile_subjects_cannot_keep_a_retr_out_of_the_audit_log(chain: tuple[ProxyProcess, int, Path]) -> None:
    proxy, port, audit = chain
    client = log_in(port, HOSTILE_USER, HOSTILE_PASSWORD)
    got = [retrieve(client, number) for number in (1, 2, 3)]
    client.quit()
    assert got == HOSTILE  # the client was always served; the audit trail was what broke
    retrs = [row for row in records(audit) if row["event"] == "retr" and row.get("user") == HOSTILE_USER]
    assert [row["message_id"] for row in retrs] == ["<surrogate@popproxy.test>", "<separators@popproxy.test>",
                                                    "<plain@popproxy.test>"]
    assert [row["sha256"] for row in retrs] == [hashlib.sha256(m).hexdigest() for m in HOSTILE]
    assert retrs[0]["headers"]["Subject"] == "\ud800"
    # The header reader may turn the separators into spaces (they are white space to str.split()) or
    # leave them for the record to escape: either way the text is there and the record is one line.
    assert retrs[1]["headers"]["Subject"].split() == ["line", "para", "nel", "end"]
    assert retrs[1]["headers"]["From"].split() == ["Eve", '{"event":"forged"}', "<e@example.net>"]
    assert not [row for row in records(audit) if row["event"] == "forged"]
    raw = audit.read_text(encoding="utf-8")
    assert "\\ud800" in raw and not {"\u2028", "\u2029", "\x85"} & set(raw)
    assert "session hook audit-log failed" not in proxy.log()


# --- finding 9 ------------------------------------------------------------------------------------


@pytest.fixture
def deleter(dovecot: DovecotServer) -> Iterator[MailUser]:
    yield dovecot.users[DELETER]
    dovecot.reset_user(DELETER)


def test_deletions_get_a_commit_record(chain: tuple[ProxyProcess, int, Path], deleter: MailUser) -> None:
    _proxy, port, audit = chain
    client = log_in(port, DELETER, DELETER_PASSWORD)
    retrieve(client, 1)
    client.dele(1)
    client.rset()  # undone
    retrieve(client, 2)
    client.dele(2)
    client.quit()  # committed
    client = log_in(port, DELETER, DELETER_PASSWORD)
    assert client.stat()[0] == 2
    retrieve(client, 1)
    client.dele(1)
    client.close()  # hung up without QUIT: nothing committed
    time.sleep(0.5)
    client = log_in(port, DELETER, DELETER_PASSWORD)
    assert client.stat()[0] == 2  # indeed
    client.quit()
    rows = [row for row in records(audit) if row.get("user") == DELETER]
    commits = [row for row in rows if row["event"] == "commit"]
    assert [(c["outcome"], c["numbers"]) for c in commits] == [("undone", [1]), ("committed", [2]), ("undone", [1])]
    # After the QUIT, Dovecot's message 1 is still the first one: the third session's DELE 1 names it.
    assert [c["uidls"] for c in commits] == [[deleter.uidls[0]], [deleter.uidls[1]], [deleter.uidls[0]]]
    assert commits[0]["reason"] == "RSET" and commits[1]["reason"] == "QUIT answered +OK"
    assert commits[2]["reason"].startswith("session ended without QUIT")
    deles = [row for row in rows if row["event"] == "dele"]
    assert [(d["number"], d["uidl"], d["message_id"]) for d in deles] == [
        (1, deleter.uidls[0], "<d1@popproxy.test>"), (2, deleter.uidls[1], "<d2@popproxy.test>"),
        (1, deleter.uidls[0], "<d1@popproxy.test>")]


def test_a_dele_of_a_message_never_fetched_names_it(chain: tuple[ProxyProcess, int, Path], deleter: MailUser) -> None:
    _proxy, port, audit = chain
    client = log_in(port, DELETER, DELETER_PASSWORD)
    client.dele(3)
    client.quit()
    rows = [row for row in records(audit) if row.get("user") == DELETER]
    dele = [row for row in rows if row["event"] == "dele"][-1]
    commit = [row for row in rows if row["event"] == "commit"][-1]
    assert (dele["number"], dele["uidl"]) == (3, deleter.uidls[2])
    assert (commit["outcome"], commit["uidls"]) == ("committed", [deleter.uidls[2]])


# --- finding 8 ------------------------------------------------------------------------------------


def logrotate_config(folder: Path, audit: Path, pidfile: Path) -> Path:
    """The shipped file, for this test's log and pidfile; the postrotate script is the shipped one."""
    text = SHIPPED.read_text().replace("/var/log/popproxy/audit.jsonl", str(audit))
    text = text.replace("/run/popproxy.pid", str(pidfile))
    path = folder / "logrotate.conf"
    path.write_text(text)
    return path


def wait_for(condition: Any, what: str, proxy: ProxyProcess, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen: {proxy.log()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("reload", ["accepted", "refused"])
@pytest.mark.parametrize("workers", [1, 2])
def test_logrotate_and_sighup_move_records_to_a_new_file(tmp_path: Path, dovecot: DovecotServer, workers: int,
                                                         reload: str) -> None:
    assert LOGROTATE is not None, "logrotate is not installed: run scripts/setup (Debian package logrotate)"
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, port, dovecot, audit, workers)
    proxy = ProxyProcess(config, [port], tmp_path, json=True)

    def session() -> None:
        client = log_in(port, "dave", "dave-pw")
        client.stat()
        client.quit()

    try:
        if workers > 1:
            wait_for(lambda: len([e for e in proxy.events() if e.get("event") == "worker_ready"]) >= workers,
                     "workers ready", proxy)
        session()
        wait_for(lambda: audit.exists() and '"session_close"' in audit.read_text(), "the first session's records",
                 proxy)
        good = config.read_text()
        if reload == "refused":
            config.write_text(good + "\n[routing]\nthis is not TOML\n")
        rotation = subprocess.run([LOGROTATE, "-f", "-s", str(tmp_path / "state"),
                                   str(logrotate_config(tmp_path, audit, proxy.pidfile))],
                                  capture_output=True, text=True, timeout=60)
        assert rotation.returncode == 0, rotation.stderr
        assert (tmp_path / "audit.jsonl.1").exists()
        wait_for(audit.exists, "the audit file opened again", proxy)
        event = "reload_failed" if reload == "refused" else "reloaded"
        wait_for(lambda: any(e.get("event") == event for e in proxy.events()), event, proxy)
        session()
        config.write_text(good)
    finally:
        proxy.stop()
    assert audit.stat().st_mode & 0o777 == 0o600
    before, after = records(tmp_path / "audit.jsonl.1"), records(audit)
    logins = [[row for row in rows if row["event"] == "auth" and row["user"] == "dave"] for rows in (before, after)]
    assert [len(found) for found in logins] == [1, 1]
    for rows in (before, after):
        opened = {row["session_id"] for row in rows if row["event"] == "session_open"}
        closed = {row["session_id"] for row in rows if row["event"] == "session_close"}
        assert opened == closed  # every session's records in one file
