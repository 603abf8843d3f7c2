"""``[metrics]``: Prometheus figures, ``/metrics`` and ``/healthz``, the Grafana dashboard.

- ``PrometheusMetrics``: the names, and labels bounded whatever text comes in;
- the hook pipeline reports verdicts, failures and time (by the injected clock);
- the HTTP service: ``/metrics`` parses as Prometheus text, ``/healthz`` is 200 while listeners
  accept and 503 while the proxy drains;
- configuration errors, and a reload that changes ``[metrics]`` is refused;
- every metric the dashboard's panels use exists in a real exposition;
- end to end: ``twistd popproxy`` in front of the real Dovecot, poplib sessions, then a scrape; once
  with one process and once with ``workers = 2`` (figures from both workers, in one scrape).
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popproxy.config import ConfigError, parse_config
from popproxy.hooks.interfaces import IHookFactory, IMessageHook, MessageContext, MessageFacts, MessageRefused, SessionFacts
from popproxy.hooks.pipeline import run_message_hooks
from popproxy.hooks.registry import build_hooks, start_hooks
from popproxy.metrics import ENDED, LIMITS, IMetrics, NullMetrics, PrometheusMetrics, ended_label
from popproxy.service import ProxyService
from popproxy.tap import validated_config
from popproxy.web import IHealth, metrics_service

import support.samplehooks as samplehooks
from support.configs import PREAMBLE, proxy_config
from support.dovecot import DovecotServer
from support.proxyproc import ProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"


# --- helpers -----------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 if there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, found_labels), v in found.items() if n == name and wanted <= found_labels)


def label_values(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in found.items() if n == name and label in dict(ls)}


def exercise(metrics: IMetrics) -> None:
    """Call every ``IMetrics`` method once, so that every labelled series exists."""
    metrics.session_opened("listen[0]")
    metrics.session_closed("listen[0]", "quit", True, 1.5)
    metrics.login("ok", False)
    metrics.upstream_connected("main", 0.01)
    metrics.upstream_logged_in("main", 0.05)
    metrics.transferred(10, 2000, 2100, 20)
    metrics.retrieved("RETR", 1900)
    metrics.hook_ran("spamassassin", "spam", 0.2, False)
    metrics.hook_ran("clamav", None, 30.0, True)
    metrics.tls_established("client", "TLSv1.3")
    metrics.limit_hit("max_sessions_per_ip")
    metrics.lookup_done("hit")
    metrics.health_check()


@implementer(IMetrics)
class RecordingMetrics(NullMetrics):
    """Keeps the ``hook_ran`` calls (the pipeline's only ones)."""

    def __init__(self) -> None:
        self.hooks: list[tuple[str, str | None, float, bool]] = []

    def hook_ran(self, hook: str, verdict: str | None, seconds: float, failed: bool) -> None:
        self.hooks.append((hook, verdict, seconds, failed))


@implementer(IHealth)
class Switch:
    def __init__(self) -> None:
        self.on = True

    def serving(self) -> bool:
        return self.on


def fetch(url: str) -> tuple[int, bytes]:
    """GET ``url`` with urllib: (status, body), error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def get(url: str) -> tuple[int, bytes]:
    """``fetch`` in a thread, while the reactor serves the request."""
    result: tuple[int, bytes] = await deferToThread(fetch, url)
    return result


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    code, body = fetch(f"http://127.0.0.1:{port}/metrics")
    assert code == 200, code
    return samples(body.decode())


def health(port: int) -> int:
    return fetch(f"http://127.0.0.1:{port}/healthz")[0]


# --- PrometheusMetrics --------------------------------------------------------------------------------


def test_every_implementation_provides_the_interface() -> None:
    assert verifyObject(IMetrics, NullMetrics())
    assert verifyObject(IMetrics, PrometheusMetrics(CollectorRegistry()))
    assert verifyObject(IMetrics, RecordingMetrics())


def test_names_follow_the_conventions_and_every_method_moves_its_series() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    exercise(metrics)
    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "popproxy_sessions_open", listener="listen[0]") == 0  # opened, then closed
    assert value(found, "popproxy_sessions_total", listener="listen[0]", ended="quit", authenticated="true") == 1
    assert value(found, "popproxy_session_duration_seconds_sum") == 1.5
    assert value(found, "popproxy_logins_total", result="ok", plaintext="false") == 1
    assert value(found, "popproxy_upstream_connect_seconds_count", upstream="main") == 1
    assert value(found, "popproxy_upstream_login_seconds_sum", upstream="main") == 0.05
    assert value(found, "popproxy_transferred_bytes_total", direction="from_client") == 10
    assert value(found, "popproxy_transferred_bytes_total", direction="to_client") == 2000
    assert value(found, "popproxy_transferred_bytes_total", direction="from_upstream") == 2100
    assert value(found, "popproxy_transferred_bytes_total", direction="to_upstream") == 20
    assert value(found, "popproxy_retrieved_messages_total", command="RETR") == 1
    assert value(found, "popproxy_retrieved_bytes_total", command="RETR") == 1900
    assert value(found, "popproxy_hook_runs_total", hook="spamassassin", verdict="spam") == 1
    assert value(found, "popproxy_hook_runs_total", hook="clamav", verdict="none") == 1
    assert value(found, "popproxy_hook_errors_total", hook="clamav") == 1
    assert value(found, "popproxy_hook_errors_total", hook="spamassassin") == 0
    assert value(found, "popproxy_hook_duration_seconds_sum", hook="clamav") == 30.0
    assert value(found, "popproxy_tls_handshakes_total", leg="client", version="TLSv1.3") == 1
    assert value(found, "popproxy_limit_hits_total", limit="max_sessions_per_ip") == 1
    assert value(found, "popproxy_lookups_total", result="hit") == 1
    assert value(found, "popproxy_health_checks_total") == 1
    names = {family.name for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert all(name.startswith("popproxy_") for name in names), names


def test_labels_from_outside_text_stay_in_a_fixed_set() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    for n in range(200):  # 200 different texts of each kind: no more than a handful of series
        metrics.session_opened("listen[0]")
        metrics.session_closed("listen[0]", f"upstream said -ERR {n} for bob@example.org from 192.0.2.{n}", n % 2 == 0, 1.0)
        metrics.login(f"weird {n}", False)
        metrics.tls_established(f"leg{n}", f"SSLv{n}")
        metrics.limit_hit(f"limit {n}")
        metrics.lookup_done(f"answer {n}")
        metrics.retrieved(f"XRETR{n}", 10)
        metrics.hook_ran("rewrite", f"verdict {n}", 0.0, False)
    found = samples(generate_latest(metrics.registry).decode())
    assert label_values(found, "popproxy_sessions_total", "ended") == {"other"}
    assert label_values(found, "popproxy_logins_total", "result") == {"other"}
    assert label_values(found, "popproxy_tls_handshakes_total", "leg") == {"other"}
    assert label_values(found, "popproxy_tls_handshakes_total", "version") == {"other"}
    assert label_values(found, "popproxy_limit_hits_total", "limit") == {"other"}
    assert label_values(found, "popproxy_lookups_total", "result") == {"other"}
    assert label_values(found, "popproxy_retrieved_messages_total", "command") == {"other"}
    assert label_values(found, "popproxy_hook_runs_total", "verdict") == {"other"}
    assert value(found, "popproxy_sessions_total") == 200
    every_label = {v for (_, labels), _ in found.items() for _, v in labels}
    assert not any("@" in v or "192.0.2." in v for v in every_label), every_label


def test_every_end_reason_of_the_session_machine_has_its_own_label() -> None:
    machine = (ROOT / "popproxy" / "protocol" / "machine.py").read_text()
    client = (ROOT / "popproxy" / "protocol" / "client.py").read_text()
    # The literal reasons the machine closes with (``_close("...")``, ``end_reason = "..."``).
    reasons = set(re.findall(r'(?:_close|_abort|_queue_close)\("([^"]+)"\)', machine))
    reasons |= set(re.findall(r'end_reason = "([^"]+)"', machine + client))
    assert reasons, "no end reason found: the pattern no longer matches the session machine"
    unmapped = {reason for reason in reasons if ended_label(reason) == "other"}
    assert not unmapped, f"end reasons counted as 'other': {unmapped}"
    assert ended_label("Quit") == "quit" and ended_label("something new") == "other"
    assert len(set(ENDED.values())) <= 20  # a small fixed set
    assert {"max_sessions", "max_sessions_per_ip", "max_sessions_per_user", "max_login_failures", "max_pipelined"} <= LIMITS


def test_two_proxies_in_one_process_count_apart() -> None:
    first, second = PrometheusMetrics(CollectorRegistry()), PrometheusMetrics(CollectorRegistry())
    first.login("ok", True)
    first.login("ok", True)
    second.login("ok", True)
    assert value(samples(generate_latest(first.registry).decode()), "popproxy_logins_total", result="ok", plaintext="true") == 2
    assert value(samples(generate_latest(second.registry).decode()), "popproxy_logins_total", result="ok") == 1


# --- the hook pipeline ----------------------------------------------------------------------------------


@implementer(IMessageHook)
class Refuser:
    reservation = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def process(self, message: bytes, context: MessageContext) -> bytes:
        raise MessageRefused("virus Eicar-Test-Signature")


@implementer(IHookFactory)
class RefuserFactory:
    def build(self, config: Any) -> Refuser:
        config.options.finish()
        return Refuser(config.name)


refuser = RefuserFactory()


def pipeline_context(size: int) -> MessageContext:
    return MessageContext(MessageFacts(SessionFacts("s1", "192.0.2.1", 40000, "pop3", user="bob"), 1, "u1", size))


def hooks_of(tmp_path: Path, tables: str, clock: Any) -> Any:
    path = tmp_path / "popproxy.toml"
    return start_hooks(build_hooks(parse_config(PREAMBLE + tables, path)), clock)


def test_the_pipeline_reports_each_hook_verdict_failure_and_time_by_its_clock(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    samplehooks.CLOCK = clock
    hooks = hooks_of(tmp_path, (
        '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "slow"\ndelay = 2.5\n'
        '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "broken"\nmode = "raise"\n'
        '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "stuck"\nmode = "hang"\ntimeout = 7\n'
        '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "spammy"\n'
    ), clock)
    metrics = RecordingMetrics()
    message = b"Subject: SPAM\r\n\r\nbody\r\n"
    done = ensureDeferred(run_message_hooks(hooks, message, pipeline_context(len(message)), clock, metrics=metrics))
    clock.advance(2.5)   # "slow" finishes
    clock.advance(7)     # "stuck" times out
    result = done.result
    assert result.message is not None and result.message.count(b"X-Tag") == 2
    assert metrics.hooks == [
        ("slow", "spam", 2.5, False),  # the Tagger judges b"SPAM" in the message
        ("broken", None, 0.0, True),
        ("stuck", None, 7.0, True),
        ("spammy", "spam", 0.0, False),
    ]


def test_a_refusing_hook_is_reported_as_refused_not_failed(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    hooks = hooks_of(tmp_path, '[[hook]]\nuse = "test_metrics:refuser"\nname = "av"\n'
                               '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "after"\n', clock)
    metrics = RecordingMetrics()
    done = ensureDeferred(run_message_hooks(hooks, b"x\r\n", pipeline_context(3), clock, metrics=metrics))
    assert done.result.message is None
    assert metrics.hooks == [("av", "refused", 0.0, False)]  # the hooks after it do not run


def test_the_pipeline_counts_nothing_by_default(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    hooks = hooks_of(tmp_path, '[[hook]]\nuse = "support.samplehooks:tagger"\n', clock)
    done = ensureDeferred(run_message_hooks(hooks, b"x\r\n", pipeline_context(3), clock))
    assert done.result.message is not None  # and NullMetrics raised nothing


# --- the HTTP service ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_healthz_follows_the_health_it_is_given() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    exercise(metrics)
    switch = Switch()
    port = free_port()
    service = metrics_service(f"tcp:{port}:interface=127.0.0.1", metrics.registry, switch, reactor)
    service.privilegedStartService()
    service.startService()
    try:
        code, body = await get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert value(samples(body.decode()), "popproxy_logins_total", result="ok") == 1
        assert await get(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")
        switch.on = False
        assert await get(f"http://127.0.0.1:{port}/healthz") == (503, b"unavailable\n")
        assert (await get(f"http://127.0.0.1:{port}/other"))[0] == 404
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_healthz_says_503_while_the_proxy_drains_and_metrics_are_served_until_the_end(
        tmp_path: Path, dovecot: DovecotServer) -> None:
    listen, web = free_port(), free_port()
    config = proxy_config(
        tmp_path, listeners=[{"endpoint": f"tcp:{listen}:interface=127.0.0.1", "tls": "none"}],
        upstreams={"main": {"address": f"127.0.0.1:{dovecot.plain_port}", "tls": "none"}},
        extra=f'[limits]\nshutdown_grace = 20\n[metrics]\nendpoint = "tcp:{web}:interface=127.0.0.1"\n',
    )
    service = ProxyService(config, reactor, handle_signals=False)
    assert service.serving() is False
    service.privilegedStartService()
    service.startService()

    def log_in() -> poplib.POP3:  # blocking: in a thread, while the reactor serves the proxy
        client = poplib.POP3("127.0.0.1", listen, timeout=20)
        client.user("dave")
        client.pass_("dave-pw")
        return client

    client = await deferToThread(log_in)
    try:
        assert await get(f"http://127.0.0.1:{web}/healthz") == (200, b"ok\n")
        _, body = await get(f"http://127.0.0.1:{web}/metrics")
        assert value(samples(body.decode()), "popproxy_sessions_open", listener="listen[0]") == 1
        stopped: Deferred[None] = service.stopService()
        assert not stopped.called  # the logged-in session has shutdown_grace to finish
        assert await get(f"http://127.0.0.1:{web}/healthz") == (503, b"unavailable\n")
        assert (await get(f"http://127.0.0.1:{web}/metrics"))[0] == 200
    finally:
        await deferToThread(client.quit)
    await stopped
    with pytest.raises(ConnectionRefusedError):  # the metrics port closed last
        socket.create_connection(("127.0.0.1", web), timeout=5).close()


# --- configuration ------------------------------------------------------------------------------------


def test_the_metrics_table_is_optional_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "popproxy.toml"
    assert parse_config(PREAMBLE, path).metrics is None
    config = parse_config(PREAMBLE + '[metrics]\nendpoint = "tcp:9110:interface=127.0.0.1"\n', path)
    assert config.metrics is not None and config.metrics.endpoint == "tcp:9110:interface=127.0.0.1"
    for table, error in [
        ("[metrics]\n", "metrics.endpoint: required"),
        ('[metrics]\nendpoint = "ssl:9110"\n', "metrics.endpoint: must be a"),
        ('[metrics]\nendpoint = "haproxy:tcp:9110"\n', "metrics.endpoint: must be a"),
        ('[metrics]\nendpoint = 9110\n', "metrics.endpoint: must be a string"),
        ('[metrics]\nendpoint = "tcp:9110"\nport = 1\n', "metrics.port: unknown key"),
        ('metrics = "tcp:9110"\n', "metrics: must be a table"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            parse_config(table + PREAMBLE if not table.startswith("[") else PREAMBLE + table, path)


def test_an_endpoint_twisted_cannot_parse_fails_at_load(tmp_path: Path) -> None:
    path = tmp_path / "popproxy.toml"
    path.write_text(PREAMBLE + '[metrics]\nendpoint = "tcp:notaport"\n')
    with pytest.raises(ConfigError, match=r"metrics\.endpoint: invalid endpoint"):
        validated_config(str(path))


def test_a_reload_that_changes_the_metrics_endpoint_is_refused_and_logged(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, extra='[metrics]\nendpoint = "tcp:9110:interface=127.0.0.1"\n')
    service = ProxyService(config, MemoryReactorClock(), handle_signals=False)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        text = config.path.read_text().replace("tcp:9110:", "tcp:9111:")
        config.path.write_text(text)
        assert service.reload() is False
        config.path.write_text(text.split("[metrics]")[0])  # removing the table needs a restart too
        assert service.reload() is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e for e in events if e.get("event") == "reload_failed"]
    assert len(refusals) == 2
    assert "'tcp:9110:interface=127.0.0.1' to 'tcp:9111:interface=127.0.0.1'" in refusals[0]["error"]
    assert "need a restart" in refusals[0]["error"] and "'none'" in refusals[1]["error"]
    assert service.config.metrics == config.metrics


# --- the Grafana dashboard ------------------------------------------------------------------------------


def dashboard_expressions() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key in ("expr", "definition"):  # panel queries, and the instance variable's
                if isinstance(node.get(key), str):
                    yield node[key]
            for child in node.values():
                yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    return list(walk(json.loads(DASHBOARD.read_text())))


def test_the_dashboard_uses_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    for panel in dashboard["panels"]:
        if panel.get("type") != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest_twisted.ensureDeferred
async def test_every_metric_the_dashboard_uses_exists_in_a_real_exposition() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    exercise(metrics)
    port = free_port()
    service = metrics_service(f"tcp:{port}:interface=127.0.0.1", metrics.registry, Switch(), reactor)
    service.startService()
    try:
        code, body = await get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await service.stopService()
    assert code == 200
    exposed = {name for name, _ in samples(body.decode())}
    expressions = dashboard_expressions()
    used = {name for expr in expressions for name in re.findall(r"\bpopproxy_[a-z_]+\b", expr)}
    assert len(expressions) >= 10 and len(used) >= 15, used
    assert used <= exposed, f"in the dashboard but not in /metrics: {sorted(used - exposed)}"


# --- end to end: twistd popproxy and the real Dovecot --------------------------------------------------


def write_config(folder: Path, port: int, web: int, dovecot: DovecotServer, workers: int = 1) -> Path:
    config = folder / "popproxy.toml"
    config.write_text(
        f'[process]\nworkers = {workers}\n'
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.main]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        f'[routing]\ndefault = "main"\n'
        f'[metrics]\nendpoint = "tcp:{web}:interface=127.0.0.1"\n'
    )
    return config


def good_session(port: int, dovecot: DovecotServer) -> int:
    """Log in as dave, RETR 1, QUIT; the octets of message 1."""
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user("dave")
    client.pass_("dave-pw")
    _, lines, octets = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == dovecot.users["dave"].messages[0]
    client.quit()
    return octets


def bad_session(port: int) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client.user("dave")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.quit()


def until(condition: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def check_counters(found: dict[tuple[str, frozenset[tuple[str, str]]], float], good: int, bad: int) -> None:
    assert value(found, "popproxy_logins_total", result="ok", plaintext="false") == good
    assert value(found, "popproxy_logins_total", result="refused") == bad
    assert value(found, "popproxy_sessions_total", listener="listen[0]", ended="quit", authenticated="true") == good
    assert value(found, "popproxy_sessions_total", listener="listen[0]", ended="quit", authenticated="false") == bad
    assert value(found, "popproxy_sessions_open") == 0
    assert value(found, "popproxy_retrieved_messages_total", command="RETR") == good
    assert value(found, "popproxy_upstream_connect_seconds_count", upstream="main") >= good
    assert value(found, "popproxy_upstream_login_seconds_count", upstream="main") == good
    assert value(found, "popproxy_transferred_bytes_total", direction="to_client") > 0
    assert value(found, "popproxy_transferred_bytes_total", direction="from_upstream") > 0


@pytest.fixture
def single(tmp_path: Path, dovecot: DovecotServer) -> Iterator[tuple[ProxyProcess, int]]:
    port, web = free_port(), free_port()
    proxy = ProxyProcess(write_config(tmp_path, port, web, dovecot), [port, web], tmp_path, json=True)
    try:
        yield proxy, web
    finally:
        proxy.stop(timeout=20)


def test_end_to_end_one_process(single: tuple[ProxyProcess, int], dovecot: DovecotServer) -> None:
    proxy, web = single
    assert health(web) == 200
    octets = good_session(proxy.ports[0], dovecot)
    bad_session(proxy.ports[0])
    found = until(lambda: (f := scrape(web)) and value(f, "popproxy_sessions_total") >= 2 and f, "both sessions counted")
    check_counters(found, good=1, bad=1)
    assert value(found, "popproxy_retrieved_bytes_total", command="RETR") >= octets
    assert health(web) == 200


def test_end_to_end_two_workers(tmp_path: Path, dovecot: DovecotServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port, web = free_port(), free_port()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))  # read by the parent (ProxyProcess passes os.environ on)
    proxy = ProxyProcess(write_config(tmp_path, port, web, dovecot, workers=2), [port, web], tmp_path, json=True)
    try:
        until(lambda: len([e for e in proxy.events() if e.get("event") == "worker_ready"]) >= 2, "two workers ready", 30)
        assert health(web) == 200
        directories = list(runtime.iterdir())
        assert len(directories) == 1 and directories[0].stat().st_mode & 0o777 == 0o700
        good = bad = 0
        for _ in range(60):  # the kernel gives each connection to one worker: go on until both served some
            good_session(port, dovecot)
            bad_session(port)
            good, bad = good + 1, bad + 1
            served = {e.get("worker") for e in proxy.events() if e.get("event") == "auth" and e.get("result") == "ok"}
            if served >= {1, 2} and good >= 3:
                break
        assert served == {1, 2}, served
        found = until(lambda: (f := scrape(web)) and value(f, "popproxy_sessions_total") >= good + bad and f,
                      "every session counted")
        check_counters(found, good=good, bad=bad)
        assert value(found, "popproxy_workers_ready") == 2
        # Files from two worker processes make up the figures.
        pids = {name.rsplit("_", 1)[-1] for name in os.listdir(directories[0])}
        assert len(pids) >= 2, pids

        # A worker killed with a session open: its open session stops counting; its totals stay.
        client = poplib.POP3("127.0.0.1", port, timeout=20)
        client.user("dave")
        client.pass_("dave-pw")
        until(lambda: value(scrape(web), "popproxy_sessions_open") == 1, "the session counted as open")
        pids_by_worker = {int(e["worker"]): int(e["pid"]) for e in proxy.events() if e.get("event") == "worker_started"}
        opened = [e for e in proxy.events() if e.get("event") == "auth" and e.get("result") == "ok"][-1]
        os.kill(pids_by_worker[int(opened["worker"])], signal.SIGKILL)
        after = until(lambda: (f := scrape(web)) and value(f, "popproxy_sessions_open") == 0 and f,
                      "the dead worker's session no longer open")
        assert value(after, "popproxy_logins_total", result="ok") == good + 1
        assert value(after, "popproxy_sessions_total") >= good + bad
        client.close()
        until(lambda: value(scrape(web), "popproxy_worker_restarts_total") == 1, "the restart counted")
    finally:
        proxy.stop(timeout=30)
    assert list(runtime.iterdir()) == []  # the parent removed its directory


def test_workers_that_drop_privileges_write_their_figures_and_the_parent_cleans_up(
        dovecot: DovecotServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd started as root with ``-u nobody``: the metrics port is bound before the drop (a
    privileged one here), the directory is the workers' user's, and it is gone after the stop."""
    if os.geteuid() != 0:
        pytest.fail("this test starts twistd as root, as admins do; run the suite as root (CI does)", pytrace=False)
    import grp
    import pwd
    import shutil
    import tempfile

    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    workdir = Path(tempfile.mkdtemp(prefix="popproxy-metrics-privdrop-"))
    try:
        workdir.chmod(0o755)
        scratch = workdir / "tmp"
        scratch.mkdir()
        scratch.chmod(0o1777)  # like /tmp: anyone may create, only the owner may remove
        monkeypatch.setenv("TMPDIR", str(scratch))
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
        port = free_port()
        web = next(p for p in range(900, 1000) if _bindable(p))
        config = write_config(workdir, port, web, dovecot, workers=2)
        config.chmod(0o644)
        proxy = ProxyProcess(config, [port, web], workdir, extra=("-u", str(uid), "-g", str(gid)), json=True)
        try:
            until(lambda: len([e for e in proxy.events() if e.get("event") == "worker_ready"]) >= 2, "two workers ready", 30)
            (directory,) = scratch.iterdir()
            assert (directory.stat().st_uid, directory.stat().st_mode & 0o777) == (uid, 0o700)
            good_session(port, dovecot)
            found = until(lambda: (f := scrape(web)) and value(f, "popproxy_logins_total", result="ok") == 1 and f,
                          "the login counted")
            assert value(found, "popproxy_workers_ready") == 2
            assert all(path.stat().st_uid == uid for path in directory.iterdir())
        finally:
            proxy.stop(timeout=30)
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
