"""A real Dovecot 2.3 POP3 server as a test fixture, run from its own configuration.

``DovecotServer`` writes a self-contained configuration (it never includes ``/etc/dovecot``), a
passwd-file and one maildir per user into a work directory, runs ``dovecot -F -c FILE`` as a child
process and waits until the plain (STLS-capable) and implicit-TLS listeners both greet. The
comments in ``render_config`` say why each setting is there.

Facts this module relies on, checked against Dovecot 2.3.19 (and asserted by
``tests/test_dovecot_fixture.py``):

- ``RETR`` returns the stored file with each bare LF turned into CRLF, dot-stuffed; ``LIST``/``STAT``
  count octets with CRLF line endings before stuffing (the maildir ``W=`` size). Messages are stored
  the way a Unix MTA stores them, with LF line endings, and ``S=``/``W=`` in the file name.
- POP3 message numbers follow maildir UIDs. This module writes ``dovecot-uidlist`` itself, so message
  ``n`` has UID ``n`` and the UIDVALIDITY is fixed per user: ``UIDL`` values are predictable
  (``pop3_uidl_format = %08Xu%08Xv``) and survive :meth:`DovecotServer.reset_user`.
- A passwd-file is re-read when it changes, but at most once a second; one file per user makes a
  user added while the server runs known at once.

Running as root (CI, this lab), mail belongs to the system ``mail`` user: Dovecot refuses mail access
as UID 0, and its auth and login processes run as ``dovecot``/``dovenull``. They must all be able to
reach the files, which pytest's ``0700`` temporary folders forbid (and pytest resets any folder mode we
would loosen whenever another session starts). So as root, unless the work directory is reachable
already, the server's tree lives in its own ``popproxy-dovecot-*`` folder in the system temporary
directory, linked from the work directory as ``dovecot/``; :meth:`DovecotServer.close` copies the log
and the configuration back and removes it. Running as an ordinary user, every process and every file
is that user's and the tree is the work directory itself.
"""

from __future__ import annotations

import ctypes
import grp
import hashlib
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

from popproxy.pki import CertificateAuthority, IssuedCertificate, write_private

from .mailbox import check_wire_form, to_lf

