"""Hostile upstreams: a scripted fake upstream for every fault, on real loopback sockets.

The proxy runs in this process (pytest-twisted's reactor), routing user ``victim`` to a scripted
upstream (``tests/support/scripted.py``: a plain socket server whose every connection follows a
list of steps) and everyone else to a well-behaved ``FakePOP3Factory``. In every case a *healthy*
session, logged in through the same proxy before the fault starts, keeps fetching a message while the
victim's upstream misbehaves and must see no difference (``Healthy``).

For each fault the tests check what the victim's client gets (a clear ``-ERR`` or a closed
connection, never a shifted answer or a message that looks complete but is not), what the log says,
that no ``QUIT`` reached the upstream on the client's behalf, and, where an upstream floods the proxy,
that the proxy's memory stays bounded (``tracemalloc``, the proxy being in this process).

Upstream response injection after STLS (RFC 2595 §4, RFC 3207 §6), line and answer bounds (RFC 1939
§3, RFC 2449 §4), answers paired with commands under pipelining (RFC 2449 §6.6), exact sizes (RFC
1939 §5, §7); the issue: "Upstream refuses, hangs, resets mid-command,
closes mid-RETR, or answers garbage ... Each case: the affected session gets a clear answer or a
clean close, other sessions are unaffected, the log says what happened, and no mail is lost or
delivered truncated."
"""

from __future__ import annotations

import gc
import re
import socket
import ssl
import threading
import time
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent, globalLogPublisher

from popproxy.config import load_config
from popproxy.hooks.pipeline import FILLER_MIN
from popproxy.pki import CertificateAuthority, IssuedCertificate
from popproxy.pop3.wire import unstuff_body
from popproxy.protocol.client import ClientProtocol
from popproxy.protocol.upstream import UpstreamProtocol
from popproxy.service import ProxyService
from popproxy.testing import FakePOP3Factory, wire_body

from support.pop3client import RawPOP3
from support.proxyproc import free_port
from support.scripted import (
    CAPA,
    CAPA_PIPELINING,
    Answer,
    Close,
    Dribble,
    Expect,
    Hang,
    Reset,
    ScriptedUpstream,
    Send,
    Serve,
    Sleep,
    StartTLS,
    Stream,
    greeting,
    login,
    refused_address,
)

HEALTHY_MESSAGE = b"Subject: healthy\r\n\r\n.starts with a dot\r\nbody\r\n"
UPSTREAM_DOWN = b"-ERR [SYS/TEMP] Mail server unavailable, try again later.\r\n"
MiB = 1024 * 1024
#: a message hook that rewrites (adds a header line) and reserves 64 octets, for the victim only
HOOKS = '[[hook]]\nuse = "support.samplehooks:tagger"\nreservation = 64\nusers = ["victim"]\n'


# -- harness -----------------------------------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


class Proxy:
    """The running proxy: ``port`` to connect to, ``service`` for its factories."""

    def __init__(self, service: ProxyService, port: int) -> None:
        self.service = service
        self.port = port

    @property
    def sessions(self) -> set[ClientProtocol]:
        return {session for factory in self.service.factories for session in factory.sessions}


@asynccontextmanager
async def running(tmp_path: Path, hostile: str, *, limits: dict[str, object] | None = None, hooks: str = "",
                  upstream_tls: str = "none", ca: CertificateAuthority | None = None) -> AsyncIterator[Proxy]:
    """A proxy that routes ``victim`` to ``hostile`` ("host:port") and everyone else to a healthy fake."""
    fake = FakePOP3Factory()
    fake.add_user("healthy", "healthy-pw", [HEALTHY_MESSAGE])
    healthy_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(fake)
    values: dict[str, object] = {"ip_allowlist": ["127.0.0.0/8"], "shutdown_grace": 1, "login_failure_delay": 0.1,
                                 "upstream_timeout": 10, "login_timeout": 20, **(limits or {})}
    tls = f'tls = "{upstream_tls}"\n'
    if upstream_tls != "none":
        assert ca is not None
        ca_file = tmp_path / "upstream-ca.pem"
        ca_file.write_bytes(ca.cert_pem)
        tls += f'ca = "{ca_file}"\nserver_name = "localhost"\n'
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n\n'
        f'[upstream.hostile]\naddress = "{hostile}"\n{tls}connect_timeout = 2\n\n'
        f'[upstream.healthy]\naddress = "127.0.0.1:{healthy_port.getHost().port}"\ntls = "none"\n\n'
        '[routing]\ndefault = "healthy"\n[routing.users]\n"victim" = "hostile"\n\n'
        "[limits]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in values.items()) + "\n" + hooks
    )
    service = ProxyService(load_config(config), reactor, handle_signals=False)
    service.privilegedStartService()
    service.startService()
    try:
        yield Proxy(service, port)
    finally:
        await service.stopService()
        await healthy_port.stopListening()


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@asynccontextmanager
async def scripted(script: Any) -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(script)
    try:
        yield upstream
    finally:
        await deferToThread(upstream.close)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class Healthy:
    """A second session through the same proxy, to a well-behaved upstream, that fetches its message
    over and over in a thread of its own; ``finish`` checks it never saw a wrong answer and was served
    while the hostile session ran."""

    def __init__(self, port: int) -> None:
        self.raw = RawPOP3(port, timeout=10)
        assert self.raw.answer() == b"+OK POP3 proxy ready.\r\n"
        assert self.raw.command(b"USER healthy") == b"+OK\r\n"
        assert self.raw.command(b"PASS healthy-pw") == b"+OK Logged in.\r\n"
        self.expected = b"+OK %d octets\r\n" % len(HEALTHY_MESSAGE) + wire_body(HEALTHY_MESSAGE)
        self.served: list[float] = []
        self.errors: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="healthy", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, port: int) -> Deferred[Healthy]:
        return deferToThread(cls, port)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.raw.command(b"RETR 1", multiline=True)
            except Exception as error:  # noqa: BLE001 (recorded, checked by finish)
                self.errors.append(error)
                return
            if answer != self.expected:
                self.errors.append(answer)
                return
            self.served.append(time.monotonic())
            self._stop.wait(0.01)

    def _finish(self, since: float, until: float) -> None:
        deadline = time.monotonic() + 10
        while not (self.served and self.served[-1] > until) and not self.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, f"the healthy session was disturbed: {self.errors[0]!r}"
        assert self.served and self.served[-1] > until, "the healthy session was not served after the fault"
        if until - since > 0.3:
            assert any(since < t < until for t in self.served), "the healthy session was not served during the fault"
        assert self.raw.command(b"QUIT") == b"+OK Bye\r\n"

    def finish(self, since: float, until: float) -> Deferred[None]:
        return deferToThread(self._finish, since, until)


