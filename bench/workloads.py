"""The client side: a small raw-socket POP3 client and one function per workload.

The client behaves like fetchmail: one command, then wait for its whole answer (no pipelining), and
no TCP_NODELAY of its own. Every message is checked: the SHA-256 of the body exactly as it came off
the wire (dot-stuffed, terminator included) must equal the expected one, which is computed from the
generated mailbox and which direct Dovecot must reproduce too. A path that is fast but returns other
bytes is reported as wrong, never as fast. Where hooks add header fields on purpose (workload F), the
check is what that path must return instead: the added fields on top, then the generated message
byte for byte, and each RETR exactly as long as LIST and ``+OK n octets`` announced.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CRLF = b"\r\n"
TERMINATOR = b"\r\n.\r\n"
RECV_SIZE = 256 * 1024
PAD = b"X-Popproxy-Pad"  # the filler popproxy puts on top of a message hooks rewrote, so that its size is exact


class POP3Error(Exception):
    pass


class Client:
    """One POP3 session over a plain or TLS socket, reading exact bytes."""

    def __init__(self, port: int, context: ssl.SSLContext | None, timeout: float = 60.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self._buf = bytearray()
        greeting = self.line()
        if not greeting.startswith(b"+OK"):
            raise POP3Error(f"greeting {greeting!r}")

    @property
    def tls_version(self) -> str:
        return (self.sock.version() or "") if isinstance(self.sock, ssl.SSLSocket) else ""

    def _fill(self) -> None:
        chunk = self.sock.recv(RECV_SIZE)
        if not chunk:
            raise POP3Error("connection closed by the server")
        self._buf += chunk

    def line(self) -> bytes:
        while True:
            end = self._buf.find(CRLF)
            if end != -1:
                line = bytes(self._buf[: end + 2])
                del self._buf[: end + 2]
                return line
            self._fill()

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + CRLF)
        return self.line()

    def body(self) -> bytes:
        """The multi-line body after a +OK status line, as on the wire, terminator included."""
        buf = self._buf
        scanned = 0
        while True:
            if buf[:3] == b".\r\n":  # an empty body: the status line's CRLF starts the terminator
                end = 3
                break
            found = buf.find(TERMINATOR, max(0, scanned - 4))
            if found != -1:
                end = found + 5
                break
            scanned = len(buf)
            self._fill()
        data = bytes(buf[:end])
        del buf[:end]
        return data

    def login(self, user: str, password: str) -> None:
        for line in (b"USER " + user.encode(), b"PASS " + password.encode()):
            answer = self.command(line)
            if not answer.startswith(b"+OK"):
                raise POP3Error(f"{line.split()[0].decode()} -> {answer!r}")

    def retr(self, number: int) -> bytes:
        return self.retr_answer(number)[1]

    def retr_answer(self, number: int) -> tuple[bytes, bytes]:
        """The status line and the body of ``RETR number``."""
        status = self.command(b"RETR %d" % number)
        if not status.startswith(b"+OK"):
            raise POP3Error(f"RETR {number} -> {status!r}")
        return status, self.body()

    def sizes(self) -> dict[int, int]:
        """``LIST``: {message number: octets}."""
        status = self.command(b"LIST")
        if not status.startswith(b"+OK"):
            raise POP3Error(f"LIST -> {status!r}")
        listing = {}
        for line in self.body()[:-3].split(CRLF):
            number, _, size = line.partition(b" ")
            if number.isdigit():
                listing[int(number)] = int(size.split()[0])
        return listing

    def quit(self) -> None:
        try:
            self.command(b"QUIT")
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wire_sha256(message: bytes) -> str:
    """SHA-256 of the RETR body a correct server sends for ``message`` (RFC 1939 §3 dot-stuffing)."""
    lines = message[:-2].split(CRLF) if message else []
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)
    return hashlib.sha256(stuffed + b"." + CRLF).hexdigest()


def octets(body: bytes) -> int:
    """The size of a message from its RETR body as on the wire: without the dot-stuffing and the
    terminator line, as LIST and ``+OK n octets`` count it (RFC 1939 §5)."""
    if body == b".\r\n":
        return 0
    stuffed = body.count(b"\r\n.") - 1 + body.startswith(b".")  # lines starting with "." (not the terminator)
    return len(body) - 3 - stuffed


def announced(status: bytes) -> int | None:
    """n in ``+OK n octets``, as Dovecot and popproxy answer RETR; None when not there."""
    parts = status.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@dataclass(frozen=True)
class Rewritten:
    """The header fields a path's hooks put on top of each message, besides popproxy's size filler
    (``X-Popproxy-Pad``): every one in ``required`` must be there, those in ``optional`` may be."""

    required: tuple[bytes, ...]
    optional: tuple[bytes, ...] = ()

    def original(self, body: bytes) -> bytes | None:
        """``body`` (as on the wire) without the added fields on top, folded lines included: what
        Dovecot sent. None if a required field is missing."""
        names = {n.lower() for n in (*self.required, *self.optional, PAD)}
        found: set[bytes] = set()
        pos = 0
        while (end := body.find(CRLF, pos)) != -1:
            line = body[pos:end]
            if not (pos and line[:1] in (b" ", b"\t")):  # a folded line belongs to the field above
                name, colon, _ = line.partition(b":")
                if not colon or name.lower() not in names:
                    break
                found.add(name.lower())
            pos = end + 2
        return body[pos:] if {n.lower() for n in self.required} <= found else None


@dataclass
class Account:
    user: str
    password: str
    expected: list[str]  # wire_sha256 of message 1, 2, ...
    stat: bytes = b""  # the expected STAT answer


@dataclass
class Outcome:
    """What one workload did on one path. ``value`` is in the workload's unit (None if it failed)."""

    value: float | None = None
    done: int = 0  # messages or sessions completed
    planned: int = 0
    seconds: float = 0.0
    nbytes: int = 0
    wrong: int = 0  # messages or STAT answers that differed from the expected bytes
    capped: bool = False  # stopped at the time limit before ``planned`` was reached
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.perf_counter() + seconds

    def passed(self) -> bool:
        return time.perf_counter() > self.at


