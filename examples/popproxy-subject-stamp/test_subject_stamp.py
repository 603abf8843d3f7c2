"""Tests for the hook, the way popproxy tests its own hooks: a client, the proxy and a fake upstream
POP3 server in memory (``popproxy.testing.MemoryProxy``): no sockets, no real time.

Run them with ``python -m pytest`` in this folder, with popproxy installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popproxy.config import ConfigError, parse_config
from popproxy.pop3.wire import unstuff_body
from popproxy.testing import MemoryProxy

CONFIG = """
[[listen]]
endpoint = "tcp:110"
tls = "none"

[upstream.main]
address = "127.0.0.1:1110"
tls = "none"

[routing]
default = "main"

[[hook]]
use = "popproxy_subject_stamp:factory"
"""

MESSAGES = [
    b"From: a@example.org\r\nSubject: Lunch\r\n\r\nThursday?\r\n.a line that starts with a dot\r\n",
    b"From: a@example.org\r\n\r\nNo subject at all.\r\n",
]


class Session:
    """A client logged in through the proxy to a fake upstream that holds ``MESSAGES``."""

    def __init__(self, settings: str) -> None:
        self.proxy = MemoryProxy(parse_config(CONFIG + settings, Path("popproxy.toml")))
        self.proxy.upstreams["main"].add_user("alice", "secret", MESSAGES)
        self.client, _ = self.proxy.connect()
        self.ask(b"USER alice")
        assert self.ask(b"PASS secret").startswith(b"+OK")

    def ask(self, command: bytes) -> bytes:
        """Send one command; return the whole answer."""
        self.client.take()
        self.client.send(command + b"\r\n")
        self.proxy.settle()
        return self.client.take()

    def close(self) -> None:
        self.ask(b"QUIT")
        self.proxy.close()


def test_the_subject_is_stamped_and_sizes_stay_exact() -> None:
    session = Session('stamp = "[external]"\n')
    listing = session.ask(b"LIST").split(b"\r\n")[1:-2]  # "n size" lines, between +OK and "."
    sizes = [int(line.split()[1]) for line in listing]
    messages = [unstuff_body(session.ask(b"RETR %d" % n).partition(b"\r\n")[2]) for n in (1, 2)]
    session.close()
    assert [len(m) for m in messages] == sizes  # what LIST said is what RETR gives
    first, second = messages
    assert b"\r\nSubject: [external] Lunch\r\n" in first
    assert first.endswith(MESSAGES[0].partition(b"\r\n\r\n")[2])  # the body is untouched
    assert b"\r\nSubject: [external]\r\n" in second


def test_a_misspelt_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="stamps"):
        MemoryProxy(parse_config(CONFIG + 'stamps = "[x]"\n', Path("popproxy.toml")))
