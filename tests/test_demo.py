"""The README's demo command serves real clients: curl over STLS and implicit TLS, and fetchmail."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
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


def _demo_config(tmp_path: Path) -> tuple[Path, int, int, int]:
    stls, tls, upstream = free_port(), free_port(), free_port()
    config = (ROOT / "conf" / "demo.toml").read_text()
    config = config.replace("10110", str(stls)).replace("10995", str(tls)).replace("11110", str(upstream))
    config = config.replace("../.demo/proxy.pem", "state/proxy.pem")
    (tmp_path / "demo.toml").write_text(config)
    return tmp_path / "demo.toml", stls, tls, upstream


def _run_demo(config: Path) -> subprocess.CompletedProcess[str]:
    """Run the demo to its end; one that keeps running (reports success) fails the test after 60 s."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "popproxy.demo", "--config", str(config)],
        cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = demo.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=20)
        raise AssertionError(f"the demo kept running although a port it needs was taken:\n{output}") from None
    return subprocess.CompletedProcess(demo.args, demo.returncode, output)


def test_demo_fails_in_one_line_when_its_mailbox_port_is_taken(tmp_path: Path) -> None:
    """Finding 4 (issue 12): with the demo mailbox's port taken, the demo said it was running and sent
    demo/demo to whatever listened there. It must stop before printing anything else, in one line."""
    config, _stls, _tls, upstream = _demo_config(tmp_path)
    with socket.create_server(("127.0.0.1", upstream)) as squatter:
        squatter.settimeout(0.1)
        result = _run_demo(config)
        with contextlib.suppress(TimeoutError):
            squatter.accept()[0].close()
            raise AssertionError("the demo connected to the program that holds its mailbox port")
    assert result.returncode == 1, result.stdout
    assert "is running" not in result.stdout and "curl" not in result.stdout, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{upstream}" in lines[0] and "address already in use" in lines[0], result.stdout


def test_demo_fails_in_one_line_when_a_proxy_port_is_taken(tmp_path: Path) -> None:
    """The proxy (twistd) cannot bind its STLS port: the demo must not print its curl/fetchmail lines,
    and ends with one line saying it is not running and why."""
    config, stls, _tls, _upstream = _demo_config(tmp_path)
    with socket.create_server(("127.0.0.1", stls)):
        result = _run_demo(config)
    assert result.returncode == 1, result.stdout
    assert "is running" not in result.stdout and "curl" not in result.stdout, result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "not running" in lines[0] and str(stls) in lines[0], result.stdout
