"""Issue 12, finding 3: an endpoint that cannot listen ends the start with one line naming the
listener and the reason, exit status 1, and no PID file, under ``twistd -n`` and in daemon mode.

Before the fix it was a 39-line traceback, and in daemon mode twistd's status pipe cut it to
``An error has occurred: b"…Address a"``. Real twistd; the port is taken by binding a socket first;
192.0.2.1 (TEST-NET-1, RFC 5737) is an address no host of ours has.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.configs import write_certificate
from support.proxyproc import TWISTD, free_port

NOT_HERE = "192.0.2.1"


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _config(folder: Path, endpoints: list[str], metrics: str | None = None, workers: int = 1) -> Path:
    certificate = write_certificate(folder)
    config = folder / "popproxy.toml"
    config.write_text(
        f"[process]\nworkers = {workers}\n"
        + "".join(f'[[listen]]\nendpoint = "{endpoint}"\ntls = "implicit"\ncertificate = "{certificate}"\n'
                  for endpoint in endpoints)
        + '[upstream.main]\naddress = "127.0.0.1:1110"\ntls = "none"\n[routing]\ndefault = "main"\n'
        + (f'[metrics]\nendpoint = "{metrics}"\n' if metrics else "")
    )
    return config


def _start(folder: Path, config: Path, daemon: bool) -> subprocess.CompletedProcess[str]:
    pidfile = folder / "popproxy.pid"
    mode = [] if daemon else ["-n"]
    try:
        return subprocess.run(
            [TWISTD, *mode, "--pidfile", str(pidfile), "--logfile", str(folder / "popproxy.log"), "popproxy",
             "-c", str(config)],
            cwd=folder, capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:  # it started after all (-n): stop it, and fail below
        return subprocess.CompletedProcess([], -1, "", "still running")
    finally:
        if pidfile.exists():  # a daemon that started although it should not have
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)


def _assert_one_line(result: subprocess.CompletedProcess[str], folder: Path, *words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("popproxy: ") and all(word in lines[0] for word in words), lines[0]
    assert result.stdout == ""
    assert not (folder / "popproxy.pid").exists()


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_port_in_use_is_one_line_naming_the_listener(tmp_path: Path, daemon: bool) -> None:
    free = free_port()
    with taken_port() as taken:
        config = _config(tmp_path, [f"tcp:{free}:interface=127.0.0.1", f"tcp:{taken}:interface=127.0.0.1"])
        result = _start(tmp_path, config, daemon)
    _assert_one_line(result, tmp_path, "listen[1].endpoint", f"tcp:{taken}:interface=127.0.0.1",
                     "Address already in use")
    with socket.socket() as probe:  # the listener bound before the failing one was not left open
        probe.bind(("127.0.0.1", free))


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_an_address_this_host_does_not_have_is_one_line(tmp_path: Path, daemon: bool) -> None:
    config = _config(tmp_path, [f"tcp:{free_port()}:interface={NOT_HERE}"])
    result = _start(tmp_path, config, daemon)
    _assert_one_line(result, tmp_path, "listen[0].endpoint", NOT_HERE, "Cannot assign requested address",
                     "not an address of this host")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, daemon: bool, workers: int) -> None:
    with taken_port() as taken:
        config = _config(tmp_path, [f"tcp:{free_port()}:interface=127.0.0.1"],
                         metrics=f"tcp:{taken}:interface=127.0.0.1", workers=workers)
        result = _start(tmp_path, config, daemon)
    _assert_one_line(result, tmp_path, "metrics.endpoint", f"tcp:{taken}", "Address already in use")


def test_with_workers_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with taken_port() as taken:
        config = _config(tmp_path, [f"tcp:{taken}:interface=127.0.0.1"], workers=2)
        result = _start(tmp_path, config, daemon=False)
    _assert_one_line(result, tmp_path, "listen[0].endpoint", "Address already in use")


def test_check_passes_while_the_running_instance_holds_the_ports(tmp_path: Path) -> None:
    """--check binds nothing: the ports are the running proxy's."""
    with taken_port() as taken:
        config = _config(tmp_path, [f"tcp:{taken}:interface=127.0.0.1"], metrics=f"tcp:{free_port()}:interface=127.0.0.1")
        result = subprocess.run([TWISTD, "popproxy", "-c", str(config), "--check"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 0 and "configuration OK" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("endpoints", "metrics", "words"),
    [
        (["tcp:{a}", "tcp:port={a}"], None, "listen[1].endpoint"),
        (["tcp:{a}:interface=127.0.0.1"], "tcp:port={a}:interface=127.0.0.1", "metrics.endpoint"),
    ],
)
def test_check_finds_listeners_on_one_address(tmp_path: Path, endpoints: list[str], metrics: str | None, words: str) -> None:
    port = free_port()
    config = _config(tmp_path, [e.format(a=port) for e in endpoints], metrics=metrics.format(a=port) if metrics else None)
    result = subprocess.run([TWISTD, "popproxy", "-c", str(config), "--check"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and words in result.stderr and "address of its own" in result.stderr, result
    assert len(result.stderr.splitlines()) == 1
