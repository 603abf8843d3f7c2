"""The PROXY protocol header, versions 1 and 2: reading it (sans I/O) and building it.

A load balancer in front of a ``haproxy:`` listener starts each connection with a header naming the
client it relays for (HAProxy's "The PROXY protocol", versions 1 and 2,
https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt, cited below as "spec"). Its own health
checks (HAProxy's ``check-send-proxy``) send the v2 ``LOCAL`` command instead, or v1 ``UNKNOWN``: the
connection is the load balancer's own, and ``HealthCheckAddress`` is how the glue in
``popproxy.listeners`` says so to the session.

- ``ProxyHeaderReader`` is fed the connection's first bytes, split anywhere, and returns a
  ``ProxyHeader`` once the header is complete, or raises ``InvalidProxyHeader``.
- ``build_v1``, ``build_v2`` and ``build_v2_local`` make the headers popproxy sends to upstream servers.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from zope.interface import implementer

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "HealthCheckAddress",
    "InvalidProxyHeader",
    "ProxyHeader",
    "ProxyHeaderReader",
    "build_v1",
    "build_v2",
    "build_v2_local",
    "host_port",
]

#: spec §2.2: the 12 octets every v2 header starts with. Its first octet is CR, which no v1 header
#: (starting "PROXY") can start with, so the first octet received decides the version.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: spec §2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
V1_MAX_LENGTH = 107

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16  # signature, version/command, family/protocol, 16-bit length (spec §2.2)
_V2_VERSION = 0x2
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
#: spec §2.2: the address block of each family with the STREAM protocol: two addresses, then (for
#: INET/INET6) two 16-bit ports; UNIX has two 108-octet paths and no ports.
_V2_ADDRESS_BLOCK = {_AF_INET: 4 + 4 + 2 + 2, _AF_INET6: 16 + 16 + 2 + 2, _AF_UNIX: 108 + 108}
_UNIX_PATH = 108

# spec §2.1: "PROXY", the protocol, two addresses and two ports, each after exactly one space. Ports
# are decimal without leading zeros; the address texts are checked by ``_v1_address``.
_V1_LINE = re.compile(
    rb"PROXY (TCP4|TCP6) ([0-9A-Fa-f:.]{1,45}) ([0-9A-Fa-f:.]{1,45}) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})"
)
_V1_UNKNOWN = re.compile(rb"PROXY UNKNOWN(?: [\x21-\x7e ]*)?")

Address = IPv4Address | IPv6Address | UNIXAddress


class InvalidProxyHeader(ValueError):
    """The connection did not start with a valid PROXY header; the message says what was wrong.

    The spec (§2.1) requires the receiver to abort such a connection, never to guess.
    """


@implementer(IAddress)
@dataclass(frozen=True, slots=True)
class HealthCheckAddress:
    """The peer of a connection whose PROXY header says it is the load balancer's own (v2 ``LOCAL``,
    a v2 ``UNSPEC`` address family, or v1 ``UNKNOWN``): a health check, not a relayed client.

    ``host`` and ``port`` are the load balancer's real address (for a UNIX socket, its path and 0).
    """

    host: str
    port: int

    @classmethod
    def of(cls, peer: IAddress) -> HealthCheckAddress:
        """The health-check address for a connection whose real peer is ``peer``."""
        return cls(*host_port(peer))


def host_port(address: IAddress) -> tuple[str, int]:
    """``(host, port)`` of an address, for logs: a UNIX socket gives its path and 0."""
    if isinstance(address, (IPv4Address, IPv6Address, HealthCheckAddress)):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        name = address.name or b""
        return (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)), 0
    return str(address), 0


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    ``command`` is "PROXY" (relayed for ``source``) or "LOCAL" (the load balancer's own connection).
    ``source`` and ``destination`` are None when the header gives no usable address: LOCAL, a v2
    UNSPEC family or protocol (and DGRAM, which spec §2.2 lets a receiver treat as UNSPEC), v1
    UNKNOWN. ``rest`` holds the bytes fed after the header, which belong to the relayed protocol.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: Address | None
    destination: Address | None
    rest: bytes = b""

    @property
    def is_health_check(self) -> bool:
        """True when the header names no client: the connection is the load balancer's own."""
        return self.source is None


