"""The README's demo command serves real clients: curl over STLS and implicit TLS, and fetchmail."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from popproxy.demo import demo_messages

from support.proxyproc import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_serves_curl_and_fetchmail(tmp_path: Path) -> None:
    stls, tls, upstream = free_port(), free_port(), free_port()
    config = (ROOT / "conf" / "demo.toml").read_text()
    config = config.replace("10110", str(stls)).replace("10995", str(tls)).replace("11110", str(upstream))
    config = config.replace("../.demo/proxy.pem", "state/proxy.pem")
    (tmp_path / "demo.toml").write_text(config)
    demo = subprocess.Popen(
        [sys.executable, "-m", "popproxy.demo", "--config", str(tmp_path / "demo.toml")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = ""
        deadline = time.monotonic() + 30
        while "popproxy serving" not in output:
            line = demo.stdout.readline()
            assert line or demo.poll() is None, output
            output += line
            assert time.monotonic() < deadline, output
        ca = tmp_path / "state" / "ca.pem"
        assert f"pop3s://localhost:{tls}/" in output and "fetchmail -f" in output
        expected = demo_messages()
        listing = subprocess.run(
            ["curl", "-sS", "--cacert", str(ca), "-u", "demo:demo", f"pop3s://localhost:{tls}/"],
            capture_output=True, timeout=30,
        )
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.splitlines() == [b"%d %d" % (i + 1, len(m)) for i, m in enumerate(expected)]
        fetched = subprocess.run(
            ["curl", "-sS", "--cacert", str(ca), "--ssl-reqd", "-u", "demo:demo", f"pop3://localhost:{stls}/2"],
            capture_output=True, timeout=30,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout == expected[1]  # the message whose lines start with dots
        # The fetchmail line the demo printed, as a newcomer would paste it.
        command = next(line for line in output.splitlines() if "fetchmail -f" in line).split("#")[0].split()
        settings = [part for part in command if part.startswith("FETCHMAILHOME=")]
        env = {**os.environ, **dict(part.split("=", 1) for part in settings)}
        argv = command[len(settings):]
        assert shutil.which("fetchmail"), "fetchmail is not installed: run scripts/test"
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        mbox = (tmp_path / "state" / "fetched.mbox").read_bytes()
        assert mbox.count(b"Subject: ") == 3 and b"\n.hidden\n" in mbox
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(20)
        finally:
            if demo.poll() is None:
                demo.kill()
            demo.stdout.close()
    assert demo.returncode == 0
