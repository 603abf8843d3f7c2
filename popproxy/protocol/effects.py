"""What the session machine asks for (effects) and the named reasons it holds a leg (``Hold``).

Plain data, no behaviour: ``machine.SessionMachine`` emits these, ``client.ClientProtocol`` carries
them out, and the machine's tests compare them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .interfaces import Leg
from .spool import Spool

if TYPE_CHECKING:
    from ..config import UpstreamConfig


@dataclass(frozen=True, slots=True)
class Write:
    """Bytes for the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Send:
    """A command line for the upstream."""

    line: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS on the client leg (after STLS's ``+OK`` was written)."""


@dataclass(frozen=True, slots=True)
class Login:
    """Connect to ``upstream`` and log in as ``user`` (the normalised identity). With ``listing``,
    read LIST and UIDL once logged in (for the hooks). Answer with ``logged_in`` or
    ``login_failed``."""

    user: str
    password: bytes = field(repr=False)
    upstream: str
    listing: bool
    #: the upstream a routing lookup answered with (``upstream`` names its template); None: the
    #: configured ``[upstream.NAME]`` of that name
    target: UpstreamConfig | None = None
    #: the name to log in as upstream, as a lookup rewrote it (sent as is, no ``login_as``)
    login_name: str | None = None


@dataclass(frozen=True, slots=True)
class LookUp:
    """Ask the routing lookup service which upstream serves ``user`` (the normalised identity), on
    the connection's ``attempt``-th login. Answer with ``lookup_routed``, ``lookup_denied`` or
    ``lookup_failed``."""

    user: str
    password: bytes = field(repr=False)
    attempt: int


@dataclass(frozen=True, slots=True)
class Retrieved:
    """A RETR or TOP answer was written whole to the client: ``octets`` as sent (for metrics)."""

    command: str
    octets: int


@dataclass(frozen=True, slots=True)
class CancelLogin:
    """Abandon the login in flight; drop any connection it made."""


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the client connection after what was written."""

    reason: str


@dataclass(frozen=True, slots=True)
class AbortClient:
    """Drop the client connection now (nothing more may reach the client)."""

    reason: str


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close the upstream connection (its QUIT was answered)."""


@dataclass(frozen=True, slots=True)
class AbortUpstream:
    """Drop the upstream connection without QUIT: nothing of the session reaches UPDATE state."""

    reason: str


@dataclass(frozen=True, slots=True)
class PauseReading:
    leg: Leg


@dataclass(frozen=True, slots=True)
class ResumeReading:
    leg: Leg


class Timer(enum.Enum):
    SESSION = "session"  # login timeout, then idle timeout (RFC 1939 §3 autologout)
    TLS = "tls"  # the client's TLS handshake
    PENALTY = "penalty"  # the delay before a penalised address's login is tried
    AUTH_WAIT = "auth wait"  # a lookup's Auth-Wait before a denied login is answered
    UPSTREAM = "upstream"  # an upstream answer that does not come


@dataclass(frozen=True, slots=True)
class SetTimer:
    """(Re)start ``timer``: ``timer_fired(timer)`` in ``seconds`` unless cancelled or set again."""

    timer: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True, slots=True)
class RunHooks:
    """Run the message hooks over ``message`` (message ``number``); answer with ``hooks_done``."""

    ticket: int
    number: int
    message: bytes | Spool = field(repr=False)  # a large one stays in its spool file


@dataclass(frozen=True, slots=True)
class Log:
    """A log event; the glue adds the session's own fields."""

    level: str  # "info" | "warn"
    text: str
    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class Notify:
    """A session-hook event (``ISessionHook``): ``authenticated``, ``tls_started``, ``command_done``,
    ``message_delivered``. ``user``/``upstream`` override the session's facts where given."""

    event: str
    args: tuple[object, ...]
    user: str | None = None
    upstream: str | None = None


# -- the proxy-wide guard (``guard.ISessionGuard``): it may live in another process, so the machine asks
# -- and is answered later, by an input.

@dataclass(frozen=True, slots=True)
class AskPenalty:
    """How long must a login from ``host`` wait, after ``failures`` on this connection? Answer with
    ``penalty_known``."""

    host: str
    failures: int


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """A login from ``host`` failed: it counts towards the address's penalty."""

    host: str


@dataclass(frozen=True, slots=True)
class AskUserSlot:
    """Count one more logged-in session of ``user`` if the user's cap allows. Answer with
    ``user_slot``."""

    user: str


@dataclass(frozen=True, slots=True)
class ReleaseUser:
    """A session of ``user`` counted by ``AskUserSlot`` is over."""

    user: str


GuardEffect = AskPenalty | RecordFailure | AskUserSlot | ReleaseUser

Effect = (Write | Send | StartTLS | Login | LookUp | Retrieved | CancelLogin | CloseClient | AbortClient | CloseUpstream | AbortUpstream
          | PauseReading | ResumeReading | SetTimer | CancelTimer | RunHooks | Log | Notify | GuardEffect)


class Hold(enum.Enum):
    """A named reason to stop handling a leg's input."""

    LOGIN = "login in flight"  # client leg: commands wait for the login's answer
    PENALTY = "login penalty"  # client leg: a penalised address waits before its login is tried
    PIPELINE = "pipeline full"  # client leg: max_pipelined answers outstanding
    CLIENT_OUTPUT = "client write buffer full"  # both legs: nothing more for the client for now
    HOOK = "hook at work"  # upstream leg: later answers wait for the hooks' verdict

