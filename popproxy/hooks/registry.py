"""Finding hook factories by the ``use`` key of a ``[[hook]]`` table, and building the hooks.

``use`` is looked up, in order, as a built-in name, as an entry point in the ``popproxy.hooks`` group
(how a separately installed package offers a hook), and as ``"package.module:attribute"``. The object
found must provide ``IHookFactory`` (a class that implements it is instantiated without arguments),
and what it builds must provide ``IMessageHook`` or ``ISessionHook``: both are checked with
``verifyObject`` at start-up, so a broken third-party hook fails ``--check``, not the first session.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from ..config import ConfigError, HookConfig, ProxyConfig
from .interfaces import (
    IClosable,
    IGatekeeper,
    IHookFactory,
    IMessageHook,
    IReopens,
    ISessionHook,
    IStartable,
    IWantsListing,
)

ENTRY_POINT_GROUP = "popproxy.hooks"

BUILT_IN: dict[str, str] = {
    "audit-log": "popproxy.hooks.audit:factory",
    "spamassassin": "popproxy.hooks.spamassassin:factory",
    "rspamd": "popproxy.hooks.rspamd:factory",
    "rewrite": "popproxy.hooks.rewrite:factory",
    "archive": "popproxy.hooks.archive:factory",
    "clamav": "popproxy.hooks.clamav:factory",
}


@dataclass(frozen=True)
class BuiltHook:
    """A hook with its configuration: what the session needs to run it."""

    config: HookConfig
    hook: Any

    @property
    def is_message_hook(self) -> bool:
        return IMessageHook.providedBy(self.hook)

    @property
    def is_session_hook(self) -> bool:
        return ISessionHook.providedBy(self.hook)

    @property
    def wants_listing(self) -> bool:
        """Whether this session hook wants the mailbox's UIDLs (``IWantsListing``: LIST and UIDL are
        read once at login)."""
        return self.is_session_hook and IWantsListing.providedBy(self.hook)

    @property
    def gatekeeper(self) -> IGatekeeper | None:
        """The hook as an ``IGatekeeper``, if mail may move only while it can record it."""
        return self.hook if IGatekeeper.providedBy(self.hook) else None

    def start(self, reactor: Any) -> None:
        """Give the hook the reactor, if it does I/O (``IStartable``)."""
        if IStartable.providedBy(self.hook):
            self.hook.start(reactor)

    def close(self) -> None:
        """Release what the hook holds, if it holds anything (``IClosable``)."""
        if IClosable.providedBy(self.hook):
            self.hook.close()

    def reopen(self) -> None:
        """Open the hook's file again by name, if it writes one (``IReopens``; SIGHUP, logrotate)."""
        if IReopens.providedBy(self.hook):
            self.hook.reopen()


def _load(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def find_factory(config: HookConfig, config_path: Any) -> Any:
    """The ``IHookFactory`` named by ``config.use``. Raises ``ConfigError`` naming the key."""
    use = config.use
    reference = BUILT_IN.get(use)
    if reference is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
        if found:
            reference = found[0].value
        elif ":" in use:
            reference = use
        else:
            known = sorted(set(BUILT_IN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
            raise ConfigError(
                config_path, f"{config.key}.use",
                f"unknown hook {use!r}; known: {', '.join(known)}, or \"package.module:Name\"",
            )
    try:
        factory = _load(reference)
    except Exception as error:  # ImportError, AttributeError, or the module's own failure
        raise ConfigError(
            config_path, f"{config.key}.use", f"cannot load {reference!r}: {type(error).__name__}: {error}"
        ) from None
    if isinstance(factory, type) and IHookFactory.implementedBy(factory):
        # mypy-zope narrows the class to type[IHookFactory] and takes the call for an adaptation.
        factory = factory()  # type: ignore[call-arg]
    if not IHookFactory.providedBy(factory):
        raise ConfigError(config_path, f"{config.key}.use", f"{reference!r} does not provide IHookFactory")
    return factory


def build_hook(config: HookConfig, config_path: Any) -> BuiltHook:
    factory = find_factory(config, config_path)
    try:
        hook = factory.build(config)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            config_path, config.key, f"hook {config.use!r} failed to start: {type(error).__name__}: {error}"
        ) from None
    provided = [iface for iface in (IMessageHook, ISessionHook) if iface.providedBy(hook)]
    if not provided:
        raise ConfigError(config_path, config.key, f"hook {config.use!r} built an object that is no hook")
    for iface in provided:
        try:
            verifyObject(iface, hook)
        except Invalid as error:
            raise ConfigError(config_path, config.key, f"hook {config.use!r} breaks {iface.__name__}: {error}") from None
    if IMessageHook.providedBy(hook):
        reservation = hook.reservation  # declared on IMessageHook; verifyObject found it above
        if not isinstance(reservation, int) or isinstance(reservation, bool) or reservation < 0:
            raise ConfigError(config_path, config.key, f"hook {config.use!r} has no valid reservation: {reservation!r}")
    return BuiltHook(config, hook)


def build_hooks(config: ProxyConfig) -> tuple[BuiltHook, ...]:
    """Build every ``[[hook]]`` in order. Raises ``ConfigError`` for the first that is wrong.
    Building does no I/O: ``start_hooks`` is what puts hooks to work."""
    return tuple(build_hook(hook, config.path) for hook in config.hooks)


def start_hooks(hooks: tuple[BuiltHook, ...], reactor: Any) -> tuple[BuiltHook, ...]:
    """Start each hook that does I/O with ``reactor``; returns ``hooks``."""
    for built in hooks:
        built.start(reactor)
    return hooks
