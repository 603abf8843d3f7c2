"""Soak: thousands of real sessions through an in-process popproxy to a real Dovecot, in rounds.

The issue: "A soak test, bounded in count and time (for example 2,000 sessions over 60 s, 200 at
once, against a real Dovecot, with random client disconnects and one upstream restart): afterwards
every mailbox on the upstream holds exactly the messages it should, no session object is left alive,
and a second round leaves the proxy's memory where the first left it (a plateau, not growth)."

How:

- The proxy runs in this process (pytest-twisted's reactor), so that after each round the test can
  look for live ``ClientProtocol``/``UpstreamProtocol`` objects with ``gc``, at the factories'
  ``sessions`` and the guard's counts, and at the memory of a process that holds the proxy and
  little else.
- The clients run in a child process (``client_main``; blocking sockets in ``CONCURRENCY`` threads),
  so that their 200 threads and their allocator arenas do not blur the proxy's RSS. Each session is
  one of ``MIX``: fetch everything and QUIT; fetch, DELE some and QUIT; DELE and hang up without QUIT;
  DELE and QUIT in one segment and hang up at once (the QUIT must still be delivered); hang up in the
  middle of a RETR or while the login is in flight; a pipelined burst (STAT, LIST, UIDL, RETR, DELE,
  RSET, RETR, NOOP, QUIT in one segment).
- Expectations stay exact: *reader* mailboxes must never change, and each *writer* mailbox is used by
  one session at a time (a lock per user), which knows what it deleted and whether its QUIT was
  answered.
- Once per round, when ``RESTART_AT`` of its sessions are done, Dovecot is stopped and started while
  sessions are in flight. A session hit by the restart must fail cleanly (``-ERR [SYS/TEMP]`` at
  login, or a closed connection; never a wrong answer, never a truncated message that looks complete),
  and a session whose QUIT answer was lost must show, in the mailbox afterwards, all of its deletions
  or none.
- After each round: no wrong answer, and failures only where the restart explains them; every
  mailbox's UIDL set, read straight from Dovecot, exactly as expected; Dovecot's own log shows no QUIT
  that a client did not send; no session object alive, the factories and the guard empty, one
  ``session_close`` event per connection and no error logged; RSS, gc objects and allocated blocks.
- Round 0 is a smaller warm-up; rounds 1 and 2 are the same workload, and round 2 must leave the
  proxy's memory where round 1 left it (``PLATEAU``).

``FIGURES`` keeps the last run's figures; ``pytest -s`` prints them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import math
import os
import pickle
import queue
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent, globalLogPublisher

from popproxy.config import load_config
from popproxy.pki import CertificateAuthority
from popproxy.pop3.wire import unstuff_body
from popproxy.protocol.client import ClientProtocol
from popproxy.protocol.upstream import UpstreamProtocol
from popproxy.service import ProxyService

from support.dovecot import DovecotServer, MailUser
from support.mailbox import corpus
from support.proxyproc import free_port

ROUNDS = 2  # measured rounds, after round 0
SESSIONS = 1000  # per measured round
WARMUP = 300  # sessions in round 0
CONCURRENCY = 200
READERS = 40  # mailboxes nobody may change: 6 corpus messages and one of ~120 KB
WRITERS = 220  # mailboxes one session at a time may change: 10 corpus messages
RESTART_AT = 0.4  # Dovecot restarts once this share of a round's sessions are done
PLATEAU = 5 * 1024 * 1024  # round 2 may leave the proxy's RSS at most this much above round 1
SEED = 20261126

#: The mix of client behaviours, with weights.
MIX = {
    "fetch": 25,  # reader: UIDL, RETR every message, QUIT
    "dele": 20,  # writer: UIDL, RETR and DELE 1-3 messages, QUIT
    "dele_no_quit": 12,  # writer: DELE 1-3, then hang up (close, RST, or in the middle of a RETR)
    "dele_quit_hangup": 8,  # writer: DELE 1-2 and QUIT in one segment, then close without reading
    "drop_mid_retr": 12,  # reader: RETR the large message, read part of it, hang up (close or RST)
    "drop_in_login": 5,  # reader: USER and PASS, then hang up while the login is in flight
    "burst": 18,  # reader: nine pipelined commands in one segment, the DELE undone by RSET
}
WRITER_KINDS = ("dele", "dele_no_quit", "dele_quit_hangup")

#: Figures of the last run, for the record.
FIGURES: dict[str, Any] = {}

LOGGED_IN = b"+OK Logged in.\r\n"
SYS_TEMP = b"-ERR [SYS/TEMP] "


class Closed(Exception):
    """The proxy closed the connection (EOF or reset) where the client did not expect it."""


class SysTemp(Exception):
    """``-ERR [SYS/TEMP]`` at login: the upstream is unavailable."""


class Wrong(Exception):
    """An answer that must never happen: a bug (or a hang)."""


# -- a small blocking POP3 client --------------------------------------------------------------------------


class Pop:
    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self._buffer = b""

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as error:
            raise Closed(str(error)) from None
        except TimeoutError:
            raise Wrong("timed out waiting for an answer") from None
        if not data:
            raise Closed("EOF")
        self._buffer += data

    def line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line + b"\r\n"

    def answer(self, multiline: bool = False) -> bytes:
        status = self.line()
        if not (multiline and status.startswith(b"+OK")):
            return status
        self._buffer = b"\r\n" + self._buffer
        scanned = 0
        while (end := self._buffer.find(b"\r\n.\r\n", scanned)) == -1:
            scanned = max(0, len(self._buffer) - 4)
            self._fill()
        body, self._buffer = self._buffer[2 : end + 5], self._buffer[end + 5 :]
        return status + body

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as error:
            raise Closed(str(error)) from None

    def command(self, line: bytes, multiline: bool = False) -> bytes:
        self.send(line + b"\r\n")
        return self.answer(multiline)

    def read_some(self, count: int) -> None:
        """Read about ``count`` bytes (whatever comes first), or until the proxy closes."""
        got = len(self._buffer)
        while got < count:
            try:
                data = self.sock.recv(min(65536, count - got))
            except OSError:
                return
            if not data:
                return
            got += len(data)

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def expect(answer: bytes, prefix: bytes, what: str) -> bytes:
    if not answer.startswith(prefix):
        if answer.startswith(SYS_TEMP):
            # A clear answer: the upstream is unavailable (the proxy's own at login, or Dovecot's
            # "Server shutting down." relayed as the answer to whatever was in flight).
            raise SysTemp(f"{what}: {answer[:120]!r}")
        raise Wrong(f"{what}: {answer[:120]!r}")
    return answer


def listing(answer: bytes) -> dict[int, bytes]:
    """``n value`` lines of a LIST or UIDL answer."""
    lines = answer.split(b"\r\n")[1:-2]
    return {int(n): value for n, value in (line.split(b" ", 1) for line in lines)}


def message_of(answer: bytes) -> bytes:
    """The message in a RETR answer, checked against the size its status line announced."""
    status, _, body = answer.partition(b"\r\n")
    expect(status, b"+OK", "RETR")
    message = unstuff_body(body)
    announced = re.match(rb"\+OK (\d+) octets", status)
    if announced and int(announced.group(1)) != len(message):
        raise Wrong(f"RETR announced {announced.group(1)!r} octets and delivered {len(message)}")
    return message


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def direct_uidls(port: int, user: MailUser | Account) -> frozenset[str]:
    """The mailbox as Dovecot has it, on a direct connection from 127.0.0.2 (the proxy uses 127.0.0.1)."""
    pop = Pop(port, source="127.0.0.2", timeout=15)
    try:
        expect(pop.answer(), b"+OK", "Dovecot greeting")
        expect(pop.command(b"USER " + user.name.encode()), b"+OK", "USER")
        expect(pop.command(b"PASS " + user.password.encode()), b"+OK", "PASS")
        uidls = frozenset(v.decode() for v in listing(expect(pop.command(b"UIDL", True), b"+OK", "UIDL")).values())
        expect(pop.command(b"QUIT"), b"+OK", "QUIT")
        return uidls
    finally:
        pop.close()


# -- mailboxes -------------------------------------------------------------------------------------------------


def large_message(index: int) -> bytes:
    line = b"All work and no play makes a soak test a long test, line %05d.\r\n"
    head = b"Subject: large %d\r\nMessage-ID: <soak-large-%d@popproxy.test>\r\n\r\n" % (index, index)
    return head + b"".join(line % n for n in range(2000)) + b".\r\n..\r\n.end\r\n"


def create_mailboxes(dovecot: DovecotServer) -> tuple[list[MailUser], list[MailUser]]:
    readers = [dovecot.add_user(f"soak-r{i:02d}", f"pw-r{i}", corpus(6, seed=5000 + i, large=False) + [large_message(i)])
               for i in range(READERS)]
    writers = [dovecot.add_user(f"soak-w{i:03d}", f"pw-w{i}", corpus(10, seed=6000 + i, large=False))
               for i in range(WRITERS)]
    return readers, writers


# -- the client side (child process) ------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    #: "ok" (as planned), "sys_temp" (-ERR [SYS/TEMP]: from the proxy at login, or Dovecot's "Server
    #: shutting down." relayed), "closed" (the connection ended), "auth" (Dovecot refused a login
    #: during its restart), "lost_quit" (QUIT sent, no +OK: settled against the mailbox), "wrong"
    result: str
    started: float
    finished: float
    user: str = ""
    detail: str = ""
    quit_sent: bool = False
    quit_answered: bool = False
    deleted: int = 0  # messages this session deleted for good


@dataclass(frozen=True)
class Account:
    """A mailbox as the child process knows it: no message bodies (the test process would have to
    pickle megabytes each round), their SHA-256 digests instead."""

    name: str
    password: str
    uidls: tuple[str, ...]
    sizes: tuple[int, ...]
    digests: tuple[str, ...]

    @classmethod
    def of(cls, user: MailUser) -> Account:
        return cls(user.name, user.password, tuple(user.uidls), tuple(user.sizes),
                   tuple(hashlib.sha256(m).hexdigest() for m in user.messages))


@dataclass
class Job:
    """What the child process is given (pickled) for one round."""

    number: int
    sessions: int
    proxy_port: int
    dovecot_port: int
    restart_port: int
    readers: list[Account]
    writers: list[Account]
    state: dict[str, frozenset[str]]


@dataclass
class Report:
    """What the child process hands back (pickled)."""

    outcomes: list[Outcome]
    state: dict[str, frozenset[str]]
    restart: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # began, stopped, ended


class RestartClient:
    """The child's side of the restart: ``trigger()`` asks the test process (which owns Dovecot) to
    restart it, once; ``done`` is set when Dovecot is back."""

    MARGIN = 3.0  # seconds after the restart in which sessions may still fail because of it

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = threading.Event()
        self.began: float | None = None
        self.stopped: float | None = None
        self.ended: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def trigger(self) -> None:
        with self._lock:
            if self._thread is None:
                self.began = time.monotonic()
                self._thread = threading.Thread(target=self._ask, name="restart", daemon=True)
                self._thread.start()

    def _ask(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
                sock.sendall(b"RESTART\n")
                reply = sock.makefile("rb").readline().split()
            began, self.stopped, self.ended = (float(x) for x in reply)
            self.began = min(self.began or began, began)  # time.monotonic is system-wide on Linux
        finally:
            self.done.set()

    def covers(self, started: float, finished: float) -> bool:
        """Whether a session that ran from ``started`` to ``finished`` may have met the restart."""
        if self.began is None:
            return False
        ended = self.ended if self.ended is not None else math.inf
        return started <= ended + self.MARGIN and finished >= self.began - 0.1

    def join(self) -> None:
        self.trigger()
        self.done.wait(180)


class Round:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.port = job.proxy_port
        self.state = dict(job.state)
        self.by_uidl = {u.name: dict(zip(u.uidls, u.digests, strict=True)) for u in job.readers + job.writers}
        self.locks = {u.name: threading.Lock() for u in job.writers}
        self.restart = RestartClient(job.restart_port)
        self._done = 0
        self._lock = threading.Lock()

    # -- helpers

    def _pick_writer(self, rng: random.Random) -> Account:
        for _ in range(100):
            user = rng.choice(self.job.writers)
            if self.locks[user.name].acquire(blocking=False):
                return user
        user = rng.choice(self.job.writers)
        self.locks[user.name].acquire()
        return user

    def _login(self, pop: Pop, user: Account) -> None:
        expect(pop.answer(), b"+OK POP3 proxy ready.", "greeting")
        expect(pop.command(b"USER " + user.name.encode()), b"+OK", "USER")
        answer = pop.command(b"PASS " + user.password.encode())
        if answer.startswith(SYS_TEMP):
            raise SysTemp(answer.decode(errors="replace"))
        expect(answer, LOGGED_IN, "PASS")

    def _uidls(self, pop: Pop, user: Account) -> dict[int, str]:
        uidls = {n: value.decode() for n, value in listing(expect(pop.command(b"UIDL", True), b"+OK", "UIDL")).items()}
        if frozenset(uidls.values()) != self.state[user.name]:
            raise Wrong(f"{user.name}: UIDL shows {sorted(uidls.values())}, expected {sorted(self.state[user.name])}")
        return uidls

    def _retr(self, pop: Pop, user: Account, number: int, uidl: str) -> None:
        if sha256(message_of(pop.command(b"RETR %d" % number, True))) != self.by_uidl[user.name][uidl]:
            raise Wrong(f"{user.name}: message {number} ({uidl}) differs")

    def _settle(self, user: Account, deleted: frozenset[str], outcome: Outcome, must: bool) -> None:
        """A session whose QUIT may or may not have been carried out: look at the mailbox, once the
        upstream can no longer change it, and accept all of the session's deletions or none
        (``must``: all, unless the restart came in between)."""
        before = self.state[user.name]
        after = before - deleted
        # The proxy and Dovecot need a moment after the client has gone to carry the QUIT out.
        restarted = self.restart.covers(outcome.started, outcome.finished + 2.0)
        deadline = time.monotonic() + 20
        problem = ""
        while True:
            if self.restart.covers(outcome.started, time.monotonic()) and not self.restart.done.is_set():
                self.restart.done.wait(120)
                restarted = True
            try:
                now = direct_uidls(self.job.dovecot_port, user)
            except (OSError, Closed, Wrong) as error:
                now, problem = None, f"{type(error).__name__}: {error}"
            if now == after:
                self.state[user.name] = after
                outcome.deleted = len(deleted)
                return
            if now is not None and now != before:
                outcome.result = "wrong"
                outcome.detail = f"{user.name}: partial delete {sorted(before - now)} of {sorted(deleted)}"
                self.state[user.name] = now
                return
            settled = time.monotonic() > outcome.finished + 3.0  # a QUIT still in flight has landed by now
            if now == before and (restarted or not must) and self.restart.done.is_set() and settled:
                return  # the QUIT never reached Dovecot (or it went down first): nothing deleted
            if time.monotonic() > deadline:
                seen = problem if now is None else "mailbox unchanged"
                outcome.result, outcome.detail = "wrong", f"{user.name}: deletions never committed ({seen})"
                return
            time.sleep(0.1)

    # -- the session kinds

    def _fetch(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        try:
            self._login(pop, user)
            for number, uidl in sorted(self._uidls(pop, user).items()):
                self._retr(pop, user, number, uidl)
            outcome.quit_sent = True
            expect(pop.command(b"QUIT"), b"+OK", "QUIT")
            outcome.quit_answered = True
        finally:
            pop.close()

    def _dele(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        chosen: frozenset[str] = frozenset()
        try:
            self._login(pop, user)
            uidls = self._uidls(pop, user)
            numbers = rng.sample(sorted(uidls), min(len(uidls), rng.randint(1, 3)))
            for number in numbers:
                self._retr(pop, user, number, uidls[number])
                expect(pop.command(b"DELE %d" % number), b"+OK", "DELE")
            chosen = frozenset(uidls[n] for n in numbers)
            outcome.quit_sent = True
            expect(pop.command(b"QUIT"), b"+OK", "QUIT")
            outcome.quit_answered = True
            self.state[user.name] -= chosen
            outcome.deleted = len(chosen)
        except (Closed, SysTemp):
            if not outcome.quit_sent:
                raise
            outcome.result = "lost_quit"
            outcome.finished = time.monotonic()
            self._settle(user, chosen, outcome, must=False)
        finally:
            pop.close()

    def _dele_no_quit(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        how = rng.choice(["close", "rst", "mid-retr"])
        try:
            self._login(pop, user)
            uidls = self._uidls(pop, user)
            numbers = rng.sample(sorted(uidls), min(len(uidls), rng.randint(1, 3)))
            for number in numbers:
                expect(pop.command(b"DELE %d" % number), b"+OK", "DELE")
            rest = sorted(set(uidls) - set(numbers))
            if how == "mid-retr" and rest:
                pop.send(b"RETR %d\r\n" % rest[0])
                pop.read_some(rng.randint(0, 400))
        finally:
            pop.close(reset=how != "close")
        # Nothing may be deleted: the round's final check sees this mailbox unchanged.

    def _dele_quit_hangup(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        try:
            self._login(pop, user)
            uidls = self._uidls(pop, user)
            numbers = rng.sample(sorted(uidls), min(len(uidls), rng.randint(1, 2)))
            outcome.quit_sent = True
            pop.send(b"".join(b"DELE %d\r\n" % n for n in numbers) + b"QUIT\r\n")
        finally:
            pop.close()
        outcome.finished = time.monotonic()
        # RFC 1939 §6: the client sent QUIT, so the proxy must deliver it although nobody listens.
        self._settle(user, frozenset(uidls[n] for n in numbers), outcome, must=True)

    def _drop_mid_retr(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        try:
            self._login(pop, user)
            pop.send(b"RETR %d\r\n" % len(user.sizes))  # the large one
            pop.read_some(rng.randint(0, user.sizes[-1] // 2))
        finally:
            pop.close(reset=rng.random() < 0.5)

    def _drop_in_login(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        try:
            expect(pop.answer(), b"+OK POP3 proxy ready.", "greeting")
            pop.send(b"USER %s\r\nPASS %s\r\n" % (user.name.encode(), user.password.encode()))
            time.sleep(rng.random() * 0.01)
        finally:
            pop.close(reset=rng.random() < 0.5)

    def _burst(self, rng: random.Random, outcome: Outcome, user: Account) -> None:
        pop = Pop(self.port)
        try:
            self._login(pop, user)
            outcome.quit_sent = True
            pop.send(b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nDELE 1\r\nRSET\r\nRETR 2\r\nNOOP\r\nQUIT\r\n")
            stat = expect(pop.answer(), b"+OK", "STAT")
            if stat.split()[1:3] != [b"%d" % len(user.sizes), b"%d" % sum(user.sizes)]:
                raise Wrong(f"STAT {stat!r}")
            if listing(expect(pop.answer(True), b"+OK", "LIST")) != {n: b"%d" % size for n, size in enumerate(user.sizes, 1)}:
                raise Wrong("LIST sizes differ")
            if {n: v.decode() for n, v in listing(expect(pop.answer(True), b"+OK", "UIDL")).items()} != dict(enumerate(user.uidls, 1)):
                raise Wrong("UIDL differs")
            if sha256(message_of(pop.answer(True))) != user.digests[0]:
                raise Wrong("RETR 1 differs")
            expect(pop.answer(), b"+OK", "DELE")
            expect(pop.answer(), b"+OK", "RSET")
            if sha256(message_of(pop.answer(True))) != user.digests[1]:
                raise Wrong("RETR 2 differs")
            expect(pop.answer(), b"+OK", "NOOP")
            expect(pop.answer(), b"+OK", "QUIT")
            outcome.quit_answered = True
        finally:
            pop.close()

    # -- running

    def session(self, index: int) -> Outcome:
        rng = random.Random(SEED * 10 + self.job.number * 100000 + index)
        kind = rng.choices(list(MIX), list(MIX.values()))[0]
        writer = kind in WRITER_KINDS
        user = self._pick_writer(rng) if writer else rng.choice(self.job.readers)
        outcome = Outcome(kind, "ok", time.monotonic(), time.monotonic(), user=user.name)
        try:
            getattr(self, "_" + kind)(rng, outcome, user)
        except SysTemp as error:
            outcome.result, outcome.detail = "sys_temp", str(error)
        except Closed as error:
            outcome.result, outcome.detail = "closed", str(error)
        except Wrong as error:
            outcome.result, outcome.detail = "wrong", str(error)
            if "[AUTH]" in str(error):
                outcome.result = "auth"  # checked against the restart window by the test
        except Exception as error:  # noqa: BLE001 (anything else is a failure too)
            outcome.result, outcome.detail = "wrong", f"{type(error).__name__}: {error}"
        finally:
            if writer:
                self.locks[user.name].release()
            outcome.finished = time.monotonic()
            if outcome.result != "ok" and self.restart.began is not None:
                # Like a fetcher that retries later: wait for the upstream to come back rather than
                # spin through sessions that can only fail.
                self.restart.done.wait(120)
            with self._lock:
                self._done += 1
                if self._done >= RESTART_AT * self.job.sessions:
                    self.restart.trigger()
        return outcome

    def run(self) -> Report:
        with ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="soak-client") as pool:
            outcomes = list(pool.map(self.session, range(self.job.sessions)))
        self.restart.join()
        times = (self.restart.began or math.nan, self.restart.stopped or math.nan, self.restart.ended or math.nan)
        return Report(outcomes, self.state, times)


def client_main(job_path: str, report_path: str) -> None:
    """The child process: run one round's clients, write the report."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192, hard))
    job: Job = pickle.loads(Path(job_path).read_bytes())
    report = Round(job).run()
    Path(report_path).write_bytes(pickle.dumps(report))


