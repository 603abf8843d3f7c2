"""The audit-log hook's syslog output (issue 10, finding 6): each hook instance writes through its own
non-blocking Unix datagram socket, framed as glibc's syslog() frames it for ``/dev/log`` (RFC 3164
§4.1: ``<PRI>``, then the TAG ``popproxy-audit[pid]:``), facility mail, severity info. A reload that
retires one hook instance leaves the others (and the process's own syslog state) alone."""

from __future__ import annotations

import json
import os
import re
import socket
import syslog
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popproxy.hooks.audit import SyslogWriter
from popproxy.hooks.interfaces import IGatekeeper, SessionFacts
from popproxy.hooks.registry import build_hooks
from popproxy.testing import MemoryProxy

from support.configs import proxy_config

#: RFC 3164 §4.1.1: PRI = facility * 8 + severity; mail (2) and info (6) make 22.
FRAME = re.compile(rb"<22>popproxy-audit\[(\d+)\]: (\{.*\})")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[socket.socket]:
    """A stand-in for the syslog daemon: a bound datagram socket (AF_UNIX paths are short)."""
    path = Path(f"/tmp/popproxy-syslog-{os.getpid()}-{id(tmp_path)}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


def received(server: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(server.recv(1 << 16))
        except BlockingIOError:
            return out


def records(server: socket.socket) -> list[dict[str, Any]]:
    result = []
    for datagram in received(server):
        match = FRAME.fullmatch(datagram)
        assert match, datagram
        assert int(match.group(1)) == os.getpid()
        result.append(json.loads(match.group(2)))
    return result


def hook_table(server: socket.socket, extra: str = "") -> str:
    return f'[[hook]]\nuse = "audit-log"\nsyslog = true\nsyslog_socket = "{server.getsockname()}"\n{extra}'


def facts(session_id: str = "s1") -> SessionFacts:
    return SessionFacts(session_id, "192.0.2.1", 40000, "listen[0]")


def test_a_session_goes_to_syslog_framed_for_the_mail_facility(tmp_path: Path, daemon: socket.socket) -> None:
    config = proxy_config(tmp_path, extra=hook_table(daemon))
    proxy = MemoryProxy(config)
    proxy.upstreams["main"].add_user("alice", "pw", [b"Subject: s\r\n\r\nx\r\n"])
    try:
        client, _ = proxy.connect()
        client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n")
        proxy.settle()
    finally:
        proxy.close()
    assert [row["event"] for row in records(daemon)] == ["session_open", "auth", "retr", "session_close"]


def test_retiring_a_hook_on_reload_leaves_the_others_writing(tmp_path: Path, daemon: socket.socket,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The old hook called the process-wide ``closelog()``: the next hook's records went out as
    facility USER with the program's name as ident. Now no hook touches the ``syslog`` module."""
    touched: list[str] = []
    for name in ("openlog", "closelog", "syslog"):
        monkeypatch.setattr(syslog, name, lambda *args, name=name: touched.append(name))
    config = proxy_config(tmp_path, extra=hook_table(daemon))
    (old,) = build_hooks(config)
    (new,) = build_hooks(config)  # a reload builds the new configuration's hooks first
    old.hook.session_opened(facts("before"))
    old.close()  # ... and retires the old ones once their sessions are over
    new.hook.session_opened(facts("after"))
    assert [row["session_id"] for row in records(daemon)] == ["before", "after"]
    assert touched == []
    new.close()


def test_the_socket_is_the_hooks_own_and_never_blocks(tmp_path: Path, daemon: socket.socket) -> None:
    """A daemon that does not read: sends fail at once (EAGAIN) instead of stalling the reactor. With
    ``on_write_error = "refuse"`` mail stops moving until records go out again, and the first record
    that does says how many were kept and lost meanwhile."""
    config = proxy_config(tmp_path, extra=hook_table(daemon, 'on_write_error = "refuse"\n'))
    (built,) = build_hooks(config)
    hook = built.hook
    assert IGatekeeper.providedBy(hook) and hook.accepting
    sent = 0
    while hook.accepting:
        hook.session_opened(facts(f"s{sent}"))
        sent += 1
        assert sent < 100_000, "the datagram queue never filled"
    assert not hook.accepting
    delivered = len(received(daemon))  # the daemon reads again
    hook.session_opened(facts("later"))
    assert hook.accepting
    rows = records(daemon)
    resumed = next(row for row in rows if row["event"] == "audit_resumed")
    assert resumed["kept"] + resumed["lost"] >= 1 and "Resource temporarily unavailable" in resumed["error"]
    assert delivered + len(rows) - 1 == sent + 1 - resumed["lost"]  # every record but the lost ones arrived
    built.close()


def test_the_daemon_restarting_is_survived(tmp_path: Path) -> None:
    """syslogd restarted: its socket is a new one at the same path; the hook connects again."""
    path = Path(f"/tmp/popproxy-syslog-restart-{os.getpid()}.sock")
    first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    first.bind(str(path))
    writer = SyslogWriter(str(path))
    try:
        writer.write('{"n":1}')
        first.close()
        path.unlink()
        second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        second.bind(str(path))
        second.settimeout(5)
        writer.write('{"n":2}')
        assert FRAME.fullmatch(second.recv(4096)).group(2) == b'{"n":2}'  # type: ignore[union-attr]
        second.close()
    finally:
        writer.close()
        path.unlink(missing_ok=True)


def test_settings(tmp_path: Path) -> None:
    from popproxy.config import ConfigError

    for extra, key, reason in [
        (f'path = "{tmp_path}/a.jsonl"\nsyslog_socket = "/dev/log"\n', "hook[0].syslog_socket", "syslog = true"),
        ('syslog = true\nsyslog_socket = ""\n', "hook[0].syslog_socket", "empty"),
        ('syslog = true\non_write_error = "drop"\n', "hook[0].on_write_error", "must be one of"),
    ]:
        config = proxy_config(tmp_path, extra='[[hook]]\nuse = "audit-log"\n' + extra)
        with pytest.raises(ConfigError) as error:
            build_hooks(config)
        assert error.value.key == key and reason in error.value.reason, error.value
    (built,) = build_hooks(proxy_config(tmp_path, extra='[[hook]]\nuse = "audit-log"\nsyslog = true\n'))
    assert not IGatekeeper.providedBy(built.hook)  # "serve", the default, never stops mail
    built.close()
