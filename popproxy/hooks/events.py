"""Delivering session events to session hooks, each call contained.

A session hook that raises must not break the session or the other hooks: the error is logged (once
per hook and event kind, so that a broken hook does not flood the log) and the session goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from .interfaces import IListingObserver, IRecordsHeaders, SessionFacts
from .registry import BuiltHook

log = Logger()

#: Each event and the ``ISessionHook`` method it calls: the whole of what is called on a session hook.
_CALLS: dict[str, Callable[..., None]] = {
    "session_opened": lambda hook, session: hook.session_opened(session),
    "tls_started": lambda hook, session: hook.tls_started(session),
    "authenticated": lambda hook, session, result, code: hook.authenticated(session, result, code),
    "command_done": lambda hook, session, command, argument, ok: hook.command_done(session, command, argument, ok),
    "message_delivered": lambda hook, session, delivery: hook.message_delivered(session, delivery),
    "session_closed": lambda hook, session, summary: hook.session_closed(session, summary),
    "mailbox_listed": lambda hook, session, uidls: (
        hook.mailbox_listed(session, uidls) if IListingObserver.providedBy(hook) else None),
}


class SessionEvents:
    """The session hooks of one session, with the user filter applied once the user is known."""

    def __init__(self, hooks: Sequence[BuiltHook]) -> None:
        self._hooks = [built for built in hooks if built.is_session_hook]
        self._failed: set[tuple[str, str]] = set()
        self._opened: set[int] = set()  # hooks told of session_opened: they are told of session_closed
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self._hooks)

    @property
    def wanted_headers(self) -> set[str]:
        """Headers the hooks want recorded for each delivered message (``wanted_headers`` attribute)."""
        names: set[str] = set()
        for built in self._hooks:
            if IRecordsHeaders.providedBy(built.hook):
                names.update(built.hook.wanted_headers)
        return names

    def emit(self, event: str, session: SessionFacts, *args: Any) -> None:
        call = _CALLS[event]
        if self._closed:
            return  # nothing after session_closed: hooks drop a session's state there
        if event == "session_closed":
            self._closed = True
        for index, built in enumerate(self._hooks):
            applies = session.user is None or built.config.applies_to(session.user)
            if event == "session_opened" and applies:
                self._opened.add(index)
            if not applies and not (event == "session_closed" and index in self._opened):
                continue
            try:
                call(built.hook, session, *args)
            except Exception:
                if (built.config.name, event) not in self._failed:
                    self._failed.add((built.config.name, event))
                    log.failure(
                        "session hook {hook} failed in {hook_event}; the session goes on",
                        hook=built.config.name,
                        hook_event=event,
                        session_id=session.session_id,
                    )
