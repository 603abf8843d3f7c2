"""TRANSACTION state (RFC 1939 §5): relaying commands, ordering answers, ending well.

Every command whose framing the proxy knows goes to the upstream with a sink that carries its answer
back (``sink_for``: the one place where hooks and size accounting plug in); everything else is
answered locally, in order. A client that hangs up after QUIT still gets its QUIT delivered.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.python.failure import Failure

from ..hooks.interfaces import Delivery
from ..pop3 import capa, commands
from ..pop3.wire import (
    Command,
    err,
    has_forbidden_bytes,
    parse_command,
)
from .responses import AnswerQueue, FilteringSink, RelaySink, ResponseSink
from .state import SHUTTING_DOWN, State
from .upstream import (
    UpstreamProtocol,
    describe,
)


class Transaction:
    """The TRANSACTION-state half of ``ClientProtocol`` (a mixin: it shares the session's state)."""

    def _transaction(self, command: Command, line: bytes) -> None:
        upstream = self._upstream
        assert upstream is not None
        self._activity = self.settings.clock.seconds()
        if has_forbidden_bytes(line):
            self._answer(err("Command contains forbidden characters."))
            self._bad_command()
            return
        if self._draining and command.verb != b"QUIT":
            self._answer(SHUTTING_DOWN)
            return
        if command.verb in (b"STLS", b"USER", b"PASS", b"AUTH", b"APOP"):
            self._answer(err("Not allowed after login."))
            self._bad_command()
            return
        if not commands.is_relayable(command, self._upstream_capabilities):
            self._answer(err("Unknown command."))
            self._bad_command()
            return
        if command.verb == b"QUIT":
            self._quit_sent = True
            self._end_reason = "quit"
        hooks = self._hooks
        if hooks is not None and hooks.must_wait(command):
            self._waiting_command = (command, line)
            self._hold_reading("verdict pending")
            return
        if hooks is not None:
            local = hooks.local_answer(command)
            if local is not None:
                self._answer(local)
                return
        to_send = hooks.upstream_line(command) if hooks is not None else command.to_line()
        sink = self.sink_for(command)
        if isinstance(sink, RelaySink) and self._events:
            sink.label = (command.verb.decode("ascii", "replace"), command.rest.decode("utf-8", "replace"))
        upstream.request(to_send, sink, expects_body=commands.expects_body(command))
        if len(self._answers) >= self._limits.max_pipelined:
            self._hold_reading("pipeline full")

    def sink_for(self, command: Command) -> ResponseSink:
        """The sink that carries the answer to ``command`` back to the client.

        The one place to intercept answers to RETR, TOP, LIST and STAT (message hooks, size
        accounting): return another sink here. The sink must call ``AnswerQueue.finished`` when its
        answer has been written, in order.
        """
        if command.verb == b"CAPA":
            return FilteringSink(self._answers, self._write, self._upstream_broke, capa.after_login)
        if command.verb == b"QUIT":
            return _QuitSink(self._answers, self._write, self._upstream_broke, self._quit_answered)
        if self._hooks is not None:
            sink = self._hooks.sink_for(command)
            if sink is not None:
                return sink
        return RelaySink(self._answers, self._write, self._upstream_broke)

    def _answer_finished(self, sink: RelaySink) -> None:
        if sink.label is not None and self._events:
            command, argument = sink.label
            self._events.emit("command_done", self.session_facts(), command, argument, sink.succeeded)

    def _delivered(self, delivery: Delivery) -> None:
        self._events.emit("message_delivered", self.session_facts(), delivery)

    def _answers_idle(self) -> None:
        waiting, self._waiting_command = self._waiting_command, None
        if waiting is not None:
            self._holds.discard("verdict pending")
            self._transaction(*waiting)
        self._release_reading("pipeline full")

    def _quit_answered(self) -> None:
        if self._upstream is not None:
            self._upstream.transport.loseConnection()
        if self.state is not State.CLOSED:
            self._close("quit")

    def _upstream_broke(self, graceful: bool = False) -> None:
        """The upstream went away with an answer due. In the middle of an answer: abort, so that the
        client sees a broken connection rather than a complete-looking, truncated message. Between
        answers (``graceful``): close after what was already written."""
        if self.state is State.CLOSED:
            return
        if graceful:
            self._close("upstream lost")
        else:
            self._abort("upstream lost mid-answer")

    def _upstream_lost(self, reason: Failure) -> None:
        if self.state is State.CLOSED or self._closing:
            return
        if self._upstream is not None and not self._quit_sent:
            self.log.warn(
                "session {session_id}: upstream connection lost: {reason}",
                reason=describe(reason),
                **self._fields(),
            )
        self._close("upstream closed")

    def _pending_until_quit(self) -> list[Command] | None:
        """The buffered commands up to and including a QUIT, or None if the client sent no QUIT."""
        pending: list[Command] = []
        while (line := self._lines.next_line()) is not None:
            command = parse_command(line) if isinstance(line, bytes) and not has_forbidden_bytes(line) else None
            if command is None:
                continue
            pending.append(command)
            if command.verb == b"QUIT":
                return pending
        return None

    def _forward_after_hangup(self, upstream: UpstreamProtocol, pending: list[Command]) -> None:
        """Relay what the client sent before it hung up, through its QUIT.

        A client may send ``DELE 1`` and ``QUIT`` and close at once; its QUIT must still reach the
        upstream (RFC 1939 §6), with the commands before it, though nobody will read the answers.
        One exception keeps mail safe: a ``DELE`` of a message whose RETR or TOP the client could not
        have received (it was in the same unanswered batch, still with the hooks, or refused by
        them) is not forwarded.
        """
        unsure: set[bytes] = {c.args[0] for c in pending if c.verb in (b"RETR", b"TOP") and c.args}
        hooks = self._hooks
        if hooks is not None:
            unsure |= {str(n).encode() for n in hooks.in_flight}
            if hooks.runtime.mailbox is not None:
                unsure |= {str(n).encode() for n in hooks.runtime.mailbox.refused}
        capabilities = capa.names(upstream.capabilities)
        for command in pending:
            if command.verb == b"DELE" and command.args and command.args[0] in unsure:
                self.log.info("session {session_id}: client hung up; DELE {number} not forwarded, the "
                              "client cannot have the message", number=command.args[0].decode("ascii", "replace"),
                              **self._fields())
                continue
            if not commands.is_relayable(command, capabilities):
                continue
            quit_sink = command.verb == b"QUIT"
            upstream.request(command.to_line(), _Discard(upstream if quit_sink else None),
                             expects_body=commands.expects_body(command))
        self._quit_sent = True
        self._end_reason = "quit after hang-up"


class _Discard:
    """The sink of a command relayed after the client hung up: nobody reads the answer. For QUIT,
    the upstream connection is closed once its answer is in."""

    def __init__(self, close: UpstreamProtocol | None = None) -> None:
        self._close = close

    def status(self, line: bytes, has_body: bool) -> None:
        pass

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        if self._close is not None:
            self._close.transport.loseConnection()

    def failed(self, reason: Failure) -> None:
        pass


class _QuitSink(RelaySink):
    """QUIT's answer: relayed, then both connections are closed."""

    def __init__(self, queue: AnswerQueue, write: Callable[[bytes], None], abort: Callable[[], None], done: Callable[[], None]) -> None:
        super().__init__(queue, write, abort)
        self._done = done

    def end(self) -> None:
        super().end()
        self._done()

    def failed(self, reason: Failure) -> None:
        self._done()
