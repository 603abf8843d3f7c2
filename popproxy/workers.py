"""``[process] workers = N`` (N > 1): one parent process, N worker processes, every core used.

One Python process runs on one core. With N workers the parent (the ``twistd`` process):

- binds every listener in ``privilegedStartService``, before twistd drops privileges, and never
  accepts on them itself; each worker adopts the same listening sockets
  (``IReactorSocket.adoptStreamPort``) and the kernel hands each new connection to one of them;
- starts the workers (``python -m popproxy.worker``) right after binding, and tells them twistd's
  ``-u``/``-g``: each drops to that user itself (``twisted.python.util.switchUID``, as twistd does)
  before it reads the configuration. It starts a worker again when one dies (after a pause that
  grows while they keep dying at once); by then the parent has dropped privileges, so the Python
  interpreter and popproxy must be readable and executable by that user (as a package installed
  system-wide is);
- keeps the one session guard (``protocol.guard.Guard``): caps on sessions in all, per address and
  per user, and login-failure penalties hold across workers because only the parent counts. The
  workers ask it over AMP (``popproxy.ipc``); what a dead worker had counted is released;
- writes every audit-log file (``hooks/audit.py``): workers send the lines, so lines never
  interleave and a file rotates once;
- publishes the workers' log events (JSON lines on their standard output) as its own, with
  ``worker`` added, so ``--logfile`` and ``--logger`` see one log;
- on SIGHUP, reloads all or nothing: it checks the file, every worker prepares it (reads it, checks
  it is the same file by its SHA-256, builds hooks and TLS contexts), and only if every worker could
  do all of this do they all switch (``PrepareReload``, then ``CommitReload`` or ``AbandonReload``).
  A worker started later is given the configuration the others run (on its standard input), never
  a file a reload refused;
- on SIGTERM, passes SIGTERM to every worker (they stop listening and give sessions
  ``shutdown_grace`` seconds, as one process does) and exits when they have;
- with ``[metrics]``, serves ``/metrics`` and ``/healthz`` (``popproxy.web``) for all the workers, by
  prometheus_client's multiprocess mode (https://prometheus.github.io/client_python/multiprocess/):
  it makes a private directory (mode 0700, owned by the user the workers drop to, under
  ``$RUNTIME_DIRECTORY`` when set) and starts every worker with ``PROMETHEUS_MULTIPROC_DIR`` naming
  it, so that their metrics live in files there; it reads them with a ``MultiProcessCollector``,
  tells prometheus_client when a worker dies (``mark_process_dead``: its open sessions stop
  counting, its totals stay), and removes the directory when it stops. The parent creates no
  metric objects itself (they would be values of its own process): its two figures, workers ready
  and workers restarted, come from a collector that reads its state when scraped.

Key files are read by each worker after the privilege drop, as a reload reads them: they must be
readable by the user popproxy runs as. TLS session tickets are per worker (pyOpenSSL offers no way to
share a ticket key), so a client that resumes on another worker gets a full handshake.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import classImplements, implementer

from . import ipc
from .admin import IAdminTarget, SessionPage, merge_pages, page_from_answer
from .build import build, pair_listeners, reload_refusal
from .config import ConfigError, ListenerConfig, ProxyConfig, config_digest, load_config, read_config
from .hooks.audit import FileWriter
from .listeners import EndpointString, bind_now, listen_now, take_over
from .protocol.guard import Guard
from .systemd import INotifier, notifier_from_environment, without_notify_socket
from .web import IHealth, metrics_service

log = Logger()

#: A worker that dies within this many seconds of its start is restarted after a growing pause.
QUICK_DEATH = 10.0
FIRST_PAUSE = 0.5
LONGEST_PAUSE = 30.0
#: The longest log line a worker may write; a longer one is dropped, with a warning.
MAX_LOG_LINE = 1024 * 1024
#: The longest audit line a worker may send (its pieces are joined in the parent).
MAX_AUDIT_LINE = 16 * 1024 * 1024
#: Seconds, beyond ``shutdown_grace``, that workers get to exit before they are killed.
EXIT_SLACK = 10.0


def _family(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return "inet6"
    if isinstance(host, IPv4Address):
        return "inet"
    if isinstance(host, UNIXAddress):
        return "unix"
    raise ConfigError("-", "listen", f"{host}: workers cannot share this kind of listener")


class _Unused(Protocol):
    """The parent never accepts on the listening sockets (it stops reading them at once)."""


class FromWorker(amp.AMP):
    """The parent's end of one worker's AMP connection: the guard, audit files, readiness. It
    remembers what it counted for its worker, to release it if the worker dies."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        super().__init__()
        self._pool = pool
        self._worker = worker
        self._sessions: Counter[str | None] = Counter()  # admitted sessions by the address counted
        self._users: Counter[str] = Counter()
        self._pieces: dict[str, list[bytes]] = {}
        self._piece_octets: dict[str, int] = {}

    @property
    def _guard(self) -> Guard:
        return self._pool.guard

    @ipc.Admit.responder
    def admit(self, host: str | None = None) -> dict[str, object]:
        refusal = self._guard.admit(host)
        if refusal is None:
            self._sessions[host] += 1
        return {"refusal": refusal}

    @ipc.AdmitAddress.responder
    def admit_address(self, host: str) -> dict[str, object]:
        refusal = self._guard.admit_address(host)
        if refusal is None and self._sessions[None] > 0:
            self._sessions[None] -= 1  # the same session, now counted under its address
            self._sessions[host] += 1
        return {"refusal": refusal}

    @ipc.Left.responder
    def left(self, host: str | None = None) -> dict[str, object]:
        if self._sessions[host] > 0:
            self._sessions[host] -= 1
            self._guard.left(host)
        return {}

    @ipc.UserAdmit.responder
    def user_admit(self, user: str) -> dict[str, object]:
        granted = self._guard.user_admit(user)
        if granted:
            self._users[user] += 1
        return {"granted": granted}

    @ipc.UserLeft.responder
    def user_left(self, user: str) -> dict[str, object]:
        if self._users[user] > 0:
            self._users[user] -= 1
            self._guard.user_left(user)
        return {}

    @ipc.LoginFailed.responder
    def login_failed(self, host: str) -> dict[str, object]:
        self._guard.login_failed(host)
        return {}

    @ipc.FailureDelay.responder
    def failure_delay(self, host: str, failures: int) -> dict[str, object]:
        return {"delay": self._guard.failure_delay(host, failures)}

    @ipc.AuditRecord.responder
    def audit_record(self, path: str, rotate: str, max_bytes: int, keep: int, piece: bytes,
                     last: bool) -> dict[str, object]:
        pieces = self._pieces.setdefault(path, [])
        pieces.append(piece)
        self._piece_octets[path] = size = self._piece_octets.get(path, 0) + len(piece)
        if size > MAX_AUDIT_LINE:
            del self._pieces[path], self._piece_octets[path]
            log.error("worker {worker}: an audit line for {path} over {limit} octets was dropped",
                      worker=self._worker.index, path=path, limit=MAX_AUDIT_LINE)
            return {}
        if last:
            del self._piece_octets[path]
            line = b"".join(self._pieces.pop(path)).decode("utf-8", "replace")
            self._pool.write_audit(path, rotate, max_bytes, keep, line)
        return {}

    @ipc.Ready.responder
    def ready(self) -> dict[str, object]:
        self._worker.ready()
        return {}

    def release(self) -> None:
        """The worker is gone: what it had counted is no longer in use."""
        for host, count in self._sessions.items():
            for _ in range(count):
                self._guard.left(host)
        for user, count in self._users.items():
            for _ in range(count):
                self._guard.user_left(user)
        self._sessions.clear()
        self._users.clear()
        self._pieces.clear()
        self._piece_octets.clear()