def sequential_fetch(port: int, context: ssl.SSLContext | None, account: Account, count: int, cap: float,
                     rewritten: Rewritten | None = None, check_sizes: bool = False) -> Outcome:
    """Workload A: one session, RETR 1..count one at a time (fetchmail's pattern). Unit: messages/s.

    Workload F is the same through popproxy with a hook, with ``check_sizes`` (LIST once before the
    timing; each RETR must be as long as LIST and its ``+OK n octets`` said) and, for hooks that add
    header fields, ``rewritten``: the generated message must follow those fields byte for byte."""
    out = Outcome(planned=count)
    client = Client(port, context)
    out.extra["tls_version"] = client.tls_version
    client.login(account.user, account.password)
    listing = client.sizes() if check_sizes else {}
    wrong_size = 0
    latencies: list[float] = []
    deadline = Deadline(cap)
    start = time.perf_counter()
    for number in range(1, count + 1):
        t0 = time.perf_counter()
        status, body = client.retr_answer(number)
        latencies.append(time.perf_counter() - t0)
        out.nbytes += len(body)
        original = rewritten.original(body) if rewritten else body
        if original is None or hashlib.sha256(original).hexdigest() != account.expected[number - 1]:
            out.wrong += 1
        elif check_sizes and not octets(body) == announced(status) == listing.get(number):
            out.wrong += 1
            wrong_size += 1
        out.done += 1
        if deadline.passed() and number < count:
            out.capped = True
            break
    out.seconds = time.perf_counter() - start
    client.quit()
    out.value = out.done / out.seconds
    if check_sizes:
        out.extra["wrong_size"] = wrong_size
    latencies.sort()
    out.extra["latency_ms"] = {
        "p50": round(1000 * statistics.median(latencies), 3),
        "p99": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "max": round(1000 * latencies[-1], 3),
    }
    return out


