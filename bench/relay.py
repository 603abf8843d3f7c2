"""Relay benchmark: the same POP3 workloads, direct to Dovecot and through popproxy and its peers.

Run it with ``bench/run`` (which installs the peers and the venv first); ``--help`` lists the knobs.
Everything (one Dovecot, four popproxy instances, one of them with ``[process] workers = 2``, stunnel,
nginx, perdition, HAProxy, the Twisted floor, and for workload F three more popproxy instances with a hook each and a spamd) starts in a
temporary folder on 127.0.0.1, runs side by side in one run, and is stopped before the results are
printed.
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

from peers import Direct, Files, Floor, Haproxy, HookedPopProxy, LookupPopProxy, Nginx, Perdition, PopProxy, Stunnel, Target
from procs import cmdline, descendants, raise_nofile, tree_cpu_by_process, tree_cpu_seconds, tree_memory_kib
from support.dovecot import DovecotServer
from workloads import (
    Account,
    Client,
    Outcome,
    concurrent_fetch,
    idle_sessions,
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
    "E": ("KiB/session", "idle sessions: N logged-in sessions held at once, the proxy's memory per session"),
    "F": ("msg/s", "workload A through popproxy TLS->plain with a hook (audit-log, rewrite, spamassassin)"),
}
DEFAULT_WORKLOADS = "ABCDEF"  # E adds about 10 s to --quick, 2 to 3 minutes to a full run
HOOK_PATHS = ["popproxy_audit", "popproxy_rewrite", "popproxy_spamassassin"]


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


def fmt_ratio(value: float | None) -> str:
    """Two decimals; two significant digits below 0.1 (the spam hook's ratios are around 0.003)."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def cpu_split(target: PopProxy, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds each process of a popproxy with workers used between two readings of
    ``procs.tree_cpu_by_process``: "parent" (twistd: the listeners, the guard, the workers' log lines,
    and the CPU of workers that ended and were reaped), "worker N", and "pid P" for a process that is
    neither (a worker started again under a new PID)."""
    names = {pid: f"worker {index}" for index, pid in target.worker_pids.items()}
    names[target.cpu_pids[0]] = "parent"
    return {names.get(pid, f"pid {pid}"): round(seconds - before.get(pid, 0.0), 3) for pid, seconds in after.items()}


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
        # F: A's messages through each hook; spamd takes tens of ms per message, so its path gets fewer.
        self.count_f = self.count_a
        self.count_f_spam = 30 if quick else 100
        # E: idle logged-in sessions held at once, opened this many at a time, spread over the idle accounts.
        self.sessions_e = [200] if quick else [1000, 5000]
        self.batch_e = 100
        self.accounts_e = 10
        self.cap = args.cap if args.cap is not None else (5.0 if quick else 15.0)
        self.large_mb = args.large_mb
        self.results: dict[str, dict[str, dict[str, object]]] = {w: {} for w in args.workloads}
        self.logs: dict[str, dict[str, int]] = {}  # what each popproxy's twistd.log says (PopProxy.log_report)

    # -- setup --

    def build_mail(self, dovecot: DovecotServer) -> None:
        rng = random.Random(20240101)
        small = [small_message(rng, i) for i in range(1000)]
        self.small = small  # F's spamc timing sends the same messages to spamd directly
        large = large_message(rng, self.large_mb)
        self.large_size = len(large)
        self.seq = self._account(dovecot, "seq", small)
        self.big = self._account(dovecot, "big", [large])
        self.conc = [self._account(dovecot, f"c{i:02d}", small[(i * 50) % 900:(i * 50) % 900 + 100])
                     for i in range(self.clients_c)]
        self.login = self._account(dovecot, "login", small[:10])
        self.idle = [self._account(dovecot, f"idle{i}", small[:1]) for i in range(self.accounts_e)]

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
            stat = client.command(b"STAT")
            # Rewriting hooks grow the sizes (popproxy's reservations); the message count stays.
            if stat != account.stat and not (target.rewritten and stat.split()[:2] == account.stat.split()[:2]):
                raise RuntimeError(f"{target.label}: STAT for {account.user} differs from the generated mailbox")
            client.command(b"LIST")
            client.body()
            if "F" in target.workloads:
                client.retr(1)  # the hook's first message (spamd's children load their rules)
            client.quit()

    def count_f_for(self, target: Target) -> int:
        """F's messages on this path: A's count, fewer for the spam hook (spamd's tens of ms each)."""
        return self.count_f_spam if target.key == "popproxy_spamassassin" else self.count_f

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
        workers = ["--subprocesses"] if isinstance(target, PopProxy) and target.workers > 1 else []  # the parent and its workers
        process = subprocess.Popen([spy, "record", "--pid", str(target.cpu_pids[0]), "--rate", "500", "--format",
                                    "raw", "--output", str(output), "--nonblocking", *workers],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        return process

    def run_workload(self, workload: str, targets: list[Target], context: ssl.SSLContext, dovecot: DovecotServer) -> None:
        """Run ``workload`` on every path, in rounds: round 1 on each path in turn, then round 2, ...
        so that a disturbance from outside (other jobs on the machine) hits one round of several
        paths rather than every round of one. A path stops repeating once it has failed, been capped
        or used a third of the cap; each path keeps its best round."""
        targets = [t for t in targets if workload in t.workloads]
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
            if isinstance(target, HookedPopProxy) and target.spamd is not None:
                self.time_spamd(target)

    def run_round(self, workload: str, target: Target, context: ssl.SSLContext | None,
                  dovecot: DovecotServer) -> tuple[Outcome, list[float]]:
        """One round; returns the outcome and the CPU seconds used meanwhile by the proxy, its
        helper (nginx's auth_http), Dovecot and the benchmark client."""
        run: Callable[[], Outcome] = {
            "A": lambda: sequential_fetch(target.port, context, self.seq, self.count_a, self.cap),
            "B": lambda: large_fetch(target.port, context, self.big),
            "C": lambda: concurrent_fetch(target.port, context, self.conc, self.per_client_c, self.cap),
            "D": lambda: login_sessions(target.port, context, self.login, self.sessions_d, self.threads_d, self.cap),
            "F": lambda: sequential_fetch(target.port, context, self.seq, self.count_f_for(target), self.cap,
                                          rewritten=target.rewritten, check_sizes=True),
        }[workload]
        assert dovecot.master_pid is not None
        groups = [target.cpu_pids, target.aux_pids, [dovecot.master_pid]]

        def snapshot() -> list[float]:
            return [tree_cpu_seconds(pids) if pids else 0.0 for pids in groups] + [time.process_time()]

        split = isinstance(target, PopProxy) and target.workers > 1  # [process] workers: CPU by process too
        by_process = tree_cpu_by_process(target.cpu_pids) if split else {}
        before = snapshot()
        try:
            outcome = run()
        except Exception as error:  # noqa: BLE001 (a failing path is reported, the run goes on)
            outcome = Outcome(error=f"{type(error).__name__}: {error}"[:300])
            traceback.print_exc(file=sys.stderr)
        time.sleep(0.2)  # closed sessions end and are reaped: their CPU time is counted
        after = snapshot()
        if split:
            assert isinstance(target, PopProxy)
            outcome.extra["cpu_by_process_s"] = cpu_split(target, by_process, tree_cpu_by_process(target.cpu_pids))
        return outcome, [a - b for a, b in zip(after, before, strict=True)]

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
        splits = [o.extra["cpu_by_process_s"] for o, _ in rounds if "cpu_by_process_s" in o.extra]
        if splits:  # [process] workers: the tree's CPU by process, mean per round
            names = sorted({k for split in splits for k in split}, key=lambda k: (k != "parent", k))  # type: ignore[attr-defined]
            cell["proxy_cpu_by_process_s"] = {k: round(sum(split.get(k, 0.0) for split in splits) / n, 3)  # type: ignore[attr-defined]
                                              for k in names}
        cell["proxy_cpu_per_unit_s"] = cpu[0] / work if target.cpu_pids and work else None
        cell["aux_cpu_per_unit_s"] = cpu[1] / work if target.aux_pids and work else None
        if workload == "F":
            # F is A with a hook. Its reference is A through popproxy without a hook, run again in F's own
            # interleaved rounds (so that a change of load between workloads cannot skew the ratio).
            if target.key == "popproxy_tls_plain":
                cell["ratio"] = 1.0 if outcome.value else None
            else:
                cell["ratio"] = self.ratio(outcome.value, "F", "popproxy_tls_plain")
            cell["ratio_direct"] = self.ratio(outcome.value, "A", "direct")
        elif target.key == "direct":
            cell["ratio"] = 1.0 if outcome.value else None
        else:
            cell["ratio"] = self.ratio(outcome.value, workload, "direct")
        self.results[workload][target.key] = cell
        status = "ERROR " + outcome.error if outcome.error else (
            f"{fmt(outcome.value or 0)} {cell['unit']}  rounds: " + ", ".join(fmt(v or 0) for v in cell["rounds"]))
        if outcome.wrong:
            status += f"  WRONG BYTES x{outcome.wrong}"
        if outcome.capped:
            status += f"  (capped: {outcome.done}/{outcome.planned} in {outcome.seconds:.1f} s)"
        print(f"  {workload}  {target.label:<30} {status}", flush=True)

    def run_idle(self, targets: list[Target], context: ssl.SSLContext, dovecot: DovecotServer) -> None:
        """Workload E: for each N, on each path in turn, N logged-in sessions held at once; the proxy's
        RSS and PSS (its whole process tree, /proc/PID/smaps_rollup) with them minus just before, per
        session; then NOOP on every one, each must answer +OK. One run per N and path (no rounds)."""
        targets = [t for t in targets if "E" in t.workloads]
        assert dovecot.master_pid is not None
        master = dovecot.master_pid
        for n in self.sessions_e:
            for target in targets:
                cell = self.results["E"].setdefault(target.key, {"unit": WORKLOADS["E"][0], "sessions": {},
                                                                 "wrong": 0, "error": None})
                baseline = len(descendants(master))
                before = tree_memory_kib(target.cpu_pids)

                def held(target: Target = target) -> dict[str, object]:
                    rss, pss = tree_memory_kib(target.cpu_pids)
                    return {"rss_kib": rss, "pss_kib": pss, "dovecot_processes": len(descendants(master))}

                try:
                    run = idle_sessions(target.port, context if target.client_tls else None, self.idle, n,
                                        self.batch_e, held)
                except Exception as error:  # noqa: BLE001 (a failing path is reported, the run goes on)
                    traceback.print_exc(file=sys.stderr)
                    run = {"opened": 0, "noop_ok": 0, "failed": n, "error": f"{type(error).__name__}: {error}"[:300],
                           "held": None, "open_s": None}
                memory = run["held"]
                entry: dict[str, object] = {**run, "sessions": n, "rss_kib_before": before[0],
                                            "pss_kib_before": before[1]}
                if isinstance(memory, dict) and run["opened"]:
                    entry["rss_kib_per_session"] = round((memory["rss_kib"] - before[0]) / run["opened"], 1)
                    entry["pss_kib_per_session"] = round((memory["pss_kib"] - before[1]) / run["opened"], 1)
                entry["all_answered_noop"] = run["failed"] == 0 and not run["error"]
                cell["sessions"][str(n)] = entry  # type: ignore[index]
                cell["wrong"] = int(cell["wrong"]) + int(run["failed"])  # type: ignore[call-overload]
                cell["error"] = cell["error"] or run["error"]
                cell["extra"] = {"tls_version": run.get("tls_version", "")}
                status = (f"{run['opened']}/{n} open in {run['open_s']} s, RSS {entry.get('rss_kib_per_session', '-')}"
                          f" KiB/session, PSS {entry.get('pss_kib_per_session', '-')} KiB/session, NOOP +OK "
                          f"{run['noop_ok']}/{n}" + (f"  FAILED: {run['error']}" if run["error"] else ""))
                print(f"  E  {target.label:<30} {status}", flush=True)
                # The sessions' Dovecot processes end before the next path opens its own.
                deadline = time.monotonic() + 60
                while len(descendants(master)) > baseline + 2 and time.monotonic() < deadline:
                    time.sleep(0.2)

    def ratio(self, value: float | None, workload: str, key: str) -> float | None:
        """``value`` / the ``key`` row's value in ``workload`` (this run); None if either is missing."""
        cell = self.results.get(workload, {}).get(key)
        reference = cell.get("value") if cell and not cell.get("error") and not cell.get("wrong") else None
        return float(f"{value / reference:.3g}") if value is not None and reference else None  # type: ignore[operator]

    def time_spamd(self, target: HookedPopProxy) -> None:
        """spamd on its own, for the messages F's spam path fetched: ``spamc -y`` one message at a
        time, with spamd's CPU time meanwhile; next to that path's F cell."""
        cell = self.results["F"].get(target.key)
        if cell is None or target.spamd is None:
            return
        messages = self.small[:self.count_f_for(target)]
        before = tree_cpu_seconds(target.aux_pids)
        try:
            seconds = target.time_spamc(messages)
        except Exception as error:  # noqa: BLE001 (reported, the run goes on)
            cell["spamc"] = {"error": f"{type(error).__name__}: {error}"[:300]}
            print(f"  F  spamc -y alone                  ERROR {cell['spamc']['error']}", flush=True)
            return
        time.sleep(0.2)
        cpu = tree_cpu_seconds(target.aux_pids) - before
        cell["spamc"] = {"messages": len(messages), "seconds": round(seconds, 3),
                         "value": round(len(messages) / seconds, 2), "spamd_cpu_s": round(cpu, 3),
                         "spamd_cpu_per_message_s": cpu / len(messages)}
        print(f"  F  {'spamc -y alone':<30} {fmt(len(messages) / seconds)} msg/s "
              f"({1000 * seconds / len(messages):.1f} ms per message)", flush=True)


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
    w = [x for x in bench.args.workloads if x not in "EF"]  # the main table; E and F have their own below
    paths = [t for t in targets if t.workloads != "F"]
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
        "E": f"E: {' and '.join(map(str, bench.sessions_e))} logged-in sessions held at once (opened "
             f"{bench.batch_e} at a time), then NOOP on each; table below",
        "F": f"F: A through popproxy TLS->plain, without a hook and with one hook each: {bench.count_f} x RETR "
             f"({bench.count_f_spam} with spamassassin); table below",
    }
    out.extend(desc[x] for x in bench.args.workloads)
    if w:  # A to D: the main table and its CPU times (absent when only E and/or F run)
        out.append(f"Every cell: absolute (ratio to direct plain), best of up to {bench.rounds} rounds; higher is better.")
        out.append(f"* = stopped at the {bench.cap:.0f} s cap: the rate of the part done.")
        out.append("")
        head = f"{'path':<30}" + "".join(f"{x + ' ' + WORKLOADS[x][0]:>17}" for x in w)
        out.append(head)
        out.append("-" * len(head))
        for t in paths:
            if t.skip:
                out.append(f"{t.label:<30}  not run: {t.skip}")
                continue
            out.append(f"{t.label:<30}" + "".join(f"{cell_text(bench.results[x].get(t.key)):>17}" for x in w))
        out.append("")
        out.extend(render_pairs(bench, w))
        per_unit = {"A": (1e6, "us/msg"), "B": (1e3, "ms/MB"), "C": (1e6, "us/msg"), "D": (1e3, "ms/sess")}
        out.append("Proxy CPU time (whole process tree, from /proc): seconds per round, and per unit of work")
        head = f"{'path':<30}" + "".join(f"{x + ' CPU s':>10}{per_unit[x][1]:>10}" for x in w)
        out.append(head)
        out.append("-" * len(head))
        for t in paths:
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
        for t in paths:
            if t.aux_pids:
                aux = ", ".join(f"{x} {bench.results[x][t.key]['aux_cpu_s']}" for x in w
                                if t.key in bench.results[x] and bench.results[x][t.key].get("aux_cpu_s") is not None)
                out.append(f"  ({t.label}: not included above, its {t.aux_name} used CPU s: {aux})")
        for t in paths:
            if isinstance(t, PopProxy) and t.workers > 1 and not t.skip:
                out.extend(render_workers(bench, t, w))
    if "A" in w:
        out.append("")
        out.append("A: time per RETR, ms (p50 / p99 / max)")
        for t in paths:
            cell = bench.results["A"].get(t.key)
            if cell and not cell.get("error"):
                lat = cell["extra"]["latency_ms"]
                out.append(f"  {t.label:<30}{lat['p50']:>8.2f} /{lat['p99']:>8.2f} /{lat['max']:>8.2f}")
    if "E" in bench.args.workloads:
        out.append("")
        out.extend(render_idle(bench, [t for t in targets if "E" in t.workloads]))
    if "F" in bench.args.workloads:
        out.append("")
        out.extend(render_hooks(bench, [t for t in targets if "F" in t.workloads]))
    tls = sorted({str(c["extra"].get("tls_version")) for r in bench.results.values() for c in r.values()
                  if c.get("extra", {}).get("tls_version")})
    out.append("")
    out.append("TLS versions negotiated by the client: " + (", ".join(tls) or "none"))
    for t in targets:
        out.append(f"  {t.label:<31}{t.version or '-':<28}{t.describe}")
    return "\n".join(out)


def render_pairs(bench: Bench, w: list[str]) -> list[str]:
    """Ratios between two rows, per workload: two that place popproxy between the floor and stunnel, and
    what a second worker process gives popproxy TLS->plain (see README). A pair shows where both ran."""
    pairs = [("popproxy_tls_plain", "floor", "popproxy TLS->plain / floor", "cost of being POP3-aware"),
             ("floor", "stunnel", "floor / stunnel", "cost of the platform"),
             ("popproxy_w2", "popproxy_tls_plain", "popproxy 2 workers / 1 worker", "gain of [process] workers = 2"),
             ("popproxy_lookup", "popproxy_tls_plain", "auth_http / static routing", "cost of a lookup per login"),
             ("popproxy_lookup", "nginx", "popproxy / nginx, auth_http", "the same auth service asked")]
    pairs = [p for p in pairs if any(p[0] in bench.results[x] and p[1] in bench.results[x] for x in w)]
    if not pairs:
        return []
    out = ["Two rows divided, same run (the first row's rate over the second's; below 1: the first row carries less)"]
    head = f"{'':<60}" + "".join(f"{x:>8}" for x in w)
    out.append(head)
    out.append("-" * len(head))
    for upper, lower, name, meaning in pairs:
        row = f"{name:<30}{meaning:<30}"
        for x in w:
            cell = bench.results[x].get(upper)
            ratio = bench.ratio(cell.get("value") if cell and not cell.get("error") and not cell.get("wrong")
                                else None, x, lower)  # type: ignore[arg-type]
            row += f"{fmt_ratio(ratio):>8}"
        out.append(row)
    out.append("")
    return out


def render_workers(bench: Bench, t: PopProxy, w: list[str]) -> list[str]:
    """A popproxy with ``[process] workers``: its row of the CPU table split by process (mean CPU
    seconds per round), and what its twistd.log says about the workers."""
    split = {x: bench.results[x][t.key].get("proxy_cpu_by_process_s") or {} for x in w if t.key in bench.results[x]}
    names = sorted({k for v in split.values() for k in v}, key=lambda k: (k != "parent", k))  # type: ignore[attr-defined]
    out = ["", f"{t.label}: its CPU s per round above, by process (parent: twistd; its reaped children too)"]
    head = f"{'':<30}" + "".join(f"{x + ' CPU s':>10}" for x in w)
    out.append(head)
    out.append("-" * len(head))
    for name in names:
        out.append(f"  {name:<28}" + "".join(f"{split[x][name]:>10.2f}" if name in split.get(x, {}) else f"{'-':>10}"
                                            for x in w))
    report = bench.logs.get(t.key)
    if report:
        out.append(f"  workers came up {report['workers_ready']} times for {t.workers}, {report['worker_restarts']} "
                   f"ended during the run; twistd.log: {report['errors']} error lines, {report['warnings']} warnings")
    return out


def render_idle(bench: Bench, paths: list[Target]) -> list[str]:
    """Workload E: memory per idle logged-in session, and whether every session still answered."""
    out = ["E: idle logged-in sessions held at once; the proxy's memory (whole process tree, /proc/PID/smaps_rollup)",
           "   with them minus just before, per session. NOOP: every session answered +OK."]
    head = (f"{'path':<30}{'sessions':>9}{'RSS KiB/sess':>14}{'PSS KiB/sess':>14}{'all NOOP +OK':>14}"
            f"{'open s':>9}")
    out.append(head)
    out.append("-" * len(head))
    for t in paths:
        if t.skip:
            out.append(f"{t.label:<30}  not run: {t.skip}")
            continue
        cell = bench.results["E"].get(t.key)
        if cell is None:
            continue
        for n, entry in cell["sessions"].items():  # type: ignore[union-attr]
            rss, pss = entry.get("rss_kib_per_session"), entry.get("pss_kib_per_session")
            ok = "yes" if entry["all_answered_noop"] else f"NO ({entry['noop_ok']}/{n})"
            opened = f"{entry['open_s']:.1f}" if entry.get("open_s") is not None else "-"
            out.append(f"{t.label:<30}{n:>9}{fmt(rss) if rss is not None else '-':>14}"
                       f"{fmt(pss) if pss is not None else '-':>14}{ok:>14}{opened:>9}")
            if entry.get("error"):
                out.append(f"  first failure ({entry['errors']} in all): {entry['error']}")
    return out


def render_hooks(bench: Bench, hooked: list[Target]) -> list[str]:
    """Workload F: each hook's msg/s, its ratio to no hook, CPU per message, spamd alone."""
    out = ["F: workload A through popproxy TLS->plain, each hook in a popproxy of its own, in interleaved rounds with",
           f"   popproxy without a hook; best of up to {bench.rounds} rounds. Ratios: to the no-hook row (same rounds),",
           "   and to direct in A. us/msg: popproxy's CPU per message, the session's login included; spamd's apart."]
    head = (f"{'path':<30}{'messages':>9}{'F msg/s':>10}{'/ no hook':>11}{'/ direct A':>12}{'us/msg':>9}"
            f"{'RETR ms p50 / p99':>20}")
    out.append(head)
    out.append("-" * len(head))
    for t in hooked:
        if t.skip:
            out.append(f"{t.label:<30}  not run: {t.skip}")
            continue
        cell = bench.results["F"].get(t.key)
        if cell is None:
            continue
        if cell.get("error") or cell.get("wrong"):
            out.append(f"{t.label:<30}{cell_text(cell):>19}")
            continue
        ratio, direct, per = cell.get("ratio"), cell.get("ratio_direct"), cell.get("proxy_cpu_per_unit_s")
        lat = cell["extra"]["latency_ms"]  # type: ignore[index]
        label = t.label + (" (no hook)" if t.key == "popproxy_tls_plain" else "")
        out.append(f"{label:<30}{cell['done']:>9}{cell_text({**cell, 'ratio': None}):>10}"
                   f"{fmt_ratio(ratio):>11}{fmt_ratio(direct):>12}"
                   f"{fmt(per * 1e6) if per is not None else '-':>9}{lat['p50']:>11.2f} /{lat['p99']:>6.2f}")
        spamc = cell.get("spamc")
        if spamc:
            assert isinstance(spamc, dict)
            if spamc.get("error"):
                out.append(f"  spamd alone: ERROR {spamc['error']}")
                continue
            through = cell.get("aux_cpu_per_unit_s")
            out.append(f"  spamd alone (spamc -y, one message at a time): {fmt(spamc['value'])} msg/s, "
                       f"{1000 * spamc['seconds'] / spamc['messages']:.1f} ms per message; spamd CPU "
                       f"{1000 * spamc['spamd_cpu_per_message_s']:.1f} ms per message alone, "
                       + (f"{1000 * through:.1f} through popproxy" if through is not None else "-"))
    return out


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
    parser.add_argument("--quick", action="store_true", help="smaller workloads (E: 200 sessions) and a 5 s cap "
                        "(about a minute)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="which workloads, e.g. AB (default "
                        f"{DEFAULT_WORKLOADS}); E holds 1000, then 5000 idle sessions at once (200 with --quick)")
    parser.add_argument("--paths", default="", help="comma-separated path keys to run (default: all); "
                        "direct is always run. Keys: direct_tls, popproxy_plain, popproxy_tls_plain, "
                        "popproxy_w2 (TLS->plain, [process] workers = 2), popproxy_tls_tls, "
                        "popproxy_lookup (workload D: [routing.lookup] to nginx's auth_http helper), floor, stunnel, haproxy, nginx, "
                        "perdition_tls, perdition_plain, "
                        "and for F: " + ", ".join(HOOK_PATHS))
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
    raise_nofile()  # workload E holds thousands of sockets here and in the proxies (children inherit it)
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

        # E: one pop3 process per logged-in session; max_sessions sets Dovecot's process and client limits and
        # mail_max_userip_connections (each idle account takes a share, all from 127.0.0.1).
        sessions = max(100, max(bench.sessions_e) + 100) if "E" in args.workloads else 100
        dovecot = DovecotServer(work / "dovecot", ca=ca, max_sessions=sessions,
                                instance_name=f"popproxy-bench-{os.getpid()}")
        bench.build_mail(dovecot)
        dovecot.start()
        print(f"bench: Dovecot on 127.0.0.1:{dovecot.plain_port} (plain) and :{dovecot.tls_port} (TLS), "
              f"mailboxes written ({time.monotonic() - started:.1f} s)", flush=True)

        targets = [
            Direct(dovecot.plain_port, tls=False),
            Direct(dovecot.tls_port, tls=True),
            PopProxy("plain", work, files, dovecot.plain_port, dovecot.tls_port),
            PopProxy("tls_plain", work, files, dovecot.plain_port, dovecot.tls_port),
            PopProxy("tls_plain", work, files, dovecot.plain_port, dovecot.tls_port, workers=2),
            PopProxy("tls_tls", work, files, dovecot.plain_port, dovecot.tls_port),
            LookupPopProxy(work, files, dovecot.plain_port, dovecot.tls_port),
            Floor(work, files, dovecot.plain_port),
            Stunnel(work, files, dovecot.plain_port),
            Haproxy(work, files, dovecot.plain_port),
            Nginx(work, files, dovecot.plain_port),
            Perdition(work, files, dovecot.plain_port, tls=True),
            Perdition(work, files, dovecot.plain_port, tls=False),
            *(HookedPopProxy(key.removeprefix("popproxy_"), work, files, dovecot.plain_port, dovecot.tls_port)
              for key in HOOK_PATHS),
        ]
        if "E" in args.workloads:
            for target in targets:
                if isinstance(target, PopProxy):
                    target.max_sessions = max(bench.sessions_e) + 100
        if args.paths:
            wanted = {"direct", *args.paths.split(",")}
            targets = [t for t in targets if t.key in wanted]
        targets = [t for t in targets if set(t.workloads) & set(args.workloads)]
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
            if workload == "E":
                bench.run_idle(live, context, dovecot)
            else:
                bench.run_workload(workload, live, context, dovecot)
        for target in live:
            if isinstance(target, PopProxy):
                bench.logs[target.key] = report = target.log_report()
                print(f"bench: {target.label:<30} twistd.log: {report['errors']} error lines, {report['warnings']} "
                      f"warnings" + (f", workers came up {report['workers_ready']} times, {report['worker_restarts']} "
                                     "ended" if target.workers > 1 else ""), flush=True)
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
            "F_messages": bench.count_f, "F_messages_spamassassin": bench.count_f_spam,
            "E_sessions": bench.sessions_e, "E_batch": bench.batch_e, "E_accounts": bench.accounts_e,
        },
        "paths": [{"key": t.key, "label": t.label, "client_tls": t.client_tls, "describe": t.describe,
                   "version": t.version, "skip": t.skip, "workloads": t.workloads} for t in targets],
        "results": bench.results,
        "popproxy_logs": bench.logs,
        "table": table,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    bad = [(w, k) for w, r in bench.results.items() for k, c in r.items() if c.get("wrong") or c.get("error")]
    # A peer that is not installed is "not run"; popproxy itself not starting is a crash (CI must see it).
    unstarted = [t.key for t in targets if isinstance(t, PopProxy) and (t.skip or "").startswith("failed to start")]
    if unstarted:
        print(f"bench: popproxy did not start for {', '.join(unstarted)}", file=sys.stderr)
    return 1 if bad or unstarted else 0


if __name__ == "__main__":
    sys.exit(main())
