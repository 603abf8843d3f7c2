"""An nginx ``auth_http``-compatible lookup service for tests, run as a process of its own.

It answers each ``GET`` as an admin's auth service for nginx's mail proxy would
(https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html): it URL-decodes ``Auth-User`` and
``Auth-Pass`` (nginx escapes them with ``%XX``), looks the user up in a JSON table and answers in
headers only, ``HTTP/1.0`` with an empty body by default.

The table (a file, read again on every request, so a test may change it between requests)::

    {"users": {"alice": {"status": "OK", "server": "127.0.0.1", "port": 110,
                         "password": "alice-pw",            # optional: checked if given
                         "user": "alice@backend", "pass": "rewritten",   # Auth-User/Auth-Pass rewrites
                         "wait": 3,                          # Auth-Wait
                         "http_status": 200, "delay": 0.0,   # HTTP status; seconds before answering
                         "headers": [["X-Raw", "value"]],    # extra answer headers, sent as given
                         "body": 0}},                        # octets of body to send
     "default": {"status": "Invalid login or password", "wait": 3},   # unknown users (optional)
     "delay": 0.0}                                           # seconds before every answer

A wrong ``password`` gets ``Auth-Status: Invalid login or password`` with ``Auth-Wait: 3``. An
unknown user without a ``default`` gets the same. Every request is recorded as one JSON line in the
requests file: ``{"path": ..., "headers": [[name, value], ...]}`` with values as Latin-1 text (the
octets as sent). With ``--certificate`` (a PEM file of key and chain) it speaks HTTPS.

``python tests/support/authhttp.py --table T --requests R --port-file P [--certificate C]`` listens on
127.0.0.1, on a free port it writes to ``P`` once ready. :class:`AuthHTTPService` runs it.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

DENIED = "Invalid login or password"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        record = {"path": self.path, "headers": [[name, value] for name, value in self.headers.items()]}
        with self.server.lock, self.server.requests.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        table = json.loads(self.server.table.read_text(encoding="utf-8"))
        user = urllib.parse.unquote_to_bytes(self.headers.get("Auth-User", "").encode("latin-1")).decode("utf-8", "replace")
        password = urllib.parse.unquote_to_bytes(self.headers.get("Auth-Pass", "").encode("latin-1"))
        entry = table.get("users", {}).get(user) or table.get("default") or {"status": DENIED, "wait": 3}
        if "password" in entry and entry["password"].encode("utf-8") != password:
            entry = {"status": DENIED, "wait": 3}
        delay = float(entry.get("delay", table.get("delay", 0.0)))
        if delay:
            time.sleep(delay)
        answer: list[tuple[str, str]] = [("Auth-Status", str(entry["status"]))]
        for key, header in (("server", "Auth-Server"), ("port", "Auth-Port"), ("user", "Auth-User"),
                            ("pass", "Auth-Pass"), ("wait", "Auth-Wait")):
            if key in entry:
                answer.append((header, str(entry[key])))
        answer += [(name, value) for name, value in entry.get("headers", [])]
        body = b"x" * int(entry.get("body", 0))
        self.send_response(int(entry.get("http_status", 200)))
        for name, value in answer:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, table: Path, requests: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.table = table
        self.requests = requests
        self.lock = threading.Lock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--certificate", type=Path)
    options = parser.parse_args()
    server = _Server(options.table, options.requests)
    if options.certificate:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(options.certificate)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    written = options.port_file.with_suffix(".tmp")
    written.write_text(str(server.server_address[1]))
    written.rename(options.port_file)  # atomic: the parent never reads half a number
    server.serve_forever()
    server.server_close()


class AuthHTTPService:
    """The service above as a child process on 127.0.0.1: ``url``, ``table`` (set it with
    :meth:`set_table`), ``requests()`` (what it received, oldest first)."""

    def __init__(self, workdir: Path, table: dict[str, Any], certificate_pem: bytes | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.table_path = workdir / "table.json"
        self.requests_path = workdir / "requests.jsonl"
        self.requests_path.write_text("")
        self.set_table(table)
        self.scheme = "https" if certificate_pem else "http"
        self.certificate_path = None
        if certificate_pem:
            self.certificate_path = workdir / "authhttp.pem"
            self.certificate_path.write_bytes(certificate_pem)
            os.chmod(self.certificate_path, 0o600)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/auth"

    def set_table(self, table: dict[str, Any]) -> None:
        temporary = self.table_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(table), encoding="utf-8")
        temporary.rename(self.table_path)

    def requests(self) -> list[dict[str, Any]]:
        lines = self.requests_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]

    def start(self, timeout: float = 10.0) -> AuthHTTPService:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        command = [sys.executable, __file__, "--table", str(self.table_path), "--requests", str(self.requests_path),
                   "--port-file", str(port_file)]
        if self.certificate_path:
            command += ["--certificate", str(self.certificate_path)]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the auth_http test service did not start")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return self

    def close(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None


if __name__ == "__main__":
    main()
