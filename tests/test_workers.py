"""``[process] workers = N``: a parent and N worker processes behave as one proxy.

Real ``twistd -n popproxy`` with ``workers = 2`` in front of the run's real Dovecot, and Python's
``poplib`` as the client. What must hold with N > 1 as with one process:

- sessions are served by the workers (both of them, over enough connections) and every message
  arrives intact;
- caps per address, per user and in all (``max_sessions``) count across workers: the parent keeps
  the one guard;
- a failed login's penalty follows the address to another worker;
- audit records from every worker reach one file, one whole JSON object per line;
- a reload is all or nothing: a configuration one worker cannot use changes nothing anywhere;
- a worker that dies is started again, and what it had counted is released;
- SIGTERM lets sessions finish, passes on to the workers, and the parent exits when they have.
"""

from __future__ import annotations

import hashlib
import json
import os
import poplib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import pop3client
from support.dovecot import DovecotServer
from support.proxyproc import TWISTD, ProxyProcess, free_port

WORKERS = 2


def write_config(folder: Path, port: int, dovecot: DovecotServer, limits: str = "", hooks: str = "",
                 workers: int = WORKERS) -> Path:
    config = folder / "popproxy.toml"
    config.write_text(
        f'[process]\nworkers = {workers}\n'
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.main]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n[limits]\n{limits}\n{hooks}'
    )
    return config


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker index -> pid, from the parent's ``worker_started`` events (the latest per index)."""
    pids: dict[int, int] = {}
    for event in proxy.events():
        if event.get("event") == "worker_started":
            pids[int(event["worker"])] = int(event["pid"])  # type: ignore[call-overload]
    return pids


def wait_serving(proxy: ProxyProcess, count: int = WORKERS, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [e for e in proxy.events() if e.get("event") == "worker_ready"]
        if len(ready) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} workers did not report ready: {proxy.log()[-3000:]}")


@pytest.fixture
def proxy(tmp_path: Path, dovecot: DovecotServer) -> Iterator[ProxyProcess]:
    port = free_port()
    process = ProxyProcess(write_config(tmp_path, port, dovecot, "max_sessions_per_user = 3\n"), [port], tmp_path,
                           json=True)
    try:
        wait_serving(process)
        yield process
    finally:
        process.stop(timeout=20)


def log_in(port: int, user: str = "dave", password: str = "dave-pw") -> poplib.POP3:
    return pop3client.log_in(port, user, password)


def workers_of(proxy: ProxyProcess, text: str) -> list[object]:
    """The workers that logged an event whose message contains ``text``, one entry per event."""
    return [e.get("worker") for e in proxy.events() if text in str(e.get("message", ""))]


def until_both(proxy: ProxyProcess, text: str, attempt: object, limit: int = 60) -> list[object]:
    """Run ``attempt`` until both workers have logged ``text`` (the kernel gives each connection to
    one of them, as it pleases), at most ``limit`` times."""
    for _ in range(limit):
        attempt()  # type: ignore[operator]
        seen = workers_of(proxy, text)
        if set(seen) >= {1, 2}:
            return seen
    raise AssertionError(f"not both workers logged {text!r} in {limit} attempts: {workers_of(proxy, text)}")


def test_every_worker_serves_and_every_message_arrives_intact(proxy: ProxyProcess, dovecot: DovecotServer) -> None:
    user = dovecot.users["dave"]
    served_by: set[object] = set()
    for _ in range(12):
        client = log_in(proxy.ports[0])
        for number, expected in enumerate(user.messages, start=1):
            _, lines, _ = client.retr(number)
            assert hashlib.sha256(b"\r\n".join(lines) + b"\r\n").digest() == hashlib.sha256(expected).digest()
        client.quit()
    time.sleep(0.3)
    served_by = {e.get("worker") for e in proxy.events() if e.get("event") == "auth" and e.get("result") == "ok"}
    assert served_by == {1, 2}, served_by


def test_the_per_user_cap_counts_sessions_on_every_worker(proxy: ProxyProcess) -> None:
    clients = [log_in(proxy.ports[0]) for _ in range(3)]  # max_sessions_per_user = 3
    try:
        def fourth() -> None:
            with pytest.raises(poplib.error_proto, match=r"IN-USE"):
                log_in(proxy.ports[0])
            time.sleep(0.05)

        # A fourth session is refused whichever worker takes it, the three being wherever they are.
        until_both(proxy, "has too many sessions", fourth)
    finally:
        for client in clients:
            client.quit()
    time.sleep(0.2)
    log_in(proxy.ports[0]).quit()  # the slots were given back


