"""The admin socket: ``popproxy sessions``, ``popproxy sessions --end ID`` and ``popproxy reload``
talk to a running proxy over AMP on a Unix socket (``[process] admin_socket``).

Server side: ``AdminService`` binds the socket before twistd drops privileges (as the listeners are
bound), in a directory it creates if missing (mode 0750), with mode 0660 and the group twistd drops
to (``-g``; the process's own group without it). The file permissions are the access control: only
root, the socket's owner and members of that group can connect (unix(7): connecting to a stream
socket needs write permission on it). ``AdminProtocol`` answers three commands by asking an
``IAdminTarget``: ``ProxyService`` (one process) or ``WorkerPool`` (which asks its workers over
``popproxy.ipc`` and merges their answers).

Client side: ``call`` sends one command and waits for its answer over a plain blocking socket (a
command-line tool runs one request; no reactor is needed to speak AMP's framing), and the ``run_*``
functions are the ``popproxy`` subcommands (``popproxy.cli``).

Bounds. AMP limits a value to 65,535 octets (``amp.MAX_VALUE_LENGTH``), and a listing can hold
thousands of sessions: ``ListSessions`` answers one page, the sessions whose id sorts after the
``after`` it was given, at most ``PAGE_SESSIONS`` of them and at most ``PAGE_OCTETS`` encoded
(``fit``), and says whether more follow; the client asks again from the last id it got. Every text
field of an entry is cut to ``FIELD_CHARS`` characters, so one entry is at most
``ENTRY_OCTETS_MAX`` octets and every page holds at least one. A page is a snapshot of the moment
it was asked for: sessions that start or end between pages may be missing or appear.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import grp
import json
import os
import socket
import stat
import struct
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface

from .config import DEFAULT_ADMIN_SOCKET, ProxyConfig

if TYPE_CHECKING:
    from .protocol.client import ClientProtocol

__all__ = [
    "AdminFailed",
    "AdminProtocol",
    "AdminService",
    "AdminSocketError",
    "AdminUnreachable",
    "EndSession",
    "IAdminTarget",
    "ListSessions",
    "Reload",
    "SessionInfo",
    "SessionPage",
    "admin_service",
    "call",
    "describe_session",
    "fit",
    "merge_pages",
    "page_of",
    "page_of_sessions",
]

log = Logger()

#: Longest text field of a listed session, in characters (longer ones are cut, ending in "…").
FIELD_CHARS: Final = 256
#: Octets of a page's session list (one AMP value: at most ``amp.MAX_VALUE_LENGTH``).
PAGE_OCTETS: Final = amp.MAX_VALUE_LENGTH
#: Sessions per page at most, whatever their size (about as many as fit in PAGE_OCTETS when their
#: names are short: an entry takes some 200 octets).
PAGE_SESSIONS: Final = 300
#: The most one encoded entry can take: 8 text fields of FIELD_CHARS characters (4 octets each at
#: most in UTF-8), 4 integers of at most 20 digits, and per field 2+2 length octets and its name
#: (at most 11 octets), plus the entry's closing 2 octets: well under PAGE_OCTETS.
ENTRY_OCTETS_MAX: Final = 8 * (4 + 11 + 4 * FIELD_CHARS) + 4 * (4 + 11 + 20) + 2
#: The mode of a directory this module creates for the socket, and of the socket itself.
DIRECTORY_MODE: Final = 0o750
SOCKET_MODE: Final = 0o660
#: Longest refusal reason sent (4 octets a character at most: within one AMP value).
REFUSAL_CHARS: Final = amp.MAX_VALUE_LENGTH // 4
#: What ``shut_down`` records as the session's end (``metrics.ENDED`` counts it).
END_REASON: Final = "ended by admin"


# --- what is listed ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One live session as ``popproxy sessions`` shows it.

    ``since``: when the client connected, ISO 8601 in UTC; ``bytes_in``/``bytes_out``: octets from
    and to the client so far; ``state``: the session machine's (``authorization``, ``sasl``,
    ``logging_in``, ``transaction``, ``closed``); ``worker``: the worker process that has it
    (``[process] workers`` > 1), else None.
    """

    session_id: str
    user: str | None
    client_host: str
    client_port: int
    upstream: str | None
    listener: str
    since: str
    bytes_in: int
    bytes_out: int
    state: str
    worker: int | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class SessionPage:
    """Sessions in order of their id, and whether more follow the last one."""

    sessions: tuple[SessionInfo, ...]
    more: bool = False


