"""Telling systemd how popproxy is doing: the ``sd_notify`` protocol, in a few lines, without libsystemd.

sd_notify(3) (https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html): a service
started with ``Type=notify`` finds the service manager's socket in ``$NOTIFY_SOCKET`` (a file system
path, or an abstract socket when it starts with ``@``) and sends it datagrams of newline-separated
``VARIABLE=VALUE`` assignments:

- ``READY=1`` when start-up is finished (here: every listener bound and serving), and again when a
  reload is finished, whatever its outcome;
- ``RELOADING=1`` when a reload begins, with ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` in µs when the
  message was made), which systemd requires with ``RELOADING=1`` since v253 and ignores before;
- ``STOPPING=1`` when shutdown begins;
- ``STATUS=`` a line for ``systemctl status``: here, whether the last reload was applied or refused,
  and why;
- ``MAINPID=`` the process systemd should watch, sent with the first ``READY=1``: this one, which
  changes nothing under ``twistd --nodaemon`` (conf/popproxy.service) and lets a unit with
  ``NotifyAccess=all`` follow a twistd that daemonized (its child serves, not the process started).

``NotifyState`` decides what to send as start, reloads and stop happen (no I/O; tested by event
sequences); ``SystemdNotifier`` sends it. Nothing is sent when ``NOTIFY_SOCKET`` is unset (a shell, the
tests, the workers of ``[process] workers``: only the process systemd started may notify, the default
``NotifyAccess=main`` of systemd.service(5)). A datagram that cannot be sent is logged, never raised:
systemd's view must not stop the proxy.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

#: The environment variable naming the service manager's socket (sd_notify(3), ENVIRONMENT).
NOTIFY_SOCKET = "NOTIFY_SOCKET"
#: The longest datagram systemd reads: NOTIFY_BUFFER_MAX, which is PIPE_BUF (4096 on Linux), in
#: systemd's src/basic/def.h; a longer message is ignored whole. ``STATUS=`` text is cut to fit.
MAX_MESSAGE = 4096

Fields = Sequence[tuple[str, str]]


class INotifier(Interface):
    """What a service tells the service manager about its life (sd_notify(3))."""

    def ready(status: str) -> None:
        """Start-up is finished: every listener accepts. ``status`` is a line for ``systemctl status``."""

    def reloading() -> None:
        """A reload (SIGHUP, or the admin socket's reload) begins."""

    def reloaded(refusal: str | None) -> None:
        """The reload that began last is over: applied (``refusal`` None) or refused, and why."""

    def stopping() -> None:
        """Shutdown begins: listeners close, sessions get their grace time."""


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class NotifyState:
    """Which assignments to send as the service starts, reloads and stops (sans-I/O).

    - ``READY=1`` is sent once for the start, and once at the end of each reload while running.
      A reload that ends during start-up sends a ``STATUS=`` only: ``READY=1`` would tell systemd
      the start is over before every listener serves.
    - Reloads may overlap (a second SIGHUP while workers prepare the first): ``RELOADING=1`` goes
      out when the first begins and ``READY=1`` when the last ends, so systemd sees one reload.
    - After ``STOPPING=1`` nothing more is sent: a reload then would say ``READY=1`` to a stopping unit.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = Phase.STARTING
        self.reloads = 0  # reloads begun and not yet finished

    def ready(self, status: str) -> Fields:
        if self.phase is not Phase.STARTING:
            return ()
        self.phase = Phase.RUNNING
        return (("READY", "1"), ("STATUS", status), ("MAINPID", str(self.pid)))

    def reloading(self, monotonic_usec: int) -> Fields:
        if self.phase is Phase.STOPPING:
            return ()
        self.reloads += 1
        status = ("STATUS", "reloading the configuration")
        if self.phase is Phase.RUNNING and self.reloads == 1:
            return (("RELOADING", "1"), ("MONOTONIC_USEC", str(monotonic_usec)), status)
        return (status,)

    def reloaded(self, refusal: str | None) -> Fields:
        if self.phase is Phase.STOPPING:
            return ()
        self.reloads = max(0, self.reloads - 1)
        if refusal is None:
            status = ("STATUS", "configuration reloaded")
        else:
            status = ("STATUS", f"reload refused, running configuration kept: {refusal}")
        if self.phase is Phase.RUNNING and self.reloads == 0:
            return (("READY", "1"), status)
        return (status,)

    def stopping(self) -> Fields:
        if self.phase is Phase.STOPPING:
            return ()
        self.phase = Phase.STOPPING
        return (("STOPPING", "1"), ("STATUS", "stopping: sessions get their shutdown_grace"))


def encode(fields: Fields) -> bytes:
    """One datagram: ``VARIABLE=VALUE`` lines (sd_notify(3)). A value is one line (newlines become
    spaces); ``STATUS`` is cut, on a character boundary, so that the whole fits in ``MAX_MESSAGE``."""
    lines = [f"{name}={' '.join(value.splitlines())}".encode() for name, value in fields]
    excess = sum(len(line) + 1 for line in lines) - 1 - MAX_MESSAGE
    if excess > 0:
        for index, (name, _) in enumerate(fields):
            if name == "STATUS":
                line = lines[index]
                keep = max(len(b"STATUS="), len(line) - excess - len("…".encode()))
                lines[index] = line[:keep].decode("utf-8", "ignore").encode() + "…".encode()
                break
    return b"\n".join(lines)


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address that ``$NOTIFY_SOCKET`` names: a path (``/run/systemd/notify``), or an
    abstract socket (``@name``: a NUL byte, then the name); None when unset or empty. Other kinds
    (``vsock:``, for virtual machines since systemd v253) are not supported: None, logged."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    log.warn("NOTIFY_SOCKET={value!r}: not a path or an abstract socket; systemd will not be notified",
             value=value)
    return None


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it (sd_notify(3))."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@implementer(INotifier)
class SystemdNotifier:
    """Sends ``NotifyState``'s assignments to ``address`` (``notify_address``); does nothing when it is None."""

    def __init__(self, address: str | bytes | None, *, pid: int | None = None,
                 clock: Callable[[], int] = monotonic_usec) -> None:
        self.address = address
        self.state = NotifyState(os.getpid() if pid is None else pid)
        self._clock = clock

    def ready(self, status: str) -> None:
        self.send(self.state.ready(status))

    def reloading(self) -> None:
        self.send(self.state.reloading(self._clock()))

    def reloaded(self, refusal: str | None) -> None:
        self.send(self.state.reloaded(refusal))

    def stopping(self) -> None:
        self.send(self.state.stopping())

    def send(self, fields: Fields) -> bool:
        """One datagram, without blocking (a full queue at systemd's end is logged, not waited for)."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(encode(fields), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as error:
            log.warn("could not notify systemd ({fields}): {error}", fields=" ".join(name for name, _ in fields),
                     error=str(error), event="systemd_notify_failed")
            return False
        return True


def notifier_from_environment(environ: Mapping[str, str] | None = None) -> SystemdNotifier:
    """The notifier for this process: to ``$NOTIFY_SOCKET``, or one that sends nothing."""
    environ = os.environ if environ is None else environ
    return SystemdNotifier(notify_address(environ.get(NOTIFY_SOCKET)))


def without_notify_socket(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a child process that must not notify systemd itself (a worker)."""
    return {name: value for name, value in environ.items() if name != NOTIFY_SOCKET}
