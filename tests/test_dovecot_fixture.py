"""The Dovecot fixture and the mail corpus, checked with Python's poplib straight against Dovecot.

Later tests trust ``dovecot.users[name].messages`` to be exactly what ``RETR`` returns; these tests are
where that trust comes from.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import random
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable

import pytest

from support.dovecot import DovecotServer, MailUser
from support.mailbox import KINDS, LARGE_ATTACHMENT_BYTES, corpus, message_id

# --- helpers ---------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def retr_bytes(pop: poplib.POP3, number: int) -> bytes:
    """``RETR`` as bytes: poplib un-stuffs and strips CRLF; put the line endings back."""
    _, lines, _ = pop.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def check_mailbox(pop: poplib.POP3, user: MailUser, numbers: Iterable[int]) -> None:
    """STAT, LIST and UIDL as the corpus predicts, and the listed messages byte for byte."""
    assert pop.stat() == (len(user.messages), user.total_size)
    _, listing, _ = pop.list()
    assert listing == [f"{n} {size}".encode() for n, size in enumerate(user.sizes, start=1)]
    _, uidls, _ = pop.uidl()
    assert uidls == [f"{n} {uidl}".encode() for n, uidl in enumerate(user.uidls, start=1)]
    for number in numbers:
        got = retr_bytes(pop, number)
        assert (number, len(got), sha(got)) == (
            number,
            user.sizes[number - 1],
            sha(user.messages[number - 1]),
        )


def login(pop: poplib.POP3, user: MailUser) -> None:
    pop.user(user.name)
    assert pop.pass_(user.password).startswith(b"+OK")


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def tls_context(dovecot: DovecotServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.ca_path))


# --- the corpus ------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_in_wire_form() -> None:
    first = corpus(12, seed=9, large=True)
    assert first == corpus(12, seed=9, large=True)
    assert first != corpus(12, seed=10, large=True)
    assert len({message_id(m) for m in first + corpus(12, seed=10, large=True)}) == 24
    for message in first:
        assert message.endswith(b"\r\n")
        assert b"\n" not in message.replace(b"\r\n", b"") and b"\r" not in message.replace(b"\r\n", b"")
    assert max(len(m) for m in first) > LARGE_ATTACHMENT_BYTES
    assert len(first[12 // 2]) > LARGE_ATTACHMENT_BYTES


def test_corpus_covers_the_tricky_cases() -> None:
    plain, dots, multipart, utf8, empty_body, long_lines = corpus(len(KINDS), seed=3, large=False)
    body = dots.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert {b".", b"..", b".foo", b"..."} <= set(lines)
    assert body.endswith(b"\r\n.\r\n")  # a last line of "." sits right before the terminator
    assert b"Content-Transfer-Encoding: base64" in multipart and b"multipart/mixed" in multipart
    assert "Zoë".encode() in utf8.split(b"\r\n\r\n")[0] and b"8bit" in utf8
    assert empty_body.endswith(b"\r\n\r\n") and empty_body.count(b"\r\n\r\n") == 1
    assert max(len(line) for line in long_lines.split(b"\r\n")) == 998
    assert b"\r\n\r\n" in plain


# --- Dovecot, through poplib -----------------------------------------------------------------------


def test_plain_user_pass(dovecot: DovecotServer) -> None:
    dave = dovecot.users["dave"]
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        login(pop, dave)
        check_mailbox(pop, dave, range(1, len(dave.messages) + 1))
    finally:
        pop.quit()


def test_stls(dovecot: DovecotServer, bob: MailUser) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        pop.stls(tls_context(dovecot))
        assert "STLS" not in pop.capa()
        login(pop, bob)
        check_mailbox(pop, bob, range(1, len(bob.messages) + 1))
    finally:
        pop.quit()


def test_implicit_tls_sample_of_alice_with_the_large_message(dovecot: DovecotServer) -> None:
    alice = dovecot.users["alice"]
    assert alice.sizes[alice.largest - 1] > LARGE_ATTACHMENT_BYTES
    count = len(alice.messages)
    sample = {
        *range(1, len(KINDS) + 1),
        alice.largest,
        count,
        *random.Random(7).sample(range(1, count + 1), 12),
    }
    pop = poplib.POP3_SSL("localhost", dovecot.tls_port, context=tls_context(dovecot), timeout=30)
    try:
        assert isinstance(pop.sock, ssl.SSLSocket) and pop.sock.version() in ("TLSv1.2", "TLSv1.3")
        login(pop, alice)
        check_mailbox(pop, alice, sorted(sample))
    finally:
        pop.quit()


def test_user_name_with_domain_and_wrong_password(dovecot: DovecotServer) -> None:
    carol = dovecot.users["carol@example.org"]
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    try:
        pop.user(carol.name)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            pop.pass_("not-" + carol.password)
        login(pop, carol)
        check_mailbox(pop, carol, [1, len(carol.messages)])
    finally:
        pop.quit()


def test_delete_then_reset_user(dovecot: DovecotServer, bob: MailUser) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    login(pop, bob)
    pop.dele(1)
    pop.dele(len(bob.messages))
    pop.quit()

    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    login(pop, bob)
    assert pop.stat() == (len(bob.messages) - 2, bob.total_size - bob.sizes[0] - bob.sizes[-1])
    pop.quit()

    dovecot.reset_user("bob")
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    try:
        login(pop, bob)
        check_mailbox(pop, bob, [1, len(bob.messages)])  # UIDLs are the original ones too
    finally:
        pop.quit()


def test_add_user_while_running(dovecot: DovecotServer) -> None:
    added = dovecot.add_user("fixture-added", "added-pw", corpus(3, seed=5, large=False))
    assert dovecot.users["fixture-added"] is added
    pop = poplib.POP3_SSL("localhost", dovecot.tls_port, context=tls_context(dovecot), timeout=10)
    try:
        login(pop, added)
        check_mailbox(pop, added, [1, 2, 3])
    finally:
        pop.quit()


def test_many_sessions_of_one_user_from_one_address(dovecot: DovecotServer) -> None:
    """Dovecot's default allows 10 per user and IP (``mail_max_userip_connections``); soak tests need more."""
    dave = dovecot.users["dave"]
    sessions = []
    try:
        for _ in range(25):
            pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
            sessions.append(pop)
            login(pop, dave)
        assert all(pop.stat()[0] == len(dave.messages) for pop in sessions)
        wait_for(lambda: len(dovecot.pop3_pids("dave")) >= 25)
    finally:
        for pop in sessions:
            pop.quit()


