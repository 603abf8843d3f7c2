"""popproxy behind a real HAProxy, configured from the shipped ``conf/haproxy.cfg``.

HAProxy (``tests/support/haproxy.py``) balances two real ``twistd popproxy`` instances with
``send-proxy-v2`` and POP3 health checks (``check-send-proxy``, ``tcp-check expect string +OK``) at a
short interval. Behind them, a real Dovecot trusts only popproxy's own source address for XCLIENT
(``login_trusted_networks = 127.0.0.1/32``) and has its anvil auth penalty on. Clients bind their
source address to 127.0.0.2 or 127.0.0.3 (Linux routes all of 127/8 to ``lo``), so each hop has a
distinct address: clients 127.0.0.2/3, HAProxy and popproxy 127.0.0.1.

What must hold: popproxy's audit log and Dovecot's log (``rip=``) name the client, not HAProxy or
popproxy; failed logins slow that client's address and no other; health checks leave no session
record anywhere.
"""

from __future__ import annotations

import json
import poplib
import re
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority, write_private

from support.dovecot import DovecotServer
from support.haproxy import HAProxyError, HAProxyProcess, check_config, from_shipped
from support.pop3client import BoundPOP3, BoundPOP3S, timed_login
from support.proxyproc import ProxyProcess, free_port

MESSAGE = b"Subject: through haproxy\r\n\r\nbody\r\n"
PASSWORD = "alice-pw"
POPPROXY_ADDRESS = "127.0.0.1/32"  # popproxy's (and HAProxy's) source address on loopback
CLIENTS = ("127.0.0.2", "127.0.0.3")
#: forward_client of popproxy's upstream. "none" is the control that shows the assertions can fail:
#: Dovecot then logs rip=127.0.0.1 and a failure from 127.0.0.2 slows 127.0.0.3 too.
FORWARD = "xclient"
CHECK_INTERVAL = "200ms"


@pytest.fixture(scope="module")
def trusting(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    """Dovecot that accepts XCLIENT from popproxy's address only, with the auth penalty on."""
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-haproxy"), ca=ca, trusted_networks=POPPROXY_ADDRESS,
                           auth_penalty=True)
    server.add_user("alice", PASSWORD, [MESSAGE])
    with server:
        yield server


def popproxy_config(folder: Path, plain: int, implicit: int, metrics: int, certificate: Path,
                    dovecot: DovecotServer) -> Path:
    """One instance: the two ``haproxy:`` listeners conf/haproxy.cfg's comment describes, an audit
    log, /metrics (health checks counted), and Dovecot as upstream with ``forward_client``."""
    config = folder / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "haproxy:tcp:{plain}:interface=127.0.0.1"\ntls = "starttls"\n'
        f'certificate = "{certificate}"\nproxy_from = ["{POPPROXY_ADDRESS}"]\n'
        f'[[listen]]\nendpoint = "haproxy:tcp:{implicit}:interface=127.0.0.1"\ntls = "implicit"\n'
        f'certificate = "{certificate}"\nproxy_from = ["{POPPROXY_ADDRESS}"]\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'forward_client = "{FORWARD}"\nconnect_timeout = 5\n'
        '[routing]\ndefault = "dovecot"\n'
        f'[metrics]\nendpoint = "tcp:{metrics}:interface=127.0.0.1"\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{folder / "audit.jsonl"}"\n'
    )
    return config


class Instance:
    """A running popproxy instance and where to find what it wrote."""

    def __init__(self, folder: Path, certificate: Path, dovecot: DovecotServer) -> None:
        folder.mkdir()
        self.folder = folder
        failure = ""
        for _attempt in range(3):
            self.plain, self.implicit, self.metrics = free_port(), free_port(), free_port()
            config = popproxy_config(folder, self.plain, self.implicit, self.metrics, certificate, dovecot)
            # Readiness is probed on the metrics port only: a bare connection to a "haproxy:"
            # listener would be a session without a PROXY header, from 127.0.0.1.
            try:
                self.process = ProxyProcess(config, [self.metrics], folder, json=True)
            except RuntimeError as error:
                failure = str(error)
                continue
            if self._serving():
                return
            # A port picked above was taken meanwhile (by another process): again, with others.
            self.process.stop()
            failure = self.process.log()[-3000:]
        raise RuntimeError(f"popproxy in {folder} did not start:\n{failure}")

    def _serving(self, timeout: float = 30.0) -> bool:
        """Wait for the "popproxy serving" event (every listener bound); False if twistd exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.process.poll() is None:
            if any(str(e.get("message", "")).startswith("popproxy serving") for e in self.process.events()):
                return True
            time.sleep(0.05)
        return False

    def audit(self) -> list[dict[str, object]]:
        path = self.folder / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def health_checks(self) -> float:
        """popproxy_health_checks_total from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        match = re.search(r"^popproxy_health_checks_total (\S+)$", text, re.MULTILINE)
        assert match, text
        return float(match.group(1))


