"""What a worker and its parent say to each other (``[process] workers`` > 1), over Twisted's AMP.

One AMP connection per worker, on a UNIX socket pair the parent makes before it starts the worker
(``twisted.protocols.amp``: commands are answered in the order they are sent on a connection, and
a value may hold at most 65,535 octets).

Worker to parent:
    the session guard (``Admit`` ... ``FailureDelay``): limits hold across all workers because only
    the parent counts; ``AuditRecord``: a line for an audit log file, which only the parent writes
    (so lines from several workers never interleave and a file rotates once); ``Ready``.
Parent to worker:
    ``PrepareReload`` / ``CommitReload`` / ``AbandonReload``: a reload is all or nothing across the
    workers; ``WorkerSessions`` / ``EndWorkerSession``: the admin socket's listing and ending of
    sessions (``popproxy.admin``), which the parent asks of every worker.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.protocols import amp
from zope.interface import implementer

from . import admin
from .protocol.guard import ISessionGuard

#: Octets of an audit line per ``AuditRecord`` (below AMP's 65,535 per value).
RECORD_PIECE = 60000


class Admit(amp.Command):
    arguments = [(b"host", amp.Unicode(optional=True))]
    response = [(b"refusal", amp.Unicode(optional=True))]


class AdmitAddress(amp.Command):
    arguments = [(b"host", amp.Unicode())]
    response = [(b"refusal", amp.Unicode(optional=True))]


class Left(amp.Command):
    arguments = [(b"host", amp.Unicode(optional=True))]
    requiresAnswer = False


class UserAdmit(amp.Command):
    arguments = [(b"user", amp.Unicode())]
    response = [(b"granted", amp.Boolean())]


class UserLeft(amp.Command):
    arguments = [(b"user", amp.Unicode())]
    requiresAnswer = False


class LoginFailed(amp.Command):
    arguments = [(b"host", amp.Unicode())]
    requiresAnswer = False


class FailureDelay(amp.Command):
    arguments = [(b"host", amp.Unicode()), (b"failures", amp.Integer())]
    response = [(b"delay", amp.Float())]


class AuditRecord(amp.Command):
    """A piece of one JSON line for the audit file ``path`` (rotated as the other fields say); the
    line is complete with the piece that has ``last``."""

    arguments = [
        (b"path", amp.Unicode()),
        (b"rotate", amp.Unicode()),
        (b"max_bytes", amp.Integer()),
        (b"keep", amp.Integer()),
        (b"piece", amp.String()),
        (b"last", amp.Boolean()),
    ]
    requiresAnswer = False


class Ready(amp.Command):
    """The worker listens on every adopted socket."""

    arguments = []
    response = []


class PrepareReload(amp.Command):
    """Read the configuration file (it must have SHA-256 ``digest``) and build everything; answer
    whether it can be used, and why not."""

    arguments = [(b"digest", amp.Unicode())]
    response = [(b"ok", amp.Boolean()), (b"error", amp.Unicode(optional=True))]


class CommitReload(amp.Command):
    arguments = []
    response = []


class AbandonReload(amp.Command):
    arguments = []
    response = []


class WorkerSessions(amp.Command):
    """One page of the worker's live sessions after ``after`` (``admin.ListSessions``: the list
    fits in one AMP value)."""

    arguments = admin.ListSessions.arguments
    response = admin.ListSessions.response


class EndWorkerSession(amp.Command):
    """End the worker's ``session`` (its id) without QUIT upstream, if it has it (``admin.EndSession``)."""

    arguments = admin.EndSession.arguments
    response = admin.EndSession.response


def _refusal(box: dict[str, object]) -> str | None:
    refusal = box.get("refusal")
    return refusal if isinstance(refusal, str) else None


@implementer(ISessionGuard)
class RemoteGuard:
    """``ISessionGuard`` asked of the parent over ``connection``."""

    def __init__(self, connection: amp.AMP) -> None:
        self._amp = connection

    def admit(self, host: str | None) -> Deferred[str | None]:
        answer: Deferred[str | None] = self._amp.callRemote(Admit, host=host).addCallback(_refusal)
        return answer

    def admit_address(self, host: str) -> Deferred[str | None]:
        answer: Deferred[str | None] = self._amp.callRemote(AdmitAddress, host=host).addCallback(_refusal)
        return answer

    def left(self, host: str | None) -> None:
        self._amp.callRemote(Left, host=host)

    def user_admit(self, user: str) -> Deferred[bool]:
        answer: Deferred[bool] = self._amp.callRemote(UserAdmit, user=user).addCallback(lambda box: bool(box["granted"]))
        return answer

    def user_left(self, user: str) -> None:
        self._amp.callRemote(UserLeft, user=user)

    def login_failed(self, host: str) -> None:
        self._amp.callRemote(LoginFailed, host=host)

    def failure_delay(self, host: str, connection_failures: int) -> Deferred[float]:
        answer: Deferred[float] = self._amp.callRemote(FailureDelay, host=host, failures=connection_failures).addCallback(
            lambda box: float(box["delay"]))
        return answer


class ForwardedFile:
    """An audit file written by the parent: ``write`` sends the line there (the audit hook's
    writer in a worker, ``hooks.audit.FileWriter``'s stand-in)."""

    def __init__(self, connection: amp.AMP, path: Path, rotate: str, max_bytes: int, keep: int) -> None:
        self._amp = connection
        self._fields = {"path": str(path), "rotate": rotate, "max_bytes": max_bytes, "keep": keep}

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        pieces = [data[start : start + RECORD_PIECE] for start in range(0, len(data), RECORD_PIECE)] or [b""]
        for index, piece in enumerate(pieces):
            self._amp.callRemote(AuditRecord, piece=piece, last=index == len(pieces) - 1, **self._fields)

    def close(self) -> None:
        """The parent owns the file; nothing to close here."""
