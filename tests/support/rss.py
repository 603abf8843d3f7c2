"""Memory of a running proxy process, against a per-session budget (``tests/test_findings.py``).

``SessionBudget`` is the most a session may hold by design, from the ``[limits]`` and hook settings
in force; ``RssWatch`` samples a process's resident set while an attack runs; ``flood`` pushes bytes
at a socket until the peer stops reading them.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * 1024

#: allowance for the allocator, the interpreter and the measuring itself, on top of the budget
SLACK = 16 * MiB
#: the transport buffers of one leg: ~64 KiB being written and ~64 KiB just read
LEG_TRANSPORT = 64 * KiB + 64 * KiB


@dataclass(frozen=True)
class SessionBudget:
    """The octets one session may hold at most:

    max_buffered (client input waiting) + max_buffered (answers the proxy wrote itself, not yet
    taken by the client) + upstream_max_line (one upstream line being framed) + 2 * max_listing
    (LIST and UIDL read at login, only where hooks make the proxy read them) + 2 * (largest hook
    max_size + reservations) (one message in a hook, one processed message kept for TOP-then-RETR)
    + the transport buffers of each leg.
    """

    max_buffered: int
    upstream_max_line: int
    max_listing: int = 0
    hook_max_size: int = 0
    reservations: int = 0
    legs: int = 2

    @property
    def octets(self) -> int:
        return (
            2 * self.max_buffered
            + self.upstream_max_line
            + 2 * self.max_listing
            + 2 * (self.hook_max_size + self.reservations)
            + self.legs * LEG_TRANSPORT
        )

    def bound_kib(self, sessions: int = 1) -> int:
        """The growth allowed for ``sessions`` such sessions, slack included, in KiB."""
        return (sessions * self.octets + SLACK) // KiB


def _status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """``VmRSS`` of ``pid``, in KiB."""
    return _status_kib(pid, "VmRSS")


def pid_of(process: object) -> int:
    """The pid of a ``support.proxyproc.ProxyProcess``: from its pidfile, else the child's pid
    (the same process: ``twistd -n`` does not fork)."""
    pidfile: Path = process.pidfile  # type: ignore[attr-defined]
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return process.process.pid  # type: ignore[attr-defined]


@dataclass
class RssWatch:
    """Samples ``VmRSS`` of ``pid`` every ``step`` seconds in a thread, from ``start()`` to ``stop()``;
    ``VmHWM`` (reset at ``start()`` through ``clear_refs``, allowed for our own children) catches a
    peak between two samples. Use as a context manager."""

    pid: int
    step: float = 0.02
    baseline: int = 0
    samples: list[int] = field(default_factory=list)
    hwm: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssWatch:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self.baseline = rss_kib(self.pid)
        self.samples = [self.baseline]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.step):
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, RuntimeError):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.samples.append(rss_kib(self.pid))
            self.hwm = _status_kib(self.pid, "VmHWM")
        except (OSError, RuntimeError):
            pass

    def __enter__(self) -> RssWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def peak(self) -> int:
        return max([*self.samples, self.hwm])

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def report(self, what: str, bound: int) -> str:
        return (f"{what}: RSS baseline {self.baseline} KiB, peak {self.peak} KiB (sampled max "
                f"{max(self.samples)} KiB, VmHWM {self.hwm} KiB), growth {self.growth} KiB, "
                f"bound {bound} KiB")


def small_receive_buffer_socket(rcvbuf: int = 4096, source: str = "127.0.0.1") -> socket.socket:
    """A TCP socket whose receive buffer is set small before connecting (so the window stays small):
    a client that does not read stops taking the proxy's answers after a few KiB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    return sock


def flood(sock: socket.socket, unit: bytes, total: int, *, stall: float = 2.0, until: float,
          chunk: int = 65536) -> int:
    """Send ``unit`` repeated, up to ``total`` octets, without reading. Stops when the peer takes
    nothing for ``stall`` seconds (it stopped reading), at the monotonic time ``until``, or when the
    connection breaks. Returns the octets sent."""
    block = unit * max(1, chunk // len(unit))
    sent = 0
    sock.setblocking(False)
    try:
        while sent < total and time.monotonic() < until:
            wait = min(stall, max(0.0, until - time.monotonic()))
            _, writable, _ = select.select([], [sock], [], wait)
            if not writable:
                if wait >= stall:
                    break  # blocked for `stall` seconds: the proxy stopped reading
                continue
            offset = sent % len(block)
            piece = block[offset:] if offset else block
            piece = piece[: total - sent]
            try:
                sent += sock.send(piece)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                continue
            except OSError:
                break
    finally:
        sock.setblocking(True)
    return sent
