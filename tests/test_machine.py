"""The session machine by event sequences: inputs in, effects out, no Twisted, no sockets, no time.

Each test drives ``SessionMachine`` directly and asserts the effects it asked for, in order (the
way magic-wormhole tests its machines). The generated-sequence tests at the end check the safety
invariants for any input: answers in command order, nothing upstream before login, only canonical
message numbers upstream, and no DELE or QUIT upstream after a hang-up while a RETR or TOP answer
was not completely delivered.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.hooks.registry import build_hooks
from popproxy.pop3.wire import stuff_body
from popproxy.protocol.client import hook_plan
from popproxy.protocol.effects import (
    AbortClient,
    AbortUpstream,
    AskPenalty,
    AskUserSlot,
    CancelLogin,
    CancelTimer,
    CloseClient,
    CloseUpstream,
    Effect,
    Hold,
    Log,
    Login,
    PauseReading,
    RecordFailure,
    ReleaseUser,
    ResumeReading,
    RunHooks,
    Send,
    SetTimer,
    StartTLS,
    Timer,
    Write,
)
from popproxy.protocol.guard import Guard
from popproxy.protocol.interfaces import Leg
from popproxy.protocol.machine import (
    MachineSettings,
    SessionMachine,
    State,
)
from popproxy.protocol.mailbox import MessageCache

from support.configs import proxy_config

MESSAGE = b"Subject: hello\r\n\r\n" + b"line of text\r\n" * 50


class Now:
    """The machine's clock, and the guard's (``seconds``)."""

    def __init__(self) -> None:
        self.value = 1000.0

    def seconds(self) -> float:
        return self.value


class Harness:
    """A machine whose effects are recorded; ``on_write`` lets a test act like a transport that
    pauses its producer in the middle of a write."""

    def __init__(self, tmp_path: Path, limits: str = "", listener: dict[str, object] | None = None,
                 hooks: str = "", routing: str = 'default = "main"', guard_answers_later: bool = False) -> None:
        config = proxy_config(tmp_path, listeners=[listener or {"endpoint": "tcp:110", "tls": "none"}],
                              extra="[limits]\n" + limits + "\n" + hooks, routing=routing)
        self.now = Now()
        self.guard = Guard(config.limits, self.now)  # type: ignore[arg-type]
        #: like a guard in another process (``workers`` > 1): questions wait here for the test to answer
        self.later = guard_answers_later
        self.questions: list[AskPenalty | AskUserSlot] = []
        self.effects: list[Effect] = []
        self.sends: list[bytes] = []  # every line sent upstream, in order
        self.writes = bytearray()  # everything written to the client
        self.on_write: Callable[[Write], None] | None = None
        built = build_hooks(config)
        self.machine = SessionMachine(
            MachineSettings(listener=config.listeners[0], config=config, stls_available=True, now=self.now.seconds,
                            plan=hook_plan(built), cache=MessageCache(config.limits.message_cache)),
            self._record,
            client_host="192.0.2.1",
        )

    def _record(self, effect: Effect) -> None:
        # The guard answers at once, as it does in one process (nested inputs, like the glue's).
        if self.later and isinstance(effect, (AskPenalty, AskUserSlot)):
            self.questions.append(effect)
        elif isinstance(effect, AskPenalty):
            self.machine.penalty_known(self.guard.failure_delay(effect.host, effect.failures))
        elif isinstance(effect, AskUserSlot):
            self.machine.user_slot(self.guard.user_admit(effect.user))
        elif isinstance(effect, RecordFailure):
            self.guard.login_failed(effect.host)
        elif isinstance(effect, ReleaseUser):
            self.guard.user_left(effect.user)
        self.effects.append(effect)
        if isinstance(effect, Send):
            self.sends.append(effect.line)
        if isinstance(effect, Write):
            self.writes += effect.data
            if self.on_write is not None:
                self.on_write(effect)

    def take(self) -> list[Effect]:
        """The effects since the last call, logs left out."""
        effects, self.effects = self.effects, []
        return [effect for effect in effects if not isinstance(effect, (Log, AskPenalty, AskUserSlot, RecordFailure, ReleaseUser))]

    def written(self) -> bytes:
        data = b"".join(effect.data for effect in self.effects if isinstance(effect, Write))
        self.effects = [effect for effect in self.effects if not isinstance(effect, Write)]
        return data

    def sent(self) -> list[bytes]:
        return [effect.line for effect in self.effects if isinstance(effect, Send)]

    def log_in(self, capabilities: tuple[bytes, ...] = (b"PIPELINING", b"TOP", b"UIDL"),
               listing: tuple[dict[int, int], dict[int, str]] | None = None) -> None:
        m = self.machine
        m.connected()
        m.client_data(b"USER alice\r\nPASS pw\r\n")
        assert any(isinstance(effect, Login) for effect in self.effects)
        m.upstream_attached(list(capabilities))
        m.logged_in(listing)
        assert m.state is State.TRANSACTION
        self.take()


def retr_answer(message: bytes = MESSAGE) -> bytes:
    return b"+OK %d octets\r\n" % len(message) + stuff_body(message)


# -- AUTHORIZATION --------------------------------------------------------------------------------------

def test_greeting_sets_the_login_timer_and_nothing_goes_upstream(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.machine.connected()
    assert h.take() == [SetTimer(Timer.SESSION, 60.0), Write(b"+OK POP3 proxy ready.\r\n")]
    h.machine.client_data(b"CAPA\r\nNOOP\r\nSTAT\r\n")
    effects = h.take()
    assert not any(isinstance(effect, (Send, Login)) for effect in effects)
    assert effects[-1] == Write(b"-ERR Unknown command or not allowed before login.\r\n")


def test_login_uses_the_normalised_identity(tmp_path: Path) -> None:
    """One identity per session (``user_case = "lower"``): routing, limits, hooks and logs all see
    ``user177`` however the client typed it."""
    h = Harness(tmp_path, routing='default = "main"\n[routing.users]\n"user177" = "main"')
    h.machine.connected()
    h.machine.client_data(b"USER USER177\r\nPASS pw\r\n")
    logins = [effect for effect in h.take() if isinstance(effect, Login)]
    assert logins == [Login("user177", b"pw", "main", listing=False)]
    assert h.machine.attempt == ("user177", "main")


def test_user_with_nul_bare_cr_or_non_utf8_is_refused_at_user(tmp_path: Path) -> None:
    h = Harness(tmp_path, "max_bad_commands = 3\n")
    h.machine.connected()
    h.take()
    h.machine.client_data(b"USER a\x00b\r\nUSER a\rb\r\nUSER \xff\xfe\r\n")
    assert h.written() == b"-ERR [AUTH] Invalid user name.\r\n" * 3 + b"-ERR Too many bad commands, goodbye.\r\n"
    assert CloseClient("too many bad commands") in h.take()


def test_latin1_password_is_passed_on_as_it_is(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS p\xe4ss\r\n")
    assert Login("alice", b"p\xe4ss", "main", listing=False) in h.take()


def test_bare_auth_lists_plain_only_where_a_login_is_allowed(tmp_path: Path) -> None:
    h = Harness(tmp_path, listener={"endpoint": "tcp:110", "tls": "starttls", "require_tls": True})
    h.machine.connected()
    h.take()
    h.machine.client_data(b"AUTH\r\n")
    assert h.written() == b"+OK Mechanisms follow\r\n.\r\n"
    h.machine.client_data(b"STLS\r\nCAPA\r\n")  # the CAPA is pipelined in plain text: discarded
    assert [e for e in h.take() if not isinstance(e, SetTimer)] == [Write(b"+OK Begin TLS negotiation.\r\n"), StartTLS()]
    h.machine.client_tls_ready()
    h.take()
    h.machine.client_data(b"AUTH\r\n")
    assert h.written() == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_penalty_is_paid_before_the_upstream_is_asked(tmp_path: Path) -> None:
    h = Harness(tmp_path, "login_failure_delay = 2.0\n")
    h.guard.login_failed("192.0.2.1")
    h.machine.connected()
    h.take()
    h.machine.client_data(b"USER alice\r\nPASS right\r\n")
    assert h.take() == [Write(b"+OK\r\n"), SetTimer(Timer.PENALTY, 2.0)]
    assert Hold.LOGIN in h.machine.holds[Leg.CLIENT]
    h.machine.timer_fired(Timer.PENALTY)
    assert h.take() == [Login("alice", b"right", "main", listing=False)]


def test_a_guard_in_another_process_answers_later_and_the_session_waits(tmp_path: Path) -> None:
    """With workers the guard is the parent's: the machine asks, holds the client's commands, and
    goes on with the answers, which come as inputs of their own."""
    h = Harness(tmp_path, "login_failure_delay = 2.0\n", guard_answers_later=True)
    h.machine.connected()
    h.take()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\nSTAT\r\n")
    assert h.questions == [AskPenalty("192.0.2.1", 0)]
    assert not any(isinstance(effect, Login) for effect in h.take())  # nothing before the answer
    h.machine.penalty_known(2.0)
    assert h.take() == [SetTimer(Timer.PENALTY, 2.0)]
    h.machine.timer_fired(Timer.PENALTY)
    assert h.take() == [Login("alice", b"pw", "main", listing=False)]
    h.machine.upstream_attached([b"PIPELINING"])
    h.machine.logged_in(None)
    assert h.questions[-1] == AskUserSlot("alice")
    assert h.machine.state is State.LOGGING_IN and Hold.LOGIN in h.machine.holds[Leg.CLIENT]
    assert not h.sent() and b"Logged in" not in h.written()  # STAT waits for the slot
    h.machine.user_slot(True)
    assert h.written() == b"+OK Logged in.\r\n"
    assert h.sent() == [b"STAT\r\n"]
    h.machine.client_lost()
    assert ReleaseUser("alice") in h.effects


def waiting_for_a_slot(tmp_path: Path) -> Harness:
    """A login that landed upstream; the guard (elsewhere) has not said yet whether alice may have
    one more session."""
    h = Harness(tmp_path, guard_answers_later=True)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\n")
    h.machine.penalty_known(0.0)
    h.machine.upstream_attached([])
    h.machine.logged_in(None)
    assert h.questions[-1] == AskUserSlot("alice")
    return h


def test_a_refused_slot_answers_in_use_and_a_late_slot_after_a_hang_up_is_given_back(tmp_path: Path) -> None:
    h = waiting_for_a_slot(tmp_path)
    h.take()
    h.machine.user_slot(False)
    effects = h.take()
    assert AbortUpstream("too many sessions for user") in effects
    assert Write(b"-ERR [IN-USE] Too many sessions for this user.\r\n") in effects

    late = waiting_for_a_slot(tmp_path)
    late.machine.client_lost()  # gone while the parent was asked
    late.take()
    late.machine.user_slot(True)
    effects = late.effects
    assert ReleaseUser("alice") in effects and AbortUpstream("client gone") in effects
    assert late.machine.state is State.CLOSED


def test_a_penalty_answer_after_a_hang_up_starts_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, guard_answers_later=True)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\n")
    h.machine.client_lost()
    h.take()
    h.machine.penalty_known(0.0)
    assert not any(isinstance(effect, (Login, SetTimer)) for effect in h.take())


def test_hang_up_during_the_penalty_cancels_the_login(tmp_path: Path) -> None:
    h = Harness(tmp_path, "login_failure_delay = 2.0\n")
    h.guard.login_failed("192.0.2.1")
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS right\r\n")
    h.take()
    h.machine.client_lost()
    assert h.take() == [CancelLogin()]
    h.machine.timer_fired(Timer.PENALTY)
    assert h.take() == []


def test_commands_wait_for_the_login_and_follow_its_answer(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\nSTAT\r\n")
    h.take()
    assert h.sent() == []
    h.machine.upstream_attached([b"PIPELINING"])
    h.machine.logged_in(None)
    effects = h.take()
    assert effects.index(Write(b"+OK Logged in.\r\n")) < effects.index(Send(b"STAT\r\n"))


# -- flow control ---------------------------------------------------------------------------------------

def test_local_answers_stop_when_the_client_write_buffer_is_full(tmp_path: Path) -> None:
    """Finding 1: a client that floods CAPA and never reads. The transport pauses its producer in
    the middle of a write; the machine handles no further command, and pauses the socket once the
    unhandled input passes max_buffered."""
    h = Harness(tmp_path, "max_buffered = 4096\n")
    buffered = [0]  # what the transport holds, like Twisted's FileDescriptor (bufferSize 64 KiB)

    def transport(effect: Write) -> None:
        buffered[0] += len(effect.data)
        if buffered[0] > 65536 and Hold.CLIENT_OUTPUT not in h.machine.holds[Leg.CLIENT]:
            h.machine.output_blocked(Leg.CLIENT, True)

    h.on_write = transport
    h.machine.connected()
    fed = 0
    while not h.machine.paused[Leg.CLIENT] and fed < 3_000_000:  # a socket is read until paused
        h.machine.client_data(b"CAPA\r\n" * 1000)
        fed += 6000
    capa_answer = len(h.written().split(b"+OK POP3 proxy ready.\r\n")[1].split(b".\r\n")[0]) + 3
    assert 65536 < buffered[0] <= 65536 + capa_answer
    assert h.machine.paused[Leg.CLIENT]
    assert 4096 < len(h.machine._lines) <= 4096 + 6000  # max_buffered + one read
    buffered[0] = 0
    h.machine.output_blocked(Leg.CLIENT, False)  # the client read everything
    assert buffered[0] > 65536  # handling went on until the buffer filled again
    assert Hold.CLIENT_OUTPUT in h.machine.holds[Leg.CLIENT]


def test_local_answers_count_against_max_pipelined(tmp_path: Path) -> None:
    h = Harness(tmp_path, "max_pipelined = 4\nmax_bad_commands = 100\n")
    h.log_in()
    h.machine.client_data(b"RETR 1\r\n" + b"XYZZY\r\n" * 10)
    assert h.sent() == [b"RETR 1\r\n"]
    assert Hold.PIPELINE in h.machine.holds[Leg.CLIENT]
    assert h.machine._bad_commands == 3  # RETR + 3 local answers owed: the rest waits
    h.effects.clear()
    h.machine.upstream_data(retr_answer())
    assert h.written().startswith(retr_answer() + b"-ERR Unknown command.\r\n" * 3)
    assert h.machine._bad_commands == 10


def test_cached_answers_are_made_only_when_due_and_stop_at_a_full_buffer(tmp_path: Path) -> None:
    """Finding 1 (after login): TOP n 0 caches a processed message; hundreds of pipelined RETR n
    would each be a copy of it. Only one is written while the client's buffer is full."""
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nmax_size = 1048576\n'
    h = Harness(tmp_path, "max_pipelined = 1000\n", hooks=hooks)
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 1000
    h.log_in(listing=({1: len(big)}, {1: "u1"}))
    h.machine.client_data(b"TOP 1 0\r\n")
    assert h.sent() == [b"TOP 1 99999999\r\n"]
    h.machine.upstream_data(b"+OK\r\n" + stuff_body(big))
    run = next(effect for effect in h.take() if isinstance(effect, RunHooks))
    h.machine.hooks_done(run.ticket, b"X-Tag: yes\r\n" + big, (), [])
    h.take()
    writes = []

    def transport(effect: Write) -> None:
        writes.append(effect)
        h.machine.output_blocked(Leg.CLIENT, True)  # every answer fills the buffer

    h.on_write = transport
    h.machine.client_data(b"RETR 1\r\n" * 300)
    assert len(writes) == 1 and writes[0].data.startswith(b"+OK %d octets" % (len(big) + h.machine.mailbox.extra(1)))
    assert h.sent() == []


