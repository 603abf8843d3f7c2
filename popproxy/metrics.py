"""What the proxy counts for Prometheus: the ``IMetrics`` seam, a no-op and a ``prometheus_client`` implementation.

Sessions, the hook pipeline and the services report events through ``IMetrics``; only
``PrometheusMetrics`` knows metric names. Every label takes its value from a small fixed set or from
the configuration (listener keys, upstream and hook names): text from outside (an end reason, a TLS
version, a limit's name) is mapped onto a fixed set, anything unknown to ``"other"``, so that the
number of series stays bounded whatever clients and servers send. No label ever holds a user name or
a client address.

Names follow the Prometheus naming conventions (https://prometheus.io/docs/practices/naming/):
a ``popproxy_`` prefix, base units (``_seconds``, ``_bytes``) and ``_total`` on counters.

With ``[process] workers = N`` every worker has its own ``PrometheusMetrics`` in prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by the parent before the worker starts), and the
parent serves the sum (``popproxy.workers``); ``sessions_open`` is a ``livesum`` gauge, so a dead
worker's open sessions stop counting (https://prometheus.github.io/client_python/multiprocess/).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import fields
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from zope.interface import Interface, implementer

from .config import LimitsConfig

__all__ = [
    "ENDED",
    "IMetrics",
    "NullMetrics",
    "PrometheusMetrics",
    "ended_label",
]

OTHER: Final = "other"

#: ``SessionMachine.end_reason`` texts (popproxy/protocol/machine.py and client.py) by label value.
ENDED: Final[Mapping[str, str]] = {
    "quit": "quit",
    "quit after hang-up": "quit",
    "client closed": "client_closed",
    "shutdown": "shutdown",
    "ended by admin": "ended_by_admin",
    "idle timeout": "idle_timeout",
    "login timeout": "login_timeout",
    "client stopped reading": "client_stalled",
    "tls handshake timeout": "tls_timeout",
    "no proxy header": "proxy_header",
    "too many sessions": "session_limit",
    "too many sessions from your address": "session_limit",
    "too many sessions for user": "session_limit",
    "too many failed logins": "login_failures",
    "login refused by the lookup": "login_refused",
    "too many bad commands": "bad_commands",
    "upstream lost": "upstream_lost",
    "upstream lost mid-answer": "upstream_lost",
    "upstream closed": "upstream_lost",
    "upstream answer too large": "upstream_error",
    "hook pipeline crashed": "internal_error",
    "internal error": "internal_error",
}
LOGIN_RESULTS: Final = frozenset({"ok", "refused", "unavailable", "abandoned"})
#: What ``hook_ran`` may report as a hook's verdict (``popproxy.hooks.pipeline.verdict_label``); None is "none".
VERDICTS: Final = frozenset({"spam", "ham", "virus", "clean", "refused", "recorded"})
TLS_VERSIONS: Final = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
TLS_LEGS: Final = frozenset({"client", "upstream"})
#: Every ``[limits]`` key may be named by ``limit_hit``.
LIMITS: Final = frozenset(field.name for field in fields(LimitsConfig))
LOOKUP_RESULTS: Final = frozenset({"hit", "miss", "denied", "failed"})
RETRIEVE_COMMANDS: Final = frozenset({"RETR", "TOP"})
DIRECTIONS: Final = ("from_client", "to_client", "from_upstream", "to_upstream")
#: The longest configured name (listener key, upstream, hook) used as a label as it is.
MAX_NAME: Final = 100

#: Latency buckets (seconds) for connecting and logging in upstream, and for hooks.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Session length buckets (seconds): POP3 sessions last from a fraction of a second to the idle timeout.
DURATION_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class IMetrics(Interface):
    """Where the proxy reports what happened, to be counted. Every method returns at once and never raises."""

    def session_opened(listener: str) -> None:
        """A client connected to ``listener`` (its key) and was not turned away before the session began."""

    def session_closed(listener: str, ended: str, authenticated: bool, seconds: float) -> None:
        """A session that ``session_opened`` reported is over. ``ended``: the session machine's end reason
        (free text, mapped to a fixed set); ``authenticated``: it reached TRANSACTION (RFC 1939 §6)."""

    def login(result: str, plaintext: bool) -> None:
        """A login attempt ended: ``ok``, ``refused``, ``unavailable`` or ``abandoned``. ``plaintext``: the
        password came without TLS, allowed by a listener's ``plaintext_from``."""

    def upstream_connected(upstream: str, seconds: float) -> None:
        """A connection to ``upstream`` (its name) was made in ``seconds`` (TCP, and TLS for implicit TLS)."""

    def upstream_logged_in(upstream: str, seconds: float) -> None:
        """A login at ``upstream`` succeeded, ``seconds`` after the connection attempt began."""

    def transferred(from_client: int, to_client: int, from_upstream: int, to_upstream: int) -> None:
        """A session's octets each way, reported once at its end."""

    def retrieved(command: str, octets: int) -> None:
        """One RETR or TOP answer (RFC 1939 §7) of ``octets`` was delivered to the client."""

    def hook_ran(hook: str, verdict: str | None, seconds: float, failed: bool) -> None:
        """Message hook ``hook`` ran for ``seconds``; ``verdict`` what it concluded (None: nothing);
        ``failed``: it raised, timed out or returned what cannot be used (its ``on_error`` applied)."""

    def tls_established(leg: str, version: str) -> None:
        """A TLS handshake completed on ``leg`` (``client`` or ``upstream``) with ``version`` (``TLSv1.3``)."""

    def limit_hit(limit: str) -> None:
        """A ``[limits]`` limit (its key, e.g. ``max_sessions_per_ip``) turned something away."""

    def lookup_done(result: str) -> None:
        """A routing lookup ended: ``hit`` (from its cache), ``miss``, ``denied`` or ``failed``."""

    def health_check() -> None:
        """A load balancer's health check connected (a PROXY protocol header with the LOCAL command)."""


