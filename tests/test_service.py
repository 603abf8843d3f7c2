"""The running service, in memory: listeners, certificate expiry warnings, shutdown."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from popproxy.pki import write_private
from popproxy.service import ProxyService

import support.samplehooks as samplehooks
from support.configs import proxy_config, shared_ca


def test_expiring_certificate_warns_at_start_and_daily(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    soon = write_private(tmp_path / "soon.pem", shared_ca().issue(["localhost"], not_after=now + datetime.timedelta(days=10)).combined_pem)
    later = write_private(tmp_path / "later.pem", shared_ca().issue(["localhost"]).combined_pem)
    config = proxy_config(
        tmp_path,
        listeners=[
            {"endpoint": "tcp:995", "tls": "implicit", "certificate": str(soon)},
            {"endpoint": "tcp:110", "tls": "starttls", "certificate": str(later)},
        ],
    )
    clock = MemoryReactorClock()
    clock.advance(now.timestamp())
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service = ProxyService(config, clock)
        service.startService()
        warnings = [e for e in events if e.get("event") == "certificate_expiring"]
        assert [(w["listener"], w["path"], w["days"]) for w in warnings] == [("listen[0]", str(soon), 9)]
        clock.advance(86400)
        warnings = [e for e in events if e.get("event") == "certificate_expiring"]
        assert [w["days"] for w in warnings] == [9, 8]
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    # Both listeners were bound on the (memory) reactor.
    assert sorted(port for port, *_ in clock.tcpServers) == [110, 995]


def test_session_ticket_keys_are_replaced_when_their_lifetime_is_over(tmp_path: Path) -> None:
    certificate = write_private(tmp_path / "tls.pem", shared_ca().issue(["localhost"]).combined_pem)
    config = proxy_config(
        tmp_path,
        listeners=[
            {"endpoint": "tcp:995", "tls": "implicit", "certificate": str(certificate), "ticket_key_lifetime": 3600},
            {"endpoint": "tcp:110", "tls": "starttls", "certificate": str(certificate), "session_tickets": False},
        ],
    )
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service = ProxyService(config, clock)
        service.startService()
        tickets, no_tickets = service.server_tls["listen[0]"], service.server_tls["listen[1]"]
        clock.advance(3540)
        assert tickets.built_at == 0.0
        for _ in range(2):
            clock.advance(60)  # the check runs every minute
        assert tickets.built_at == 3600.0
        assert no_tickets.built_at == 0.0  # tickets off: nothing to rotate
        assert [e["listener"] for e in events if e.get("event") == "ticket_key_rotated"] == ["listen[0]"]
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_hooks_are_started_by_the_service_with_its_reactor_and_never_by_building(tmp_path: Path) -> None:
    """Building a hook (``--check``, a reload being prepared) does no I/O; the service starts each
    hook that does (``IStartable``) with its own reactor, and a reload starts only the hooks it
    replaced, closing the ones retired."""
    hooks = ('[[hook]]\nuse = "support.samplehooks:starter"\nname = "a"\ntag = "one"\n'
             '[[hook]]\nuse = "support.samplehooks:starter"\nname = "b"\n')
    config = proxy_config(tmp_path, extra=hooks)
    samplehooks.STARTED.clear()
    clock = MemoryReactorClock()
    service = ProxyService(config, clock, handle_signals=False)
    assert samplehooks.STARTED == []
    service.startService()
    assert samplehooks.STARTED == [("a", clock), ("b", clock)]
    config.path.write_text(config.path.read_text().replace('tag = "one"', 'tag = "two"'))
    samplehooks.CLOSED.clear()
    prepared = service.prepare_reload()
    assert not isinstance(prepared, str) and len(samplehooks.STARTED) == 2  # prepared, not started
    closed_before = list(samplehooks.CLOSED)  # (checking the file built and closed hooks too)
    service.commit_reload(prepared)
    assert samplehooks.STARTED[2:] == [("a", clock)]  # b is configured as before: kept, not started again
    # The old a is retired at once (no session used it), and the new b, not needed, is closed.
    assert sorted(samplehooks.CLOSED[len(closed_before):]) == ["a", "b"]
    service.stopService()
