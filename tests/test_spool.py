"""Large messages for hooks: kept in a temporary file past ``[limits] spool_above``, scanned from it
in chunks (``IChunkedHook``), delivered from it as the client takes it.

Units: the streaming dot-stuffer and TOP against their whole-message counterparts; the spool itself
(memory, then a nameless 0600 file). The machine: a spooled answer is written a piece at a time and
stops while the client's write buffer is full. End to end: a 30 MB message through ``twistd
popproxy`` with the clamav hook and a real clamd, intact, in bounded memory.
"""

from __future__ import annotations

import hashlib
import os
import poplib
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from test_machine import Harness, retr_answer
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from popproxy.config import parse_config
from popproxy.hooks.interfaces import MessageContext, MessageFacts, SessionFacts
from popproxy.hooks.pipeline import run_message_hooks
from popproxy.hooks.registry import build_hooks, start_hooks
from popproxy.pki import CertificateAuthority
from popproxy.pop3.wire import stuff_body
from popproxy.protocol.effects import RunHooks, Write
from popproxy.protocol.interfaces import Leg
from popproxy.protocol.mailbox import top_of
from popproxy.protocol.spool import Spool, StreamingStuffer, top_chunks

from support.clamd import ClamdServer, ScannerError
from support.configs import PREAMBLE
from support.dovecot import DovecotServer
from support.proxyproc import ProxyProcess, free_port
from support.rss import MiB, RssWatch, pid_of

PIECES = st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.", b"Subject: x", b"\r\n\r\n"]),
                  max_size=40)


def split(message: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(message)) for cut in cuts})
    pieces, start = [], 0
    for point in [*points, len(message)]:
        pieces.append(message[start:point])
        start = point
    return pieces


@settings(max_examples=400, deadline=None)
@given(PIECES, st.lists(st.integers(min_value=0, max_value=200), max_size=6), st.integers(min_value=0, max_value=5))
def test_streaming_stuffing_and_top_equal_the_whole_message_versions(parts: list[bytes], cuts: list[int],
                                                                     lines: int) -> None:
    message = b"".join(parts)
    chunks = split(message, cuts)
    stuffer = StreamingStuffer()
    assert b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.finish() == stuff_body(message)
    top = b"".join(top_chunks(iter(chunks), lines))
    again = StreamingStuffer()
    # What the client gets for TOP: the same wire form either way.
    assert again.feed(top) + again.finish() == stuff_body(top_of(message, lines))


def test_a_spool_stays_in_memory_below_its_threshold_and_goes_to_a_nameless_0600_file_above(tmp_path: Path) -> None:
    small = Spool(threshold=100, directory=str(tmp_path))
    small.write(b"x" * 100)
    assert not small.spooled and small.read() == b"x" * 100
    large = Spool(threshold=100, directory=str(tmp_path))
    for _ in range(50):
        large.write(b"0123456789" * 7)
    assert large.spooled and large.size == 3500
    assert b"".join(large.chunks(1000)) == b"0123456789" * 350 == large.read()
    assert large._file is not None
    assert stat.S_IMODE(os.fstat(large._file.fileno()).st_mode) == 0o600
    assert list(tmp_path.iterdir()) == []  # no name on disk: nothing to leave behind
    large.close()


def context(size: int) -> MessageContext:
    return MessageContext(MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user="bob"), 1, "u1", size))


@pytest_twisted.ensureDeferred
async def test_a_hook_that_takes_bytes_still_gets_a_spooled_message_whole(tmp_path: Path) -> None:
    config = parse_config(PREAMBLE + '[[hook]]\nuse = "support.samplehooks:tagger"\nreservation = 64\n',
                          tmp_path / "popproxy.toml")
    hooks = start_hooks(build_hooks(config), reactor)
    message = b"Subject: big\r\n\r\n" + b"line\r\n" * 1000
    spool = Spool(threshold=1000)
    spool.write(message)
    assert spool.spooled
    result = await ensureDeferred(run_message_hooks(hooks, spool, context(len(message)), reactor))
    spool.close()  # (the Hooked answer that owns it does this)
    assert isinstance(result.message, bytes) and result.message.endswith(message)


def test_a_spooled_answer_is_written_as_the_client_takes_it(tmp_path: Path) -> None:
    """The machine writes a spooled message a piece at a time, and no further piece while the
    client's write buffer is full; what the client gets is exactly the stuffed message; the DELE
    behind it goes upstream only once it is all written."""
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nmax_size = 1048576\nreservation = 0\n'
    h = Harness(tmp_path, "spool_above = 4096\n", hooks=hooks)
    message = b"Subject: big\r\n\r\n" + b".dotted line of text\r\n" * 20000
    h.log_in(listing=({1: len(message)}, {}))
    h.machine.client_data(b"RETR 1\r\nDELE 1\r\n")
    h.machine.upstream_data(retr_answer(message))
    runs = [effect for effect in h.take() if isinstance(effect, RunHooks)]
    assert len(runs) == 1 and isinstance(runs[0].message, Spool) and runs[0].message.spooled
    writes: list[bytes] = []

    def full_after_each(effect: Write) -> None:  # a transport whose buffer fills with every write
        writes.append(effect.data)
        h.machine.output_blocked(Leg.CLIENT, True)

    h.on_write = full_after_each
    h.machine.hooks_done(runs[0].ticket, runs[0].message, (), [])  # unchanged: delivered from the file
    assert len(writes) == 1  # the status line, then nothing until the client takes it
    assert h.sent() == []
    while True:
        count = len(writes)
        h.machine.output_blocked(Leg.CLIENT, False)
        if len(writes) == count:
            break
        assert len(writes) == count + 1  # one piece per drained buffer
    body = b"".join(writes)
    assert body == b"+OK %d octets\r\n" % len(message) + stuff_body(message)
    assert max(len(piece) for piece in writes) <= 2 * 65536  # pieces, not the message
    assert h.sent() == [b"DELE 1\r\n"]


