"""One worker process of ``[process] workers = N``; started by ``popproxy.workers``, never by hand.

``python -m popproxy.worker CONFIG INDEX KEY=FD:FAMILY ...``

File descriptor 3 is the AMP connection to the parent (``popproxy.ipc``); each ``KEY=FD:FAMILY``
is a listening socket the parent bound for the listener ``KEY``, adopted here with
``IReactorSocket.adoptStreamPort``. Log events go to standard output as JSON lines, which the parent
publishes as its own with ``worker`` added. The worker reads the configuration and its key files
itself, after the parent dropped privileges: the same rule as for a reload (the files must be
readable by the user popproxy runs as).

SIGTERM (and SIGINT) stop the worker as they stop a single-process proxy: listening ends, sessions
get ``shutdown_grace`` seconds. SIGHUP is ignored: reloads come from the parent, over AMP, so that
all workers change together or none does. A worker whose parent is gone stops too.
"""

from __future__ import annotations

import functools
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore, IReactorSocket, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from . import ipc
from .config import ConfigError

log = Logger()

#: the AMP connection to the parent
PARENT_FD = 3

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """A listening socket bound by another process (the parent), adopted when listened on."""

    def __init__(self, reactor: IReactorSocket, fd: int, family: socket.AddressFamily) -> None:
        self._reactor, self._fd, self._family = reactor, fd, family

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        port = self._reactor.adoptStreamPort(self._fd, self._family, factory)  # type: ignore[arg-type]
        return succeed(port)


class ToParent(amp.AMP):
    """The worker's end: it asks the guard and sends audit lines; the parent drives reloads."""

    def __init__(self) -> None:
        super().__init__()
        self.service: Any = None  # the ProxyService, once built
        self._prepared: Any = None
        self.lost: Deferred[None] = Deferred()

    @ipc.PrepareReload.responder
    def prepare_reload(self, digest: str) -> dict[str, object]:
        self._abandon()
        prepared = self.service.prepare_reload(digest)
        if isinstance(prepared, str):
            return {"ok": False, "error": prepared}
        self._prepared = prepared
        return {"ok": True}

    @ipc.CommitReload.responder
    def commit_reload(self) -> dict[str, object]:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self.service.commit_reload(prepared)
        return {}

    @ipc.AbandonReload.responder
    def abandon_reload(self) -> dict[str, object]:
        self._abandon()
        return {}

    def _abandon(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self.service.abandon_reload(prepared)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.lost.callback(None)


def parse_listeners(specs: list[str]) -> dict[str, tuple[int, socket.AddressFamily]]:
    """``KEY=FD:FAMILY`` arguments, as ``popproxy.workers`` writes them."""
    listeners = {}
    for spec in specs:
        key, _, rest = spec.rpartition("=")
        fd, _, family = rest.partition(":")
        listeners[key] = (int(fd), FAMILIES[family])
    return listeners


def main(argv: list[str]) -> int:
    config_path, index, *specs = argv
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, recordSeparator="")], redirectStandardIO=False)
    # Reloads come from the parent; a SIGHUP from a shell's job control must not end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from twisted.internet import reactor

    from .hooks import audit
    from .service import ProxyService
    from .tap import validated_config

    parent = ToParent()
    reactor.adoptStreamConnection(PARENT_FD, socket.AF_UNIX, Factory.forProtocol(lambda: parent))  # type: ignore[attr-defined]
    try:
        config = validated_config(config_path)
    except ConfigError as error:
        log.critical("worker {worker}: configuration error: {error}", worker=index, error=str(error),
                     event="worker_failed")
        return 1
    # Audit files have one writer, the parent: lines from every worker reach it whole, in order.
    audit.factory.files = functools.partial(ipc.ForwardedFile, parent)
    endpoints: dict[str, IStreamServerEndpoint] = {
        key: AdoptedEndpoint(reactor, fd, family)  # type: ignore[arg-type]
        for key, (fd, family) in parse_listeners(specs).items()
    }
    service = ProxyService(config, reactor, handle_signals=False, guard=ipc.RemoteGuard(parent), endpoints=endpoints)
    parent.service = service
    core: IReactorCore = reactor
    service.privilegedStartService()
    service.startService()
    core.addSystemEventTrigger("before", "shutdown", service.stopService)
    parent.lost.addCallback(lambda _: core.stop() if core.running else None)
    parent.callRemote(ipc.Ready)
    core.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