class IAdminTarget(Interface):
    """What the admin socket drives: the proxy of this process, or all the workers of a parent."""

    def sessions(after: str | None, limit: int) -> Deferred[SessionPage]:
        """Fires with the live sessions whose id sorts after ``after`` (every one when None), in
        order of their id, at most ``limit`` of them, and ``more`` if others follow."""

    def end_session(session_id: str) -> Deferred[bool]:
        """End the session ``session_id`` now, without QUIT upstream (so nothing it did is
        committed, RFC 1939 §6); fires with whether such a session was live."""

    def request_reload() -> Deferred[str | None]:
        """The reload SIGHUP runs; fires with None once it is applied, or why it was refused."""


def _clip(text: str) -> str:
    return text if len(text) <= FIELD_CHARS else text[: FIELD_CHARS - 1] + "…"


def describe_session(session: ClientProtocol, worker: int | None = None) -> SessionInfo:
    """A ``SessionInfo`` of ``session`` (a ``protocol.client.ClientProtocol``)."""
    from .protocol.client import peer_fields

    machine = session.machine
    attempt = machine.attempt
    user = machine.user or (attempt[0] if attempt else None)
    upstream = machine.upstream_name or (attempt[1] if attempt else None)
    host, port = peer_fields(session.transport.getPeer() if session.transport is not None else None)
    since = datetime.datetime.fromtimestamp(session.started, datetime.UTC).isoformat(timespec="seconds")
    return SessionInfo(
        session_id=session.session_id,
        user=user,
        client_host=host,
        client_port=port,
        upstream=upstream,
        listener=session.settings.listener.key,
        since=since,
        bytes_in=machine.bytes_in,
        bytes_out=machine.bytes_out,
        state=session.state.name.lower(),
        worker=worker,
    )


def _order(info: SessionInfo) -> tuple[str, int]:
    return info.session_id, info.worker or 0


def page_of(sessions: Iterable[SessionInfo], after: str | None, limit: int) -> SessionPage:
    """The first ``limit`` of ``sessions`` whose id sorts after ``after``, in order."""
    chosen = sorted((info for info in sessions if after is None or info.session_id > after), key=_order)
    return SessionPage(tuple(chosen[:limit]), len(chosen) > limit)


def page_of_sessions(sessions: Iterable[ClientProtocol], after: str | None, limit: int) -> SessionPage:
    """``page_of`` for live sessions: only the ``limit`` listed are described (a listing of many
    sessions takes many pages; each costs sorting the ids, not describing every session)."""
    chosen = sorted((session for session in sessions if after is None or session.session_id > after),
                    key=lambda session: session.session_id)
    return SessionPage(tuple(describe_session(session) for session in chosen[:limit]), len(chosen) > limit)


def merge_pages(pages: Sequence[SessionPage], limit: int) -> SessionPage:
    """One page from several (one per worker): complete up to its last id. A page with ``more``
    says nothing about ids after its last one, so the merge stops at the smallest such id."""
    ends = [page.sessions[-1].session_id for page in pages if page.more and page.sessions]
    cut = min(ends) if ends else None
    merged = sorted((info for page in pages for info in page.sessions if cut is None or info.session_id <= cut),
                    key=_order)
    more = any(page.more for page in pages) or len(merged) > limit
    return SessionPage(tuple(merged[:limit]), more)


# --- the AMP commands ------------------------------------------------------------------------------------

