"""Small configurations for tests, written to a temporary folder and loaded the real way."""

from __future__ import annotations

from pathlib import Path

from popproxy.config import ProxyConfig, load_config
from popproxy.pki import CertificateAuthority, write_private

_CA: CertificateAuthority | None = None

#: The smallest valid configuration, for tests that add a [[hook]] table to it and parse the text.
PREAMBLE = """
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"

[upstream.main]
address = "127.0.0.1:1110"
tls = "none"

[routing]
default = "main"
"""



def shared_ca() -> CertificateAuthority:
    """One throwaway CA per test process (key generation is cheap, but not free)."""
    global _CA
    if _CA is None:
        _CA = CertificateAuthority.create("popproxy test CA")
    return _CA


def write_certificate(folder: Path, name: str = "proxy.pem", names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Path:
    return write_private(folder / name, shared_ca().issue(names).combined_pem)


def proxy_config(
    folder: Path,
    *,
    listeners: list[dict[str, object]] | None = None,
    upstreams: dict[str, dict[str, object]] | None = None,
    routing: str = 'default = "main"',
    extra: str = "",
) -> ProxyConfig:
    """Write a popproxy TOML file into ``folder`` and load it with ``load_config``.

    ``listeners`` and ``upstreams`` are tables of TOML values; a listener with TLS gets a fresh
    certificate unless it names one.
    """
    listeners = listeners or [{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "none"}]
    upstreams = upstreams or {"main": {"address": "127.0.0.1:1110", "tls": "none"}}
    parts = []
    for listener in listeners:
        listener = dict(listener)
        if listener.get("tls", "none") != "none" and "certificate" not in listener:
            listener["certificate"] = str(write_certificate(folder))
        parts.append("[[listen]]\n" + _table(listener))
    for name, table in upstreams.items():
        parts.append(f"[upstream.{name}]\n" + _table(table))
    parts.append("[routing]\n" + routing)
    parts.append(extra)
    path = folder / "popproxy.toml"
    path.write_text("\n\n".join(parts) + "\n")
    return load_config(path)


def _table(values: dict[str, object]) -> str:
    return "".join(f"{key} = {_toml(value)}\n" for key, value in values.items())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
