"""The ``archive`` hook: a Maildir per user, written safely, in a thread, failing loudly."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed

from popproxy.config import ConfigError, parse_config
from popproxy.hooks import archive
from popproxy.hooks.archive import ArchiveError, ArchiveHook, maildir_folder
from popproxy.hooks.interfaces import (
    HookNotStarted,
    MessageContext,
    MessageFacts,
    SessionFacts,
    Verdict,
)
from popproxy.hooks.pipeline import ordered, run_message_hooks
from popproxy.hooks.registry import build_hooks, start_hooks

from support.configs import PREAMBLE

MESSAGE = b"From: a@example.net\r\nSubject: s\r\n\r\n.a line with a dot\r\nbody\r\n"
NAME = re.compile(r"(\d+)\.M(\d{1,6})P(\d+)Q(\d+)\.([^/:,]+),S=(\d+)")


def context(user: str | None = "alice@example.org") -> MessageContext:
    return MessageContext(MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user=user), 3, "u3", 100))


def in_place(function, *args):  # type: ignore[no-untyped-def]
    """A ``run_in_thread`` that runs in the calling thread, for tests about the file system alone."""
    return succeed(function(*args))


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- configuration -----------------------------------------------------------------------------------


def build(tmp_path: Path, hook_toml: str) -> ArchiveHook:
    config = parse_config(PREAMBLE + hook_toml, tmp_path / "popproxy.toml")
    (built,) = build_hooks(config)
    assert built.is_message_hook and not built.is_session_hook
    assert isinstance(built.hook, ArchiveHook)
    return built.hook


def test_factory_defaults_and_relative_paths(tmp_path: Path) -> None:
    hook = build(tmp_path, '[[hook]]\nuse = "archive"\npath = "archive"\n')
    assert (hook.name, hook.base, hook.stage, hook.reservation) == ("archive", tmp_path / "archive", "delivered", 0)
    assert not (tmp_path / "archive").exists()  # nothing is created before the first message
    hook = build(tmp_path, f'[[hook]]\nuse = "archive"\nname = "raw"\npath = "{tmp_path}/a"\nstage = "received"\n')
    assert (hook.name, hook.base, hook.stage) == ("raw", tmp_path / "a", "received")


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[[hook]]\nuse = "archive"\n', "hook[0].path", "required"),
        ('[[hook]]\nuse = "archive"\npath = ""\n', "hook[0].path", "empty"),
        ('[[hook]]\nuse = "archive"\npath = "a"\nstage = "first"\n', "hook[0].stage", '"received", "delivered"'),
        ('[[hook]]\nuse = "archive"\npath = "a"\nmode = 384\n', "hook[0].mode", "unknown key"),
        ('[[hook]]\nuse = "archive"\npath = "popproxy.toml"\n', "hook[0].path", "not a folder"),
    ],
)
def test_configuration_errors(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    (tmp_path / "popproxy.toml").write_text("")
    with pytest.raises(ConfigError) as caught:
        build_hooks(parse_config(PREAMBLE + toml, tmp_path / "popproxy.toml"))
    assert caught.value.key == key and reason in caught.value.reason


def test_the_pipeline_runs_received_first_and_delivered_last(tmp_path: Path) -> None:
    config = parse_config(
        PREAMBLE
        + f"""
