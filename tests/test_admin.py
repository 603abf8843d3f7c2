"""The live view: ``popproxy sessions``, ``popproxy sessions --end ID`` and ``popproxy reload`` over the
admin socket (``popproxy.admin``).

End to end: a real ``twistd -n popproxy`` in front of the run's real Dovecot, real ``poplib`` clients,
and the ``popproxy`` command run as a separate process, as an admin runs it. What must hold:

- the live sessions are listed with their user, client address and port, upstream, listener, start
  time, bytes and state, with one worker or several;
- ``--end`` cuts a session without QUIT upstream: its client sees the connection close, and a DELE it
  made is not committed (RFC 1939 §6: Dovecot expunges only in the UPDATE state, after QUIT);
- ``popproxy reload`` exits 0 when the new configuration is in use, 1 with the reason when it is
  refused, 2 when there is nobody to ask;
- only root, the socket's owner and the service's group may connect (mode 0660, twistd's ``-g``).

In memory: pages of the listing stay within AMP's 65,535 octets per value, whatever the sessions hold.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import poplib
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.protocols import amp

from popproxy import admin
from popproxy.admin import SessionInfo, SessionPage, encoded_size, fit, merge_pages, page_of
from popproxy.config import ConfigError, load_config

from support.configs import PREAMBLE
from support.dovecot import DovecotServer
from support.pop3client import log_in
from support.proxyproc import ProxyProcess, free_port, twistd

ROOT = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------------------


#: Runs ``popproxy.cli`` as another user: everything is imported first, then the process drops to
#: that user and its groups (the interpreter of this venv may live where that user cannot read it).
_AS_USER = """
import json, os, sys
from popproxy import cli
uid, gid, groups, argv = json.loads(sys.argv[1])
args = cli.parser().parse_args(argv)
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
sys.exit(args.run(args))
"""


def popproxy(*args: str, user: str | None = None, extra_groups: tuple[str, ...] = (),
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The ``popproxy`` command (``popproxy.cli``), as its own process; as ``user`` (and members of
    ``extra_groups``) when given."""
    command = [sys.executable, "-m", "popproxy.cli", *args]
    if user is not None:
        account = pwd.getpwnam(user)
        groups = [account.pw_gid, *(grp.getgrnam(name).gr_gid for name in extra_groups)]
        command = [sys.executable, "-c", _AS_USER, json.dumps([account.pw_uid, account.pw_gid, groups, list(args)])]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def listed(socket_path: Path) -> list[dict[str, object]]:
    result = popproxy("sessions", "--socket", str(socket_path), "--json")
    assert result.returncode == 0, result.stderr
    sessions: list[dict[str, object]] = json.loads(result.stdout)
    return sessions


def write_config(folder: Path, port: int, dovecot: DovecotServer, socket_path: Path, *, workers: int = 1,
                 limits: str = "") -> Path:
    config = folder / "popproxy.toml"
    config.write_text(
        f'[process]\nworkers = {workers}\nadmin_socket = "{socket_path}"\n'
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.main]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n[limits]\n{limits}\n'
    )
    config.chmod(0o644)
    return config


