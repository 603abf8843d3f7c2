"""Three real clients through popproxy to a real Dovecot, in every TLS combination (issue "part 2").

The matrix is listener TLS (none, starttls, implicit) x upstream TLS (none, starttls, implicit).
Routing is per user, not per listener, so the module runs one ``twistd -n popproxy`` per upstream
mode, each with a listener of every client-side mode: (listener, upstream) picks the port.

Each cell is fetched by Python's ``poplib``, by ``curl`` and by ``fetchmail`` (once peeking with
``TOP n 99999999``, once with ``RETR``), and what each client stores is compared with what Dovecot
serves. Every certificate is checked for real, by name: the clients trust only the run's CA and
connect to ``localhost`` (the proxy's certificate names it); the proxy checks Dovecot's certificate
against ``dovecot.ca_path`` and the name ``localhost``. What the clients do to the messages, as
measured with curl 7.88 and fetchmail 6.4.37:

- poplib un-stuffs and hands back lines without their CRLF: joined with CRLF they are exactly
  ``MailUser.messages``.
- curl writes the message exactly as it came, CRLF line endings kept, after removing the
  dot-stuffing (it also drops the terminating ``.`` line): the bytes are ``MailUser.messages``.
- fetchmail un-stuffs and turns CRLF into LF for an MDA (delivered = ``to_lf(message)``); without
  ``--invisible`` it puts a ``Received:`` header of its own in front. It uses ``TOP n 99999999``
  instead of ``RETR`` only with ``uidl`` and without ``fetchall`` (``fetchall`` forces ``RETR``, with
  or without ``uidl``); with ``keep`` and no ``uidl`` it asks ``LAST`` (Dovecot says -ERR) and then
  ``RETR``s everything. It tries STLS by default, even where CAPA does not offer it, so a plain
  listener needs ``sslproto ""``. It checks the certificate's DNS names only, against the name it
  polls (``127.0.0.1`` fails although the certificate has that IP address).

The module also covers an ``address`` list that fails over, ``login_as = "{local}"``, and the
upstream TLS facts in the ``session_close`` event.
"""

from __future__ import annotations

import base64
import hashlib
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority, write_private

from support.configs import _table
from support.dovecot import DovecotServer, MailUser
from support.fetchmail import FetchmailRun, fetchmail_poll, sent_commands
from support.mailbox import CRLF, corpus, to_lf
from support.pop3client import RawPOP3, open_poplib, retrieve, sha256
from support.proxyproc import ProxyProcess, free_port

MODES = ("none", "starttls", "implicit")
CELLS = [(listener, upstream) for listener in MODES for upstream in MODES]
CELL_IDS = [f"listen-{listener}-up-{upstream}" for listener, upstream in CELLS]

USER = "matrix"
PASSWORD = "matrix-pw-7c1e5"  # unique: the module checks that it never reaches a proxy log

CURL = shutil.which("curl")
FETCHMAIL = shutil.which("fetchmail")


def _tool(path: str | None, name: str, package: str) -> str:
    if path is None:
        pytest.fail(
            f"{name} is not installed, but these tests run it against popproxy: run scripts/test "
            f"(its scripts/setup installs {package}), or install {package} yourself.",
            pytrace=False,
        )
    return path