# -- the test process: Dovecot's keeper, the proxy's memory ---------------------------------------------------------


class Keeper:
    """One long-lived thread that starts, stops and restarts Dovecot.

    ``DovecotServer`` starts Dovecot with ``PR_SET_PDEATHSIG``, which Linux ties to the *thread* that
    forked, not to the process: a Dovecot started from a short-lived thread (a ``deferToThread``
    worker, a restart thread) is sent SIGTERM the moment that thread ends. So every start happens
    here, on a thread that outlives the server.
    """

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dovecot-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            function, future = item
            try:
                future.set_result(function())
            except BaseException as error:  # noqa: BLE001 (handed to the caller)
                future.set_exception(error)

    def submit(self, function: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._calls.put((function, future))
        return future

    def call(self, function: Callable[[], Any]) -> Any:
        return self.submit(function).result()

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(30)


def serve_restart(listener: socket.socket, dovecot: DovecotServer, child: subprocess.Popen[bytes]) -> None:
    """On the keeper's thread: wait for the child's one RESTART request, restart Dovecot, answer
    with the times (began, stopped, ended)."""
    listener.settimeout(0.5)
    while True:
        try:
            conn, _ = listener.accept()
            break
        except TimeoutError:
            if child.poll() is not None:
                return
    with conn:
        conn.settimeout(30)
        conn.makefile("rb").readline()
        ports = (dovecot.plain_port, dovecot.tls_port)
        began = time.monotonic()
        # Sessions in flight must meet it: a graceful stop (or a crash of the master alone) lets
        # Dovecot's pop3 processes finish their sessions and only refuses new logins. So the master
        # is killed (no new process can start), then every process of the server is told to end
        # (SIGTERM: Dovecot finishes the command at hand, an expunge included, and drops the
        # connection), and whatever is left after 3 s is killed.
        master = dovecot.master_pid
        assert master is not None, "Dovecot is not running"
        os.kill(master, signal.SIGKILL)
        deadline = time.monotonic() + 3
        signalled: set[int] = set()
        while processes := dovecot_processes(dovecot):
            for pid in processes:
                if pid not in signalled or time.monotonic() > deadline:
                    signalled.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM if time.monotonic() <= deadline else signal.SIGKILL)
            time.sleep(0.05)
        dovecot.stop(timeout=3)  # reaps the master
        stopped = time.monotonic()
        time.sleep(0.3)  # a moment with nothing listening: logins meet a refused connection
        dovecot.start()
        ended = time.monotonic()
        assert (dovecot.plain_port, dovecot.tls_port) == ports, "Dovecot came back on other ports"
        conn.sendall(b"%r %r %r\n" % (began, stopped, ended))


