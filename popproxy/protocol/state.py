"""Where a client session stands, and what it is given: its state, its settings, shared answers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from ..config import ListenerConfig, ProxyConfig
from ..hooks.registry import BuiltHook
from ..pop3.wire import err
from ..tls import ServerTLS
from .connector import UpstreamConnector
from .guard import Guard

SHUTTING_DOWN = err("Server shutting down, try again later.", "SYS/TEMP")


class State(enum.Enum):
    AUTHORIZATION = enum.auto()  # RFC 1939 §4
    SASL = enum.auto()  # waiting for an AUTH PLAIN continuation line (RFC 5034 §4)
    LOGGING_IN = enum.auto()  # credentials given, upstream login in flight
    TRANSACTION = enum.auto()  # RFC 1939 §5: relaying
    CLOSED = enum.auto()


@dataclass(frozen=True)
class SessionSettings:
    """Everything a session needs from the outside world, fixed when it starts (a reload changes the
    settings for new sessions only)."""

    listener: ListenerConfig
    config: ProxyConfig
    server_tls: ServerTLS | None
    connector: UpstreamConnector
    clock: IReactorTime
    hooks: tuple[BuiltHook, ...] = ()
    guard: Guard | None = None
