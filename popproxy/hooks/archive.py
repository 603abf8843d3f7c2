# -*- test-case-name: tests.test_archive_hook -*-
"""The ``archive`` message hook: a copy of every retrieved message in a Maildir per user.

Configuration::

    [[hook]]
    use = "archive"
    path = "/var/lib/popproxy/archive"   # base folder (relative: to the config file's folder); required
    stage = "delivered"                  # "delivered" (default): the message as the client gets it;
                                         # "received": as the upstream sent it

**Stage.** The hook stores the message it is given and returns it unchanged (its reservation is 0).
What it is given depends on where it runs, and ``stage`` says where: the pipeline runs hooks with
``stage = "received"`` before all others (they see the upstream's bytes) and hooks with ``stage =
"delivered"`` after all others (they see what the rewriting hooks made of it), whatever their place
in the file. The stored octets are exactly those (CRLF line endings, not dot-stuffed). A
"delivered" copy is the message octet for octet as the client gets it from RETR, the
``X-Popproxy-Pad`` filler header included that keeps its size exact when rewriting hooks reserved
room (``pipeline``): the pipeline pads the message before the "delivered" hooks run, so the copy's
SHA-256 is the audit log's ``sha256`` for the same RETR. (A TOP answer is part of the message: its
``sha256`` is of the part the client got, while the copy, made once, is the whole message.)

**Layout.** The Maildir of user ``u`` is ``<path>/<folder(u)>/{tmp,new,cur}`` (created as needed,
mode 0700); each message becomes one file in ``new/``. ``folder(u)`` is the user name with every
octet of its UTF-8 form other than ``A-Z a-z 0-9 @ . _ + -`` written as ``%XX`` (``%`` itself
too), and a leading ``.`` as ``%2E``: so ``alice@example.org`` stays as it is, ``../../etc``
becomes ``%2E.%2F..%2Fetc``, no name can leave ``path`` or be ``.``/``..``, and different users get
different folders (on a case-sensitive file system). Names longer than 200 characters are cut to
180 and given ``%~`` and a SHA-256 prefix of the user name.

**Writing.** Per the Maildir specification (https://cr.yp.to/proto/maildir.html): the file is
created in ``tmp/`` with ``O_CREAT | O_EXCL`` and mode 0600, written, ``fsync``-ed, renamed into
``new/``, and ``new/`` itself is ``fsync``-ed so that the rename survives a crash. Its name is
``<seconds>.M<microseconds>P<pid>Q<counter>.<host>,S=<size>`` (``/``, ``:`` and ``,`` in the host
name written as ``\\057``, ``\\072`` and ``\\054``; ``S=`` is the size extension Dovecot and
Courier read). The blocking file work runs in the reactor's thread pool
(the one the service starts the hook with, ``IStartable``) so that a slow disk never stalls other
sessions. Any
failure (a full disk, no permission, ``path`` under a regular file) removes the half-written file
and fails with ``ArchiveError``; the hook's ``on_error`` policy then decides whether the client gets
the message anyway (``"pass"``) or ``-ERR [SYS/TEMP]`` (``"refuse"``: nothing is delivered that is
not archived). If the hook's ``timeout`` expires first, the delivery goes on as the policy says and
the copy is still completed in the background.

A stored message is recorded as ``Verdict(hook=name, details={"archived": "<path of the file>"})``.

Like every message hook, this one sees only messages up to the hook's ``max_size`` (default 4 MiB;
larger ones stream through unarchived), and makes popproxy buffer each message it applies to: raise
``max_size`` to archive larger mail, at the price of memory per session.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..config import HookConfig
from .interfaces import HookNotStarted, IHookFactory, IMessageHook, IStaged, IStartable, MessageContext, Verdict

__all__ = ["STAGES", "ArchiveError", "ArchiveHook", "factory", "maildir_folder"]

STAGES = ("received", "delivered")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ" b"abcdefghijklmnopqrstuvwxyz" b"0123456789" b"@._+-")
_LONGEST = 200

#: Deliveries by this process, for unique file names (``next`` on a count is atomic in CPython).
_deliveries = itertools.count(1)


class ArchiveError(Exception):
    """A message could not be archived. ``errno`` is the OS error number, if one caused it."""

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(message)
        self.errno = error_number


def maildir_folder(user: str) -> str:
    """The folder name under ``path`` for ``user``: one path component, reversible, never hidden."""
    if not user:
        raise ArchiveError("no user name to archive under")
    octets = user.encode("utf-8", "surrogateescape")
    name = "".join(chr(octet) if octet in _SAFE else f"%{octet:02X}" for octet in octets)
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > _LONGEST:
        name = name[:180] + "%~" + hashlib.sha256(octets).hexdigest()[:16]
    return name


def _host_part(host: str) -> str:
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def _describe(error: OSError) -> str:
    code = errno.errorcode.get(error.errno or 0, "")
    return f"{error.strerror or error}" + (f" ({code})" if code else "")


@implementer(IMessageHook, IStaged, IStartable)
class ArchiveHook:
    """Stores each message it sees in the user's Maildir under ``base``, and passes it on unchanged.

    :ivar stage: ``"received"`` or ``"delivered"``: where the pipeline runs this hook (first or last).
    :param run_in_thread: how ``store`` is run off the reactor thread (``deferToThread``'s
        signature); by default in the thread pool of the reactor given to ``start``.
    """

    reservation = 0

    def __init__(
        self,
        name: str,
        base: Path,
        stage: str = "delivered",
        *,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
        host: str | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        self.name = name
        self.base = base
        self.stage = stage
        self._run_in_thread = run_in_thread
        self._host = _host_part(host if host is not None else socket.gethostname())

    # The one seam for tests: how the file in tmp/ is opened (os.open's signature).
    _open = staticmethod(os.open)

    def start(self, reactor: Any) -> None:
        """``IStartable``: the reactor whose thread pool does the file work (``IReactorThreads``),
        unless a ``run_in_thread`` was given."""
        if self._run_in_thread is None:
            def in_pool(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

            self._run_in_thread = in_pool

    def process(self, message: bytes, context: MessageContext) -> Deferred[bytes]:
        user = context.facts.session.user
        if user is None:
            raise ArchiveError("the session has no user yet: nothing to archive under")
        if self._run_in_thread is None:
            raise HookNotStarted(f"hook {self.name} was not started")

        def stored(path: Path) -> bytes:
            context.add_verdict(Verdict(hook=self.name, details={"archived": str(path)}))
            return message

        return self._run_in_thread(self.store, user, message).addCallback(stored)

    def store(self, user: str, message: bytes) -> Path:
        """Write ``message`` into ``user``'s Maildir and return the file's path in ``new/``.

        Blocks on the disk: ``process`` calls it in a thread. Raises ``ArchiveError``.
        """
        maildir = self.base / maildir_folder(user)
        self._make_maildir(maildir)
        for _attempt in range(3):
            name = self._unique_name(len(message))
            temporary = maildir / "tmp" / name
            try:
                fd = self._open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # another process with our pid (another container?): next name
                continue
            except OSError as error:
                raise ArchiveError(f"cannot create {temporary}: {_describe(error)}", error.errno) from error
            break
        else:
            raise ArchiveError(f"cannot find a free file name in {maildir / 'tmp'}", errno.EEXIST)
        final = maildir / "new" / name
        try:
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):  # (never a device a test put there: /dev/full)
                    os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
                view = memoryview(message)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, final)
            _sync_folder(final.parent)
        except OSError as error:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise ArchiveError(f"cannot write {temporary}: {_describe(error)}", error.errno) from error
        return final

    def _unique_name(self, size: int) -> str:
        now = time.time_ns() // 1000
        seconds, microseconds = divmod(now, 1_000_000)
        return f"{seconds}.M{microseconds}P{os.getpid()}Q{next(_deliveries)}.{self._host},S={size}"

    def _make_maildir(self, maildir: Path) -> None:
        try:
            os.makedirs(self.base, 0o700, exist_ok=True)
            created = False
            for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
                try:
                    os.mkdir(folder, 0o700)
                    created = True
                except FileExistsError:
                    if not folder.is_dir():
                        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None
            if created:  # make the new folders' names durable too
                _sync_folder(self.base)
                _sync_folder(maildir)
        except OSError as error:
            where = error.filename or maildir
            reason = f"cannot make the Maildir {maildir} ({where}): {_describe(error)}"
            raise ArchiveError(reason, error.errno) from error


def _sync_folder(folder: Path) -> None:
    """``fsync`` a folder, so that the names just added to it are on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IHookFactory)
class ArchiveHookFactory:
    """Builds an ``ArchiveHook`` from a ``[[hook]]`` table with ``use = "archive"``."""

    def build(self, config: HookConfig) -> ArchiveHook:
        options = config.options
        base = options.path("path")
        stage = options.choice("stage", STAGES, "delivered")
        options.finish()
        assert base is not None  # required: path() raised otherwise
        if base.exists() and not base.is_dir():
            raise options.error("path", f"{base}: not a folder")
        return ArchiveHook(config.name, base, stage)


factory = ArchiveHookFactory()
