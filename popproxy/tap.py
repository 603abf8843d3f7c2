"""``twistd popproxy``: command-line options and the service they build.

The only module that reads the command line. Everything below it receives a validated
``ProxyConfig`` and an explicit reactor.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, ProxyConfig, load_config

DEFAULT_CONFIG = "/etc/popproxy/popproxy.toml"


class Options(usage.Options):
    synopsis = "[-c FILE] [--check]"
    longdesc = (
        "Run the popproxy POP3 proxy. Listeners, upstreams, routing and limits come from the TOML "
        "file given with --config (see conf/popproxy.toml for every key). With --check, validate the "
        "file, including every certificate and key, and exit: 0 if it is good, 1 with the file, the "
        "key and the reason if not."
    )
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path to the TOML configuration file."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration (TOML, endpoints, TLS files) and exit."],
    ]

    config: ProxyConfig
    #: twistd's own options (``-u``, ``-g``, ...): ``usage.Options`` sets this on a subcommand's options
    parent: usage.Options | None = None

    def postOptions(self) -> None:
        # Validation happens here, before twistd writes a PID file or daemonizes, so that a bad
        # configuration exits non-zero with a one-line reason and no usage dump.
        try:
            self.config = validated_config(self["config"])
        except ConfigError as error:
            print(f"popproxy: configuration error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        if self["check"]:
            print(f"popproxy: {self.config.path}: configuration OK")
            raise SystemExit(0)


def validated_config(path: str, data: bytes | None = None) -> ProxyConfig:
    """Load ``path`` and check everything that can be checked without listening: endpoint strings
    every TLS context (a certificate that does not match its key fails here, not at the first
    handshake), and every hook. ``data``: the file's content, if it was read already."""
    from twisted.internet import reactor

    from .hooks.registry import build_hooks
    from .listeners import check_endpoints
    from .tls import check_tls

    config = load_config(path, data)
    check_endpoints(reactor, config)
    check_tls(config)
    for built in build_hooks(config):  # every hook's own settings, and that it loads at all
        built.close()
        if config.process.workers > 1 and built.gatekeeper is not None:
            # A worker's audit lines are written by the parent, which cannot yet tell the worker
            # that a write failed: refusing mail while records are lost needs one process.
            raise ConfigError(config.path, f"{built.config.key}.on_write_error",
                              '"refuse" needs [process] workers = 1 (the workers\' parent writes the '
                              "audit file and cannot stop them moving mail yet)")
    return config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    if options.config.process.workers > 1:
        import pwd

        from .workers import WorkerPool

        # twistd's own -u/-g/--euid (this plugin's parent options): the workers drop to them too.
        twistd: Mapping[str, Any] = options.parent or {}
        uid, gid = twistd.get("uid"), twistd.get("gid")
        if uid is not None and gid is None:
            gid = pwd.getpwuid(uid).pw_gid  # as twistd does
        return WorkerPool(options.config, reactor, uid, gid, bool(twistd.get("euid")))
    from .service import ProxyService

    return ProxyService(options.config, reactor)
