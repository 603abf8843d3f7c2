"""Issue 12, finding 1: a reload identifies listeners by their normalised endpoint, not position.

Real ``twistd -n popproxy`` (one process, and ``[process] workers = 2``), real SIGHUP, the run's
Dovecot upstream, and raw POP3 clients. Before the fix, reordering the ``[[listen]]`` tables and
reloading made the STLS port answer ``USER`` with ``+OK`` before STLS although it had
``require_tls = true``, and the implicit-TLS port refused logins.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority, write_private

from support.dovecot import DovecotServer, MailUser
from support.pop3client import RawPOP3, tls_context
from support.proxyproc import ProxyProcess, free_port

#: connections per check: with two workers the kernel hands each to either, so several reach both
ATTEMPTS = 6


def _write(config: Path, tables: list[str], dovecot: DovecotServer, workers: int, default: str = "dovecot") -> None:
    config.write_text(
        f"[process]\nworkers = {workers}\n" + "".join(tables)
        + f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        + f'[upstream.down]\naddress = "127.0.0.1:{free_port()}"\ntls = "none"\nconnect_timeout = 2\n'
        + f'[routing]\ndefault = "{default}"\n'
    )


def _stls_port_refuses_plaintext_then_logs_in(port: int, user: MailUser, cafile: Path) -> None:
    raw = RawPOP3(port)
    try:
        assert raw.answer().startswith(b"+OK")
        assert raw.command(b"USER " + user.name.encode()).startswith(b"-ERR"), "USER answered before STLS"
        assert raw.command(b"STLS").startswith(b"+OK")
        raw.start_tls(cafile)
        assert raw.command(b"USER " + user.name.encode()).startswith(b"+OK")
        assert raw.command(b"PASS " + user.password.encode()) == b"+OK Logged in.\r\n"
        raw.command(b"QUIT")
    finally:
        raw.close()


def _implicit_port_logs_in(port: int, user: MailUser, cafile: Path) -> None:
    plain = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw = RawPOP3(0, sock=tls_context(cafile).wrap_socket(plain, server_hostname="localhost"))
    try:
        assert raw.answer().startswith(b"+OK")
        assert raw.command(b"USER " + user.name.encode()).startswith(b"+OK")
        assert raw.command(b"PASS " + user.password.encode()) == b"+OK Logged in.\r\n"
        raw.command(b"QUIT")
    finally:
        raw.close()


def _events(proxy: ProxyProcess, name: str) -> list[dict[str, object]]:
    return [e for e in proxy.events() if e.get("event") == name]


def _wait_for(proxy: ProxyProcess, name: str, count: int, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while len(found := _events(proxy, name)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} events:\n{proxy.log()[-4000:]}"
        time.sleep(0.05)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_reordered_listen_tables_keep_stls_and_implicit_ports_as_they_were(
        tmp_path: Path, dovecot: DovecotServer, ca: CertificateAuthority, workers: int) -> None:
    stls, implicit = free_port(), free_port()
    certificate = write_private(tmp_path / "proxy.pem", ca.issue(["localhost"]).combined_pem)
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    stls_table = (f'[[listen]]\nendpoint = "tcp:{stls}:interface=127.0.0.1"\ntls = "starttls"\nrequire_tls = true\n'
                  f'certificate = "{certificate}"\n')
    implicit_table = f'[[listen]]\nendpoint = "tcp:{implicit}:interface=127.0.0.1"\ntls = "implicit"\ncertificate = "{certificate}"\n'
    config = tmp_path / "popproxy.toml"
    _write(config, [stls_table, implicit_table], dovecot, workers)
    proxy = ProxyProcess(config, [stls, implicit], tmp_path, json=True)
    dave = dovecot.users["dave"]
    reloads = 1 + (workers if workers > 1 else 0)  # the parent's event, then each worker's
    try:
        if workers > 1:
            _wait_for(proxy, "worker_ready", workers)
        _stls_port_refuses_plaintext_then_logs_in(stls, dave, cafile)
        _implicit_port_logs_in(implicit, dave, cafile)

        # The same listeners in the other order, the implicit one's endpoint spelt another way.
        respelt = implicit_table.replace(f"tcp:{implicit}:", f"tcp:port={implicit}:")
        _write(config, [respelt, stls_table], dovecot, workers)
        proxy.process.send_signal(signal.SIGHUP)
        _wait_for(proxy, "reloaded", reloads)
        for _ in range(ATTEMPTS):
            _stls_port_refuses_plaintext_then_logs_in(stls, dave, cafile)
            _implicit_port_logs_in(implicit, dave, cafile)

        if workers > 1:
            # A worker started after the reload runs the reordered file: it must get each socket
            # under the key its endpoint has now.
            pid = int(_events(proxy, "worker_started")[-1]["pid"])  # type: ignore[call-overload]
            started = len(_events(proxy, "worker_started"))
            ready = len(_events(proxy, "worker_ready"))
            os.kill(pid, signal.SIGKILL)
            _wait_for(proxy, "worker_started", started + 1)
            _wait_for(proxy, "worker_ready", ready + 1)
            for _ in range(ATTEMPTS):
                _stls_port_refuses_plaintext_then_logs_in(stls, dave, cafile)
                _implicit_port_logs_in(implicit, dave, cafile)

        # A new listener (and new routing): the whole reload is refused, in one log line.
        extra = f'[[listen]]\nendpoint = "tcp:{free_port()}:interface=127.0.0.1"\ntls = "none"\n'
        _write(config, [respelt, stls_table, extra], dovecot, workers, default="down")
        proxy.process.send_signal(signal.SIGHUP)
        failed = _wait_for(proxy, "reload_failed", 1)
        time.sleep(0.3)
        assert len(_events(proxy, "reload_failed")) == 1
        assert "listen[2]" in str(failed[0]["error"]) and "needs a restart" in str(failed[0]["error"])
        assert len(_events(proxy, "reloaded")) == reloads  # no worker was even asked
        for _ in range(ATTEMPTS):  # the running routing (dovecot, not "down") and listeners stay
            _stls_port_refuses_plaintext_then_logs_in(stls, dave, cafile)
            _implicit_port_logs_in(implicit, dave, cafile)
    finally:
        proxy.stop()


def test_a_reload_switches_a_live_port_from_starttls_to_implicit(
        tmp_path: Path, dovecot: DovecotServer, ca: CertificateAuthority) -> None:
    """``tls`` of an existing listener applies to the next connection, without a restart: the port
    that offered STLS greets in TLS after the reload, and the other way round."""
    one, two = free_port(), free_port()
    certificate = write_private(tmp_path / "proxy.pem", ca.issue(["localhost"]).combined_pem)
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    config = tmp_path / "popproxy.toml"

    def tables(first: str, second: str) -> list[str]:
        return [f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "{tls}"\ncertificate = "{certificate}"\n'
                for port, tls in ((one, first), (two, second))]

    _write(config, tables("starttls", "implicit"), dovecot, 1)
    proxy = ProxyProcess(config, [one, two], tmp_path, json=True)
    dave = dovecot.users["dave"]
    try:
        _stls_port_refuses_plaintext_then_logs_in(one, dave, cafile)
        _implicit_port_logs_in(two, dave, cafile)
        _write(config, tables("implicit", "starttls"), dovecot, 1)
        proxy.process.send_signal(signal.SIGHUP)
        _wait_for(proxy, "reloaded", 1)
        _implicit_port_logs_in(one, dave, cafile)
        _stls_port_refuses_plaintext_then_logs_in(two, dave, cafile)
    finally:
        proxy.stop()
