"""The session machine with a routing lookup (nginx's ``auth_http`` answers as inputs) and with a
listener's ``plaintext_from`` legacy devices: event sequences, no I/O."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from test_machine import Harness, retr_answer

from popproxy.config import Address
from popproxy.protocol.effects import CancelLogin, CloseClient, Login, LookUp, Retrieved, SetTimer, Timer, Write
from popproxy.protocol.machine import AUTH_FAILED, TLS_REQUIRED, UPSTREAM_DOWN, State

LOOKUP = '''
[routing.lookup]
url = "http://127.0.0.1:8080/auth"
template = "main"
allowed_upstreams = [{ network = "127.0.0.0/8", ports = [1110] }]
'''


def _asked(h: Harness) -> LookUp:
    [question] = [effect for effect in h.take() if isinstance(effect, LookUp)]
    return question


def test_a_user_without_a_static_route_is_looked_up_and_logged_in_where_the_answer_says(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP)
    h.machine.connected()
    h.machine.client_data(b"USER Alice\r\nPASS pw\r\nSTAT\r\n")
    question = _asked(h)
    assert (question.user, question.password, question.attempt) == ("alice", b"pw", 1)
    assert h.machine.state is State.LOGGING_IN  # STAT waits behind the lookup
    template = h.machine.settings.config.upstreams["main"]
    routed = dataclasses.replace(template, addresses=(Address("127.0.0.5", 1110),))
    h.machine.lookup_routed(routed, "alice@backend", b"rewritten")
    [login] = [effect for effect in h.take() if isinstance(effect, Login)]
    assert (login.user, login.password, login.upstream, login.target, login.login_name) == (
        "alice", b"rewritten", "main", routed, "alice@backend")
    assert h.machine.attempt == ("alice", "main")


def test_a_static_user_entry_wins_over_the_lookup(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP + '[routing.users]\n"bob" = "main"\n')
    h.machine.connected()
    h.machine.client_data(b"USER bob\r\nPASS pw\r\n")
    effects = h.take()
    assert not [effect for effect in effects if isinstance(effect, LookUp)]
    assert [effect.target for effect in effects if isinstance(effect, Login)] == [None]


def test_a_denial_with_auth_wait_answers_after_the_wait_and_the_session_goes_on(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS bad\r\n")
    h.take()
    h.machine.lookup_denied("Invalid login or password", 3.0)
    effects = h.take()
    assert SetTimer(Timer.AUTH_WAIT, 3.0) in effects
    assert not [effect for effect in effects if isinstance(effect, Write)]  # nothing before the wait is over
    h.machine.timer_fired(Timer.AUTH_WAIT)
    assert h.written() == AUTH_FAILED
    assert h.machine.state is State.AUTHORIZATION and h.machine.login_failures == 1
    h.machine.client_data(b"USER alice\r\nPASS good\r\n")
    assert SetTimer(Timer.PENALTY, 1.0) in h.effects  # popproxy's own delay comes first, then the lookup
    h.machine.timer_fired(Timer.PENALTY)
    assert _asked(h).attempt == 2  # nginx's Auth-Login-Attempt counts the connection's logins


def test_a_denial_without_auth_wait_ends_the_session_as_nginx_does(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS bad\r\n")
    h.take()
    h.machine.lookup_denied("Invalid login or password", None)
    effects = h.take()
    assert Write(AUTH_FAILED) in effects and CloseClient("login refused by the lookup") in effects


def test_a_failed_lookup_is_a_temporary_error_not_a_failed_login(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\n")
    h.take()
    h.machine.lookup_failed("timed out after 10 s")
    assert h.written() == UPSTREAM_DOWN
    assert h.machine.state is State.AUTHORIZATION and h.machine.login_failures == 0


def test_an_answer_after_the_client_left_starts_no_login(tmp_path: Path) -> None:
    h = Harness(tmp_path, routing=LOOKUP)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\n")
    h.take()
    h.machine.client_lost()
    assert CancelLogin() in h.take()
    template = h.machine.settings.config.upstreams["main"]
    h.machine.lookup_routed(template, None, None)
    h.machine.lookup_denied("late", 1.0)
    assert not [effect for effect in h.take() if isinstance(effect, (Login, SetTimer, Write))]


def test_retrieved_messages_are_reported_with_the_octets_written(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.log_in()
    h.machine.client_data(b"RETR 1\r\n")
    answer = retr_answer()
    h.machine.upstream_data(answer)
    assert [effect for effect in h.take() if isinstance(effect, Retrieved)] == [Retrieved("RETR", len(answer))]


# -- plaintext_from --------------------------------------------------------------------------------------

STLS_LISTENER = {"endpoint": "tcp:110", "tls": "starttls", "require_tls": True, "plaintext_from": ["192.0.2.1/32"]}


def test_a_listed_legacy_device_may_log_in_without_stls_and_sees_user_in_capa(tmp_path: Path) -> None:
    h = Harness(tmp_path, listener=STLS_LISTENER)  # the harness's client is 192.0.2.1
    h.machine.connected()
    h.take()
    assert h.machine.plaintext_exempt
    h.machine.client_data(b"CAPA\r\n")
    capa = h.written()
    assert b"\r\nUSER\r\n" in capa and b"\r\nSTLS\r\n" in capa
    h.machine.client_data(b"USER alice\r\nPASS pw\r\n")
    assert [effect for effect in h.take() if isinstance(effect, Login)]


def test_any_other_address_still_needs_stls(tmp_path: Path) -> None:
    h = Harness(tmp_path, listener=STLS_LISTENER)
    h.machine.client_host = "192.0.2.2"
    h.machine.connected()
    h.take()
    assert not h.machine.plaintext_exempt
    h.machine.client_data(b"CAPA\r\n")
    assert b"\r\nUSER\r\n" not in h.written()
    h.machine.client_data(b"USER alice\r\n")
    assert h.written() == TLS_REQUIRED


def test_after_stls_a_legacy_device_is_no_exception_any_more(tmp_path: Path) -> None:
    h = Harness(tmp_path, listener=STLS_LISTENER)
    h.machine.connected()
    h.machine.client_data(b"STLS\r\n")
    h.machine.client_tls_ready()
    assert not h.machine.plaintext_exempt  # its logins are not marked: they went over TLS
