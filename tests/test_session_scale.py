"""The session glue with the pieces that run popproxy at scale, in memory: a routing lookup's answers
(an in-memory stand-in for the HTTP service), the metrics a session reports, and a listener's
``plaintext_from``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from popproxy.config import Address
from popproxy.lookup import Denied, IRouteLookup, LookupAnswer, LookupFailed, LookupQuery, Routed
from popproxy.metrics import PrometheusMetrics
from popproxy.testing import MemoryProxy

from support.configs import proxy_config

MESSAGES = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n" + b"second line\r\n" * 20]
LOOKUP = '''
[routing.lookup]
url = "http://127.0.0.1:8080/auth"
template = "main"
allowed_upstreams = [{ network = "127.0.0.0/8", ports = [1110, 2110] }]
'''
UPSTREAMS = {"main": {"address": "127.0.0.1:1110", "tls": "none"}, "second": {"address": "127.0.0.1:2110", "tls": "none"}}


@implementer(IRouteLookup)
class ScriptedLookup:
    """Answers from a table by user, and remembers what it was asked."""

    def __init__(self, answers: dict[str, LookupAnswer]) -> None:
        self.answers = answers
        self.queries: list[LookupQuery] = []

    def lookup(self, query: LookupQuery) -> Deferred[LookupAnswer]:
        self.queries.append(query)
        return succeed(self.answers[query.user])


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_looked_up_user_goes_to_the_address_answered_with_the_rewritten_name(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, upstreams=UPSTREAMS, routing=LOOKUP)
    routed = dataclasses.replace(config.upstreams["main"], addresses=(Address("127.0.0.1", 2110),))
    lookup = ScriptedLookup({
        "alice": Routed(routed, "alice@backend", None, cached=False),
        "mallory": Denied("Invalid login or password", 2.0, cached=False),
        "trudy": LookupFailed("timed out"),
    })
    registry = CollectorRegistry()
    proxy = MemoryProxy(config, lookup=lookup, metrics=PrometheusMetrics(registry))
    proxy.upstreams["second"].add_user("alice@backend", "alice-pw", MESSAGES)
    client, _ = proxy.connect("192.0.2.9")
    client.take()  # the greeting
    assert proxy.say(client, b"USER Alice\r\nPASS alice-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    assert [(q.user, q.password, q.client_host, q.attempt) for q in lookup.queries] == [
        ("alice", b"alice-pw", "192.0.2.9", 1)]
    answer = proxy.say(client, b"RETR 2\r\nQUIT\r\n")
    assert answer.startswith(b"+OK") and b"second line" in answer
    assert _value(registry, "popproxy_lookups_total", result="miss") == 1
    assert _value(registry, "popproxy_logins_total", result="ok", plaintext="false") == 1
    assert _value(registry, "popproxy_retrieved_messages_total", command="RETR") == 1
    retr = answer[: answer.index(b".\r\n") + 3]
    assert _value(registry, "popproxy_retrieved_bytes_total", command="RETR") == len(retr)

    denied, _ = proxy.connect("192.0.2.10")
    denied.take()  # the greeting
    assert proxy.say(denied, b"USER mallory\r\nPASS guess\r\n") == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
    assert not denied.lost  # Auth-Wait: the session goes on, as with nginx
    failed, _ = proxy.connect("192.0.2.11")
    failed.take()  # the greeting
    assert proxy.say(failed, b"USER trudy\r\nPASS pw\r\n").endswith(b"-ERR [SYS/TEMP] Mail server unavailable, try again later.\r\n")
    assert _value(registry, "popproxy_lookups_total", result="denied") == 1
    assert _value(registry, "popproxy_lookups_total", result="failed") == 1
    assert _value(registry, "popproxy_logins_total", result="refused", plaintext="false") == 1
    assert _value(registry, "popproxy_logins_total", result="unavailable", plaintext="false") == 1


def test_session_metrics_open_close_and_limits(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, extra="[limits]\nmax_sessions_per_ip = 1\n")
    registry = CollectorRegistry()
    proxy = MemoryProxy(config, metrics=PrometheusMetrics(registry))
    proxy.upstreams["main"].add_user("bob", "bob-pw", MESSAGES)
    first, _ = proxy.connect("192.0.2.1")
    first.take()  # the greeting
    assert _value(registry, "popproxy_sessions_open", listener="listen[0]") == 1
    second, _ = proxy.connect("192.0.2.1", port=50001)
    second.take()  # the greeting
    assert second.lost and _value(registry, "popproxy_limit_hits_total", limit="max_sessions_per_ip") == 1
    assert proxy.say(first, b"USER bob\r\nPASS bob-pw\r\nQUIT\r\n").endswith(b"+OK Bye\r\n")
    proxy.settle()
    assert _value(registry, "popproxy_sessions_open", listener="listen[0]") == 0
    assert _value(registry, "popproxy_sessions_total", listener="listen[0]", ended="quit", authenticated="true") == 1
    received = len(b"USER bob\r\nPASS bob-pw\r\nQUIT\r\n")
    assert _value(registry, "popproxy_transferred_bytes_total", direction="from_client") == received
    assert _value(registry, "popproxy_transferred_bytes_total", direction="to_upstream") > 0


def test_a_legacy_device_logs_in_without_stls_and_is_marked(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, listeners=[{"endpoint": "tcp:110", "tls": "starttls",
                                                "plaintext_from": ["192.0.2.10/32"]}])
    registry = CollectorRegistry()
    proxy = MemoryProxy(config, metrics=PrometheusMetrics(registry))
    proxy.upstreams["main"].add_user("scanner", "scan-pw", MESSAGES)
    legacy, _ = proxy.connect("192.0.2.10")
    legacy.take()  # the greeting
    assert proxy.say(legacy, b"USER scanner\r\nPASS scan-pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    other, _ = proxy.connect("192.0.2.11")
    other.take()  # the greeting
    assert proxy.say(other, b"USER scanner\r\n").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    assert _value(registry, "popproxy_logins_total", result="ok", plaintext="true") == 1
