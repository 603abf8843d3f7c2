"""The smallest nginx ``auth_http`` server: every login goes to one Dovecot, which checks the password.

Run by bench/relay.py as its own process (so that it does not share the client's GIL):
``python bench/auth_http.py LISTEN_PORT UPSTREAM_PORT``. It prints ``ready`` once listening.
Protocol: https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html#protocol
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main() -> None:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Auth-Status", "OK")
            self.send_header("Auth-Server", "127.0.0.1")
            self.send_header("Auth-Port", str(upstream_port))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per login would only cost time

    server = HTTPServer(("127.0.0.1", listen_port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
