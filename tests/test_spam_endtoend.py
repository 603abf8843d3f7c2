"""Spam tagging through the whole chain: real Dovecot → twistd popproxy → real spamd and rspamd →
poplib and fetchmail. And when a scanner is down, slow or talks nonsense, both ``on_error`` policies,
with the message still on the server after a refused RETR."""

from __future__ import annotations

import email
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.badscanner import BadScanner
from support.dovecot import DovecotServer
from support.fetchmail import fetchmail_poll
from support.mailbox import corpus
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
PASSWORD = "spam-pw-9d2e"


def gtube_message() -> bytes:
    return (b"From: Spammer <spam@example.net>\r\nTo: you@example.org\r\nSubject: Cheap watches\r\n"
            b"Message-ID: <gtube@popproxy.test>\r\n\r\nBuy now.\r\n" + GTUBE + b"\r\n.a dotted line\r\n")


FAULTS = ("down", "slow", "garbage")
GARBAGE = {
    "spamassassin": b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe; x / y\r\n\r\n",
    "rspamd": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!",
}


class Chain:
    def __init__(self, proxy: ProxyProcess, port: int, dovecot: DovecotServer) -> None:
        self.proxy, self.port, self.dovecot = proxy, port, dovecot

    def login(self, user: str) -> poplib.POP3:
        client = poplib.POP3("127.0.0.1", self.port, timeout=30)
        client.user(user)
        client.pass_(PASSWORD)
        return client


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer, spamd, rspamd) -> Iterator[Chain]:
    folder = tmp_path_factory.mktemp("spamchain")
    ham = corpus(3, seed=515, large=False)
    dovecot.add_user("scanned", PASSWORD, ham + [gtube_message()])
    hooks = [
        '[[hook]]\nuse = "spamassassin"\nname = "sa"\nusers = ["scanned"]\n'
        f'address = "{spamd.address}"\nsubject_tag = "[SPAM]"\nreport = true\ntimeout = 20\n',
        '[[hook]]\nuse = "rspamd"\nname = "rs"\nusers = ["scanned"]\n'
        f'address = "{rspamd.address}"\nheader_prefix = "X-Rspamd-"\ntimeout = 20\n',
    ]
    backends: list[BadScanner] = []
    for backend in ("spamassassin", "rspamd"):
        for fault in FAULTS:
            for policy in ("pass", "refuse"):
                user = f"{backend}-{fault}-{policy}"
                dovecot.add_user(user, PASSWORD, [ham[0], gtube_message()])
                if fault == "down":
                    address = f"127.0.0.1:{free_port()}"
                else:
                    bad = BadScanner(GARBAGE[backend] if fault == "garbage" else None)
                    backends.append(bad)
                    address = f"127.0.0.1:{bad.port}"
                hooks.append(
                    f'[[hook]]\nuse = "{backend}"\nname = "{user}"\nusers = ["{user}"]\naddress = "{address}"\n'
                    f'timeout = 1\non_error = "{policy}"\n'
                )
    port = free_port()
    config = folder / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n' + "".join(hooks)
    )
    proxy = ProxyProcess(config, [port], folder)
    try:
        yield Chain(proxy, port, dovecot)
    finally:
        proxy.stop()
        for bad in backends:
            bad.close()
    assert PASSWORD not in proxy.log()


def test_gtube_is_spam_and_ham_is_not(chain: Chain) -> None:
    client = chain.login("scanned")
    try:
        _, listing, _ = client.list()
        sizes = [int(line.split()[1]) for line in listing]
        messages = [retrieve(client, n) for n in range(1, len(sizes) + 1)]
        assert [len(m) for m in messages] == sizes
        for message in messages[:-1]:
            parsed = email.message_from_bytes(message)
            assert parsed["X-Spam-Flag"] is None and parsed["X-Spam-Status"].startswith("No, score=")
            assert parsed["X-Rspamd-Flag"] is None and parsed["X-Rspamd-Status"].startswith("No")
            assert not parsed["Subject"].startswith("[SPAM]")
        spam = email.message_from_bytes(messages[-1])
        assert spam["X-Spam-Flag"] == "YES" and spam["X-Rspamd-Flag"] == "YES"
        assert spam["X-Spam-Status"].startswith("Yes, score=") and "GTUBE" in spam["X-Spam-Status"]
        assert spam["Subject"] == "[SPAM] Cheap watches"
        assert "GTUBE" in spam["X-Spam-Report"]
        assert messages[-1].endswith(b"Buy now.\r\n" + GTUBE + b"\r\n.a dotted line\r\n")  # body untouched
        _, top, _ = client.top(len(sizes), 0)
        assert messages[-1].startswith(b"".join(line + b"\r\n" for line in top))
    finally:
        client.quit()


@pytest.mark.parametrize("uidl", [True, False], ids=["fetchmail-top", "fetchmail-retr"])
def test_fetchmail_gets_the_tagged_messages(chain: Chain, tmp_path: Path, uidl: bool) -> None:
    client = chain.login("scanned")
    expected = [retrieve(client, n) for n in range(1, 5)]
    client.quit()
    run = fetchmail_poll(tmp_path, chain.port, "none", user="scanned", password=PASSWORD, uidl=uidl,
                         cafile=Path("/dev/null"))
    assert run.returncode == 0, run.transcript
    # Scanned twice (poplib, then fetchmail), each message comes out the same, byte for byte.
    assert run.delivered == [m.replace(b"\r\n", b"\n") for m in expected]
    assert b"X-Spam-Flag: YES" in run.delivered[-1] and b"Subject: [SPAM] Cheap watches" in run.delivered[-1]


@pytest.mark.parametrize("backend", ["spamassassin", "rspamd"])
@pytest.mark.parametrize("fault", FAULTS)
def test_scanner_failure_policies(chain: Chain, backend: str, fault: str) -> None:
    originals = None
    for policy in ("pass", "refuse"):
        user = f"{backend}-{fault}-{policy}"
        originals = chain.dovecot.users[user].messages
        client = chain.login(user)
        _, listing, _ = client.list()
        sizes = [int(line.split()[1]) for line in listing]
        if policy == "pass":
            # Delivered as it stood before the hook: the original, padded to the size LIST gave.
            for number, original in enumerate(originals, start=1):
                message = retrieve(client, number)
                assert len(message) == sizes[number - 1] and message.endswith(original)
                assert b"X-Spam-" not in message.partition(b"\r\n\r\n")[0]
            client.quit()
        else:
            with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                client.retr(2)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                client.dele(2)  # the client deletes blindly after RETR: refused, never forwarded
            client.quit()
            # After the session, the message is still on the server.
            check = poplib.POP3("127.0.0.1", chain.dovecot.plain_port, timeout=10)
            check.user(user)
            check.pass_(PASSWORD)
            assert check.stat()[0] == len(originals)
            check.quit()
    log = chain.proxy.log()
    assert f"hook {backend}-{fault}-pass failed on message" in log
    assert f"hook {backend}-{fault}-refuse failed on message" in log
