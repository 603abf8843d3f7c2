"""A real SpamAssassin spamd as a test fixture, run from a site configuration of its own.

``SpamdServer`` writes a site configuration folder (``local.cf`` below, plus the plugin loaders
``*.pre`` copied from the package's ``/etc/spamassassin``; never its ``local.cf``), and runs
``spamd`` in the foreground with the package's rules (``/usr/share/spamassassin``, pinned, so that
rules an ``sa-update`` fetched on this machine do not change the results), listening on a free
127.0.0.1 port and on a Unix socket at once. It is ready when ``PING`` answers ``PONG`` on both,
about 1 s after the start on this kind of machine.

``local.cf`` makes the results deterministic (no DNS, no network tests, no Bayes, no learning) and
sets ``report_safe 1``, SpamAssassin's default, with which a ``PROCESS`` request would wrap spam into
a new MIME message: the hook must not depend on ``PROCESS``.

Running as root (CI, this lab), spamd must be given a user to run as (``--username``): the Debian
package's ``debian-spamd``. That user must be able to read the configuration, which pytest's
``0700`` temporary folders forbid, so as root the server's tree lives in a ``popproxy-spamd-*``
folder of its own in the system temporary directory, linked from the work directory as ``spamd/``;
:meth:`ScannerProcess.close` copies the log back and removes it (``tests/support/dovecot.py`` does
the same). :class:`ScannerProcess` is shared with ``support.rspamd``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

SPAMD = shutil.which("spamd", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
#: The rules the Debian package installs; sa-update's copy in /var/lib/spamassassin is ignored.
RULES = Path("/usr/share/spamassassin")
PLUGIN_LOADERS = Path("/etc/spamassassin")

LOCAL_CF = """\
# popproxy test fixture: deterministic results, no network.
dns_available no
skip_rbl_checks 1
use_razor2 0
use_pyzor 0
use_bayes 0
bayes_auto_learn 0
# SpamAssassin's default: PROCESS would wrap spam in a report message. The hook must not rely on it.
report_safe 1
required_score 5.0
"""

#: https://spamassassin.apache.org/gtube/ : scores 1000, always spam.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class ScannerError(RuntimeError):
    """The scanner could not be configured, started or stopped; the message carries its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ScannerProcess:
    """A scanner daemon run in the foreground, in a process group of its own, from a tree of its own.

    Subclasses name themselves (``name``), say which system user runs them under root
    (``run_as``), write their configuration (:meth:`write_config`), give their command line
    (:meth:`command`) and say when they are ready (:meth:`probe`, raising ``OSError`` until then).
    """

    name = "scanner"
    run_as = "nobody"
    log_name = "scanner.log"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._output: object | None = None
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # The unprivileged user must reach the tree: pytest's folders are 0700 (see the module doc).
            self.root = Path(tempfile.mkdtemp(prefix=f"popproxy-{self.name}-"))
            self.root.chmod(0o755)
            (workdir / self.name).symlink_to(self.root)
            self._own_root = True
        else:
            self.root = workdir / self.name
            self.root.mkdir(parents=True, exist_ok=True)
            self._own_root = False

    # -- for subclasses -------------------------------------------------------------------------

    def write_config(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ping(self, sock: socket.socket) -> None:
        """One liveness request on a connected ``sock``; raise unless the scanner answered it."""
        raise NotImplementedError

    def probe(self) -> None:
        """The scanner answers ``ping`` over TCP and over its Unix socket."""
        with socket.create_connection((self.host, self.port), timeout=5) as tcp:
            self.ping(tcp)
        with socket.socket(socket.AF_UNIX) as unix:
            unix.settimeout(5)
            unix.connect(str(self.socket_path))
            self.ping(unix)

    # -- common ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the TCP listener, as a hook's ``address`` setting takes it."""
        return f"{self.host}:{self.port}"

    @property
    def socket_path(self) -> Path:
        """The Unix socket the scanner listens on as well."""
        return self.root / f"{self.name}.sock"

    @property
    def log_path(self) -> Path:
        return self.root / self.log_name

    def system_user(self) -> pwd.struct_passwd:
        """The user the scanner runs as when started by root."""
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            return pwd.getpwnam("nobody")

    def give(self, *paths: Path) -> None:
        """Make ``paths`` the scanner user's own, when running as root (folders it writes to)."""
        if self.as_root:
            user = self.system_user()
            for path in paths:
                os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start on a free port and return once :meth:`probe` succeeds. A port that another process
        took in the meantime is replaced by a fresh one."""
        if self.running:
            raise ScannerError(f"{self.name} is already running")
        for attempt in range(3):
            self.port = free_port()
            self.socket_path.unlink(missing_ok=True)
            self.write_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._output = output = open(self.root / f"{self.name}.out", "ab")  # noqa: SIM115 (closed in _terminate)
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # its own process group: _terminate can reach every child
            )
            try:
                self._wait_ready(timeout)
                return
            except ScannerError:
                in_use = "in use" in self.log_text()[log_offset:]
                self._terminate()
                if not in_use or attempt == 2:
                    raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ScannerError(
                    f"{self.name} exited with status {self._process.returncode} while starting\n" + self.log_tail()
                )
            try:
                self.probe()
                return
            except OSError as error:
                last_error = error
            if time.monotonic() > deadline:
                raise ScannerError(
                    f"{self.name} was not ready within {timeout} s (last error: {last_error!r})\n" + self.log_tail()
                )
            time.sleep(0.05)

    def log_text(self) -> str:
        texts = []
        for path in (self.log_path, self.root / f"{self.name}.out"):
            if path.exists():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        self._terminate()

    def close(self) -> None:
        """Stop for good. A tree kept outside the work directory is removed, after its logs and
        configuration are copied into the work directory for post-mortems."""
        self.stop()
        if self._own_root and self.root.exists():
            for path in self.root.iterdir():
                if path.is_file() and path.suffix in (".log", ".out", ".cf", ".conf"):
                    shutil.copyfile(path, self.workdir / path.name)
            shutil.rmtree(self.root, ignore_errors=True)
            (self.workdir / self.name).unlink(missing_ok=True)

    def _terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM to the daemon (it stops its children), then wait until its whole process group
        is gone; SIGKILL to the group if that takes longer than ``timeout``."""
        process, self._process = self._process, None
        if process is not None:
            group = process.pid  # start_new_session: the group has the daemon's PID
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                process.wait()
            deadline = time.monotonic() + timeout
            while _group_alive(group):
                if time.monotonic() > deadline:
                    os.killpg(group, signal.SIGKILL)
                    break
                time.sleep(0.02)
        output, self._output = self._output, None
        if output is not None:
            output.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # members that changed user: still there
        return True
    return True


class SpamdServer(ScannerProcess):
    """spamd on ``127.0.0.1:port`` and on ``socket_path``, with :data:`LOCAL_CF` as its site config."""

    name = "spamd"
    run_as = "debian-spamd"
    log_name = "spamd.log"

    def __init__(self, workdir: Path, local_cf: str = LOCAL_CF) -> None:
        super().__init__(workdir)
        self.local_cf = local_cf

    @property
    def site_dir(self) -> Path:
        return self.root / "site"

    def write_config(self) -> None:
        self.site_dir.mkdir(exist_ok=True)
        for loader in sorted(PLUGIN_LOADERS.glob("*.pre")):  # which plugins to load, as packaged
            shutil.copyfile(loader, self.site_dir / loader.name)
        (self.site_dir / "local.cf").write_text(self.local_cf)
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        self.give(home)

    def command(self) -> list[str]:
        assert SPAMD is not None
        argv = [
            SPAMD,
            "--nouser-config",
            "--local",
            f"--listen=127.0.0.1:{self.port}",
            f"--listen={self.socket_path}",
            "--allowed-ips=127.0.0.1",
            "--max-children=2",
            f"--helper-home-dir={self.root / 'home'}",
            f"--siteconfigpath={self.site_dir}",
            f"--pidfile={self.root / 'spamd.pid'}",
            f"--syslog={self.log_path}",
        ]
        if RULES.is_dir():
            argv.append(f"--configpath={RULES}")
        if self.as_root:
            argv.append(f"--username={self.system_user().pw_name}")
        return argv

    def ping(self, sock: socket.socket) -> None:
        """``PING SPAMC/1.5`` must answer ``PONG``."""
        _ping(sock)

    def ask(self, command: str, message: bytes) -> bytes:
        """A raw SPAMC/1.5 request, answered the way spamc would see it (for checking the fixture)."""
        with socket.create_connection((self.host, self.port), timeout=30) as tcp:
            tcp.sendall(f"{command} SPAMC/1.5\r\nContent-length: {len(message)}\r\n\r\n".encode() + message)
            return read_all(tcp)


def _ping(sock: socket.socket) -> None:
    sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
    answer = read_all(sock)
    if b"PONG" not in answer:
        raise ConnectionError(f"no PONG yet: {answer!r}")


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
