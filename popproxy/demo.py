"""``python -m popproxy.demo``: popproxy in front of an embedded POP3 server, for a first look.

What ``scripts/demo`` runs. It makes a throwaway CA and certificate (once, beside the certificate path
the demo configuration names), starts a small POP3 server with a few generated messages on the
configuration's upstream address, runs ``twistd -n popproxy`` on that configuration as a child process,
and prints the ``curl`` and ``fetchmail`` commands that fetch the mail through the proxy over TLS.
Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import email.message
import email.policy
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError
from .pki import CertificateAuthority, write_private
from .tap import validated_config
from .testing import FakePOP3Factory

log = Logger()

USER = "demo"
PASSWORD = "demo"


def demo_messages() -> list[bytes]:
    """A small mailbox: plain text, lines that start with dots (dot-stuffing at work), an attachment.

    The same bytes on every run, so that what a client fetched can be compared with the source.
    """

    def message(subject: str, body: str, attachment: bytes | None = None) -> bytes:
        msg = email.message.EmailMessage(policy=email.policy.SMTP)
        msg["From"] = "popproxy demo <demo@example.org>"
        msg["To"] = "demo@example.org"
        msg["Subject"] = subject
        msg["Date"] = "Thu, 01 Oct 2026 09:00:00 +0000"
        msg["Message-ID"] = f"<{subject.lower().replace(' ', '-')}@demo.popproxy.invalid>"
        msg.set_content(body)
        if attachment is not None:
            msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
            msg.set_boundary("popproxy-demo-boundary")
        return msg.as_bytes()

    return [
        message("Welcome to popproxy", "This message came through popproxy.\n\nIt relays POP3 byte for byte.\n"),
        message("Dots", "The next lines start with dots, which POP3 stuffs on the wire:\n.\n..\n.hidden\nend\n"),
        message("An attachment", "A small binary attachment follows.\n", bytes(range(256)) * 16),
    ]


def prepare_certificates(config_path: Path) -> Path:
    """Make the CA and the listeners' certificate if they do not exist yet; return the CA file.

    The certificate is kept across runs so that a mail client told to trust ``ca.pem`` keeps working.
    """
    raw = tomllib.loads(config_path.read_text())
    paths = set()
    for listener in raw.get("listen", []):
        certificate = listener.get("certificate")
        for name in [certificate] if isinstance(certificate, str) else certificate or []:
            paths.add((config_path.parent / name).resolve())
    if not paths:
        raise SystemExit(f"{config_path}: the demo needs at least one TLS listener")
    folder = next(iter(paths)).parent
    folder.mkdir(parents=True, exist_ok=True)
    ca_file = folder / "ca.pem"
    if not ca_file.exists() or not all(p.exists() for p in paths):
        authority = CertificateAuthority.create("popproxy demo CA (throwaway)")
        leaf = authority.issue(["localhost", "127.0.0.1"])
        for path in paths:
            write_private(path, leaf.combined_pem)
        ca_file.write_bytes(authority.cert_pem)
    return ca_file


def instructions(config_path: Path, ca_file: Path, state: Path) -> str:
    config = validated_config(str(config_path))
    lines = ["", "popproxy demo is running. Fetch the demo mailbox through it (user demo, password demo):", ""]
    ports = {}
    for listener in config.listeners:
        port = listener.inner_endpoint.split(":")[1]
        ports[listener.tls] = port
    cafile = os.path.relpath(ca_file)
    if "starttls" in ports:
        lines.append(f"  curl --cacert {cafile} --ssl-reqd -u demo:demo pop3://localhost:{ports['starttls']}/1")
    if "implicit" in ports:
        lines.append(f"  curl --cacert {cafile} -u demo:demo pop3s://localhost:{ports['implicit']}/")
        rc = state / "fetchmailrc"
        mbox = state / "fetched.mbox"
        rc.write_text(
            f"poll localhost service {ports['implicit']} protocol pop3\n"
            f"  user demo password demo ssl sslcertck sslcertfile {ca_file}\n"
            f'  keep fetchall mda "cat >> {mbox}"\n'
        )
        os.chmod(rc, 0o600)
        lines.append(
            f"  FETCHMAILHOME={os.path.relpath(state)} fetchmail -f {os.path.relpath(rc)} -v   # then: less {os.path.relpath(mbox)}"
        )
    lines += ["", "Logs follow. Ctrl-C stops the demo.", ""]
    return "\n".join(lines)


class _Twistd(protocol.ProcessProtocol):
    """The ``twistd -n popproxy`` child. Its output is held back until it logs that it serves (every
    listener bound); only then are the instructions printed, and the output passed through as it comes.
    Held back: at most ``HELD`` octets (the start-up log is a few lines; older output beyond that is dropped)."""

    #: what popproxy's service logs once every listener is bound (popproxy.service)
    SERVING = b"popproxy serving"
    HELD = 65536

    def __init__(self, reactor: Any, on_serving: Callable[[], None]) -> None:
        self.reactor = reactor
        self.status: int | None = None
        self.ended: Deferred[None] = Deferred()
        self.serving = False
        self._on_serving = on_serving
        self._held = b""

    def outReceived(self, data: bytes) -> None:
        if self.serving:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return
        self._held = (self._held + data)[-self.HELD :]
        if self.SERVING in self._held:
            self.serving = True
            self._on_serving()
            held, self._held = self._held, b""
            self.outReceived(held)

    errReceived = outReceived

    def last_line(self) -> str:
        """The last line twistd printed before it exited without serving: the reason, as a rule."""
        lines = [line.strip() for line in self._held.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def processEnded(self, reason: Failure) -> None:
        self.status = getattr(reason.value, "exitCode", None)
        self.ended.callback(None)
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popproxy.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="conf/demo.toml", help="the demo configuration (default %(default)s)")
    args = parser.parse_args(argv)
    config_path = Path(args.config).resolve()
    ca_file = prepare_certificates(config_path)
    state = ca_file.parent
    try:
        config = validated_config(str(config_path))
    except ConfigError as error:
        print(f"popproxy demo: {error}", file=sys.stderr)
        return 1
    upstream = next(iter(config.upstreams.values())).addresses[0]

    from twisted.internet import reactor

    mailbox = FakePOP3Factory(pipelining=True)
    mailbox.add_user(USER, PASSWORD, demo_messages())
    # Bound before anything is printed or started: if another program has this port, the proxy would
    # send the demo's user and password to it (and the demo would report success). A TCP endpoint's
    # listen() has its result at once (it wraps reactor.listenTCP in defer.execute).
    failed: list[Failure] = []
    TCP4ServerEndpoint(reactor, upstream.port, interface=upstream.host).listen(mailbox).addErrback(failed.append)
    if failed:
        print(f"popproxy demo: cannot listen on {upstream.host}:{upstream.port} for the demo mailbox "
              f"({_reason(failed[0].value)}): free that port or change the upstream address in {config_path}", file=sys.stderr)
        return 1

    twistd = str(Path(sys.executable).with_name("twistd"))
    child = _Twistd(reactor, lambda: print(instructions(config_path, ca_file, state), flush=True))
    process = reactor.spawnProcess(
        child,
        twistd,
        [twistd, "-n", "--pidfile=", "--logfile=-", "popproxy", "--config", str(config_path)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def stop() -> Deferred[None]:
        """Stop twistd with the demo, and wait (a little) for it to finish."""
        if not child.ended.called:
            process.signalProcess("TERM")
        return child.ended.addTimeout(10, reactor).addErrback(lambda _: None)

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    if not child.serving:
        print(f"popproxy demo: popproxy did not start, so the demo is not running: {child.last_line()}", file=sys.stderr)
        return 1
    return 0 if child.status in (None, 0) else 1


def _reason(error: BaseException | None) -> str:
    """``address already in use``, from ``Couldn't listen on ...: [Errno 98] Address already in use.``"""
    cause = error.socketError if isinstance(error, CannotListenError) else error
    return str(getattr(cause, "strerror", None) or cause).rstrip(".").lower()


if __name__ == "__main__":
    raise SystemExit(main())