def large_message(size: int = 1024 * 1024, seed: int = 2024) -> bytes:
    """About ``size`` octets of base64-looking lines, every 97th starting with a dot (stuffed on
    the wire, so stuffing is exercised across many TCP segments and TLS records)."""
    rng = random.Random(seed)
    head = (
        b"From: Big Sender <big@example.org>\r\n"
        b"To: Mailbox Owner <owner@example.net>\r\n"
        b"Subject: [matrix] one megabyte\r\n"
        b"Message-ID: <matrix.large.1@popproxy.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    lines = []
    total = len(head)
    number = 0
    while total < size:
        line = base64.b64encode(rng.randbytes(57))
        if number % 97 == 0:
            line = b"." + line[1:]
        lines.append(line + CRLF)
        total += len(line) + 2
        number += 1
    lines.append(b".\r\n")  # the last line is a lone dot: "..\r\n.\r\n" ends the wire form
    return head + b"".join(lines)


@dataclass
class Matrix:
    user: MailUser
    cafile: Path  # the CA the clients trust for the proxy's certificate
    proxies: dict[str, ProxyProcess]  # by upstream TLS mode
    ports: dict[tuple[str, str], int]  # (listener mode, upstream mode) -> port
    closed_port: int  # the failover upstream's first address: nobody listens there

    def port(self, listener: str, upstream: str) -> int:
        return self.ports[(listener, upstream)]


def _upstream_table(mode: str, dovecot: DovecotServer) -> dict[str, object]:
    """Dovecot in ``mode``, with verification on: against its CA, by the name ``localhost``."""
    if mode == "none":
        return {"address": f"127.0.0.1:{dovecot.plain_port}", "tls": "none", "connect_timeout": 5}
    if mode == "starttls":
        # server_name defaults to the address's host: "localhost".
        return {"address": f"localhost:{dovecot.plain_port}", "tls": "starttls", "ca": str(dovecot.ca_path),
                "connect_timeout": 5}
    return {"address": f"127.0.0.1:{dovecot.tls_port}", "tls": "implicit", "ca": str(dovecot.ca_path),
            "server_name": "localhost", "connect_timeout": 5}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer, ca: CertificateAuthority) -> Iterator[Matrix]:
    user = dovecot.add_user(USER, PASSWORD, corpus(8, seed=8080, large=False) + [large_message()])
    folder = tmp_path_factory.mktemp("matrix")
    certificate = write_private(folder / "proxy.pem", ca.issue(["localhost", "127.0.0.1"]).combined_pem)
    cafile = folder / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    closed_port = free_port()
    ports: dict[tuple[str, str], int] = {}
    proxies: dict[str, ProxyProcess] = {}
    try:
        for upstream in MODES:
            workdir = folder / f"up-{upstream}"
            workdir.mkdir()
            parts = []
            for listener in MODES:
                ports[(listener, upstream)] = port = free_port()
                table: dict[str, object] = {"endpoint": f"tcp:{port}:interface=127.0.0.1", "tls": listener}
                if listener != "none":
                    table["certificate"] = str(certificate)
                if listener == "starttls":
                    table["require_tls"] = True
                parts.append("[[listen]]\n" + _table(table))
            parts.append("[upstream.dovecot]\n" + _table(_upstream_table(upstream, dovecot)))
            routes = ""
            if upstream == "starttls":
                # The first address refuses the connection; the second is Dovecot.
                failover = _upstream_table("starttls", dovecot)
                failover["address"] = [f"localhost:{closed_port}", f"localhost:{dovecot.plain_port}"]
                failover["server_name"] = "localhost"
                failover["login_as"] = "{local}"
                parts.append("[upstream.failover]\n" + _table(failover))
                routes = '"@failover.test" = "failover"\n'
            if upstream == "implicit":
                local = _upstream_table("implicit", dovecot) | {"login_as": "{local}"}
                parts.append("[upstream.local]\n" + _table(local))
                routes = '"matrix@example.org" = "local"\n'
            parts.append('[routing]\ndefault = "dovecot"\n[routing.users]\n' + routes)
            config = workdir / "popproxy.toml"
            config.write_text("\n".join(parts))
            proxies[upstream] = ProxyProcess(config, [ports[(m, upstream)] for m in MODES], workdir, json=True)
        yield Matrix(user, cafile, proxies, ports, closed_port)
    finally:
        for proxy in proxies.values():
            proxy.stop()
    for proxy in proxies.values():
        log = proxy.log()
        assert PASSWORD not in log
        assert base64.b64encode(PASSWORD.encode()).decode()[:-2] not in log
        assert base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()[:-2] not in log