class ProxyHeaderReader:
    """Reads the PROXY header at the start of a connection; ``feed`` it bytes as they arrive.

    Memory is bounded, and work per ``feed`` is proportional to the bytes fed, never to the bytes
    buffered before:

    - v1: at most ``V1_MAX_LENGTH`` (107) octets are held (spec §2.1); the line is re-scanned only
      within that bound.
    - v2: the header is 16 + ``length`` octets, ``length`` a 16-bit field, so at most 16 + 65535.
      Only the first 16 + 216 are held (216, the UNIX address block, is the largest); the rest
      (TLVs, which popproxy does not use; spec §2.2.x lets a receiver skip them) is counted off
      without being stored.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._version: Literal[1, 2] | None = None
        self._keep = 0  # v2: octets of the address block still to store
        self._skip = 0  # v2: octets after the address block (TLVs) still to discard
        self._finished = False

    @property
    def buffered(self) -> int:
        """Octets of the header held so far (at most 107 for v1, 16 + 216 for v2)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """The header once ``data`` completes it (with what followed in ``rest``), else None.

        Raises ``InvalidProxyHeader`` as soon as the bytes so far cannot begin a valid header.
        Feeding after the header was returned or rejected is a programming error (``RuntimeError``).
        """
        if self._finished:
            raise RuntimeError("the PROXY header has already been read or rejected")
        try:
            return self._feed(data)
        except InvalidProxyHeader:
            self._finished = True
            raise

    def _feed(self, data: bytes) -> ProxyHeader | None:
        if not data:
            return None
        if self._version is None:
            if data[:1] == _V1_PREFIX[:1]:
                self._version = 1
            elif data[:1] == V2_SIGNATURE[:1]:
                self._version = 2
            else:
                raise InvalidProxyHeader(f"not a PROXY header: starts with {bytes(data[:1])!r}")
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    # -- version 1 -----------------------------------------------------------------------------------

    def _feed_v1(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        start = len(buffer)
        piece = data[: V1_MAX_LENGTH - start]
        line_feed = piece.find(b"\n")
        buffer += piece if line_feed < 0 else piece[: line_feed + 1]
        # "PROXY " is checked as it arrives, so that other protocols are refused at once.
        seen = min(len(buffer), len(_V1_PREFIX))
        if buffer[:seen] != _V1_PREFIX[:seen]:
            raise InvalidProxyHeader(f"v1 header does not start with {_V1_PREFIX!r}: {bytes(buffer[:seen])!r}")
        # spec §2.1: the line ends with CRLF, never a lone CR or LF. A CR may only be the last octet
        # held (its LF still to come) or the one before the LF.
        cr = buffer.find(b"\r", max(start - 1, 0))
        if line_feed < 0:
            if 0 <= cr < len(buffer) - 1:
                raise InvalidProxyHeader("v1 header has a CR not followed by LF")
            if len(buffer) >= V1_MAX_LENGTH:
                raise InvalidProxyHeader(f"v1 header has no CRLF within {V1_MAX_LENGTH} octets")
            return None
        if cr != len(buffer) - 2:
            raise InvalidProxyHeader("v1 header line does not end with CRLF")
        self._finished = True
        header = _parse_v1(bytes(buffer[:-2]))
        self._buffer = bytearray()
        return ProxyHeader(1, "PROXY", header[0], header[1], data[line_feed + 1 :])

    # -- version 2 -----------------------------------------------------------------------------------

    def _feed_v2(self, data: bytes) -> ProxyHeader | None:
        buffer = self._buffer
        offset = 0  # octets of ``data`` used so far
        if len(buffer) < _V2_FIXED:
            start = len(buffer)
            offset = _V2_FIXED - start
            buffer += data[:offset]
            self._check_v2_fixed(start)
            if len(buffer) < _V2_FIXED:
                return None
        if self._keep:
            piece = data[offset : offset + self._keep]
            buffer += piece
            offset += len(piece)
            self._keep -= len(piece)
            if self._keep:
                return None
        if self._skip:
            skipped = min(self._skip, len(data) - offset)
            offset += skipped
            self._skip -= skipped
            if self._skip:
                return None
        self._finished = True
        source, destination = self._v2_addresses()
        command: Literal["PROXY", "LOCAL"] = "PROXY" if buffer[12] & 0x0F == _V2_PROXY else "LOCAL"
        self._buffer = bytearray()
        return ProxyHeader(2, command, source, destination, data[offset:])

    def _check_v2_fixed(self, start: int) -> None:
        """Check the octets of the fixed part that arrived since ``start``; once all 16 are here,
        work out how many octets of the rest to store and how many to skip."""
        buffer = self._buffer
        seen = min(len(buffer), len(V2_SIGNATURE))
        if start < seen and buffer[start:seen] != V2_SIGNATURE[start:seen]:
            raise InvalidProxyHeader("v2 header has a bad signature")
        if start <= 12 < len(buffer):
            version, command = buffer[12] >> 4, buffer[12] & 0x0F
            if version != _V2_VERSION:
                raise InvalidProxyHeader(f"v2 header has version {version}, not 2")
            if command not in (_V2_LOCAL, _V2_PROXY):
                raise InvalidProxyHeader(f"v2 header has an unassigned command {command:#x}")
        if start <= 13 < len(buffer) and buffer[12] & 0x0F == _V2_PROXY:
            # For LOCAL the family "is ignored" (spec §2.2); for PROXY, unspecified values "must be
            # rejected as invalid by receivers".
            family, protocol = buffer[13] >> 4, buffer[13] & 0x0F
            if family > _AF_UNIX:
                raise InvalidProxyHeader(f"v2 header has an unspecified address family {family:#x}")
            if protocol > _DGRAM:
                raise InvalidProxyHeader(f"v2 header has an unspecified transport protocol {protocol:#x}")
        if len(buffer) == _V2_FIXED:
            (length,) = struct.unpack_from("!H", buffer, 14)
            block = self._v2_block()
            if length < block:
                raise InvalidProxyHeader(f"v2 header length {length} is shorter than its {block}-octet address block")
            self._keep, self._skip = block, length - block

    def _v2_block(self) -> int:
        """The octets of address block to store: 0 unless the command is PROXY over a STREAM of a
        known family (the other valid combinations fall back to UNSPEC, spec §2.2)."""
        buffer = self._buffer
        if buffer[12] & 0x0F != _V2_PROXY or buffer[13] & 0x0F != _STREAM:
            return 0
        return _V2_ADDRESS_BLOCK.get(buffer[13] >> 4, 0)

    def _v2_addresses(self) -> tuple[Address | None, Address | None]:
        block = bytes(self._buffer[_V2_FIXED:])
        if not block:
            return None, None
        family = self._buffer[13] >> 4
        if family == _AF_INET:
            source, destination, source_port, destination_port = struct.unpack("!4s4sHH", block)
            return (
                IPv4Address("TCP", str(ipaddress.IPv4Address(source)), source_port),
                IPv4Address("TCP", str(ipaddress.IPv4Address(destination)), destination_port),
            )
        if family == _AF_INET6:
            source, destination, source_port, destination_port = struct.unpack("!16s16sHH", block)
            return (
                IPv6Address("TCP", _ipv6_text(ipaddress.IPv6Address(source)), source_port),
                IPv6Address("TCP", _ipv6_text(ipaddress.IPv6Address(destination)), destination_port),
            )
        return UNIXAddress(_unix_path(block[:_UNIX_PATH])), UNIXAddress(_unix_path(block[_UNIX_PATH:]))


def _parse_v1(line: bytes) -> tuple[Address | None, Address | None]:
    """Source and destination of a v1 line (CRLF removed); both None for UNKNOWN."""
    if _V1_UNKNOWN.fullmatch(line):
        # spec §2.1: for UNKNOWN "the receiver must ignore anything presented before the CRLF".
        return None, None
    match = _V1_LINE.fullmatch(line)
    if match is None:
        raise InvalidProxyHeader(f"malformed v1 header: {line!r}")
    protocol, source, destination, source_port, destination_port = match.groups()
    version = 4 if protocol == b"TCP4" else 6
    addresses: list[Address] = []
    for text, port_text in ((source, source_port), (destination, destination_port)):
        port = int(port_text)
        if port > 0xFFFF:
            raise InvalidProxyHeader(f"v1 header port {port} is out of range")
        addresses.append(_v1_address(version, text.decode("ascii"), port))
    return addresses[0], addresses[1]


def _v1_address(version: int, text: str, port: int) -> IPv4Address | IPv6Address:
    """A v1 address of the family its protocol names (spec §2.1: "the advertised protocol family
    dictates what format to use"). IPv4: four decimal numbers without leading zeros (Python's
    ``ipaddress`` refuses leading zeros). IPv6: hexadecimal groups; the trailing dotted-quad form of
    an IPv4-mapped address is accepted too, as senders that format with ``inet_ntop`` produce it."""
    try:
        if version == 4:
            return IPv4Address("TCP", str(ipaddress.IPv4Address(text)), port)
        return IPv6Address("TCP", _ipv6_text(ipaddress.IPv6Address(text)), port)
    except ValueError:
        raise InvalidProxyHeader(f"v1 header has {text!r}, not an IPv{version} address") from None


def _unix_path(field: bytes) -> bytes:
    """A 108-octet UNIX path field: the path up to its first NUL."""
    return field.split(b"\0", 1)[0]


def _ipv6_text(address: ipaddress.IPv6Address, mixed: bool = True) -> str:
    """RFC 5952 text of ``address``: lower case, no leading zeros, the longest run of two or more
    zero groups (the first, on a tie) as "::". IPv4-mapped addresses end in dotted-quad form
    (RFC 5952 §5) when ``mixed``; v1 headers need hexadecimal groups only (spec §2.1).

    Written out rather than ``str()``, whose IPv4-mapped form differs between Python versions.
    """
    ipv4 = address.ipv4_mapped
    if mixed and ipv4 is not None:
        return f"::ffff:{ipv4}"
    groups = [f"{group:x}" for group in struct.unpack("!8H", address.packed)]
    best_start, best_length, run_start = -1, 1, -1
    for index, group in enumerate([*groups, "end"]):
        if group == "0":
            if run_start < 0:
                run_start = index
        elif run_start >= 0:
            if index - run_start > best_length:
                best_start, best_length = run_start, index - run_start
            run_start = -1
    if best_start < 0:
        return ":".join(groups)
    return ":".join(groups[:best_start]) + "::" + ":".join(groups[best_start + best_length :])


# -- building headers (what popproxy sends upstream) -------------------------------------------------


def _endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Both addresses parsed and of one family: when they differ, the IPv4 one becomes IPv4-mapped
    IPv6 (RFC 4291 §2.5.5.2). Raises ``ValueError`` for anything that cannot be sent."""
    parsed = []
    for name, (host, port) in (("source", source), ("destination", destination)):
        if not isinstance(host, str):
            raise ValueError(f"{name} address {host!r} is not a string")
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise ValueError(f"{name} address {host!r} has a scope, which a PROXY header cannot carry")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} port {port!r} is not in 0..65535")
        parsed.append((address, port))
    (source_address, source_port), (destination_address, destination_port) = parsed
    if source_address.version != destination_address.version:
        source_address, destination_address = _as_ipv6(source_address), _as_ipv6(destination_address)
    return source_address, source_port, destination_address, destination_port


def _as_ipv6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (spec §2.1): ``PROXY TCP4 ...`` or, if either address is IPv6, ``PROXY TCP6 ...``
    (an IPv4 address then sent IPv4-mapped). ``ValueError`` if an address or port is invalid."""
    source_address, source_port, destination_address, destination_port = _endpoints(source, destination)
    if isinstance(source_address, ipaddress.IPv4Address):
        protocol, source_text, destination_text = "TCP4", str(source_address), str(destination_address)
    else:
        assert isinstance(destination_address, ipaddress.IPv6Address)
        protocol = "TCP6"
        source_text = _ipv6_text(source_address, mixed=False)
        destination_text = _ipv6_text(destination_address, mixed=False)
    return f"PROXY {protocol} {source_text} {destination_text} {source_port} {destination_port}\r\n".encode("ascii")


def build_v2(source: tuple[str, int], destination: tuple[str, int], tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """A v2 PROXY header (spec §2.2) for a TCP connection: family INET, or INET6 if either address is
    IPv6 (an IPv4 address then sent IPv4-mapped), followed by ``tlvs`` as (type, value) pairs
    (spec §2.2: one type octet, a 16-bit length, the value). ``ValueError`` if an address, port or
    TLV is invalid or the whole exceeds the 16-bit length field."""
    source_address, source_port, destination_address, destination_port = _endpoints(source, destination)
    family = _AF_INET if isinstance(source_address, ipaddress.IPv4Address) else _AF_INET6
    body = [source_address.packed, destination_address.packed, struct.pack("!HH", source_port, destination_port)]
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind!r} is not in 0..255")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV {kind:#x} value of {len(value)} octets exceeds 65535")
        body.append(struct.pack("!BH", kind, len(value)) + bytes(value))
    block = b"".join(body)
    if len(block) > 0xFFFF:
        raise ValueError(f"PROXY v2 address block and TLVs of {len(block)} octets exceed 65535")
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION << 4 | _V2_PROXY, family << 4 | _STREAM, len(block)) + block


def build_v2_local() -> bytes:
    """The v2 LOCAL header a health check sends (spec §2.2): family and protocol UNSPEC, length 0."""
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION << 4 | _V2_LOCAL, _AF_UNSPEC << 4 | _UNSPEC, 0)