# -- end to end -------------------------------------------------------------------------------------------

SIZE = 30 * MiB


def big_message() -> bytes:
    head = b"Subject: thirty megabytes\r\nMessage-ID: <spool@popproxy.test>\r\n\r\n"
    line = b".A line of a large message that must reach the client whole, byte for byte.\r\n"
    return head + line * ((SIZE - len(head)) // len(line))


@pytest.fixture(scope="module")
def roomy_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdServer]:
    """A clamd that takes messages up to 64 MiB (the shared one stops at 64 KiB on purpose)."""
    server = ClamdServer(tmp_path_factory.mktemp("clamd-roomy"), stream_max_length=64 * MiB)
    try:
        server.start()
    except ScannerError as error:
        server.close()
        pytest.fail(f"clamd did not start: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def big_mailbox(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[tuple[DovecotServer, bytes]]:
    server = DovecotServer(tmp_path_factory.mktemp("dovecot-spool"), leaf=ca.issue(["localhost", "127.0.0.1"]))
    message = big_message()
    server.add_user("big", "big-pw", [message])
    server.start()
    try:
        yield server, message
    finally:
        server.close()


def test_a_30_mb_message_is_virus_scanned_and_delivered_in_bounded_memory(
        tmp_path: Path, roomy_clamd: ClamdServer, big_mailbox: tuple[DovecotServer, bytes]) -> None:
    dovecot, message = big_mailbox
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.main]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n[limits]\nspool_above = 1048576\nspool_dir = "{tmp_path}"\n'
        f'[[hook]]\nuse = "clamav"\naddress = "{roomy_clamd.address}"\nmax_size = {64 * MiB}\ntimeout = 120\n'
        f'[[hook]]\nuse = "audit-log"\npath = "{tmp_path / "audit.jsonl"}"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path)
    result: dict[str, bytes] = {}
    try:
        with RssWatch(pid_of(proxy)) as watch:
            def fetch() -> None:
                client = poplib.POP3("127.0.0.1", port, timeout=120)
                client.user("big")
                client.pass_("big-pw")
                _, lines, _ = client.retr(1)
                client.quit()
                result["message"] = b"\r\n".join(lines) + b"\r\n"

            thread = threading.Thread(target=fetch, daemon=True)
            thread.start()
            thread.join(180)
    finally:
        proxy.stop(timeout=20)
    assert "message" in result, "the RETR did not finish within 180 s"
    assert hashlib.sha256(result["message"]).digest() == hashlib.sha256(message).digest()
    bound = 16 * 1024  # KiB
    report = watch.report("30 MB RETR, clamav scanning from the spool file", bound)
    print(report)
    assert watch.growth < bound, report
    records = (tmp_path / "audit.jsonl").read_text()
    assert '"virus":null' in records and hashlib.sha256(message).hexdigest() in records
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("popproxy-spool")]


def test_a_client_that_hangs_up_mid_stream_gets_nothing_more_and_commits_nothing(tmp_path: Path) -> None:
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nmax_size = 1048576\nreservation = 0\n'
    h = Harness(tmp_path, "spool_above = 4096\n", hooks=hooks)
    message = b"Subject: big\r\n\r\n" + b"line of text\r\n" * 20000
    h.log_in(listing=({1: len(message)}, {}))
    h.machine.client_data(b"RETR 1\r\nDELE 1\r\nQUIT\r\n")
    h.machine.upstream_data(retr_answer(message))
    run = next(effect for effect in h.take() if isinstance(effect, RunHooks))
    assert isinstance(run.message, Spool)
    h.on_write = lambda effect: h.machine.output_blocked(Leg.CLIENT, True)
    h.machine.hooks_done(run.ticket, run.message, (), [])
    h.take()
    h.machine.output_gone(Leg.CLIENT)  # (the glue drops what is written after this)
    h.machine.client_lost()
    h.take()
    h.machine.output_blocked(Leg.CLIENT, False)
    assert not any(isinstance(effect, Write) for effect in h.take())  # nothing more is read for nobody
    assert not run.message.spooled  # its file is gone
    assert not [line for line in h.sent() if line.startswith((b"DELE", b"QUIT"))]


def test_stale_spool_files_are_removed_at_start_and_stop(tmp_path: Path) -> None:
    """Spool files have no name while in use; one with a name is what a process that died left
    (where the system has no O_TMPFILE): the service removes them when it starts and stops."""
    from twisted.internet.testing import MemoryReactorClock

    from popproxy.service import ProxyService

    from support.configs import proxy_config

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    config = proxy_config(tmp_path, extra=f'[limits]\nspool_dir = "{spool_dir}"\n')
    (spool_dir / "popproxy-spool-stale1").write_bytes(b"x")
    (spool_dir / "unrelated").write_bytes(b"y")
    service = ProxyService(config, MemoryReactorClock(), handle_signals=False)
    service.startService()
    assert sorted(p.name for p in spool_dir.iterdir()) == ["unrelated"]
    (spool_dir / "popproxy-spool-stale2").write_bytes(b"x")
    service.stopService()
    assert sorted(p.name for p in spool_dir.iterdir()) == ["unrelated"]