[[hook]]
use = "archive"
name = "as-delivered"
path = "{tmp_path}"
[[hook]]
use = "rewrite"
[[hook.rule]]
add_header = "X-Rewritten: yes"
[[hook]]
use = "archive"
name = "as-received"
path = "{tmp_path}"
stage = "received"
""",
        tmp_path / "popproxy.toml",
    )
    assert [built.config.name for built in ordered(build_hooks(config))] == ["as-received", "rewrite", "as-delivered"]


# --- the folder name ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "folder"),
    [
        ("alice", "alice"),
        ("alice@example.org", "alice@example.org"),
        ("first.last+tag@example.org", "first.last+tag@example.org"),
        ("..", "%2E."),
        (".", "%2E"),
        (".hidden", "%2Ehidden"),
        ("../../etc/passwd", "%2E.%2F..%2Fetc%2Fpasswd"),
        ("/root", "%2Froot"),
        ("a b\\c%d", "a%20b%5Cc%25d"),
        ("jörg", "j%C3%B6rg"),
        ("nul\0byte", "nul%00byte"),
    ],
)
def test_maildir_folder_mapping(user: str, folder: str) -> None:
    assert maildir_folder(user) == folder


@given(st.text(min_size=1, max_size=300))
def test_maildir_folders_are_one_safe_component_and_distinct(user: str) -> None:
    folder = maildir_folder(user)
    assert "/" not in folder and "\0" not in folder and not folder.startswith(".")
    assert 0 < len(folder) <= 200 and folder.isascii()
    if len(folder) < 180:  # not shortened: reversible, so no two users share a folder
        octets = re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), folder)
        assert octets.encode("latin-1").decode("utf-8", "surrogateescape") == user


def test_long_user_names_are_shortened_with_a_hash() -> None:
    one, other = maildir_folder("x" * 300), maildir_folder("x" * 299 + "y")
    assert len(one) == len(other) == 198 and one != other and one.startswith("x" * 180 + "%~")


# --- storing -----------------------------------------------------------------------------------------


def test_store_writes_a_maildir_message(tmp_path: Path) -> None:
    hook = ArchiveHook("archive", tmp_path / "base", host="mx:1/a,b")
    path = hook.store("alice@example.org", MESSAGE)
    maildir = tmp_path / "base" / "alice@example.org"
    assert path.parent == maildir / "new"
    assert path.read_bytes() == MESSAGE  # as given: CRLF, not dot-stuffed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in ("tmp", "new", "cur"):
        assert stat.S_IMODE((maildir / folder).stat().st_mode) == 0o700
    assert files(maildir / "tmp") == [] and files(maildir / "cur") == []
    match = NAME.fullmatch(path.name)
    assert match is not None, path.name
    assert int(match.group(3)) == os.getpid()
    assert match.group(5) == "mx\\0721\\057a\\054b"
    assert int(match.group(6)) == len(MESSAGE)


def test_names_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    hook = ArchiveHook("archive", tmp_path)
    paths = [hook.store("bob", b"%d\r\n" % i) for i in range(50)]
    assert len({p.name for p in paths}) == 50
    counters = [int(NAME.fullmatch(p.name).group(4)) for p in paths]  # type: ignore[union-attr]
    assert counters == sorted(counters)
    assert len(files(tmp_path / "bob" / "new")) == 50


def test_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        path = ArchiveHook("archive", tmp_path).store("carol", MESSAGE)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_file_and_new_folder_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("file" if stat.S_ISREG(mode) else os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(archive.os, "fsync", fsync)
    hook = ArchiveHook("archive", tmp_path)
    hook.store("dave", MESSAGE)
    # the first delivery makes the Maildir: the names of its folders are synced too
    assert synced == [str(tmp_path), str(tmp_path / "dave"), "file", str(tmp_path / "dave" / "new")]
    synced.clear()
    hook.store("dave", MESSAGE)
    assert synced == ["file", str(tmp_path / "dave" / "new")]


# --- failures ----------------------------------------------------------------------------------------


def test_a_path_under_a_regular_file_is_enotdir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    hook = ArchiveHook("archive", tmp_path / "file" / "archive")
    with pytest.raises(ArchiveError) as caught:
        hook.store("alice", MESSAGE)
    assert caught.value.errno == errno.ENOTDIR
    assert "cannot make the Maildir" in str(caught.value) and "ENOTDIR" in str(caught.value)


def test_a_user_folder_that_is_a_file_is_enotdir(tmp_path: Path) -> None:
    (tmp_path / "alice").write_text("")
    with pytest.raises(ArchiveError) as caught:
        ArchiveHook("archive", tmp_path).store("alice", MESSAGE)
    assert caught.value.errno == errno.ENOTDIR and str(tmp_path / "alice") in str(caught.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file in tmp/ is really created, then its descriptor is pointed at /dev/full, where every
    write fails with ENOSPC: the kernel's error, not a simulated one."""

    def open_full(path: Path, flags: int, mode: int) -> int:
        fd = os.open(path, flags, mode)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd

    hook = ArchiveHook("archive", tmp_path)
    monkeypatch.setattr(hook, "_open", open_full)
    with pytest.raises(ArchiveError) as caught:
        hook.store("alice", MESSAGE)
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device (ENOSPC)" in str(caught.value)
    assert files(tmp_path / "alice" / "tmp") == [] and files(tmp_path / "alice" / "new") == []


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root ignores permissions")
def test_no_permission_is_eacces() -> None:
    """Run as an unprivileged user (through ``setpriv`` when the tests run as root)."""
    with tempfile.TemporaryDirectory(prefix="popproxy-archive-") as name:  # pytest's tmp_path is 0700
        _no_permission(Path(name))


