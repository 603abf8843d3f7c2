"""The ``popproxy`` command: an admin's tools beside ``twistd popproxy`` (which runs the proxy).

Each subcommand is one entry of ``COMMANDS``: its name, a one-line help, a function that adds its
arguments to its own ``argparse`` parser and a function that runs it and returns the exit status.
Adding a subcommand is adding one ``Command`` to that list; ``main`` needs no change.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TextIO

from . import __version__


@dataclass(frozen=True, slots=True)
class Command:
    """One ``popproxy NAME ...`` subcommand."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def version_line() -> str:
    """``popproxy 0.1.0 (Twisted 25.5.0, CPython 3.11.2)``: what a bug report needs, on one line."""
    import twisted

    return f"popproxy {__version__} (Twisted {twisted.__version__}, {platform.python_implementation()} {platform.python_version()})"


def shared_file(*parts: str) -> bytes:
    """A file the package ships under ``popproxy/share/`` (the example config, the units, the man page...)."""
    return resources.files("popproxy").joinpath("share", *parts).read_bytes()


def check_config(path: str, out: TextIO | None = None, err: TextIO | None = None,
                 uid: int | None = None, gid: int | None = None) -> int:
    """Validate ``path`` as ``twistd popproxy -c PATH --check`` does, with the same function: 0 if good, 1 if not.

    ``uid``/``gid``: the user and group the service runs as (twistd's ``-u``/``-g``, or the unit's
    ``User=``/``Group=``): as root, every file a reload reads is opened as them, as ``--check`` does.
    ``out``, ``err``: where the verdict goes (default: standard output, standard error)."""
    from .build import unreadable_files
    from .config import ConfigError
    from .tap import validated_config  # the one validation --check, start and reload share

    try:
        config = validated_config(path)
        problems = unreadable_files(config, uid, gid)
    except ConfigError as error:
        problems = [error]
    for problem in problems:
        print(f"popproxy: configuration error: {problem}", file=err or sys.stderr)
    if problems:
        return 1
    print(f"popproxy: {config.path}: configuration OK", file=out or sys.stdout)
    return 0


def _check(args: argparse.Namespace) -> int:
    import grp
    import pwd

    uid = gid = None
    try:
        if args.user is not None:
            entry = pwd.getpwnam(args.user) if not args.user.isdigit() else pwd.getpwuid(int(args.user))
            uid, gid = entry.pw_uid, entry.pw_gid
        if args.group is not None:
            gid = grp.getgrnam(args.group).gr_gid if not args.group.isdigit() else int(args.group)
    except KeyError as error:
        print(f"popproxy: no such user or group: {error.args[0]}", file=sys.stderr)
        return 1
    return check_config(args.file, uid=uid, gid=gid)


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the TOML configuration to validate")
    parser.add_argument("-u", "--user", help="the user the service runs as (as root: check that it can read every "
                        "certificate, key and file a reload reads), e.g. popproxy")
    parser.add_argument("-g", "--group", help="its group, when not the user's own")


