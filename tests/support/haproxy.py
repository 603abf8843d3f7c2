"""A real HAProxy as a test fixture, run in the foreground from a configuration in a temporary folder.

The configuration is derived from the shipped ``conf/haproxy.cfg`` by :func:`from_shipped`: its
``global`` section is replaced (no chroot, no user switch, no daemon, no syslog: the test's child
process logs to stdout), and the listening addresses, popproxy's ports and the health-check interval
are replaced by the test's. Everything else (timeouts, ``balance``, the PROXY protocol and health-check
settings) is the shipped file's, so the tests run what admins are given. Each replacement must match
exactly as often as the shipped file is known to contain it, so an edit to the file that the tests no
longer understand fails loudly instead of being tested half-way.

:class:`HAProxyProcess` checks the file with ``haproxy -c -f FILE``, runs ``haproxy -db -f FILE`` as a
child process (never the system configuration or service), and reads server states from its stats
socket (``show stat``, HAProxy's management guide section 9.3), which is also how readiness is known:
connecting to a frontend to probe it would open a session on a popproxy behind it.
"""

from __future__ import annotations

import csv
import ctypes
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

HAPROXY = shutil.which("haproxy", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "haproxy.cfg"

#: The popproxy instances' hosts in the shipped file; each listens on 110 (POP3) and 995 (POP3S).
SHIPPED_SERVERS = ("10.0.5.11", "10.0.5.12")


class HAProxyError(RuntimeError):
    """HAProxy's configuration was refused, or it did not start or become ready; carries its output."""


def haproxy() -> str:
    if HAPROXY is None:
        raise HAProxyError("the haproxy binary was not found (PATH, /usr/sbin): run scripts/setup, which installs it")
    return HAPROXY


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c -f path``: returncode 0 when the file is valid (the output says why otherwise)."""
    return subprocess.run([haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)


def _replace(text: str, old: str, new: str, count: int) -> str:
    found = text.count(old)
    if found != count:
        raise HAProxyError(f"conf/haproxy.cfg: expected {old!r} {count} time(s), found it {found} time(s)")
    return text.replace(old, new)


def from_shipped(
    *,
    pop3_port: int,
    pop3s_port: int,
    servers: Sequence[tuple[int, int]],
    inter: str,
    stats_socket: Path,
    shipped: str | None = None,
) -> str:
    """The shipped configuration on loopback: frontend ports ``pop3_port``/``pop3s_port`` on
    127.0.0.1, the two instances' (POP3, POP3S) listener ports ``servers``, health checks every
    ``inter`` (an HAProxy time, e.g. ``"300ms"``), and a stats socket at ``stats_socket``. The
    servers' hosts become 127.0.0.1."""
    text = SHIPPED.read_text() if shipped is None else shipped
    if len(servers) != len(SHIPPED_SERVERS):
        raise ValueError(f"the shipped file has {len(SHIPPED_SERVERS)} servers per backend")
    head, sep, rest = text.partition("\nglobal\n")
    body = rest[rest.index("\ndefaults\n") :] if sep else ""
    if not sep or not body:
        raise HAProxyError("conf/haproxy.cfg: no global section followed by a defaults section")
    own_global = (
        "\nglobal\n"
        "    # tests/support/haproxy.py: in the foreground (-db), logging to stdout, no chroot or user switch.\n"
        "    log stdout format raw local0 info\n"
        f"    stats socket {stats_socket} mode 600 level admin\n"
        "    maxconn 1000\n"
    )
    text = head + own_global + body
    text = _replace(text, "    bind :110\n", f"    bind 127.0.0.1:{pop3_port}\n", 1)
    text = _replace(text, "    bind :995\n", f"    bind 127.0.0.1:{pop3s_port}\n", 1)
    text = _replace(text, "{ dst_port 995 }", f"{{ dst_port {pop3s_port} }}", 1)
    for host, (plain, tls) in zip(SHIPPED_SERVERS, servers, strict=True):
        text = _replace(text, f" {host}:110\n", f" 127.0.0.1:{plain}\n", 1)
        text = _replace(text, f" {host}:995\n", f" 127.0.0.1:{tls}\n", 1)
    return _replace(text, " inter 5s ", f" inter {inter} ", 2)


class HAProxyProcess:
    """``haproxy -db -f FILE`` with ``config`` written to ``workdir/haproxy.cfg``; its stdout and
    stderr (the log, since the derived configuration logs to stdout) go to ``workdir/haproxy.log``.

    :param stats_socket: the ``stats socket`` path the configuration names: readiness and
        :meth:`servers` use it.
    """

    def __init__(self, workdir: Path, config: str, stats_socket: Path) -> None:
        self.workdir = workdir
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.stats_socket = stats_socket
        self.config_path.write_text(config)
        self._process: subprocess.Popen[bytes] | None = None
        self._output: BinaryIO | None = None

    def start(self, timeout: float = 20.0) -> None:
        checked = check_config(self.config_path)
        if checked.returncode != 0:
            raise HAProxyError(f"haproxy -c refused {self.config_path}:\n{checked.stdout}{checked.stderr}")
        self._output = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop())
        self._process = subprocess.Popen(
            [haproxy(), "-db", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only prctl)
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise HAProxyError(f"haproxy exited with status {self._process.returncode}:\n{self.log()}")
            try:
                # The stats socket answers once the polling loop runs, after every listener is bound.
                self.command("show info")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise HAProxyError(f"haproxy's stats socket did not answer within {timeout} s:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # hard stop: close every connection and exit
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> HAProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self, line: str) -> str:
        """One command on the stats socket (non-interactive mode: it answers, then closes)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> list[dict[str, str]]:
        """``show stat`` rows of the servers (not the FRONTEND/BACKEND summary rows): ``pxname``,
        ``svname``, ``status`` ("UP", "DOWN", ...), ``check_status`` (of the last finished check:
        "L7OK" once a tcp-check expect rule matched), ``chkfail``, ``stot`` (sessions sent to it), ...

        HAProxy puts "* " before ``check_status`` while a check is running; it is removed here."""
        text = self.command("show stat").lstrip("# ")
        rows = [row for row in csv.DictReader(io.StringIO(text)) if row.get("svname") not in ("FRONTEND", "BACKEND")]
        for row in rows:
            row["check_status"] = row.get("check_status", "").removeprefix("* ")
        return rows

    def wait_all_up(self, timeout: float = 20.0) -> list[dict[str, str]]:
        """Wait until every server is UP after a passed check (``check_status`` L7OK); the rows."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.servers()
            if rows and all(r["status"] == "UP" and r["check_status"] == "L7OK" for r in rows):
                return rows
            if time.monotonic() > deadline:
                states = [(r["pxname"], r["svname"], r["status"], r["check_status"], r.get("last_chk")) for r in rows]
                raise HAProxyError(f"servers not all up after {timeout} s: {states}\n{self.log()[-3000:]}")
            time.sleep(0.1)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM HAProxy if the test process dies (``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