def dovecot_processes(dovecot: DovecotServer) -> list[int]:
    """PIDs of the server's processes other than the master (their titles carry its instance name)."""
    title = f"{dovecot.instance_name}/".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if title in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def run_child(job: Job, workdir: Path, keeper: Keeper, dovecot: DovecotServer) -> Report:
    """Run one round's clients in a child process; restart Dovecot when it asks."""
    job_path, report_path = workdir / f"job-{job.number}.pickle", workdir / f"report-{job.number}.pickle"
    listener = socket.create_server(("127.0.0.1", 0))
    job.restart_port = listener.getsockname()[1]
    job_path.write_bytes(pickle.dumps(job))
    code = f"import sys; sys.path[:0] = {sys.path!r}; import test_soak; test_soak.client_main(sys.argv[1], sys.argv[2])"
    with open(workdir / f"clients-{job.number}.log", "wb") as output:
        child = subprocess.Popen([sys.executable, "-c", code, str(job_path), str(report_path)],
                                 stdout=output, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            restarted = keeper.submit(lambda: serve_restart(listener, dovecot, child))
            returncode = child.wait(300)
            restarted.result(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            listener.close()
    log = (workdir / f"clients-{job.number}.log").read_text(errors="replace")
    assert returncode == 0, f"the client process failed ({returncode}):\n{log[-3000:]}"
    return pickle.loads(report_path.read_bytes())


def rss() -> int:
    """The process's resident memory, after the allocator gave back the memory it holds free."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


_filler = Logger(namespace="test_soak")


def live_sessions(flush: bool = False) -> Counter[str]:
    """Session objects still in memory, by type (no reference to them is kept). With ``flush``, first
    push the proxy's events out of Twisted's buffer of the last 200 events (kept, in a test process,
    until someone calls ``beginLoggingTo``, which twistd does and pytest does not): each event holds
    its ``log_source``, the session."""
    if flush:
        for _ in range(256):
            _filler.debug("soak: flushing the log history buffer")
    gc.collect()
    return Counter(
        type(o).__name__
        for o in gc.get_objects()
        if isinstance(o, (ClientProtocol, UpstreamProtocol)) and o not in _BEFORE_SOAK
    )


#: Session objects that other tests in the same process left behind before the soak began: not the
#: soak's to account for (held weakly, so that the soak keeps none of them alive either).
_BEFORE_SOAK: weakref.WeakSet[object] = weakref.WeakSet()


def note_sessions_before_soak() -> None:
    gc.collect()
    _BEFORE_SOAK.update(o for o in gc.get_objects() if isinstance(o, (ClientProtocol, UpstreamProtocol)))


class EventCounter:
    """Counts the proxy's events per round without keeping them (a soak logs thousands)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        #: the text of the first few errors logged, with their tracebacks
        self.errors: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "session_close":
            self.counts["session_close"] += 1
            self.counts["ended: " + str(event.get("ended"))] += 1
        elif name == "auth":
            self.counts["login: " + str(event.get("result"))] += 1
        elif event.get("log_level") is not None and event["log_level"].name in ("warn", "error", "critical"):
            self.counts["warn: " + str(event.get("log_format", ""))[:60]] += 1
        if event.get("isError") or event.get("log_failure") is not None:
            self.counts["error"] += 1
            if len(self.errors) < 5:
                failure = event.get("log_failure")
                self.errors.append(formatEvent(event) + ("\n" + failure.getTraceback() if failure is not None else ""))

    def take(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts


_DOVECOT_LOGIN = re.compile(r"pop3-login: Info: Login: user=<([^>]*)>.*rip=([0-9.]+).*session=<([^>]+)>")
_DOVECOT_END = re.compile(r"pop3\(([^)]*)\)<\d+><([^>]+)>: Info: Disconnected: (.*?) top=\d+/\d+, retr=\d+/\d+, del=(\d+)/\d+")


def dovecot_sessions(log: str) -> list[tuple[str, str, str, int]]:
    """(user, client address, how it ended, deletions) for each logged-in Dovecot session in ``log``."""
    rips = {m.group(3): m.group(2) for m in _DOVECOT_LOGIN.finditer(log)}
    return [(m.group(1), rips.get(m.group(2), "?"), m.group(3), int(m.group(4))) for m in _DOVECOT_END.finditer(log)]


# -- fixtures and the test ---------------------------------------------------------------------------------------------


def quiet_ports(count: int) -> list[int]:
    """Free ports outside the kernel's ephemeral range, for a server that restarts.

    Ports picked by binding port 0 come from the ephemeral range, which every outgoing connection
    draws from too: while Dovecot is down, one of the hundreds of connections in flight may take its
    port number as a local port (or the proxy's connection attempt may even connect to itself), and
    Dovecot could not bind it again.
    """
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random(os.getpid())
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture
def enough_files() -> Iterator[None]:
    """Sockets: CONCURRENCY client legs, as many upstream legs, listeners and Dovecot's probes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    keeper = Keeper()
    yield keeper
    keeper.close()


@pytest.fixture
def soak_dovecot(tmp_path: Path, ca: CertificateAuthority, keeper: Keeper) -> Iterator[DovecotServer]:
    """A Dovecot of the soak's own (it is restarted), not started yet: start it with ``keeper``."""
    server = DovecotServer(tmp_path / "dovecot", leaf=ca.issue(["localhost", "127.0.0.1"]),
                           max_sessions=CONCURRENCY + 100, instance_name=f"popproxy-soak-{os.getpid()}")
    server.plain_port, server.tls_port = quiet_ports(2)
    try:
        yield server
    finally:
        keeper.call(server.close)


@pytest_twisted.ensureDeferred
async def test_soak(tmp_path: Path, soak_dovecot: DovecotServer, keeper: Keeper, enough_files: None) -> None:
    dovecot = soak_dovecot
    note_sessions_before_soak()
    readers, writers = await deferToThread(create_mailboxes, dovecot)
    await deferToThread(keeper.call, dovecot.start)
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1:backlog=1024"\ntls = "none"\n\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\nconnect_timeout = 5\n\n'
        '[routing]\ndefault = "dovecot"\n\n'
        '[limits]\nip_allowlist = ["127.0.0.0/8"]\nmax_sessions = 1000\nlogin_failure_delay = 0.1\n'
        "upstream_timeout = 20\nshutdown_grace = 2\n"
    )
    service = ProxyService(load_config(config), reactor, handle_signals=False)
    service.privilegedStartService()
    service.startService()
    counter = EventCounter()
    globalLogPublisher.addObserver(counter)
    checker = ThreadPoolExecutor(max_workers=8, thread_name_prefix="soak-check")
    state = {u.name: frozenset(u.uidls) for u in readers + writers}
    accounts = ([Account.of(u) for u in readers], [Account.of(u) for u in writers])
    users = [*accounts[0], *accounts[1]]
    del readers, writers  # the messages: megabytes this process need not keep
    figures: dict[str, Any] = {"sessions_per_round": SESSIONS, "warmup": WARMUP, "concurrency": CONCURRENCY, "rounds": []}
    started = time.monotonic()
    try:
        figures["rss_before"] = rss()
        for number in range(ROUNDS + 1):
            log_offset = dovecot.log_path.stat().st_size
            job = Job(number, WARMUP if number == 0 else SESSIONS, port, dovecot.plain_port, 0, accounts[0], accounts[1], state)
            began = time.monotonic()
            report = await deferToThread(run_child, job, tmp_path, keeper, dovecot)
            duration = time.monotonic() - began
            state = report.state
            figures["rounds"].append(await check_round(number, report, duration, service, counter, dovecot,
                                                       users, state, log_offset, checker))
        figures["total_s"] = round(time.monotonic() - started, 1)
        FIGURES.clear()
        FIGURES.update(figures)
        print_figures(figures)
        first, second = figures["rounds"][1], figures["rounds"][2]
        growth = second["rss_after"] - first["rss_after"]
        assert growth < PLATEAU, f"the proxy's RSS grew by {growth / 2**20:.1f} MiB from round 1 to round 2: {figures}"
        # Python objects: fewer than one more allocated block, and half an object, per session.
        assert second["allocated_blocks"] - first["allocated_blocks"] < SESSIONS, figures
        assert second["gc_objects"] - first["gc_objects"] < SESSIONS // 2, figures
    finally:
        globalLogPublisher.removeObserver(counter)
        checker.shutdown(wait=True)
        await service.stopService()


async def check_round(number: int, report: Report, duration: float, service: ProxyService, counter: EventCounter,
                      dovecot: DovecotServer, users: list[Account], state: dict[str, frozenset[str]],
                      log_offset: int, checker: ThreadPoolExecutor) -> dict[str, Any]:
    outcomes = report.outcomes
    began, stopped, ended = report.restart
    assert not math.isnan(ended), "Dovecot was not restarted"
    restart = RestartClient(0)
    restart.began, restart.ended = began, ended
    results = Counter(f"{o.kind}: {o.result}" for o in outcomes)

    # 1. No wrong answer, ever; failures only where the restart explains them.
    wrong = [o for o in outcomes if o.result == "wrong"]
    assert not wrong, f"{len(wrong)} sessions went wrong, e.g. {[(o.kind, o.detail) for o in wrong[:5]]}"
    failed = [o for o in outcomes if o.result != "ok"]
    unexplained = [o for o in failed if not restart.covers(o.started, o.finished)]
    assert not unexplained, f"failures away from the restart: {[(o.kind, o.result, o.detail) for o in unexplained[:5]]}"
    # Each client meets the restart at most about once (it then waits, as a fetcher retries later).
    assert len(failed) <= 1.5 * CONCURRENCY, results

    # 2. The proxy: every session over and gone, its counts back to zero, every session logged.
    deadline = time.monotonic() + 15
    waited = time.monotonic()
    while (alive := live_sessions(flush=True)) or any(f.sessions for f in service.factories):
        assert not counter.errors, "errors logged:\n" + "\n".join(counter.errors)
        assert time.monotonic() < deadline, (
            f"session objects still alive: {dict(alive)}, {sum(len(f.sessions) for f in service.factories)} in the factories"
        )
        await deferLater(reactor, 0.25, lambda: None)
    waited = time.monotonic() - waited
    assert service.guard.sessions == 0
    assert not service.guard._users, dict(service.guard._users)
    events = counter.take()
    assert events["session_close"] == len(outcomes), events  # one session per connection, each logged
    assert events["error"] == 0, events

    # 3. Every mailbox, read straight from Dovecot, holds exactly what it should.
    actual = await deferToThread(lambda: dict(zip([u.name for u in users],
                                                  checker.map(lambda u: direct_uidls(dovecot.plain_port, u), users),
                                                  strict=True)))
    mismatched = {name: (sorted(state[name] - uidls), sorted(uidls - state[name]))
                  for name, uidls in actual.items() if uidls != state[name]}
    assert not mismatched, f"mailboxes differ (missing, extra): {mismatched}"
    for user in users:
        if user.name.startswith("soak-r"):
            assert state[user.name] == frozenset(user.uidls), f"{user.name} lost mail"

    # 4. Dovecot's own log, per user: it never saw a QUIT the clients did not send, nor deleted more
    #    than they committed; for users none of whose sessions met the restart (which may cost Dovecot
    #    log lines), it saw every answered QUIT and exactly the committed deletions.
    with open(dovecot.log_path, "rb") as log:
        log.seek(log_offset)
        text = log.read().decode(errors="replace")
    through_proxy = [s for s in dovecot_sessions(text) if s[1] == "127.0.0.1"]
    del text
    logged_out = [s for s in through_proxy if s[2] == "Logged out"]
    quits: dict[str, list[int]] = {}
    for user_name, _, _, deletions in logged_out:
        quits.setdefault(user_name, []).append(deletions)
    by_user: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_user.setdefault(outcome.user, []).append(outcome)
    for name in state:
        mine = by_user.get(name, [])
        seen, deleted = len(quits.get(name, [])), sum(quits.get(name, []))
        assert seen <= sum(o.quit_sent for o in mine), f"{name}: Dovecot saw a QUIT no client sent"
        assert deleted <= sum(o.deleted for o in mine), f"{name}: Dovecot deleted more than the clients committed"
        if not any(restart.covers(o.started, o.finished + 2.0) for o in mine):
            assert seen >= sum(o.quit_answered for o in mine), f"{name}: answered QUITs missing from Dovecot's log"
            assert deleted == sum(o.deleted for o in mine), f"{name}: Dovecot deleted {deleted}, clients committed more"

    return {
        "round": number,
        "sessions": len(outcomes),
        "duration_s": round(duration, 1),
        "sessions_per_s": round(len(outcomes) / duration, 1),
        "restart_s": round(ended - began, 2),
        "restart_stop_s": round(stopped - began, 2),
        "sessions_gone_after_s": round(waited, 2),
        "results": dict(sorted(results.items())),
        "failures": dict(Counter(o.result for o in failed)),
        "proxy_events": dict(sorted(events.items())),
        "dovecot_sessions_via_proxy": len(through_proxy),
        "dovecot_quits": len(logged_out),
        "deleted": sum(o.deleted for o in outcomes),
        "rss_after": rss(),
        "gc_objects": len(gc.get_objects()),
        "allocated_blocks": sys.getallocatedblocks(),
    }


def print_figures(figures: dict[str, Any]) -> None:
    mib = 2**20
    print(f"\nsoak: round 0 of {figures['warmup']} sessions, then {len(figures['rounds']) - 1} rounds of "
          f"{figures['sessions_per_round']}, {figures['concurrency']} at once, in {figures['total_s']} s; "
          f"proxy RSS before {figures['rss_before'] / mib:.1f} MiB")
    for r in figures["rounds"]:
        print(f"  round {r['round']}: {r['sessions']} sessions in {r['duration_s']} s ({r['sessions_per_s']}/s), "
              f"Dovecot restart {r['restart_s']} s (stop {r['restart_stop_s']} s); proxy RSS after "
              f"{r['rss_after'] / mib:.1f} MiB, gc objects {r['gc_objects']}, allocated blocks {r['allocated_blocks']}; "
              f"sessions gone {r['sessions_gone_after_s']} s after the round; "
              f"deleted {r['deleted']}; Dovecot sessions via the proxy "
              f"{r['dovecot_sessions_via_proxy']} ({r['dovecot_quits']} QUIT)")
        print(f"    failures: {r['failures']}")
        print(f"    results: {r['results']}")
        print(f"    proxy events: {r['proxy_events']}")