def _example_config(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(shared_file("popproxy.toml"))
    sys.stdout.flush()
    return 0


def shared_names() -> list[str]:
    """Every file under ``popproxy/share/``, as ``/``-separated names relative to it, sorted."""
    names: list[str] = []

    def walk(folder: Traversable, prefix: str) -> None:
        for item in folder.iterdir():
            if item.is_dir():
                walk(item, f"{prefix}{item.name}/")
            elif item.is_file():
                names.append(prefix + item.name)

    walk(resources.files("popproxy").joinpath("share"), "")
    return sorted(names)


def _share(args: argparse.Namespace) -> int:
    names = shared_names()
    if args.name is None:
        print("\n".join(names))
        return 0
    if args.name not in names:
        print(f"popproxy: no shared file {args.name!r}; `popproxy share` lists them", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(shared_file(*args.name.split("/")))
    sys.stdout.flush()
    return 0


def _share_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", nargs="?", help="the file to print, e.g. popproxy.service (default: list them)")


def plugin_cache_problems() -> list[str]:
    """Build twistd's plugin cache (``dropin.cache``) in every ``twisted/plugins`` folder on the path, as the
    first ``twistd`` run would, and return the folders whose cache is still missing or stale.

    Twisted writes the cache lazily, beside the plugin files, the first time a process looks for plugins
    (``twisted.plugin.getCache``); pip runs no post-install step, so after ``pip install`` it does not exist
    yet. A service that runs as an unprivileged user cannot write there, and logs "Unable to write to plugin
    cache" (and imports every plugin module) on each start. Run this as the user who installed popproxy.
    """
    from twisted.plugin import getCache
    from twisted.python.modules import getModule

    from twisted import plugins

    getCache(plugins)  # writes each folder's dropin.cache when it is missing or older than a plugin file
    folders: dict[str, list[float]] = {}
    for module in getModule(plugins.__name__).iterModules():
        folders.setdefault(module.filePath.parent().path, []).append(module.filePath.getModificationTime())
    problems = []
    for folder, times in sorted(folders.items()):
        cache = os.path.join(folder, "dropin.cache")
        if not os.path.exists(cache) or os.path.getmtime(cache) < max(times):
            problems.append(folder)
    return problems


def _install_plugin_cache(args: argparse.Namespace) -> int:
    problems = plugin_cache_problems()
    for folder in problems:
        print(f"popproxy: cannot write {os.path.join(folder, 'dropin.cache')}: run this as the user who installed popproxy",
              file=sys.stderr)
    if problems:
        return 1
    print("popproxy: twistd's plugin cache is up to date")
    return 0


COMMANDS: list[Command] = [
    Command(
        "check",
        "validate a configuration file (TOML, endpoints, certificates, hooks) without listening, "
        "as `twistd popproxy -c FILE --check` does",
        _check,
        _check_arguments,
    ),
    Command("example-config", "print the commented example configuration (every key, with its default)", _example_config),
    Command(
        "share",
        "list the files popproxy ships (example configuration, systemd units, HAProxy example, Grafana dashboard, "
        "logrotate file, docs, man page), or print the one named",
        _share,
        _share_arguments,
    ),
    Command(
        "install-plugin-cache",
        "build twistd's plugin cache (dropin.cache) beside the installed plugin; run it after each install or "
        "upgrade, as the installing user, so that a service running as another user need not write it",
        _install_plugin_cache,
    ),
]


def _sessions(args: argparse.Namespace) -> int:
    from .admin import run_sessions

    return run_sessions(args)


def _sessions_arguments(parser: argparse.ArgumentParser) -> None:
    from .admin import add_sessions_arguments

    add_sessions_arguments(parser)


def _reload(args: argparse.Namespace) -> int:
    from .admin import run_reload

    return run_reload(args)


def _reload_arguments(parser: argparse.ArgumentParser) -> None:
    from .admin import add_connection_arguments

    add_connection_arguments(parser)


# The running proxy, over its admin socket (popproxy.admin; root or the service's group).
COMMANDS += [
    Command("sessions", "list the running proxy's live sessions (user, client, upstream, since, bytes), or end one "
            "with --end ID (no QUIT upstream: nothing is deleted)", _sessions, _sessions_arguments),
    Command("reload", "reload the running proxy's configuration as SIGHUP does, and wait for the outcome: exit 0 "
            "applied, 1 refused (the reason on standard error), 2 the proxy could not be asked (systemd's ExecReload)",
            _reload, _reload_arguments),
]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="popproxy",
        description="Tools for the popproxy POP3 proxy. The proxy itself runs under twistd: `twistd popproxy -c FILE`.",
    )
    top.add_argument("--version", action="version", version=version_line())
    subparsers = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point: ``popproxy [--version] COMMAND ...``."""
    args = parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
