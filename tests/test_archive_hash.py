"""One message, one hash everywhere (issue 10, finding 10): with ``stage = "delivered"`` the archive's
copy is the message the client got, octet for octet, the ``X-Popproxy-Pad`` filler included, so its
SHA-256 is the audit log's ``sha256`` for the same delivery."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import succeed

from popproxy.hooks.archive import ArchiveHook
from popproxy.hooks.registry import build_hooks
from popproxy.pop3.wire import unstuff_body
from popproxy.testing import MemoryProxy

from support.configs import proxy_config

MESSAGE = b"Message-ID: <m@example.org>\r\nSubject: hashed\r\n\r\n.dot line\r\nbody\r\n"


def in_place(function: Any, *args: Any) -> Any:
    return succeed(function(*args))


def test_the_delivered_copy_hashes_as_the_audit_log_says(tmp_path: Path) -> None:
    base = tmp_path / "archive"
    config = proxy_config(tmp_path, extra=(
        '[[hook]]\nuse = "archive"\n'
        f'path = "{base}"\nstage = "delivered"\n'
        '[[hook]]\nuse = "support.samplehooks:tagger"\nreservation = 40\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{tmp_path / "audit.jsonl"}"\n'
    ))
    hooks = tuple(
        dataclasses.replace(built, hook=ArchiveHook(built.config.name, base, "delivered", run_in_thread=in_place))
        if isinstance(built.hook, ArchiveHook) else built
        for built in build_hooks(config)
    )
    proxy = MemoryProxy(config, hooks=hooks)
    proxy.upstreams["main"].add_user("alice", "pw", [MESSAGE])
    try:
        client, _ = proxy.connect()
        client.send(b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n")
        proxy.settle()
        answer = client.take()
    finally:
        proxy.close()
    start = answer.index(b" octets\r\n") + len(b" octets\r\n")  # the RETR answer's body, stuffed,
    delivered = unstuff_body(answer[start : answer.index(b"\r\n.\r\n", start) + 5])  # with its terminator
    assert delivered.startswith(b"X-Popproxy-Pad: ")  # the filler is there: the case this test is about
    (stored,) = (base / "alice" / "new").iterdir()
    retr = next(row for row in map(json.loads, (tmp_path / "audit.jsonl").read_text().splitlines())
                if row["event"] == "retr")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == retr["sha256"] == hashlib.sha256(delivered).hexdigest()
    assert retr["size"] == len(delivered) == stored.stat().st_size
