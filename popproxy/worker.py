"""One worker process of ``[process] workers = N``; started by ``popproxy.workers``, never by hand.

``python -m popproxy.worker CONFIG INDEX UID GID uid|euid KEY=FD:FAMILY ...``, the content of the
configuration file CONFIG on standard input.

File descriptor 3 is the AMP connection to the parent (``popproxy.ipc``); each ``KEY=FD:FAMILY``
is a listening socket the parent bound for the listener ``KEY``, adopted here with
``IReactorSocket.adoptStreamPort``. ``UID``/``GID`` are twistd's ``-u``/``-g`` (``-`` for none):
the worker switches to them as twistd does, before it checks the configuration and reads its key
files, so it reads them as a reload does (they must be readable by the user popproxy runs as). Log
events go to standard output as JSON lines, which the parent publishes as its own with ``worker``
added.

With ``[metrics]`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment, so that
prometheus_client, imported here, keeps every metric's value in a file there for the parent to add
up; the metric objects are made after the privilege drop, so their files belong to that user.

SIGTERM (and SIGINT) stop the worker as they stop a single-process proxy: listening ends, sessions
get ``shutdown_grace`` seconds. SIGHUP is ignored: reloads come from the parent, over AMP, so that
all workers change together or none does. A worker whose parent is gone stops too.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorSocket,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.util import switchUID
from zope.interface import implementer

from . import admin, ipc
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

    @ipc.WorkerSessions.responder
    def sessions(self, after: str | None = None) -> Deferred[dict[str, object]]:
        listed: Deferred[dict[str, object]] = self.service.sessions(after, admin.PAGE_SESSIONS).addCallback(
            admin.page_answer)
        return listed

    @ipc.EndWorkerSession.responder
    def end_session(self, session: str) -> Deferred[dict[str, object]]:
        ended: Deferred[dict[str, object]] = self.service.end_session(session).addCallback(
            lambda existed: {"existed": existed})
        return ended

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
    config_path, index, uid, gid, which, *specs = argv
    data = sys.stdin.buffer.read()  # the configuration the parent runs (to the end of standard input)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, recordSeparator="")], redirectStandardIO=False)
    # Reloads come from the parent; a SIGHUP from a shell's job control must not end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from twisted.internet import reactor

    # Everything a worker runs is imported before the privilege drop (the built-in hooks too).
    from .build import build
    from .config import load_config
    from .hooks import archive, audit, rewrite, rspamd, spamassassin  # noqa: F401
    from .metrics import NULL_METRICS, IMetrics, PrometheusMetrics
    from .service import ProxyService

    parent = ToParent()
    reactor.adoptStreamConnection(PARENT_FD, socket.AF_UNIX, Factory.forProtocol(lambda: parent))  # type: ignore[attr-defined]
    if uid != "-" or gid != "-":
        switchUID(None if uid == "-" else int(uid), None if gid == "-" else int(gid), which == "euid")
    # Audit files have one writer, the parent: lines from every worker reach it whole, in order
    # (set before the hooks are built).
    audit.factory.files = functools.partial(ipc.ForwardedFile, parent)
    try:
        # Built once, as --check and a reload build it (popproxy.build), after the privilege drop.
        built = build(load_config(config_path, data), reactor)
    except ConfigError as error:
        log.critical("worker {worker}: configuration error: {error}", worker=index, error=str(error),
                     event="worker_failed")
        return 1
    config = built.config
    endpoints: dict[str, IStreamServerEndpoint] = {
        key: AdoptedEndpoint(reactor, fd, family)  # type: ignore[arg-type]
        for key, (fd, family) in parse_listeners(specs).items()
    }
    # The parent serves the figures of all workers; this one's go to the multiprocess directory.
    metrics: IMetrics = NULL_METRICS
    if config.metrics is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import CollectorRegistry

        metrics = PrometheusMetrics(CollectorRegistry())
    service = ProxyService(config, reactor, handle_signals=False, guard=ipc.RemoteGuard(parent), endpoints=endpoints,
                           metrics=metrics, built=built)
    parent.service = service
    core: IReactorCore = reactor
    threads: IReactorFromThreads = reactor  # type: ignore[assignment]
    service.privilegedStartService()
    service.startService()
    core.addSystemEventTrigger("before", "shutdown", service.stopService)
    stopping: list[str] = []

    def stop(why: str) -> None:
        """Stop once, whatever asks first: the parent's SIGTERM, a terminal's SIGINT to the whole
        process group, or the parent's end."""
        if not stopping:
            stopping.append(why)
            log.info("worker {worker}: {why}, stopping", worker=index, why=why)
            core.stop()

    # Our own handlers instead of the reactor's (installSignalHandlers=False below), which would
    # try to stop the reactor a second time when SIGTERM and SIGINT both come. The ``signal``
    # docs: handlers run between bytecodes, so hop onto the reactor first.
    for number, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        signal.signal(number, lambda *_, name=name: threads.callFromThread(stop, f"received {name}"))
    parent.lost.addCallback(lambda _: stop("the parent is gone"))
    parent.callRemote(ipc.Ready)
    core.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