class Worker(ProcessProtocol):
    """One worker process: its AMP connection, its log lines, its end."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.amp: FromWorker | None = None
        self.started = 0.0
        self.is_ready = False
        self.pid: int | None = None  # kept after the process is gone, for the log
        self.ended: Deferred[None] = Deferred()
        self._out = bytearray()
        self._err = bytearray()

    def ready(self) -> None:
        self.is_ready = True
        self.pool.worker_ready(self)

    # -- its output: JSON log events on stdout, anything else on stderr ----------------------------

    def outReceived(self, data: bytes) -> None:
        for line in self._lines(self._out, data):
            try:
                event = eventFromJSON(line.decode("utf-8", "replace"))
            except ValueError:
                log.warn("worker {worker}: {line}", worker=self.index, line=line.decode("utf-8", "replace"))
                continue
            event["worker"] = self.index
            event["worker_pid"] = self.pid
            globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        for line in self._lines(self._err, data):
            log.error("worker {worker}: {line}", worker=self.index, line=line.decode("utf-8", "replace"))

    def _lines(self, buffer: bytearray, data: bytes) -> list[bytes]:
        """Complete lines in ``buffer`` + ``data``; the partial last one stays, up to MAX_LOG_LINE."""
        start = len(buffer)
        buffer += data
        end = buffer.rfind(b"\n", start)
        if end < 0:
            if len(buffer) > MAX_LOG_LINE:
                log.warn("worker {worker}: a log line over {limit} octets was dropped", worker=self.index,
                         limit=MAX_LOG_LINE)
                buffer.clear()
            return []
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[: end + 1]
        return [line for line in lines if line.strip()]

    def processEnded(self, reason: Failure) -> None:
        if self.amp is not None:
            self.amp.release()
            if self.amp.transport is not None:
                self.amp.transport.loseConnection()
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class _PoolCollector(Collector):
    """The parent's own figures, read from the pool when ``/metrics`` is scraped."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        ready = sum(1 for worker in self._pool.workers.values() if worker.is_ready)
        yield GaugeMetricFamily("popproxy_workers_ready", "Worker processes serving now.", value=ready)
        yield CounterMetricFamily("popproxy_worker_restarts", "Worker processes that ended and were started again.",
                                  value=self._pool.restarts)