def wait_for(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def local_port(client: poplib.POP3) -> int:
    port: int = client.sock.getsockname()[1]
    return port


def assert_closed(client: poplib.POP3) -> None:
    """The proxy has cut ``client``'s connection: its next command gets no answer."""
    with pytest.raises((poplib.error_proto, OSError)):
        client.noop()
    client.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder other users can enter (pytest's own temporary folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="popproxy-admin-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def proxy(workdir: Path, dovecot: DovecotServer) -> Iterator[ProxyProcess]:
    port = free_port()
    process = ProxyProcess(write_config(workdir, port, dovecot, workdir / "admin.sock"), [port], workdir, json=True)
    try:
        wait_for(lambda: (workdir / "admin.sock").exists(), "the admin socket")
        yield process
    finally:
        process.stop(timeout=20)


# --- end to end: one process -----------------------------------------------------------------------------


def test_sessions_lists_each_live_session_with_its_fields(proxy: ProxyProcess, dovecot: DovecotServer,
                                                          workdir: Path) -> None:
    socket_path = workdir / "admin.sock"
    assert listed(socket_path) == []
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    dave = log_in(proxy.ports[0], "dave", dovecot.users["dave"].password)
    alice = log_in(proxy.ports[0], "alice", dovecot.users["alice"].password)
    waiting = poplib.POP3("127.0.0.1", proxy.ports[0], timeout=20)  # connected, not logged in
    try:
        dave.stat()
        sessions = {entry["client_port"]: entry for entry in listed(socket_path)}
        assert set(sessions) == {local_port(dave), local_port(alice), local_port(waiting)}
        mine = sessions[local_port(dave)]
        assert mine["user"] == "dave" and mine["upstream"] == "main" and mine["state"] == "transaction"
        assert mine["client_host"] == "127.0.0.1" and mine["listener"] == "listen[0]" and mine["worker"] is None
        assert isinstance(mine["session_id"], str) and len(mine["session_id"]) == 12
        since = datetime.datetime.fromisoformat(str(mine["since"]))
        assert since.tzinfo is not None and before <= since <= datetime.datetime.now(datetime.UTC)
        sent = len(b"USER dave\r\nPASS " + dovecot.users["dave"].password.encode() + b"\r\nSTAT\r\n")
        assert mine["bytes_in"] == sent
        assert isinstance(mine["bytes_out"], int) and mine["bytes_out"] > len(b"+OK\r\n") * 3
        assert sessions[local_port(alice)]["user"] == "alice"
        assert sessions[local_port(waiting)]["user"] is None
        assert sessions[local_port(waiting)]["upstream"] is None
        assert sessions[local_port(waiting)]["state"] == "authorization"
        # The table has the same sessions, one line each, and a count.
        table = popproxy("sessions", "--socket", str(socket_path))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["ID", "USER", "CLIENT", "UPSTREAM", "LISTENER", "SINCE", "IN", "OUT", "STATE"]
        assert lines[-1] == "3 session(s)"
        dave_line = next(line for line in lines if line.startswith(str(mine["session_id"])))
        assert dave_line.split()[1:5] == ["dave", f"127.0.0.1:{local_port(dave)}", "main", "listen[0]"]
    finally:
        for client in (dave, alice):
            client.quit()
        waiting.quit()
    wait_for(lambda: listed(socket_path) == [], "the sessions to end")


def test_end_cuts_the_session_without_quit_upstream_so_a_dele_is_not_committed(
        proxy: ProxyProcess, dovecot: DovecotServer, workdir: Path, bob: object) -> None:
    socket_path = workdir / "admin.sock"
    messages = len(dovecot.users["bob"].messages)
    bob_client = log_in(proxy.ports[0], "bob", dovecot.users["bob"].password)
    dave = log_in(proxy.ports[0], "dave", dovecot.users["dave"].password)
    try:
        assert bob_client.dele(1).startswith(b"+OK")
        session = next(entry for entry in listed(socket_path) if entry["client_port"] == local_port(bob_client))
        ended = popproxy("sessions", "--socket", str(socket_path), "--end", str(session["session_id"]))
        assert ended.returncode == 0, ended.stderr
        assert f"session {session['session_id']} ended" in ended.stdout
        assert_closed(bob_client)
        # The other session goes on.
        assert dave.stat()[0] == len(dovecot.users["dave"].messages)
        assert [entry["user"] for entry in listed(socket_path)] == ["dave"]
    finally:
        dave.quit()
    # Dovecot never got the QUIT, so it never entered the UPDATE state: message 1 is still there.
    again = log_in(proxy.ports[0], "bob", dovecot.users["bob"].password)
    try:
        assert again.stat()[0] == messages
    finally:
        again.quit()
    closed = [e for e in proxy.events() if e.get("event") == "session_close" and e.get("user") == "bob"]
    assert closed[0]["ended"] == "ended by admin"
    assert [e for e in proxy.events() if e.get("event") == "admin_end_session"]
    # An id that is not live: exit 1, said on standard error.
    missing = popproxy("sessions", "--socket", str(socket_path), "--end", str(session["session_id"]))
    assert missing.returncode == 1 and "no live session" in missing.stderr


def test_reload_applies_a_good_configuration_and_reports_why_a_bad_one_is_refused(
        proxy: ProxyProcess, dovecot: DovecotServer, workdir: Path) -> None:
    socket_path = workdir / "admin.sock"
    password = dovecot.users["dave"].password
    first = log_in(proxy.ports[0], "dave", password)
    second = log_in(proxy.ports[0], "dave", password)  # no per-user cap yet
    second.quit()
    write_config(workdir, proxy.ports[0], dovecot, socket_path, limits="max_sessions_per_user = 1")
    reloaded = popproxy("reload", "--socket", str(socket_path))
    assert (reloaded.returncode, reloaded.stderr) == (0, "")
    assert "reloaded" in reloaded.stdout
    # The new limit is in use by the time the command has answered.
    with pytest.raises(poplib.error_proto):
        log_in(proxy.ports[0], "dave", password)
    # A configuration that does not validate: exit 1, the reason on standard error, nothing changed.
    config = workdir / "popproxy.toml"
    config.write_text(config.read_text() + "[limits\n")
    refused = popproxy("reload", "--socket", str(socket_path))
    assert refused.returncode == 1
    assert "reload refused" in refused.stderr and "TOML syntax error" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    with pytest.raises(poplib.error_proto):
        log_in(proxy.ports[0], "dave", password)  # still the configuration that was reloaded
    first.quit()
    events = [e.get("event") for e in proxy.events() if e.get("event") in ("reloaded", "reload_failed")]
    assert events == ["reloaded", "reload_failed"]


def test_the_command_says_in_one_line_why_it_cannot_reach_the_proxy(workdir: Path) -> None:
    missing = popproxy("reload", "--socket", str(workdir / "nothing.sock"))
    assert missing.returncode == 2
    assert missing.stderr == f"popproxy: {workdir / 'nothing.sock'}: no such socket (is popproxy running, with this admin_socket?)\n"
    # A socket file nobody listens on any more (a proxy that was killed).
    stale = workdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))
    gone = popproxy("sessions", "--socket", str(stale))
    assert gone.returncode == 2 and "nothing listens there" in gone.stderr
    # The socket comes from the configuration given with -c; "" turns it off.
    config = workdir / "off.toml"
    config.write_text(PREAMBLE + '[process]\nadmin_socket = ""\n')
    off = popproxy("sessions", "-c", str(config))
    assert off.returncode == 2 and "turned off" in off.stderr
    config.write_text(PREAMBLE + f'[process]\nadmin_socket = "{workdir / "elsewhere.sock"}"\n')
    elsewhere = popproxy("sessions", "-c", str(config))
    assert elsewhere.returncode == 2 and str(workdir / "elsewhere.sock") in elsewhere.stderr


