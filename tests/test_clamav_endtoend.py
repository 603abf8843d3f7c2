"""Virus scanning through the whole chain: real Dovecot → twistd popproxy → real clamd → poplib, with
the audit log recording each verdict. And when clamd is down, slow, or refuses a message over its
``StreamMaxLength``, both ``on_error`` policies, with the message still on the server after a
refused RETR."""

from __future__ import annotations

import email
import json
import poplib
from collections.abc import Iterator
from contextlib import contextmanager
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest

from support.badscanner import BadScanner
from support.clamd import (
    EICAR,
    SIGNATURE_FOUND,
    STREAM_MAX_LENGTH,
    ClamdServer,
    clamd_fixture,  # noqa: F401 (the session-wide clamd fixture)
    eicar_message,
)
from support.dovecot import DovecotServer
from support.mailbox import corpus
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

PASSWORD = "clam-pw-4c1a"
FAULTS = ("down", "slow", "size")


def large_message() -> bytes:
    """A clean message four times the fixture's StreamMaxLength."""
    head = b"From: a@example.org\r\nSubject: a large one\r\nMessage-ID: <large@popproxy.test>\r\n\r\n"
    line = b"All work and no play makes a large message, line of seventy-odd octets.\r\n"
    return head + line * (4 * STREAM_MAX_LENGTH // len(line))


class Chain:
    def __init__(self, proxy: ProxyProcess, port: int, dovecot: DovecotServer, audit: Path) -> None:
        self.proxy, self.port, self.dovecot, self.audit = proxy, port, dovecot, audit

    @contextmanager
    def login(self, user: str) -> Iterator[poplib.POP3]:
        """A poplib session through the proxy: QUIT at the end, or, when the test failed, closed
        (a session left open would hold the proxy's shutdown for its whole grace period)."""
        client = poplib.POP3("127.0.0.1", self.port, timeout=30)
        try:
            client.user(user)
            client.pass_(PASSWORD)
            yield client
        except BaseException:
            client.close()
            raise
        client.quit()

    def records(self, user: str, event: str = "retr") -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.audit.read_text().splitlines()]
        return [row for row in rows if row.get("user") == user and row["event"] == event]

    def still_on_server(self, user: str) -> int:
        check = poplib.POP3("127.0.0.1", self.dovecot.plain_port, timeout=10)
        check.user(user)
        check.pass_(PASSWORD)
        count = check.stat()[0]
        check.quit()
        return count


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer, clamd: ClamdServer) -> Iterator[Chain]:
    folder = tmp_path_factory.mktemp("clamchain")
    audit = folder / "audit.jsonl"
    ham = corpus(3, seed=616, large=False)
    hooks = [f'[[hook]]\nuse = "audit-log"\npath = "{audit}"\n']
    # action = "refuse" over TCP, "replace" over clamd's Unix socket; on_error stays "pass": a virus
    # is refused or replaced all the same.
    dovecot.add_user("clam-refuse", PASSWORD, [*ham, eicar_message()])
    hooks.append(f'[[hook]]\nuse = "clamav"\nname = "av-refuse"\nusers = ["clam-refuse"]\n'
                 f'address = "{clamd.address}"\naction = "refuse"\n')
    dovecot.add_user("clam-replace", PASSWORD, [*ham, eicar_message()])
    hooks.append(f'[[hook]]\nuse = "clamav"\nname = "av-replace"\nusers = ["clam-replace"]\n'
                 f'socket = "{clamd.socket_path}"\naction = "replace"\n')
    silent = BadScanner()
    for fault in FAULTS:
        for policy in ("pass", "refuse"):
            user = f"clam-{fault}-{policy}"
            dovecot.add_user(user, PASSWORD, [ham[0], large_message() if fault == "size" else eicar_message()])
            address = {"down": f"127.0.0.1:{free_port()}", "slow": f"127.0.0.1:{silent.port}", "size": clamd.address}[fault]
            hooks.append(f'[[hook]]\nuse = "clamav"\nname = "{user}"\nusers = ["{user}"]\naddress = "{address}"\n'
                         f'action = "replace"\ntimeout = 1\non_error = "{policy}"\n')
    port = free_port()
    config = folder / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n' + "".join(hooks)
    )
    proxy = ProxyProcess(config, [port], folder)
    try:
        yield Chain(proxy, port, dovecot, audit)
    finally:
        proxy.stop()
        silent.close()
    assert PASSWORD not in proxy.log()