def test_sigterm_reaches_the_workers_and_the_parent_exits(tmp_path: Path, dovecot: DovecotServer) -> None:
    port = free_port()
    process = ProxyProcess(write_config(tmp_path, port, dovecot), [port], tmp_path, json=True)
    try:
        wait_serving(process)
        pids = worker_pids(process)
        assert len(pids) == WORKERS
        client = log_in(port)
        process.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while len([e for e in process.events() if e.get("why") == "received SIGTERM"]) < WORKERS:
            assert time.monotonic() < deadline, "the parent did not pass SIGTERM on to both workers"
            time.sleep(0.05)
        # A logged-in session may still QUIT (other new commands get -ERR [SYS/TEMP]), and its QUIT
        # is answered +OK by the upstream.
        assert client.quit().startswith(b"+OK")
        assert process.process.wait(timeout=30) == -signal.SIGTERM  # twistd ends by the signal it got
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        drained = [e.get("worker") for e in process.events() if "session(s) get" in str(e.get("message"))]
        assert len(drained) == 1, drained  # the worker with the session gave it its grace time
    finally:
        process.stop()


def session_workers(proxy: ProxyProcess) -> dict[str, object]:
    """session_id -> the worker that served it, from the ``session_opened`` events."""
    return {str(e["session_id"]): e.get("worker") for e in proxy.events() if e.get("event") == "session_open"}


@pytest.mark.parametrize(("limit", "refusal"), [("max_sessions = 2", "too many sessions"),
                                                 ("max_sessions_per_ip = 2", "too many sessions from your address")])
def test_session_caps_count_across_workers(tmp_path: Path, dovecot: DovecotServer, limit: str, refusal: str) -> None:
    port = free_port()
    process = ProxyProcess(write_config(tmp_path, port, dovecot, limit), [port], tmp_path, json=True)
    clients: list[poplib.POP3] = []
    try:
        wait_serving(process)
        clients = [log_in(port), log_in(port)]

        def third() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                assert sock.makefile("rb").readline() == b"-ERR [SYS/TEMP] Too many sessions, try again later.\r\n"
            time.sleep(0.05)

        refused_by = until_both(process, " refused: too many sessions", third)
        assert all(e.get("refusal") == refusal for e in process.events() if e.get("refusal"))
        assert len(refused_by) >= 2
    finally:
        for client in clients:
            client.quit()
        process.stop()


def test_a_failed_login_is_penalised_on_the_other_worker_too(tmp_path: Path, dovecot: DovecotServer) -> None:
    """The penalty is the parent's: a login from the address that failed waits, on whichever worker."""
    port = free_port()
    process = ProxyProcess(write_config(tmp_path, port, dovecot, "login_failure_delay = 1.0"), [port], tmp_path,
                           json=True)
    try:
        wait_serving(process)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            log_in(port, password="wrong")
        time.sleep(0.2)
        failed_on = next(e.get("worker") for e in process.events() if e.get("event") == "auth"
                         and e.get("result") == "refused")
        for _ in range(30):
            started = time.monotonic()
            log_in(port).quit()
            waited = time.monotonic() - started
            time.sleep(0.1)
            ok = [e.get("worker") for e in process.events() if e.get("event") == "auth" and e.get("result") == "ok"]
            if ok[-1] != failed_on:
                break
        else:
            raise AssertionError("no login reached the other worker in 30 tries")
        assert waited >= 0.95, f"a login on worker {ok[-1]} after a failure on worker {failed_on} waited {waited:.2f}s"
    finally:
        process.stop()


def test_audit_records_from_every_worker_reach_one_file_whole_and_rotate_once(
        tmp_path: Path, dovecot: DovecotServer) -> None:
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    hooks = f'[[hook]]\nuse = "audit-log"\npath = "{audit}"\nrotate = "size"\nmax_bytes = 4096\nkeep = 1000\n'
    process = ProxyProcess(write_config(tmp_path, port, dovecot, hooks=hooks), [port], tmp_path, json=True)
    try:
        wait_serving(process)
        user = dovecot.users["dave"]

        def session() -> None:
            client = log_in(port)
            for number in range(1, len(user.messages) + 1):
                client.retr(number)
            client.quit()
            time.sleep(0.05)

        until_both(process, "logged in to", session)
        for _ in range(10):
            session()
        time.sleep(0.5)
        served = session_workers(process)
        logged_in = {str(e["session_id"]) for e in process.events() if e.get("event") == "auth"}
    finally:
        process.stop()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) > 3, files  # it rotated, more than once
    records = [json.loads(line) for path in files for line in path.read_text().splitlines()]  # each line whole
    opened = [r["session_id"] for r in records if r["event"] == "session_open"]
    retrs = [r for r in records if r["event"] == "retr"]
    assert sorted(opened) == sorted(served), "every session's records, once each, across the rotated files"
    assert {served[r["session_id"]] for r in retrs} == {1, 2}
    assert len(retrs) == len(logged_in) * len(user.messages)  # (the readiness probe never logged in)
    expected = {hashlib.sha256(message).hexdigest() for message in user.messages}
    assert {r["sha256"] for r in retrs} == expected


