"""The wire grammar and framing, in memory: every split point, dot-stuffing, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.pop3 import capa, commands, sasl
from popproxy.pop3.framing import TOO_LONG, BodyScanner, CommandLines, ResponseReader
from popproxy.pop3.wire import Command, err, multiline, ok, parse_command, response_code, unstuff_lines


class Recorder:
    """A ResponseHandler that records events; multi-line answers are announced up front."""

    def __init__(self, bodies: list[bool]) -> None:
        self.bodies = list(bodies)
        self.events: list[tuple[str, bytes]] = []

    def status_received(self, line: bytes) -> bool:
        self.events.append(("status", line))
        return self.bodies.pop(0) and line.startswith(b"+OK")

    def body_received(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def body_ended(self) -> None:
        self.events.append(("end", b""))

    def line_too_long(self) -> None:
        self.events.append(("too long", b""))


STREAM = (
    b"+OK 2 messages\r\n"  # STAT
    b"+OK 40 octets\r\nSubject: x\r\n\r\n..dot line\r\n.\r\n"  # RETR with a stuffed line
    b"+OK\r\n.\r\n"  # empty body
    b"-ERR no such message\r\n"  # RETR that failed: no body
    b"+OK\r\n\r\n.\r\n"  # body of one empty line
    b"+OK bye\r\n"
)
EXPECTED = [
    ("status", b"+OK 2 messages\r\n"),
    ("status", b"+OK 40 octets\r\n"),
    ("body", b"Subject: x\r\n\r\n..dot line\r\n.\r\n"),
    ("end", b""),
    ("status", b"+OK\r\n"),
    ("body", b".\r\n"),
    ("end", b""),
    ("status", b"-ERR no such message\r\n"),
    ("status", b"+OK\r\n"),
    ("body", b"\r\n.\r\n"),
    ("end", b""),
    ("status", b"+OK bye\r\n"),
]
BODIES = [False, True, True, True, True, False]


def test_reader_whole_stream() -> None:
    recorder = Recorder(BODIES)
    ResponseReader(recorder).feed(STREAM)
    assert recorder.events == EXPECTED


@pytest.mark.parametrize("split", range(1, len(STREAM)))
def test_reader_every_split_point(split: int) -> None:
    recorder = Recorder(BODIES)
    reader = ResponseReader(recorder)
    reader.feed(STREAM[:split])
    reader.feed(STREAM[split:])
    assert recorder.events == EXPECTED


def test_reader_byte_by_byte() -> None:
    recorder = Recorder(BODIES)
    reader = ResponseReader(recorder)
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
    assert recorder.events == EXPECTED


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), max_size=20))
def test_reader_any_chunking(cuts: list[int]) -> None:
    recorder = Recorder(BODIES)
    reader = ResponseReader(recorder)
    points = sorted(set(cuts)) + [len(STREAM)]
    start = 0
    for point in points:
        reader.feed(STREAM[start:point])
        start = point
    assert recorder.events == EXPECTED


def test_reader_lone_dot_inside_a_line_is_not_a_terminator() -> None:
    recorder = Recorder([True])
    ResponseReader(recorder).feed(b"+OK\r\na.\r\n.b\r\n..\r\n.\r\n")
    assert recorder.events[1] == ("body", b"a.\r\n.b\r\n..\r\n.\r\n")


def test_reader_pause_holds_later_answers() -> None:
    recorder = Recorder([False, False])
    reader = ResponseReader(recorder)
    original = recorder.status_received

    def pause_after_first(line: bytes) -> bool:
        reader.pause()
        return original(line)

    recorder.status_received = pause_after_first  # type: ignore[method-assign]
    reader.feed(b"+OK one\r\n+OK two\r\n")
    assert recorder.events == [("status", b"+OK one\r\n")]
    recorder.status_received = original  # type: ignore[method-assign]
    reader.resume()
    assert recorder.events == [("status", b"+OK one\r\n"), ("status", b"+OK two\r\n")]


def test_reader_take_buffer_returns_undelivered_bytes() -> None:
    """Upstream STLS: the bytes after +OK are removed, never delivered."""
    taken = []

    class Handler(Recorder):
        def status_received(self, line: bytes) -> bool:
            taken.append(reader.take_buffer())
            return super().status_received(line)

    handler = Handler([False, False])
    reader = ResponseReader(handler)
    reader.feed(b"+OK begin TLS\r\n+OK injected\r\n")
    assert taken == [b"+OK injected\r\n"]
    assert handler.events == [("status", b"+OK begin TLS\r\n")]


def test_reader_overlong_status_line_breaks_the_stream() -> None:
    recorder = Recorder([False])
    reader = ResponseReader(recorder, max_line_length=100)
    reader.feed(b"+OK " + b"x" * 200)
    assert recorder.events == [("too long", b"")]
    reader.feed(b"\r\n+OK later\r\n")
    assert recorder.events == [("too long", b"")]


def test_reader_bare_lf_status_line_is_normalised() -> None:
    recorder = Recorder([False])
    ResponseReader(recorder).feed(b"+OK hi\n")
    assert recorder.events == [("status", b"+OK hi\r\n")]


@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=60))
@settings(max_examples=300)
def test_body_scanner_finds_the_first_terminator_under_any_chunking(data: bytes, sizes: list[int]) -> None:
    stream = data + b"\r\n.\r\n" + b"tail"
    expected = (b"\r\n" + stream).find(b"\r\n.\r\n") + 5 - 2
    scanner = BodyScanner()
    offset = 0
    i = 0
    while True:
        size = sizes[i % len(sizes)]
        i += 1
        chunk = stream[offset : offset + size]
        end = scanner.feed(chunk)
        if end != -1:
            assert offset + end == expected
            return
        offset += len(chunk)
        assert offset < len(stream)


def test_command_lines_split_and_limits() -> None:
    lines = CommandLines(max_length=20)
    lines.feed(b"USER a\r\nNOOP\nPASS sec ret\r\n")
    assert [lines.next_line(), lines.next_line(), lines.next_line(), lines.next_line()] == [
        b"USER a",
        b"NOOP",
        b"PASS sec ret",
        None,
    ]


def test_command_lines_limit_counts_the_crlf() -> None:
    """RFC 2449 §4: 255 octets including CRLF."""
    lines = CommandLines(max_length=10)
    lines.feed(b"12345678\r\n123456789\r\nok\r\n")
    assert lines.next_line() == b"12345678"
    assert lines.next_line() is TOO_LONG
    assert lines.next_line() == b"ok"


def test_command_lines_endless_line_does_not_grow_memory() -> None:
    lines = CommandLines(max_length=255)
    results = []
    for _ in range(1000):
        lines.feed(b"A" * 1000)
        while (line := lines.next_line()) is not None:
            results.append(line)
        assert len(lines) < 1300
    lines.feed(b"\r\nNOOP\r\n")
    while (line := lines.next_line()) is not None:
        results.append(line)
    assert results == [TOO_LONG, b"NOOP"]


def test_command_lines_clear_returns_pending_bytes() -> None:
    lines = CommandLines(255)
    lines.feed(b"STLS\r\nUSER evil\r\n")
    assert lines.next_line() == b"STLS"
    assert lines.clear() == b"USER evil\r\n"
    assert lines.next_line() is None


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_command_lines_never_raise_and_never_exceed_the_limit(data: bytes, chunk: int) -> None:
    lines = CommandLines(255)
    for i in range(0, len(data), chunk):
        lines.feed(data[i : i + chunk])
        while (line := lines.next_line()) is not None:
            assert line is TOO_LONG or (isinstance(line, bytes) and len(line) <= 253 and b"\n" not in line)


def test_parse_command() -> None:
    assert parse_command(b"retr 1") == Command(b"RETR", (b"1",), b"1")
    assert parse_command(b"PASS with spaces  ") == Command(b"PASS", (b"with", b"spaces"), b"with spaces  ")
    assert parse_command(b"") is None
    assert parse_command(b"   ") is None
    assert Command(b"TOP", (b"1", b"5"), b"1 5").to_line() == b"TOP 1 5\r\n"
    assert Command(b"STAT", (), b"").to_line() == b"STAT\r\n"


def test_response_codes() -> None:
    assert response_code(b"-ERR [IN-USE] locked\r\n") == "IN-USE"
    assert response_code(b"-ERR [sys/temp] later\r\n") == "SYS/TEMP"
    assert response_code(b"-ERR plain\r\n") is None
    assert response_code(b"+OK [IN-USE]\r\n") is None
    assert err("x", "AUTH") == b"-ERR [AUTH] x\r\n"
    assert ok() == b"+OK\r\n"


def test_multiline_stuffs_and_unstuff_lines_reverses() -> None:
    wire = multiline(ok(), [b".", b"..x", b"plain", b""])
    assert wire == b"+OK\r\n..\r\n...x\r\nplain\r\n\r\n.\r\n"
    assert unstuff_lines(wire[len(b"+OK\r\n") :]) == [b".", b"..x", b"plain", b""]


@pytest.mark.parametrize(
    ("line", "body"),
    [
        (b"RETR 1", True),
        (b"TOP 1 0", True),
        (b"LIST", True),
        (b"LIST 1", False),
        (b"UIDL", True),
        (b"UIDL 3", False),
        (b"CAPA", True),
        (b"STAT", False),
        (b"DELE 1", False),
        (b"QUIT", False),
    ],
)
def test_expects_body(line: bytes, body: bool) -> None:
    command = parse_command(line)
    assert command is not None
    assert commands.expects_body(command) is body


def test_relayable_commands() -> None:
    caps = frozenset({b"UTF8"})
    assert commands.is_relayable(Command(b"RETR", (b"1",), b"1"), frozenset())
    assert commands.is_relayable(Command(b"UTF8", (), b""), caps)
    assert not commands.is_relayable(Command(b"LANG", (), b""), caps)
    assert not commands.is_relayable(Command(b"XTND", (), b""), caps)
    assert not commands.is_relayable(Command(b"APOP", (b"a", b"b"), b"a b"), caps)


def test_capa_before_login() -> None:
    before_tls = capa.before_login(stls=True, user=False, sasl_plain=False)
    assert b"STLS" in before_tls and b"USER" not in before_tls and b"SASL PLAIN" not in before_tls
    after_tls = capa.before_login(stls=False, user=True, sasl_plain=True)
    assert b"STLS" not in after_tls and b"USER" in after_tls and b"SASL PLAIN" in after_tls
    for name in (b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"TOP", b"UIDL"):
        assert name in after_tls


def test_capa_after_login_filters_what_does_not_pass() -> None:
    upstream = [b"STLS", b"SASL PLAIN LOGIN", b"USER", b"IMPLEMENTATION Dovecot 2.3", b"TOP", b"UIDL",
                b"RESP-CODES", b"EXPIRE NEVER", b"XCLIENT", b"AUTH-RESP-CODE"]
    assert capa.after_login(upstream) == [b"TOP", b"UIDL", b"RESP-CODES", b"EXPIRE NEVER", b"PIPELINING"]


def test_sasl_plain() -> None:
    import base64

    creds = sasl.decode_plain(base64.b64encode(b"\0alice\0s3cret"))
    assert (creds.authzid, creds.authcid, creds.password) == (b"", b"alice", b"s3cret")
    assert "s3cret" not in repr(creds)
    for bad in (b"=", b"!!!", base64.b64encode(b"alice\0pw"), base64.b64encode(b"\0\0pw"), base64.b64encode(b"a\0b\0c\0d")):
        with pytest.raises(sasl.SaslError):
            sasl.decode_plain(bad)


def test_reader_breaks_on_an_endless_body_line_without_buffering() -> None:
    recorder = Recorder([True])
    reader = ResponseReader(recorder, max_body_line=1000)
    reader.feed(b"+OK\r\nshort line\r\n")
    for _ in range(5):
        reader.feed(b"x" * 300)
    assert recorder.events[-1] == ("too long", b"")
    delivered = sum(len(data) for kind, data in recorder.events if kind == "body")
    assert delivered <= 1000 + len(b"short line\r\n")


def test_reader_breaks_on_a_body_larger_than_its_limit() -> None:
    class Limited(Recorder):
        def status_received(self, line: bytes) -> bool:
            reader.body_limit = 100
            return super().status_received(line)

    recorder = Limited([True])
    reader = ResponseReader(recorder)
    reader.feed(b"+OK 10 octets\r\n")
    for _ in range(10):
        reader.feed(b"line\r\n" * 5)
    assert recorder.events[-1] == ("too long", b"")


def test_body_limit_follows_the_announced_size() -> None:
    from popproxy.protocol.upstream import body_limit

    assert body_limit(b"+OK 1000 octets\r\n") == 2000 + 65536
    assert body_limit(b"+OK message follows\r\n") is None


_LINES = st.lists(
    st.one_of(st.sampled_from([b"", b".", b"..", b".x", b"...", b"a.b", b" .", b"\r"]),
              st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))),
    max_size=30,
)


@given(_LINES, st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=40))
@settings(max_examples=400)
def test_framing_round_trips_under_any_chunking(lines: list[bytes], sizes: list[int]) -> None:
    """A message stuffed onto the wire, read back through the reader in arbitrary chunks and
    un-stuffed (whole, and streaming), is the message again; the answer after it is intact."""
    from popproxy.pop3.wire import stuff_body, unstuff_body
    from popproxy.protocol.meter import StreamingUnstuffer

    message = b"".join(line + b"\r\n" for line in lines)
    stream = b"+OK\r\n" + stuff_body(message) + b"+OK next\r\n"
    recorder = Recorder([True, False])
    reader = ResponseReader(recorder)
    streaming = StreamingUnstuffer()
    unstuffed = b""
    offset, i = 0, 0
    while offset < len(stream):
        size = sizes[i % len(sizes)]
        reader.feed(stream[offset : offset + size])
        offset += size
        i += 1
    body = b"".join(data for kind, data in recorder.events if kind == "body")
    for start in range(0, len(body), 7):
        unstuffed += streaming.feed(body[start : start + 7])
    unstuffed += streaming.finish()
    assert unstuff_body(body) == message
    assert unstuffed == message
    assert recorder.events[-1] == ("status", b"+OK next\r\n")


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
       st.lists(st.booleans(), max_size=50))
@settings(max_examples=300)
def test_reader_survives_any_bytes(data: bytes, sizes: list[int], bodies: list[bool]) -> None:
    """Whatever an upstream sends, the reader never raises; it delivers or breaks the stream."""
    recorder = Recorder(bodies + [False] * 5000)
    reader = ResponseReader(recorder, max_line_length=512, max_body_line=256)
    offset, i = 0, 0
    while offset < len(data):
        reader.feed(data[offset : offset + sizes[i % len(sizes)]])
        offset += sizes[i % len(sizes)]
        i += 1
    assert all(kind in ("status", "body", "end", "too long") for kind, _ in recorder.events)


def test_reader_queues_chunks_without_copying_what_is_buffered() -> None:
    """Linear framing: 16 MiB fed in 64 KiB chunks to a paused reader (a hook at work) is kept as it
    came. A reader that joins its whole buffer on every chunk (quadratic time) makes a second copy
    of everything queued each time: its allocation peak is twice what it holds."""
    import tracemalloc

    class Counter:
        octets = 0

        def status_received(self, line: bytes) -> bool:
            return True

        def body_received(self, data: bytes) -> None:
            self.octets += len(data)

        def body_ended(self) -> None:
            pass

        def line_too_long(self) -> None:
            raise AssertionError("limits")

    counter = Counter()
    reader = ResponseReader(counter)
    reader.feed(b"+OK\r\n")
    reader.pause()
    chunk = (b"z" * 1022 + b"\r\n") * 64
    tracemalloc.start()
    try:
        for _ in range(256):
            reader.feed(bytes(chunk))  # a fresh object each time, as from a socket
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.pending == 256 * len(chunk)
    assert peak < 1.25 * reader.pending, (peak, reader.pending)
    reader.feed(b".\r\n")
    reader.resume()
    assert counter.octets == 256 * len(chunk) + 3 and reader.pending == 0
