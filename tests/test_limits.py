"""Limits, penalties and timeouts, in memory with a fake clock (``[limits]``)."""

from __future__ import annotations

from pathlib import Path

from popproxy.protocol.client import AUTH_FAILED
from popproxy.protocol.guard import Guard, address_key
from popproxy.testing import MemoryProxy, RecordingClient

from support.configs import proxy_config

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n"]


def make(tmp_path: Path, limits: str = "", tls: str = "none") -> MemoryProxy:
    listener: dict[str, object] = {"endpoint": "tcp:110", "tls": tls}
    config = proxy_config(
        tmp_path,
        listeners=[listener],
        upstreams={"main": {"address": "127.0.0.1:1110", "tls": "none"}},
        extra="[limits]\n" + limits,
    )
    proxy = MemoryProxy(config, server_tls=object() if tls != "none" else None)
    proxy.upstreams["main"].add_user("alice", "alice-pw", MESSAGES)
    return proxy


def say(proxy: MemoryProxy, client: RecordingClient, data: bytes) -> bytes:
    client.send(data)
    proxy.pump()
    return client.take()


def greeted(proxy: MemoryProxy, peer: str = "192.0.2.1") -> RecordingClient:
    client, _ = proxy.connect(peer)
    assert client.take() == b"+OK POP3 proxy ready.\r\n"
    return client


# -- session caps ------------------------------------------------------------------------------------

def test_global_session_cap(tmp_path: Path) -> None:
    proxy = make(tmp_path, "max_sessions = 2\n")
    first, second = greeted(proxy, "192.0.2.1"), greeted(proxy, "192.0.2.2")
    third, _ = proxy.connect("192.0.2.3")
    proxy.pump()
    assert third.take() == b"-ERR [SYS/TEMP] Too many sessions, try again later.\r\n" and third.lost
    say(proxy, first, b"QUIT\r\n")
    assert greeted(proxy, "192.0.2.3")  # a place came free
    assert not second.lost


def test_per_address_cap_groups_ipv6_by_64_and_spares_the_allowlist(tmp_path: Path) -> None:
    proxy = make(tmp_path, 'max_sessions_per_ip = 1\nip_allowlist = ["198.51.100.0/24"]\n')
    greeted(proxy, "2001:db8:1:2::10")
    refused, _ = proxy.connect("2001:db8:1:2::99")  # same /64
    proxy.pump()
    assert refused.take().startswith(b"-ERR [SYS/TEMP]") and refused.lost
    greeted(proxy, "2001:db8:1:3::10")  # another /64
    greeted(proxy, "198.51.100.7")
    greeted(proxy, "198.51.100.7")  # behind NAT: not limited
    assert address_key("::ffff:192.0.2.9") == "192.0.2.9"