def test_upstream_socket_paused_while_a_hook_works_and_answers_queue(tmp_path: Path) -> None:
    """Finding 2: with a hook at work, later answers wait, and the upstream socket is paused once
    max_buffered of them is queued (a paused reader is no pause)."""
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nmax_size = 4096\n'
    h = Harness(tmp_path, "max_buffered = 65536\n", hooks=hooks)
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 200
    h.log_in(listing=({1: len(MESSAGE), 2: len(big)}, {}))
    h.machine.client_data(b"RETR 1\r\nRETR 2\r\n")
    assert h.sent() == [b"RETR 1\r\n", b"RETR 2\r\n"]
    h.machine.upstream_data(retr_answer())
    assert any(isinstance(effect, RunHooks) for effect in h.take())
    assert Hold.HOOK in h.machine.holds[Leg.UPSTREAM]
    answer = retr_answer(big)
    for start in range(0, len(answer), 16384):
        h.machine.upstream_data(answer[start : start + 16384])
    effects = h.take()
    assert not any(isinstance(effect, Write) for effect in effects)  # nothing out of order
    assert effects.count(PauseReading(Leg.UPSTREAM)) == 1
    run_ticket = h.machine._tickets
    h.machine.hooks_done(run_ticket, b"X-Tag: yes\r\n" + MESSAGE, (), [])
    out = h.written()
    assert out.endswith(answer) and out.startswith(b"+OK ")
    assert ResumeReading(Leg.UPSTREAM) in h.take()