class Stack:
    """HAProxy (from conf/haproxy.cfg) in front of two popproxy instances in front of Dovecot."""

    def __init__(self, tmp_path: Path, ca: CertificateAuthority, dovecot: DovecotServer) -> None:
        certificate = write_private(tmp_path / "proxy.pem", ca.issue(["localhost", "127.0.0.1"]).combined_pem)
        self.context = ssl.create_default_context(cadata=ca.cert_pem.decode("ascii"))
        self.instances: list[Instance] = []
        self.haproxy: HAProxyProcess | None = None
        try:
            for name in ("popproxy-a", "popproxy-b"):
                self.instances.append(Instance(tmp_path / name, certificate, dovecot))
            stats = tmp_path / "haproxy.sock"
            for attempt in range(3):
                self.pop3, self.pop3s = free_port(), free_port()
                config = from_shipped(pop3_port=self.pop3, pop3s_port=self.pop3s, inter=CHECK_INTERVAL,
                                      servers=[(i.plain, i.implicit) for i in self.instances], stats_socket=stats)
                self.haproxy = haproxy = HAProxyProcess(tmp_path, config, stats)
                try:
                    haproxy.start()
                    break
                except HAProxyError:
                    if attempt == 2 or "cannot bind socket" not in haproxy.log():
                        raise
                    haproxy.stop()  # a picked port was taken meanwhile: again, with others
            haproxy.wait_all_up()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for instance in self.instances:
            instance.process.stop()

    def open(self, source: str, implicit: bool = False) -> poplib.POP3:
        if implicit:
            return BoundPOP3S(self.pop3s, source, self.context)
        return BoundPOP3(self.pop3, source, stls=self.context)


@pytest.fixture
def stack(tmp_path: Path, ca: CertificateAuthority, trusting: DovecotServer) -> Iterator[Stack]:
    made = Stack(tmp_path, ca, trusting)
    try:
        yield made
    finally:
        made.stop()


def log_in(stack: Stack, source: str, password: str = PASSWORD, implicit: bool = False) -> tuple[bytes, float]:
    """Log in as alice from ``source`` through HAProxy: the answer to PASS (or the -ERR raised) and
    the seconds from connecting to that answer. A session that logged in reads its message."""
    started = time.monotonic()
    return timed_login(stack.open(source, implicit), "alice", password, started,
                       [b"Subject: through haproxy", b"", b"body"])