# --- end to end: workers ----------------------------------------------------------------------------------


def test_with_two_workers_sessions_of_both_are_listed_and_either_can_be_ended(
        workdir: Path, dovecot: DovecotServer) -> None:
    port = free_port()
    socket_path = workdir / "admin.sock"
    proxy = ProxyProcess(write_config(workdir, port, dovecot, socket_path, workers=2), [port], workdir, json=True)
    clients: list[poplib.POP3] = []
    try:
        wait_for(lambda: len([e for e in proxy.events() if e.get("event") == "worker_ready"]) >= 2, "two workers")
        wait_for(socket_path.exists, "the admin socket")
        users = ["alice", "dave", "carol@example.org"]
        by_port: dict[int, dict[str, object]] = {}
        # The kernel gives each connection to one worker as it pleases: open sessions until both have some.
        for attempt in range(40):
            user = users[attempt % len(users)]
            clients.append(log_in(port, user, dovecot.users[user].password))
            by_port = {int(str(entry["client_port"])): entry for entry in listed(socket_path)}
            if {entry["worker"] for entry in by_port.values()} == {1, 2}:
                break
        assert {entry["worker"] for entry in by_port.values()} == {1, 2}
        assert set(by_port) == {local_port(client) for client in clients}
        for client in clients:
            entry = by_port[local_port(client)]
            assert entry["state"] == "transaction" and entry["upstream"] == "main" and entry["user"] in users
        table = popproxy("sessions", "--socket", str(socket_path)).stdout.splitlines()
        assert table[0].split()[:2] == ["ID", "WORKER"] and table[-1] == f"{len(clients)} session(s)"
        # One session on either worker is ended; the others go on.
        victims = [next(c for c in clients if by_port[local_port(c)]["worker"] == worker) for worker in (1, 2)]
        for victim in victims:
            ended = popproxy("sessions", "--socket", str(socket_path), "--end", str(by_port[local_port(victim)]["session_id"]))
            assert ended.returncode == 0, ended.stderr
            assert_closed(victim)
        survivors = [client for client in clients if client not in victims]
        for client in survivors:
            client.noop()
        wait_for(lambda: {int(str(e["client_port"])) for e in listed(socket_path)} == {local_port(c) for c in survivors},
                 "the listing without the ended sessions")
        # A reload through the socket reaches every worker.
        reloaded = popproxy("reload", "--socket", str(socket_path))
        assert reloaded.returncode == 0, reloaded.stderr
        for client in survivors:
            client.quit()
        clients = []
    finally:
        for client in clients:
            client.close()
        proxy.stop(timeout=20)
    reloads = sorted(str(e.get("worker")) for e in proxy.events() if e.get("event") == "reloaded")
    assert reloads == ["1", "2", "None"]
    assert not socket_path.exists()  # removed at stop


