"""Hooks through the whole chain: real Dovecot → twistd popproxy (rewrite, audit-log) → poplib and
fetchmail. Sizes stay honest (LIST, STAT, RETR, TOP agree) for rewritten messages and for a message
too large to be scanned."""

from __future__ import annotations

import email
import hashlib
import json
import poplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from support.dovecot import DovecotServer, MailUser
from support.fetchmail import fetchmail_poll
from support.mailbox import corpus
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

USER = "hooky"
PASSWORD = "hooky-pw-31f9a"
MAX_SIZE = 200_000


def _mime_with_link() -> bytes:
    message = EmailMessage()
    message["From"] = "Partner <news@partner.example>"
    message["To"] = "hooky@example.org"
    message["Subject"] = "Links inside"
    message["Message-ID"] = "<links@popproxy.test>"
    message.set_content("Read http://example.com/a today.\n.a line with a dot\n")
    message.add_alternative("<p>See <a href='http://example.com/b'>b</a></p>\n", subtype="html")
    message.add_attachment(bytes(range(256)) * 8, maintype="application", subtype="octet-stream", filename="x.bin")
    return message.as_bytes(policy=email.policy.SMTP)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer) -> Iterator[tuple[ProxyProcess, int, MailUser, Path]]:
    folder = tmp_path_factory.mktemp("hooks")
    messages = corpus(6, seed=4242, large=False) + [_mime_with_link()]
    big = b"Subject: too big to scan\r\nMessage-ID: <big@popproxy.test>\r\n\r\n" + (b"z" * 98 + b"\r\n") * 3000
    messages.append(big)
    user = dovecot.add_user(USER, PASSWORD, messages)
    port = free_port()
    audit = folder / "audit.jsonl"
    config = folder / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{audit}"\nheaders = ["From", "Subject"]\n'
        f'[[hook]]\nuse = "rewrite"\nmax_size = {MAX_SIZE}\nmax_added = 256\n'
        '[[hook.rule]]\nsubject_prefix = "[checked] "\nadd_header = ["X-Checked: yes"]\n'
        '[[hook.rule.replace]]\npattern = "http://"\nwith = "hxxp://"\n'
    )
    proxy = ProxyProcess(config, [port], folder)
    try:
        yield proxy, port, user, audit
    finally:
        proxy.stop()
    for path in (audit, proxy.logfile):
        text = path.read_text()
        assert PASSWORD not in text


def _login(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(USER)
    client.pass_(PASSWORD)
    return client


def test_sizes_agree_in_list_stat_retr_and_top(chain: tuple[ProxyProcess, int, MailUser, Path]) -> None:
    _proxy, port, user, _ = chain
    client = _login(port)
    try:
        count, total = client.stat()
        _, listing, _ = client.list()
        sizes = [int(line.split()[1]) for line in listing]
        assert count == len(user.messages) and total == sum(sizes)
        for number, size in enumerate(sizes, start=1):
            assert int(client.list(number).split()[2]) == size
            message = retrieve(client, number)
            assert len(message) == size, f"message {number}"
            head = message.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            _, top0, _ = client.top(number, 0)
            assert b"".join(line + b"\r\n" for line in top0) == head
            _, top2, _ = client.top(number, 2)
            assert message.startswith(b"".join(line + b"\r\n" for line in top2))
        # The large message was not scanned: untouched, at the upstream's own size.
        assert retrieve(client, len(user.messages)) == user.messages[-1]
        assert sizes[-1] == user.sizes[-1]
        # The others were rewritten, and carry the padding that keeps them at the announced size.
        mime = retrieve(client, 7)
        parsed = email.message_from_bytes(mime)
        assert parsed["Subject"] == "[checked] Links inside" and parsed["X-Checked"] == "yes"
        assert b"hxxp://example.com/a" in mime and b"http://example.com" not in mime
        attachment = next(part for part in parsed.walk() if part.get_filename() == "x.bin")
        assert attachment.get_payload(decode=True) == bytes(range(256)) * 8
    finally:
        client.quit()


@pytest.mark.parametrize("uidl", [True, False], ids=["fetchmail-top", "fetchmail-retr"])
def test_fetchmail_gets_what_poplib_gets(chain: tuple[ProxyProcess, int, MailUser, Path], tmp_path: Path, uidl: bool) -> None:
    _proxy, port, user, _ = chain
    client = _login(port)
    expected = [retrieve(client, n) for n in range(1, len(user.messages) + 1)]
    client.quit()
    run = fetchmail_poll(tmp_path, port, "none", user=USER, password=PASSWORD, uidl=uidl,
                         cafile=Path("/dev/null"), host="localhost")
    assert run.returncode == 0, run.transcript
    assert "mismatch" not in run.transcript.lower()
    assert len(run.delivered) == len(expected)
    # fetchmail hands its MDA LF line endings.
    assert [d for d in run.delivered] == [m.replace(b"\r\n", b"\n") for m in expected]


def test_audit_log_records_scanning_and_hashes(chain: tuple[ProxyProcess, int, MailUser, Path]) -> None:
    _proxy, port, user, audit = chain
    client = _login(port)
    first = retrieve(client, 1)
    last = retrieve(client, len(user.messages))
    client.quit()
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    retrs = [row for row in rows if row["event"] == "retr" and row["user"] == USER]
    by_hash = {row["sha256"]: row for row in retrs}
    scanned = by_hash[hashlib.sha256(first).hexdigest()]
    assert scanned["scanned"] is True and scanned["number"] == 1 and scanned["size"] == len(first)
    assert [v["hook"] for v in scanned["verdicts"]] == ["rewrite"]
    unscanned = by_hash[hashlib.sha256(last).hexdigest()]
    assert unscanned["scanned"] is False and unscanned["message_id"] == "<big@popproxy.test>"
    assert unscanned["notes"] == [f"not scanned: {len(last)} octets, more than max_size {MAX_SIZE}"]
    assert all(row.get("uidl") for row in retrs)