async def against(proxy: Proxy, victim: Callable[[int], Any]) -> Any:
    """Run the blocking ``victim(port)`` in a thread while a healthy session runs alongside."""
    healthy = await Healthy.start(proxy.port)
    since = time.monotonic()
    try:
        result = await deferToThread(victim, proxy.port)
    finally:
        until = time.monotonic()
    await healthy.finish(since, until)
    return result


def connect(port: int, timeout: float = 10) -> RawPOP3:
    raw = RawPOP3(port, timeout=timeout)
    assert raw.answer() == b"+OK POP3 proxy ready.\r\n"
    return raw


def log_in(port: int, timeout: float = 10) -> tuple[RawPOP3, bytes]:
    """Connect as ``victim``; return the client and the answer to PASS."""
    raw = connect(port, timeout)
    assert raw.command(b"USER victim") == b"+OK\r\n"
    return raw, raw.command(b"PASS victim-pw")


def until_closed(raw: RawPOP3, limit: int = 64 * MiB) -> tuple[bytes, str]:
    """What arrives until the proxy closes the connection, and how it closed ("eof" or "reset"; "open"
    if the socket's timeout passed first)."""
    data, raw._buffer = raw._buffer, b""
    while len(data) < limit:
        try:
            chunk = raw.sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            return data, "open"
        if not chunk:
            return data, "eof"
        data += chunk
    raise AssertionError(f"the proxy sent more than {limit} bytes and did not close")


def count_until_closed(raw: RawPOP3, limit: int) -> tuple[int, bytes, str]:
    """Like ``until_closed`` for floods: count the bytes, keep only the last few; "limit" if the
    proxy was still sending after ``limit`` bytes."""
    count, tail = len(raw._buffer), raw._buffer[-16:]
    raw._buffer = b""
    while count < limit:
        try:
            chunk = raw.sock.recv(262144)
        except ConnectionResetError:
            return count, tail, "reset"
        if not chunk:
            return count, tail, "eof"
        count += len(chunk)
        tail = (tail + chunk)[-16:]
    return count, tail, "limit"


def session_of(events: list[dict[str, Any]], user: str = "victim") -> list[dict[str, Any]]:
    """Every event of the (one) session that tried to log in as ``user``."""
    opened = {e["session_id"] for e in events if e.get("event") == "session_open"}
    others = {e["session_id"] for e in events if e.get("event") == "auth" and e.get("user") != user}
    ids = opened - others  # a session whose login never finished logged no login event
    assert len(ids) == 1, f"expected one session of {user}, found {ids}"
    return [e for e in events if e.get("session_id") in ids]


def log_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def ended(events: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in session_of(events) if e.get("event") == "session_close"]
    assert len(found) == 1, found
    return found[0]


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await sleep(0.02)


async def closed_session(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The victim's ``session_ended`` event, once it was logged."""

    def logged() -> bool:
        return any(e.get("event") == "session_close" and e.get("user") != "healthy" for e in events)

    await wait_for(logged)
    return ended(events)


def no_quit(upstream: ScriptedUpstream) -> None:
    assert not [line for line in upstream.received if line.upper().startswith(b"QUIT")], upstream.received


class Memory:
    """Peak Python allocation growth (``tracemalloc``) between ``start`` and ``peak``: the proxy, the
    healthy fake upstream and the test's threads all count, so the figure is an upper bound."""

    def __init__(self) -> None:
        self._started = not tracemalloc.is_tracing()
        if self._started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]

    def peak(self) -> int:
        return tracemalloc.get_traced_memory()[1] - self._base

    def stop(self) -> int:
        peak = self.peak()
        if self._started:
            tracemalloc.stop()
        return peak


# -- the upstream cannot be reached or will not log in -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_refuses_the_connection(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    address = refused_address()

    def victim(port: int) -> tuple[bytes, bytes, bytes]:
        raw, answer = log_in(port)
        again = raw.command(b"USER victim") + raw.command(b"PASS victim-pw")  # the client may retry
        return answer, again, raw.command(b"QUIT")

    async with running(tmp_path, address) as proxy:
        answer, again, bye = await against(proxy, victim)
    assert answer == UPSTREAM_DOWN
    assert again == b"+OK\r\n" + UPSTREAM_DOWN
    assert bye == b"+OK Bye.\r\n"
    failures = [e for e in session_of(events) if e.get("event") == "auth"]
    assert [e["result"] for e in failures] == ["unavailable", "unavailable"]
    assert "refused" in failures[0]["reason"].lower()
    assert "unreachable" in log_text(events) and address in log_text(events)