def test_no_pause_of_the_client_socket_during_its_tls_handshake(tmp_path: Path) -> None:
    h = Harness(tmp_path, listener={"endpoint": "tcp:995", "tls": "implicit"})
    h.machine.connected()
    h.machine.output_blocked(Leg.UPSTREAM, True)  # would pause the client socket...
    assert PauseReading(Leg.CLIENT) not in h.take()  # ...but not during the handshake
    h.machine.client_tls_ready()
    assert PauseReading(Leg.CLIENT) in h.take()


# -- message numbers ------------------------------------------------------------------------------------

def test_only_canonical_message_numbers_go_upstream(tmp_path: Path) -> None:
    """Finding 6: anything but 1-10 digits without sign or leading zero is a local -ERR."""
    h = Harness(tmp_path, "max_bad_commands = 1000\n")
    h.log_in()
    bad = [b"RETR 1_0", b"RETR 1abc", b"RETR 01", b"RETR +1", b"RETR -1", b"RETR 0", b"RETR 12345678901",
           b"RETR  1", b"RETR 1 ", b"RETR 1 2", b"RETR", b"DELE 03", b"LIST 1x", b"UIDL 0", b"TOP 1", b"TOP 1 01",
           b"TOP 1 -1", b"TOP 1 x", b"STAT 1", b"QUIT now", b"RETR \xd9\xa1"]
    for line in bad:
        h.machine.client_data(line + b"\r\n")
    assert h.sent() == []
    assert h.written().count(b"-ERR ") == len(bad)
    h.machine.client_data(b"RETR 1234567890\r\nTOP 7 0\r\nLIST 2\r\nuidl\r\n")
    assert h.sent() == [b"RETR 1234567890\r\n", b"TOP 7 0\r\n", b"LIST 2\r\n", b"UIDL\r\n"]


