"""The ``clamav`` hook against a real clamd (the ``clamd`` fixture, with the EICAR signature the test
writes), through the hook pipeline with both ``on_error`` policies, and against small fake servers:
silent past the timeout, answering garbage, or reading the INSTREAM chunks for the test to check."""

from __future__ import annotations

import email
import json
import struct
from contextlib import asynccontextmanager
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface.verify import verifyObject

from popproxy.config import ConfigError, parse_config
from popproxy.hooks.clamav import (
    NOTICE_RESERVATION,
    ClamavHook,
    ClamdError,
    VirusFound,
    parse_reply,
    replacement,
)
from popproxy.hooks.interfaces import HookNotStarted, IMessageHook, MessageContext, MessageFacts, SessionFacts
from popproxy.hooks.pipeline import run_message_hooks
from popproxy.hooks.registry import BuiltHook, build_hooks, start_hooks

from support.clamd import (
    EICAR,
    SIGNATURE_FOUND,
    STREAM_MAX_LENGTH,
    ClamdServer,
    clamd_fixture,  # noqa: F401 (the session-wide clamd fixture)
    eicar_message,
)
from support.configs import PREAMBLE
from support.spamd import free_port

CONFIG_PATH = Path("/etc/popproxy/popproxy.toml")

CLEAN = (
    b"Return-Path: <alice@example.org>\r\n"
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: Bob Example <bob@example.org>\r\n"
    b"Subject: Lunch on Thursday\r\n"
    b"Date: Thu, 26 Nov 2026 09:58:10 +0000\r\n"
    b"Message-ID: <lunch-20261126-0958@example.org>\r\n"
    b"\r\n"
    b"Shall we meet for lunch on Thursday?\r\n"
    b".a line that starts with a dot\r\n"
)


def big_message(size: int = 4 * STREAM_MAX_LENGTH) -> bytes:
    """A clean message larger than the fixture's StreamMaxLength."""
    head = b"From: a@example.org\r\nSubject: a large one\r\nMessage-ID: <large@example.org>\r\n\r\n"
    line = b"All work and no play makes a large message, line of seventy-odd octets.\r\n"
    return head + line * (size // len(line))


def context(message: bytes = b"", user: str = "bob@example.org") -> MessageContext:
    return MessageContext(MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user=user), 1, "u1", len(message)))


def built(hook_toml: str) -> BuiltHook:
    """The first hook of ``PREAMBLE`` + ``hook_toml``, built and started with the reactor, the way
    the service does."""
    return start_hooks(build_hooks(parse_config(PREAMBLE + hook_toml, CONFIG_PATH)), reactor)[0]


def clamav(where: str, **options: object) -> ClamavHook:
    settings_text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
    hook = built(f'[[hook]]\nuse = "clamav"\ntimeout = 20\n{where}\n{settings_text}').hook
    assert isinstance(hook, ClamavHook)
    return hook


def tcp(server: ClamdServer) -> str:
    return f'address = "{server.address}"'


def unix(server: ClamdServer) -> str:
    return f'socket = "{server.socket_path}"'


# --- against the real clamd ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", [tcp, unix], ids=["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_a_clean_message_passes_byte_identical(clamd: ClamdServer, where: Any) -> None:
    hook = clamav(where(clamd), action="replace")
    verifyObject(IMessageHook, hook)
    ctx = context(CLEAN)
    assert await hook.process(CLEAN, ctx) == CLEAN
    assert ctx.verdicts["clamav"].details == {"virus": None}
    assert ctx.verdicts["clamav"].spam is None