# --- 1. poplib -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("listener", "upstream"), CELLS, ids=CELL_IDS)
def test_poplib(matrix: Matrix, listener: str, upstream: str) -> None:
    user = matrix.user
    client = open_poplib(listener, matrix.port(listener, upstream), matrix.cafile)
    try:
        if listener == "none":
            assert not isinstance(client.sock, ssl.SSLSocket)
        else:
            assert isinstance(client.sock, ssl.SSLSocket)
        client.user(user.name)
        client.pass_(user.password)
        assert client.stat() == (len(user.messages), user.total_size)
        _, listing, _ = client.list()
        assert listing == [b"%d %d" % (i + 1, size) for i, size in enumerate(user.sizes)]
        _, uidls, _ = client.uidl()
        assert uidls == [b"%d %s" % (i + 1, uid.encode()) for i, uid in enumerate(user.uidls)]
        for number, expected in enumerate(user.messages, start=1):
            assert sha256(retrieve(client, number)) == sha256(expected), f"message {number}"
    finally:
        client.quit()


# --- 2. curl ---------------------------------------------------------------------------------------


def _curl_args(matrix: Matrix, listener: str, upstream: str, cafile: Path) -> tuple[list[str], str]:
    port = matrix.port(listener, upstream)
    base = f"pop3s://localhost:{port}" if listener == "implicit" else f"pop3://localhost:{port}"
    args = [_tool(CURL, "curl", "curl"), "--silent", "--show-error", "--verbose", "--max-time", "60",
            "--cacert", str(cafile), "--user", f"{USER}:{PASSWORD}"]
    if listener == "starttls":
        args.append("--ssl-reqd")  # STLS, and fail rather than go on in plain text
    return args, base


@pytest.mark.parametrize(("listener", "upstream"), CELLS, ids=CELL_IDS)
def test_curl(matrix: Matrix, listener: str, upstream: str, tmp_path: Path) -> None:
    """``curl pop3://host/N`` prints message N; ``pop3://host/`` prints the LIST answer's lines.

    curl removes the dot-stuffing and the terminator but keeps CRLF line endings, so its output is
    compared with the messages exactly, with no normalising at all.
    """
    user = matrix.user
    args, base = _curl_args(matrix, listener, upstream, matrix.cafile)
    numbers = range(1, len(user.messages) + 1)
    for number in numbers:
        args += [f"{base}/{number}", "--output", str(tmp_path / f"msg.{number}")]
    args += [f"{base}/", "--output", str(tmp_path / "list")]
    result = subprocess.run(args, capture_output=True, timeout=120, check=False)
    transcript = result.stderr.decode(errors="replace")
    assert result.returncode == 0, transcript
    for number in numbers:
        assert sha256((tmp_path / f"msg.{number}").read_bytes()) == sha256(user.messages[number - 1]), f"message {number}"
    assert (tmp_path / "list").read_bytes() == b"".join(b"%d %d\r\n" % (n, user.sizes[n - 1]) for n in numbers)
    if listener == "starttls":
        assert "> STLS" in transcript
    if listener == "none":
        assert "> STLS" not in transcript and "SSL connection using" not in transcript
    else:
        assert "SSL certificate verify ok" in transcript


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_curl_checks_the_proxy_certificate(matrix: Matrix, listener: str, tmp_path: Path) -> None:
    """The same command with a CA that did not issue the proxy's certificate fails (curl exit 60)
    before it sends a password: the passing runs above really checked the certificate."""
    stranger = tmp_path / "stranger-ca.pem"
    stranger.write_bytes(CertificateAuthority.create("stranger CA").cert_pem)
    args, base = _curl_args(matrix, listener, "none", stranger)
    result = subprocess.run([*args, f"{base}/1"], capture_output=True, timeout=60, check=False)
    transcript = result.stderr.decode(errors="replace")
    assert result.returncode == 60, transcript
    assert "SSL certificate problem: self-signed certificate in certificate chain" in transcript
    assert "> USER" not in transcript and "> AUTH" not in transcript


# --- 3. fetchmail ----------------------------------------------------------------------------------

def run_fetchmail(folder: Path, port: int, listener: str, **options: object) -> FetchmailRun:
    return fetchmail_poll(folder, port, listener, user=USER, password=PASSWORD, **options)  # type: ignore[arg-type]


def _sent(transcript: str) -> list[str]:
    return sent_commands(transcript)


