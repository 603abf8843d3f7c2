"""A scanner that is there and useless: it accepts connections, then never answers (``answer`` None:
a slow or hung scanner) or answers nonsense once it has read a request. For the hooks' on_error tests
against spamd, rspamd and clamd stand-ins; a thread on a plain socket, loopback only."""

from __future__ import annotations

import socket
import threading


class BadScanner:
    def __init__(self, answer: bytes | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._answer = answer
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(conn)
            if self._answer is not None:
                try:
                    conn.recv(65536)
                    conn.sendall(self._answer)
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        for conn in self._open:
            conn.close()