def test_clean_messages_pass_byte_identical(chain: Chain) -> None:
    """With ``action = "refuse"`` the hook adds nothing (reservation 0): clean messages keep their
    octets and their size. With ``"replace"`` every message it sees is announced with room for a
    notice, so a clean one comes with the filler header in front and is otherwise the same."""
    for user in ("clam-refuse", "clam-replace"):
        originals = chain.dovecot.users[user].messages
        with chain.login(user) as client:
            _, listing, _ = client.list()
            sizes = [int(line.split()[1]) for line in listing]
            for number, original in enumerate(originals[:-1], start=1):
                message = retrieve(client, number)
                assert len(message) == sizes[number - 1]
                if user == "clam-refuse":
                    assert message == original
                else:
                    assert message.startswith(b"X-Popproxy-Pad: x") and message.endswith(original)
        for row in chain.records(user)[: len(originals) - 1]:
            assert row["outcome"] == "delivered" and row["scanned"] is True
            assert [v["details"] for v in row["verdicts"]] == [{"virus": None}]


def test_a_virus_is_refused_and_stays_on_the_server(chain: Chain) -> None:
    user = "clam-refuse"
    count = len(chain.dovecot.users[user].messages)
    with chain.login(user) as client:
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.retr(count)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.top(count, 0)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.dele(count)  # refused by popproxy, never forwarded
    assert chain.still_on_server(user) == count
    refused = [row for row in chain.records(user) if row["number"] == count]
    assert refused and refused[0]["outcome"] == "refused"
    assert {"hook": "av-refuse", "details": {"virus": SIGNATURE_FOUND}} in refused[0]["verdicts"]
    assert f"av-refuse: virus {SIGNATURE_FOUND} found; refused" in refused[0]["notes"]
    assert f"av-refuse: virus {SIGNATURE_FOUND} in message {count} of {user}; refused" in chain.proxy.log()


def test_a_virus_is_replaced_by_a_notice_of_the_announced_size(chain: Chain) -> None:
    user = "clam-replace"
    original = chain.dovecot.users[user].messages[-1]
    count = len(chain.dovecot.users[user].messages)
    with chain.login(user) as client:
        listed = int(client.list(count).split()[2])
        notice = retrieve(client, count)
        _, top, _ = client.top(count, 0)
    assert len(notice) == listed > len(original)  # the reservation, then the filler made it exact
    assert EICAR not in notice and b"invoice.com" not in notice
    parsed = email.message_from_bytes(notice, policy=email_policy.default)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Return-Path"):
        assert parsed[name] is not None and parsed[name] == email.message_from_bytes(original, policy=email_policy.default)[name]
    assert parsed.get_content_type() == "text/plain" and not parsed.is_multipart()
    assert parsed["X-Popproxy-Virus"] == SIGNATURE_FOUND
    assert f"Virus: {SIGNATURE_FOUND}" in parsed.get_content()
    assert notice.startswith(b"".join(line + b"\r\n" for line in top))  # TOP is cut from the notice
    row = next(row for row in chain.records(user) if row["number"] == count)
    assert row["outcome"] == "delivered" and row["size"] == listed
    assert row["verdicts"] == [{"hook": "av-replace", "details": {"virus": SIGNATURE_FOUND}}]
    assert row["message_id"] == "<invoice-2026-118@example.net>"


@pytest.mark.parametrize("fault", FAULTS)
def test_clamd_failures_follow_on_error(chain: Chain, fault: str) -> None:
    reason = {"down": "cannot connect to clamd", "slow": "did not answer within 1s", "size": "INSTREAM size limit exceeded"}
    for policy in ("pass", "refuse"):
        user = f"clam-{fault}-{policy}"
        originals = chain.dovecot.users[user].messages
        with chain.login(user) as client:
            _, listing, _ = client.list()
            sizes = [int(line.split()[1]) for line in listing]
            if policy == "pass":
                # Delivered as it stood before the hook (unscanned, never replaced), padded to LIST's size.
                for number, original in enumerate(originals, start=1):
                    message = retrieve(client, number)
                    assert len(message) == sizes[number - 1] and message.endswith(original)
            else:
                with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                    client.retr(2)
                with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                    client.dele(2)
        if policy == "refuse":
            assert chain.still_on_server(user) == len(originals)
        row = [row for row in chain.records(user) if row["number"] == 2][-1]
        assert row["outcome"] == ("delivered" if policy == "pass" else "refused")
        assert len(row["notes"]) == 1 and reason[fault] in row["notes"][0] and row["verdicts"] == []
    log = chain.proxy.log()
    assert f"hook clam-{fault}-pass failed on message" in log
    assert f"hook clam-{fault}-refuse failed on message" in log