# --- permissions ------------------------------------------------------------------------------------------


def test_only_root_and_the_services_group_may_use_the_socket(workdir: Path, dovecot: DovecotServer) -> None:
    """Started as root with ``-u nobody -g nogroup``: the socket's directory is made 0750 for that
    user and group, the socket is 0660 in that group; an unrelated user is refused with a one-line
    reason, a member of the group is served."""
    if os.geteuid() != 0:
        pytest.fail("this test starts twistd as root, as admins do; run the suite as root (CI does)", pytrace=False)
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    port = free_port()
    socket_path = workdir / "run" / "admin.sock"
    config = write_config(workdir, port, dovecot, socket_path)
    proxy = ProxyProcess(config, [port], workdir, extra=("-u", str(uid), "-g", str(gid)), json=True)
    try:
        wait_for(socket_path.exists, "the admin socket")
        folder = os.stat(socket_path.parent)
        assert (stat.S_IMODE(folder.st_mode), folder.st_uid, folder.st_gid) == (0o750, uid, gid)
        made = os.stat(socket_path)
        assert stat.S_ISSOCK(made.st_mode)
        assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o660, gid)
        refused = popproxy("sessions", "--socket", str(socket_path), user="daemon")
        assert refused.returncode == 2
        assert refused.stderr == f"popproxy: {socket_path}: permission denied (run as root or as a member of group nogroup)\n"
        refused = popproxy("reload", "--socket", str(socket_path), user="daemon")
        assert refused.returncode == 2 and "permission denied" in refused.stderr
        client = log_in(port, "dave", dovecot.users["dave"].password)
        try:
            member = popproxy("sessions", "--socket", str(socket_path), "--json", user="daemon", extra_groups=("nogroup",))
            assert member.returncode == 0, member.stderr
            assert [entry["user"] for entry in json.loads(member.stdout)] == ["dave"]
        finally:
            client.quit()
    finally:
        proxy.stop(timeout=20)
    assert not socket_path.exists()  # the unprivileged process could remove it: the folder is its own


def test_a_configured_admin_socket_that_cannot_be_made_stops_the_start(workdir: Path, dovecot: DovecotServer) -> None:
    (workdir / "file").write_text("not a folder")
    port = free_port()
    config = write_config(workdir, port, dovecot, workdir / "file" / "admin.sock")
    started = twistd("-n", "--pidfile", str(workdir / "popproxy.pid"), "popproxy", "-c", str(config), cwd=workdir)
    assert started.returncode == 1
    assert started.stderr == f"popproxy: {config}: process.admin_socket: {workdir / 'file' / 'admin.sock'}: Not a directory\n"
    assert not (workdir / "popproxy.pid").exists()


def test_a_socket_left_by_a_killed_proxy_is_replaced_and_a_live_one_is_not(workdir: Path, dovecot: DovecotServer) -> None:
    socket_path = workdir / "admin.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(socket_path))  # bound, never listened on, closed: what a killed process leaves
    port = free_port()
    proxy = ProxyProcess(write_config(workdir, port, dovecot, socket_path), [port], workdir, json=True)
    try:
        wait_for(lambda: any(e.get("event") == "admin_socket" for e in proxy.events()), "the admin socket")
        assert listed(socket_path) == []
        # A second proxy with the same socket does not take it from the first.
        other = workdir / "other"
        other.mkdir()
        second_port = free_port()
        config = write_config(other, second_port, dovecot, socket_path)
        second = twistd("-n", "--pidfile", str(other / "popproxy.pid"), "popproxy", "-c", str(config), cwd=other)
        assert second.returncode == 1
        assert second.stderr == f"popproxy: {config}: process.admin_socket: {socket_path}: another running popproxy listens on it\n"
        assert listed(socket_path) == []
    finally:
        proxy.stop(timeout=20)


