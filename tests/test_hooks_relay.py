"""Message and session hooks in the relay, in memory: sizes stay exact, policies hold, order holds."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from popproxy.config import ConfigError
from popproxy.hooks.pipeline import FILLER_MIN
from popproxy.hooks.registry import build_hooks
from popproxy.pop3.wire import unstuff_body
from popproxy.testing import MemoryProxy, RecordingClient, wire_body

import support.samplehooks as samplehooks
from support.configs import proxy_config

MESSAGES = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two SPAM\r\n\r\n.leading dot\r\nline\r\nline\r\n",
    b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n" * 2000,  # larger than max_size below
    b"Subject: four\r\n\r\nfourth\r\n",
]
MAX_SIZE = 1000


def make(tmp_path: Path, hooks: str) -> MemoryProxy:
    config = proxy_config(
        tmp_path,
        upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}},
        extra=hooks,
    )
    samplehooks.RECORDED.clear()
    samplehooks.CANCELLED.clear()
    proxy = MemoryProxy(config)
    samplehooks.CLOCK = proxy.clock
    proxy.upstreams["main"].add_user("alice", "alice-pw", MESSAGES)
    return proxy


def tagger(**options: object) -> str:
    lines = ['[[hook]]', 'use = "support.samplehooks:tagger"', f"max_size = {MAX_SIZE}"]
    lines += [f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
              for key, value in options.items()]
    return "\n".join(lines) + "\n"


def login(proxy: MemoryProxy) -> RecordingClient:
    client, _ = proxy.connect()
    client.take()
    assert proxy.say(client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    return client


def retr(answer: bytes) -> tuple[int, bytes]:
    """(octets announced, message delivered) of one RETR answer."""
    status, _, body = answer.partition(b"\r\n")
    announced = int(re.match(rb"\+OK (\d+) octets", status).group(1))
    return announced, unstuff_body(body)


def listing(answer: bytes) -> dict[int, int]:
    lines = answer.split(b"\r\n")[1:-2]
    return {int(n): int(size) for n, size in (line.split() for line in lines)}


def test_sizes_agree_everywhere_with_a_rewriting_hook(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=64))
    client = login(proxy)
    sizes = listing(proxy.say(client, b"LIST\r\n"))
    # Scanned messages grow by the reservation plus the filler; the big one is untouched.
    expected = {1: len(MESSAGES[0]) + 64 + FILLER_MIN, 2: len(MESSAGES[1]) + 64 + FILLER_MIN,
                3: len(MESSAGES[2]), 4: len(MESSAGES[3]) + 64 + FILLER_MIN}
    assert sizes == expected
    assert proxy.say(client, b"STAT\r\n") == b"+OK 4 %d\r\n" % sum(expected.values())
    for number in (1, 2, 3, 4):
        assert proxy.say(client, b"LIST %d\r\n" % number) == b"+OK %d %d\r\n" % (number, expected[number])
        announced, message = retr(proxy.say(client, b"RETR %d\r\n" % number))
        assert announced == len(message) == expected[number]
        if number == 3:
            assert message == MESSAGES[2]
        else:
            assert message.startswith(b"X-Popproxy-Pad: ")
            assert b"\r\nX-Tag: yes\r\n" + MESSAGES[number - 1] in message
    # DELE changes STAT's total by exactly the listed size.
    assert proxy.say(client, b"DELE 1\r\nSTAT\r\n") == b"+OK deleted\r\n+OK 3 %d\r\n" % (sum(expected.values()) - expected[1])
    assert proxy.say(client, b"RSET\r\nSTAT\r\n") == b"+OK\r\n+OK 4 %d\r\n" % sum(expected.values())


def test_top_is_cut_from_the_rewritten_message_and_cached(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=64))
    client = login(proxy)
    fake = proxy.upstreams["main"]
    top = proxy.say(client, b"TOP 2 1\r\n")
    _announced, whole = retr(proxy.say(client, b"RETR 2\r\n"))
    head, _, body = whole.partition(b"\r\n\r\n")
    assert unstuff_body(top.partition(b"\r\n")[2]) == head + b"\r\n\r\n" + body.split(b"\r\n")[0] + b"\r\n"
    # The upstream was asked for the whole message once, with TOP, and never with RETR.
    assert [line for line in fake.received if line.startswith((b"TOP", b"RETR"))] == [b"TOP 2 99999999"]
    assert proxy.say(client, b"TOP 2 0\r\n").endswith(b"X-Tag: yes\r\nSubject: two SPAM\r\n\r\n.\r\n")


def test_rewrite_adding_a_dot_line_is_restuffed(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=64, dot_line=True))
    client = login(proxy)
    answer = proxy.say(client, b"RETR 1\r\n")
    assert b"\r\n..\r\n..forged\r\n" in answer  # stuffed on the wire: no early terminator
    announced, message = retr(answer)
    assert announced == len(message)
    assert b"\r\n\r\n.\r\n.forged\r\nfirst\r\n" in message
    assert proxy.say(client, b"NOOP\r\n") == b"+OK\r\n"  # still in step


@pytest.mark.parametrize("mode", ["raise", "garbage", "hang"])
def test_on_error_pass_delivers_the_message_as_it_stood(tmp_path: Path, mode: str) -> None:
    proxy = make(tmp_path, tagger(reservation=64, mode=mode, timeout=5))
    client = login(proxy)
    client.send(b"RETR 1\r\nNOOP\r\n")
    proxy.pump()
    if mode == "hang":
        assert client.take() == b""  # waiting for the hook
        proxy.clock.advance(5)
        proxy.pump()
        assert samplehooks.CANCELLED == [1]
    answer = client.take()
    announced, message = retr(answer.rpartition(b"+OK\r\n")[0])
    assert announced == len(message) == len(MESSAGES[0]) + 64 + FILLER_MIN
    assert message.endswith(b"\r\n" + MESSAGES[0]) and b"X-Tag" not in message
    assert answer.endswith(b".\r\n+OK\r\n")


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_on_error_refuse_keeps_the_message_and_blocks_its_dele(tmp_path: Path, mode: str) -> None:
    proxy = make(tmp_path, tagger(reservation=64, mode=mode, timeout=5, on_error="refuse"))
    client = login(proxy)
    client.send(b"RETR 1\r\nDELE 1\r\nRETR 4\r\nDELE 4\r\nQUIT\r\n")
    proxy.pump()
    proxy.clock.advance(5)
    proxy.pump()
    proxy.clock.advance(5)
    proxy.pump()
    answer = client.take()
    assert answer.count(b"-ERR [SYS/TEMP] Message temporarily unavailable") == 2
    assert answer.count(b"-ERR [SYS/TEMP] Message was not delivered, so it is not deleted.") == 2
    assert answer.endswith(b"+OK Bye\r\n")
    fake = proxy.upstreams["main"]
    assert b"DELE 1" not in fake.received and b"DELE 4" not in fake.received
    assert fake.mailboxes[b"alice"].remaining() == MESSAGES


def test_growing_past_the_reservation_is_a_hook_error(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=3, text="much longer than three octets"))
    client = login(proxy)
    announced, message = retr(proxy.say(client, b"RETR 1\r\n"))
    assert announced == len(message) == len(MESSAGES[0]) + 3 + FILLER_MIN
    assert b"X-Tag" not in message


def test_pipelined_retrs_with_slow_hooks_answer_in_order(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=64, delay=2.0))
    client = login(proxy)
    client.send(b"RETR 1\r\nRETR 2\r\nNOOP\r\nRETR 4\r\nSTAT\r\n")
    proxy.pump()
    assert client.take() == b""
    for _ in range(3):
        proxy.clock.advance(2)
        proxy.pump()
    answer = client.take()
    positions = [answer.index(marker) for marker in (b"Subject: one", b"Subject: two", b"+OK\r\n+OK", b"Subject: four", b"+OK 4 ")]
    assert positions == sorted(positions)


def test_two_hooks_reservations_add_up_and_verdicts_reach_session_hooks(tmp_path: Path) -> None:
    hooks = (tagger(reservation=40, text="first") + 'name = "one"\n' + tagger(reservation=50, text="second")
             + 'name = "two"\n' + '[[hook]]\nuse = "support.samplehooks:recorder"\n')
    proxy = make(tmp_path, hooks)
    client = login(proxy)
    announced, message = retr(proxy.say(client, b"RETR 2\r\n"))
    assert announced == len(message) == len(MESSAGES[1]) + 90 + FILLER_MIN
    assert message.index(b"X-Tag: second") < message.index(b"X-Tag: first")  # each saw the one before
    proxy.say(client, b"RETR 3\r\nQUIT\r\n")
    events = [event[0] for event in samplehooks.RECORDED]
    assert events[:2] == ["opened", "authenticated"] and events[-1] == "closed"
    deliveries = [event[2] for event in samplehooks.RECORDED if event[0] == "delivered"]
    assert [(d.number, d.scanned, d.outcome) for d in deliveries] == [(2, True, "delivered"), (3, False, "delivered")]
    assert deliveries[0].sha256 == hashlib.sha256(message).hexdigest() and deliveries[0].size == len(message)
    assert deliveries[1].sha256 == hashlib.sha256(MESSAGES[2]).hexdigest()
    assert {v.hook: v.spam for v in deliveries[0].verdicts} == {"one": True, "two": True}
    assert deliveries[0].headers["Subject"] == "two SPAM"
    commands = [(e[2], e[3], e[4]) for e in samplehooks.RECORDED if e[0] == "command"]
    assert commands == [("RETR", "2", True), ("RETR", "3", True), ("QUIT", "", True)]


def test_hooks_limited_to_users_do_not_touch_others(tmp_path: Path) -> None:
    proxy = make(tmp_path, tagger(reservation=64) + 'users = ["@example.org", "bob"]\n')
    client = login(proxy)
    assert proxy.say(client, b"RETR 1\r\n") == b"+OK %d octets\r\n" % len(MESSAGES[0]) + wire_body(MESSAGES[0])
    assert [line for line in proxy.upstreams["main"].received if line in (b"LIST", b"UIDL")] == []


def test_session_hook_that_raises_is_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = make(tmp_path, '[[hook]]\nuse = "support.samplehooks:recorder"\n')

    def broken(*args: object) -> None:
        raise RuntimeError("session hook bug")

    monkeypatch.setattr(samplehooks.Recorder, "command_done", broken)
    client = login(proxy)
    assert proxy.say(client, b"STAT\r\nNOOP\r\n").count(b"+OK") == 2


@pytest.mark.parametrize(
    ("hooks", "key", "reason"),
    [
        ('[[hook]]\nuse = "no-such-hook"\n', "hook[0].use", "unknown hook"),
        ('[[hook]]\nuse = "support.samplehooks:nothing"\n', "hook[0].use", "cannot load"),
        ('[[hook]]\nuse = "support.samplehooks:Tagger"\n', "hook[0].use", "IHookFactory"),
        ('[[hook]]\nuse = "support.samplehooks:tagger"\ncolour = 1\n', "hook[0].colour", "unknown key"),
        ('[[hook]]\nuse = "support.samplehooks:tagger"\nmode = "x"\n', "hook[0].mode", "must be one of"),
        ('[[hook]]\nuse = "support.samplehooks:tagger"\non_error = "ignore"\n', "hook[0].on_error", "must be one of"),
        ('[[hook]]\nuse = "support.samplehooks:tagger"\n[[hook]]\nuse = "support.samplehooks:tagger"\n', "hook[1].name", "already"),
    ],
)
def test_bad_hook_settings_name_the_key(tmp_path: Path, hooks: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_hooks(proxy_config(tmp_path, upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}}, extra=hooks))
    assert error.value.key == key and reason in error.value.reason
