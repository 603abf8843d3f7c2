"""Issue 12, finding 2: certificates after ``-u``/``-g``.

The model (conf/popproxy.toml, README "Running it"): every file a reload reads (the configuration,
certificates and keys, CA files, hook files) must be readable by the user twistd drops to, e.g. keys
owned by root, group ``popproxy`` (here ``nogroup``), mode 0640. Start and ``--check`` check it as
that user (a child process becomes the user as twistd does and opens each file) and refuse a file it
cannot read, naming it; before the fix a root-only key loaded at start, and the SIGHUP after the
first renewal failed with "Permission denied" in the log.

Started as root, as admins do (CI runs the suite as root).
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popproxy.pki import CertificateAuthority

from support.dovecot import DovecotServer
from support.pop3client import RawPOP3, tls_context
from support.proxyproc import TWISTD, ProxyProcess, free_port

USER, GROUP = "nobody", "nogroup"
POPPROXY = str(Path(TWISTD).with_name("popproxy"))  # the console script next to twistd


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the unprivileged user can enter (pytest's own temporary folders are 0700 root)."""
    if os.geteuid() != 0:
        pytest.fail("this test starts twistd as root, as admins do; run the suite as root (CI does)", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="popproxy-keys-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _ids() -> tuple[int, int]:
    return pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid


def _install(path: Path, pem: bytes, mode: int, group: int = 0) -> None:
    """Put key material at ``path`` as a renewal tool would: a new file, owner and mode set, renamed
    over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(pem)
    os.chown(fresh, 0, group)
    fresh.chmod(mode)
    os.replace(fresh, path)


def _config(folder: Path, port: int, certificate: Path, dovecot_port: int, workers: int) -> Path:
    config = folder / "popproxy.toml"
    config.write_text(
        f"[process]\nworkers = {workers}\n"
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "implicit"\ncertificate = "{certificate}"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot_port}"\ntls = "none"\n[routing]\ndefault = "dovecot"\n'
    )
    config.chmod(0o644)
    return config


def _twistd(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    uid, gid = _ids()
    try:
        return subprocess.run([TWISTD, "-n", "--pidfile", str(folder / "popproxy.pid"), "--logfile",
                               str(folder / "popproxy.log"), "-u", str(uid), "-g", str(gid), "popproxy", *args],
                              cwd=folder, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # it started, which it must not: subprocess.run killed it
        return subprocess.CompletedProcess([], -1, "", "it started and kept running")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_key_the_service_user_cannot_read_is_named_by_check_and_refused_at_start(
        workdir: Path, ca: CertificateAuthority, workers: int) -> None:
    certificate = workdir / "tls.pem"
    _install(certificate, ca.issue(["localhost"]).combined_pem, 0o600)  # root only, as the old advice had it
    config = _config(workdir, free_port(), certificate, 1110, workers)

    start = _twistd(workdir, "-c", str(config))
    assert start.returncode == 1, start  # before the fix: it started, and the first reload failed
    assert len(start.stderr.splitlines()) == 1 and str(certificate) in start.stderr and USER in start.stderr, start.stderr
    assert not (workdir / "popproxy.pid").exists()

    check = _twistd(workdir, "-c", str(config), "--check")
    assert check.returncode == 1, check
    assert str(certificate) in check.stderr and "listen[0].certificate" in check.stderr
    assert f"user {USER} (group {GROUP}) cannot read it (Permission denied)" in check.stderr
    # The same from the popproxy command, given the unit's User=/Group= (the hardened unit runs
    # without -u/-g, so there is no twistd option to read them from).
    command = subprocess.run([POPPROXY, "check", str(config), "-u", USER, "-g", GROUP], capture_output=True, text=True)
    assert command.returncode == 1 and f"user {USER} (group {GROUP}) cannot read it" in command.stderr, command

    # Readable by the service's group, not by others: accepted.
    _install(certificate, certificate.read_bytes(), 0o640, group=_ids()[1])
    check = _twistd(workdir, "-c", str(config), "--check")
    assert check.returncode == 0 and "configuration OK" in check.stdout, check.stderr
    command = subprocess.run([POPPROXY, "check", str(config), "-u", USER, "-g", GROUP], capture_output=True, text=True)
    assert command.returncode == 0 and "configuration OK" in command.stdout, command


def test_the_configuration_file_itself_must_be_readable(workdir: Path, ca: CertificateAuthority) -> None:
    """A reload reads the configuration file too."""
    certificate = workdir / "tls.pem"
    _install(certificate, ca.issue(["localhost"]).combined_pem, 0o640, group=_ids()[1])
    config = _config(workdir, free_port(), certificate, 1110, 1)
    config.chmod(0o600)
    check = _twistd(workdir, "-c", str(config), "--check")
    assert check.returncode == 1 and f"{config}: -: {config}: user {USER}" in check.stderr, check.stderr


def _served_sha256(port: int, cafile: Path) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        with tls_context(cafile).wrap_socket(plain, server_hostname="localhost") as wrapped:
            return hashlib.sha256(wrapped.getpeercert(binary_form=True)).digest()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_group_readable_key_renewed_and_reloaded_is_served(workdir: Path, ca: CertificateAuthority,
                                                              dovecot: DovecotServer, workers: int) -> None:
    uid, gid = _ids()
    certificate = workdir / "tls.pem"
    _install(certificate, ca.issue(["localhost"]).combined_pem, 0o640, group=gid)
    cafile = workdir / "ca.pem"
    cafile.write_bytes(ca.cert_pem)
    port = free_port()
    config = _config(workdir, port, certificate, dovecot.plain_port, workers)
    proxy = ProxyProcess(config, [port], workdir, extra=("-u", str(uid), "-g", str(gid)), json=True)
    try:
        deadline = time.monotonic() + 30
        while workers > 1 and len([e for e in proxy.events() if e.get("event") == "worker_ready"]) < workers:
            assert time.monotonic() < deadline, proxy.log()[-3000:]
            time.sleep(0.05)
        before = _served_sha256(port, cafile)
        renewed = ca.issue(["localhost"]).combined_pem
        _install(certificate, renewed, 0o640, group=gid)  # what certbot's deploy hook would do
        proxy.process.send_signal(signal.SIGHUP)
        expected = 1 + (workers if workers > 1 else 0)
        while len([e for e in proxy.events() if e.get("event") == "reloaded"]) < expected:
            assert not [e for e in proxy.events() if e.get("event") == "reload_failed"], proxy.log()[-3000:]
            assert time.monotonic() < deadline + 30, proxy.log()[-3000:]
            time.sleep(0.05)
        for _ in range(4):  # every worker serves the new one
            assert _served_sha256(port, cafile) != before
        raw = RawPOP3(0, sock=tls_context(cafile).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                                              server_hostname="localhost"))
        assert raw.answer().startswith(b"+OK")
        raw.close()
    finally:
        proxy.stop()