def test_a_reload_one_worker_cannot_use_changes_nothing(tmp_path: Path, dovecot: DovecotServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """All or nothing: the new routing sends everyone to an upstream that is down. While one worker
    cannot build the new configuration, both keep the old routing; once it can, both switch."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    port, down = free_port(), free_port()
    refuse = tmp_path / "refuse-pids"
    config = write_config(tmp_path, port, dovecot)
    process = ProxyProcess(config, [port], tmp_path, json=True)
    try:
        wait_serving(process)
        pids = worker_pids(process)
        text = config.read_text().replace('default = "main"', 'default = "down"')
        config.write_text(text + f'[upstream.down]\naddress = "127.0.0.1:{down}"\ntls = "none"\n'
                          f'[[hook]]\nuse = "support.samplehooks:picky"\nrefuse_pids = "{refuse}"\n')
        refuse.write_text(f"{pids[1]}\n")  # worker 1 cannot load it; the parent and worker 2 can
        process.process.send_signal(signal.SIGHUP)
        wait_for_event(process, "reload_failed")
        failed = [e for e in process.events() if e.get("event") == "reload_failed"]
        assert "worker 1" in str(failed[0]["error"]) and "is listed" in str(failed[0]["error"])
        until_both(process, "logged in to", lambda: log_in(port).quit())  # the old routing, everywhere

        refuse.write_text("")
        process.process.send_signal(signal.SIGHUP)
        wait_for_event(process, "reloaded")

        def down_now() -> None:
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                log_in(port)

        until_both(process, " at down failed", down_now)
        assert not [e for e in process.events() if e.get("event") == "auth" and e.get("result") == "ok"
                    and e["time"] > failed[0]["time"] and e.get("upstream") == "down"]
    finally:
        process.stop()


def wait_for_event(process: ProxyProcess, name: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in process.events() if e.get("event") == name]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {name} event: {process.log()[-3000:]}")


def test_a_dead_worker_is_started_again_and_its_counts_released(proxy: ProxyProcess) -> None:
    """Three sessions of dave (the cap); the worker serving one of them is killed. Its clients are
    cut, a new worker takes its place, and dave may open as many sessions as were lost."""
    clients = [log_in(proxy.ports[0]) for _ in range(3)]
    time.sleep(0.3)
    by_worker = [e.get("worker") for e in proxy.events() if e.get("event") == "auth" and e.get("result") == "ok"]
    victim = by_worker[0]
    pids = worker_pids(proxy)
    os.kill(pids[victim], signal.SIGKILL)  # type: ignore[index]
    lost = by_worker.count(victim)
    survivors = []
    for client in clients:
        try:
            client.noop()
            survivors.append(client)
        except (poplib.error_proto, OSError):
            client.close()
    assert len(survivors) == 3 - lost
    deadline = time.monotonic() + 20
    while worker_pids(proxy)[victim] == pids[victim]:  # type: ignore[index]
        assert time.monotonic() < deadline, "the dead worker was not started again"
        time.sleep(0.05)
    wait_serving(proxy, count=WORKERS + 1)
    died = [e for e in proxy.events() if e.get("event") == "worker_died"]
    assert died and died[0]["worker"] == victim
    again = [log_in(proxy.ports[0]) for _ in range(lost)]  # the dead worker's slots were given back
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        log_in(proxy.ports[0])
    for client in survivors + again:
        client.quit()


def test_proxy_protocol_addresses_are_counted_by_the_parent(tmp_path: Path, dovecot: DovecotServer) -> None:
    """Behind a load balancer the client's address arrives in the PROXY header; the worker asks the
    parent to count it there (the session's bytes wait for the answer), so the per-address cap holds
    for the real client address across workers, while other addresses still get in."""
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[process]\nworkers = {WORKERS}\n'
        f'[[listen]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntls = "none"\nproxy_from = ["127.0.0.0/8"]\n'
        f'[upstream.main]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n[limits]\nmax_sessions_per_ip = 1\nproxy_header_timeout = 5\n'
    )
    process = ProxyProcess(config, [port], tmp_path, json=True)
    held: list[socket.socket] = []

    def connect(client: str, then: bytes = b"") -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        # The header and a first command in one segment: the command must wait for the parent's answer.
        sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 110\r\n".encode() + then)
        reader = sock.makefile("rb")
        answer = reader.readline() + (reader.readline() if then else b"")
        reader.close()
        return sock, answer

    try:
        wait_serving(process)
        first, answer = connect("192.0.2.7", b"USER dave\r\n")
        held.append(first)
        assert answer == b"+OK POP3 proxy ready.\r\n+OK\r\n"

        def same_address() -> None:
            sock, answer = connect("192.0.2.7", b"NOOP\r\n")
            with sock:
                assert b"-ERR [SYS/TEMP] Too many sessions" in answer, answer
            time.sleep(0.05)

        until_both(process, " refused: too many sessions", same_address)
        other, answer = connect("192.0.2.8", b"USER dave\r\n")
        held.append(other)
        assert answer == b"+OK POP3 proxy ready.\r\n+OK\r\n"
        refusals = [e for e in process.events() if e.get("refusal")]
        assert {e["client_host"] for e in refusals} == {"192.0.2.7"}
    finally:
        for sock in held:
            sock.close()
        process.stop()


def test_a_worker_started_after_a_refused_reload_runs_what_the_others_run(proxy: ProxyProcess) -> None:
    """The file on disk is broken and the reload was refused; a worker that dies now must come back
    with the running configuration, not fail on the file (or load a half-edited one)."""
    config = proxy.config
    good = config.read_text()
    config.write_text(good + "\n[limits\n")  # a TOML syntax error
    proxy.process.send_signal(signal.SIGHUP)
    assert "TOML syntax error" in str(wait_for_event(proxy, "reload_failed")["error"])
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while worker_pids(proxy)[1] == pids[1]:
        assert time.monotonic() < deadline, "worker 1 was not started again"
        time.sleep(0.05)
    wait_serving(proxy, count=WORKERS + 1)
    until_both(proxy, "logged in to", lambda: log_in(proxy.ports[0]).quit())
    assert not [e for e in proxy.events() if e.get("event") == "worker_failed"]


def test_an_audit_log_that_refuses_mail_when_it_cannot_write_needs_one_process(tmp_path: Path,
                                                                                 dovecot: DovecotServer) -> None:
    """``on_write_error = "refuse"`` with workers would let mail move while the parent loses the
    records: refused at start (``--check`` too), with the key and the reason."""
    from popproxy.config import ConfigError
    from popproxy.tap import validated_config

    hooks = f'[[hook]]\nuse = "audit-log"\npath = "{tmp_path / "audit.jsonl"}"\non_write_error = "refuse"\n'
    config = write_config(tmp_path, free_port(), dovecot, hooks=hooks)
    with pytest.raises(ConfigError, match=r"hook\[0\]\.on_write_error: .*needs \[process\] workers = 1"):
        validated_config(str(config))
    config.write_text(config.read_text().replace("workers = 2", "workers = 1"))
    assert validated_config(str(config)).process.workers == 1


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, dovecot: DovecotServer) -> None:
    """No orphans holding the port: a worker whose AMP connection to the parent ends stops (its
    sessions get shutdown_grace, here none are open)."""
    port = free_port()
    process = ProxyProcess(write_config(tmp_path, port, dovecot), [port], tmp_path, json=True)
    try:
        wait_serving(process)
        pids = worker_pids(process)
        process.process.kill()
        process.process.wait(timeout=10)
        deadline = time.monotonic() + 20
        alive = list(pids.values())
        while alive:
            assert time.monotonic() < deadline, f"workers {alive} outlived their parent"
            time.sleep(0.05)
            alive = [pid for pid in alive if running(pid)]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        process.stop()


def test_workers_that_all_fail_to_start_end_twistd_with_status_1(tmp_path: Path, dovecot: DovecotServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's checks pass (the hook builds there) but no worker can build it: the parent stops,
    and a supervisor (systemd's Restart=on-failure, a shell's `&&`) must see a failure, not status 0."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    config = write_config(tmp_path, port, dovecot,
                          hooks='[[hook]]\nuse = "support.samplehooks:picky"\nrefuse_in_workers = true\n')
    pidfile = tmp_path / "twistd.pid"
    result = subprocess.run([TWISTD, "-n", "--pidfile", str(pidfile), "--logfile", str(tmp_path / "popproxy.log"),
                             "popproxy", "-c", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "popproxy.log").read_text() if (tmp_path / "popproxy.log").exists() else result.stderr
    assert "none is serving: stopping" in log, log[-3000:]
    assert result.returncode == 1, (result, log[-2000:])
    assert not pidfile.exists()