@pytest.mark.parametrize("uidl", [True, False], ids=["uidl-top", "retr"])
@pytest.mark.parametrize(("listener", "upstream"), CELLS, ids=CELL_IDS)
def test_fetchmail(matrix: Matrix, listener: str, upstream: str, uidl: bool, tmp_path: Path) -> None:
    """fetchmail turns CRLF into LF for the MDA and un-stuffs; with ``--invisible`` it adds nothing."""
    user = matrix.user
    run = run_fetchmail(tmp_path, matrix.port(listener, upstream), listener, uidl=uidl, cafile=matrix.cafile)
    assert run.returncode == 0, run.transcript  # 0: mail was retrieved
    sent = _sent(run.transcript)
    count = len(user.messages)
    if uidl:
        assert "UIDL" in sent
        assert [c for c in sent if c.startswith("TOP ")] == [f"TOP {n} 99999999" for n in range(1, count + 1)]
        assert not any(c.startswith("RETR") for c in sent)
    else:
        assert "UIDL" not in sent
        assert [c for c in sent if c.startswith("RETR ")] == [f"RETR {n}" for n in range(1, count + 1)]
        assert not any(c.startswith("TOP") for c in sent)
    assert not any(c.startswith("DELE") for c in sent)  # keep
    assert ("STLS" in sent) == (listener == "starttls")
    if listener == "none":
        assert "SSL/TLS: using protocol" not in run.transcript
    else:
        assert "SSL/TLS: using protocol TLSv1." in run.transcript
        assert "Subject CommonName: localhost" in run.transcript
        assert "verify_ok == 0" not in run.transcript
    assert len(run.delivered) == count, run.transcript
    for number, (got, expected) in enumerate(zip(run.delivered, user.messages, strict=True), start=1):
        assert sha256(got) == sha256(to_lf(expected)), f"message {number}"


def test_fetchmail_adds_received_unless_invisible(matrix: Matrix, tmp_path: Path) -> None:
    """Without ``--invisible`` each delivered message is fetchmail's ``Received:`` header (folded
    over several lines) in front of the LF form of the message; otherwise unchanged."""
    user = matrix.user
    run = run_fetchmail(tmp_path, matrix.port("implicit", "implicit"), "implicit", uidl=False,
                        cafile=matrix.cafile, invisible=False)
    assert run.returncode == 0, run.transcript
    assert len(run.delivered) == len(user.messages)
    for number, (got, expected) in enumerate(zip(run.delivered, user.messages, strict=True), start=1):
        assert got.startswith(b"Received: from localhost"), f"message {number}"
        _, _, rest = got.partition(b"\n")
        while rest[:1] in (b" ", b"\t"):  # the header's continuation lines
            _, _, rest = rest.partition(b"\n")
        assert sha256(rest) == sha256(to_lf(expected)), f"message {number}"


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
def test_fetchmail_checks_the_proxy_certificate(matrix: Matrix, listener: str, tmp_path: Path) -> None:
    """With a CA that did not issue the proxy's certificate fetchmail gives up before logging in."""
    stranger = tmp_path / "stranger-ca.pem"
    stranger.write_bytes(CertificateAuthority.create("stranger CA").cert_pem)
    run = run_fetchmail(tmp_path, matrix.port(listener, "none"), listener, uidl=False, cafile=stranger)
    assert run.returncode == 2, run.transcript  # 2: socket or TLS error (0: mail, 1: no mail)
    assert "Server certificate verification error" in run.transcript
    assert "USER" not in _sent(run.transcript)
    assert run.delivered == []


def test_fetchmail_checks_the_proxy_certificate_name(matrix: Matrix, tmp_path: Path) -> None:
    """fetchmail compares the name it was told to poll with the certificate's DNS names only: polling
    ``127.0.0.1`` fails although the proxy's certificate has that IP address in its subjectAltName
    (seen with fetchmail 6.4), which is why every other run polls ``localhost``."""
    run = run_fetchmail(tmp_path, matrix.port("implicit", "none"), "implicit", uidl=False,
                        cafile=matrix.cafile, host="127.0.0.1")
    assert run.returncode == 2, run.transcript
    assert "Server certificate verification error: hostname mismatch" in run.transcript
    assert "USER" not in _sent(run.transcript)
    assert run.delivered == []


