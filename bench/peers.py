"""The paths a benchmark client can take to the same Dovecot: direct, popproxy, stunnel, nginx, perdition,
HAProxy, the Twisted floor, and popproxy with a hook (workload F, with its own spamd for the spam hook).

Each ``Target`` knows where the client connects (port, TLS or not), how to start and stop whatever
sits in between, and which processes to charge CPU time to. Every server listens on 127.0.0.1 only,
runs in the foreground as a child of the benchmark, and keeps its configuration, logs and PID files in
the benchmark's temporary folder: nothing under /etc is read or written.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from procs import descendants, die_with_parent, free_port, stop_tree, wait_for_log, wait_for_port
from workloads import Rewritten

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
    # (nginx's auth_http helper, spamd), described by ``aux_name``.
    cpu_pids: list[int] = field(default_factory=list)
    aux_pids: list[int] = field(default_factory=list)
    aux_name: str = ""
    workloads: str = "ABCD"  # the workloads this path takes part in
    # What RETR returns on this path: None, the generated message byte for byte; else the header
    # fields hooks put on top of it (workload F's rewriting hooks).
    rewritten: Rewritten | None = None

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

    #: How the parent logs that a worker serves (text of the ``worker_ready`` event in twistd's log file,
    #: which has no event names: ``--logfile`` writes the classic text format).
    WORKER_READY = r"\[popproxy\.workers#info\] worker (\d+) \(pid (\d+)\) is serving"
    WORKER_DIED = r"\[popproxy\.workers#warn\] worker (\d+) \(pid (\d+)\) ended"

    def __init__(self, mode: str, workdir: Path, files: Files, dovecot_plain: int, dovecot_tls: int,
                 workers: int = 1) -> None:
        label, client_tls, listen_tls, upstream_tls = self.MODES[mode]
        super().__init__(f"popproxy_{mode}", label, client_tls,
                         f"twistd -n popproxy; listener tls={listen_tls}, upstream tls={upstream_tls}")
        self.workers = workers  # [process] workers
        self.worker_pids: dict[int, int] = {}  # worker index -> PID, as the parent logged them
        if workers > 1:
            # Only A to D: E and F keep their single-process reference row.
            self.key = "popproxy_w2" if (mode, workers) == ("tls_plain", 2) else f"popproxy_{mode}_w{workers}"
            self.label = f"{label}, {workers} workers"
            self.describe += f", [process] workers = {workers}"
        elif mode == "tls_plain":
            self.workloads = "ABCDEF"  # F's reference: the same fetch without a hook; E: idle sessions
        # Workload E holds thousands of sessions from 127.0.0.1: when set, ``[limits]`` lets that many in.
        self.max_sessions = 0
        self.workdir = workdir / (f"popproxy-{mode}" if workers == 1 else f"popproxy-{mode}-w{workers}")
        self.files = files
        self.listen_tls = listen_tls
        self.upstream_tls = upstream_tls
        self.dovecot_plain = dovecot_plain
        self.dovecot_tls = dovecot_tls

    def hooks(self) -> str:
        """``[[hook]]`` tables for the configuration: none, popproxy as a plain relay."""
        return ""

    def routing(self) -> str:
        """The ``[routing]`` table: every user to the one Dovecot."""
        return '[routing]\ndefault = "dovecot"\n'

    def limits(self) -> str:
        """``[limits]`` for workload E (``max_sessions`` set): room for that many sessions in all, from
        one address and per user, and login and idle timeouts no session reaches; else the defaults."""
        n = self.max_sessions
        if not n:
            return ""
        return (f"\n[limits]\nmax_sessions = {n}\nmax_sessions_per_ip = {n}\nmax_sessions_per_user = {n}\n"
                "login_timeout = 300\nidle_timeout = 900\n")

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
                          + self.routing() + f"\n[process]\nworkers = {self.workers}\n"
                          + self.limits() + self.hooks())
        log = self.workdir / "twistd.log"
        process = self._spawn([TWISTD, "-n", "--pidfile", str(self.workdir / "twistd.pid"), "--logfile", str(log),
                               "popproxy", "-c", str(config)], self.workdir / "stdout.txt", self.workdir)
        wait_for_port(self.port, process, log=log)
        if self.workers > 1:
            # The parent binds the port before its workers adopt it: connections queue in the backlog
            # until then. Ready is every worker logged as serving, and greetings on fresh connections.
            ready = wait_for_log(log, self.WORKER_READY, self.workers, process)
            self.worker_pids = {int(m[1]): int(m[2]) for m in ready}
            children = set(descendants(process.pid))
            if not set(self.worker_pids.values()) <= children:
                raise RuntimeError(f"workers {self.worker_pids} logged as serving are not all children of {process.pid}")
            context = ssl.create_default_context(cafile=str(self.files.ca)) if self.client_tls else None
            for _ in range(2 * self.workers):
                raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
                with sock, sock.makefile("rb") as answers:
                    greeting = answers.readline()
                    if not greeting.startswith(b"+OK"):
                        raise RuntimeError(f"greeting {greeting!r} from {self.label}")
                    sock.sendall(b"QUIT\r\n")
                    answers.readline()
        # CPU: the whole process tree (procs.tree_cpu_seconds), so the workers, children of twistd, too.
        self.cpu_pids = [process.pid]

    def log_report(self) -> dict[str, int]:
        """What twistd's log says about the run: lines at error or critical level, warnings, workers
        that ended while the proxy ran (each is started again), workers that came up in all."""
        log = self.workdir / "twistd.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = text.splitlines()
        return {
            "errors": sum(1 for line in lines if "#error]" in line or "#critical]" in line),
            "warnings": sum(1 for line in lines if "#warn]" in line),
            "worker_restarts": sum(1 for line in lines if re.search(self.WORKER_DIED, line)),
            "workers_ready": sum(1 for line in lines if re.search(self.WORKER_READY, line)),
        }


class Stunnel(Target):
    def __init__(self, workdir: Path, files: Files, dovecot_plain: int) -> None:
        super().__init__("stunnel", "stunnel TLS->plain", True, "stunnel4, [pop3s] accept TLS, connect plain",
                         workloads="ABCDE")
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
        self.aux_name = "Python auth_http helper"
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


class Haproxy(Target):
    def __init__(self, workdir: Path, files: Files, dovecot_plain: int) -> None:
        super().__init__("haproxy", "HAProxy TLS->plain", True,
                         "haproxy, mode tcp, bind ... ssl crt (key + chain in one PEM), server Dovecot plain",
                         workloads="ABCDE")
        self.workdir = workdir / "haproxy"
        self.files = files
        self.dovecot_plain = dovecot_plain

    def start(self) -> None:
        binary = find("haproxy")
        if binary is None:
            self.skip = "haproxy not installed"
            return
        words = _first_line([binary, "-v"], "HAProxy version ?").split()  # "HAProxy version 2.6.12-1+deb12u4 ..."
        self.version = f"HAProxy {words[2].split('-')[0] if len(words) > 2 else '?'}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "haproxy.cfg"
        # Defaults kept: one process with a thread per core, TCP_NODELAY, splicing where it can. The
        # timeouts are there because haproxy warns without them; none is reached.
        config.write_text(
            "global\n"
            "    ssl-default-bind-options ssl-min-ver TLSv1.2\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "frontend pop3s\n"
            f"    bind 127.0.0.1:{self.port} ssl crt {self.files.combined}\n"
            "    default_backend dovecot\n"
            "backend dovecot\n"
            f"    server dovecot 127.0.0.1:{self.dovecot_plain}\n"
        )
        check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c rejected {config}:\n{check.stdout}{check.stderr}")
        log = self.workdir / "stdout.txt"
        process = self._spawn([binary, "-db", "-f", str(config)], log, self.workdir)
        wait_for_port(self.port, process, log=log)
        self.cpu_pids = [process.pid]


class Floor(Target):
    def __init__(self, workdir: Path, files: Files, dovecot_plain: int) -> None:
        super().__init__("floor", "Twisted floor TLS->plain", True,
                         "bench/floor.py: a bare Twisted TLS->plain byte relay, popproxy's Python and Twisted")
        self.workdir = workdir / "floor"
        self.files = files
        self.dovecot_plain = dovecot_plain

    def start(self) -> None:
        import twisted

        self.version = f"Twisted {twisted.__version__}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "stdout.txt"
        process = self._spawn([sys.executable, str(BENCH / "floor.py"), str(self.port), str(self.dovecot_plain),
                               str(self.files.combined)], log, self.workdir)
        wait_for_port(self.port, process, log=log)
        self.cpu_pids = [process.pid]


class LookupPopProxy(PopProxy):
    """popproxy TLS->plain asking ``[routing.lookup]`` where each login goes: the same helper
    (bench/auth_http.py) that nginx's row asks, with popproxy's cache off, so that both ask once per
    login. Workload D (a session per login) is where a lookup costs."""

    def __init__(self, workdir: Path, files: Files, dovecot_plain: int, dovecot_tls: int) -> None:
        super().__init__("tls_plain", workdir, files, dovecot_plain, dovecot_tls)
        self.key = "popproxy_lookup"
        self.label = "popproxy TLS->plain, auth_http"
        self.describe += "; [routing.lookup] -> bench/auth_http.py (nginx's helper), cache_size = 0"
        self.workdir = workdir / "popproxy-lookup"
        self.workloads = "D"
        self.auth_port = 0

    def routing(self) -> str:
        return (f'[routing.lookup]\nurl = "http://127.0.0.1:{self.auth_port}/auth"\ntemplate = "dovecot"\n'
                f'cache_size = 0\nallowed_upstreams = [{{ network = "127.0.0.1/32", ports = [{self.dovecot_plain}] }}]\n')

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.auth_port = free_port()
        auth = self._spawn([sys.executable, str(BENCH / "auth_http.py"), str(self.auth_port), str(self.dovecot_plain)],
                           self.workdir / "auth_http.txt", self.workdir)
        wait_for_port(self.auth_port, auth, log=self.workdir / "auth_http.txt")
        self.aux_pids = [auth.pid]
        self.aux_name = "Python auth_http helper"
        super().start()


class HookedPopProxy(PopProxy):
    """popproxy TLS->plain with one hook (workload F), each hook in a popproxy of its own. The
    ``spamassassin`` one starts its own spamd first (:class:`Spamd`), whose CPU time is shown apart."""

    HOOKS: ClassVar[dict[str, str]] = {
        "audit": "popproxy + audit-log",
        "rewrite": "popproxy + rewrite",
        "spamassassin": "popproxy + spamassassin",
    }

    def __init__(self, hook: str, workdir: Path, files: Files, dovecot_plain: int, dovecot_tls: int) -> None:
        super().__init__("tls_plain", workdir, files, dovecot_plain, dovecot_tls)
        self.key = f"popproxy_{hook}"
        self.label = self.HOOKS[hook]
        self.hook = hook
        self.workdir = workdir / f"popproxy-{hook}"
        self.workloads = "F"
        self.spamd: Spamd | None = None
        if hook == "rewrite":
            self.describe += "; one rule: when From matches @example.org, add_header X-Bench-Rewritten"
            self.rewritten = Rewritten(required=(b"X-Bench-Rewritten",))
        elif hook == "spamassassin":
            self.describe += "; spamd on 127.0.0.1 (TCP), SYMBOLS per message, no network tests"
            self.rewritten = Rewritten(required=(b"X-Spam-Level", b"X-Spam-Status"), optional=(b"X-Spam-Flag",))
        else:
            self.describe += f"; audit-log to a file in the temporary folder ({hook}.jsonl)"

    def hooks(self) -> str:
        if self.hook == "audit":
            return f'\n[[hook]]\nuse = "audit-log"\npath = "{self.workdir / "audit.jsonl"}"\n'
        if self.hook == "rewrite":
            return ('\n[[hook]]\nuse = "rewrite"\n\n[[hook.rule]]\n'
                    'when_header = [{ name = "From", matches = "(?i)@example\\\\.org>?$" }]\n'
                    'add_header = ["X-Bench-Rewritten: yes"]\n')
        assert self.spamd is not None
        # "refuse": a message spamd did not scan is an error of the run, not a fast result.
        return (f'\n[[hook]]\nuse = "spamassassin"\naddress = "127.0.0.1:{self.spamd.port}"\n'
                'timeout = 30\non_error = "refuse"\n')

    def start(self) -> None:
        if self.hook == "spamassassin":
            if find("spamd") is None:
                self.skip = "spamd not installed (Debian package spamd)"
                return
            self.spamd = spamd = Spamd(self.workdir.parent / "spamd")
            process = self._spawn(spamd.command(), spamd.workdir / "stdout.txt", spamd.root)
            spamd.wait(process)
            self.aux_pids = [process.pid]
            self.aux_name = "spamd"
        super().start()
        if self.spamd is not None:
            self.version += f", {self.spamd.version}"

    def stop(self) -> None:
        super().stop()
        if self.spamd is not None:
            self.spamd.close()

    def time_spamc(self, messages: list[bytes]) -> float:
        """Seconds for spamd to check ``messages`` one after the other through ``spamc -y`` (the
        SYMBOLS request the hook makes), without popproxy: spamd's own share of F's spam path. Each
        spamc is a new process, which adds a millisecond or two per message."""
        assert self.spamd is not None
        spamc = find("spamc")
        if spamc is None:
            raise RuntimeError("spamc not installed (Debian package spamc)")
        argv = [spamc, "-d", "127.0.0.1", "-p", str(self.spamd.port), "-y", "-x", "-t", "30"]
        started = time.perf_counter()
        for message in messages:
            subprocess.run(argv, input=message, capture_output=True, timeout=60, check=True)
        return time.perf_counter() - started


class Spamd:
    """A SpamAssassin spamd for workload F, with the command line and site configuration of the test
    suite's fixture (tests/support/spamd.py): deterministic results, no DNS, no network tests, no
    Bayes, the package's own rules, 127.0.0.1 only, two children. Running as root, spamd runs as
    ``debian-spamd``, which must read its tree, so the tree is a folder of its own (mode 0755) in the
    system temporary directory, copied back for ``--keep`` and removed by :meth:`close`."""

    RULES = Path("/usr/share/spamassassin")  # pinned: rules sa-update fetched are not used
    PLUGIN_LOADERS = Path("/etc/spamassassin")  # its *.pre files only, never its local.cf
    LOCAL_CF = (
        "# popproxy bench: deterministic results, no network.\n"
        "dns_available no\nskip_rbl_checks 1\nuse_razor2 0\nuse_pyzor 0\nuse_bayes 0\n"
        "bayes_auto_learn 0\nrequired_score 5.0\n"
    )

    def __init__(self, workdir: Path) -> None:
        binary = find("spamd")
        assert binary is not None
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="popproxy-bench-spamd-")) if self.as_root else workdir
        self.root.chmod(0o755)
        self.port = free_port()
        self.version = "spamd " + _first_line([self.binary, "--version"], "?").split()[-1]

    def command(self) -> list[str]:
        site = self.root / "site"
        site.mkdir(exist_ok=True)
        for loader in sorted(self.PLUGIN_LOADERS.glob("*.pre")):
            shutil.copyfile(loader, site / loader.name)
        (site / "local.cf").write_text(self.LOCAL_CF)
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        argv = [
            self.binary, "--nouser-config", "--local", f"--listen=127.0.0.1:{self.port}",
            "--allowed-ips=127.0.0.1", "--max-children=2", f"--helper-home-dir={home}",
            f"--siteconfigpath={site}", f"--pidfile={self.root / 'spamd.pid'}", f"--syslog={self.root / 'spamd.log'}",
        ]
        if self.RULES.is_dir():
            argv.append(f"--configpath={self.RULES}")
        if self.as_root:
            try:
                user = pwd.getpwnam("debian-spamd")
            except KeyError:
                user = pwd.getpwnam("nobody")
            os.chown(home, user.pw_uid, user.pw_gid)
            argv.append(f"--username={user.pw_name}")
        return argv

    def wait(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Until ``PING`` gets ``PONG`` (the children are up, not just the listening socket)."""
        log = self.workdir / "stdout.txt"
        wait_for_port(self.port, process, timeout=timeout, log=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                    answer = b"".join(iter(lambda: sock.recv(4096), b""))
                if b"PONG" in answer:
                    return
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                logged = self.root / "spamd.log"
                tail = logged.read_text(errors="replace")[-2000:] if logged.exists() else ""
                raise RuntimeError(f"spamd did not answer PING within {timeout} s\n{tail}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.root != self.workdir and self.root.exists():
            for name in ("spamd.log", "site/local.cf"):
                if (self.root / name).exists():
                    shutil.copyfile(self.root / name, self.workdir / Path(name).name)
            shutil.rmtree(self.root, ignore_errors=True)


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
