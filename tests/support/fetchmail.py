"""fetchmail as a test client: one poll, its own FETCHMAILHOME and rcfile, one file per message."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

FETCHMAIL = shutil.which("fetchmail")

MDA = """#!/bin/sh
# One file per message, numbered in delivery order (fetchmail delivers one message at a time).
n=$(ls "$1" | wc -l)
exec cat > "$1/msg.$((n + 1))"
"""


@dataclass
class FetchmailRun:
    returncode: int
    transcript: str
    delivered: list[bytes]


def fetchmail_poll(
    folder: Path,
    port: int,
    listener: str,
    *,
    user: str,
    password: str,
    uidl: bool,
    cafile: Path,
    invisible: bool = True,
    host: str = "localhost",
) -> FetchmailRun:
    """One ``fetchmail`` poll of ``host:port``, with its own FETCHMAILHOME and rcfile, ``keep``
    (the user's mail stays), certificate checks on, delivering each message to its own file."""
    if FETCHMAIL is None:
        pytest.fail("fetchmail is not installed: run scripts/test, which installs it", pytrace=False)
    fetchmail = FETCHMAIL
    home = folder / "fetchmailhome"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    out = folder / "delivered"
    out.mkdir()
    mda = folder / "mda.sh"
    mda.write_text(MDA)
    mda.chmod(0o755)
    if listener == "none":
        # fetchmail 6.4 sends STLS by default even when CAPA does not list it, and gives up (status
        # 2, before USER) on the -ERR; sslproto "" makes it speak plain POP3.
        tls = 'sslproto ""'
    elif listener == "starttls":
        tls = "sslproto tls1.2+ sslcertck"  # STLS, required (no "ssl": that is implicit TLS)
    else:
        tls = "ssl sslproto tls1.2+ sslcertck"
    # uidl (a server option) without fetchall: fetchmail peeks with TOP n 99999999; fetchall would
    # force RETR. Without uidl, fetchall makes it fetch everything (it asks LAST otherwise).
    server = " uidl" if uidl else ""
    options = "keep" if uidl else "keep fetchall"
    rc = folder / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll {host} with proto POP3 port {port}{server}\n"
        f'  user "{user}" there with password "{password}" is "root" here\n'
        f'  options {options} {tls} sslcertfile "{cafile}"\n'
        f'  mda "{mda} {out}"\n'
    )
    rc.chmod(0o600)
    args = [fetchmail, "-f", str(rc), "-v", "-v", "--nodetach", "--norewrite"]
    if invisible:
        args.append("--invisible")
    result = subprocess.run(
        args,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "FETCHMAILHOME": str(home), "HOME": str(home)},
    )
    delivered = [(out / f"msg.{n}").read_bytes() for n in range(1, len(os.listdir(out)) + 1)]
    transcript = (result.stdout + result.stderr).decode(errors="replace")
    return FetchmailRun(result.returncode, transcript, delivered)


def sent_commands(transcript: str) -> list[str]:
    """The commands fetchmail logged sending (``-v -v``: ``fetchmail: POP3> LINE``)."""
    return [line.split("POP3> ", 1)[1] for line in transcript.splitlines() if "POP3> " in line]