# --- in memory: configuration and pages ------------------------------------------------------------------


def test_one_process_and_the_parent_of_workers_are_both_admin_targets() -> None:
    from zope.interface.verify import verifyClass

    from popproxy.service import ProxyService
    from popproxy.workers import WorkerPool

    assert verifyClass(admin.IAdminTarget, ProxyService)
    assert verifyClass(admin.IAdminTarget, WorkerPool)


def test_admin_socket_configuration(tmp_path: Path) -> None:
    config = tmp_path / "popproxy.toml"
    config.write_text(PREAMBLE)
    assert load_config(config).process.admin_socket is None  # the default, used if it can be
    config.write_text(PREAMBLE + '[process]\nadmin_socket = ""\n')
    assert load_config(config).process.admin_socket == ""
    config.write_text(PREAMBLE + '[process]\nadmin_socket = "/run/p/admin.sock"\n')
    assert load_config(config).process.admin_socket == "/run/p/admin.sock"
    config.write_text(PREAMBLE + '[process]\nadmin_socket = "admin.sock"\n')
    with pytest.raises(ConfigError, match=r"process\.admin_socket.*absolute"):
        load_config(config)
    config.write_text(PREAMBLE + f'[process]\nadmin_socket = "/{"x" * 107}"\n')
    with pytest.raises(ConfigError, match="longer than a Unix socket path"):
        load_config(config)


def _info(number: int, user: str | None = "user", worker: int | None = None) -> SessionInfo:
    return SessionInfo(f"{number:012x}", user, "192.0.2.1", 40000 + number % 20000, "main", "listen[0]",
                       "2026-01-01T00:00:00+00:00", number, number * 2, "transaction", worker)


def _answer_size(page: SessionPage) -> int:
    answer = admin.ListSessions.makeResponse(admin.page_answer(page), None)
    return len(answer[b"sessions"])


def test_pages_of_thousands_of_sessions_stay_within_one_amp_value_and_miss_none() -> None:
    long_name = "ü" * 5000  # cut to FIELD_CHARS characters
    sessions = [_info(n, user=long_name if n % 7 == 0 else f"user{n}") for n in range(5000)]
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = page_of(sessions, after, admin.PAGE_SESSIONS)
        answer = admin.ListSessions.makeResponse(admin.page_answer(page), None)  # raises over 65,535 octets
        assert len(answer[b"sessions"]) <= amp.MAX_VALUE_LENGTH
        got = admin.page_from_answer(admin.ListSessions.parseResponse(answer, None))
        seen.extend(info.session_id for info in got.sessions)
        pages += 1
        if not got.more:
            break
        after = got.sessions[-1].session_id
    assert seen == sorted(info.session_id for info in sessions)
    assert pages > 5000 // admin.PAGE_SESSIONS  # the octet bound, not only the count, made pages
    clipped = admin.page_from_answer(admin.ListSessions.parseResponse(
        admin.ListSessions.makeResponse(admin.page_answer(page_of(sessions[:1], None, 1)), None), None))
    assert clipped.sessions[0].user is not None and len(clipped.sessions[0].user) == admin.FIELD_CHARS
    # The worst entry is within its stated bound.
    worst = SessionInfo("x" * 300, "\U0001f600" * 300, "h" * 300, 2**63, "u" * 300, "l" * 300, "s" * 300, 2**63,
                        2**63, "t" * 300, 2**63)
    assert encoded_size(worst) <= admin.ENTRY_OCTETS_MAX < amp.MAX_VALUE_LENGTH
    assert len(fit(SessionPage((worst,) * 20)).sessions) >= 1


def test_merged_pages_of_workers_are_complete_up_to_their_last_id() -> None:
    # Worker 1 had more sessions than one page holds; worker 2 gave all of its own.
    first = SessionPage((_info(1, worker=1), _info(4, worker=1)), more=True)
    second = SessionPage((_info(2, worker=2), _info(5, worker=2), _info(9, worker=2)), more=False)
    merged = merge_pages([first, second], limit=100)
    # Past id 4, worker 1 said nothing: the page stops there, and says more follow.
    assert [(info.session_id, info.worker) for info in merged.sessions] == [
        (_info(1).session_id, 1), (_info(2).session_id, 2), (_info(4).session_id, 1)]
    assert merged.more
    assert merge_pages([second], limit=2) == SessionPage(second.sessions[:2], True)
    assert merge_pages([], limit=10) == SessionPage((), False)