@pytest_twisted.ensureDeferred
async def test_upstream_that_never_greets_meets_the_login_timeout(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([Hang()]) as upstream, running(tmp_path, upstream.address,
                                                      limits={"login_timeout": 1.5}) as proxy:

        def victim(port: int) -> tuple[bytes, float, tuple[bytes, str]]:
            start = time.monotonic()
            raw, answer = log_in(port)
            return answer, time.monotonic() - start, until_closed(raw)

        answer, waited, (rest, how) = await against(proxy, victim)
        await deferToThread(upstream.wait_closed)
    assert answer == b"-ERR [SYS/TEMP] Autologout: login timeout.\r\n"
    assert 1.4 < waited < 5
    assert (rest, how) == (b"", "eof")
    assert upstream.received == []  # not even CAPA: nothing was said before the greeting
    assert "login timeout after 1.5s" in log_text(session_of(events))
    assert ended(events)["ended"] == "login timeout"


@pytest_twisted.ensureDeferred
async def test_login_timeout_during_the_upstream_login_is_logged_against_the_upstream(
        tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([Hang()]) as upstream, running(tmp_path, upstream.address,
                                                      limits={"login_timeout": 1.5}) as proxy:

        def victim(port: int) -> bytes:
            raw, answer = log_in(port)
            until_closed(raw)
            return answer

        assert await against(proxy, victim) == b"-ERR [SYS/TEMP] Autologout: login timeout.\r\n"
        await closed_session(events)
    logins = [e for e in session_of(events) if e.get("event") == "auth"]
    assert logins and logins[-1]["user"] == "victim" and logins[-1]["upstream"] == "hostile"


@pytest_twisted.ensureDeferred
async def test_upstream_that_never_greets_meets_the_upstream_timeout(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([Hang()]) as upstream, running(tmp_path, upstream.address,
                                                      limits={"upstream_timeout": 1, "login_timeout": 30}) as proxy:

        def victim(port: int) -> tuple[bytes, float]:
            start = time.monotonic()
            raw = connect(port, timeout=4)
            raw.command(b"USER victim")
            try:
                answer = raw.command(b"PASS victim-pw")
            except TimeoutError:
                answer = b"(no answer within 4 s)"
            return answer, time.monotonic() - start

        answer, waited = await against(proxy, victim)
    assert answer == UPSTREAM_DOWN
    assert waited < 4
    assert "upstream sent nothing" in log_text(session_of(events))
    no_quit(upstream)


ENDLESS = b"+OK " + b"x" * 65532  # a status line that never ends: 64 KiB at a time, no LF


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param([Send(b"-ERR [SYS/TEMP] not today\r\n")], id="greeting-err"),
        pytest.param([Send(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")], id="garbage-greeting"),
        pytest.param([Send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n")], id="binary-greeting"),
        pytest.param([Stream(ENDLESS, limit=64 * MiB)], id="endless-greeting"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_greeting_is_sys_temp_and_gets_no_credentials(tmp_path: Path, events: list[dict[str, Any]],
                                                                 opening: list[Any]) -> None:
    async with scripted(opening + [Hang()]) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, bytes]:
            raw, answer = log_in(port)
            return answer, raw.command(b"NOOP")

        answer, noop = await against(proxy, victim)
        conns = await deferToThread(upstream.wait_closed)
    assert answer == UPSTREAM_DOWN
    assert noop == b"+OK\r\n"  # the session goes on; the client may try again later
    assert upstream.received == []  # no CAPA, no USER, no PASS, no QUIT
    assert conns[0].sent < 8 * MiB  # the endless one was cut off, not read to its end
    failure = [e for e in session_of(events) if e.get("event") == "auth"][-1]
    assert failure["result"] == "unavailable"
    if isinstance(opening[0], Stream):
        assert "beyond the limits" in log_text(session_of(events))
    else:
        assert failure["reason"] == "greeting was not +OK"


@pytest.mark.parametrize("silent_after", ["USER", "PASS"])
@pytest_twisted.ensureDeferred
async def test_upstream_hanging_during_login_times_out(tmp_path: Path, events: list[dict[str, Any]], silent_after: str) -> None:
    steps = [greeting(), Answer(b"CAPA", CAPA)]
    steps += [Expect(b"USER"), Hang()] if silent_after == "USER" else [Answer(b"USER", b"+OK\r\n"), Expect(b"PASS"), Hang()]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address, limits={"upstream_timeout": 1}) as proxy:

        def victim(port: int) -> tuple[bytes, float, bytes]:
            start = time.monotonic()
            raw, answer = log_in(port)
            waited = time.monotonic() - start
            try:
                return answer, waited, raw.command(b"NOOP")
            finally:
                raw.close()

        answer, waited, noop = await against(proxy, victim)
        await deferToThread(upstream.wait_closed)
    assert answer == UPSTREAM_DOWN
    assert noop == b"+OK\r\n"  # the session goes on; the client may try again
    assert 0.9 < waited < 4
    no_quit(upstream)
    text = log_text(session_of(events))
    assert "upstream sent nothing for" in text and "while an answer was due" in text
    assert [e["result"] for e in session_of(events) if e.get("event") == "auth"] == ["unavailable"]


# -- the upstream breaks in the middle of the session -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reset_mid_command_closes_the_client_without_an_answer(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([*login(), Answer(b"NOOP", b"+OK\r\n"), Expect(b"STAT"), Reset()]) as upstream, \
            running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, bytes, tuple[bytes, str]]:
            raw, answer = log_in(port)
            noop = raw.command(b"NOOP")
            raw.send(b"STAT\r\n")
            return answer, noop, until_closed(raw)

        answer, noop, (rest, how) = await against(proxy, victim)
        await closed_session(events)
    assert answer == b"+OK Logged in.\r\n" and noop == b"+OK\r\n"
    assert rest == b""  # no answer to STAT at all, and no made-up one
    assert how in ("eof", "reset")
    assert ended(events)["ended"] == "upstream lost"
    assert not upstream.errors
    no_quit(upstream)


@pytest_twisted.ensureDeferred
async def test_reset_while_idle_closes_the_client(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([*login(), Answer(b"NOOP", b"+OK\r\n"), Sleep(0.3), Reset()]) as upstream, \
            running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, tuple[bytes, str]]:
            raw, answer = log_in(port)
            assert raw.command(b"NOOP") == b"+OK\r\n"
            return answer, until_closed(raw)

        answer, (rest, how) = await against(proxy, victim)
        await closed_session(events)
    assert answer == b"+OK Logged in.\r\n"
    assert (rest, how) == (b"", "eof")
    assert "upstream connection lost" in log_text(session_of(events))
    assert ended(events)["ended"] == "upstream closed"
    no_quit(upstream)


MESSAGE = b"Subject: cut\r\n\r\n" + b"".join(b"line %04d of a message that never arrives whole\r\n" % n for n in range(200))
PARTIAL = b"+OK %d octets\r\n" % len(MESSAGE) + wire_body(MESSAGE)[:3000]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param([Send(PARTIAL), Close()], id="fin"),
        pytest.param([Send(PARTIAL), Reset()], id="rst"),
        pytest.param([Dribble(PARTIAL[:200], size=7, interval=0.005), Close()], id="dribbled-fin"),
        pytest.param([Send(PARTIAL), Sleep(0.2), Reset()], id="pause-then-rst"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upstream_closing_mid_retr_never_completes_the_message(tmp_path: Path, events: list[dict[str, Any]],
                                                                     cut: list[Any]) -> None:
    sent = cut[0].data
    async with scripted([*login(), Expect(b"RETR 1"), *cut]) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, tuple[bytes, str]]:
            raw, answer = log_in(port)
            # The client pipelines DELE and QUIT behind RETR, as fetchers that delete do.
            raw.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
            return answer, until_closed(raw)

        answer, (received, how) = await against(proxy, victim)
        await closed_session(events)
    assert answer == b"+OK Logged in.\r\n"
    assert sent.startswith(received)  # relayed as it came, nothing added
    assert not received.endswith(b"\r\n.\r\n") and b"\r\n.\r\n" not in received
    assert how in ("eof", "reset")
    assert ended(events)["ended"] == "upstream lost mid-answer"
    assert [line for line in upstream.received if not line.startswith((b"CAPA", b"USER", b"PASS"))] == [b"RETR 1"]


@pytest.mark.parametrize("garbage", [b"Hello, this is not POP3\r\n", b"HTTP/1.1 400 Bad Request\r\n", b"\x00\xff\xfe junk\r\n"])
@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_status_line(tmp_path: Path, events: list[dict[str, Any]], garbage: bytes) -> None:
    async with scripted([*login(), Answer(b"STAT", garbage), Hang()]) as upstream, \
            running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, str]:
            raw, _ = log_in(port)
            raw.send(b"STAT\r\n")
            raw.sock.settimeout(1.5)
            try:
                return until_closed(raw)
            finally:
                raw.close()

        received, how = await against(proxy, victim)
        await closed_session(events)
    # A clear answer (-ERR) or a closed connection; never the garbage as if it were an answer.
    assert garbage.strip() not in received
    assert received == b"" or received.startswith(b"-ERR")
    assert how in ("eof", "reset")  # the stream cannot be trusted any more: closed, not left hanging
    no_quit(upstream)


@pytest_twisted.ensureDeferred
async def test_unsolicited_line_between_answers_closes(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    steps = [*login(CAPA_PIPELINING), Answer(b"NOOP", b"+OK\r\n"), Sleep(0.3), Send(b"+OK 1 99999\r\n"),
             Answer(b"STAT", b"+OK 1 100\r\n")]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, tuple[bytes, str]]:
            raw, _ = log_in(port)
            noop = raw.command(b"NOOP")
            time.sleep(0.6)  # the surplus line arrives while nothing is asked
            try:
                raw.send(b"STAT\r\n")
            except OSError:
                pass
            return noop, until_closed(raw)

        noop, (rest, how) = await against(proxy, victim)
        await closed_session(events)
    assert noop == b"+OK\r\n"
    assert b"99999" not in rest and rest == b"" and how in ("eof", "reset")
    assert "unsolicited" in log_text(session_of(events))
    no_quit(upstream)


@pytest_twisted.ensureDeferred
async def test_unsolicited_line_in_the_same_segment_does_not_shift_pipelined_answers(
        tmp_path: Path, events: list[dict[str, Any]]) -> None:
    steps = [*login(), Answer(b"NOOP", b"+OK\r\n+OK 1 99999\r\n"), Answer(b"STAT", b"+OK 1 100\r\n"), Hang(2)]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, str]:
            raw, _ = log_in(port)
            raw.send(b"NOOP\r\nSTAT\r\n")  # RFC 2449 pipelining from the client; the proxy serialises
            return until_closed(raw)

        received, how = await against(proxy, victim)
        await closed_session(events)
    assert received.startswith(b"+OK\r\n") and how in ("eof", "reset")
    assert b"99999" not in received  # the surplus line must never pass as STAT's answer
    assert "unsolicited" in log_text(session_of(events))
    no_quit(upstream)


# -- floods: bounded memory -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_endless_status_line_is_cut_off_in_bounded_memory(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([*login(), Expect(b"STAT"), Stream(ENDLESS, limit=256 * MiB)]) as upstream, \
            running(tmp_path, upstream.address) as proxy:
        memory = Memory()
        try:

            def victim(port: int) -> tuple[bytes, str]:
                raw, _ = log_in(port)
                raw.send(b"STAT\r\n")
                return until_closed(raw)

            received, how = await against(proxy, victim)
            conns = await deferToThread(upstream.wait_closed)
        finally:
            peak = memory.stop()
        await closed_session(events)
    assert received == b"" and how in ("eof", "reset")
    assert conns[0].sent < 16 * MiB, conns[0].sent  # the proxy stopped reading it at once
    assert peak < 4 * MiB, f"memory grew by {peak} bytes"
    assert "upstream sent a line or an answer beyond the limits" in log_text(session_of(events))
    assert ended(events)["ended"] == "upstream lost"
    no_quit(upstream)


LIST_LINES = b"".join(b"%d 4242\r\n" % n for n in range(1, 6554))  # ~64 KiB of valid LIST lines


@pytest_twisted.ensureDeferred
async def test_endless_list_is_streamed_with_back_pressure(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """A LIST answer that never ends is relayed as it comes, at the client's pace: while the client
    reads nothing the upstream is held back by TCP, and the proxy holds no more than a buffer."""
    async with scripted([*login(), Answer(b"LIST", b"+OK endless listing\r\n"), Stream(LIST_LINES, limit=1 << 40)]) as upstream, \
            running(tmp_path, upstream.address) as proxy:
        memory = Memory()
        try:
            healthy = await Healthy.start(proxy.port)
            since = time.monotonic()
            raw, _ = await deferToThread(log_in, proxy.port)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            raw.send(b"LIST\r\n")
            first, _, _ = await deferToThread(count_until_closed, raw, 4 * MiB)
            await sleep(1.0)  # the client stops reading; the upstream must be held back
            conn = upstream.conns[0]
            stalled_at = conn.sent
            await sleep(1.0)
            stalled_growth = conn.sent - stalled_at
            peak_while_stalled = memory.peak()
            more, tail, how = await deferToThread(count_until_closed, raw, 16 * MiB)
            raw.close()  # the client gives up on the endless answer
            await deferToThread(upstream.wait_closed)
            until = time.monotonic()
            await healthy.finish(since, until)
        finally:
            peak = memory.stop()
        await closed_session(events)
    assert first >= 4 * MiB and more >= 16 * MiB and how == "limit"  # it streamed, both times
    assert not tail.endswith(b"\r\n.\r\n")
    assert stalled_growth < 256 * 1024, f"upstream kept sending {stalled_growth} bytes to a stalled client"
    assert stalled_at - first < 16 * MiB  # only socket buffers in between
    assert peak_while_stalled < 4 * MiB and peak < 8 * MiB, (peak_while_stalled, peak)
    assert conn.ended in ("eof", "reset")  # the proxy closed the upstream once the client had gone
    no_quit(upstream)
    assert ended(events)["ended"] == "client closed"


MAX_LINE = 256 * 1024  # upstream_max_line in these tests


@pytest.mark.parametrize(
    ("command", "status", "hooks"),
    [
        pytest.param(b"RETR 1", b"+OK 1000000000 octets\r\n", "", id="retr"),
        pytest.param(b"LIST", b"+OK\r\n", "", id="list"),
        pytest.param(b"TOP 1 5", b"+OK\r\n", "", id="top"),
        # With a message hook LIST goes through a sink that rewrites it line by line (ListSink).
        pytest.param(b"LIST", b"+OK\r\n", "hooks", id="list-with-hooks"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_endless_line_in_a_body_is_cut_off_in_bounded_memory(tmp_path: Path, events: list[dict[str, Any]],
                                                                    command: bytes, status: bytes, hooks: str) -> None:
    """The issue: "multi-line lines are bounded; an upstream that sends an endless line ... cannot
    exhaust memory (the client connection is closed, the event is logged)"."""
    listing = lying_upstream({1: header_message(100)})
    seen = {command: 1 if hooks and command == b"LIST" else 0}  # with hooks the proxy LISTs at login

    def handler(line: bytes) -> bytes | list[Any] | None:
        if line == command:
            seen[command] -= 1
            if seen[command] < 0:
                return [Send(status + b"1 100\r\nSubject: x\r\n\r\n"), Stream(b"y" * 65536, limit=1 << 40)]
        return listing.handler(line)

    async with scripted([*login(), Serve(handler)]) as upstream, \
            running(tmp_path, upstream.address, hooks=HOOKS if hooks else "",
                    limits={"upstream_max_line": MAX_LINE}) as proxy:
        memory = Memory()
        try:

            def victim(port: int) -> tuple[int, bytes, str]:
                raw, _ = log_in(port)
                raw.send(command + b"\r\n")
                try:
                    return count_until_closed(raw, 64 * MiB)
                finally:
                    raw.close()

            count, tail, how = await against(proxy, victim)
            conns = await deferToThread(upstream.wait_closed)
        finally:
            peak = memory.stop()
        await closed_session(events)
    assert how in ("eof", "reset"), f"the proxy relayed {count} bytes of one line and did not stop"
    assert count <= MAX_LINE + 256  # not one chunk past the limit reached the client
    assert not tail.endswith(b"\r\n.\r\n")  # and nothing that looks like a complete answer
    assert conns[0].sent < 32 * MiB  # the upstream was cut off, not read to the end
    assert peak < 4 * MiB, f"memory grew by {peak} bytes for one endless line"
    assert "beyond the limits" in log_text(session_of(events))
    assert ended(events)["ended"] == "upstream lost mid-answer"
    no_quit(upstream)


@pytest_twisted.ensureDeferred
async def test_body_far_larger_than_announced_is_cut_off(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """``+OK 100 octets`` and then megabytes of well-formed lines: past twice the announced size (plus
    slack for small messages) the proxy stops relaying; the client never gets a terminator."""
    lines = b"".join(b"line %06d of a message much larger than it said\r\n" % n for n in range(1300))
    steps = [*login(), Answer(b"RETR 1", b"+OK 100 octets\r\n"), Stream(lines, limit=1 << 40)]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[int, bytes, str]:
            raw, _ = log_in(port)
            raw.send(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
            try:
                return count_until_closed(raw, 64 * MiB)
            finally:
                raw.close()

        count, tail, how = await against(proxy, victim)
        await deferToThread(upstream.wait_closed)
        await closed_session(events)
    assert how in ("eof", "reset")
    assert count <= len(b"+OK 100 octets\r\n") + 2 * 100 + 65536
    assert not tail.endswith(b"\r\n.\r\n")
    assert "beyond the limits" in log_text(session_of(events))
    assert [line for line in upstream.received if line.startswith((b"DELE", b"QUIT"))] == []


# -- STLS response injection, split across segments ------------------------------------------------------


def tls_server_context(tmp_path: Path, leaf: IssuedCertificate) -> ssl.SSLContext:
    cert, key = tmp_path / "upstream-cert.pem", tmp_path / "upstream-key.pem"
    cert.write_bytes(leaf.chain_pem)
    key.write_bytes(leaf.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize(
    ("injection", "discarded", "logs_in"),
    [
        # The +OK line itself is split; the injected answer rides in the segment that completes it.
        pytest.param([Send(b"+OK Beg"), Sleep(0.2), Send(b"in TLS\r\n+OK injected\r\n")], 14, True, id="ok-split"),
        # The injected answer is split: its first half comes with +OK, the rest in the next segment.
        pytest.param([Send(b"+OK Begin TLS\r\n+OK inj"), Sleep(0.2), Send(b"ected\r\n")], 7, False, id="injection-split"),
        # The injected answer comes in a segment of its own, after +OK.
        pytest.param([Send(b"+OK Begin TLS\r\n"), Sleep(0.2), Send(b"+OK injected\r\n")], 0, False, id="next-segment"),
        # Everything one byte at a time.
        pytest.param([Dribble(b"+OK Begin TLS\r\n+OK injected\r\n", size=1, interval=0.005)], 0, False, id="dribbled"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_response_injected_around_stls_never_answers_a_command(
        tmp_path: Path, ca: CertificateAuthority, leaf: IssuedCertificate, events: list[dict[str, Any]],
        injection: list[Any], discarded: int, logs_in: bool) -> None:
    context = tls_server_context(tmp_path, leaf)
    steps = [greeting(), Expect(b"STLS"), *injection, StartTLS(context),
             Answer(b"CAPA", CAPA), Answer(b"USER", b"+OK\r\n"), Answer(b"PASS", b"+OK\r\n"),
             Answer(b"STAT", b"+OK 1 42\r\n")]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address, upstream_tls="starttls", ca=ca) as proxy:

        def victim(port: int) -> tuple[bytes, bytes]:
            raw, answer = log_in(port)
            try:
                return answer, raw.command(b"STAT")
            finally:
                raw.close()

        answer, stat = await against(proxy, victim)
        await deferToThread(upstream.wait_closed)
    warnings = [e for e in session_of(events) if "plain text after +OK to STLS" in str(e.get("log_format", ""))]
    if logs_in:
        assert answer == b"+OK Logged in.\r\n"
        assert stat == b"+OK 1 42\r\n"  # the upstream's own answer, not the injected one
        assert upstream.received[:4] == [b"STLS", b"CAPA", b"USER victim", b"PASS victim-pw"]
    else:
        # The injected bytes went into the TLS layer, which refused them: fail closed.
        assert answer == UPSTREAM_DOWN
        assert stat.startswith(b"-ERR")  # not logged in
        assert upstream.received == [b"STLS"]  # no credentials, in the clear or otherwise
        failure = [e for e in session_of(events) if e.get("event") == "auth"][-1]
        assert "TLS handshake failed" in failure["reason"]
    assert [w["count"] for w in warnings] == ([discarded] if discarded else [])
    no_quit(upstream)


# -- an upstream that lies about sizes -------------------------------------------------------------------


def lying_upstream(bodies: dict[int, bytes], listed: int = 100) -> Serve:
    """LIST says every message has ``listed`` octets; RETR n sends ``bodies[n]``, announced as listed."""
    count = len(bodies)

    def handler(line: bytes) -> bytes | None:
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"LIST" and not argument:
            return b"+OK\r\n" + b"".join(b"%d %d\r\n" % (n, listed) for n in bodies) + b".\r\n"
        if verb == b"LIST":
            return b"+OK %s %d\r\n" % (argument, listed)
        if verb == b"UIDL":
            return b"+OK\r\n" + b"".join(b"%d uid-%d\r\n" % (n, n) for n in bodies) + b".\r\n"
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (count, count * listed)
        if verb == b"RETR":
            return b"+OK %d octets\r\n" % listed + wire_body(bodies[int(argument)])
        if verb in (b"DELE", b"NOOP", b"RSET"):
            return b"+OK\r\n"
        return None

    return Serve(handler)


def header_message(size: int) -> bytes:
    head = b"Subject: size\r\n\r\n"
    line = b"z" * 48 + b"\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    message = head + body
    assert len(message) == size
    return message


LIES = {1: header_message(10 * 1024), 2: b"Subject: a\r\n\r\n"[:8] + b"\r\n", 3: header_message(100)}


def retr_answers(raw: RawPOP3) -> dict[int, bytes]:
    return {n: raw.command(b"RETR %d" % n, multiline=True) for n in LIES}


@pytest_twisted.ensureDeferred
async def test_lying_sizes_without_hooks_are_relayed_as_they_are(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    async with scripted([*login(), lying_upstream(LIES)]) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, dict[int, bytes], bytes]:
            raw, _ = log_in(port)
            listing = raw.command(b"LIST", multiline=True)
            answers = retr_answers(raw)
            return listing, answers, raw.command(b"QUIT")

        listing, answers, bye = await against(proxy, victim)
    assert listing == b"+OK\r\n1 100\r\n2 100\r\n3 100\r\n.\r\n"
    for n, message in LIES.items():
        assert answers[n] == b"+OK 100 octets\r\n" + wire_body(message)  # a relay: byte for byte
    assert bye == b"+OK bye\r\n"


@pytest_twisted.ensureDeferred
async def test_lying_sizes_with_a_rewriting_hook_never_reach_the_client(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """With a hook that rewrites messages, LIST's sizes are promises the proxy keeps: a message that
    cannot be delivered at its listed size is refused with -ERR [SYS/TEMP] and stays on the server;
    the others arrive at exactly the size LIST and ``+OK n octets`` announced."""
    async with scripted([*login(), lying_upstream(LIES)]) as upstream, \
            running(tmp_path, upstream.address, hooks=HOOKS) as proxy:

        def victim(port: int) -> tuple[bytes, dict[int, bytes], bytes, bytes, bytes]:
            raw, _ = log_in(port)
            listing = raw.command(b"LIST", multiline=True)
            answers = retr_answers(raw)
            dele = raw.command(b"DELE 1")
            stat = raw.command(b"STAT")
            return listing, answers, dele, stat, raw.command(b"QUIT")

        listing, answers, dele, stat, bye = await against(proxy, victim)
    # STAT counts the reservations too, and nothing was deleted (the refused DELE was not forwarded).
    assert stat == b"+OK 3 %d\r\n" % (3 * (100 + 64 + FILLER_MIN))
    listed = {int(n): int(size) for n, size in (line.split() for line in listing.split(b"\r\n")[1:-2])}
    assert listed == {n: 100 + 64 + FILLER_MIN for n in LIES}
    for n, answer in answers.items():
        status, _, body = answer.partition(b"\r\n")
        if status.startswith(b"+OK"):
            announced = int(re.match(rb"\+OK (\d+) octets", status).group(1))
            assert announced == len(unstuff_body(body)) == listed[n], (n, status)
        else:
            assert answer.startswith(b"-ERR [SYS/TEMP] "), (n, answer)
    # What the proxy does with each lie, as it stands:
    assert answers[1].startswith(b"-ERR [SYS/TEMP]")  # 10 KB where 100 were listed: refused
    assert answers[2].startswith(b"+OK") and answers[3].startswith(b"+OK")  # short ones: padded to size
    assert unstuff_body(answers[3].partition(b"\r\n")[2]).endswith(b"X-Tag: yes\r\n" + LIES[3])
    # The refused message stays on the server: its DELE is answered by the proxy and never forwarded.
    assert dele.startswith(b"-ERR [SYS/TEMP]")
    assert b"DELE 1" not in upstream.received
    assert bye == b"+OK bye\r\n"
    assert "more than twice" in log_text(session_of(events))


@pytest_twisted.ensureDeferred
async def test_odd_err_answers_pass_through(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    odd = {
        b"RETR 1": b"-ERR [SYS/PERM] Gone for good.\r\n",
        b"RETR 2": b"-ERR [X-VENDOR/ODD-42] something proprietary\r\n",
        b"RETR 3": b"-ERR\r\n",
        b"TOP 1 0": b"-ERR [] empty brackets\r\n",
        b"DELE 1": b"-ERR [IN-USE] locked by another session\r\n",
        b"UIDL 7": b"-ERR [SYS/TEMP unterminated code\r\n",
        b"LIST 8": b"-ERR \xff\xfe 8-bit text\r\n",
    }
    async with scripted([*login(), Serve(lambda line: odd.get(line))]) as upstream, \
            running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[dict[bytes, bytes], bytes]:
            raw, _ = log_in(port)
            answers = {command: raw.command(command, multiline=command.startswith((b"RETR", b"TOP"))) for command in odd}
            return answers, raw.command(b"QUIT")

        answers, bye = await against(proxy, victim)
    assert answers == odd
    assert bye == b"+OK bye\r\n"


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        (b"-ERR [X-ODD/CODE] no such thing\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
        (b"-ERR [SYS/PERM] account disabled\r\n", b"-ERR [SYS/PERM] Mail server refused the login; do not retry.\r\n"),
        (b"-ERR\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_odd_login_refusals_map_to_known_answers(tmp_path: Path, events: list[dict[str, Any]],
                                                        refusal: bytes, expected: bytes) -> None:
    steps = [greeting(), Answer(b"CAPA", CAPA), Answer(b"USER", b"+OK\r\n"), Answer(b"PASS", refusal)]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:
        answer = (await against(proxy, log_in))[1]
        await deferToThread(upstream.wait_closed)
    assert answer == expected
    assert b"X-ODD" not in answer and b"account disabled" not in answer  # the upstream's words stay out
    assert [e["result"] for e in session_of(events) if e.get("event") == "auth"] == ["refused"]


CAPA_AUTH_RESP_CODE = b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n.\r\n"


@pytest.mark.parametrize(
    ("capa", "expected", "result"),
    [
        # No promise from the upstream: a bare -ERR to PASS may mean wrong credentials (RFC 1939).
        pytest.param(CAPA, b"-ERR [AUTH] Authentication failed.\r\n", "refused", id="plain-upstream"),
        # RFC 3206 §6: an upstream that lists AUTH-RESP-CODE puts [AUTH] on every refusal caused by
        # the credentials, so a -ERR without it is something else (Dovecot answers "-ERR Shutting
        # down" while it stops): not the user's fault, not a failed login.
        pytest.param(CAPA_AUTH_RESP_CODE, UPSTREAM_DOWN, "unavailable", id="auth-resp-code-upstream"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusal_without_auth_code_from_an_auth_resp_code_upstream(
        tmp_path: Path, events: list[dict[str, Any]], capa: bytes, expected: bytes, result: str) -> None:
    steps = [greeting(), Answer(b"CAPA", capa), Answer(b"USER", b"+OK\r\n"), Answer(b"PASS", b"-ERR Shutting down\r\n")]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:
        answer = (await against(proxy, log_in))[1]
        await deferToThread(upstream.wait_closed)
    assert answer == expected
    assert [e["result"] for e in session_of(events) if e.get("event") == "auth"] == [result]


_flush_log = Logger(namespace="test_hostile_upstreams")


@pytest_twisted.ensureDeferred
async def test_upstream_closing_during_login_leaves_no_session_alive(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """The reactor hands every clean close the same ``Failure(ConnectionDone())``; raised in the login
    coroutine, that shared exception's traceback kept the session's frames (its ClientProtocol and
    UpstreamProtocol) alive until the next close anywhere. Found by the soak; kept as a test."""
    gc.collect()
    before = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, (ClientProtocol, UpstreamProtocol)))
    steps = [greeting(), Answer(b"CAPA", CAPA), Answer(b"USER", b"+OK\r\n"), Expect(b"PASS"), Close()]
    async with scripted(steps) as upstream, running(tmp_path, upstream.address) as proxy:

        def victim(port: int) -> tuple[bytes, bytes]:
            raw, answer = log_in(port)
            try:
                return answer, raw.command(b"QUIT")
            finally:
                raw.close()

        answer, bye = await against(proxy, victim)
        await wait_for(lambda: not proxy.sessions)
    assert answer == UPSTREAM_DOWN and bye == b"+OK Bye.\r\n"
    assert [e["result"] for e in session_of(events) if e.get("event") == "auth"] == ["unavailable"]
    events.clear()  # the events hold their sources, the sessions
    for _ in range(256):  # and so does Twisted's buffer of the last 200 events, in a test process
        _flush_log.debug("flushing the log history buffer")
    gc.collect()
    left = [type(o).__name__ for o in gc.get_objects()
            if isinstance(o, (ClientProtocol, UpstreamProtocol)) and o not in before]
    assert left == [], f"session objects alive after their sessions ended: {left}"


# -- floods with hooks: LIST and RETR pass through sinks that look at lines ----------------------------------


@pytest_twisted.ensureDeferred
async def test_endless_list_at_login_with_hooks_is_dropped_with_the_client(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    def handler(line: bytes) -> bytes | list[Any] | None:
        if line == b"LIST":
            return [Send(b"+OK\r\n"), Stream(LIST_LINES, limit=1 << 40)]
        return None

    async with scripted([*login(), Serve(handler)]) as upstream, \
            running(tmp_path, upstream.address, hooks=HOOKS, limits={"login_timeout": 2}) as proxy:
        memory = Memory()
        try:

            def victim(port: int) -> tuple[bytes, tuple[bytes, str]]:
                raw, answer = log_in(port)
                return answer, until_closed(raw)

            answer, (rest, how) = await against(proxy, victim)
            closed = await deferToThread(lambda: upstream.conns[0].done.wait(3))
        finally:
            peak = memory.stop()
    assert answer.startswith(b"-ERR [SYS/TEMP]")
    # The LIST over max_listing fails the login at once ([SYS/TEMP]); then the login timeout ends
    # the session, which may or may not have come first.
    assert (rest, how) in ((b"", "eof"), (b"-ERR [SYS/TEMP] Autologout: login timeout.\r\n", "eof"))
    assert closed, "the upstream connection outlived its client"
    assert peak < 16 * MiB, f"memory grew by {peak} bytes"
    no_quit(upstream)