# -- mail safety ------------------------------------------------------------------------------------------

def test_dele_and_quit_wait_for_the_message_and_are_dropped_after_a_hang_up(tmp_path: Path) -> None:
    """Finding 3: RETR 4 + DELE 4 + QUIT in one segment, then a reset mid-message."""
    h = Harness(tmp_path)
    h.log_in()
    h.machine.client_data(b"RETR 4\r\nNOOP\r\nDELE 4\r\nQUIT\r\n")
    assert h.sent() == [b"RETR 4\r\n", b"NOOP\r\n"]
    answer = retr_answer()
    h.machine.upstream_data(answer[:200])
    h.effects.clear()
    h.machine.client_lost()
    assert h.take() == [CancelTimer(Timer.UPSTREAM), AbortUpstream("client hung up")]
    h.machine.upstream_data(answer[200:] + b"+OK\r\n")
    assert h.sent() == []


def test_dele_and_quit_go_once_the_message_was_written(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.log_in()
    h.machine.client_data(b"RETR 4\r\nDELE 4\r\nQUIT\r\n")
    h.machine.upstream_data(retr_answer())
    assert h.sent() == [b"RETR 4\r\n", b"DELE 4\r\n", b"QUIT\r\n"]
    h.effects.clear()
    h.machine.client_lost()  # gone before the answers: its QUIT still counts (RFC 1939 §6)
    assert not any(isinstance(effect, AbortUpstream) for effect in h.take())
    h.machine.upstream_data(b"+OK deleted\r\n+OK bye\r\n")
    assert CloseUpstream() in h.take()


def test_hang_up_with_a_backed_up_client_commits_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.log_in()
    h.machine.client_data(b"RETR 4\r\n")
    h.machine.upstream_data(retr_answer())
    h.machine.output_blocked(Leg.CLIENT, True)  # the message is in the write buffer, not the client
    h.machine.client_data(b"DELE 4\r\nQUIT\r\n")
    h.effects.clear()
    h.machine.output_gone(Leg.CLIENT)  # Twisted stops the producer before connectionLost
    h.machine.client_lost()
    assert AbortUpstream("client hung up") in h.take()
    assert h.sent() == []


def test_refused_message_is_not_deleted_after_a_hang_up(tmp_path: Path) -> None:
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nmode = "raise"\non_error = "refuse"\n'
    h = Harness(tmp_path, hooks=hooks)
    h.log_in(listing=({3: len(MESSAGE)}, {}))
    h.machine.client_data(b"RETR 3\r\n")
    h.machine.upstream_data(retr_answer())
    run = next(effect for effect in h.take() if isinstance(effect, RunHooks))
    h.machine.hooks_done(run.ticket, None, (), ["tagger: failed; refused"])
    assert h.written() == b"-ERR [SYS/TEMP] Message temporarily unavailable, try again later.\r\n"
    h.machine.client_data(b"DELE 03\r\nDELE 3\r\n")
    assert h.written() == b"-ERR Invalid message number.\r\n-ERR [SYS/TEMP] Message was not delivered, so it is not deleted.\r\n"
    h.machine.client_data(b"NOOP\r\n")
    h.effects.clear()
    h.machine._lines.feed(b"DELE 3\r\nQUIT\r\n")  # buffered when the client hangs up
    h.machine.client_lost()
    assert b"DELE 3\r\n" not in h.sent()


def test_quit_behind_a_login_in_flight_is_delivered(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.machine.connected()
    h.machine.client_data(b"USER alice\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n")
    h.machine.client_lost()
    assert not any(isinstance(effect, CancelLogin) for effect in h.take())
    h.machine.upstream_attached([b"PIPELINING"])
    h.machine.logged_in(None)
    assert h.sent() == [b"DELE 1\r\n", b"QUIT\r\n"]


def test_unsolicited_upstream_line_drops_the_upstream(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.log_in(capabilities=())
    h.machine.client_data(b"NOOP\r\nNOOP\r\n")
    assert h.sent() == [b"NOOP\r\n"]  # no PIPELINING: one at a time
    h.machine.upstream_data(b"+OK\r\n+OK surprise\r\n")
    effects = h.take()
    assert AbortUpstream("unsolicited line") in effects
    assert Send(b"NOOP\r\n") not in effects[effects.index(Write(b"+OK\r\n")):]


def test_machine_imports_no_twisted() -> None:
    code = "import sys, popproxy.protocol.machine; print(any(m.split('.')[0] == 'twisted' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- generated sequences ----------------------------------------------------------------------------------

_CANONICAL = re.compile(rb"^(RETR|DELE) [1-9][0-9]{0,9}\r\n$|^TOP [1-9][0-9]{0,9} (0|[1-9][0-9]{0,9})\r\n$|"
                        rb"^(LIST|UIDL)( [1-9][0-9]{0,9})?\r\n$|^(STAT|NOOP|RSET|QUIT|CAPA)\r\n$")

_COMMANDS = st.sampled_from([
    b"RETR 1", b"RETR 2", b"RETR 01", b"RETR 1_0", b"TOP 1 0", b"TOP 2 3", b"DELE 1", b"DELE 2", b"DELE 02",
    b"LIST", b"LIST 1", b"UIDL", b"STAT", b"NOOP", b"RSET", b"QUIT", b"CAPA", b"XYZZY", b"USER x", b"",
])


class FakeUpstream:
    """Answers the machine's Sends in order (a well-behaved upstream), when told to."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def answer(self, line: bytes) -> bytes:
        verb = line.split()[0]
        tag = line.strip()
        if verb == b"RETR":
            return retr_answer(b"Subject: " + tag + b"\r\n\r\nbody\r\n.dot\r\n")
        if verb == b"TOP" or (verb in (b"LIST", b"UIDL") and b" " not in line.strip()) or verb == b"CAPA":
            return b"+OK " + tag + b"\r\nline\r\n.\r\n"
        return b"+OK " + tag + b"\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    commands=st.lists(_COMMANDS, max_size=25),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=10),
    answer_cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=20),
    hang_up_after=st.integers(min_value=0, max_value=60),
    block_at=st.integers(min_value=0, max_value=60),
    pipelining=st.booleans(),
)
def test_invariants_hold_for_any_sequence(tmp_path: Path, commands: list[bytes], cuts: list[int],
                                          answer_cuts: list[int], hang_up_after: int, block_at: int,
                                          pipelining: bool) -> None:
    h = Harness(tmp_path, "max_bad_commands = 1000\nmax_pipelined = 8\n")
    m = h.machine
    m.connected()
    stream = b"USER alice\r\nPASS pw\r\n" + b"".join(c + b"\r\n" for c in commands)
    upstream = FakeUpstream()
    logged_in = False
    sent_before_login: list[bytes] = []
    step = 0
    hung_up = False
    fetches_complete_at_hang_up = True
    sends_after_hang_up: list[bytes] = []

    def pump_upstream() -> None:
        for effect in list(h.effects):
            if isinstance(effect, Send):
                upstream.pending.append(upstream.answer(effect.line))
        h.effects = [e for e in h.effects if not isinstance(e, Send)]

    position = 0
    for cut in [*cuts, len(stream)]:
        chunk, position = stream[position : position + cut], position + cut
        if not chunk:
            break
        step += 1
        if step == block_at:
            m.output_blocked(Leg.CLIENT, True)
        if step == block_at + 2:
            m.output_blocked(Leg.CLIENT, False)
        m.client_data(chunk)
        if not logged_in and any(isinstance(e, Login) for e in h.effects):
            sent_before_login.extend(e.line for e in h.effects if isinstance(e, Send))
            m.upstream_attached([b"PIPELINING"] if pipelining else [])
            m.logged_in(None)
            logged_in = True
        for _ in range(3):
            pump_upstream()
            data = b"".join(upstream.pending)
            upstream.pending.clear()
            for size in answer_cuts or [len(data) or 1]:
                if data:
                    m.upstream_data(data[:size])
                    data = data[size:]
            if data:
                m.upstream_data(data)
        if step == hang_up_after and not hung_up:
            fetches_complete_at_hang_up = not any(e.fetch is not None for e in m._queue)
            fetches_complete_at_hang_up &= Hold.CLIENT_OUTPUT not in m.holds[Leg.CLIENT]
            hung_up = True
            before = len(h.effects)
            m.client_lost()
            sends_after_hang_up = [e.line for e in h.effects[before:] if isinstance(e, Send)]
            pump_upstream()
    # Nothing upstream before the login; only canonical lines ever.
    assert sent_before_login == []
    for line in h.sends:
        assert _CANONICAL.match(line), line
    # Answers in command order: the relayed answers the client got are those of the commands sent,
    # in the order they were sent (each fake answer names its command).
    tags = re.findall(rb"(?:\+OK |Subject: )((?:RETR|TOP|DELE|LIST|UIDL|STAT|NOOP|RSET|QUIT|CAPA)[ 0-9]*)\r\n",
                      bytes(h.writes))
    assert tags == [line.strip() for line in h.sends][: len(tags)]
    # No DELE or QUIT upstream after a hang-up while a fetch was not completely delivered.
    if hung_up and not fetches_complete_at_hang_up:
        assert not any(line.split()[0] in (b"DELE", b"QUIT") for line in sends_after_hang_up)
    # Bounded: never more answers owed than max_pipelined (+1 for a close queued behind them).
    assert len(m._queue) <= 9


def test_an_upstream_that_stalls_mid_answer_is_dropped_unless_the_proxy_is_not_reading(tmp_path: Path) -> None:
    h = Harness(tmp_path, "upstream_timeout = 30\n")
    h.log_in()
    h.machine.client_data(b"RETR 1\r\n")
    assert SetTimer(Timer.UPSTREAM, 30.0) in h.take()
    h.now.value += 20
    h.machine.upstream_data(retr_answer()[:100])  # progress, then silence mid-answer
    h.take()
    h.now.value += 10
    h.machine.timer_fired(Timer.UPSTREAM)
    assert h.take() == [SetTimer(Timer.UPSTREAM, 20.0)]  # 30 s from the last byte, not the first
    h.machine.output_blocked(Leg.CLIENT, True)  # now the silence is the proxy's own
    h.take()
    h.now.value += 20
    h.machine.timer_fired(Timer.UPSTREAM)
    assert h.take() == [SetTimer(Timer.UPSTREAM, 30.0)]
    h.machine.output_blocked(Leg.CLIENT, False)
    h.now.value += 30
    h.machine.timer_fired(Timer.UPSTREAM)
    effects = h.take()
    assert AbortUpstream("upstream silent") in effects
    h.machine.upstream_lost("aborted")
    assert AbortClient("upstream lost mid-answer") in h.take()  # no terminator: the client sees a break


def test_list_sizes_rewritten_whatever_the_chunking(tmp_path: Path) -> None:
    """LIST with a rewriting hook: the same answer, whether the upstream sends it whole or one octet
    at a time, each line keeping its own ending (a bare LF stays a bare LF)."""
    hooks = '[[hook]]\nuse = "support.samplehooks:tagger"\nreservation = 10\n'
    answer = b"+OK 3 messages\r\n1 100\r\n2 200\n3 300\r\n.\r\n"
    outputs = []
    for size in (len(answer), 1, 2, 3):
        h = Harness(tmp_path, hooks=hooks)
        h.log_in(listing=({1: 100, 2: 200, 3: 300}, {}))
        h.machine.client_data(b"LIST\r\n")
        for start in range(0, len(answer), size):
            h.machine.upstream_data(answer[start : start + size])
        outputs.append(h.written())
    extra = h.machine.mailbox.extra(1) if h.machine.mailbox else 0
    assert extra > 10
    expected = b"+OK 3 messages\r\n1 %d\r\n2 %d\n3 %d\r\n.\r\n" % (100 + extra, 200 + extra, 300 + extra)
    assert outputs == [expected] * 4


def test_no_mail_moves_while_a_gatekeeper_cannot_record_it(tmp_path: Path) -> None:
    """``IGatekeeper`` (the audit log with ``on_write_error = "refuse"``): while it cannot write,
    RETR, TOP and DELE get -ERR [SYS/TEMP] and never reach the upstream; other commands go on."""
    h = Harness(tmp_path)
    recording = [False]
    plan = dataclasses.replace(h.machine.settings.plan, mail_may_move=lambda user: recording[0])
    h.machine.settings = dataclasses.replace(h.machine.settings, plan=plan)
    h.log_in()
    h.machine.client_data(b"RETR 1\r\nTOP 1 0\r\nDELE 1\r\nSTAT\r\n")
    refused = b"-ERR [SYS/TEMP] Mail cannot be recorded now, so it is not moved; try again later.\r\n"
    assert h.written() == refused * 3
    assert h.sent() == [b"STAT\r\n"]
    h.machine.upstream_data(b"+OK 1 5\r\n")
    h.take()
    recording[0] = True  # it can write again
    h.machine.client_data(b"DELE 1\r\n")
    assert h.sent() == [b"DELE 1\r\n"]


def test_a_message_too_large_for_a_refusing_hook_is_not_delivered(tmp_path: Path) -> None:
    """``oversize = "refuse"``: larger than the hook's max_size, RETR and TOP get -ERR [SYS/PERM]
    and nothing goes upstream; its DELE is refused too. Smaller messages are scanned as usual, and
    with ``oversize = "pass"`` (the default) the large one streams through unscanned, logged."""
    refusing = '[[hook]]\nuse = "support.samplehooks:tagger"\nmax_size = 1000\noversize = "refuse"\n'
    h = Harness(tmp_path, hooks=refusing)
    h.log_in(listing=({1: len(MESSAGE), 2: 5000}, {}))
    h.machine.client_data(b"RETR 2\r\nTOP 2 0\r\nDELE 2\r\nRETR 1\r\n")
    too_large = b"-ERR [SYS/PERM] Message too large to be checked (5000 octets); it stays on the server.\r\n"
    assert h.written() == too_large * 2 + b"-ERR [SYS/TEMP] Message was not delivered, so it is not deleted.\r\n"
    assert h.sent() == [b"RETR 1\r\n"]

    passing = Harness(tmp_path, hooks=refusing.replace('"refuse"', '"pass"'))
    passing.log_in(listing=({1: len(MESSAGE), 2: 5000}, {}))
    passing.machine.client_data(b"RETR 2\r\n")
    assert passing.sent() == [b"RETR 2\r\n"]
    logged = [e for e in passing.effects if isinstance(e, Log) and e.fields.get("event") == "oversize"]
    assert logged and "not scanned: 5000 octets" in str(logged[0].fields["note"])