def large_fetch(port: int, context: ssl.SSLContext | None, account: Account) -> Outcome:
    """Workload B: RETR of one large message. Unit: MB/s (10^6 bytes of body per second)."""
    out = Outcome(planned=1)
    client = Client(port, context)
    out.extra["tls_version"] = client.tls_version
    client.login(account.user, account.password)
    start = time.perf_counter()
    body = client.retr(1)
    out.seconds = time.perf_counter() - start
    client.quit()
    if hashlib.sha256(body).hexdigest() != account.expected[0]:
        out.wrong += 1
    out.nbytes = len(body)
    out.done = 1
    out.value = out.nbytes / out.seconds / 1e6
    return out


class _Start(threading.Barrier):
    """A barrier that notes when each party passes it: the first of those is when the timed part began."""

    def __init__(self, parties: int) -> None:
        super().__init__(parties)
        self.passed: list[float] = []

    def wait(self, timeout: float | None = None) -> int:
        index = super().wait(timeout)
        self.passed.append(time.perf_counter())
        return index


def _run_threads(count: int, target: Callable[[int, threading.Barrier], None]) -> float:
    """Run ``target(i, barrier)`` in ``count`` threads; time from the barrier's release to the last end.

    Both ends are taken in the worker threads: the main thread may get the GIL back only once the
    workers are done (then a short run looked almost instantaneous: C direct at 100,000+ msg/s)."""
    barrier = _Start(count + 1)
    errors: list[BaseException] = []
    ended: list[float] = []

    def wrapper(i: int) -> None:
        try:
            target(i, barrier)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            barrier.abort()
        ended.append(time.perf_counter())

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(ended) - min(barrier.passed)


def concurrent_fetch(port: int, context: ssl.SSLContext | None, accounts: list[Account], per_client: int, cap: float) -> Outcome:
    """Workload C: len(accounts) clients at once, each logged in first, then RETR 1..per_client.
    Unit: messages/s over all clients, from the moment they all start fetching."""
    out = Outcome(planned=len(accounts) * per_client)
    lock = threading.Lock()
    deadline_box: list[Deadline] = []

    def one(i: int, barrier: threading.Barrier) -> None:
        account = accounts[i]
        client = Client(port, context)
        client.login(account.user, account.password)
        barrier.wait(timeout=120)
        if not deadline_box:
            deadline_box.append(Deadline(cap))
        done = wrong = nbytes = 0
        capped = False
        for number in range(1, per_client + 1):
            body = client.retr(number)
            nbytes += len(body)
            if hashlib.sha256(body).hexdigest() != account.expected[number - 1]:
                wrong += 1
            done += 1
            if deadline_box[0].passed() and number < per_client:
                capped = True
                break
        client.quit()
        with lock:
            out.done += done
            out.wrong += wrong
            out.nbytes += nbytes
            out.capped = out.capped or capped

    out.seconds = _run_threads(len(accounts), one)
    out.value = out.done / out.seconds
    return out


