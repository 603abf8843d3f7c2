"""Issue 10, finding 4: per-user hooks and the case of the user name.

With ``users = ["user177"]`` on the audit-log and archive hooks, a login as ``USER177`` produced no
archive file and no audit record: the hooks compared the name as the client typed it. The session
now has one normalised identity (``[routing] user_case``, default ``"lower"``) and the hooks see
that one. End to end: a real ``twistd popproxy`` in front of a real Dovecot (which finds mailboxes
whatever the case), Python's ``poplib`` logging in as ``USER177``.
"""

from __future__ import annotations

import json
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority

from support.dovecot import DovecotServer
from support.proxyproc import ProxyProcess, free_port

MESSAGE = b"From: someone@example.org\r\nSubject: for user177\r\nMessage-ID: <u177@popproxy.test>\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def user177_dovecot(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-user177"), leaf=ca.issue(["localhost", "127.0.0.1"]))
    server.add_user("user177", "pw177", [MESSAGE])
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("typed", ["USER177", "User177", "user177"])
def test_hooks_for_a_user_apply_however_the_client_types_the_name(tmp_path: Path, user177_dovecot: DovecotServer,
                                                                     typed: str) -> None:
    port = free_port()
    audit, archive = tmp_path / "audit.jsonl", tmp_path / "archive"
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.main]\naddress = "127.0.0.1:{user177_dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "main"\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{audit}"\nusers = ["user177"]\n'
        f'[[hook]]\nuse = "archive"\npath = "{archive}"\nusers = ["user177"]\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path)
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=20)
        client.user(typed)
        client.pass_("pw177")
        _, lines, _ = client.retr(1)
        client.quit()
    finally:
        proxy.stop()
    assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    retrs = [r for r in records if r["event"] == "retr"]
    assert [r["user"] for r in retrs] == ["user177"], records
    archived = list((archive / "user177" / "new").glob("*")) if archive.exists() else []
    assert len(archived) == 1, sorted(str(p) for p in archive.rglob("*")) if archive.exists() else "no archive"
    assert archived[0].read_bytes() == MESSAGE
