"""Issue 12: one ``build`` for ``--check``, start and reload; listeners known by their normalised
endpoint (finding 1, in memory); duplicate addresses refused without binding (finding 3, ``--check``).
The twistd-level regression tests are in test_reload_listeners.py, test_bind_errors.py and
test_key_access.py."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol

from popproxy import tap
from popproxy.build import build, normalise_endpoint, pair_listeners, reload_refusal
from popproxy.config import ConfigError, load_config
from popproxy.protocol.client import ClientProtocol
from popproxy.service import ProxyService

from support.configs import write_certificate

ROOT = Path(__file__).resolve().parent.parent


# --- normal forms: what popproxy relies on in Twisted's endpoint parser ---------------------------------


@pytest.mark.parametrize(
    "same",
    [
        ["tcp:110", "tcp:port=110", "tcp:110:interface=0.0.0.0", "tcp:interface=0.0.0.0:port=110", "tcp:110:interface=",
         "tcp:110:backlog=50"],
        ["tcp:110:interface=127.0.0.1", "tcp:port=110:interface=127.0.0.1"],
        ["tcp6:995", "tcp6:port=995", "tcp6:995:interface=\\:\\:", "tcp6:995:interface=0\\:0\\:\\:0"],
        ["tcp6:995:interface=\\:\\:1", "tcp6:995:interface=0\\:0\\:0\\:0\\:0\\:0\\:0\\:1"],
        ["unix:/run/popproxy/pop3.sock", "unix:/run/popproxy/./x/../pop3.sock", "unix:address=/run/popproxy/pop3.sock",
         "unix:/run/popproxy/pop3.sock:mode=666:lockfile=1"],
        ["systemd:domain=INET:index=0", "systemd:INET:index=0", "systemd:domain=inet:index=00"],
        ["haproxy:tcp:110", "haproxy:tcp:port=110:interface=0.0.0.0"],
    ],
)
def test_endpoint_strings_twisted_listens_with_identically_are_one_endpoint(same: list[str]) -> None:
    forms = {normalise_endpoint(text) for text in same}
    assert len(forms) == 1, forms
    # The canonical string is itself an endpoint string of the same endpoint.
    (form,) = forms
    assert normalise_endpoint(str(form)) == form


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("tcp:110", "tcp:111"),
        ("tcp:110", "tcp:110:interface=127.0.0.1"),
        ("tcp:110", "haproxy:tcp:110"),  # the PROXY header reader is part of the listener
        ("tcp:110", "tcp:110:backlog=10"),  # a new socket: a change of endpoint
        ("unix:/run/a.sock", "unix:/run/a.sock:mode=660"),
        ("tcp:110", "tcp6:110"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=1"),
    ],
)
def test_different_endpoints_stay_different(one: str, other: str) -> None:
    assert normalise_endpoint(one) != normalise_endpoint(other)


@pytest.mark.parametrize(
    ("one", "other", "overlap"),
    [
        ("tcp:110", "tcp:port=110", True),
        ("tcp:110", "tcp:110:interface=127.0.0.1", True),  # 0.0.0.0 covers every IPv4 address
        ("tcp:110:interface=127.0.0.1", "tcp:110:interface=127.0.0.2", False),
        ("tcp6:110", "tcp:110:interface=127.0.0.1", True),  # :: is dual-stack by default (ipv6(7))
        ("tcp6:110:interface=\\:\\:1", "tcp:110:interface=127.0.0.1", False),
        ("tcp6:110:interface=\\:\\:ffff\\:127.0.0.1", "tcp:110:interface=127.0.0.1", True),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1", False),  # any free port: never the same
        ("haproxy:tcp:110", "tcp:110", True),
        ("tcp:110:backlog=5", "tcp:110", True),
        ("unix:/run/a.sock", "unix:/run/./a.sock:mode=600", True),
        ("tcp:110", "tcp:995", False),
    ],
)
def test_addresses_that_cannot_both_listen_overlap(one: str, other: str, overlap: bool) -> None:
    a, b = normalise_endpoint(one).address, normalise_endpoint(other).address
    assert a.overlaps(b) is overlap and b.overlaps(a) is overlap


@pytest.mark.parametrize("text", ["tcp:bogus", "tcp:110:colour=blue", "systemd:domain=INET", "bogus:1", "tcp6:port=x"])
def test_endpoints_that_do_not_parse_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        normalise_endpoint(text)


# --- --check: duplicates found without binding -----------------------------------------------------------


def _write(folder: Path, listeners: list[tuple[str, str]], extra: str = "") -> Path:
    certificate = write_certificate(folder)
    parts = []
    for endpoint, tls in listeners:
        parts.append(f'[[listen]]\nendpoint = "{endpoint}"\ntls = "{tls}"\n'
                     + (f'certificate = "{certificate}"\n' if tls != "none" else ""))
    parts.append('[upstream.main]\naddress = "127.0.0.1:1110"\ntls = "none"\n[routing]\ndefault = "main"\n')
    path = folder / "popproxy.toml"
    path.write_text("".join(parts) + extra)
    return path


@pytest.mark.parametrize(
    ("listeners", "extra", "key", "words"),
    [
        ([("tcp:110", "none"), ("tcp:port=110", "none")], "", "listen[1].endpoint", "both listen on 0.0.0.0:110"),
        ([("tcp:110", "none"), ("tcp:110:interface=127.0.0.1", "implicit")], "", "listen[1].endpoint", "overlap"),
        ([("tcp:110", "none"), ("haproxy:tcp:port=110", "none")], "", "listen[1].endpoint", "listen[0]"),
        ([("tcp:110:interface=127.0.0.1", "none")], '[metrics]\nendpoint = "tcp:port=110:interface=127.0.0.1"\n',
         "metrics.endpoint", "both listen on 127.0.0.1:110"),
    ],
)
def test_check_refuses_two_listeners_on_one_address(tmp_path: Path, listeners: list[tuple[str, str]], extra: str,
                                                     key: str, words: str) -> None:
    """Finding 3: ``tcp:110`` and ``tcp:port=110`` both passed --check (and the metrics endpoint could
    take a listener's port); the start then failed with a traceback."""
    path = _write(tmp_path, listeners, extra)
    with pytest.raises(ConfigError) as raised:
        tap.validated_config(str(path))
    assert raised.value.key == key and words in raised.value.reason, raised.value


def test_check_binds_nothing(tmp_path: Path) -> None:
    """The running instance holds the ports: --check of its own file must pass."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _write(tmp_path, [(f"tcp:{port}:interface=127.0.0.1", "starttls")])
        assert tap.validated_config(str(path)).listeners[0].endpoint.startswith(f"tcp:{port}")


# --- one build for --check, start and reload ---------------------------------------------------------------


def test_tap_and_service_no_longer_import_each_other() -> None:
    """``service`` imports neither ``tap`` (nor ``workers``/``worker`` do): reloads use ``build``."""
    for module in ("service", "workers", "worker"):
        tree = ast.parse((ROOT / "popproxy" / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "tap" not in imported and "build" in imported, (module, imported)


def test_the_service_runs_what_was_built(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, [("tcp:110", "starttls"), ("tcp:995", "implicit")]))
    built = build(config, MemoryReactorClock())
    service = ProxyService(config, MemoryReactorClock(), handle_signals=False, built=built)
    assert service.hooks is built.hooks
    assert service.server_tls == built.server_tls and set(built.server_tls) == {"listen[0]", "listen[1]"}


# --- reloads: listeners by endpoint (finding 1, in memory) -------------------------------------------------


def _listening(clock: MemoryReactorClock, port: int) -> Any:
    return next(factory for number, factory, *_ in clock.tcpServers if number == port)


def _session_for(service: ProxyService, clock: MemoryReactorClock, port: int) -> tuple[bool, ClientProtocol]:
    """(whether the connection is wrapped in TLS, its session) for a connection to ``port``: what
    the listening socket builds (the session is never connected, and forgotten at once)."""
    protocol = _listening(clock, port).buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    session = protocol.wrappedProtocol if isinstance(protocol, TLSMemoryBIOProtocol) else protocol
    assert isinstance(session, ClientProtocol)
    for factory in service.factories:
        factory.sessions.discard(session)
    return isinstance(protocol, TLSMemoryBIOProtocol), session


def test_reordered_listen_tables_keep_each_port_its_own_settings(tmp_path: Path) -> None:
    """Finding 1: a reload matched listeners by position, so after reordering the tables the STLS
    port took the implicit listener's settings (USER answered before STLS) and the implicit port the
    STLS one's (logins refused inside TLS)."""
    path = _write(tmp_path, [("tcp:110", "starttls"), ("tcp:995", "implicit")])
    clock = MemoryReactorClock()
    service = ProxyService(load_config(path), clock, handle_signals=False)
    service.startService()
    path.write_text(_write(tmp_path, [("tcp:port=995", "implicit"), ("tcp:110:interface=0.0.0.0", "starttls")])
                    .read_text().replace('tls = "starttls"\n', 'tls = "starttls"\nrequire_tls = true\n'))
    assert service.reload() is True
    tls, stls = _session_for(service, clock, 110)
    assert not tls and stls.settings.listener.tls == "starttls" and stls.settings.listener.require_tls
    assert stls.settings.listener.key == "listen[1]" and stls.settings.server_tls is service.server_tls["listen[1]"]
    tls, implicit = _session_for(service, clock, 995)
    assert tls and implicit.settings.listener.tls == "implicit" and implicit.settings.listener.key == "listen[0]"
    service.stopService()


def test_a_reload_switches_a_live_port_between_starttls_implicit_and_none(tmp_path: Path) -> None:
    path = _write(tmp_path, [("tcp:110", "starttls"), ("tcp:995", "implicit")])
    clock = MemoryReactorClock()
    service = ProxyService(load_config(path), clock, handle_signals=False)
    service.startService()
    assert [_session_for(service, clock, port)[0] for port in (110, 995)] == [False, True]
    _write(tmp_path, [("tcp:110", "implicit"), ("tcp:995", "none")])
    assert service.reload() is True
    (on_110, session_110), (on_995, session_995) = _session_for(service, clock, 110), _session_for(service, clock, 995)
    assert on_110 and session_110.settings.listener.tls == "implicit" and session_110.settings.server_tls is not None
    assert not on_995 and session_995.settings.server_tls is None  # no STLS offered either
    _write(tmp_path, [("tcp:110", "starttls"), ("tcp:995", "starttls")])
    assert service.reload() is True
    assert [_session_for(service, clock, port)[0] for port in (110, 995)] == [False, False]
    assert all(_session_for(service, clock, port)[1].settings.server_tls is not None for port in (110, 995))
    service.stopService()


@pytest.mark.parametrize(
    ("after", "words"),
    [
        ([("tcp:110", "starttls"), ("tcp:995", "implicit"), ("tcp:996", "implicit")], "listen[2] ('tcp:996') is new"),
        ([("tcp:110", "starttls")], "'tcp:995' (listen[1] of the running configuration) is gone"),
        ([("tcp:110", "starttls"), ("tcp:995:interface=127.0.0.1", "implicit")], "is new"),
        ([("haproxy:tcp:110", "starttls"), ("tcp:995", "implicit")], "haproxy:tcp:110"),
    ],
)
def test_a_reload_that_adds_removes_or_changes_an_endpoint_is_refused_whole(
        tmp_path: Path, after: list[tuple[str, str]], words: str) -> None:
    path = _write(tmp_path, [("tcp:110", "starttls"), ("tcp:995", "implicit")])
    clock = MemoryReactorClock()
    service = ProxyService(load_config(path), clock, handle_signals=False)
    running = service.config
    service.startService()
    text = _write(tmp_path, after).read_text()
    path.write_text(text.replace('default = "main"', 'default = "other"')
                    + '[upstream.other]\naddress = "127.0.0.1:1111"\ntls = "none"\n')
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert service.reload() is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    failed = [e for e in events if e.get("event") == "reload_failed"]
    assert len(failed) == 1 and words in failed[0]["error"] and "needs a restart" in failed[0]["error"], failed
    assert not [e for e in events if e.get("event") == "reloaded"]
    assert service.config is running  # nothing changed, the routing included
    assert _session_for(service, clock, 110)[1].settings.config.routing.default == "main"
    service.stopService()


def test_pairs_follow_endpoints_and_port_zero_pairs_in_order(tmp_path: Path) -> None:
    one = load_config(_write(tmp_path, [("tcp:0:interface=127.0.0.1", "none"), ("tcp:110", "starttls"),
                                        ("tcp:0:interface=127.0.0.1", "implicit")]))
    two = load_config(_write(tmp_path, [("tcp:port=110", "starttls"), ("tcp:0:interface=127.0.0.1", "implicit"),
                                        ("tcp:0:interface=127.0.0.1", "none")]))
    pairs = pair_listeners(one.listeners, two.listeners)
    assert pairs is not None
    assert [(old.key, new.key) for old, new in pairs] == [("listen[0]", "listen[1]"), ("listen[1]", "listen[0]"),
                                                          ("listen[2]", "listen[2]")]
    assert reload_refusal(one, two) is None


def test_a_metrics_endpoint_spelt_differently_is_not_a_change(tmp_path: Path) -> None:
    one = load_config(_write(tmp_path, [("tcp:110", "none")], '[metrics]\nendpoint = "tcp:9110:interface=127.0.0.1"\n'))
    two = load_config(_write(tmp_path, [("tcp:port=110", "none")],
                             '[metrics]\nendpoint = "tcp:port=9110:interface=127.0.0.1"\n'))
    assert reload_refusal(one, two) is None
    three = load_config(_write(tmp_path, [("tcp:110", "none")]))
    assert "metrics.endpoint: changed from" in str(reload_refusal(one, three))
