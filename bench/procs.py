"""Process helpers for the benchmark: CPU time of a process tree, waiting for ports, clean stops.

Everything here reads ``/proc`` (Linux only). CPU time is ``utime + stime`` of every live process in a
tree plus ``cutime + cstime`` of each of them (the children they have already reaped), so that
fork-per-connection servers (perdition) are charged for the connections that ended. A live child's
CPU time is only in its own ``stat``: the parent's ``cutime``/``cstime`` gain it when the child exits
and is reaped. So the tree is walked at every reading, and the live children (nginx's workers,
popproxy's ``[process] workers``, perdition's open connections) are read one by one.
"""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields resume after the last ')'.
    return text.rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (children, grandchildren, ...), by their parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    frontier = [root]
    while frontier:
        nxt = [c for p in frontier for c in children.get(p, [])]
        found += nxt
        frontier = nxt
    return found


def tree_cpu_by_process(roots: list[int]) -> dict[int, float]:
    """CPU seconds used so far by ``roots`` and each live process below them, by PID: each one's
    ``utime + stime`` (all its threads) plus ``cutime + cstime`` (the children it has reaped)."""
    seconds: dict[int, float] = {}
    for root in roots:
        for pid in [root, *descendants(root)]:
            if pid in seconds:
                continue
            fields = _stat_fields(pid)
            if fields is None:
                continue  # ended between the walk and this read: its parent's cutime has it, or will
            # After the ')' : state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            seconds[pid] = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
    return seconds


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU seconds used so far by ``roots`` and everything below them (reaped children included)."""
    return sum(tree_cpu_by_process(roots).values())


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGTERM them if the benchmark dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float = 20.0, log: Path | None = None) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"exited with status {process.returncode} before listening on {port}\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout} s") from None
            time.sleep(0.05)


def wait_for_log(
    log: Path, pattern: str, count: int, process: subprocess.Popen[bytes] | None, timeout: float = 30.0
) -> list[re.Match[str]]:
    """Return the matches once ``log`` has ``count`` lines that match the regular expression ``pattern``."""
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = [m for m in map(compiled.search, text.splitlines()) if m]
        if len(found) >= count:
            return found
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before {count} lines matched {pattern!r} in {log}\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(found)} of {count} lines matched {pattern!r} in {log} within {timeout} s\n{text[-3000:]}")
        time.sleep(0.05)


def stop_tree(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop ``process`` and whatever it started: signal it, wait, then kill descendants still alive."""
    tree = descendants(process.pid)
    if process.poll() is None:
        try:
            process.send_signal(sig)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    deadline = time.monotonic() + timeout
    while tree and time.monotonic() < deadline:
        tree = [pid for pid in tree if Path(f"/proc/{pid}").exists() and _stat_fields(pid) and _stat_fields(pid)[0] != "Z"]
        if tree:
            time.sleep(0.05)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory_kib(roots: list[int]) -> tuple[int, int]:
    """RSS and PSS in KiB of ``roots`` and their descendants, summed, from ``/proc/PID/smaps_rollup``
    (PSS divides each shared page among the processes that map it; RSS counts it in each)."""
    rss = pss = 0
    seen: set[int] = set()
    for root in roots:
        for pid in [root, *descendants(root)]:
            if pid in seen:
                continue
            seen.add(pid)
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                name, _, value = line.partition(":")
                if name == "Rss":
                    rss += int(value.split()[0])
                elif name == "Pss":
                    pss += int(value.split()[0])
    return rss, pss


def raise_nofile() -> int:
    """Raise this process's soft ``ulimit -n`` to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