def exit_status_at_the_end(status: int) -> None:
    """End the process with ``status`` once twistd is done (its PID file removed, its logs flushed).

    twistd has no way for a service to choose its exit status (twisted.scripts.twistd.runApp ends
    with status 0, or by re-raising a signal); an ``atexit`` function runs after it returned.
    """
    import atexit

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a daemon's /dev/null
                pass
        os._exit(status)

    atexit.register(end)


def metrics_directory(uid: int | None, gid: int | None) -> str:
    """A new private directory for prometheus_client's multiprocess files: under ``$RUNTIME_DIRECTORY``
    (systemd's ``RuntimeDirectory=``; the first one if it names several) or the system's temporary
    directory, mode 0700 (``tempfile.mkdtemp``), owned by ``uid``/``gid`` when this process may give
    it away (it is root and the workers will not be)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    path = tempfile.mkdtemp(prefix="popproxy-metrics-", dir=runtime)
    if os.geteuid() == 0 and (uid is not None or gid is not None):
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return path


@implementer(IHealth)
class WorkerPool(MultiService):
    """The parent of ``config.process.workers`` worker processes. See the module docstring."""

    def __init__(self, config: ProxyConfig, reactor: Any, uid: int | None = None, gid: int | None = None,
                 euid: bool = False) -> None:
        """``uid``, ``gid``, ``euid``: twistd's ``-u``, ``-g`` and ``--euid``, for the workers."""
        super().__init__()
        self.config = config
        # The configuration the workers run, as bytes: a worker (re)started is given these rather
        # than reading the file, which may hold a version a reload refused.
        self._data = read_config(config.path)
        self.reactor = reactor
        self._ids = ("-" if uid is None else str(uid), "-" if gid is None else str(gid), "euid" if euid else "uid")
        self._uid, self._gid = uid, gid
        self.guard = Guard(config.limits, reactor)
        #: the listening sockets, by the key their listener had when ``bind`` bound them
        self.ports: dict[str, IListeningPort] = {}
        self._bound_listeners: tuple[ListenerConfig, ...] | None = None
        self._bound_by = os.getpid()
        self.workers: dict[int, Worker] = {}
        self._audit_files: dict[tuple[str, str, int, int], FileWriter] = {}
        self._audit_failing: set[str] = set()
        self._pauses: dict[int, float] = {}
        self._stopping = False
        self._ever_ready = False
        self._previous_hup: Any = None
        #: ``[metrics]``: the workers' multiprocess directory and the HTTP service (privilegedStartService)
        self.metrics_dir: str | None = None
        self.web: StreamServerEndpointService | None = None
        #: workers started again after they ended (popproxy_worker_restarts_total)
        self.restarts = 0
        #: start (every worker serving), reloads and stop, told to systemd (sd_notify); workers never notify
        self.notifier: INotifier = notifier_from_environment()

    # -- start ---------------------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener and ``[metrics]`` now: ``tap.makeService`` calls this before twistd
        daemonizes, writes its PID file and drops privileges, so that a port that cannot be bound
        ends the start with one line (``listeners.bind_now``). The parent never accepts on the
        listeners (their sockets stay off the reactor); the workers do.

        :raises listeners.BindError: for the first endpoint that cannot listen (the others are closed).
        """
        if self._bound_listeners is not None:
            return
        unused = Factory.forProtocol(_Unused)
        unused.noisy = False
        self._bound_by = os.getpid()
        try:
            for listener in self.config.listeners:
                # Only the socket: each worker puts the PROXY-header reader and TLS around it itself.
                endpoint = EndpointString(self.reactor, listener.inner_endpoint)
                self.ports[listener.key] = listen_now(self.reactor, endpoint, unused, self.config.path,
                                                      f"{listener.key}.endpoint", listener.endpoint)
            if self.config.metrics is not None:
                self._start_metrics(self.config.metrics.endpoint)
        except Exception:
            for port in self.ports.values():
                port.stopListening()
            self.ports.clear()
            raise
        self._bound_listeners = self.config.listeners

    def privilegedStartService(self) -> None:
        """Bind (unless ``bind`` did already) while twistd may still bind privileged ports, and start
        the workers."""
        super().privilegedStartService()
        self.bind()
        for port in self.ports.values():
            take_over(port, self._bound_by)  # a unix: socket's lock file, after daemon mode's fork
        if self.web is not None:
            self.web.privilegedStartService()  # accepting on the socket bind() bound
        log.info("popproxy parent serving {count} listener(s) from {config} with {workers} workers",
                 count=len(self.config.listeners), config=str(self.config.path), workers=self.config.process.workers,
                 event="workers_starting")
        # Started while this process may still be root, so that starting them works wherever the
        # interpreter lives; each drops privileges itself before it reads a file.
        for index in range(1, self.config.process.workers + 1):
            self._start_worker(index)

    def _start_metrics(self, endpoint: str) -> None:
        """Make the workers' metrics directory and bind ``/metrics``, before the first worker starts."""
        self.metrics_dir = metrics_directory(self._uid, self._gid)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        registry.register(_PoolCollector(self))
        self.web = metrics_service(endpoint, registry, self, self.reactor)
        try:
            bind_now(self.reactor, self.web, self.config.path, "metrics.endpoint", endpoint)
        except Exception:
            self._remove_metrics_dir()
            raise

    def _remove_metrics_dir(self) -> None:
        """Remove the workers' metrics files and their directory. This runs after the privilege drop:
        the directory itself goes only where that user may remove it (the system's temporary folder,
        or a ``RuntimeDirectory=`` of that user's; systemd removes its runtime directory anyway)."""
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    def serving(self) -> bool:
        """``IHealth``: a worker is ready to accept clients, and the pool is not stopping."""
        return not self._stopping and any(worker.is_ready for worker in self.workers.values())

    def startService(self) -> None:
        if self.web is not None and not self.web.running:
            self.web.startService()
        super().startService()
        # As in ProxyService: hop onto the reactor before doing anything (the ``signal`` docs).
        self._previous_hup = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def _start_worker(self, index: int) -> bool:
        """Start worker ``index``; False (logged) if the process could not be started at all."""
        worker = Worker(self, index)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection = FromWorker(self, worker)
            worker.amp = connection
            self.reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: connection))
            child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", 3: theirs.fileno()}
            specs = []
            # Each socket under the key its endpoint has in the configuration the workers run now
            # (a reload may have moved the table: listeners are known by their endpoint).
            pairs = pair_listeners(self._bound_listeners or (), self.config.listeners)
            assert pairs is not None, "a reload that changes endpoints is refused"
            for number, (bound, current) in enumerate(pairs, start=4):
                port = self.ports[bound.key]
                child_fds[number] = port.fileno()  # type: ignore[attr-defined]
                specs.append(f"{current.key}={number}:{_family(port)}")
            worker.started = self.reactor.seconds()
            arguments = [sys.executable, "-m", "popproxy.worker", str(self.config.path), str(index), *self._ids, *specs]
            env = without_notify_socket(os.environ)  # only the parent, systemd's main process, notifies
            if self.metrics_dir is not None:
                # Read when the worker first imports prometheus_client, which then keeps its values in files there.
                env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
            process = self.reactor.spawnProcess(worker, sys.executable, arguments, env=env, childFDs=child_fds)
            worker.pid = process.pid
        except OSError as error:
            log.critical("cannot start worker {worker}: {error} (the Python interpreter and popproxy must be "
                         "readable and executable by the user popproxy runs as)", worker=index, error=str(error),
                         event="worker_failed")
            if connection.transport is not None:
                connection.transport.loseConnection()
            return False
        finally:
            mine.close()
            theirs.close()
        worker.transport.write(self._data)  # type: ignore[union-attr]
        worker.transport.closeStdin()  # type: ignore[union-attr]
        self.workers[index] = worker
        log.info("worker {worker} started (pid {pid})", worker=index, pid=worker.pid, event="worker_started")
        return True

    def worker_ready(self, worker: Worker) -> None:
        self._ever_ready = True
        self._pauses.pop(worker.index, None)
        log.info("worker {worker} (pid {pid}) is serving", worker=worker.index, pid=worker.pid, event="worker_ready")
        # READY=1 once every worker serves (sent once; a worker restarted later changes nothing).
        workers = self.config.process.workers
        if sum(1 for each in self.workers.values() if each.is_ready) >= workers:
            self.notifier.ready(f"serving {len(self.config.listeners)} listener(s) with {workers} workers")

    def worker_ended(self, worker: Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics_dir is not None and worker.pid is not None:
            mark_process_dead(worker.pid, self.metrics_dir)  # its sessions are no longer open
        if self._stopping:
            return
        status = reason.value
        if isinstance(status, (ProcessDone, ProcessTerminated)):
            how = f"exit status {status.exitCode}" if status.signal is None else f"signal {status.signal}"
        else:
            how = str(status)
        if not worker.is_ready and not self._ever_ready:
            # No worker ever started serving (a configuration or key file it cannot read): restarting
            # would fail the same way, so stop, with the worker's own error already in the log.
            log.critical("worker {worker} failed to start ({how}) and none is serving: stopping",
                         worker=worker.index, how=how, event="workers_failed")
            exit_status_at_the_end(1)  # a supervisor must see that it failed: Restart=on-failure
            self.reactor.stop()
            return
        lived = self.reactor.seconds() - worker.started
        pause = 0.0
        if lived < QUICK_DEATH:
            pause = min(LONGEST_PAUSE, self._pauses.get(worker.index, FIRST_PAUSE / 2) * 2)
            self._pauses[worker.index] = pause
        log.warn("worker {worker} (pid {pid}) ended ({how}) after {lived:.1f}s; starting it again in {pause}s",
                 worker=worker.index, pid=worker.pid, how=how, lived=lived, pause=pause, event="worker_died")
        self.restarts += 1
        self.reactor.callLater(pause, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if self._stopping or index in self.workers:
            return
        if not self._start_worker(index):
            pause = min(LONGEST_PAUSE, self._pauses.get(index, FIRST_PAUSE / 2) * 2)
            self._pauses[index] = pause
            self.reactor.callLater(pause, self._restart, index)

    # -- audit files ---------------------------------------------------------------------------------

    def audit_file(self, path: str, rotate: str, max_bytes: int, keep: int) -> FileWriter:
        """The one writer of the audit file ``path`` (opened at its first line, as a single process
        opens it)."""
        key = (path, rotate, max_bytes, keep)
        writer = self._audit_files.get(key)
        if writer is None:
            for other in [k for k in self._audit_files if k[0] == path]:
                self._audit_files.pop(other).close()  # the same file, other rotation settings (a reload)
            writer = self._audit_files[key] = FileWriter(Path(path), rotate, max_bytes, keep)
        return writer

    def write_audit(self, path: str, rotate: str, max_bytes: int, keep: int, line: str) -> None:
        """One audit line from a worker. A file that cannot be written is logged once until it can
        be again (the writer opens it afresh at the next line); ``on_write_error = "refuse"`` is
        refused at start with workers, so no worker relies on these lines to let mail move."""
        try:
            self.audit_file(path, rotate, max_bytes, keep).write(line)
        except OSError as error:
            if path not in self._audit_failing:
                self._audit_failing.add(path)
                log.error("cannot write the audit file {path}: {error}; records are lost until it can be written",
                          path=path, error=str(error), event="audit_write_failed")
            return
        if path in self._audit_failing:
            self._audit_failing.discard(path)
            log.info("the audit file {path} can be written again", path=path, event="audit_resumed")

    def reopen_audit_files(self) -> None:
        """SIGHUP (logrotate): every audit file this parent writes is opened again by name, whatever
        becomes of the reload."""
        for (path, *_rest), writer in self._audit_files.items():
            try:
                writer.reopen()
            except OSError as error:
                log.error("cannot open the audit file {path} again: {error}", path=path, error=str(error))

    # -- SIGHUP: all or nothing ----------------------------------------------------------------------

    def reload(self) -> Deferred[bool]:
        """Check the file (``build.build``, as at start; a file that adds, removes or changes a
        listener's endpoint or ``[metrics]`` is refused: ``build.reload_refusal``), have every worker
        prepare it, then have all switch, or none."""
        self.notifier.reloading()
        self.reopen_audit_files()

        path = self.config.path
        try:
            data = read_config(path)
            checked = build(load_config(path, data), self.reactor)
        except ConfigError as error:
            return succeed(self._refused(str(error)))
        checked.close()  # the workers build their own
        config = checked.config
        digest = config_digest(data)
        refusal = reload_refusal(self.config, config)
        if refusal is not None:
            return succeed(self._refused(refusal))
        if config.process.workers != self.config.process.workers:
            log.warn("reload: [process] workers changes take effect only after a restart")
        workers = [worker for worker in self.workers.values() if worker.amp is not None]
        asked = [worker.amp.callRemote(ipc.PrepareReload, digest=digest) for worker in workers if worker.amp]
        answers: Deferred[list[tuple[bool, Any]]] = DeferredList(asked, consumeErrors=True)

        def decide(results: list[tuple[bool, Any]]) -> Deferred[bool]:
            errors = []
            for worker, (succeeded, answer) in zip(workers, results, strict=True):
                if not succeeded:
                    errors.append(f"worker {worker.index}: {answer.getErrorMessage()}")
                elif not answer["ok"]:
                    errors.append(f"worker {worker.index}: {answer.get('error')}")
            command = ipc.AbandonReload if errors else ipc.CommitReload
            done = [worker.amp.callRemote(command) for worker in workers if worker.amp is not None]
            if errors:
                return DeferredList(done, consumeErrors=True).addCallback(lambda _: self._refused("; ".join(errors)))
            self.config, self._data = config, data  # what a worker started from now on runs
            self.guard.reconfigure(config.limits)
            log.info("configuration reloaded from {config} by {count} worker(s)", config=str(path), count=len(workers),
                     event="reloaded")
            return DeferredList(done, consumeErrors=True).addCallback(self._reloaded)

        return answers.addCallback(decide)

    def _reloaded(self, _: object = None) -> bool:
        self.notifier.reloaded(None)  # READY=1 once every worker has switched
        return True

    def _refused(self, error: str) -> bool:
        log.error("reload refused, keeping the running configuration: {error}", error=error, event="reload_failed")
        self.last_refusal = error  # for the admin socket's Reload (request_reload)
        self.notifier.reloaded(error)
        return False

    # -- the admin socket (popproxy.admin.IAdminTarget): every worker is asked -------------------------

    #: why the last reload that was refused was refused
    last_refusal: str | None = None

    def _asking(self) -> list[Worker]:
        return [worker for worker in self.workers.values() if worker.amp is not None and worker.is_ready]

    def sessions(self, after: str | None, limit: int) -> Deferred[SessionPage]:
        """``IAdminTarget``: one page from every worker (each at most one AMP value, so at most
        ``workers`` x 65,535 octets held here), merged; each session names its worker."""
        workers = self._asking()
        asked = [worker.amp.callRemote(ipc.WorkerSessions, after=after) for worker in workers if worker.amp is not None]
        answers: Deferred[list[tuple[bool, Any]]] = DeferredList(asked, consumeErrors=True)

        def merge(results: list[tuple[bool, Any]]) -> SessionPage:
            pages = []
            for worker, (succeeded, answer) in zip(workers, results, strict=True):
                if succeeded:
                    pages.append(page_from_answer(answer, worker.index))
                else:
                    log.warn("worker {worker} did not list its sessions: {error}", worker=worker.index,
                             error=answer.getErrorMessage())
            return merge_pages(pages, limit)

        return answers.addCallback(merge)

    def end_session(self, session_id: str) -> Deferred[bool]:
        """``IAdminTarget``: every worker is asked to end ``session_id``; the one that has it does."""
        asked = [worker.amp.callRemote(ipc.EndWorkerSession, session=session_id) for worker in self._asking()
                 if worker.amp is not None]
        answers: Deferred[list[tuple[bool, Any]]] = DeferredList(asked, consumeErrors=True)
        return answers.addCallback(lambda results: any(ok and answer["existed"] for ok, answer in results))

    def request_reload(self) -> Deferred[str | None]:
        """``IAdminTarget``: ``reload`` (as SIGHUP); None if applied, else why it was refused."""
        self.last_refusal = None
        return self.reload().addCallback(lambda applied: None if applied else self.last_refusal or "refused")

    # -- SIGTERM -------------------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Pass SIGTERM on; wait for every worker to finish its sessions; then close what is ours."""
        self._stopping = True
        self.notifier.stopping()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        super().stopService()
        workers = list(self.workers.values())
        for worker in workers:
            try:
                worker.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except Exception:  # already gone: its processEnded is on the way
                pass
        ended = gatherResults([worker.ended for worker in workers])
        limit = self.config.limits.shutdown_grace + EXIT_SLACK
        kill = self.reactor.callLater(limit, self._kill, workers)

        def finish(_: object) -> Deferred[None]:
            if kill.active():
                kill.cancel()
            stopped = [port.stopListening() for port in self.ports.values()]
            for writer in self._audit_files.values():
                writer.close()
            self._audit_files.clear()
            if self.web is not None and self.web.running:
                stopped.append(self.web.stopService())  # /healthz said 503 until the workers were gone
            done = gatherResults([d for d in stopped if d is not None])
            return done.addCallback(lambda _: self._remove_metrics_dir())

        return ended.addCallback(finish)

    def _kill(self, workers: list[Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {worker} (pid {pid}) did not exit in time: killed", worker=worker.index, pid=worker.pid)
                try:
                    worker.transport.signalProcess("KILL")  # type: ignore[union-attr]
                except Exception:
                    pass


classImplements(WorkerPool, IAdminTarget)  # the admin socket's target with workers (popproxy.admin)