@pytest.mark.parametrize("where", [tcp, unix], ids=["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_eicar_is_refused(clamd: ClamdServer, where: Any) -> None:
    hook = clamav(where(clamd))  # action = "refuse" is the default
    assert hook.reservation == 0
    ctx = context(eicar_message())
    with pytest.raises(VirusFound, match=r"virus Eicar-Test-Signature\.UNOFFICIAL found") as caught:
        await hook.process(eicar_message(), ctx)
    assert caught.value.signature == SIGNATURE_FOUND
    assert ctx.verdicts["clamav"].details == {"virus": SIGNATURE_FOUND}  # recorded before refusing


@pytest.mark.parametrize("where", [tcp, unix], ids=["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_eicar_is_replaced_by_a_notice_with_the_original_headers(clamd: ClamdServer, where: Any) -> None:
    hook = clamav(where(clamd), action="replace")
    original = eicar_message()
    ctx = context(original)
    notice = await hook.process(original, ctx)
    assert ctx.verdicts["clamav"].details == {"virus": SIGNATURE_FOUND}
    assert len(notice) <= len(original) + hook.reservation == len(original) + NOTICE_RESERVATION
    assert EICAR not in notice and b"invoice.com" not in notice
    # Every header field of the original but those about its body, in order, byte for byte.
    head = original.partition(b"\r\n\r\n")[0]
    kept = head.partition(b"MIME-Version:")[0]
    assert notice.startswith(kept + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n")
    parsed = email.message_from_bytes(notice, policy=email_policy.default)
    assert parsed["Subject"] == "Invoice 2026-118"
    assert parsed["Message-ID"] == "<invoice-2026-118@example.net>"
    assert parsed["X-Popproxy-Virus"] == SIGNATURE_FOUND
    assert parsed.get_content_type() == "text/plain" and not parsed.is_multipart()
    assert f"Virus: {SIGNATURE_FOUND}" in parsed.get_content()
    assert notice.endswith(b"\r\n") and b"\n" not in notice.replace(b"\r\n", b"")


@pytest_twisted.ensureDeferred
async def test_a_message_over_stream_max_length_is_an_error(clamd: ClamdServer) -> None:
    hook = clamav(tcp(clamd))
    with pytest.raises(ClamdError, match=r"could not scan the message: INSTREAM size limit exceeded\. ERROR"):
        await hook.process(big_message(), context())
    # Just under the limit is scanned (the limit counts the message, not the chunk framing).
    fits = big_message(STREAM_MAX_LENGTH - 200)
    assert len(fits) <= STREAM_MAX_LENGTH
    assert await hook.process(fits, context()) == fits


@pytest_twisted.ensureDeferred
async def test_clamd_down_is_an_error(tmp_path: Path) -> None:
    hook = clamav(f'address = "127.0.0.1:{free_port()}"')
    with pytest.raises(ClamdError, match=r"cannot connect to clamd at 127\.0\.0\.1:\d+: .*refused"):
        await hook.process(CLEAN, context())
    hook = clamav(f'socket = "{tmp_path / "none.sock"}"')
    with pytest.raises(ClamdError, match="cannot connect to clamd at unix:"):
        await hook.process(CLEAN, context())


# --- through the pipeline: action and on_error -----------------------------------------------------------


async def pipeline(hook_toml: str, message: bytes) -> Any:
    hook = built(hook_toml)
    return await run_message_hooks([hook], message, context(message), reactor)


@pytest.mark.parametrize("on_error", ["pass", "refuse"])
@pytest_twisted.ensureDeferred
async def test_pipeline_refuses_a_virus_whatever_on_error_says(clamd: ClamdServer, on_error: str) -> None:
    result = await pipeline(f'[[hook]]\nuse = "clamav"\n{tcp(clamd)}\non_error = "{on_error}"\n', eicar_message())
    assert result.refused
    assert [v.details for v in result.verdicts] == [{"virus": SIGNATURE_FOUND}]
    assert result.notes == [f"clamav: virus {SIGNATURE_FOUND} found; refused"]


@pytest.mark.parametrize("on_error", ["pass", "refuse"])
@pytest_twisted.ensureDeferred
async def test_pipeline_replaces_a_virus_and_passes_a_clean_message(clamd: ClamdServer, on_error: str) -> None:
    toml = f'[[hook]]\nuse = "clamav"\n{unix(clamd)}\naction = "replace"\non_error = "{on_error}"\n'
    result = await pipeline(toml, eicar_message())
    assert not result.refused and result.notes == []
    assert result.message == replacement(eicar_message(), SIGNATURE_FOUND)
    result = await pipeline(toml, CLEAN)
    assert result.message == CLEAN and [v.details for v in result.verdicts] == [{"virus": None}]


class Silent(Protocol):
    """Accepts, reads, never answers; ``lost`` fires when the client goes away."""

    def __init__(self, received: list[bytes], lost: Deferred[None]) -> None:
        self.received = received
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


@asynccontextmanager
async def listening(factory: Any) -> Any:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        yield port.getHost().port
    finally:
        await port.stopListening()


def silent() -> tuple[Factory, list[bytes], Deferred[None]]:
    received: list[bytes] = []
    lost: Deferred[None] = Deferred()
    return Factory.forProtocol(lambda: Silent(received, lost)), received, lost


@pytest.mark.parametrize("on_error", ["pass", "refuse"])
@pytest.mark.parametrize("fault", ["down", "slow", "size"])
@pytest_twisted.ensureDeferred
async def test_pipeline_failures_follow_on_error(clamd: ClamdServer, fault: str, on_error: str) -> None:
    factory, _, lost = silent()
    async with listening(factory) as silent_port:
        address = {"down": f"127.0.0.1:{free_port()}", "slow": f"127.0.0.1:{silent_port}", "size": clamd.address}[fault]
        message = big_message() if fault == "size" else eicar_message()
        toml = f'[[hook]]\nuse = "clamav"\naddress = "{address}"\naction = "replace"\ntimeout = 0.5\non_error = "{on_error}"\n'
        result = await pipeline(toml, message)
        if fault == "slow":
            await lost.addTimeout(2, reactor)  # the connection was dropped, not left open
    reason = {"down": "cannot connect to clamd", "slow": "did not answer within 0.5s", "size": "INSTREAM size limit exceeded"}
    assert len(result.notes) == 1 and reason[fault] in result.notes[0]
    assert result.verdicts == ()
    if on_error == "pass":
        assert result.message == message  # as it stood before the hook: unscanned, never replaced
        assert result.notes[0].endswith("passed as it stood before this hook")
    else:
        assert result.refused and result.notes[0].endswith("; refused")


# --- fake servers: the wire format, cancelling, garbage ---------------------------------------------------


class Recording(Protocol):
    """Reads an INSTREAM request to its end, keeps its chunks, then answers ``answer`` (or nothing
    but a close, for ``None``)."""

    def __init__(self, answer: bytes | None, requests: list[list[bytes]]) -> None:
        self.answer = answer
        self.requests = requests
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.buffer.startswith(b"zINSTREAM\0"):
            return
        chunks, rest = [], self.buffer[len(b"zINSTREAM\0") :]
        while len(rest) >= 4:
            (length,) = struct.unpack(">I", rest[:4])
            if len(rest) < 4 + length:
                return
            chunks.append(rest[4 : 4 + length])
            rest = rest[4 + length :]
            if length == 0:
                self.requests.append(chunks)
                assert self.transport is not None
                if self.answer is not None:
                    self.transport.write(self.answer)
                self.transport.loseConnection()
                return


def recording(answer: bytes | None) -> tuple[Factory, list[list[bytes]]]:
    requests: list[list[bytes]] = []
    return Factory.forProtocol(lambda: Recording(answer, requests)), requests


@pytest_twisted.ensureDeferred
async def test_the_message_goes_in_chunks_of_64_kib_and_a_zero_length_end() -> None:
    factory, requests = recording(b"stream: OK\0")
    message = big_message(300_000)
    async with listening(factory) as port:
        hook = clamav(f'address = "127.0.0.1:{port}"')
        assert await hook.process(message, context()) == message
    (chunks,) = requests
    assert chunks[-1] == b"" and all(0 < len(chunk) <= 65536 for chunk in chunks[:-1])
    assert b"".join(chunks) == message and len(chunks) == 6


@pytest_twisted.ensureDeferred
async def test_silent_past_the_timeout_is_cancelled_and_disconnected() -> None:
    factory, received, lost = silent()
    async with listening(factory) as port:
        hook = clamav(f'address = "127.0.0.1:{port}"')  # its own timeout is 20 s
        pending = hook.process(CLEAN, context())
        pending.addTimeout(0.3, reactor)  # as popproxy's pipeline does with the hook's timeout
        with pytest.raises(TimeoutError):
            await pending
        await lost.addTimeout(2, reactor)  # the connection was aborted, not left open
    assert b"".join(received).startswith(b"zINSTREAM\0")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"stream: Eicar-Test-Signature FOUND", None),  # no NUL, then the close: still an answer
        (b"stream: OK", None),
        (b"", r"closed the connection without an answer"),
        (b"UNKNOWN COMMAND\0", r"answered something that is not clamd's: 'UNKNOWN COMMAND'"),
        (b"stream: Can't allocate memory ERROR\0", r"could not scan the message: stream: Can't allocate memory ERROR"),
        (b"stream: FOUND\0", r"not clamd's"),
        (b"x" * 5000, r"sent more than 4096 octets"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_answers_that_are_not_clamds(answer: bytes, message: str | None) -> None:
    factory, _ = recording(answer)
    async with listening(factory) as port:
        hook = clamav(f'address = "127.0.0.1:{port}"', action="replace")
        if message is None:
            ctx = context(CLEAN)
            await hook.process(CLEAN, ctx)
            assert ctx.verdicts["clamav"].details["virus"] in (None, "Eicar-Test-Signature")
        else:
            with pytest.raises(ClamdError, match=message):
                await hook.process(CLEAN, context())


def test_parse_reply_cleans_the_signature_name() -> None:
    assert parse_reply(b"stream: OK\0", "x").virus is None
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0", "x").virus == "Win.Test.EICAR_HDB-1"
    hostile = parse_reply(b"stream: Bad\r\nBcc: victim@example.org\xff FOUND", "x").virus
    assert hostile == "Bad Bcc: victim@example.org?"
    assert len(parse_reply(b"stream: " + b"A" * 500 + b" FOUND", "x").virus or "") == 128


# --- the notice -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "kept"),
    [
        (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n"),
        (b"Subject: x\r\n", b"Subject: x\r\n"),  # no body at all
        (b"\r\nbody only\r\n", b""),
        (b"From a@example.org Thu Nov 26 09:58:10 2026\r\nSubject: x\r\nContent-Type: text/html\r\n\r\n<p>\r\n",
         b"From a@example.org Thu Nov 26 09:58:10 2026\r\nSubject: x\r\n"),
        (b"Subject: x\r\nContent-Type: multipart/mixed;\r\n\tboundary=b\r\ncontent-transfer-encoding: 7bit\r\n"
         b"Mime-Version: 1.0\r\nTo: y\r\n\r\n--b--\r\n", b"Subject: x\r\nTo: y\r\n"),
    ],
)
def test_the_notice_keeps_the_header_but_what_describes_the_body(original: bytes, kept: bytes) -> None:
    notice = replacement(original, "Eicar-Test-Signature")
    assert notice.startswith(kept + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n")
    assert notice.count(b"Content-Type:") == 1 and b"boundary" not in notice
    assert len(notice) <= len(original) + NOTICE_RESERVATION


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.lists(
        st.sampled_from([b"From: a@b\r\n", b"Content-Type: text/plain\r\n", b"\tfolded\r\n", b"X: y\r\n",
                         b"MIME-Version: 1.0\r\n", b"not a header\r\n", b"Subject:\r\n", b"\r\n", b"\n"]),
        max_size=12,
    ),
    body=st.binary(max_size=200),
    signature=st.text(max_size=300),
)
def test_the_notice_never_outgrows_the_reservation(head: list[bytes], body: bytes, signature: str) -> None:
    original = b"".join(head) + body
    notice = replacement(original, signature)
    assert len(notice) <= len(original) + NOTICE_RESERVATION
    assert notice.endswith(b"\r\n")
    body_start = notice.index(b"X-Popproxy-Virus: ")
    assert all(0x20 <= c < 0x7F or c in b"\r\n" for c in notice[body_start:])


@pytest_twisted.ensureDeferred
async def test_a_hook_that_was_not_started_does_no_io() -> None:
    hook = build_hooks(parse_config(PREAMBLE + '[[hook]]\nuse = "clamav"\n', CONFIG_PATH))[0].hook
    with pytest.raises(HookNotStarted, match="hook clamav was not started"):
        await hook.process(CLEAN, context())


# --- settings ---------------------------------------------------------------------------------------


def test_factory_defaults_and_settings() -> None:
    hooks = [
        b.hook
        for b in build_hooks(
            parse_config(
                PREAMBLE + '[[hook]]\nuse = "clamav"\n'
                '[[hook]]\nuse = "clamav"\nname = "av"\nsocket = "/run/clamav/clamd.ctl"\naction = "replace"\n'
                '[[hook]]\nuse = "clamav"\nname = "av6"\naddress = "[::1]:3311"\n',
                CONFIG_PATH,
            )
        )
    ]
    default, local, v6 = hooks
    assert isinstance(default, ClamavHook) and isinstance(local, ClamavHook) and isinstance(v6, ClamavHook)
    assert (default.name, str(default.server), default.action, default.reservation) == ("clamav", "127.0.0.1:3310", "refuse", 0)
    assert (local.name, str(local.server), local.action) == ("av", "unix:/run/clamav/clamd.ctl", "replace")
    assert local.reservation == NOTICE_RESERVATION < 1024
    assert str(v6.server) == "[::1]:3311"


@pytest.mark.parametrize(
    ("settings_text", "key", "reason"),
    [
        ('action = "delete"', "action", "must be one of"),
        ('address = "127.0.0.1:3310"\nsocket = "/s"', "socket", "not both"),
        ('address = "127.0.0.1:99999"', "address", "port must be a number"),
        ("stream_max_length = 1", "stream_max_length", "unknown key"),
    ],
)
def test_bad_settings_name_their_key(settings_text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        built(f'[[hook]]\nuse = "clamav"\n{settings_text}\n')
    assert caught.value.key == f"hook[0].{key}"
    assert reason in caught.value.reason
