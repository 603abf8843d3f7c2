"""A real rspamd as a test fixture, run from a minimal configuration of its own.

``RspamdServer`` writes one ``rspamd.conf`` that includes nothing from ``/etc/rspamd``: the
package's Lua rules (``$RULESDIR/rspamd.lua``: header, MIME and body checks that need no network),
the actions with rspamd's default thresholds, and one ``normal`` worker listening on a free
127.0.0.1 port and on a Unix socket. It runs ``rspamd -f`` and is ready when ``GET /ping`` answers
``pong`` on both, about 1 s after the start on this kind of machine.

What this configuration needed, and why:

- **No modules.** Without ``modules.conf`` no Lua plugin is configured, so none runs: nothing needs
  Redis (Bayes, ratelimit, greylisting, reputation, neural), DNS lists or fuzzy storage. DNS goes to
  ``127.0.0.1:1``, where nothing answers, so a lookup fails at once instead of waiting for the
  machine's resolver. ``local_addrs`` is empty.
- **No controller worker.** ``/checkv2`` is served by the normal worker; rspamd logs that
  "controller worker is unconfigured" (learning and map reloading are off) and runs the controller's
  periodic jobs in the normal worker.
- **A five-line ``url_tld`` file.** rspamd compiles its list of public suffixes (about 10,000) into
  a Hyperscan database at every start with an empty cache folder, which took 10 to 14 s here; with a
  list of five suffixes the start takes under 1 s. (``disable_hyperscan`` does not avoid that, and an
  ``hs_helper`` process still compiles the regexp rules in the background for a few seconds.)
- **``enable_test_patterns = true``.** rspamd 3.4 recognises GTUBE variants that force an action
  without a score: ``XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X`` →
  ``reject`` (always on), and with this option ``YJS...`` → ``add header``, ``ZJS...`` → ``rewrite
  subject``, ``AJS...`` → ``no action``. This, not ``Pass: all``, is what makes verdicts
  deterministic. A GTUBE message is ``is_skipped`` with the one symbol ``GTUBE``.
- **Running as root** rspamd refuses to run its workers as root: ``-u _rspamd -g _rspamd`` (the
  Debian package's user). Its database and log folders are given to that user, and, as for spamd,
  the tree lives outside pytest's ``0700`` folders (``support.spamd.ScannerProcess``).
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
from pathlib import Path

from .spamd import ScannerProcess, read_all

RSPAMD = shutil.which("rspamd", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")

#: The GTUBE variants of rspamd's test patterns, by the action each forces (see the module doc).
GTUBE_ACTIONS = {
    "reject": b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
    "add header": b"YJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
    "rewrite subject": b"ZJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
    "no action": b"AJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
}

CONFIG = """\
# popproxy test fixture: self-contained (nothing from /etc/rspamd), loopback only, no Redis, no DNS.
lua = "${{RULESDIR}}/rspamd.lua";
actions {{
  reject = 15;
  add_header = 6;
  greylist = 4;
}}
options {{
  pidfile = "{root}/rspamd.pid";
  filters = "regexp";
  cache_file = "{root}/db/symbols.cache";
  hs_cache_dir = "{root}/db/";
  control_socket = "{root}/db/rspamd.sock mode=0600";
  url_tld = "{root}/tld.dat";
  enable_test_patterns = true;
  local_addrs = [];
  dns {{
    nameserver = ["127.0.0.1:1"];
    timeout = 0.2s;
    retransmits = 1;
  }}
}}
logging {{
  type = "file";
  filename = "{root}/rspamd.log";
  level = "info";
}}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  bind_socket = "{socket} mode=0666";
  count = 1;
}}
"""


class RspamdServer(ScannerProcess):
    """rspamd's normal worker on ``127.0.0.1:port`` and on ``socket_path``."""

    name = "rspamd"
    run_as = "_rspamd"
    log_name = "rspamd.log"

    @property
    def config_path(self) -> Path:
        return self.root / "rspamd.conf"

    def write_config(self) -> None:
        for folder in ("db", "local"):
            (self.root / folder).mkdir(exist_ok=True)
        self.give(self.root / "db")
        log = self.log_path
        log.touch()
        self.give(log)
        (self.root / "tld.dat").write_text("com\norg\nnet\nexample\ntest\n")
        self.config_path.write_text(CONFIG.format(root=self.root, port=self.port, socket=self.socket_path))

    def command(self) -> list[str]:
        assert RSPAMD is not None
        argv = [
            RSPAMD,
            "-f",
            "-c",
            str(self.config_path),
            f"--var=LOCAL_CONFDIR={self.root / 'local'}",
            f"--var=DBDIR={self.root / 'db'}",
            f"--var=RUNDIR={self.root}",
            f"--var=LOGDIR={self.root}",
        ]
        if self.as_root:
            user = self.system_user()
            argv += ["-u", user.pw_name, "-g", grp.getgrgid(user.pw_gid).gr_name]
        return argv

    def ping(self, sock: socket.socket) -> None:
        """``GET /ping`` must answer ``pong``."""
        _ping(sock)


def _ping(sock: socket.socket) -> None:
    sock.sendall(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
    answer = read_all(sock)
    if b"pong" not in answer:
        raise ConnectionError(f"no pong yet: {answer[:200]!r}")
