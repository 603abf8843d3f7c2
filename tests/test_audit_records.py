"""The audit-log hook's records, in memory (issue 10): hostile header text stays one record per line
(finding 3), per-session state ends with the session whatever happened (finding 5), and DELE
records say which message went and whether the deletion was committed (finding 9)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from popproxy.hooks.audit import AuditLog
from popproxy.hooks.interfaces import Delivery, SessionFacts
from popproxy.pop3.wire import err
from popproxy.testing import FakePOP3Server, MemoryProxy, RecordingClient

from support.configs import proxy_config

PASSWORD = "alice-pw"
HOSTILE = [
    # RFC 2047 encoded word in UTF-7 whose "+2AA-" decodes to U+D800, a lone surrogate: no UTF-8 for it.
    b"Message-ID: <surrogate@example.net>\r\nFrom: Mallory <m@example.net>\r\nSubject: =?utf-7?q?+2AA-?=\r\n\r\nx\r\n",
    # Line and paragraph separators and NEL, encoded and as raw UTF-8 (RFC 6532): str.splitlines()
    # and many log shippers end a line at each of them.
    b"Message-ID: <separators@example.net>\r\nFrom: a\xe2\x80\xa8b\xc2\x85c <a@example.net>\r\n"
    b"Subject: =?utf-8?q?one=E2=80=A8two=E2=80=A9three=C2=85four?=\r\n\r\ny\r\n",
    b"Message-ID: <three@example.net>\r\nSubject: plain\r\n\r\nz\r\n",
]


@pytest.fixture
def opened() -> Iterator[list[MemoryProxy]]:
    proxies: list[MemoryProxy] = []
    yield proxies
    for proxy in proxies:
        proxy.close()


def make(tmp_path: Path, opened: list[MemoryProxy], settings: str = "", messages: list[bytes] = HOSTILE) -> MemoryProxy:
    extra = f'[[hook]]\nuse = "audit-log"\npath = "{tmp_path / "audit.jsonl"}"\n' + settings
    config = proxy_config(tmp_path, upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}}, extra=extra)
    proxy = MemoryProxy(config)
    opened.append(proxy)
    proxy.upstreams["main"].add_user("alice", PASSWORD, messages)
    return proxy


def login(proxy: MemoryProxy) -> RecordingClient:
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n").endswith(b"+OK Logged in.\r\n")
    return client


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "audit.jsonl").read_text(encoding="utf-8")
    # One record per line for every line-based reader: Python's splitlines() knows the most ends.
    assert text.splitlines() == text.split("\n")[:-1]
    return [json.loads(line) for line in text.splitlines()]


def uidl(message: bytes) -> str:
    return hashlib.sha1(message).hexdigest()[:16]  # the fake upstream's UIDL


# --- finding 3: what a sender puts in a header cannot keep a record out, or split one --------------


def test_a_lone_surrogate_in_a_subject_does_not_keep_the_retr_out(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    proxy = make(tmp_path, opened, 'headers = ["From", "Subject"]\n')
    client = login(proxy)
    for number in (1, 2, 3):
        assert proxy.say(client, b"RETR %d\r\n" % number).startswith(b"+OK")
    proxy.say(client, b"QUIT\r\n")
    retrs = [row for row in rows(tmp_path) if row["event"] == "retr"]
    assert [row["number"] for row in retrs] == [1, 2, 3]
    assert retrs[0]["message_id"] == "<surrogate@example.net>"
    assert retrs[0]["headers"]["Subject"] == "\ud800"  # escaped as \ud800 in the file, read back as it was
    assert retrs[0]["sha256"] == hashlib.sha256(HOSTILE[0]).hexdigest()
    # The header reader may turn the separators into spaces (white space to str.split()) or leave them
    # for the record to escape (encode_record, below): either way, one record, one line.
    assert retrs[1]["headers"]["From"].split() == ["a", "b", "c", "<a@example.net>"]
    assert retrs[1]["headers"]["Subject"].split() == ["one", "two", "three", "four"]


def test_encode_record_escapes_what_ends_lines_or_cannot_be_encoded() -> None:
    from popproxy.hooks.audit import encode_record

    text = "a\ud800b\u2028c\u2029d\x85e\x9bf\x7fg\nh\x00i\u00e9j\U0001f600"
    line = encode_record({"v": text, "k\u2028": 1})
    assert line.encode("utf-8")  # a lone surrogate would raise here
    assert line.splitlines() == [line] and "\n" not in line
    for raw in ("\ud800", "\u2028", "\u2029", "\x85", "\x9b", "\x7f"):
        assert raw not in line
    assert "\u00e9" in line and "\U0001f600" in line  # readable text stays readable (not \u-escaped)
    assert json.loads(line) == {"v": text, "k\u2028": 1}


# --- finding 5: per-session state ends with the session ----------------------------------------------


def _holds(value: object, keys: set[str]) -> bool:
    if isinstance(value, Mapping):
        return bool(keys & set(value)) or any(_holds(v, keys) for v in value.values())
    if isinstance(value, (set, frozenset, list, tuple)):
        return any(_holds(v, keys) for v in value) or bool(keys & {v for v in value if isinstance(v, str)})
    return False


def test_sessions_that_never_log_in_leave_nothing_behind(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    """With ``users``, a session that tried another user's name was told of its opening but not of
    its end (the filter skips it once the user is known): its entry stayed for ever."""
    proxy = make(tmp_path, opened, 'users = ["alice"]\n')
    hook = proxy.hooks[0].hook
    ids = set()
    for index in range(20):
        client, session = proxy.connect(port=40000 + index)
        ids.add(session.session_id)
        if index % 4 == 0:
            proxy.say(client, b"QUIT\r\n")  # never logged in
        elif index % 4 == 1:
            proxy.say(client, b"USER mallory\r\nPASS nope\r\nQUIT\r\n")  # another user's name, refused
        elif index % 4 == 2:
            proxy.say(client, b"USER alice\r\nPASS wrong\r\n")
            client.transport.loseConnection()  # hung up after a failed login
        else:
            proxy.say(client, b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nRETR 3\r\nDELE 3\r\n")
            client.transport.loseConnection()  # logged in, fetched and deleted, then hung up
        proxy.settle()
    assert all(session_id in {row["session_id"] for row in rows(tmp_path)} for session_id in ids)
    leftovers = {name for name, value in vars(hook).items() if _holds(value, ids)}
    assert not leftovers, f"per-session state left in {leftovers}"


# --- finding 9: DELE records say which message; the commit record says what became of them -----------


def test_dele_and_commit_records_for_quit(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    proxy = make(tmp_path, opened)
    client = login(proxy)
    proxy.say(client, b"RETR 1\r\n")
    assert proxy.say(client, b"DELE 1\r\nDELE 9\r\nQUIT\r\n").endswith(b"+OK Bye\r\n")
    events = rows(tmp_path)
    assert [row["event"] for row in events] == ["session_open", "auth", "retr", "dele", "dele", "commit", "session_close"]
    retr, dele, missing, commit = events[2], events[3], events[4], events[5]
    assert (dele["number"], dele["result"], dele["uidl"]) == (1, "ok", uidl(HOSTILE[0]))
    assert dele["message_id"] == "<surrogate@example.net>" and dele["sha256"] == retr["sha256"]
    assert (missing["number"], missing["result"]) == (9, "error")
    assert commit["outcome"] == "committed" and commit["reason"] == "QUIT answered +OK"
    assert (commit["deleted"], commit["numbers"], commit["uidls"]) == (1, [1], [uidl(HOSTILE[0])])


def test_rset_undoes_and_says_so(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    proxy = make(tmp_path, opened)
    client = login(proxy)
    proxy.say(client, b"TOP 2 0\r\nDELE 2\r\nRSET\r\nRETR 3\r\nDELE 3\r\nQUIT\r\n")
    events = rows(tmp_path)
    assert [row["event"] for row in events] == [
        "session_open", "auth", "top", "dele", "commit", "retr", "dele", "commit", "session_close"]
    undone, committed = events[4], events[7]
    assert (undone["outcome"], undone["reason"], undone["numbers"]) == ("undone", "RSET", [2])
    assert undone["uidls"] == [uidl(HOSTILE[1])]  # known from the TOP
    assert events[3]["message_id"] == "<separators@example.net>" and "sha256" not in events[3]  # TOP: no whole hash
    assert (committed["outcome"], committed["numbers"], committed["uidls"]) == ("committed", [3], [uidl(HOSTILE[2])])


def test_a_session_that_ends_without_quit_commits_nothing(tmp_path: Path, opened: list[MemoryProxy]) -> None:
    proxy = make(tmp_path, opened)
    client = login(proxy)
    proxy.say(client, b"RETR 1\r\nDELE 1\r\n")
    client.transport.loseConnection()
    proxy.settle()
    events = rows(tmp_path)
    assert [row["event"] for row in events][-2:] == ["commit", "session_close"]
    commit = events[-2]
    assert (commit["outcome"], commit["numbers"]) == ("undone", [1])
    assert commit["reason"] == "session ended without QUIT (client closed)"
    assert proxy.upstreams["main"].mailboxes[b"alice"].remaining() == HOSTILE  # nothing was deleted indeed


def test_quit_answered_err_is_a_failed_commit(tmp_path: Path, opened: list[MemoryProxy],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: FakePOP3Server, args: object, rest: object) -> bytes:
        self.transport.write(err("some deleted messages not removed"))
        self.transport.loseConnection()
        return b""

    monkeypatch.setattr(FakePOP3Server, "_quit", refuse)
    proxy = make(tmp_path, opened)
    client = login(proxy)
    proxy.say(client, b"RETR 2\r\nDELE 2\r\nQUIT\r\n")
    commit = next(row for row in rows(tmp_path) if row["event"] == "commit")
    assert (commit["outcome"], commit["reason"], commit["numbers"]) == ("failed", "QUIT answered -ERR", [2])


def _facts(user: str | None = "alice") -> SessionFacts:
    return SessionFacts("s1", "192.0.2.1", 40000, "listen[0]", user=user, upstream="main")


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def close(self) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


def test_quit_sent_after_a_hang_up_is_unknown() -> None:
    """The client sent DELE and QUIT and hung up: popproxy still sends them (RFC 1939 §6), but the
    answer reaches no hook. The record says the outcome is unknown, not that it was undone."""
    lines = Lines()
    hook = AuditLog("audit-log", lines, ())
    session = _facts()
    hook.session_opened(session)
    hook.command_done(session, "DELE", "4", True)
    hook.session_closed(session, {"ended": "quit after hang-up"})
    commit = lines.records()[-2]
    assert (commit["event"], commit["outcome"], commit["numbers"]) == ("commit", "unknown", [4])
    assert commit["uidls"] == [None]


def test_the_listing_gives_every_dele_its_uidl() -> None:
    """With the mailbox's listing (read at login because the hook is ``IWantsListing``), a DELE of a
    message the session never fetched still names it."""
    lines = Lines()
    hook = AuditLog("audit-log", lines, ())
    session = _facts()
    hook.session_opened(session)
    hook.mailbox_listed(session, {1: "u-one", 2: "u-two"})
    hook.command_done(session, "DELE", "2", True)
    hook.message_delivered(session, Delivery("RETR", 1, "u-one", 10, "ab" * 32, {"Message-ID": "<m1@x>"}, False,
                                             "delivered"))
    hook.command_done(session, "DELE", "1", True)
    hook.command_done(session, "QUIT", "", True)
    hook.session_closed(session, {"ended": "quit"})
    events = lines.records()
    dele2, dele1, commit = events[1], events[3], events[4]
    assert (dele2["uidl"], dele2.get("message_id")) == ("u-two", None)
    assert (dele1["uidl"], dele1["message_id"], dele1["sha256"]) == ("u-one", "<m1@x>", "ab" * 32)
    assert (commit["outcome"], commit["numbers"], commit["uidls"]) == ("committed", [1, 2], ["u-one", "u-two"])
    assert hook.sessions_tracked == 0
