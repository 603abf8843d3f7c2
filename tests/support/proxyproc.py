"""popproxy as admins run it: ``twistd -n popproxy -c FILE`` in a subprocess, on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TWISTD = str(Path(sys.executable).with_name("twistd"))


#: Ports handed out by ``free_port`` in this process: never twice.
_GIVEN: set[int] = set()
# Below Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default): a port the kernel
# picked for bind(0) is one it may hand to the next outgoing connection too, which then holds it when
# a server started by a test tries to listen there ("Address already in use", now and then, under load).
_LOW, _HIGH = 20000, 32767


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now and that no outgoing connection will take."""
    import random

    while True:
        port = random.randint(_LOW, _HIGH)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port


def twistd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (``--help``, ``--check``) and capture what it printed."""
    return subprocess.run([TWISTD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


class ProxyProcess:
    """A running ``twistd -n popproxy``. ``ports`` are the listeners' ports, in config order."""

    def __init__(self, config: Path, ports: list[int], workdir: Path, extra: tuple[str, ...] = (), json: bool = False) -> None:
        """With ``json``, events go to ``logfile`` as JSON lines (``--logger popproxy.logs.json_stdout``)."""
        self.config = config
        self.ports = ports
        self.workdir = workdir
        self.logfile = workdir / ("events.jsonl" if json else "popproxy.log")
        self.pidfile = workdir / "popproxy.pid"
        logging = ["--logger", "popproxy.logs.json_stdout"] if json else ["--logfile", str(self.logfile)]
        self._output = open(self.logfile if json else workdir / "stdout.txt", "w")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile", str(self.pidfile), *logging, *extra, "popproxy", "-c", str(config)],
            cwd=workdir,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._wait_ready()

    def events(self) -> list[dict[str, object]]:
        """The JSON events logged so far (``json=True`` only)."""
        import json as json_module

        # Only complete lines: the proxy may be in the middle of writing the last one.
        lines = self.log().splitlines(keepends=True)
        return [json_module.loads(line) for line in lines if line.startswith("{") and line.endswith("\n")]

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                if self.process.poll() is not None:
                    output = (self.workdir / "stdout.txt").read_text() if (self.workdir / "stdout.txt").exists() else ""
                    raise RuntimeError(f"twistd popproxy exited with {self.process.returncode}:\n{output}\n{self.log()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"popproxy did not listen on {port}:\n{self.log()}") from None
                    time.sleep(0.05)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        return self.process.returncode
