"""Issue 10, findings 1 and 2, end to end: the hostile messages in a real Dovecot mailbox, a real
``twistd -n popproxy`` with the ``rewrite`` hook (``on_error = "pass"``, as in the findings), and
Python's ``poplib`` as the client. What the client receives is read with Python's ``email`` parser.
"""

from __future__ import annotations

import email
import email.policy
import poplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from popproxy.pki import CertificateAuthority

from support.dovecot import DovecotServer
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port
from support.rewrite_hostile import RULES, SMUGGLE_BOUNDARY, deep_message, mime_tree, smuggling_message

USER = "mime"
PASSWORD = "mime-pw-7c2e1"
MESSAGES = [smuggling_message(), deep_message(500)]


@pytest.fixture(scope="module")
def proxy_port(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[int]:
    """A Dovecot of its own with the two hostile messages, and popproxy in front of it."""
    folder = tmp_path_factory.mktemp("rewrite-e2e")
    dovecot = DovecotServer(folder / "dovecot", leaf=ca.issue(["localhost", "127.0.0.1"]))
    dovecot.add_user(USER, PASSWORD, MESSAGES)
    dovecot.start()
    try:
        port = free_port()
        config = folder / "popproxy.toml"
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
            f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
            '[routing]\ndefault = "dovecot"\n'
            '[[hook]]\nuse = "rewrite"\non_error = "pass"\n' + RULES
        )
        proxy = ProxyProcess(config, [port], folder)
        try:
            yield port
        finally:
            proxy.stop()
    finally:
        dovecot.close()


def text_of(message: bytes) -> str:
    body = email.message_from_bytes(message, policy=email.policy.default).get_body(("plain",))
    assert isinstance(body, EmailMessage)
    return body.get_content()


def fetch(port: int, number: int) -> tuple[bytes, int]:
    """Message ``number`` as the client stores it, and the size LIST announced for it."""
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        listed = int(client.list(number).split()[2])
        return retrieve(client, number), listed
    finally:
        client.quit()


def test_an_encoded_delimiter_in_an_edited_line_makes_no_attachment(proxy_port: int) -> None:
    """Finding 1: every scanner saw a text part and a PDF; the client must get exactly those, the
    link defanged, and no executable."""
    original = MESSAGES[0]
    received, listed = fetch(proxy_port, 1)
    print("finding 1, client received:", mime_tree(received))
    assert len(received) == listed
    assert mime_tree(received) == mime_tree(original) == [
        (0, "multipart/mixed"),
        (1, "text/plain"),
        (1, "application/pdf"),
    ], f"the client received the MIME tree {mime_tree(received)}"
    assert b"\r\nContent-Type: application/x-msdownload" not in received
    assert b"Subject: [EXT] Invoice 4711\r\n" in received and b"X-Scanned: popproxy\r\n" in received
    # The would-be part is what it was, text in the one text part, and its link is defanged.
    text = text_of(received)
    assert text == text_of(original).replace("http://", "hxxp://")
    assert f"\r\n--{SMUGGLE_BOUNDARY}\r\nContent-Type: application/x-msdownload" in text
    assert b"http://" not in received


def test_500_nested_multiparts_do_not_switch_rewriting_off(proxy_port: int) -> None:
    """Finding 2: the nesting made the hook fail, and ``on_error = "pass"`` let the message through
    untagged with its links live. The client must get the tag, the header and the shallow link
    defanged; the MIME tree is the original's, down to the 500th level. What lies deeper than
    ``MAX_DEPTH`` (100) is not looked into, as Dovecot's own parser does not, so the innermost link
    stays as it was (the verdict names the part)."""
    original = MESSAGES[1]
    received, listed = fetch(proxy_port, 2)
    head = received.partition(b"\r\n\r\n")[0]
    print("finding 2, client received header:", head.decode())
    assert len(received) == listed
    assert b"\r\nSubject: [EXT] Deep news\r\n" in received, f"the client received the header\n{head.decode()}"
    assert b"X-Scanned: popproxy\r\n" in received
    assert b"Read hxxp://news.example.com/today now." in received
    assert b"\r\nhttp://deep.example.com/\r\n--n499--\r\n" in received
    assert mime_tree(received) == mime_tree(original) and len(mime_tree(received)) == 502