@implementer(IMetrics)
class NullMetrics:
    """Counts nothing: what sessions get when there is no ``[metrics]`` table."""

    def session_opened(self, listener: str) -> None:
        pass

    def session_closed(self, listener: str, ended: str, authenticated: bool, seconds: float) -> None:
        pass

    def login(self, result: str, plaintext: bool) -> None:
        pass

    def upstream_connected(self, upstream: str, seconds: float) -> None:
        pass

    def upstream_logged_in(self, upstream: str, seconds: float) -> None:
        pass

    def transferred(self, from_client: int, to_client: int, from_upstream: int, to_upstream: int) -> None:
        pass

    def retrieved(self, command: str, octets: int) -> None:
        pass

    def hook_ran(self, hook: str, verdict: str | None, seconds: float, failed: bool) -> None:
        pass

    def tls_established(self, leg: str, version: str) -> None:
        pass

    def limit_hit(self, limit: str) -> None:
        pass

    def lookup_done(self, result: str) -> None:
        pass

    def health_check(self) -> None:
        pass


#: The one ``NullMetrics`` (it has no state): the default of every ``metrics`` parameter.
NULL_METRICS: Final = NullMetrics()


def ended_label(reason: str) -> str:
    """The ``ended`` label value for a session machine's end reason."""
    return ENDED.get(reason.strip().lower(), OTHER)


def _one_of(value: str, allowed: Collection[str]) -> str:
    return value if value in allowed else OTHER


def _name(value: str) -> str:
    """A configured name (listener key, upstream, hook) as a label: as it is, unless implausibly long."""
    return value if 0 < len(value) <= MAX_NAME else OTHER


def _seconds(value: float) -> float:
    return value if value >= 0 else 0.0  # a clock stepped back is not a negative latency