_ENTRY: Final = amp.AmpList([
    (b"id", amp.Unicode()),
    (b"user", amp.Unicode(optional=True)),
    (b"client_host", amp.Unicode()),
    (b"client_port", amp.Integer()),
    (b"upstream", amp.Unicode(optional=True)),
    (b"listener", amp.Unicode()),
    (b"since", amp.Unicode()),
    (b"bytes_in", amp.Integer()),
    (b"bytes_out", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"worker", amp.Integer(optional=True)),
])


def _entry(info: SessionInfo) -> dict[str, object]:
    """``info`` as an entry of the list, every text cut to ``FIELD_CHARS`` (whoever made it)."""
    fields = {key: _clip(value) if isinstance(value, str) else value for key, value in info.to_json().items()}
    fields["id"] = fields.pop("session_id")
    return fields


def _info(entry: dict[str, Any]) -> SessionInfo:
    fields = dict(entry)
    fields["session_id"] = fields.pop("id")
    return SessionInfo(**fields)


def encoded_size(info: SessionInfo) -> int:
    """Octets ``info`` takes in a ``ListSessions`` answer's list."""
    return len(_ENTRY.toStringProto([_entry(info)], None))


def fit(page: SessionPage, budget: int = PAGE_OCTETS) -> SessionPage:
    """As much of ``page`` as fits in ``budget`` octets encoded (always its first entry, which is
    at most ``ENTRY_OCTETS_MAX``); ``more`` if any was left out."""
    used = 0
    kept: list[SessionInfo] = []
    for info in page.sessions:
        used += encoded_size(info)
        if kept and used > budget:
            return SessionPage(tuple(kept), True)
        kept.append(info)
    return SessionPage(tuple(kept), page.more)


def page_answer(page: SessionPage) -> dict[str, object]:
    """``page`` as a ``ListSessions`` answer (fitted into one AMP value)."""
    fitted = fit(page)
    return {"sessions": [_entry(info) for info in fitted.sessions], "more": fitted.more}


def page_from_answer(answer: dict[str, Any], worker: int | None = None) -> SessionPage:
    """A ``ListSessions`` answer as a page; ``worker`` names the worker that gave it."""
    sessions = tuple(_info(entry) for entry in answer["sessions"])
    if worker is not None:
        sessions = tuple(dataclasses.replace(info, worker=worker) for info in sessions)
    return SessionPage(sessions, bool(answer["more"]))


class ListSessions(amp.Command):
    """The sessions whose id sorts after ``after`` (from the first when absent): one page."""

    arguments = [(b"after", amp.Unicode(optional=True))]
    response = [(b"sessions", _ENTRY), (b"more", amp.Boolean())]


class EndSession(amp.Command):
    """End ``session`` (its id) without QUIT upstream; ``existed``: whether it was live."""

    arguments = [(b"session", amp.Unicode())]
    response = [(b"existed", amp.Boolean())]


class Reload(amp.Command):
    """Reload as SIGHUP does; ``refusal`` is absent when the new configuration is in use."""

    arguments = []
    response = [(b"refusal", amp.Unicode(optional=True))]


# --- the server ------------------------------------------------------------------------------------


def peer_uid(transport: object) -> int | None:
    """The connecting process's user id (``SO_PEERCRED``, Linux), for the log."""
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        credentials = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
    except (AttributeError, OSError):
        return None
    return int(uid)


class AdminProtocol(amp.AMP):
    """One admin connection: each command is an ``IAdminTarget`` call."""

    def __init__(self, target: IAdminTarget) -> None:
        super().__init__()
        self._target = target
        self._uid: int | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._uid = peer_uid(self.transport)

    @ListSessions.responder
    def list_sessions(self, after: str | None = None) -> Deferred[dict[str, object]]:
        listed: Deferred[dict[str, object]] = self._target.sessions(after, PAGE_SESSIONS).addCallback(page_answer)
        return listed

    @EndSession.responder
    def end_session(self, session: str) -> Deferred[dict[str, object]]:
        def ended(existed: bool) -> dict[str, object]:
            if existed:
                log.info("session {session_id} ended by an admin (uid {admin_uid})", session_id=session,
                         admin_uid=self._uid, event="admin_end_session")
            return {"existed": existed}

        answer: Deferred[dict[str, object]] = self._target.end_session(session).addCallback(ended)
        return answer

    @Reload.responder
    def reload(self) -> Deferred[dict[str, object]]:
        log.info("reload asked over the admin socket (uid {admin_uid})", admin_uid=self._uid, event="admin_reload")
        answer: Deferred[dict[str, object]] = self._target.request_reload().addCallback(
            lambda refusal: {"refusal": None if refusal is None else refusal[:REFUSAL_CHARS]})
        return answer


