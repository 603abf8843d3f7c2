"""A trap upstream: a plain socket server that records every connection and every byte.

Routing a test user here proves a negative: that popproxy made no upstream connection, or sent no
credential, where it must not have. It answers like a POP3 server (+OK to everything), so that a
proxy which did connect would go on and reveal what it sends.
"""

from __future__ import annotations

import socket
import threading


class TrapServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"+OK trap ready\r\n")
                while data := conn.recv(65536):
                    with self._lock:
                        self.received += data
                    for _ in range(data.count(b"\n")):
                        conn.sendall(b"+OK\r\n")
            except OSError:  # the proxy aborted the connection (RST): that is allowed
                pass

    def close(self) -> None:
        self._listener.close()