def test_per_user_cap_refuses_with_in_use_and_drops_upstream_without_quit(tmp_path: Path) -> None:
    proxy = make(tmp_path, "max_sessions_per_user = 1\n")
    first = greeted(proxy, "192.0.2.1")
    assert say(proxy, first, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    second = greeted(proxy, "192.0.2.2")
    assert say(proxy, second, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n-ERR [IN-USE] Too many sessions for this user.\r\n"
    assert second.lost
    fake = proxy.upstreams["main"]
    assert fake.connections == 2 and b"QUIT" not in fake.received
    assert say(proxy, first, b"STAT\r\n").startswith(b"+OK 2 ")


def test_guard_table_is_bounded_and_keeps_live_sessions(tmp_path: Path) -> None:
    limits = make(tmp_path, "ip_table_size = 10\n").config.limits
    from twisted.internet.task import Clock

    guard = Guard(limits, Clock())
    assert guard.admit("203.0.113.1") is None
    for n in range(1000):
        guard.login_failed(f"10.{n // 250}.{n % 250}.1")
    assert len(guard) == 10
    guard.left("203.0.113.1")
    assert guard.sessions == 0


# -- failed logins -----------------------------------------------------------------------------------

def answer_after(proxy: MemoryProxy, client: RecordingClient, data: bytes) -> tuple[float, bytes]:
    """Send ``data`` (USER and PASS), then let time pass until the answer to PASS comes: how long it
    took, and the answer."""
    client.send(data)
    proxy.pump()
    start = proxy.clock.seconds()
    answer = client.take()
    assert answer.startswith(b"+OK\r\n")  # USER's
    answer = answer[len(b"+OK\r\n") :]
    while not answer:
        proxy.clock.advance(0.125)
        proxy.pump()
        answer = client.take()
    return proxy.clock.seconds() - start, answer


def test_failed_logins_are_delayed_more_each_time_then_disconnected(tmp_path: Path) -> None:
    """The penalty is paid before the upstream is asked: the first guess is free, each later one on
    the connection waits twice as long, and the third failure ends the connection."""
    proxy = make(tmp_path, "login_failure_delay = 1.0\n")
    client = greeted(proxy)
    fake = proxy.upstreams["main"]
    timings = []
    for _attempt in range(3):
        asked = fake.received.count(b"PASS wrong")
        elapsed, answer = answer_after(proxy, client, b"USER alice\r\nPASS wrong\r\n")
        timings.append(elapsed)
        assert answer == AUTH_FAILED
        assert fake.received.count(b"PASS wrong") == asked + 1
    assert timings == [0.0, 1.0, 2.0]
    assert client.lost


def test_penalty_applies_before_the_upstream_is_asked(tmp_path: Path) -> None:
    """From a penalised address nothing reaches the upstream before the delay is over, whatever the
    password: no answer inside the delay tells a guesser anything."""
    proxy = make(tmp_path, "login_failure_delay = 1.0\n")
    first = greeted(proxy, "192.0.2.20")
    assert answer_after(proxy, first, b"USER alice\r\nPASS wrong\r\n")[1] == AUTH_FAILED
    fake = proxy.upstreams["main"]
    client = greeted(proxy, "192.0.2.20")
    client.send(b"USER alice\r\nPASS alice-pw\r\n")
    proxy.pump()
    assert client.take() == b"+OK\r\n"
    connections = fake.connections
    proxy.clock.advance(0.999)
    proxy.pump()
    assert client.take() == b"" and fake.connections == connections
    proxy.clock.advance(0.001)
    proxy.pump()
    assert client.take() == b"+OK Logged in.\r\n"


def test_unknown_user_wrong_and_right_password_take_the_same_time(tmp_path: Path) -> None:
    """From an address with one failure behind it, an unknown user, a wrong password and the right
    one all wait the same second before anything is decided; the two failures look alike."""
    proxy = make(tmp_path, "login_failure_delay = 1.0\n")
    results = []
    for n, (user, password) in enumerate(((b"alice", b"wrong"), (b"nobody", b"wrong"), (b"alice", b"alice-pw"))):
        peer = f"192.0.2.{30 + n}"
        warmup = greeted(proxy, peer)
        answer_after(proxy, warmup, b"USER alice\r\nPASS wrong\r\n")
        say(proxy, warmup, b"QUIT\r\n")
        client = greeted(proxy, peer)
        results.append(answer_after(proxy, client, b"USER " + user + b"\r\nPASS " + password + b"\r\n"))
    assert results == [(1.0, AUTH_FAILED), (1.0, AUTH_FAILED), (1.0, b"+OK Logged in.\r\n")]


def test_failures_from_one_address_carry_over_to_new_connections(tmp_path: Path) -> None:
    proxy = make(tmp_path, "login_failure_delay = 1.0\n")
    for _ in range(2):
        client = greeted(proxy)
        client.send(b"USER alice\r\nPASS wrong\r\n")
        proxy.pump()
        proxy.clock.advance(10)
        proxy.pump()
    client = greeted(proxy)
    client.send(b"USER alice\r\nPASS wrong\r\n")
    proxy.pump()
    proxy.clock.advance(1.9)
    proxy.pump()
    assert client.take() == b"+OK\r\n"  # two failures from this address: 2 s, not 0
    proxy.clock.advance(0.1)
    proxy.pump()
    assert client.take() == AUTH_FAILED


def test_upstream_down_is_not_a_failed_login(tmp_path: Path) -> None:
    from popproxy.config import Address

    proxy = make(tmp_path, "max_login_failures = 1\n")
    proxy.refuse.add(Address("127.0.0.1", 1110))
    client = greeted(proxy)
    assert say(proxy, client, b"USER alice\r\nPASS alice-pw\r\n").endswith(b"-ERR [SYS/TEMP] Mail server unavailable, try again later.\r\n")
    assert not client.lost
    proxy.refuse.clear()
    assert say(proxy, client, b"USER alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"


# -- bad commands ------------------------------------------------------------------------------------

def test_repeated_bad_commands_disconnect(tmp_path: Path) -> None:
    proxy = make(tmp_path, "max_bad_commands = 3\n")
    client = greeted(proxy)
    answer = say(proxy, client, b"FOO\r\n" + b"X" * 300 + b"\r\nRETR 1\r\nNOOP\r\n")
    assert answer.count(b"-ERR") == 4 and answer.endswith(b"-ERR Too many bad commands, goodbye.\r\n")
    assert b"+OK" not in answer  # the NOOP after the third bad command was not served
    assert client.lost


# -- timeouts ----------------------------------------------------------------------------------------

def test_tls_handshake_timeout_on_implicit_listener(tmp_path: Path) -> None:
    proxy = make(tmp_path, "tls_handshake_timeout = 5\n", tls="implicit")
    client, _ = proxy.connect()
    proxy.clock.advance(4.9)
    proxy.pump()
    assert not client.lost
    proxy.clock.advance(0.1)
    proxy.pump()
    assert client.lost
    assert proxy.upstreams["main"].connections == 0


def test_silent_upstream_times_out_without_quit(tmp_path: Path) -> None:
    proxy = make(tmp_path, "upstream_timeout = 30\n")
    proxy.upstreams["main"].stall = frozenset({b"RETR"})
    client = greeted(proxy)
    say(proxy, client, b"USER alice\r\nPASS alice-pw\r\n")
    client.send(b"DELE 2\r\nRETR 1\r\n")
    proxy.pump()
    assert client.take() == b"+OK deleted\r\n"
    proxy.clock.advance(29)
    proxy.pump()
    assert not client.lost
    proxy.clock.advance(1)
    proxy.pump()
    assert client.lost
    fake = proxy.upstreams["main"]
    assert b"QUIT" not in fake.received
    assert fake.mailboxes[b"alice"].remaining() == MESSAGES  # the DELE was never committed


def test_idle_timeout_counts_from_the_last_command(tmp_path: Path) -> None:
    proxy = make(tmp_path, "idle_timeout = 600\n")
    client = greeted(proxy)
    say(proxy, client, b"USER alice\r\nPASS alice-pw\r\n")
    proxy.clock.advance(300)
    assert say(proxy, client, b"NOOP\r\n") == b"+OK\r\n"
    proxy.clock.advance(599)
    proxy.pump()
    assert not client.lost
    proxy.clock.advance(1)
    proxy.pump()
    assert client.take().startswith(b"-ERR [SYS/TEMP] Autologout") and client.lost