class AdminSocketError(Exception):
    """The admin socket cannot be made; the message is one line naming it and why."""


class _AdminPort(unix.Port):
    """A Unix listening port that survives failing to remove its file at stop: after the privilege
    drop the directory may not be writable (the socket is then replaced at the next start)."""

    def connectionLost(self, reason: Failure) -> None:
        try:
            super().connectionLost(reason)
        except OSError as error:
            log.warn("could not remove the admin socket {path}: {error}", path=self.port, error=error.strerror)
            tcp.Port.connectionLost(self, reason)


class AdminService(Service):
    """Listens on the admin socket ``path`` from ``bind`` (``tap.makeService`` calls it, before twistd
    daemonizes and drops privileges; else ``privilegedStartService`` does) until ``stopService``.

    :param owner: the user that will own a directory made for the socket (the one twistd drops to,
        so that it can remove the socket at stop); None: this process's.
    :param group: the socket's group (and a made directory's): twistd's ``-g``, else this process's.
    :param required: False for the default path: a socket that cannot be made is logged and the
        proxy runs without one. True when the configuration names it: then it stops the start.
    """

    name = "admin socket"

    def __init__(self, path: str, target: IAdminTarget, reactor: Any, owner: int | None = None,
                 group: int | None = None, required: bool = True) -> None:
        self.path = path
        self.target = target
        self.reactor = reactor
        self.owner = owner
        self.group = group
        self.required = required
        self.port: _AdminPort | None = None
        self._tried = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self._tried:
            self.bind()

    def startService(self) -> None:
        super().startService()
        if not self._tried:
            self.bind()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        stopped: Deferred[None] = port.stopListening()
        return stopped

    def bind(self) -> None:
        """Listen now (once; ``privilegedStartService`` does it if nobody did before).

        :raises AdminSocketError: when ``required`` and the socket cannot be made (else logged)."""
        self._tried = True
        try:
            self.port = self._bind()
        except AdminSocketError as error:
            if self.required:
                raise
            log.warn("no admin socket: {error} (set [process] admin_socket to a usable path, or \"\" for none)",
                     error=str(error), event="admin_socket_failed")
            return
        log.info("admin socket on {path}", path=self.path, event="admin_socket")

    def _bind(self) -> _AdminPort:
        path = Path(self.path)
        group = os.getegid() if self.group is None else self.group
        try:
            _make_directory(path.parent, self.owner, group)
            _remove_stale(path)
        except OSError as error:
            raise AdminSocketError(f"{path}: {error.strerror or error}") from None
        factory = Factory.forProtocol(lambda: AdminProtocol(self.target))
        factory.noisy = False
        port = _AdminPort(os.fsencode(self.path), factory, mode=SOCKET_MODE, reactor=self.reactor)
        try:
            port.startListening()
        except CannotListenError as error:
            reason = error.socketError
            raise AdminSocketError(f"{path}: {getattr(reason, 'strerror', None) or reason}") from None
        try:
            if os.stat(path).st_gid != group:
                os.chown(path, -1, group)
        except OSError as error:
            port.stopListening()
            raise AdminSocketError(f"{path}: cannot give it group {group}: {error.strerror}") from None
        return port


