"""A real ClamAV clamd as a test fixture, with a signature database the test writes.

``ClamdServer`` writes a ``clamd.conf`` of its own (nothing from ``/etc/clamav``) and a database
folder holding one hash signature (``popproxy-test.hdb``: ``md5:size:Eicar-Test-Signature``, for
the EICAR test file), and runs ``clamd`` in the foreground, listening on a free 127.0.0.1 port
(``TCPSocket``) and on a Unix socket (``LocalSocket``) at once. It is ready when ``zPING`` answers
``PONG`` on both, well under a second after the start on this kind of machine: with one signature
there is nothing to compile. No freshclam, no network, no official database: results are the same
on every machine.

- clamd refuses to start with an empty database folder, hence the signature file; ``Bytecode no``
  because there is no bytecode database either.
- A hash signature matches a whole file: clamd's mail parser takes the message apart and hashes each
  attachment, so :func:`eicar_message` carries EICAR as a base64 attachment, the way a virus comes.
  clamd adds ``.UNOFFICIAL`` to the name of a signature that is not from ClamAV's own databases:
  it reports :data:`SIGNATURE_FOUND`.
- ``StreamMaxLength`` is :data:`STREAM_MAX_LENGTH` (64 KiB), so that a test can get ``INSTREAM size
  limit exceeded. ERROR`` with a message of a few hundred KiB.
- No ``User`` setting: clamd runs as whoever starts it (root in CI and in this lab). The tree still
  lives where :class:`support.spamd.ScannerProcess` puts it.
- The ``clamd`` fixture (:func:`clamd_fixture`) is shared by every test module that imports it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from .spamd import ScannerError, ScannerProcess

CLAMD = shutil.which("clamd", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")

#: The EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/), 68 octets.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Eicar-Test-Signature"
#: What clamd reports for :data:`SIGNATURE` (not from ClamAV's own databases: "UNOFFICIAL").
SIGNATURE_FOUND = SIGNATURE + ".UNOFFICIAL"
#: clamd's ``StreamMaxLength`` in this fixture.
STREAM_MAX_LENGTH = 64 * 1024

CONFIG = """\
# popproxy test fixture: self-contained (nothing from /etc/clamav), loopback only, no network.
Foreground yes
DatabaseDirectory {root}/db
TemporaryDirectory {root}/tmp
LocalSocket {socket}
FixStaleSocket yes
TCPSocket {port}
TCPAddr 127.0.0.1
PidFile {root}/clamd.pid
LogFile {root}/clamd.log
LogTime yes
LogSyslog no
Bytecode no
SelfCheck 0
MaxThreads 4
StreamMaxLength {stream_max_length}
"""


def eicar_message(subject: bytes = b"Invoice 2026-118") -> bytes:
    """A message as a POP3 server delivers it, with EICAR as a base64 attachment after a text part."""
    return (
        b"Return-Path: <billing@example.net>\r\n"
        b"Received: from mx.example.net (mx.example.net [198.51.100.7])\r\n"
        b"\tby pop.example.org with ESMTP id 8F3B2; Tue, 1 Dec 2026 10:12:03 +0000\r\n"
        b"From: Billing <billing@example.net>\r\n"
        b"To: Bob Example <bob@example.org>\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Tue, 1 Dec 2026 10:12:00 +0000\r\n"
        b"Message-ID: <invoice-2026-118@example.net>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"Please find the invoice attached.\r\n"
        b".a line that starts with a dot\r\n"
        b"--b1\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="invoice.com"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--b1--\r\n"
    )


class ClamdServer(ScannerProcess):
    """clamd on ``127.0.0.1:port`` and on ``socket_path``, with the EICAR hash signature only."""

    name = "clamd"
    log_name = "clamd.log"

    def __init__(self, workdir: Path, stream_max_length: int = STREAM_MAX_LENGTH) -> None:
        super().__init__(workdir)
        self.stream_max_length = stream_max_length

    @property
    def config_path(self) -> Path:
        return self.root / "clamd.conf"

    def write_config(self) -> None:
        for folder in ("db", "tmp"):
            (self.root / folder).mkdir(exist_ok=True)
        digest = hashlib.md5(EICAR).hexdigest()
        (self.root / "db" / "popproxy-test.hdb").write_text(f"{digest}:{len(EICAR)}:{SIGNATURE}\n")
        self.config_path.write_text(
            CONFIG.format(root=self.root, socket=self.socket_path, port=self.port, stream_max_length=self.stream_max_length)
        )

    def command(self) -> list[str]:
        assert CLAMD is not None
        return [CLAMD, "--config-file", str(self.config_path)]

    def ping(self, sock: socket.socket) -> None:
        """``zPING`` must answer ``PONG``."""
        _ping(sock)


def _ping(sock: socket.socket) -> None:
    sock.sendall(b"zPING\0")
    answer = b""
    while not answer.endswith(b"\0") and (chunk := sock.recv(64)):
        answer += chunk
    if answer != b"PONG\0":
        raise ConnectionError(f"no PONG yet: {answer[:200]!r}")


_SHARED: ClamdServer | None = None


@pytest.fixture(scope="session", name="clamd")
def clamd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    """One real clamd for the whole run: ``clamd.address`` (127.0.0.1, a free port) and
    ``clamd.socket_path``, ``StreamMaxLength`` :data:`STREAM_MAX_LENGTH`, the EICAR signature only.

    Test modules import this fixture; the first that asks starts the server and every other gets
    the same one (a module's copy of a session fixture would otherwise start a clamd of its own).
    It is stopped when the session ends. A clamd that is missing or does not start fails the test.
    """
    global _SHARED
    if CLAMD is None:
        pytest.fail(
            "clamd is not installed, but the clamav hook tests need a real one: run scripts/test "
            "(its scripts/setup installs clamav-daemon), or install it yourself.",
            pytrace=False,
        )
    if _SHARED is None or not _SHARED.running:
        server = ClamdServer(tmp_path_factory.mktemp("clamd"))
        try:
            server.start()
        except ScannerError as error:
            server.close()
            pytest.fail(f"clamd did not start: {error}", pytrace=False)
        _SHARED = server
    try:
        yield _SHARED
    finally:
        if _SHARED is not None:
            _SHARED.close()
            _SHARED = None
