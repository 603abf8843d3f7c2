"""``twistd popproxy``: command-line options and the service they build.

The only module that reads the command line. Everything below it receives a validated
``ProxyConfig`` and an explicit reactor.

Start-up, in twistd's order (``twisted.application.app.ApplicationRunner.run``): the options are
parsed (``Options.postOptions`` builds the configuration with ``build.build``, as ``--check`` and
every reload do, and checks that twistd's ``-u``/``-g`` user can read every file a reload reads);
then ``makeService`` makes the service and binds every endpoint (``ProxyService.bind``,
``WorkerPool.bind``); only then does twistd daemonize, write its PID file and drop privileges. So
a bad configuration, an unreadable key or a port that cannot be bound ends the start with one line
on standard error and exit status 1, in the foreground and in daemon mode alike, and leaves no PID
file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from .build import Built, build, unreadable_files
from .config import ConfigError, ProxyConfig, load_config
from .listeners import BindError

DEFAULT_CONFIG = "/etc/popproxy/popproxy.toml"


class Options(usage.Options):
    synopsis = "[-c FILE] [--check]"
    longdesc = (
        "Run the popproxy POP3 proxy. Listeners, upstreams, routing and limits come from the TOML "
        "file given with --config (see conf/popproxy.toml for every key). With --check, validate the "
        "file, including every certificate and key, that no two listeners share an address, and (with "
        "twistd's -u/-g, as root) that that user can read every file a reload reads, and exit: 0 if it "
        "is good, 1 with the file, the key and the reason if not. --check binds nothing."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path to the TOML configuration file."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration (TOML, endpoints, TLS files) and exit."],
    ]

    config: ProxyConfig
    #: the running pieces built from ``config`` (one process); None with ``[process] workers`` > 1,
    #: whose workers build their own
    built: Built | None = None
    #: twistd's own options (``-u``, ``-g``, ...): ``usage.Options`` sets this on a subcommand's options
    parent: usage.Options | None = None

    def opt_version(self) -> None:
        """Print popproxy's version (and Twisted's and Python's) and exit."""
        from .cli import version_line

        print(version_line())
        raise SystemExit(0)

    def postOptions(self) -> None:
        # Validation happens here, before twistd writes a PID file or daemonizes, so that a bad
        # configuration exits non-zero with a one-line reason and no usage dump.
        from twisted.internet import reactor

        try:
            built = build(load_config(self["config"]), reactor)
        except ConfigError as error:
            print(f"popproxy: configuration error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        self.config = built.config
        try:
            # Every file a reload reads, read as the user twistd will drop to (finding it now, not at
            # the first certificate renewal, when a reload would fail).
            unreadable = unreadable_files(built.config, *twistd_user(self))
        except ConfigError as error:
            unreadable = [error]
        if self["check"] or unreadable or built.config.process.workers > 1:
            built.close()  # a worker builds its own
        else:
            self.built = built
        if self["check"]:
            for problem in unreadable:
                print(f"popproxy: configuration error: {problem}", file=sys.stderr)
            if unreadable:
                raise SystemExit(1)
            print(f"popproxy: {self.config.path}: configuration OK")
            raise SystemExit(0)
        if unreadable:
            more = f" (and {len(unreadable) - 1} more: see --check)" if len(unreadable) > 1 else ""
            print(f"popproxy: configuration error: {unreadable[0]}{more}", file=sys.stderr)
            raise SystemExit(1)


def twistd_user(options: usage.Options) -> tuple[int | None, int | None, bool]:
    """twistd's own ``-u``, ``-g`` and ``--euid`` (the plugin's parent options), the group completed
    from the user's as twistd does when only ``-u`` is given."""
    import pwd

    twistd: Mapping[str, Any] = options.parent or {}
    uid, gid = twistd.get("uid"), twistd.get("gid")
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid  # twisted.scripts._twistd_unix.UnixApplicationRunner.startApplication
    return uid, gid, bool(twistd.get("euid"))


def validated_config(path: str, data: bytes | None = None) -> ProxyConfig:
    """Load ``path`` and check everything that can be checked without listening (``build.build``,
    whose pieces are thrown away). ``data``: the file's content, if it was read already."""
    from twisted.internet import reactor

    built = build(load_config(path, data), reactor)
    built.close()
    return built.config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .service import ProxyService
    from .workers import WorkerPool

    service: ProxyService | WorkerPool
    if options.config.process.workers > 1:
        # twistd's own -u/-g/--euid (this plugin's parent options): the workers drop to them too.
        service = WorkerPool(options.config, reactor, *twistd_user(options))
    else:
        service = ProxyService(options.config, reactor, built=options.built)
    try:
        # Now, before twistd daemonizes, writes its PID file and drops privileges (module docstring).
        service.bind()
    except BindError as error:
        print(f"popproxy: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    return with_admin_socket(service, options)


def with_admin_socket(service: MultiService, options: Options) -> MultiService:
    """``service`` with the admin socket (``popproxy.admin``) as a child, if the configuration has
    one: bound now, as the listeners are (before twistd daemonizes and drops privileges), in
    twistd's ``-g`` group (or the group of ``-u``, as twistd picks it; else this process's). One
    that is configured and cannot be made is one line and exit status 1."""
    from twisted.internet import reactor

    from .admin import AdminSocketError, IAdminTarget, admin_service

    uid, gid, _euid = twistd_user(options)
    admin = admin_service(options.config, IAdminTarget(service), reactor, uid, gid)
    if admin is not None:
        try:
            admin.bind()
        except AdminSocketError as error:
            print(f"popproxy: {options.config.path}: process.admin_socket: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        admin.setServiceParent(service)
    return service
