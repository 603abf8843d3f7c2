"""Relay benchmark: the same POP3 workloads, direct to Dovecot and through popproxy and its peers.

Run it with ``bench/run`` (which installs the peers and the venv first); ``--help`` lists the knobs.
Everything (one Dovecot, three popproxy instances, stunnel, nginx, perdition) starts in a temporary
folder on 127.0.0.1, runs side by side in one run, and is stopped before the results are printed.
Results: a table on stdout, the same as JSON in bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the Dovecot fixture

from popproxy.pki import CertificateAuthority, write_private

from peers import Direct, Files, Nginx, Perdition, PopProxy, Stunnel, Target
from procs import cmdline, descendants, tree_cpu_seconds
from support.dovecot import DovecotServer
from workloads import (
    Account,
    Client,
    Outcome,
    concurrent_fetch,
    large_fetch,
    login_sessions,
    sequential_fetch,
    wire_sha256,
)

CRLF = b"\r\n"

WORKLOADS = {
    "A": ("msg/s", "sequential RETR of small messages, one session (fetchmail's pattern)"),
    "B": ("MB/s", "RETR of one large message"),
    "C": ("msg/s", "concurrent sessions, each RETR-ing its own messages"),
    "D": ("sessions/s", "connect [+TLS], USER, PASS, STAT, QUIT"),
}


# --- the mailbox ------------------------------------------------------------------------------------

_WORDS = ["proxy", "mailbox", "octet", "greeting", "banner", "capability", "session", "upstream", "client", "server", "stuffing", "dot", "terminator", "message", "header", "body", "attachment", "transport", "layer", "security", "certificate", "handshake", "pipeline", "command", "response", "line", "length", "retrieve", "delete", "quit", "status", "list", "unique", "identifier", "the", "a", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "be", "by", "this", "are", "or", "from", "at", "which"]  # noqa: E501


def small_message(rng: random.Random, index: int) -> bytes:
    """About 3 KB of plain text with CRLF line endings; every 7th message has lines that start with a
    dot (so that dot-stuffing is exercised on every path), one in 50 ends with a line that is just "."."""
    headers = [
        f"From: Sender {index % 17} <sender{index % 17}@example.org>",
        "To: Mailbox Owner <owner@example.net>",
        f"Subject: bench message {index + 1}",
        f"Date: Mon, 1 Jan 2024 08:{index // 60 % 60:02d}:{index % 60:02d} +0000",
        f"Message-ID: <bench.{index + 1}.{rng.getrandbits(48):012x}@popproxy.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    target = rng.randint(2600, 3400)
    size = sum(len(h) + 2 for h in headers)
    lines: list[str] = []
    line = ""
    while size < target:
        word = rng.choice(_WORDS)
        if len(line) + 1 + len(word) > 72:
            lines.append(line)
            size += len(line) + 2
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    if index % 7 == 3:
        for tricky in (".", "..", ".foo", "..."):
            lines.insert(rng.randrange(len(lines) + 1), tricky)
    if index % 50 == 11:
        lines.append(".")
    return "".join(part + "\r\n" for part in headers + lines).encode("ascii")


def large_message(rng: random.Random, megabytes: float) -> bytes:
    """A multipart message whose base64 attachment makes it ``megabytes`` MB (10^6) on the wire."""
    raw = rng.randbytes(int(megabytes * 1e6 * 57 / 78))  # 57 raw bytes -> one 76-char line + CRLF
    payload = base64.encodebytes(raw).replace(b"\n", CRLF)
    head = CRLF.join([
        b"From: Big Sender <big@example.org>",
        b"To: Mailbox Owner <owner@example.net>",
        b"Subject: one large message",
        b"Date: Mon, 1 Jan 2024 09:00:00 +0000",
        b"Message-ID: <bench.large@popproxy.test>",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="=_bench"',
        b"",
        b"--=_bench",
        b"Content-Type: text/plain",
        b"",
        b"A large attachment follows.",
        b".",
        b"..and a stuffed line.",
        b"--=_bench",
        b"Content-Type: application/octet-stream",
        b"Content-Transfer-Encoding: base64",
        b"",
        b"",
    ])
    return head + payload + b"--=_bench--" + CRLF


# --- measuring ----------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        quick = args.quick
        self.count_a = 300 if quick else 1000
        self.rounds = args.rounds if args.rounds else (1 if quick else 5)
        self.clients_c = 20
        self.per_client_c = 25 if quick else 100
        self.sessions_d = 60 if quick else 200
        self.threads_d = 10
        self.cap = args.cap if args.cap is not None else (5.0 if quick else 15.0)
        self.large_mb = args.large_mb
        self.results: dict[str, dict[str, dict[str, object]]] = {w: {} for w in args.workloads}

    # -- setup --

    def build_mail(self, dovecot: DovecotServer) -> None:
        rng = random.Random(20240101)
        small = [small_message(rng, i) for i in range(1000)]
        large = large_message(rng, self.large_mb)
        self.large_size = len(large)
        self.seq = self._account(dovecot, "seq", small)
        self.big = self._account(dovecot, "big", [large])
        self.conc = [self._account(dovecot, f"c{i:02d}", small[(i * 50) % 900:(i * 50) % 900 + 100])
                     for i in range(self.clients_c)]
        self.login = self._account(dovecot, "login", small[:10])

    @staticmethod
    def _account(dovecot: DovecotServer, name: str, messages: list[bytes]) -> Account:
        password = f"{name}-secret"
        dovecot.add_user(name, password, messages)
        total = sum(len(m) for m in messages)
        return Account(name, password, [wire_sha256(m) for m in messages], b"+OK %d %d\r\n" % (len(messages), total))

    def warm(self, target: Target, context: ssl.SSLContext | None) -> None:
        """One session per account before timing: Dovecot builds its indexes, every path gets its first
        connection (imports, worker start-up, TLS library initialisation) out of the way, and the
        expected bytes are checked once on the first message of each mailbox."""
        accounts = [self.seq, self.big, self.login, *self.conc] if target.key == "direct" else [self.seq, self.login]
        for account in accounts:
            client = Client(target.port, context)
            client.login(account.user, account.password)
            if client.command(b"STAT") != account.stat:
                raise RuntimeError(f"{target.label}: STAT for {account.user} differs from the generated mailbox")
            client.command(b"LIST")
            client.body()
            client.quit()

    # -- one cell of the table --

    def start_profiler(self, workload: str, target: Target) -> subprocess.Popen[bytes] | None:
        """With --profile, sample popproxy with py-spy for the whole of a workload (collapsed stacks,
        bench/results/profile-PATH-WORKLOAD.txt). Sampling slows the proxy a little."""
        if not self.args.profile or not target.key.startswith("popproxy"):
            return None
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        if spy is None:
            print("bench: --profile needs py-spy (pip install py-spy into the venv)", flush=True)
            return None
        output = Path(self.args.json).parent / f"profile-{target.key}-{workload}.txt"
        output.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([spy, "record", "--pid", str(target.cpu_pids[0]), "--rate", "500", "--format",
                                    "raw", "--output", str(output), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        return process

    def run_workload(self, workload: str, targets: list[Target], context: ssl.SSLContext, dovecot: DovecotServer) -> None:
        """Run ``workload`` on every path, in rounds: round 1 on each path in turn, then round 2, ...
        so that a disturbance from outside (other jobs on the machine) hits one round of several
        paths rather than every round of one. A path stops repeating once it has failed, been capped
        or used a third of the cap; each path keeps its best round."""
        rounds: dict[str, list[tuple[Outcome, list[float]]]] = {t.key: [] for t in targets}
        spent = {t.key: 0.0 for t in targets}
        profilers = [p for p in (self.start_profiler(workload, t) for t in targets) if p is not None]
        for _ in range(self.rounds):
            for target in targets:
                done = rounds[target.key]
                if done and (done[-1][0].error or done[-1][0].capped or done[-1][0].wrong
                             or spent[target.key] > self.cap / 3):
                    continue
                began = time.perf_counter()
                done.append(self.run_round(workload, target, context if target.client_tls else None, dovecot))
                spent[target.key] += time.perf_counter() - began
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            profiler.wait(30)
        for target in targets:
            self.record(workload, target, rounds[target.key])

    def run_round(self, workload: str, target: Target, context: ssl.SSLContext | None,
                  dovecot: DovecotServer) -> tuple[Outcome, list[float]]:
        """One round; returns the outcome and the CPU seconds used meanwhile by the proxy, its
        helper (nginx's auth_http), Dovecot and the benchmark client."""
        run: Callable[[], Outcome] = {
            "A": lambda: sequential_fetch(target.port, context, self.seq, self.count_a, self.cap),
            "B": lambda: large_fetch(target.port, context, self.big),
            "C": lambda: concurrent_fetch(target.port, context, self.conc, self.per_client_c, self.cap),
            "D": lambda: login_sessions(target.port, context, self.login, self.sessions_d, self.threads_d, self.cap),
        }[workload]
        assert dovecot.master_pid is not None
        groups = [target.cpu_pids, target.aux_pids, [dovecot.master_pid]]

        def snapshot() -> list[float]:
            return [tree_cpu_seconds(pids) if pids else 0.0 for pids in groups] + [time.process_time()]

        before = snapshot()
        try:
            outcome = run()
        except Exception as error:  # noqa: BLE001 (a failing path is reported, the run goes on)
            outcome = Outcome(error=f"{type(error).__name__}: {error}"[:300])
            traceback.print_exc(file=sys.stderr)
        time.sleep(0.2)  # closed sessions end and are reaped: their CPU time is counted
        return outcome, [a - b for a, b in zip(snapshot(), before, strict=True)]

    def record(self, workload: str, target: Target, rounds: list[tuple[Outcome, list[float]]]) -> None:
        """The table cell: the best round (or the first failure). CPU times are the mean per round;
        the per-unit CPU figure divides their sum by the work of all rounds."""
        failed = [o for o, _ in rounds if o.error or o.wrong]
        outcome = failed[0] if failed else max((o for o, _ in rounds), key=lambda o: o.value or 0.0)
        cell = asdict(outcome)
        cell["unit"] = WORKLOADS[workload][0]
        cell["rounds"] = [round(o.value, 3) if o.value is not None else None for o, _ in rounds]
        n = len(rounds)
        cpu = [sum(c[i] for _, c in rounds) for i in range(4)]
        cell["proxy_cpu_s"] = round(cpu[0] / n, 3) if target.cpu_pids else None
        cell["aux_cpu_s"] = round(cpu[1] / n, 3) if target.aux_pids else None
        cell["dovecot_cpu_s"] = round(cpu[2] / n, 3)
        cell["client_cpu_s"] = round(cpu[3] / n, 3)
        work = sum(o.done * (o.nbytes / 1e6 if workload == "B" else 1) for o, _ in rounds)
        cell["work_per_round"] = round(work / n, 3)  # messages, MB (B) or sessions
        cell["proxy_cpu_per_unit_s"] = cpu[0] / work if target.cpu_pids and work else None
        direct = self.results[workload].get("direct")
        if direct and direct.get("value") and outcome.value is not None:
            cell["ratio"] = round(outcome.value / direct["value"], 3)  # type: ignore[operator]
        else:
            cell["ratio"] = 1.0 if target.key == "direct" and outcome.value else None
        self.results[workload][target.key] = cell
        status = "ERROR " + outcome.error if outcome.error else (
            f"{fmt(outcome.value or 0)} {cell['unit']}  rounds: " + ", ".join(fmt(v or 0) for v in cell["rounds"]))
        if outcome.wrong:
            status += f"  WRONG BYTES x{outcome.wrong}"
        if outcome.capped:
            status += f"  (capped: {outcome.done}/{outcome.planned} in {outcome.seconds:.1f} s)"
        print(f"  {workload}  {target.label:<30} {status}", flush=True)


# --- output -------------------------------------------------------------------------------------------


def cell_text(cell: dict[str, object] | None) -> str:
    if cell is None:
        return "-"
    if cell.get("error"):
        return "ERROR"
    value = cell["value"]
    assert isinstance(value, float)
    text = fmt(value)
    ratio = cell.get("ratio")
    if ratio is not None:
        text += f" ({ratio:.2f})"
    if cell.get("capped"):
        text += "*"
    if cell.get("wrong"):
        text = f"WRONG x{cell['wrong']}"
    return text


def render(bench: Bench, targets: list[Target], meta: dict[str, object]) -> str:
    w = bench.args.workloads
    out = []
    out.append(f"popproxy relay benchmark, {meta['date']}, {'--quick' if bench.args.quick else 'full run'}, "
               f"{meta['cpus']} CPUs, {meta['kernel']}, load {meta['load_1min_at_start']} at start")
    out.append(f"Dovecot {meta['versions']['dovecot']}; client: Python {platform.python_version()} ({ssl.OPENSSL_VERSION})")
    out.append("")
    desc = {
        "A": f"A: {bench.count_a} x RETR of ~3 KB messages, one session, one command at a time",
        "B": f"B: RETR of one {bench.large_size / 1e6:.1f} MB message",
        "C": f"C: {bench.clients_c} sessions at once, {bench.per_client_c} x RETR each (~3 KB)",
        "D": f"D: {bench.sessions_d} x (connect [+TLS], USER, PASS, STAT, QUIT) from {bench.threads_d} threads",
    }
    out.extend(desc[x] for x in w)
    out.append(f"Every cell: absolute (ratio to direct plain), best of up to {bench.rounds} rounds; higher is better.")
    out.append(f"* = stopped at the {bench.cap:.0f} s cap: the rate of the part done.")
    out.append("")
    head = f"{'path':<30}" + "".join(f"{x + ' ' + WORKLOADS[x][0]:>17}" for x in w)
    out.append(head)
    out.append("-" * len(head))
    for t in targets:
        if t.skip:
            out.append(f"{t.label:<30}  not run: {t.skip}")
            continue
        out.append(f"{t.label:<30}" + "".join(f"{cell_text(bench.results[x].get(t.key)):>17}" for x in w))
    out.append("")
    per_unit = {"A": (1e6, "us/msg"), "B": (1e3, "ms/MB"), "C": (1e6, "us/msg"), "D": (1e3, "ms/sess")}
    out.append("Proxy CPU time (whole process tree, from /proc): seconds per round, and per unit of work")
    head = f"{'path':<30}" + "".join(f"{x + ' CPU s':>10}{per_unit[x][1]:>10}" for x in w)
    out.append(head)
    out.append("-" * len(head))
    for t in targets:
        if t.skip or not t.cpu_pids:
            continue
        row = f"{t.label:<30}"
        for x in w:
            cell = bench.results[x].get(t.key)
            if not cell or cell.get("error") or cell.get("proxy_cpu_s") is None:
                row += f"{'-':>10}{'-':>10}"
                continue
            cpu, per = cell["proxy_cpu_s"], cell["proxy_cpu_per_unit_s"]
            row += f"{cpu:>10.2f}{fmt(per * per_unit[x][0]) if per is not None else '-':>10}"
        out.append(row)
    if any(t.aux_pids for t in targets):
        for t in targets:
            if t.aux_pids:
                aux = ", ".join(f"{x} {bench.results[x][t.key]['aux_cpu_s']}" for x in w
                                if t.key in bench.results[x] and bench.results[x][t.key].get("aux_cpu_s") is not None)
                out.append(f"  ({t.label}: not included above, its Python auth_http helper used CPU s: {aux})")
    if "A" in w:
        out.append("")
        out.append("A: time per RETR, ms (p50 / p99 / max)")
        for t in targets:
            cell = bench.results["A"].get(t.key)
            if cell and not cell.get("error"):
                lat = cell["extra"]["latency_ms"]
                out.append(f"  {t.label:<30}{lat['p50']:>8.2f} /{lat['p99']:>8.2f} /{lat['max']:>8.2f}")
    tls = sorted({str(c["extra"].get("tls_version")) for r in bench.results.values() for c in r.values()
                  if c.get("extra", {}).get("tls_version")})
    out.append("")
    out.append("TLS versions negotiated by the client: " + (", ".join(tls) or "none"))
    for t in targets:
        out.append(f"  {t.label:<30}{t.version or '-':<28}{t.describe}")
    return "\n".join(out)


# --- main -------------------------------------------------------------------------------------------


def say(line: str) -> None:
    """Print, ignoring a closed stdout (``bench/run | head``), so that cleanup always completes."""
    try:
        print(line, flush=True)
    except OSError:
        pass


def versions() -> dict[str, str]:
    import OpenSSL

    import popproxy
    import twisted

    dovecot = subprocess.run([shutil.which("dovecot", path="/usr/sbin:/usr/bin") or "dovecot", "--version"],
                             capture_output=True, text=True, check=False).stdout.strip()
    return {
        "dovecot": dovecot,
        "popproxy": popproxy.__version__,
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
        "python": platform.python_version(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads and a 5 s cap (about a minute)")
    parser.add_argument("--workloads", default="ABCD", help="which workloads, e.g. AB (default ABCD)")
    parser.add_argument("--paths", default="", help="comma-separated path keys to run (default: all); "
                        "direct is always run. Keys: direct_tls, popproxy_plain, popproxy_tls_plain, "
                        "popproxy_tls_tls, stunnel, nginx, perdition_tls, perdition_plain")
    parser.add_argument("--cap", type=float, default=None, help="seconds per workload and path before it "
                        "stops and reports the rate of the part done (default 15, --quick 5)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per cell, best kept (default 5, --quick 1); "
                        "a cell stops repeating once it has used a third of the cap")
    parser.add_argument("--large-mb", type=float, default=20.0, help="size of workload B's message (default 20)")
    parser.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="where to write results")
    parser.add_argument("--profile", action="store_true", help="record popproxy with py-spy during each "
                        "workload: bench/results/profile-PATH-WORKLOAD.txt (collapsed stacks)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (configs and logs)")
    args = parser.parse_args()
    args.workloads = [w for w in args.workloads.upper() if w in WORKLOADS]
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    bench = Bench(args)
    work = Path(tempfile.mkdtemp(prefix="popproxy-bench-"))
    targets: list[Target] = []
    dovecot: DovecotServer | None = None
    try:
        print(f"bench: working in {work}", flush=True)
        ca = CertificateAuthority.create("popproxy bench CA")
        leaf = ca.issue(["localhost", "127.0.0.1"])
        tls_dir = work / "tls"
        tls_dir.mkdir()
        files = Files(
            ca=tls_dir / "ca.pem",
            cert_chain=write_private(tls_dir / "chain.pem", leaf.chain_pem),
            key=write_private(tls_dir / "key.pem", leaf.key_pem),
            combined=write_private(tls_dir / "combined.pem", leaf.combined_pem),
        )
        files.ca.write_bytes(ca.cert_pem)
        context = ssl.create_default_context(cafile=str(files.ca))

        dovecot = DovecotServer(work / "dovecot", ca=ca, max_sessions=100, instance_name=f"popproxy-bench-{os.getpid()}")
        bench.build_mail(dovecot)
        dovecot.start()
        print(f"bench: Dovecot on 127.0.0.1:{dovecot.plain_port} (plain) and :{dovecot.tls_port} (TLS), "
              f"mailboxes written ({time.monotonic() - started:.1f} s)", flush=True)

        targets = [
            Direct(dovecot.plain_port, tls=False),
            Direct(dovecot.tls_port, tls=True),
            PopProxy("plain", work, files, dovecot.plain_port, dovecot.tls_port),
            PopProxy("tls_plain", work, files, dovecot.plain_port, dovecot.tls_port),
            PopProxy("tls_tls", work, files, dovecot.plain_port, dovecot.tls_port),
            Stunnel(work, files, dovecot.plain_port),
            Nginx(work, files, dovecot.plain_port),
            Perdition(work, files, dovecot.plain_port, tls=True),
            Perdition(work, files, dovecot.plain_port, tls=False),
        ]
        if args.paths:
            wanted = {"direct", *args.paths.split(",")}
            targets = [t for t in targets if t.key in wanted]
        for target in targets:
            try:
                target.start()
                if not target.skip:
                    bench.warm(target, context if target.client_tls else None)
            except Exception as error:  # noqa: BLE001
                target.skip = f"failed to start: {type(error).__name__}: {str(error)[:400]}"
                target.stop()
            print(f"bench: {target.label:<30} " + (f"NOT RUN: {target.skip}" if target.skip else
                  f"ready on 127.0.0.1:{target.port}"), flush=True)
        live = [t for t in targets if not t.skip]

        for workload in args.workloads:
            print(f"bench: workload {workload}: {WORKLOADS[workload][1]}", flush=True)
            bench.run_workload(workload, live, context, dovecot)
    finally:
        # Stop and remove everything first, report afterwards: printing can fail (a closed pipe).
        for target in targets:
            target.stop()
        if dovecot is not None:
            dovecot.close()
        leftovers = [(pid, cmdline(pid)) for pid in descendants(os.getpid())]
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        for pid, line in leftovers:
            say(f"bench: WARNING: process {pid} ({line}) was still running; killed it")
        say("bench: every process the benchmark started has stopped" if not leftovers else "")
        if args.keep:
            say(f"bench: kept {work}")

    meta: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": os.environ.get("BENCH_COMMAND", "python bench/relay.py " + " ".join(sys.argv[1:])),
        "cpus": os.cpu_count(),
        "kernel": f"Linux {platform.release()}",
        "load_1min_at_start": round(load_before, 2),
        "versions": versions(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    table = render(bench, targets, meta)
    print()
    print(table)
    print(f"\nbench: {meta['elapsed_s']} s in all; results in {args.json}")
    document = {
        **meta,
        "quick": args.quick,
        "parameters": {
            "A_messages": bench.count_a, "B_bytes": bench.large_size, "rounds": bench.rounds,
            "C_clients": bench.clients_c, "C_messages_each": bench.per_client_c,
            "D_sessions": bench.sessions_d, "D_threads": bench.threads_d, "cap_s": bench.cap,
        },
        "paths": [{"key": t.key, "label": t.label, "client_tls": t.client_tls, "describe": t.describe,
                   "version": t.version, "skip": t.skip} for t in targets],
        "results": bench.results,
        "table": table,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    bad = [(w, k) for w, r in bench.results.items() for k, c in r.items() if c.get("wrong") or c.get("error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
