"""The floor: the smallest Twisted TLS->plain byte relay, with no POP3 in it.

Run by bench/relay.py with popproxy's own Python, so with the same Twisted, pyOpenSSL and reactor:
``python bench/floor.py LISTEN_PORT UPSTREAM_PORT PEM`` (PEM: private key and certificate chain in
one file, popproxy's format). It accepts implicit TLS on 127.0.0.1:LISTEN_PORT, connects to
127.0.0.1:UPSTREAM_PORT in plain TCP, and copies bytes both ways: no parsing, no buffering of its own
beyond what arrives before the upstream connection is up. Each transport is registered as the
other's streaming producer, so a full write buffer on one leg stops reading on the other
(back-pressure both ways), and TCP_NODELAY is set on both legs, as popproxy does.

Whatever popproxy spends above this, in the same run, is the cost of being POP3-aware; whatever this
spends above stunnel is the cost of the platform (Python and Twisted). SIGTERM stops it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.python.failure import Failure


class Upstream(Protocol):
    """The plain leg to the server: everything it receives goes to the client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.client.transport.loseConnection()


class Client(Protocol):
    """The TLS leg from the client: everything it receives goes upstream."""

    def __init__(self, upstream: TCP4ClientEndpoint) -> None:
        self.endpoint = upstream
        self.upstream: Upstream | None = None
        self.early: list[bytes] = []  # what arrives before the upstream connection is up
        self.gone = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # TLSMemoryBIOProtocol passes it to the TCP transport
        connectProtocol(self.endpoint, Upstream(self)).addErrback(lambda _: self.transport.loseConnection())

    def upstream_ready(self, upstream: Upstream) -> None:
        if self.gone:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)
        upstream.transport.writeSequence(self.early)
        self.early.clear()

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main() -> None:
    listen_port, upstream_port, pem = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]).read_bytes()
    chain = x509.load_pem_x509_certificates(pem)
    options = CertificateOptions(
        privateKey=load_pem_private_key(pem, password=None),  # type: ignore[arg-type]  # cryptography objects are accepted
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    upstream = TCP4ClientEndpoint(reactor, "127.0.0.1", upstream_port, timeout=5)
    listening = SSL4ServerEndpoint(reactor, listen_port, options, interface="127.0.0.1")
    listening.listen(Factory.forProtocol(lambda: Client(upstream)))
    reactor.run()


if __name__ == "__main__":
    main()