def test_pop3_pids_finds_the_session_and_kill_cuts_a_retr(dovecot: DovecotServer) -> None:
    alice = dovecot.users["alice"]
    size = alice.sizes[alice.largest - 1]
    before = set(dovecot.pop3_pids("alice"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window (set before connecting, so it is what TCP negotiates) keeps most of
    # the ~7 MB message in Dovecot's hands: at most its send buffer (4 MB) is in flight.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((dovecot.host, dovecot.plain_port))
    with sock, sock.makefile("rb") as reader:
        assert reader.readline().startswith(b"+OK")
        sock.sendall(f"USER {alice.name}\r\nPASS {alice.password}\r\n".encode())
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"+OK")
        wait_for(lambda: set(dovecot.pop3_pids("alice")) - before)
        (pid,) = set(dovecot.pop3_pids("alice")) - before
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert re.match(rb"\S*/pop3 \[alice 127\.0\.0\.1", cmdline.read())
        assert pid not in dovecot.pop3_pids("dave")

        sock.sendall(f"RETR {alice.largest}\r\n".encode())
        assert reader.readline() == f"+OK {size} octets\r\n".encode()
        received = len(reader.read(1000))
        os.kill(pid, signal.SIGKILL)
        # Drain what the kernel still holds quickly (a 4 KB window would take a minute).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        tail = b""
        while chunk := reader.read1(1 << 20):
            received += len(chunk)
            tail = (tail + chunk)[-5:]
    assert received < size and tail != b"\r\n.\r\n"
    wait_for(lambda: pid not in dovecot.pop3_pids("alice"))

    # The server carries on.
    pop = poplib.POP3(dovecot.host, dovecot.plain_port, timeout=10)
    try:
        login(pop, alice)
        assert pop.stat() == (len(alice.messages), alice.total_size)
    finally:
        pop.quit()


def test_config_is_self_contained(dovecot: DovecotServer) -> None:
    config = dovecot.config_path.read_text()
    assert "/etc/dovecot" not in config and "!include" not in config
    assert f"port = {dovecot.plain_port}" in config and f"port = {dovecot.tls_port}" in config
    unexpected = [
        line
        for line in dovecot.log_text().splitlines()
        if re.search(r": (Fatal|Error|Panic|Warning):", line) and "killed with signal 9" not in line
    ]
    assert unexpected == []