def login_sessions(port: int, context: ssl.SSLContext | None, account: Account, sessions: int, threads: int, cap: float) -> Outcome:
    """Workload D: ``sessions`` x (connect [+ TLS handshake], greeting, USER, PASS, STAT, QUIT) from
    ``threads`` threads. Unit: sessions/s."""
    out = Outcome(planned=sessions)
    lock = threading.Lock()
    per_thread = [sessions // threads + (1 if i < sessions % threads else 0) for i in range(threads)]
    deadline_box: list[Deadline] = []
    versions: set[str] = set()

    def one(i: int, barrier: threading.Barrier) -> None:
        barrier.wait(timeout=120)
        if not deadline_box:
            deadline_box.append(Deadline(cap))
        done = wrong = 0
        capped = False
        for n in range(per_thread[i]):
            client = Client(port, context)
            versions.add(client.tls_version)
            client.login(account.user, account.password)
            if client.command(b"STAT") != account.stat:
                wrong += 1
            client.quit()
            done += 1
            if deadline_box[0].passed() and n + 1 < per_thread[i]:
                capped = True
                break
        with lock:
            out.done += done
            out.wrong += wrong
            out.capped = out.capped or capped

    out.seconds = _run_threads(threads, one)
    out.value = out.done / out.seconds
    out.extra["tls_version"] = ",".join(sorted(v for v in versions if v))
    return out


def idle_sessions(port: int, context: ssl.SSLContext | None, accounts: list[Account], count: int, batch: int,
                  held: Callable[[], dict[str, object]], timeout: float = 60.0) -> dict[str, object]:
    """Workload E: ``count`` logged-in sessions held at once, opened ``batch`` at a time (connect [+ TLS],
    greeting, USER, PASS), the accounts taken in turn. Once all are open (or opening failed), ``held()``
    is called (the caller reads the proxy's memory then), then every session is sent ``NOOP`` at once
    and each answer must be ``+OK``; then all send QUIT and close. One event loop, non-blocking
    sockets (asyncio + ssl), no thread per session. Returns a dict: ``opened``, ``open_s``, ``noop_ok``,
    ``failed`` (sessions that did not open or did not answer NOOP with +OK), ``held`` (what ``held()``
    returned), ``error`` (the first failure, or None)."""
    return asyncio.run(_idle_sessions(port, context, accounts, count, batch, held, timeout))


async def _idle_sessions(port: int, context: ssl.SSLContext | None, accounts: list[Account], count: int, batch: int,
                         held: Callable[[], dict[str, object]], timeout: float) -> dict[str, object]:
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    versions: set[str] = set()

    async def expect_ok(reader: asyncio.StreamReader, what: str) -> None:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{what} -> {line[:200]!r}")

    async def open_one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        account = accounts[i % len(accounts)]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost" if context else None), timeout)
        tls = writer.get_extra_info("ssl_object")
        versions.add(tls.version() if tls is not None else "")
        try:
            await expect_ok(reader, "greeting")
            for line in (b"USER " + account.user.encode(), b"PASS " + account.password.encode()):
                writer.write(line + CRLF)
                await expect_ok(reader, line.split()[0].decode())
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    started = time.perf_counter()
    for first in range(0, count, batch):
        results = await asyncio.gather(*(open_one(i) for i in range(first, min(count, first + batch))),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                errors.append(f"open: {type(result).__name__}: {result}")
            else:
                sessions.append(result)
        if errors:
            break  # a proxy that refuses more sessions: report how many it held
    open_s = time.perf_counter() - started
    await asyncio.sleep(1.0)  # the last logins settle (upstream answers, log lines)
    memory = held()

    async def noop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOOP" + CRLF)
        await expect_ok(reader, "NOOP")

    answers = await asyncio.gather(*(noop(r, w) for r, w in sessions), return_exceptions=True)
    noop_ok = sum(1 for a in answers if not isinstance(a, BaseException))
    errors += [f"NOOP: {type(a).__name__}: {a}" for a in answers if isinstance(a, BaseException)]

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"QUIT" + CRLF)
            await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.transport.abort()  # no TLS close_notify exchange: 5,000 of them would only add time

    await asyncio.gather(*(close(r, w) for r, w in sessions), return_exceptions=True)
    return {"opened": len(sessions), "open_s": round(open_s, 3), "noop_ok": noop_ok,
            "failed": count - noop_ok, "held": memory, "error": errors[0][:300] if errors else None,
            "errors": len(errors), "tls_version": ",".join(sorted(v for v in versions if v))}