@implementer(IMetrics)
class PrometheusMetrics:
    """``IMetrics`` as ``prometheus_client`` metrics, registered in ``registry``.

    Give each proxy its own ``CollectorRegistry`` (tests run several proxies in one process; the
    global ``REGISTRY`` would refuse the second's names). In a worker of ``[process] workers = N``
    the values live in prometheus_client's multiprocess files and the registry is not read.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.sessions_open = Gauge(
            "popproxy_sessions_open", "Client sessions open now.", ("listener",), registry=registry,
            multiprocess_mode="livesum",
        )
        self.sessions = counter("popproxy_sessions", "Client sessions ended, by how they ended.",
                                ("listener", "ended", "authenticated"))
        self.session_duration = histogram("popproxy_session_duration_seconds", "How long client sessions lasted.",
                                          ("listener",), DURATION_BUCKETS)
        self.logins = counter("popproxy_logins", "Login attempts, by result; plaintext: without TLS (plaintext_from).",
                              ("result", "plaintext"))
        self.upstream_connect = histogram("popproxy_upstream_connect_seconds",
                                          "Time to connect to an upstream (TCP, and TLS when implicit).",
                                          ("upstream",), LATENCY_BUCKETS)
        self.upstream_login = histogram("popproxy_upstream_login_seconds",
                                        "Time from starting to connect to an upstream to being logged in there.",
                                        ("upstream",), LATENCY_BUCKETS)
        self.transferred_bytes = counter("popproxy_transferred_bytes", "Octets relayed, by direction (counted at session end).",
                                         ("direction",))
        self.retrieved_messages = counter("popproxy_retrieved_messages", "RETR and TOP answers delivered to clients.",
                                          ("command",))
        self.retrieved_bytes = counter("popproxy_retrieved_bytes", "Octets of RETR and TOP answers delivered to clients.",
                                       ("command",))
        self.hook_runs = counter("popproxy_hook_runs", "Message hook runs, by the verdict the hook recorded.",
                                 ("hook", "verdict"))
        self.hook_errors = counter("popproxy_hook_errors", "Message hook runs that failed (their on_error applied).",
                                   ("hook",))
        self.hook_duration = histogram("popproxy_hook_duration_seconds", "How long message hooks took per message.",
                                       ("hook",), LATENCY_BUCKETS)
        self.tls_handshakes = counter("popproxy_tls_handshakes", "TLS handshakes completed, by leg and version.",
                                      ("leg", "version"))
        self.limit_hits = counter("popproxy_limit_hits", "Times a [limits] limit turned something away.", ("limit",))
        self.lookups = counter("popproxy_lookups", "Routing lookups, by result (hit: answered from the cache).",
                               ("result",))
        self.health_checks = counter("popproxy_health_checks", "Load balancer health checks (PROXY protocol LOCAL).")

    def session_opened(self, listener: str) -> None:
        self.sessions_open.labels(_name(listener)).inc()

    def session_closed(self, listener: str, ended: str, authenticated: bool, seconds: float) -> None:
        listener = _name(listener)
        self.sessions_open.labels(listener).dec()
        self.sessions.labels(listener, ended_label(ended), "true" if authenticated else "false").inc()
        self.session_duration.labels(listener).observe(_seconds(seconds))

    def login(self, result: str, plaintext: bool) -> None:
        self.logins.labels(_one_of(result, LOGIN_RESULTS), "true" if plaintext else "false").inc()

    def upstream_connected(self, upstream: str, seconds: float) -> None:
        self.upstream_connect.labels(_name(upstream)).observe(_seconds(seconds))

    def upstream_logged_in(self, upstream: str, seconds: float) -> None:
        self.upstream_login.labels(_name(upstream)).observe(_seconds(seconds))

    def transferred(self, from_client: int, to_client: int, from_upstream: int, to_upstream: int) -> None:
        for direction, octets in zip(DIRECTIONS, (from_client, to_client, from_upstream, to_upstream), strict=True):
            if octets > 0:
                self.transferred_bytes.labels(direction).inc(octets)

    def retrieved(self, command: str, octets: int) -> None:
        command = _one_of(command.upper(), RETRIEVE_COMMANDS)
        self.retrieved_messages.labels(command).inc()
        if octets > 0:
            self.retrieved_bytes.labels(command).inc(octets)

    def hook_ran(self, hook: str, verdict: str | None, seconds: float, failed: bool) -> None:
        hook = _name(hook)
        self.hook_runs.labels(hook, "none" if verdict is None else _one_of(verdict, VERDICTS)).inc()
        if failed:
            self.hook_errors.labels(hook).inc()
        self.hook_duration.labels(hook).observe(_seconds(seconds))

    def tls_established(self, leg: str, version: str) -> None:
        self.tls_handshakes.labels(_one_of(leg, TLS_LEGS), _one_of(version, TLS_VERSIONS)).inc()

    def limit_hit(self, limit: str) -> None:
        self.limit_hits.labels(_one_of(limit, LIMITS)).inc()

    def lookup_done(self, result: str) -> None:
        self.lookups.labels(_one_of(result, LOOKUP_RESULTS)).inc()

    def health_check(self) -> None:
        self.health_checks.inc()
