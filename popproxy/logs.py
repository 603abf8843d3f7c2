"""Log observers for ``twistd --logger``: structured events as JSON lines.

``twistd -n --logger popproxy.logs.json_stdout popproxy -c FILE`` writes one JSON object per event to
standard output (journald under systemd keeps each as one entry). Every popproxy event carries its
fields as data (``event``, ``session_id``, ``client_host``, ``user``, ``upstream``, ``bytes_to_client``,
``client_tls_version``, ...), so security teams can query them without parsing messages.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    """JSON lines on standard output (no RFC 7464 record separator: one plain object per line)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