def dovecot_logins(dovecot: DovecotServer, offset: int, count: int, timeout: float = 10.0) -> list[str]:
    """Dovecot's login lines for alice after ``offset``, once there are ``count`` of them (its login
    process may write the line just after answering)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in dovecot.log_text()[offset:].splitlines()
                 if "pop3-login: Info: Login: user=<alice>" in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def audit_when_closed(instances: list[Instance], count: int) -> list[dict[str, object]]:
    """All instances' audit records, once ``count`` sessions have their ``session_close`` record
    (written just after the client's QUIT was answered, so perhaps not yet)."""
    deadline = time.monotonic() + 10
    while True:
        records = [record for instance in instances for record in instance.audit()]
        if sum(r["event"] == "session_close" for r in records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_client_address_through_haproxy_popproxy_and_dovecot(stack: Stack, trusting: DovecotServer) -> None:
    first, second = stack.instances
    offset = len(trusting.log_text())

    # Two POP3 sessions from 127.0.0.2 at once: leastconn gives the second to the instance the first
    # is not on, so each instance serves one (leastconn counts per backend). A third over implicit TLS.
    one = stack.open("127.0.0.2")
    one.user("alice")
    assert one.pass_(PASSWORD).startswith(b"+OK")
    two = stack.open("127.0.0.2")
    two.user("alice")
    assert two.pass_(PASSWORD).startswith(b"+OK")
    for client in (one, two):
        assert client.retr(1)[1] == [b"Subject: through haproxy", b"", b"body"]
        client.quit()
        client.close()
    answer, _ = log_in(stack, "127.0.0.2", implicit=True)
    assert answer.startswith(b"+OK")

    # Dovecot saw the client's address (XCLIENT from popproxy, which read HAProxy's PROXY header).
    lines = dovecot_logins(trusting, offset, 3)
    assert len(lines) == 3, lines
    assert all("rip=127.0.0.2," in line for line in lines), lines

    # Failed logins from 127.0.0.2 slow 127.0.0.2 (Dovecot's auth penalty: 4 s after one failure,
    # src/auth/auth-penalty.c; and popproxy's login_failure_delay on the instance that saw it), and
    # not 127.0.0.3. The bounds are far apart: the assertion is about which address is slowed.
    answer, _ = log_in(stack, "127.0.0.2", password="wrong-through-haproxy")
    assert answer.startswith(b"-ERR")
    answer, other = log_in(stack, "127.0.0.3")
    assert answer.startswith(b"+OK")
    answer, same = log_in(stack, "127.0.0.2")
    assert answer.startswith(b"+OK")  # and the success resets Dovecot's penalty
    assert same >= 3.0, f"127.0.0.2 was not slowed ({same:.2f} s)"
    assert other < 2.0, f"127.0.0.3 was slowed too ({other:.2f} s)"
    lines = dovecot_logins(trusting, offset, 5)
    assert [re.findall(r"rip=([\d.]+),", line) for line in lines[3:]] == [["127.0.0.3"], ["127.0.0.2"]], lines

    # Several health-check intervals, on both backends of both instances, reached popproxy...
    deadline = time.monotonic() + 20
    while min(first.health_checks(), second.health_checks()) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert min(first.health_checks(), second.health_checks()) >= 8
    assert stack.haproxy is not None
    rows = stack.haproxy.servers()
    assert all(row["check_status"] == "L7OK" and row["chkfail"] == "0" for row in rows), rows

    # ...and left no record: every audit record is a test client's, in both instances' logs.
    records = audit_when_closed(stack.instances, count=6)
    assert {r["client_host"] for r in records} <= set(CLIENTS), {r["client_host"] for r in records}
    opened = [str(r["client_host"]) for r in records if r["event"] == "session_open"]
    assert sorted(opened) == ["127.0.0.2"] * 5 + ["127.0.0.3"], opened
    for instance in (first, second):
        assert any(r["event"] == "auth" and r["client_host"] == "127.0.0.2" and r.get("result") == "ok"
                   for r in instance.audit()), instance.audit()
        events = instance.process.events()
        hosts = {e.get("client_host") for e in events if e.get("event") == "session_open"}
        assert hosts and hosts <= set(CLIENTS), hosts
        closed = {e.get("client_host") for e in events if e.get("event") == "session_close"}
        assert closed <= set(CLIENTS), closed


def test_shipped_haproxy_cfg_is_valid(tmp_path: Path) -> None:
    """conf/haproxy.cfg as shipped, and as the end-to-end test derives it, passes ``haproxy -c``."""
    shipped = Path(__file__).resolve().parents[1] / "conf" / "haproxy.cfg"
    result = check_config(shipped)
    assert result.returncode == 0, result.stdout + result.stderr
    derived = tmp_path / "haproxy.cfg"
    derived.write_text(from_shipped(pop3_port=free_port(), pop3s_port=free_port(), inter="200ms",
                                    servers=[(free_port(), free_port()), (free_port(), free_port())],
                                    stats_socket=tmp_path / "haproxy.sock"))
    result = check_config(derived)
    assert result.returncode == 0, result.stdout + result.stderr
    # What the shipped file must keep saying (the end-to-end test relies on each).
    text = shipped.read_text()
    for needed in ("mode tcp", "balance leastconn", "send-proxy-v2", "check-send-proxy", "tcp-check expect string +OK"):
        assert needed in text, needed
    broken = tmp_path / "broken.cfg"
    broken.write_text(text.replace("balance leastconn", "balance leastconnections", 1))
    assert check_config(broken).returncode != 0  # haproxy -c does refuse a bad file