def _make_directory(folder: Path, owner: int | None, group: int) -> None:
    """Make ``folder`` and any missing parent, mode 0750, owned by ``owner``:``group`` (left as
    they are when they exist)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        os.mkdir(made, DIRECTORY_MODE)
        os.chmod(made, DIRECTORY_MODE)  # whatever the umask
        if os.geteuid() == 0:
            os.chown(made, -1 if owner is None else owner, group)


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a process that is gone; refuse one another process listens on, and
    anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left over
            return
    raise OSError(errno.EADDRINUSE, "another running popproxy listens on it")


def admin_service(config: ProxyConfig, target: IAdminTarget, reactor: Any, owner: int | None = None,
                  group: int | None = None) -> AdminService | None:
    """The admin socket ``config`` asks for, driving ``target``; None if it asks for none.

    ``owner``/``group``: twistd's ``-u``/``-g`` (see ``AdminService``)."""
    configured = config.process.admin_socket
    if configured == "":
        return None
    return AdminService(configured or DEFAULT_ADMIN_SOCKET, target, reactor, owner, group,
                        required=configured is not None)


# --- the client ------------------------------------------------------------------------------------


class AdminUnreachable(Exception):
    """The running proxy could not be asked; the message is one line saying why."""


class AdminFailed(AdminUnreachable):
    """The running proxy was asked, and answered with an error instead of an answer."""


#: Seconds the client waits for an answer (a reload with many workers and hooks may take a while).
DEFAULT_TIMEOUT: Final = 60.0


def _group_of(path: Path) -> str:
    """The name of the group that may use the socket at ``path`` (or of its directory)."""
    for candidate in (path, path.parent):
        try:
            gid = os.stat(candidate).st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return "of the socket"


def _connect(path: str, timeout: float) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        connection.connect(path)
    except OSError as error:
        connection.close()
        if error.errno == errno.ENOENT:
            raise AdminUnreachable(f"{path}: no such socket (is popproxy running, with this admin_socket?)") from None
        if error.errno in (errno.EACCES, errno.EPERM):
            raise AdminUnreachable(f"{path}: permission denied (run as root or as a member of group "
                                   f"{_group_of(Path(path))})") from None
        if error.errno == errno.ECONNREFUSED:
            raise AdminUnreachable(f"{path}: nothing listens there (popproxy is not running?)") from None
        raise AdminUnreachable(f"{path}: {error.strerror or error}") from None
    return connection


