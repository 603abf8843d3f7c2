"""The paths a benchmark client can take to the same Dovecot: direct, popproxy, stunnel, nginx, perdition.

Each ``Target`` knows where the client connects (port, TLS or not), how to start and stop whatever
sits in between, and which processes to charge CPU time to. Every server listens on 127.0.0.1 only,
runs in the foreground as a child of the benchmark, and keeps its configuration, logs and PID files in
the benchmark's temporary folder: nothing under /etc is read or written.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from procs import die_with_parent, free_port, stop_tree, wait_for_port

BENCH = Path(__file__).resolve().parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def find(name: str) -> str | None:
    return shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


@dataclass
class Files:
    """The certificate material every front end uses (one throwaway CA for the whole run)."""

    ca: Path  # the CA certificate: what clients (and popproxy, for Dovecot's port 995) trust
    cert_chain: Path  # leaf + CA, for localhost and 127.0.0.1
    key: Path
    combined: Path  # key + chain in one file: popproxy's format


@dataclass
class Target:
    """One path from the client to Dovecot."""

    key: str
    label: str
    client_tls: bool
    describe: str
    port: int = 0
    skip: str | None = None  # why this path cannot run (package missing, failed to start)
    version: str = ""
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    # The processes whose CPU time is the proxy's ([] for direct); ``aux`` is CPU charged separately
    # (nginx's auth_http helper).
    cpu_pids: list[int] = field(default_factory=list)
    aux_pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        """Start whatever sits between client and Dovecot; sets ``skip`` instead of raising."""

    def stop(self) -> None:
        for process in reversed(self._procs):
            stop_tree(process)
        self._procs.clear()

    def _spawn(self, argv: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 (the child owns it)
        process = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        out.close()
        self._procs.append(process)
        return process


class Direct(Target):
    def __init__(self, port: int, tls: bool) -> None:
        if tls:
            super().__init__("direct_tls", "direct TLS (Dovecot :995)", True,
                             "client -> Dovecot's implicit-TLS port (reference: the cost of TLS alone)")
        else:
            super().__init__("direct", "direct (Dovecot plain)", False, "client -> Dovecot's plain port")
        self.port = port


class PopProxy(Target):
    MODES: ClassVar[dict[str, tuple[str, bool, str, str]]] = {
        "plain": ("popproxy plain->plain", False, "none", "none"),
        "tls_plain": ("popproxy TLS->plain", True, "implicit", "none"),
        "tls_tls": ("popproxy TLS->TLS(verified)", True, "implicit", "implicit"),
    }

    def __init__(self, mode: str, workdir: Path, files: Files, dovecot_plain: int, dovecot_tls: int) -> None:
        label, client_tls, listen_tls, upstream_tls = self.MODES[mode]
        super().__init__(f"popproxy_{mode}", label, client_tls,
                         f"twistd -n popproxy; listener tls={listen_tls}, upstream tls={upstream_tls}")
        self.workdir = workdir / f"popproxy-{mode}"
        self.files = files
        self.listen_tls = listen_tls
        self.upstream_tls = upstream_tls
        self.dovecot_plain = dovecot_plain
        self.dovecot_tls = dovecot_tls

    def start(self) -> None:
        import popproxy

        self.version = f"popproxy {popproxy.__version__}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        listener = f'endpoint = "tcp:{self.port}:interface=127.0.0.1"\ntls = "{self.listen_tls}"\n'
        if self.listen_tls != "none":
            listener += f'certificate = "{self.files.combined}"\n'
        if self.upstream_tls == "none":
            upstream = f'address = "127.0.0.1:{self.dovecot_plain}"\ntls = "none"\n'
        else:
            upstream = (f'address = "127.0.0.1:{self.dovecot_tls}"\ntls = "implicit"\n'
                        f'ca = "{self.files.ca}"\nserver_name = "localhost"\n')
        config = self.workdir / "popproxy.toml"
        config.write_text(f"[[listen]]\n{listener}\n[upstream.dovecot]\n{upstream}connect_timeout = 5\n\n"
                          '[routing]\ndefault = "dovecot"\n')
        log = self.workdir / "twistd.log"
        process = self._spawn([TWISTD, "-n", "--pidfile", str(self.workdir / "twistd.pid"), "--logfile", str(log),
                               "popproxy", "-c", str(config)], self.workdir / "stdout.txt", self.workdir)
        wait_for_port(self.port, process, log=log)
        self.cpu_pids = [process.pid]


class Stunnel(Target):
    def __init__(self, workdir: Path, files: Files, dovecot_plain: int) -> None:
        super().__init__("stunnel", "stunnel TLS->plain", True, "stunnel4, [pop3s] accept TLS, connect plain")
        self.workdir = workdir / "stunnel"
        self.files = files
        self.dovecot_plain = dovecot_plain

    def start(self) -> None:
        binary = find("stunnel4") or find("stunnel")
        if binary is None:
            self.skip = "stunnel4 not installed"
            return
        self.version = " ".join(_first_line([binary, "-version"], "stunnel").split()[:2])
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "stunnel.log"
        config = self.workdir / "stunnel.conf"
        # Defaults kept: threads, TCP_NODELAY on both sides, TLS 1.2+ with the distribution's ciphers.
        config.write_text(
            "foreground = yes\n"
            "pid =\n"
            "syslog = no\n"
            f"output = {log}\n"
            "debug = warning\n"
            "[pop3s]\n"
            f"accept = 127.0.0.1:{self.port}\n"
            f"connect = 127.0.0.1:{self.dovecot_plain}\n"
            f"cert = {self.files.cert_chain}\n"
            f"key = {self.files.key}\n"
            "sslVersionMin = TLSv1.2\n"
        )
        process = self._spawn([binary, str(config)], self.workdir / "stdout.txt", self.workdir)
        wait_for_port(self.port, process, log=self.workdir / "stdout.txt")
        self.cpu_pids = [process.pid]


class Nginx(Target):
    MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")

    def __init__(self, workdir: Path, files: Files, dovecot_plain: int) -> None:
        super().__init__("nginx", "nginx mail TLS->plain", True,
                         "nginx + libnginx-mod-mail, listen ssl, pop3_auth plain, auth_http -> bench/auth_http.py")
        self.workdir = workdir / "nginx"
        self.files = files
        self.dovecot_plain = dovecot_plain

    def start(self) -> None:
        binary = find("nginx")
        if binary is None:
            self.skip = "nginx not installed"
            return
        if not self.MODULE.exists():
            self.skip = f"{self.MODULE} missing (Debian package libnginx-mod-mail)"
            return
        self.version = _first_line([binary, "-v"], "nginx")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        auth_port = free_port()
        auth = self._spawn([sys.executable, str(BENCH / "auth_http.py"), str(auth_port), str(self.dovecot_plain)],
                           self.workdir / "auth_http.txt", self.workdir)
        wait_for_port(auth_port, auth, log=self.workdir / "auth_http.txt")
        self.aux_pids = [auth.pid]
        config = self.workdir / "nginx.conf"
        # Debian's stock nginx.conf runs "worker_processes auto" (one per core); everything else
        # not set here is nginx's default (proxy_buffer = one page, 4 KiB).
        config.write_text(
            f"load_module {self.MODULE};\n"
            "user nobody nogroup;\n"
            "worker_processes auto;\n"
            f"pid {self.workdir}/nginx.pid;\n"
            f"lock_file {self.workdir}/nginx.lock;\n"
            f"error_log {self.workdir}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "mail {\n"
            "    server_name localhost;\n"
            f"    auth_http 127.0.0.1:{auth_port}/auth;\n"
            "    proxy_pass_error_message on;\n"
            f"    ssl_certificate {self.files.cert_chain};\n"
            f"    ssl_certificate_key {self.files.key};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port} ssl;\n"
            "        protocol pop3;\n"
            "        pop3_auth plain;\n"
            "    }\n"
            "}\n"
        )
        argv = [binary, "-p", f"{self.workdir}/", "-c", str(config), "-e", f"{self.workdir}/error.log"]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {config}:\n{check.stderr}")
        process = self._spawn([*argv, "-g", "daemon off;"], self.workdir / "stdout.txt", self.workdir)
        wait_for_port(self.port, process, log=self.workdir / "error.log")
        self.cpu_pids = [process.pid]

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful stop; every client is gone by now.
        for process in reversed(self._procs):
            stop_tree(process, signal.SIGQUIT if "nginx" in str(process.args[0]) else signal.SIGTERM)
        self._procs.clear()


class Perdition(Target):
    def __init__(self, workdir: Path, files: Files, dovecot_plain: int, tls: bool) -> None:
        if tls:
            super().__init__("perdition_tls", "perdition TLS->plain", True,
                             "perdition POP3, --ssl_mode ssl_listen, -s Dovecot plain, no popmap")
        else:
            super().__init__("perdition_plain", "perdition plain->plain", False,
                             "perdition POP3, no TLS, -s Dovecot plain, no popmap")
        self.workdir = workdir / self.key
        self.files = files
        self.dovecot_plain = dovecot_plain
        self.tls = tls

    def start(self) -> None:
        binary = find("perdition")
        if binary is None:
            self.skip = "perdition not installed"
            return
        self.version = "perdition " + _perdition_version()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "perdition.conf"
        config.write_text("# empty: everything is on the command line (so /etc/perdition is not read)\n")
        argv = [
            binary, "--no_daemon", "-f", str(config), "-F", "+", "-q",
            "-P", "POP3", "-b", f"127.0.0.1:{self.port}", "-l", str(self.port),
            "-M", "", "-s", f"127.0.0.1:{self.dovecot_plain}", "-n", "--pid_file", "",
            "-u", "nobody", "-g", "nogroup",
        ]
        if self.tls:
            argv += ["--ssl_mode", "ssl_listen", "--ssl_cert_file", str(self.files.cert_chain),
                     "--ssl_key_file", str(self.files.key), "--ssl_listen_min_proto_version", "tlsv1.2"]
        log = self.workdir / "stderr.txt"
        process = self._spawn(argv, log, self.workdir)
        wait_for_port(self.port, process, log=log)
        self.cpu_pids = [process.pid]


def _first_line(argv: list[str], fallback: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return fallback
    for line in (result.stdout + result.stderr).splitlines():
        if line.strip() and "inetd" not in line:
            return line.strip().replace("nginx version: ", "")
    return fallback


def _perdition_version() -> str:
    try:
        text = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "perdition"], capture_output=True,
                              text=True, timeout=10, check=False).stdout
    except OSError:
        text = ""
    return text.strip() or "?"