# --- 4. upstream features --------------------------------------------------------------------------


def _wait_for(proxy: ProxyProcess, match: dict[str, object], timeout: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in proxy.events() if all(e.get(k) == v for k, v in match.items())]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no event {match} in:\n{proxy.log()[-4000:]}")
        time.sleep(0.05)


def _session(matrix: Matrix, listener: str, upstream: str, name: str) -> int:
    """Log in as ``name``, check the mailbox is the matrix user's, QUIT; return the client's port."""
    client = open_poplib(listener, matrix.port(listener, upstream), matrix.cafile)
    try:
        local_port = client.sock.getsockname()[1]
        client.user(name)
        client.pass_(PASSWORD)
        assert client.stat() == (len(matrix.user.messages), matrix.user.total_size)
        assert sha256(retrieve(client, 2)) == sha256(matrix.user.messages[1])
    finally:
        client.quit()
    return local_port


def test_address_list_fails_over_to_the_second_address(matrix: Matrix) -> None:
    proxy = matrix.proxies["starttls"]
    port = _session(matrix, "implicit", "starttls", "matrix@failover.test")
    ended = _wait_for(proxy, {"event": "session_close", "client_port": port})
    assert ended["user"] == "matrix@failover.test"
    assert ended["upstream"] == "failover"
    assert ended["upstream_peer_cert_sha256"]  # the second address, over verified STLS
    # The first address was tried, in this very session, and refused.
    unreachable = [e for e in proxy.events() if e.get("session_id") == ended["session_id"]
                   and "unreachable" in str(e.get("message"))]
    assert [e["address"] for e in unreachable] == [f"localhost:{matrix.closed_port}"]


def test_login_as_local_part(matrix: Matrix, dovecot: DovecotServer) -> None:
    proxy = matrix.proxies["implicit"]
    logins_before = dovecot.log_text().count(f"Login: user=<{USER}>")
    port = _session(matrix, "starttls", "implicit", "matrix@example.org")
    ended = _wait_for(proxy, {"event": "session_close", "client_port": port})
    assert ended["user"] == "matrix@example.org"
    assert ended["upstream"] == "local"
    # Dovecot saw the local part only (it knows no "matrix@example.org": that login would fail).
    assert dovecot.log_text().count(f"Login: user=<{USER}>") == logins_before + 1
    assert "user=<matrix@example.org>" not in dovecot.log_text()


def _served_certificate(dovecot: DovecotServer, upstream: str) -> bytes:
    """The DER certificate Dovecot presents on the port the ``upstream`` mode uses."""
    if upstream == "implicit":
        pem = ssl.get_server_certificate((dovecot.host, dovecot.tls_port))
        return ssl.PEM_cert_to_DER_cert(pem)
    raw = RawPOP3(dovecot.plain_port)
    raw.answer()
    assert raw.command(b"STLS").startswith(b"+OK")
    raw.start_tls(dovecot.ca_path)
    assert isinstance(raw.sock, ssl.SSLSocket)
    der = raw.sock.getpeercert(binary_form=True)
    raw.command(b"QUIT")
    assert der is not None
    return der


@pytest.mark.parametrize("upstream", MODES)
def test_session_ended_carries_upstream_tls_facts(matrix: Matrix, dovecot: DovecotServer, upstream: str) -> None:
    proxy = matrix.proxies[upstream]
    port = _session(matrix, "implicit", upstream, USER)
    ended = _wait_for(proxy, {"event": "session_close", "client_port": port})
    assert ended["upstream"] == "dovecot" and ended["ended"] == "quit"
    assert ended["client_tls_version"] in ("TLSv1.2", "TLSv1.3")
    if upstream == "none":
        assert not [key for key in ended if key.startswith(("upstream_tls", "upstream_peer"))]
        return
    assert ended["upstream_tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert isinstance(ended["upstream_tls_cipher"], str) and ended["upstream_tls_cipher"]
    served = hashlib.sha256(_served_certificate(dovecot, upstream)).hexdigest()
    assert served == dovecot.leaf.sha256_fingerprint
    assert ended["upstream_peer_cert_sha256"] == served
