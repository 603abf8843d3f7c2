"""A third-party hook from a separately installed package, enabled by entry point and by dotted path,
in front of the real Dovecot; a hook that raises is contained."""

from __future__ import annotations

import os
import poplib
import subprocess
import sys
from pathlib import Path

from support.dovecot import DovecotServer
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

PACKAGE = Path(__file__).parent / "thirdparty" / "popproxy-subject-stamp"


def test_entry_point_and_dotted_path_hooks(tmp_path: Path, dovecot: DovecotServer, monkeypatch) -> None:
    site = tmp_path / "site"
    # A real install by pip (into a folder of its own), so the entry point is what any user gets.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(PACKAGE)],
        check=True, capture_output=True, timeout=120,
    )
    assert list(site.glob("popproxy_subject_stamp-*.dist-info/entry_points.txt"))
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
        '[[hook]]\nuse = "subject-stamp"\nstamp = "[external]"\n'
        '[[hook]]\nuse = "popproxy_subject_stamp:exploding"\nname = "exploding"\non_error = "pass"\n'
        '[[hook]]\nuse = "popproxy_subject_stamp:factory"\nname = "second-stamp"\nstamp = "[again]"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path)
    dave = dovecot.users["dave"]
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("dave")
        client.pass_(dave.password)
        _, listing, _ = client.list()
        for number, original in enumerate(dave.messages, start=1):
            message = retrieve(client, number)
            assert int(listing[number - 1].split()[1]) == len(message)
            subject = next(line for line in message.split(b"\r\n") if line.lower().startswith(b"subject:"))
            assert subject.startswith(b"Subject: [again] [external] ")
            assert message.endswith(original.partition(b"\r\n\r\n")[2])  # the body is untouched
        client.quit()
    finally:
        proxy.stop()
    log = proxy.log()
    assert "hook exploding failed on message 1" in log and "this example hook always fails" in log