def _no_permission(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # bob's Maildir cannot be made here
    maildir = tmp_path / "alice"
    for folder in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        folder.mkdir()
        if os.geteuid() == 0:
            os.chown(folder, NOBODY, NOBODY)
    (maildir / "tmp").chmod(0o555)  # alice's exists, but tmp/ is read-only
    script = (
        "import sys; from pathlib import Path; from popproxy.hooks.archive import ArchiveHook, ArchiveError\n"
        "for user in ('alice', 'bob'):\n"
        "    try: ArchiveHook('archive', Path(sys.argv[1])).store(user, b'x\\r\\n')\n"
        "    except ArchiveError as error: print(error.errno, error)\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path)]
    if os.geteuid() == 0:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    assert output[0].startswith(f"{errno.EACCES} cannot create {tmp_path / 'alice' / 'tmp'}/")
    assert output[0].endswith("Permission denied (EACCES)")
    assert output[1] == f"{errno.EACCES} cannot make the Maildir {tmp_path / 'bob'} ({tmp_path / 'bob'}): " + (
        "Permission denied (EACCES)"
    )


def test_no_user_no_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no user"):
        ArchiveHook("archive", tmp_path, run_in_thread=in_place).process(MESSAGE, context(None))
    with pytest.raises(ArchiveError, match="no user"):
        ArchiveHook("archive", tmp_path).store("", MESSAGE)


# --- through the hook contract, with a real thread ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_process_archives_in_a_thread_and_returns_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from twisted.internet import reactor

    threads: list[str] = []
    hook = ArchiveHook("archive", tmp_path)
    with pytest.raises(HookNotStarted):
        hook.process(MESSAGE, context())
    hook.start(reactor)  # the service's reactor: its thread pool does the file work
    real_store = hook.store

    def store(user: str, message: bytes) -> Path:
        threads.append(threading.current_thread().name)
        return real_store(user, message)

    monkeypatch.setattr(hook, "store", store)
    ctx = context()
    result = await hook.process(MESSAGE, ctx)
    assert result is MESSAGE
    assert threads and threads[0] != threading.main_thread().name
    (name,) = files(tmp_path / "alice@example.org" / "new")
    assert ctx.verdicts["archive"] == Verdict(
        hook="archive", details={"archived": str(tmp_path / "alice@example.org" / "new" / name)}
    )


@pytest_twisted.ensureDeferred
async def test_failures_reach_the_pipeline_as_hook_errors(tmp_path: Path) -> None:
    from twisted.internet import reactor

    (tmp_path / "file").write_text("")
    config = parse_config(
        PREAMBLE
        + f"""
[[hook]]
use = "archive"
name = "strict"
path = "{tmp_path / "file" / "archive"}"
on_error = "refuse"
""",
        tmp_path / "popproxy.toml",
    )
    result = await run_message_hooks(start_hooks(build_hooks(config), reactor), MESSAGE, context(), reactor)
    assert result.refused
    assert result.notes[0].startswith("strict: ArchiveError: cannot make the Maildir")


@pytest_twisted.ensureDeferred
async def test_received_and_delivered_copies_differ_by_the_rewrite(tmp_path: Path) -> None:
    from twisted.internet import reactor

    config = parse_config(
        PREAMBLE
        + f"""
[[hook]]
use = "archive"
name = "delivered"
path = "{tmp_path / "delivered"}"
[[hook]]
use = "rewrite"
[[hook.rule]]
add_header = "X-Rewritten: yes"
[[hook]]
use = "archive"
name = "received"
path = "{tmp_path / "received"}"
stage = "received"
""",
        tmp_path / "popproxy.toml",
    )
    ctx = context()
    result = await run_message_hooks(ordered(start_hooks(build_hooks(config), reactor)), MESSAGE, ctx, reactor)
    assert result.message == b"X-Rewritten: yes\r\n" + MESSAGE
    (received,) = (tmp_path / "received" / "alice@example.org" / "new").iterdir()
    (delivered,) = (tmp_path / "delivered" / "alice@example.org" / "new").iterdir()
    assert received.read_bytes() == MESSAGE
    assert delivered.read_bytes() == result.message
    assert set(ctx.verdicts) == {"received", "rewrite", "delivered"}
