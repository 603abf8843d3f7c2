"""The PROXY protocol header (popproxy.proxyheader) and its listener glue (popproxy.listeners), in memory:
every split point, every invalid case, builders cross-checked against Twisted's own parsers, and the
wrapper with a ``StringTransport``: LOCAL health checks are told apart from relayed clients."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from popproxy.listeners import ProxyHeaderFactory, ProxyHeaderProtocol
from popproxy.proxyheader import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    HealthCheckAddress,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyHeaderReader,
    build_v1,
    build_v2,
    build_v2_local,
)

V1_TCP4 = b"PROXY TCP4 192.0.2.10 198.51.100.1 50123 110\r\n"
V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 10, 198, 51, 100, 1]) + struct.pack("!HH", 50123, 110)
AFTER = b"USER dave\r\nPASS x\r\n"


def read_in(chunks: list[bytes]) -> ProxyHeader:
    """Feed ``chunks`` in order; the header must be complete exactly at the last one."""
    reader = ProxyHeaderReader()
    for chunk in chunks[:-1]:
        assert reader.feed(chunk) is None
    header = reader.feed(chunks[-1])
    assert header is not None
    return header


def rejects(data: bytes, match: str) -> None:
    """``data`` is refused, whole and fed one byte at a time (as soon as the bad byte arrives)."""
    with pytest.raises(InvalidProxyHeader, match=match):
        ProxyHeaderReader().feed(data)
    reader = ProxyHeaderReader()
    with pytest.raises(InvalidProxyHeader, match=match):  # which byte raises is the point
        for index in range(len(data)):
            assert reader.feed(data[index : index + 1]) is None
    assert index == len(data) - 1, f"refused at octet {index} of {len(data)}, before the bad one"


def tcp4(host: str, port: int) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def tcp6(host: str, port: int) -> IPv6Address:
    return IPv6Address("TCP", host, port)


# -- reading version 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", range(1, len(V1_TCP4 + AFTER)))
def test_v1_every_split_point(split: int) -> None:
    data = V1_TCP4 + AFTER
    if split < len(V1_TCP4):
        header = read_in([data[:split], data[split:]])
        assert header.rest == AFTER
    else:  # the header completes in the first chunk; the second one is not the reader's business
        header = read_in([data[:split]])
        assert header.rest == AFTER[: split - len(V1_TCP4)]
    assert header == ProxyHeader(1, "PROXY", tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110), header.rest)


def test_v1_one_byte_at_a_time() -> None:
    header = read_in([V1_TCP4[i : i + 1] for i in range(len(V1_TCP4))])
    assert (header.source, header.destination, header.rest) == (tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110), b"")
    assert not header.is_health_check


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 0 65535\r\n", tcp6("2001:db8::1", 0), tcp6("2001:db8::2", 65535)),
        (b"PROXY TCP6 :: ::1 1 2\r\n", tcp6("::", 1), tcp6("::1", 2)),
        # The dotted tail of an IPv4-mapped address, as inet_ntop writes it (HAProxy on a dual-stack bind).
        (b"PROXY TCP6 ::ffff:192.0.2.1 ::FFFF:C633:6401 3 4\r\n", tcp6("::ffff:192.0.2.1", 3), tcp6("::ffff:198.51.100.1", 4)),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n", tcp4("0.0.0.0", 0), tcp4("255.255.255.255", 0)),
    ],
)
def test_v1_addresses(line: bytes, source: IAddress, destination: IAddress) -> None:
    header = read_in([line])
    assert (header.version, header.command, header.source, header.destination) == (1, "PROXY", source, destination)


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f::f ffff::f 65535 65535\r\n", b"PROXY UNKNOWN anything at all\r\n"],
)
def test_v1_unknown_names_no_client(line: bytes) -> None:
    header = read_in([line + b"CAPA\r\n"])
    assert (header.command, header.source, header.destination, header.rest) == ("PROXY", None, None, b"CAPA\r\n")
    assert header.is_health_check


def test_v1_longest_line_is_accepted_and_one_more_octet_is_not() -> None:
    longest = b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert read_in([longest]).source is None
    reader = ProxyHeaderReader()
    assert reader.feed(longest[:-1]) is None  # 106 octets, the CR last: still waiting for its LF
    assert reader.buffered == V1_MAX_LENGTH - 1
    rejects(b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 15) + b"\r", "no CRLF within 107 octets")  # 107 octets
    rejects((b"PROXY TCP4 " + b"1" * 200)[:V1_MAX_LENGTH], "no CRLF within 107 octets")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"G", "not a PROXY header"),  # GET ..., USER ..., proxy ...: refused at the first octet
        (b"U", "not a PROXY header"),
        (b"p", "not a PROXY header"),
        (b"\x16", "not a PROXY header"),  # a TLS ClientHello without the header
        (b"PROXZ", "does not start with"),
        (b"PROXY\r", "does not start with"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "does not end with CRLF"),
        (b"PROXY TCP4 1.2.3.4\r5", "CR not followed by LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r", "CR not followed by LF"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 110\r\n", "port 99999 is out of range"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 110\r\n", "port 65536 is out of range"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 110 0110\r\n", "malformed"),  # leading zero
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 110 -1\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 110 123456\r\n", "malformed"),
        (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 192.0.2.1 2001:db8::2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "not an IPv4 address"),  # leading zero (octal?)
        (b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 2001:db8::1::2 ::1 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),  # no scopes in a header
        (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", "malformed"),
        (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "malformed"),
        (b"PROXY \r\n", "malformed"),
        (b"PROXY UNKNOWNX\r\n", "malformed"),
        (b"PROXY UNKNOWN \x00\r\n", "malformed"),
        (b"PROXY TCP4 \xc0.0.2.1 192.0.2.2 1 2\r\n", "malformed"),
    ],
)
def test_v1_invalid(data: bytes, match: str) -> None:
    rejects(data, match)


# -- reading version 2 ---------------------------------------------------------------------------------


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block) if length is None else length) + block


IPV6_BLOCK = bytes(range(16)) + bytes(15) + b"\x01" + struct.pack("!HH", 40000, 995)
UNIX_BLOCK = b"/run/lb.sock".ljust(108, b"\0") + b"/run/popproxy.sock".ljust(108, b"\0")
TLVS = b"\x04\x00\x03abc" + b"\x05\x00\x00"  # a NOOP and an empty UNIQUE_ID (spec 2.2.4, 2.2.5)


@pytest.mark.parametrize(
    ("data", "source", "destination"),
    [
        (V2_TCP4, tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110)),
        (v2(0x21, 0x11, V2_TCP4[16:] + TLVS), tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110)),
        (v2(0x21, 0x21, IPV6_BLOCK), tcp6("1:203:405:607:809:a0b:c0d:e0f", 40000), tcp6("::1", 995)),
        (v2(0x21, 0x21, IPV6_BLOCK + TLVS), tcp6("1:203:405:607:809:a0b:c0d:e0f", 40000), tcp6("::1", 995)),
        (v2(0x21, 0x31, UNIX_BLOCK), UNIXAddress(b"/run/lb.sock"), UNIXAddress(b"/run/popproxy.sock")),
        # Valid combinations popproxy does not use fall back to UNSPEC (spec 2.2): no addresses.
        (v2(0x21, 0x00, b""), None, None),
        (v2(0x21, 0x00, V2_TCP4[16:]), None, None),
        (v2(0x21, 0x12, V2_TCP4[16:]), None, None),  # UDP over IPv4
        (v2(0x21, 0x22, IPV6_BLOCK), None, None),
        (v2(0x21, 0x10, V2_TCP4[16:]), None, None),  # INET, protocol UNSPEC
    ],
)
def test_v2_proxy(data: bytes, source: IAddress | None, destination: IAddress | None) -> None:
    whole = read_in([data + AFTER])
    one_by_one = read_in([data[i : i + 1] for i in range(len(data))])
    for header, rest in ((whole, AFTER), (one_by_one, b"")):
        assert (header.version, header.command, header.source, header.destination) == (2, "PROXY", source, destination)
        assert header.rest == rest
        assert header.is_health_check is (source is None)


@pytest.mark.parametrize("split", range(1, len(V2_TCP4) + len(TLVS) + len(AFTER)))
def test_v2_every_split_point(split: int) -> None:
    header_bytes = v2(0x21, 0x11, V2_TCP4[16:] + TLVS)
    data = header_bytes + AFTER
    reader = ProxyHeaderReader()
    first = reader.feed(data[:split])
    if split < len(header_bytes):
        assert first is None
        header = reader.feed(data[split:])
        assert header is not None and header.rest == AFTER
    else:
        assert first is not None and first.rest == AFTER[: split - len(header_bytes)]
        header = first
    assert (header.source, header.destination) == (tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110))


@pytest.mark.parametrize(
    "data",
    [
        build_v2_local(),
        v2(0x20, 0x11, V2_TCP4[16:]),  # "must not assume zero is presented for LOCAL" (spec 2.2)
        v2(0x20, 0xFF, b"ignored"),  # LOCAL: the family "is ignored"
        v2(0x20, 0x00, TLVS),
    ],
)
def test_v2_local_is_a_health_check(data: bytes) -> None:
    header = read_in([data + AFTER])
    assert (header.version, header.command, header.source, header.destination, header.rest) == (2, "LOCAL", None, None, AFTER)
    assert header.is_health_check
    one_by_one = read_in([data[i : i + 1] for i in range(len(data))])
    assert (one_by_one.command, one_by_one.rest) == ("LOCAL", b"")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\r\n\r\n\x00\r\nQUIX", "bad signature"),
        (b"\r\r", "bad signature"),
        (b"\r\n\r\n\x01", "bad signature"),
        (V2_SIGNATURE + b"\x11", "version 1, not 2"),
        (V2_SIGNATURE + b"\x31", "version 3, not 2"),
        (V2_SIGNATURE + b"\x01", "version 0, not 2"),
        (V2_SIGNATURE + b"\x22", "unassigned command 0x2"),
        (V2_SIGNATURE + b"\x2f", "unassigned command 0xf"),
        (V2_SIGNATURE + b"\x21\x41", "unspecified address family 0x4"),
        (V2_SIGNATURE + b"\x21\xf1", "unspecified address family 0xf"),
        (V2_SIGNATURE + b"\x21\x13", "unspecified transport protocol 0x3"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b", "length 11 is shorter than its 12-octet address block"),
        (V2_SIGNATURE + b"\x21\x11\x00\x00", "length 0 is shorter than its 12-octet address block"),
        (V2_SIGNATURE + b"\x21\x21\x00\x23", "length 35 is shorter than its 36-octet address block"),
        (V2_SIGNATURE + b"\x21\x31\x00\xd7", "length 215 is shorter than its 216-octet address block"),
    ],
)
def test_v2_invalid(data: bytes, match: str) -> None:
    rejects(data, match)


def test_v2_longest_header_holds_at_most_the_address_block() -> None:
    """16 + 65535 octets, fed one at a time: only 16 + 12 are ever held, the TLVs are counted off."""
    tlv = b"\x04\xff\xf0" + b"n" * (0xFFFF - 12 - 3)
    data = v2(0x21, 0x11, V2_TCP4[16:] + tlv)
    assert len(data) == 16 + 0xFFFF
    reader = ProxyHeaderReader()
    most = 0
    for index in range(len(data) - 1):
        assert reader.feed(data[index : index + 1]) is None
        most = max(most, reader.buffered)
    header = reader.feed(data[-1:] + AFTER)
    assert header is not None and header.source == tcp4("192.0.2.10", 50123) and header.rest == AFTER
    assert most == 16 + 12


def test_reader_is_used_once() -> None:
    reader = ProxyHeaderReader()
    assert reader.feed(b"") is None
    assert reader.feed(V1_TCP4) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"more")
    refused = ProxyHeaderReader()
    with pytest.raises(InvalidProxyHeader):
        refused.feed(b"X")
    with pytest.raises(RuntimeError):
        refused.feed(b"PROXY UNKNOWN\r\n")


# -- building ------------------------------------------------------------------------------------------


def test_build_exact_bytes() -> None:
    assert build_v1(("192.0.2.10", 50123), ("198.51.100.1", 110)) == V1_TCP4
    assert build_v1(("2001:DB8:0:0:0:0:0:1", 1), ("::", 2)) == b"PROXY TCP6 2001:db8::1 :: 1 2\r\n"
    assert build_v1(("1:0:0:2:0:0:0:3", 1), ("1:0:0:2:3:0:0:4", 2)) == b"PROXY TCP6 1:0:0:2::3 1::2:3:0:0:4 1 2\r\n"
    # Mixed families: the IPv4 one IPv4-mapped, in hexadecimal groups only (spec 2.1's IPv6 format).
    assert build_v1(("192.0.2.1", 5), ("2001:db8::2", 6)) == b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 5 6\r\n"
    assert build_v2(("192.0.2.10", 50123), ("198.51.100.1", 110)) == V2_TCP4
    assert build_v2(("192.0.2.10", 50123), ("198.51.100.1", 110), [(4, b"abc"), (5, b"")]) == v2(0x21, 0x11, V2_TCP4[16:] + TLVS)
    assert build_v2(("1:203:405:607:809:a0b:c0d:e0f", 40000), ("::1", 995)) == v2(0x21, 0x21, IPV6_BLOCK)
    mixed = build_v2(("::1", 7), ("192.0.2.1", 8))
    assert mixed == v2(0x21, 0x21, bytes(15) + b"\x01" + bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]) + struct.pack("!HH", 7, 8))
    assert build_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_build_longest_v1_line_fits() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = build_v1((full, 65535), (full, 65535))
    assert len(line) == 104 <= V1_MAX_LENGTH


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_v1(("192.0.2.300", 1), ("192.0.2.1", 2)), "does not appear to be an IPv4 or IPv6 address"),
        (lambda: build_v1(("example.org", 1), ("192.0.2.1", 2)), "does not appear"),
        (lambda: build_v1(("192.0.2.1", 65536), ("192.0.2.1", 2)), "source port 65536"),
        (lambda: build_v2(("192.0.2.1", 1), ("192.0.2.1", -1)), "destination port -1"),
        (lambda: build_v2(("fe80::1%eth0", 1), ("::1", 2)), "scope"),
        (lambda: build_v2(("::1", 1), ("::1", 2), [(256, b"")]), "TLV type 256"),
        (lambda: build_v2(("::1", 1), ("::1", 2), [(1, b"x" * 65536)]), "exceeds 65535"),
        (lambda: build_v2(("::1", 1), ("::1", 2), [(1, b"x" * 65000), (2, b"y" * 600)]), "exceed 65535"),
    ],
)
def test_build_refuses(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


ADDRESS_PAIRS = [
    (("192.0.2.10", 50123), ("198.51.100.1", 110), tcp4("192.0.2.10", 50123), tcp4("198.51.100.1", 110)),
    (("2001:db8::10", 0), ("2001:db8::1", 65535), tcp6("2001:db8::10", 0), tcp6("2001:db8::1", 65535)),
    (("192.0.2.10", 1), ("2001:db8::1", 2), tcp6("::ffff:192.0.2.10", 1), tcp6("2001:db8::1", 2)),
    (("::", 3), ("0.0.0.0", 4), tcp6("::", 3), tcp6("::ffff:0.0.0.0", 4)),
]


@pytest.mark.parametrize(("source", "destination", "read_source", "read_destination"), ADDRESS_PAIRS)
def test_round_trip(source: tuple[str, int], destination: tuple[str, int], read_source: IAddress, read_destination: IAddress) -> None:
    for built, version in ((build_v1(source, destination), 1), (build_v2(source, destination, [(0xE0, b"popproxy")]), 2)):
        header = read_in([built + AFTER])
        assert (header.version, header.command, header.source, header.destination, header.rest) == (
            version, "PROXY", read_source, read_destination, AFTER)
    local = read_in([build_v2_local()])
    assert (local.command, local.source, local.destination) == ("LOCAL", None, None)


@given(
    st.ip_addresses(), st.integers(0, 65535), st.ip_addresses(), st.integers(0, 65535),
    st.lists(st.integers(1, 40), max_size=4), st.booleans(),
)
def test_round_trip_any_address_any_split(source, source_port, destination, destination_port, cuts, v1) -> None:  # type: ignore[no-untyped-def]
    pair = ((str(source), source_port), (str(destination), destination_port))
    built = (build_v1 if v1 else build_v2)(*pair) + AFTER
    chunks, start = [], 0
    for cut in cuts:
        chunks.append(built[start : start + cut])
        start += cut
    chunks.append(built[start:])
    reader, header = ProxyHeaderReader(), None
    for chunk in chunks:
        if header is None:
            header = reader.feed(chunk)
            rest = header.rest if header is not None else b""
        else:
            rest += chunk
    assert header is not None and rest == AFTER
    assert isinstance(header.source, (IPv4Address, IPv6Address)) and isinstance(header.destination, (IPv4Address, IPv6Address))
    assert (header.source.port, header.destination.port) == (source_port, destination_port)
    if source.version == destination.version:
        expected = (source, destination)
    else:  # the IPv4 one is sent IPv4-mapped
        expected = tuple(address if address.version == 6 else ipaddress.IPv6Address(f"::ffff:{address}")
                         for address in (source, destination))
    assert (ipaddress.ip_address(header.source.host), ipaddress.ip_address(header.destination.host)) == expected
    assert {type(header.source), type(header.destination)} == {IPv4Address if expected[0].version == 4 else IPv6Address}


@pytest.mark.parametrize(("source", "destination", "read_source", "read_destination"), ADDRESS_PAIRS)
def test_twisted_parsers_accept_what_we_build(
    source: tuple[str, int], destination: tuple[str, int], read_source: IPv4Address | IPv6Address,
    read_destination: IPv4Address | IPv6Address,
) -> None:
    """Twisted's own parsers (twisted.protocols.haproxy) read our headers to the same ports, and to
    the same addresses (Twisted keeps v1's text, and writes v2's IPv6 uncompressed)."""
    for parser, built in ((V1Parser(), build_v1(source, destination)), (V2Parser(), build_v2(source, destination, [(4, b"x")]))):
        info, rest = parser.feed(built + AFTER)
        assert info is not None and rest == AFTER
        assert isinstance(info.source, (IPv4Address, IPv6Address)) and isinstance(info.destination, (IPv4Address, IPv6Address))
        assert type(info.source) is type(read_source) and type(info.destination) is type(read_destination)
        assert ipaddress.ip_address(info.source.host) == ipaddress.ip_address(read_source.host)
        assert ipaddress.ip_address(info.destination.host) == ipaddress.ip_address(read_destination.host)
        assert (info.source.port, info.destination.port) == (read_source.port, read_destination.port)
    info, rest = V2Parser().feed(build_v2_local() + AFTER)
    assert info is not None and (info.source, info.destination, rest) == (None, None, AFTER)


# -- the listener glue ---------------------------------------------------------------------------------

LB = IPv4Address("TCP", "127.0.0.1", 40000)
LOCAL_ADDRESS = IPv4Address("TCP", "127.0.0.1", 110)


class Greeter(Protocol):
    """Greets at once, like popproxy, and records what it receives and who it thinks the peer is."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.peers: list[IAddress] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peers.append(self.transport.getPeer())
        self.transport.write(b"+OK hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.received.append(data)
        self.peers.append(self.transport.getPeer())


def connect(factory: Factory | None = None) -> tuple[ProxyHeaderProtocol, Greeter, StringTransport]:
    wrapped = Greeter()
    outer = ProxyHeaderFactory(factory or Factory.forProtocol(lambda: wrapped), "test")
    protocol = outer.buildProtocol(LB)
    assert protocol is not None
    transport = StringTransport(hostAddress=LOCAL_ADDRESS, peerAddress=LB)
    protocol.makeConnection(transport)
    return protocol, wrapped, transport


def test_wrapper_greets_at_once_and_holds_bytes_until_the_header_is_complete() -> None:
    protocol, greeter, transport = connect()
    assert transport.value() == b"+OK hello\r\n"  # before any byte of the header
    assert greeter.peers == [LB]
    for index in range(len(V1_TCP4) - 1):
        protocol.dataReceived(V1_TCP4[index : index + 1])
        assert protocol.getPeer() == LB and protocol.getHost() == LOCAL_ADDRESS  # the real ones, until complete
    assert greeter.received == [] and protocol.proxy_header is None
    protocol.dataReceived(V1_TCP4[-1:] + AFTER)  # the header's last octet and the client's first bytes
    assert greeter.received == [AFTER]  # passed through in the same call
    assert protocol.proxy_header is not None and protocol.proxy_header.rest == b""  # and not kept
    assert greeter.peers[-1] == tcp4("192.0.2.10", 50123)
    assert protocol.getHost() == tcp4("198.51.100.1", 110)
    protocol.dataReceived(b"QUIT\r\n")
    assert greeter.received == [AFTER, b"QUIT\r\n"]
    assert not transport.disconnecting


def test_wrapper_header_alone_then_data() -> None:
    protocol, greeter, _ = connect()
    protocol.dataReceived(V2_TCP4)
    assert greeter.received == [] and protocol.getPeer() == tcp4("192.0.2.10", 50123)
    protocol.dataReceived(AFTER)
    assert greeter.received == [AFTER]


@pytest.mark.parametrize("header", [build_v2_local(), b"PROXY UNKNOWN\r\n", v2(0x21, 0x00, b"")])
def test_wrapper_health_check_is_recognisable(header: bytes) -> None:
    protocol, greeter, transport = connect()
    protocol.dataReceived(header + b"QUIT\r\n")
    peer = protocol.getPeer()
    assert isinstance(peer, HealthCheckAddress) and IAddress.providedBy(peer)
    assert peer == HealthCheckAddress("127.0.0.1", 40000)
    assert greeter.peers[-1] == peer and greeter.received == [b"QUIT\r\n"]
    assert protocol.getHost() == LOCAL_ADDRESS
    with pytest.raises(dataclasses.FrozenInstanceError):
        peer.host = "192.0.2.1"  # type: ignore[misc]
    assert not transport.disconnecting


def test_twisted_wrapper_could_not_tell_a_health_check() -> None:
    """Why popproxy reads the header itself: behind twisted.protocols.haproxy, a LOCAL header leaves
    getPeer() at the load balancer's address, the same as before any header."""
    greeter = Greeter()
    listened: list[IProtocolFactory] = []

    class Capture:  # an IStreamServerEndpoint that keeps the factory proxyEndpoint gives it
        def listen(self, factory: IProtocolFactory) -> None:
            listened.append(factory)

    proxyEndpoint(Capture()).listen(Factory.forProtocol(lambda: greeter))  # type: ignore[arg-type]
    protocol = listened[0].buildProtocol(LB)
    assert protocol is not None
    protocol.makeConnection(StringTransport(hostAddress=LOCAL_ADDRESS, peerAddress=LB))
    before = protocol.getPeer()
    protocol.dataReceived(build_v2_local() + b"QUIT\r\n")
    assert greeter.received == [b"QUIT\r\n"]
    assert protocol.getPeer() == before == LB


@pytest.mark.parametrize(
    "data",
    [b"USER dave\r\n", b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 110\r\nUSER dave\r\n",
     V2_SIGNATURE + b"\x11\x11\x00\x0c" + V2_TCP4[16:] + b"USER dave\r\n"],
)
def test_wrapper_invalid_header_closes_and_nothing_reaches_the_protocol(data: bytes) -> None:
    protocol, greeter, transport = connect()
    for index in range(len(data)):
        protocol.dataReceived(data[index : index + 1])
    protocol.dataReceived(V1_TCP4 + b"CAPA\r\n")  # whatever comes next is dropped too
    assert transport.disconnecting
    assert greeter.received == [] and protocol.proxy_header is None
    assert protocol.getPeer() == LB


def test_wrapper_factory_passes_on_a_refusal() -> None:
    class Refusing(Factory):
        def buildProtocol(self, addr: IAddress) -> None:  # type: ignore[override]
            return None

    assert ProxyHeaderFactory(Refusing()).buildProtocol(LB) is None
    assert ProxyHeaderFactory(Factory.forProtocol(Protocol)).logPrefix() == "Factory (PROXY)"
