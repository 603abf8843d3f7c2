"""Abuse resistance shared by all sessions: session counts and login-failure penalties.

One ``Guard`` per running proxy. It counts sessions in all, per client address and per user, and
remembers recent login failures per client address, so that a brute-force attempt spread over many
connections still meets an escalating delay. Per-address state lives in a bounded LRU table (so a
flood of addresses cannot exhaust memory), IPv6 addresses are grouped by /64 (one host owns a whole
/64 and could otherwise rotate through it), and addresses in ``ip_allowlist`` (an office behind NAT)
are exempt from per-address limits and penalties.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from ..config import LimitsConfig, in_networks, ip_of

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

# A failure older than this no longer counts towards the address's penalty.
FAILURE_MEMORY = 900.0
# The longest a failed login is delayed.
MAX_DELAY = 30.0


def address_key(host: str) -> str | None:
    """The key an address's counters are kept under: IPv4 as is, IPv6 by its /64, IPv4-mapped IPv6
    as the IPv4 address; None for something that is not an IP address (a UNIX socket peer)."""
    address = ip_of(host)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ISessionGuard(Interface):
    """What a session asks of the proxy-wide limits. The answers are Deferreds: with ``workers = 1``
    the guard is in the same process and they have already fired; with more workers it is the
    parent's, asked over AMP (``popproxy.workers``)."""

    def admit(host: str | None) -> Deferred[str | None]:
        """Count a new session (``Guard.admit``): None, or why it is refused."""

    def admit_address(host: str) -> Deferred[str | None]:
        """Count an admitted session under its client address, now known (``Guard.admit_address``)."""

    def left(host: str | None) -> None:
        """An admitted session ended."""

    def user_admit(user: str) -> Deferred[bool]:
        """Count a logged-in session of ``user``; False if the user has too many."""

    def user_left(user: str) -> None:
        """A session counted by ``user_admit`` ended."""

    def login_failed(host: str) -> None:
        """A login from ``host`` failed."""

    def failure_delay(host: str, connection_failures: int) -> Deferred[float]:
        """Seconds a login from ``host`` waits first (``Guard.failure_delay``)."""


@dataclass
class _Address:
    sessions: int = 0
    failures: int = 0
    last_failure: float = 0.0


class Guard:
    """Counts and penalties for the whole proxy."""

    def __init__(self, limits: LimitsConfig, clock: IReactorTime) -> None:
        self._limits = limits
        self._clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self.sessions = 0
        self._users: Counter[str] = Counter()

    def reconfigure(self, limits: LimitsConfig) -> None:
        """New limits (a reload): counts and penalties carry over."""
        self._limits = limits

    # -- per-address table ---------------------------------------------------------------------------

    def _exempt(self, host: str) -> bool:
        """Allowlisted addresses, and peers without an address (UNIX sockets), have no counters."""
        return in_networks(host, self._limits.ip_allowlist) is not False

    def _entry(self, host: str) -> _Address | None:
        key = address_key(host)
        if key is None or self._exempt(host):
            return None
        entry = self._addresses.get(key)
        if entry is None:
            entry = self._addresses[key] = _Address()
            self._evict()
        else:
            self._addresses.move_to_end(key)
        return entry

    def _evict(self) -> None:
        """Drop the least recently seen addresses beyond the table's size, sparing those with live
        sessions (whose count must stay right); they are few, being bounded by ``max_sessions``."""
        excess = len(self._addresses) - self._limits.ip_table_size
        if excess <= 0:
            return
        for key in list(self._addresses):
            if excess <= 0:
                break
            if self._addresses[key].sessions == 0:
                del self._addresses[key]
                excess -= 1

    def __len__(self) -> int:
        return len(self._addresses)

    # -- sessions ------------------------------------------------------------------------------------

    def admit(self, host: str | None) -> str | None:
        """Count a new session from ``host``; return why it must be refused instead, if it must.

        ``None`` counts a connection whose client address is not known yet (behind a PROXY-protocol
        listener, before the header): against ``max_sessions`` only, until ``admit_address``.
        """
        if self.sessions >= self._limits.max_sessions:
            return "too many sessions"
        if host is not None:
            refusal = self.admit_address(host)
            if refusal is not None:
                return refusal
        self.sessions += 1
        return None

    def admit_address(self, host: str) -> str | None:
        """Count an admitted session under its client address, now known; or say why not."""
        entry = self._entry(host)
        if entry is not None and entry.sessions >= self._limits.max_sessions_per_ip:
            return "too many sessions from your address"
        if entry is not None:
            entry.sessions += 1
        return None

    def left(self, host: str | None) -> None:
        """An admitted session ended (``host``: the address it was counted under, if any)."""
        self.sessions -= 1
        if host is None:
            return
        key = address_key(host)
        entry = self._addresses.get(key) if key is not None else None
        if entry is not None and entry.sessions > 0:
            entry.sessions -= 1

    def user_admit(self, user: str) -> bool:
        """Count a logged-in session of ``user``; False if the user has too many already."""
        if self._users[user] >= self._limits.max_sessions_per_user:
            return False
        self._users[user] += 1
        return True

    def user_left(self, user: str) -> None:
        self._users[user] -= 1
        if self._users[user] <= 0:
            del self._users[user]

    # -- login failures ------------------------------------------------------------------------------

    def login_failed(self, host: str) -> None:
        entry = self._entry(host)
        if entry is None:
            return
        now = self._clock.seconds()
        if now - entry.last_failure > FAILURE_MEMORY:
            entry.failures = 0
        entry.failures += 1
        entry.last_failure = now

    def failure_delay(self, host: str, connection_failures: int) -> float:
        """Seconds to wait before answering a failed login: doubling with the failures of this
        connection or, if more, of this address in the last ``FAILURE_MEMORY`` seconds."""
        count = connection_failures
        key = address_key(host)
        entry = self._addresses.get(key) if key is not None and not self._exempt(host) else None
        if entry is not None and self._clock.seconds() - entry.last_failure <= FAILURE_MEMORY:
            count = max(count, entry.failures)
        if count <= 0:
            return 0.0
        return min(MAX_DELAY, self._limits.login_failure_delay * float(1 << (count - 1)))


@implementer(ISessionGuard)
class LocalGuard:
    """``ISessionGuard`` for a ``Guard`` in this process: every answer is ready at once."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def admit(self, host: str | None) -> Deferred[str | None]:
        return succeed(self.guard.admit(host))

    def admit_address(self, host: str) -> Deferred[str | None]:
        return succeed(self.guard.admit_address(host))

    def left(self, host: str | None) -> None:
        self.guard.left(host)

    def user_admit(self, user: str) -> Deferred[bool]:
        return succeed(self.guard.user_admit(user))

    def user_left(self, user: str) -> None:
        self.guard.user_left(user)

    def login_failed(self, host: str) -> None:
        self.guard.login_failed(host)

    def failure_delay(self, host: str, connection_failures: int) -> Deferred[float]:
        return succeed(self.guard.failure_delay(host, connection_failures))
