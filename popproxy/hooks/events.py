"""Delivering session events to session hooks, each call contained.

A session hook that raises must not break the session or the other hooks: the error is logged (once
per hook and event kind, so that a broken hook does not flood the log) and the session goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from .interfaces import IRecordsHeaders, SessionFacts
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
}


class SessionEvents:
    """The session hooks of one session, with the user filter applied once the user is known."""

    def __init__(self, hooks: Sequence[BuiltHook]) -> None:
        self._hooks = [built for built in hooks if built.is_session_hook]
        self._failed: set[tuple[str, str]] = set()

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
        for built in self._hooks:
            if session.user is not None and not built.config.applies_to(session.user):
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