def call(path: str, command: type[amp.Command], timeout: float = DEFAULT_TIMEOUT,
         **arguments: object) -> dict[str, Any]:
    """Send ``command`` with ``arguments`` to the admin socket at ``path`` and return its answer.

    :raises AdminUnreachable: no connection, or no answer within ``timeout`` seconds;
        ``AdminFailed`` (a subclass) for an error answer.
    """
    box = command.makeArguments(arguments, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = b"1"
    with _connect(path, timeout) as connection:
        try:
            connection.sendall(box.serialize())
            received = b""
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    raise AdminUnreachable(f"{path}: the connection closed before an answer came")
                received += chunk
                boxes = amp.parseString(received)
                if boxes:
                    break
        except TimeoutError:
            raise AdminUnreachable(f"{path}: no answer within {timeout:g}s") from None
        except OSError as error:
            raise AdminUnreachable(f"{path}: {error.strerror or error}") from None
    answer = boxes[0]
    if b"_error" in answer:
        description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
        raise AdminFailed(f"{path}: the proxy failed to answer: {description}")
    parsed: dict[str, Any] = command.parseResponse(answer, None)
    return parsed


def list_sessions(path: str, timeout: float = DEFAULT_TIMEOUT) -> list[SessionInfo]:
    """Every live session, page after page (see the module docstring)."""
    sessions: list[SessionInfo] = []
    after: str | None = None
    while True:
        page = page_from_answer(call(path, ListSessions, timeout, after=after))
        sessions.extend(page.sessions)
        if not page.more or not page.sessions:
            return sessions
        after = page.sessions[-1].session_id


def socket_from_config(config_file: str) -> str:
    """``[process] admin_socket`` of the configuration file (only that key is read); the default
    when the file does not exist or does not set it.

    :raises AdminUnreachable: the file cannot be read or parsed, or turns the socket off.
    """
    try:
        with open(config_file, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        return DEFAULT_ADMIN_SOCKET
    except OSError as error:
        raise AdminUnreachable(f"{config_file}: {error.strerror or error} (give the socket with --socket)") from None
    except tomllib.TOMLDecodeError as error:
        raise AdminUnreachable(f"{config_file}: TOML syntax error: {error} (give the socket with --socket)") from None
    process = data.get("process", {})
    configured = process.get("admin_socket") if isinstance(process, dict) else None
    if configured == "":
        raise AdminUnreachable(f"{config_file}: [process] admin_socket is \"\": the admin socket is turned off")
    return configured if isinstance(configured, str) else DEFAULT_ADMIN_SOCKET


# --- the subcommands (popproxy.cli) ------------------------------------------------------------------


def add_connection_arguments(parser: Any) -> None:
    """``-c FILE``, ``--socket PATH``, ``--timeout SECONDS`` (an ``argparse`` parser)."""
    from .tap import DEFAULT_CONFIG

    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"the running proxy's configuration, for [process] admin_socket (default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"the admin socket (default: from the configuration, else {DEFAULT_ADMIN_SOCKET})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the proxy's answer (default {DEFAULT_TIMEOUT:g})")


def add_sessions_arguments(parser: Any) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON array of objects instead of a table")
    parser.add_argument("--end", metavar="ID", default=None,
                        help="end session ID now, without QUIT upstream (nothing it did is committed)")


def _socket(args: Any) -> str:
    return str(args.socket) if args.socket else socket_from_config(str(args.config))


def run_sessions(args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``popproxy sessions``: 0 listed (or ended), 1 no such session (``--end``), 2 unreachable."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        path = _socket(args)
        if args.end is not None:
            existed = bool(call(path, EndSession, args.timeout, session=args.end)["existed"])
            if not existed:
                print(f"popproxy: no live session {args.end}", file=err)
                return 1
            print(f"popproxy: session {args.end} ended")
            return 0
        sessions = list_sessions(path, args.timeout)
    except AdminUnreachable as error:
        print(f"popproxy: {error}", file=err)
        return 2
    if args.json:
        json.dump([info.to_json() for info in sessions], out, indent=1)
        out.write("\n")
    else:
        out.write(format_table(sessions))
    return 0


def _address(host: str, port: int) -> str:
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_table(sessions: Sequence[SessionInfo]) -> str:
    """The sessions as a plain-text table, one line each, columns aligned."""
    workers = any(info.worker is not None for info in sessions)
    header = ["ID", *(["WORKER"] if workers else []), "USER", "CLIENT", "UPSTREAM", "LISTENER", "SINCE", "IN", "OUT",
              "STATE"]
    rows = [header]
    for info in sessions:
        rows.append([info.session_id, *([str(info.worker or "-")] if workers else []), info.user or "-",
                     _address(info.client_host, info.client_port), info.upstream or "-", info.listener, info.since,
                     str(info.bytes_in), str(info.bytes_out), info.state])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    summary = f"{len(sessions)} session(s)"
    return "\n".join([*lines, summary]) + "\n"


def run_reload(args: Any, err: TextIO | None = None) -> int:
    """``popproxy reload`` (systemd's ``ExecReload``): 0 applied, 1 refused (the reason on standard
    error), 2 the proxy could not be asked."""
    err = err or sys.stderr
    try:
        refusal = call(_socket(args), Reload, args.timeout).get("refusal")
    except AdminUnreachable as error:
        print(f"popproxy: {error}", file=err)
        return 1 if isinstance(error, AdminFailed) else 2  # asked, but nothing says it was applied
    if refusal is not None:
        print(f"popproxy: reload refused: {refusal}", file=err)
        return 1
    print("popproxy: configuration reloaded")
    return 0