DOVECOT = shutil.which("dovecot", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")

# Maildir file names: "<seconds>.M<microseconds>P<pid>.<host>,S=<size>,W=<vsize>:2," (maildir++).
_MAILDIR_EPOCH = 1_700_000_000
_MAILDIR_HOST = "popproxy-fixture"
# Longest path a Unix socket can have (sun_path) minus room for Dovecot's socket names under base_dir.
_MAX_BASE_DIR = 107 - len("/login/ipc-proxy") - 8
# verbose_proctitle of a logged-in session: "dovecot-<instance>/pop3 [<user> <ip> <command>]".
_POP3_TITLE = re.compile(rb"\S*/pop3 \[(\S+) ")


class DovecotError(RuntimeError):
    """Dovecot could not be configured, started or stopped; the message carries its log."""


@dataclass
class MailUser:
    """A POP3 account and the messages ``RETR 1``, ``RETR 2``, ... must return, in that order."""

    name: str
    password: str
    messages: list[bytes]
    uidvalidity: int = field(default=0, repr=False)

    @property
    def sizes(self) -> list[int]:
        """``LIST`` sizes: octets with CRLF line endings, before dot-stuffing (RFC 1939 §5)."""
        return [len(m) for m in self.messages]

    @property
    def total_size(self) -> int:
        """The second number of ``STAT``."""
        return sum(self.sizes)

    @property
    def uidls(self) -> list[str]:
        """``UIDL`` values for ``pop3_uidl_format = %08Xu%08Xv`` (Dovecot 2.3 writes %X in lower case)."""
        return [f"{uid:08x}{self.uidvalidity:08x}" for uid in range(1, len(self.messages) + 1)]

    @property
    def largest(self) -> int:
        """The message number (1-based) of the biggest message, e.g. for tests that cut a RETR."""
        return max(range(len(self.messages)), key=lambda i: len(self.messages[i])) + 1


@dataclass(frozen=True)
class _Identity:
    """Who owns what: the mail user, and the users Dovecot's own processes run as."""

    mail_uid: int
    mail_gid: int
    internal_user: str  # auth, anvil, stats, log: reads the passwd-file
    login_user: str  # pop3-login
    as_root: bool


class DovecotServer:
    """A Dovecot POP3 server on 127.0.0.1 with plain+STLS and implicit-TLS listeners.

    :param workdir: the server's tree: configuration, certificate, passwd-files, maildirs, ``run/``
        (``base_dir``), ``state/`` and ``dovecot.log``; created if missing. As root, see the module
        docstring: the tree may be :attr:`root`, linked from here.
    :param leaf: the server certificate (for ``localhost`` and ``127.0.0.1``); one is issued from
        ``ca`` (or a new throwaway CA) when not given. :attr:`ca_pem` is its issuer.
    :param max_sessions: how many POP3 sessions may be logged in at once, from one user and one IP
        included (``mail_max_userip_connections``); the process and client limits follow from it.
    :param auth_failure_delay: seconds Dovecot waits before answering a failed login. Dovecot's
        default is 2; the fixture uses 0 so that tests of wrong passwords stay fast (Dovecot still
        answers failures from a queue it checks every 0.5 s).
    :param auth_penalty: turn on the anvil "auth penalty": after failed logins from one client IP,
        Dovecot delays that IP's next logins by 4, 8, then 15 s (``auth_penalty_to_secs`` in
        src/auth/auth-penalty.c: 2 s doubled per failure, at most 15; a success resets it). Off by
        default: every test connects from 127.0.0.1.
    :param trusted_networks: ``login_trusted_networks`` (e.g. ``"127.0.0.0/8"``): clients from there
        may send XCLIENT, and Dovecot then advertises it. Off by default, as for a plain upstream.
    :param haproxy_trusted_networks: when given, two more listeners that expect a PROXY protocol
        header (``haproxy = yes``) from these networks: :attr:`proxy_port` (plain and STLS) and
        :attr:`proxy_tls_port` (implicit TLS; the header comes before the ClientHello). Both 0
        without it.
    :param mail_user: the system user that owns the mail when running as root (default ``mail``).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        leaf: IssuedCertificate | None = None,
        ca: CertificateAuthority | None = None,
        max_sessions: int = 500,
        auth_failure_delay: int = 0,
        auth_penalty: bool = False,
        trusted_networks: str | None = None,
        haproxy_trusted_networks: str | None = None,
        mail_user: str = "mail",
        instance_name: str | None = None,
    ) -> None:
        _dovecot()  # fail early, with the hint
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._identity = _identity(mail_user)
        self._internal_gid = pwd.getpwnam(self._identity.internal_user).pw_gid
        self._own_root = self._identity.as_root and not _reachable_by_others(self.workdir)
        if self._own_root:
            self.root = _make_own_root()
            link = self.workdir / "dovecot"
            if link.is_symlink():
                link.unlink()
            link.symlink_to(self.root, target_is_directory=True)
        else:
            self.root = self.workdir
        if leaf is None:
            leaf = (ca or CertificateAuthority.create()).issue(["localhost", "127.0.0.1"])
        self.leaf = leaf
        self.ca_pem: bytes = leaf.chain_pem[len(leaf.cert_pem) :]
        self.max_sessions = max_sessions
        self.auth_failure_delay = auth_failure_delay
        self.auth_penalty = auth_penalty
        self.trusted_networks = trusted_networks
        self.haproxy_trusted_networks = haproxy_trusted_networks
        self.instance_name = instance_name or f"popproxy-test-{os.getpid()}-{id(self):x}"
        self.plain_port = 0
        self.tls_port = 0
        self.proxy_port = 0
        self.proxy_tls_port = 0
        self.users: dict[str, MailUser] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: BinaryIO | None = None

        self.config_path = self.root / "dovecot.conf"
        self.passwd_dir = self.root / "passwd.d"
        self.log_path = self.root / "dovecot.log"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.home_root = self.root / "home"
        self.tls_dir = self.root / "tls"
        if len(str(self.base_dir)) > _MAX_BASE_DIR:
            raise DovecotError(
                f"work directory path too long for Dovecot's Unix sockets "
                f"({len(str(self.base_dir))} > {_MAX_BASE_DIR} chars): {self.base_dir}"
            )
        self._prepare_tree()

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def master_pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def start(self, timeout: float = 30.0) -> None:
        """Run ``dovecot -F`` and return once both listeners answer with a greeting.

        Ports are picked on the first start (bind port 0 on 127.0.0.1, read it, close) and kept for
        restarts. If another process takes a picked port first, fresh ports are tried.
        """
        if self.running:
            raise DovecotError("Dovecot is already running")
        for attempt in range(3):
            if not self.plain_port or attempt:
                self.plain_port, self.tls_port = _free_ports(2)
                if self.haproxy_trusted_networks is not None:
                    # Not probed by _wait_ready (they greet only after a header); the same
                    # pop3-login service listens on all four, so two answering means four bound.
                    self.proxy_port, self.proxy_tls_port = _free_ports(2, avoid=(self.plain_port, self.tls_port))
            self._write_config()
            self._check_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            # Held open while Dovecot runs; closed by _terminate().
            self._stderr = open(self.root / "dovecot.stderr", "ab")  # noqa: SIM115
            self._process = subprocess.Popen(
                [_dovecot(), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                cwd=self.root,
                preexec_fn=_prepare_child,  # noqa: PLW1509 (only prctl and setrlimit)
            )
            try:
                self._wait_ready(timeout)
                return
            except DovecotError:
                in_use = "Address already in use" in self.log_text()[log_offset:]
                self._terminate()
                if not in_use:
                    raise
        raise DovecotError("could not find free ports for Dovecot\n" + self._log_tail())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the master (SIGTERM; it ends every child, sessions included) and wait for them all."""
        self._terminate(timeout)

    def close(self) -> None:
        """Stop for good. A tree kept outside the work directory is removed, after its log,
        stderr and configuration are copied into the work directory for post-mortems."""
        self.stop()
        if self._own_root and self.root.exists():
            for name in ("dovecot.log", "dovecot.stderr", "dovecot.conf"):
                if (self.root / name).exists():
                    shutil.copyfile(self.root / name, self.workdir / name)
            shutil.rmtree(self.root)
            (self.workdir / "dovecot").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _terminate(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is not None:
            children = _descendants(process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            # Children notice the master's death through a pipe; wait so the ports are really free.
            # Checking the title as well as the PID means a recycled PID is never waited on or killed.
            title = f"{self.instance_name}/".encode()
            deadline = time.monotonic() + timeout
            while children and time.monotonic() < deadline:
                children = [pid for pid in children if title in _cmdline(pid)]
                if children:
                    time.sleep(0.02)
            for pid in children:
                if title in _cmdline(pid):
                    _kill(pid)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _wait_ready(self, timeout: float) -> None:
        context = self.client_context()
        pending = {"plain", "tls"}
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while pending:
            assert self._process is not None
            if self._process.poll() is not None:
                raise DovecotError(
                    f"dovecot exited with status {self._process.returncode} while starting\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"dovecot did not greet on {sorted(pending)} within {timeout} s "
                    f"(last error: {last_error!r})\n" + self._log_tail()
                )
            for which in sorted(pending):
                try:
                    self._probe(which, context)
                    pending.discard(which)
                except OSError as e:
                    last_error = e
            if pending:
                time.sleep(0.05)

    def _probe(self, which: str, context: ssl.SSLContext) -> None:
        port = self.plain_port if which == "plain" else self.tls_port
        with socket.create_connection((self.host, port), timeout=2) as raw:
            sock: socket.socket = raw
            if which == "tls":
                sock = context.wrap_socket(raw, server_hostname="localhost")
            try:
                greeting = sock.recv(512)
                if not greeting.startswith(b"+OK"):
                    raise ConnectionError(f"unexpected greeting {greeting!r}")
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            finally:
                if sock is not raw:
                    sock.close()

    # --- clients' view ---------------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts this server's CA and checks the host name."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))

    @property
    def ca_path(self) -> Path:
        """The CA certificate as a file, for clients that want a path (curl, fetchmail, poplib)."""
        return self.tls_dir / "ca.pem"

    def log_text(self) -> str:
        """Dovecot's log (errors and info lines both go to ``dovecot.log``)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        stderr = self.root / "dovecot.stderr"
        if stderr.exists():
            text += stderr.read_text(errors="replace")
        return "--- dovecot log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # --- users and mail --------------------------------------------------------------------------

    def add_user(self, name: str, password: str, messages: list[bytes]) -> MailUser:
        """Create (or replace) an account with its maildir; works while Dovecot runs.

        The maildir is written first and the passwd-file swapped in last, so a login never sees a
        half-written mailbox.
        """
        for label, value in (("user name", name), ("password", password)):
            if not value or any(c in value for c in ":\r\n\0") or value != value.strip():
                raise ValueError(f"{label} {value!r} cannot go in a passwd-file")
        if "/" in name or name in (".", ".."):
            raise ValueError(f"user name {name!r} cannot be a directory name")
        for message in messages:
            check_wire_form(message)
        user = MailUser(name, password, list(messages), uidvalidity=_uidvalidity(name))
        self._write_maildir(user)
        self.users[name] = user
        self._write_passwd(user)
        return user

    def reset_user(self, name: str) -> None:
        """Put the user's original messages back (after a test's ``DELE``), UIDs and UIDLs unchanged.

        No session of that user may be open: Dovecot would see its mailbox vanish underneath it.
        """
        self._write_maildir(self.users[name])

    def home(self, name: str) -> Path:
        return self.home_root / name

    def maildir(self, name: str) -> Path:
        return self.home(name) / "Maildir"

    def pop3_pids(self, user: str) -> list[int]:
        """PIDs of the logged-in ``pop3`` processes of ``user``, for tests that kill one mid-RETR.

        With ``verbose_proctitle = yes`` Dovecot titles them
        ``dovecot-<instance_name>/pop3 [<user> <ip> <command>]``; only children of this server's
        master are considered. A process appears once the login has succeeded.
        """
        master = self.master_pid
        if master is None:
            return []
        pids = []
        for pid in _children(master):
            match = _POP3_TITLE.match(_cmdline(pid))
            if match and match.group(1) == user.encode():
                pids.append(pid)
        return sorted(pids)

    # --- files -----------------------------------------------------------------------------------

    def _prepare_tree(self) -> None:
        ident = self._identity
        for path in (self.home_root, self.tls_dir):
            path.mkdir(mode=0o755, exist_ok=True)
            path.chmod(0o755)
        self.passwd_dir.mkdir(mode=0o750, exist_ok=True)
        self.passwd_dir.chmod(0o750)
        if ident.as_root:
            os.chown(self.passwd_dir, 0, self._internal_gid)
        write_private(self.tls_dir / "cert.pem", self.leaf.chain_pem)
        write_private(self.tls_dir / "key.pem", self.leaf.key_pem)
        (self.tls_dir / "ca.pem").write_bytes(self.ca_pem)

    def _passwd_file(self, name: str) -> Path:
        """One passwd-file per user, named by the MD5 of the name (``%Mu`` in the config).

        Dovecot re-reads a passwd-file when its mtime or size changed, but checks at most once per
        second (``passwd_file_sync`` in ``src/auth/db-passwd-file.c``), so a user appended to a shared
        file could stay unknown for up to a second. A new file for a new user is read at once.
        """
        return self.passwd_dir / hashlib.md5(name.encode()).hexdigest()

    def _write_passwd(self, user: MailUser) -> None:
        """``user:{PLAIN}password:uid:gid::home::``, replaced atomically."""
        ident = self._identity
        path = self._passwd_file(user.name)
        line = f"{user.name}:{{PLAIN}}{user.password}:{ident.mail_uid}:{ident.mail_gid}::{self.home(user.name)}::\n"
        previous_mtime = int(path.stat().st_mtime) if path.exists() else None
        tmp = path.with_suffix(".tmp")
        write_private(tmp, line.encode())
        if ident.as_root:
            # The auth process runs as the internal user and reads the file itself.
            os.chown(tmp, 0, self._internal_gid)
            tmp.chmod(0o640)
        if previous_mtime is not None:
            # A changed account: give it a later mtime, then let Dovecot's once-a-second check pass.
            mtime = max(int(time.time()), previous_mtime + 1)
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
        if previous_mtime is not None and self.running:
            time.sleep(max(0.0, mtime + 1 - time.time()))

    def _write_maildir(self, user: MailUser) -> None:
        """A fresh maildir: messages in ``cur/`` plus a ``dovecot-uidlist`` that fixes UID n = n.

        Files are stored with LF line endings, as delivered by an MTA; ``S=`` is the size on disk,
        ``W=`` the CRLF size that ``LIST`` reports.
        """
        ident = self._identity
        home = self.home(user.name)
        maildir = home / "Maildir"
        if maildir.exists():
            shutil.rmtree(maildir)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        uidlist = [f"3 V{user.uidvalidity} N{len(user.messages) + 1} G{_guid(user.name)}\n"]
        for number, message in enumerate(user.messages, start=1):
            stored = to_lf(message)
            base = f"{_MAILDIR_EPOCH + number}.M{number:06d}P{number}.{_MAILDIR_HOST}"
            path = maildir / "cur" / f"{base},S={len(stored)},W={len(message)}:2,"
            path.write_bytes(stored)
            os.utime(path, (_MAILDIR_EPOCH + number, _MAILDIR_EPOCH + number))
            uidlist.append(f"{number} :{base},S={len(stored)},W={len(message)}\n")
        (maildir / "dovecot-uidlist").write_text("".join(uidlist))
        home.chmod(0o700)
        for path in [home, *home.rglob("*")]:
            os.chown(path, ident.mail_uid, ident.mail_gid)

    def _write_config(self) -> None:
        self.config_path.write_text(self.render_config())

    def render_config(self) -> str:
        """The complete ``dovecot.conf``; nothing comes from ``/etc/dovecot``."""
        ident = self._identity
        n = self.max_sessions
        lines = [
            "# Written by tests/support/dovecot.py; self-contained, the system configuration is not read.",
            f"instance_name = {self.instance_name}",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.state_dir}",
            f"log_path = {self.log_path}",
            f"info_log_path = {self.log_path}",
            f"debug_log_path = {self.log_path}",
            "protocols = pop3",
            f"listen = {self.host}",
            f"default_internal_user = {ident.internal_user}",
            f"default_internal_group = {grp.getgrgid(self._internal_gid).gr_name}",
            f"default_login_user = {ident.login_user}",
            "",
            "ssl = yes",
            f"ssl_cert = <{self.tls_dir / 'cert.pem'}",
            f"ssl_key = <{self.tls_dir / 'key.pem'}",
            "ssl_min_protocol = TLSv1.2",
            "",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            f"auth_failure_delay = {self.auth_failure_delay} secs",
            f"login_trusted_networks = {self.trusted_networks or ''}",
            "# One file per user, named by the MD5 of the user name: see _passwd_file().",
            "passdb {",
            "  driver = passwd-file",
            f"  args = {self.passwd_dir}/%Mu",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {self.passwd_dir}/%Mu",
            "}",
            "",
            "mail_location = maildir:~/Maildir",
            f"first_valid_uid = {ident.mail_uid}",
            f"last_valid_uid = {ident.mail_uid}",
            f"first_valid_gid = {ident.mail_gid}",
            f"last_valid_gid = {ident.mail_gid}",
            "verbose_proctitle = yes",
            "",
            "# Many concurrent sessions (soak tests): one pop3 process per session.",
            f"default_process_limit = {max(100, n + 10)}",
            f"default_client_limit = {max(1000, 4 * n)}",
            f"mail_max_userip_connections = {n}",
            "",
            "protocol pop3 {",
            "  pop3_no_flag_updates = yes",
            "  pop3_uidl_format = %08Xu%08Xv",
            f"  mail_max_userip_connections = {n}",
            "}",
            "",
            "service pop3-login {",
            "  inet_listener pop3 {",
            f"    address = {self.host}",
            f"    port = {self.plain_port}",
            "  }",
            "  inet_listener pop3s {",
            f"    address = {self.host}",
            f"    port = {self.tls_port}",
            "    ssl = yes",
            "  }",
            *self._haproxy_listeners(),
            "  service_count = 0",  # high-performance mode: a few login processes serve everyone
            f"  process_min_avail = {min(4, os.cpu_count() or 1)}",
            f"  client_limit = {max(1000, 2 * n)}",
            *([] if ident.as_root else ["  chroot ="]),
            "}",
            "service pop3 {",
            f"  process_limit = {n + 10}",
            "}",
        ]
        if self.haproxy_trusted_networks is not None:
            lines.insert(lines.index("ssl = yes"), f"haproxy_trusted_networks = {self.haproxy_trusted_networks}")
        if self.auth_penalty:
            lines += [
                "# The anvil auth penalty as Dovecot ships it (only the chroot differs, below).",
                "service anvil {",
                *([] if ident.as_root else ["  chroot ="]),
                "}",
            ]
            return "\n".join(lines) + "\n"
        lines += [
            "# No auth penalty: by default anvil delays each login from an IP by 2, 4, 8, 15 s after",
            "# failures, and every test connects from 127.0.0.1. The auth process cannot open a",
            "# mode-0 socket, and then disables the penalty (src/auth/auth-penalty.c).",
            "service anvil {",
            "  unix_listener anvil-auth-penalty {",
            "    mode = 0",
            "  }",
            *([] if ident.as_root else ["  chroot ="]),
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _haproxy_listeners(self) -> list[str]:
        """Listeners that read a PROXY header first (``haproxy = yes``), when asked for."""
        if self.haproxy_trusted_networks is None:
            return []
        return [
            "  inet_listener pop3-haproxy {",
            f"    address = {self.host}",
            f"    port = {self.proxy_port}",
            "    haproxy = yes",
            "  }",
            "  inet_listener pop3s-haproxy {",
            f"    address = {self.host}",
            f"    port = {self.proxy_tls_port}",
            "    ssl = yes",
            "    haproxy = yes",
            "  }",
        ]

    def _check_config(self) -> None:
        doveconf = Path(_dovecot()).with_name("doveconf")
        if not doveconf.exists():
            doveconf = Path(shutil.which("doveconf") or "doveconf")
        result = subprocess.run(
            [str(doveconf), "-c", str(self.config_path), "-n"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise DovecotError(f"doveconf rejected {self.config_path}:\n{result.stderr}")


# --- helpers ---------------------------------------------------------------------------------------


def _dovecot() -> str:
    if DOVECOT is None:
        raise DovecotError(
            "the dovecot binary was not found (looked in PATH and /usr/sbin): run scripts/test, "
            "which installs dovecot-core and dovecot-pop3d through scripts/setup"
        )
    return DOVECOT


def _identity(mail_user: str) -> _Identity:
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(mail_user)
        except KeyError:
            raise DovecotError(
                f"no system user {mail_user!r} to own the test mail; create one "
                f"(useradd --system {mail_user}) or pass mail_user="
            ) from None
        for needed in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(needed)
            except KeyError:
                raise DovecotError(f"system user {needed!r} missing: is dovecot-core installed?") from None
        return _Identity(entry.pw_uid, entry.pw_gid, "dovecot", "dovenull", as_root=True)
    me = pwd.getpwuid(os.getuid()).pw_name
    return _Identity(os.getuid(), os.getgid(), me, me, as_root=False)


def _reachable_by_others(path: Path) -> bool:
    """Whether every folder from / down to ``path`` lets other users pass (``o+x``)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


_OWN_ROOT_PREFIX = "popproxy-dovecot-"


def _make_own_root() -> Path:
    """A fresh ``popproxy-dovecot-*`` folder in the temporary directory that others may pass
    through (``0711``), after removing those left by test runs that died without ``close()``."""
    tmp = Path(tempfile.gettempdir()).resolve()
    if not _reachable_by_others(tmp):
        raise DovecotError(
            f"{tmp} is closed to other users, so Dovecot's unprivileged processes could not reach "
            f"its files; set TMPDIR to a folder they can pass through (such as /tmp)"
        )
    for stale in tmp.glob(_OWN_ROOT_PREFIX + "*"):
        try:
            owner = int((stale / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=_OWN_ROOT_PREFIX, dir=tmp))
    root.chmod(0o711)
    (root / "owner.pid").write_text(f"{os.getpid()}\n")
    return root


def _prepare_child() -> None:
    """In the child before exec: SIGTERM Dovecot if the test process dies without stopping it
    (``PR_SET_PDEATHSIG``), so no orphaned server outlives a killed test run; and raise the soft
    ``ulimit -n`` to the hard one, for hundreds of sessions (Dovecot warns when it is low)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    sockets = []
    try:
        while len(sockets) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in avoid:
                s.close()
                continue
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _uidvalidity(name: str) -> int:
    """A fixed, non-zero UIDVALIDITY per user name (RFC 3501 requires non-zero)."""
    return (zlib.crc32(name.encode()) & 0x7FFFFFFF) or 1


def _guid(name: str) -> str:
    return f"{zlib.crc32(b'guid:' + name.encode()):08x}" * 4


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _children(parent: int) -> list[int]:
    result = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) == parent:
            result.append(int(entry))
    return result


def _descendants(root: int) -> list[int]:
    found: list[int] = []
    frontier = [root]
    while frontier:
        children = [c for p in frontier for c in _children(p)]
        found += children
        frontier = children
    return found


def _cmdline(pid: int) -> bytes:
    """The process title, or ``b""`` once the process is gone (a zombie has an empty one)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
