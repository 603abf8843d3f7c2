"""popproxy.config: the TOML contract, every rule with the key and reason it reports."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popproxy.config import (
    Address,
    ConfigError,
    LimitsConfig,
    ListenerConfig,
    ProxyConfig,
    RoutingConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).parent.parent / "conf" / "popproxy.toml"

# A minimal valid configuration, as sections of key -> raw TOML value, so that each failing case
# states only what it changes (None deletes a key).
LISTEN = {"endpoint": '"tcp:110"', "tls": '"starttls"', "certificate": '"tls.pem"'}
UPSTREAM = {"address": '"mail.internal:110"', "tls": '"none"'}
ROUTING = {"default": '"legacy"'}


def config_text(
    listen: dict[str, str | None] | None = None,
    upstream: dict[str, str | None] | None = None,
    routing: dict[str, str | None] | None = None,
    top: str = "",
    extra: str = "",
) -> str:
    """TOML text for the minimal configuration with some keys changed; ``extra`` goes at the end."""
    lines = [top]
    for header, base, changes in (
        ("[[listen]]", LISTEN, listen),
        ("[upstream.legacy]", UPSTREAM, upstream),
        ("[routing]", ROUTING, routing),
    ):
        lines.append(header)
        merged = {**base, **(changes or {})}
        lines += [f"{key} = {value}" for key, value in merged.items() if value is not None]
    return "\n".join(lines) + "\n" + extra + "\n"


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    """A directory holding the files the configurations name (config.py only checks they exist)."""
    for name in ("tls.pem", "other.pem", "ca.pem"):
        (tmp_path / name).write_text("PEM\n")
    return tmp_path


def parse(text: str, conf_dir: Path) -> ProxyConfig:
    return parse_config(text, conf_dir / "popproxy.toml")


def config_error(text: str, conf_dir: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text, conf_dir)
    return caught.value


# --- the happy paths ---------------------------------------------------------------------------------

FULL = """
[[listen]]
endpoint = "tcp:110"
tls = "starttls"
certificate = "tls.pem"
tls_min_version = "1.3"
require_tls = false

[[listen]]
endpoint = "haproxy:tcp6:995"
tls = "implicit"
certificate = ["tls.pem", "/ABS/other.pem"]
proxy_from = ["10.0.0.0/8", "fd00::/8"]

[[listen]]
endpoint = "unix:/run/popproxy.sock"
tls = "none"

[upstream.legacy]
address = ["mail1.internal:110", "[2001:db8::1]:110"]
tls = "starttls"
connect_timeout = 2.5
ca = "ca.pem"
login_as = "{local}"

[upstream.hosted]
address = "pop.example.net:995"
tls = "implicit"
verify = false
server_name = "pop.example.com"

[routing]
default = "legacy"
[routing.users]
"boss@example.org" = "hosted"
"@Example.NET" = "hosted"

[limits]
login_timeout = 30
idle_timeout = 900.5
"""


def test_full_config_parses_to_the_expected_objects(conf_dir: Path) -> None:
    config = parse(FULL.replace("/ABS", str(conf_dir)), conf_dir)

    assert config == ProxyConfig(
        path=conf_dir / "popproxy.toml",
        listeners=(
            ListenerConfig(
                key="listen[0]",
                endpoint="tcp:110",
                tls="starttls",
                certificates=(conf_dir / "tls.pem",),
                tls_min_version="1.3",
                require_tls=False,
                proxy_from=(),
            ),
            ListenerConfig(
                key="listen[1]",
                endpoint="haproxy:tcp6:995",
                tls="implicit",
                certificates=(conf_dir / "tls.pem", conf_dir / "other.pem"),
                tls_min_version="1.2",
                require_tls=False,
                proxy_from=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
            ),
            ListenerConfig(
                key="listen[2]",
                endpoint="unix:/run/popproxy.sock",
                tls="none",
                certificates=(),
                tls_min_version="1.2",
                require_tls=False,
                proxy_from=(),
            ),
        ),
        upstreams={
            "legacy": UpstreamConfig(
                name="legacy",
                addresses=(Address("mail1.internal", 110), Address("2001:db8::1", 110)),
                tls="starttls",
                connect_timeout=2.5,
                verify=True,
                ca=conf_dir / "ca.pem",
                server_name="mail1.internal",
                login_as="{local}",
            ),
            "hosted": UpstreamConfig(
                name="hosted",
                addresses=(Address("pop.example.net", 995),),
                tls="implicit",
                connect_timeout=10.0,
                verify=False,
                ca=None,
                server_name="pop.example.com",
                login_as="{user}",
            ),
        },
        routing=RoutingConfig(
            default="legacy", users={"boss@example.org": "hosted"}, domains={"example.net": "hosted"}
        ),
        limits=LimitsConfig(login_timeout=30.0, idle_timeout=900.5),
    )
    assert [listener.haproxy for listener in config.listeners] == [False, True, False]
    assert config.listeners[1].inner_endpoint == "tcp6:995"
    assert config.listeners[0].inner_endpoint == "tcp:110"


def test_defaults(conf_dir: Path) -> None:
    config = parse(config_text(listen={"endpoint": '"haproxy:tcp:110"'}), conf_dir)

    (listener,) = config.listeners
    assert listener.tls_min_version == "1.2"
    assert listener.require_tls is True
    assert listener.proxy_from == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    upstream = config.upstreams["legacy"]
    assert (upstream.connect_timeout, upstream.verify, upstream.ca) == (10.0, True, None)
    assert upstream.server_name == "mail.internal"
    assert upstream.login_as == "{user}"
    assert config.limits == LimitsConfig(login_timeout=60.0, idle_timeout=600.0)
    assert (config.limits.proxy_header_timeout, config.limits.message_cache, config.limits.max_listing) == (
        10.0,
        67108864,
        8388608,
    )
    assert config.routing == RoutingConfig(default="legacy", users={}, domains={})
    assert config.routing.user_case == "lower"


def test_new_limits_and_user_case_take_valid_values(conf_dir: Path) -> None:
    text = config_text(
        routing={"user_case": '"preserve"'},
        extra="[limits]\nproxy_header_timeout = 3\nmessage_cache = 1048576\nmax_listing = 65536",
    )
    config = parse(text, conf_dir)
    assert config.limits == LimitsConfig(proxy_header_timeout=3.0, message_cache=1048576, max_listing=65536)
    assert isinstance(config.limits.proxy_header_timeout, float)
    assert config.routing.user_case == "preserve"
    assert parse(config_text(routing={"user_case": '"lower"'}), conf_dir).routing.user_case == "lower"
    fractional = parse(config_text(extra="[limits]\nproxy_header_timeout = 0.5"), conf_dir)
    assert fractional.limits.proxy_header_timeout == 0.5


def test_integer_seconds_become_floats(conf_dir: Path) -> None:
    config = parse(config_text(upstream={"connect_timeout": "3"}), conf_dir)
    assert config.upstreams["legacy"].connect_timeout == 3.0
    assert isinstance(config.upstreams["legacy"].connect_timeout, float)


def test_config_objects_are_read_only(conf_dir: Path) -> None:
    config = parse(config_text(), conf_dir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].tls = "none"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.upstreams["other"] = config.upstreams["legacy"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.routing.users["x"] = "legacy"  # type: ignore[index]


def test_relative_paths_resolve_against_the_config_directory(
    conf_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (conf_dir / "popproxy.toml").write_text(
        config_text(upstream={"tls": '"starttls"', "ca": '"ca.pem"'}), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))

    config = load_config(conf_dir / "popproxy.toml")

    assert config.path == conf_dir / "popproxy.toml"
    assert config.listeners[0].certificates == (conf_dir / "tls.pem",)
    assert config.upstreams["legacy"].ca == conf_dir / "ca.pem"


def test_load_config_makes_the_path_absolute(conf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (conf_dir / "popproxy.toml").write_text(config_text(), encoding="utf-8")
    monkeypatch.chdir(conf_dir)

    config = load_config("popproxy.toml")

    assert config.path.is_absolute()
    assert config.listeners[0].certificates == (conf_dir / "tls.pem",)


def test_the_example_configuration_loads(tmp_path: Path) -> None:
    """conf/popproxy.toml must stay valid: copy it and create every file it names (relative names)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    names = [upstream["ca"] for upstream in data["upstream"].values() if "ca" in upstream]
    for listener in data["listen"]:
        certificate = listener.get("certificate", [])
        names += [certificate] if isinstance(certificate, str) else certificate
    assert names, "the example should name certificate files"
    for name in names:
        assert not Path(name).is_absolute(), "keep the example's file names relative, so this test can run"
        (tmp_path / name).write_text("PEM\n")
    (tmp_path / "popproxy.toml").write_text(text, encoding="utf-8")

    config = load_config(tmp_path / "popproxy.toml")

    assert {listener.tls for listener in config.listeners} == {"starttls", "implicit"}
    assert any(listener.haproxy for listener in config.listeners)
    assert any(len(listener.certificates) > 1 for listener in config.listeners)
    assert config.routing.route("someone@example.net") == "hosted"
    assert config.routing.route("someone@elsewhere.org") == "legacy"
    assert config.routing.route(config.routing.normalise("Boss@Example.ORG")) == "hosted"


def test_workers_default_to_one_and_take_a_count(conf_dir: Path) -> None:
    assert parse(config_text(), conf_dir).process.workers == 1
    assert parse(config_text(extra="[process]\nworkers = 4"), conf_dir).process.workers == 4
    assert "\n#[process]\n#workers = 2" in EXAMPLE.read_text(encoding="utf-8")


def test_the_example_configuration_documents_every_limit_and_user_case() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for spec in dataclasses.fields(LimitsConfig):
        assert f"\n{spec.name} = " in text and f"# {spec.name} (default " in text, spec.name
    assert '\nuser_case = "lower"' in text and '# user_case (default "lower")' in text
    assert "# Memory." in text


# --- failing configurations: exact key, meaningful reason --------------------------------------------

LISTEN_ONLY = config_text().split("[upstream.legacy]")[0]
UPSTREAM_AND_ROUTING = "[upstream.legacy]" + config_text().split("[upstream.legacy]")[1]

CASES = [
    # top level and table shapes
    ("unknown-top-key", config_text(top="debug = true"), "debug", "unknown key"),
    ("no-listen", UPSTREAM_AND_ROUTING, "listen", "at least one [[listen]] table is required"),
    ("listen-empty", "listen = []\n" + UPSTREAM_AND_ROUTING, "listen", "at least one [[listen]]"),
    ("listen-not-array", config_text().replace("[[listen]]", "[listen]"), "listen", "must be an array"),
    (
        "listen-item-not-table",
        'listen = ["tcp:110"]\n' + UPSTREAM_AND_ROUTING,
        "listen[0]",
        "must be a table, not string 'tcp:110'",
    ),
    ("no-upstream", LISTEN_ONLY, "upstream", "at least one [upstream.NAME] table is required"),
    # processes
    ("workers-zero", config_text(extra="[process]\nworkers = 0"), "process.workers", "between 1 and 64, not 0"),
    ("workers-many", config_text(extra="[process]\nworkers = 65"), "process.workers", "between 1 and 64, not 65"),
    ("workers-string", config_text(extra='[process]\nworkers = "2"'), "process.workers", "must be an integer"),
    ("process-unknown", config_text(extra="[process]\nthreads = 2"), "process.threads", "unknown key"),
    ("upstream-not-table", 'upstream = "mail:110"\n' + LISTEN_ONLY, "upstream", "must be a table"),
    (
        "upstream-entry-not-table",
        LISTEN_ONLY + '[upstream]\nlegacy = "mail:110"\n',
        "upstream.legacy",
        "must be a table",
    ),
    # listeners
    ("listen-unknown-key", config_text(listen={"port": "110"}), "listen[0].port", "unknown key"),
    (
        "listen-typo-hint",
        config_text(listen={"certificat": '"x"'}),
        "listen[0].certificat",
        "did you mean 'certificate'",
    ),
    ("endpoint-missing", config_text(listen={"endpoint": None}), "listen[0].endpoint", "required"),
    (
        "endpoint-not-string",
        config_text(listen={"endpoint": "110"}),
        "listen[0].endpoint",
        "must be a string, not integer 110",
    ),
    (
        "endpoint-ssl",
        config_text(listen={"endpoint": '"ssl:995"'}),
        "listen[0].endpoint",
        "TLS comes from the listener's tls key",
    ),
    (
        "endpoint-tls",
        config_text(listen={"endpoint": '"tls:995"'}),
        "listen[0].endpoint",
        "TLS comes from the listener's tls key",
    ),
    (
        "endpoint-haproxy-ssl",
        config_text(listen={"endpoint": '"haproxy:ssl:995"'}),
        "listen[0].endpoint",
        '"ssl:" endpoints are not allowed',
    ),
    (
        "endpoint-unknown-type",
        config_text(listen={"endpoint": '"udp:110"'}),
        "listen[0].endpoint",
        "must be one of tcp, tcp6, unix, systemd",
    ),
    ("endpoint-bare-port", config_text(listen={"endpoint": '"110"'}), "listen[0].endpoint", "not '110'"),
    (
        "endpoint-double-haproxy",
        config_text(listen={"endpoint": '"haproxy:haproxy:tcp:1"'}),
        "listen[0].endpoint",
        "not 'haproxy'",
    ),
    (
        "endpoint-no-arguments",
        config_text(listen={"endpoint": '"tcp"'}),
        "listen[0].endpoint",
        "lacks its arguments",
    ),
    ("listen-tls-missing", config_text(listen={"tls": None}), "listen[0].tls", "required"),
    (
        "listen-tls-invalid",
        config_text(listen={"tls": '"ssl"'}),
        "listen[0].tls",
        'must be one of "none", "starttls", "implicit"',
    ),
    ("listen-tls-not-string", config_text(listen={"tls": "true"}), "listen[0].tls", "not boolean True"),
    ("certificate-missing", config_text(listen={"certificate": None}), "listen[0].certificate", "required"),
    (
        "certificate-no-file",
        config_text(listen={"certificate": '"nope.pem"'}),
        "listen[0].certificate",
        "nope.pem: no such file",
    ),
    (
        "certificate-directory",
        config_text(listen={"certificate": '"."'}),
        "listen[0].certificate",
        "not a regular file",
    ),
    (
        "certificate-empty-name",
        config_text(listen={"certificate": '""'}),
        "listen[0].certificate",
        "must not be empty",
    ),
    (
        "certificate-empty-list",
        config_text(listen={"certificate": "[]"}),
        "listen[0].certificate",
        "must not be an empty array",
    ),
    (
        "certificate-list-missing-file",
        config_text(listen={"certificate": '["tls.pem", "nope.pem"]'}),
        "listen[0].certificate[1]",
        "no such file",
    ),
    (
        "certificate-list-not-string",
        config_text(listen={"certificate": "[1]"}),
        "listen[0].certificate[0]",
        "must be a string",
    ),
    (
        "certificate-not-string",
        config_text(listen={"certificate": "{a = 1}"}),
        "listen[0].certificate",
        "must be a string or an array of strings, not a table",
    ),
    (
        "certificate-on-plain",
        config_text(listen={"tls": '"none"'}),
        "listen[0].certificate",
        'has no effect with tls = "none"',
    ),
    (
        "min-version-on-plain",
        config_text(listen={"tls": '"none"', "certificate": None, "tls_min_version": '"1.3"'}),
        "listen[0].tls_min_version",
        'has no effect with tls = "none"',
    ),
    (
        "min-version-invalid",
        config_text(listen={"tls_min_version": '"1.1"'}),
        "listen[0].tls_min_version",
        'must be one of "1.2", "1.3"',
    ),
    (
        "min-version-float",
        config_text(listen={"tls_min_version": "1.3"}),
        "listen[0].tls_min_version",
        "not float 1.3",
    ),
    (
        "require-tls-not-bool",
        config_text(listen={"require_tls": '"yes"'}),
        "listen[0].require_tls",
        "must be a boolean",
    ),
    (
        "tickets-on-plain",
        config_text(listen={"tls": '"none"', "certificate": None, "session_tickets": "false"}),
        "listen[0].session_tickets",
        'has no effect with tls = "none"',
    ),
    (
        "ticket-lifetime-without-tickets",
        config_text(listen={"session_tickets": "false", "ticket_key_lifetime": "60"}),
        "listen[0].ticket_key_lifetime",
        "has no effect with session_tickets = false",
    ),
    (
        "ticket-lifetime-zero",
        config_text(listen={"ticket_key_lifetime": "0"}),
        "listen[0].ticket_key_lifetime",
        "greater than 0",
    ),
    (
        "tickets-not-bool",
        config_text(listen={"session_tickets": '"on"'}),
        "listen[0].session_tickets",
        "must be a boolean",
    ),
    (
        "require-tls-int",
        config_text(listen={"require_tls": "1"}),
        "listen[0].require_tls",
        "must be a boolean (true or false), not integer 1",
    ),
    (
        "require-tls-on-plain",
        config_text(listen={"tls": '"none"', "certificate": None, "require_tls": "true"}),
        "listen[0].require_tls",
        'only applies to tls = "starttls"',
    ),
    (
        "require-tls-on-implicit",
        config_text(listen={"tls": '"implicit"', "require_tls": "false"}),
        "listen[0].require_tls",
        'only applies to tls = "starttls"',
    ),
    (
        "proxy-from-without-haproxy",
        config_text(listen={"proxy_from": '["127.0.0.1/32"]'}),
        "listen[0].proxy_from",
        'only applies to "haproxy:" endpoints',
    ),
    (
        "proxy-from-not-array",
        config_text(listen={"endpoint": '"haproxy:tcp:110"', "proxy_from": '"127.0.0.1/32"'}),
        "listen[0].proxy_from",
        "must be an array",
    ),
    (
        "proxy-from-empty",
        config_text(listen={"endpoint": '"haproxy:tcp:110"', "proxy_from": "[]"}),
        "listen[0].proxy_from",
        "must not be empty",
    ),
    (
        "proxy-from-bad-network",
        config_text(
            listen={"endpoint": '"haproxy:tcp:110"', "proxy_from": '["127.0.0.1/32", "10.0.0.300/8"]'}
        ),
        "listen[0].proxy_from[1]",
        "does not appear to be an IPv4 or IPv6 network",
    ),
    (
        "proxy-from-host-bits",
        config_text(listen={"endpoint": '"haproxy:tcp:110"', "proxy_from": '["10.0.0.1/8"]'}),
        "listen[0].proxy_from[0]",
        "has host bits set",
    ),
    (
        "proxy-from-not-string",
        config_text(listen={"endpoint": '"haproxy:tcp:110"', "proxy_from": "[1]"}),
        "listen[0].proxy_from[0]",
        "must be a string",
    ),
    (
        "second-listener-reported-by-index",
        config_text(extra='[[listen]]\nendpoint = "tcp:111"\ntls = "bogus"'),
        "listen[1].tls",
        "must be one of",
    ),
    # upstreams
    (
        "upstream-bad-name",
        config_text().replace("[upstream.legacy]", '[upstream."le gacy"]'),
        "upstream.le gacy",
        "may only use letters",
    ),
    ("upstream-unknown-key", config_text(upstream={"port": "110"}), "upstream.legacy.port", "unknown key"),
    ("address-missing", config_text(upstream={"address": None}), "upstream.legacy.address", "required"),
    (
        "address-no-port",
        config_text(upstream={"address": '"mail.internal"'}),
        "upstream.legacy.address",
        'expected "host:port"',
    ),
    (
        "address-empty-host",
        config_text(upstream={"address": '":110"'}),
        "upstream.legacy.address",
        'expected "host:port"',
    ),
    (
        "address-port-zero",
        config_text(upstream={"address": '"mail:0"'}),
        "upstream.legacy.address",
        "port must be a number from 1 to 65535",
    ),
    (
        "address-port-too-big",
        config_text(upstream={"address": '"mail:65536"'}),
        "upstream.legacy.address",
        "port must be a number",
    ),
    (
        "address-port-name",
        config_text(upstream={"address": '"mail:pop3"'}),
        "upstream.legacy.address",
        "port must be a number",
    ),
    (
        "address-space",
        config_text(upstream={"address": '"mail host:110"'}),
        "upstream.legacy.address",
        "white space",
    ),
    (
        "address-ipv6-bare",
        config_text(upstream={"address": '"::1:110"'}),
        "upstream.legacy.address",
        "in brackets",
    ),
    (
        "address-ipv6-not-v6",
        config_text(upstream={"address": '"[mail]:110"'}),
        "upstream.legacy.address",
        "is not an IPv6 address",
    ),
    (
        "address-ipv6-no-port",
        config_text(upstream={"address": '"[::1]"'}),
        "upstream.legacy.address",
        'expected "[IPv6 address]:port"',
    ),
    (
        "address-empty-list",
        config_text(upstream={"address": "[]"}),
        "upstream.legacy.address",
        "must not be an empty array",
    ),
    (
        "address-list-item",
        config_text(upstream={"address": '["a:110", "b"]'}),
        "upstream.legacy.address[1]",
        'expected "host:port"',
    ),
    (
        "address-list-not-string",
        config_text(upstream={"address": '["a:110", 110]'}),
        "upstream.legacy.address[1]",
        "must be a string",
    ),
    ("upstream-tls-missing", config_text(upstream={"tls": None}), "upstream.legacy.tls", "required"),
    (
        "upstream-tls-invalid",
        config_text(upstream={"tls": '"STARTTLS"'}),
        "upstream.legacy.tls",
        "must be one of",
    ),
    (
        "timeout-zero",
        config_text(upstream={"connect_timeout": "0"}),
        "upstream.legacy.connect_timeout",
        "greater than 0",
    ),
    (
        "timeout-negative",
        config_text(upstream={"connect_timeout": "-1.5"}),
        "upstream.legacy.connect_timeout",
        "greater than 0",
    ),
    (
        "timeout-nan",
        config_text(upstream={"connect_timeout": "nan"}),
        "upstream.legacy.connect_timeout",
        "greater than 0",
    ),
    (
        "timeout-inf",
        config_text(upstream={"connect_timeout": "inf"}),
        "upstream.legacy.connect_timeout",
        "greater than 0",
    ),
    (
        "timeout-bool",
        config_text(upstream={"connect_timeout": "true"}),
        "upstream.legacy.connect_timeout",
        "must be a number, not boolean True",
    ),
    (
        "timeout-string",
        config_text(upstream={"connect_timeout": '"10"'}),
        "upstream.legacy.connect_timeout",
        "not string '10'",
    ),
    (
        "verify-on-plain",
        config_text(upstream={"verify": "true"}),
        "upstream.legacy.verify",
        'has no effect with tls = "none"',
    ),
    (
        "ca-on-plain",
        config_text(upstream={"ca": '"ca.pem"'}),
        "upstream.legacy.ca",
        'has no effect with tls = "none"',
    ),
    (
        "server-name-on-plain",
        config_text(upstream={"server_name": '"mail"'}),
        "upstream.legacy.server_name",
        'has no effect with tls = "none"',
    ),
    (
        "verify-not-bool",
        config_text(upstream={"tls": '"starttls"', "verify": '"no"'}),
        "upstream.legacy.verify",
        "must be a boolean",
    ),
    (
        "verify-int",
        config_text(upstream={"tls": '"starttls"', "verify": "0"}),
        "upstream.legacy.verify",
        "must be a boolean (true or false), not integer 0",
    ),
    (
        "ca-missing-file",
        config_text(upstream={"tls": '"implicit"', "ca": '"nope.pem"'}),
        "upstream.legacy.ca",
        "nope.pem: no such file",
    ),
    (
        "ca-without-verify",
        config_text(upstream={"tls": '"implicit"', "verify": "false", "ca": '"ca.pem"'}),
        "upstream.legacy.ca",
        "has no effect with verify = false",
    ),
    (
        "server-name-empty",
        config_text(upstream={"tls": '"implicit"', "server_name": '""'}),
        "upstream.legacy.server_name",
        "is not a host name",
    ),
    (
        "server-name-brackets",
        config_text(upstream={"tls": '"implicit"', "server_name": '"[::1]"'}),
        "upstream.legacy.server_name",
        "no brackets",
    ),
    (
        "login-as-unknown",
        config_text(upstream={"login_as": '"{email}"'}),
        "upstream.legacy.login_as",
        "{email} is not allowed: the only placeholders are {user}, {local}, {domain}",
    ),
    (
        "login-as-positional",
        config_text(upstream={"login_as": '"{}"'}),
        "upstream.legacy.login_as",
        "{} is not allowed",
    ),
    (
        "login-as-attribute",
        config_text(upstream={"login_as": '"{user.__class__}"'}),
        "upstream.legacy.login_as",
        "{user.__class__} is not allowed",
    ),
    (
        "login-as-index",
        config_text(upstream={"login_as": '"{user[0]}"'}),
        "upstream.legacy.login_as",
        "{user[0]} is not allowed",
    ),
    (
        "login-as-conversion",
        config_text(upstream={"login_as": '"{user!r}"'}),
        "upstream.legacy.login_as",
        "{user!r} is not allowed",
    ),
    (
        "login-as-format-spec",
        config_text(upstream={"login_as": '"{user:>20}"'}),
        "upstream.legacy.login_as",
        "{user:>20} is not allowed",
    ),
    (
        "login-as-unbalanced",
        config_text(upstream={"login_as": '"{user"'}),
        "upstream.legacy.login_as",
        "is not a valid template",
    ),
    (
        "login-as-empty",
        config_text(upstream={"login_as": '""'}),
        "upstream.legacy.login_as",
        "must not be empty",
    ),
    # routing
    ("routing-unknown-key", config_text(routing={"fallback": '"legacy"'}), "routing.fallback", "unknown key"),
    (
        "routing-default-unknown",
        config_text(routing={"default": '"nope"'}),
        "routing.default",
        "unknown upstream 'nope' (defined: legacy)",
    ),
    (
        "routing-default-not-string",
        config_text(routing={"default": "1"}),
        "routing.default",
        "must be a string",
    ),
    ("routing-no-routes", config_text(routing={"default": None}), "routing", "no routes"),
    ("routing-missing", config_text().replace('[routing]\ndefault = "legacy"', ""), "routing", "no routes"),
    (
        "user-case-unknown",
        config_text(routing={"user_case": '"upper"'}),
        "routing.user_case",
        'must be one of "lower", "preserve", not string \'upper\'',
    ),
    (
        "user-case-casefold",
        config_text(routing={"user_case": '"casefold"'}),
        "routing.user_case",
        'must be one of "lower", "preserve"',
    ),
    (
        "user-case-not-string",
        config_text(routing={"user_case": "true"}),
        "routing.user_case",
        "not boolean True",
    ),
    (
        "user-case-typo",
        config_text(routing={"usercase": '"lower"'}),
        "routing.usercase",
        "did you mean 'user_case'",
    ),
    (
        "route-users-collide-when-lowered",
        config_text(extra='[routing.users]\n"User177" = "legacy"\n"user177" = "legacy"'),
        "routing.users.user177",
        "same user as 'User177' once normalised to 'user177' (user_case = \"lower\")",
    ),
    (
        "route-users-collide-by-domain-when-preserved",
        config_text(
            routing={"user_case": '"preserve"'},
            extra='[routing.users]\n"Alice@Example.org" = "legacy"\n"Alice@example.ORG" = "legacy"',
        ),
        "routing.users.Alice@example.ORG",
        "same user as 'Alice@Example.org' once normalised to 'Alice@example.org' (user_case = \"preserve\")",
    ),
    (
        "routing-users-not-table",
        config_text(routing={"users": '"legacy"'}),
        "routing.users",
        "must be a table",
    ),
    (
        "route-unknown-upstream",
        config_text(extra='[routing.users]\n"@example.org" = "nope"'),
        "routing.users.@example.org",
        "unknown upstream 'nope'",
    ),
    (
        "route-user-unknown-upstream",
        config_text(extra='[routing.users]\n"alice" = "nope"'),
        "routing.users.alice",
        "unknown upstream 'nope'",
    ),
    (
        "route-not-string",
        config_text(extra='[routing.users]\n"alice" = 1'),
        "routing.users.alice",
        "must be an upstream name (a string), not integer 1",
    ),
    (
        "route-bare-at",
        config_text(extra='[routing.users]\n"@" = "legacy"'),
        "routing.users.@",
        'must look like "@example.org"',
    ),
    (
        "route-two-ats",
        config_text(extra='[routing.users]\n"@a@b" = "legacy"'),
        "routing.users.@a@b",
        'must look like "@example.org"',
    ),
    (
        "route-empty-user",
        config_text(extra='[routing.users]\n"" = "legacy"'),
        "routing.users.",
        "must be non-empty",
    ),
    (
        "route-user-space",
        config_text(extra='[routing.users]\n"al ice" = "legacy"'),
        "routing.users.al ice",
        "without spaces",
    ),
    (
        "route-duplicate-domain",
        config_text(extra='[routing.users]\n"@example.org" = "legacy"\n"@EXAMPLE.org" = "legacy"'),
        "routing.users.@EXAMPLE.org",
        "same domain as '@example.org'",
    ),
    # limits
    ("limits-not-table", config_text(top="limits = 5"), "limits", "must be a table"),
    ("limits-unknown-key", config_text(extra="[limits]\ntimeout = 5"), "limits.timeout", "unknown key"),
    (
        "login-timeout-zero",
        config_text(extra="[limits]\nlogin_timeout = 0"),
        "limits.login_timeout",
        "greater than 0",
    ),
    (
        "idle-timeout-bool",
        config_text(extra="[limits]\nidle_timeout = true"),
        "limits.idle_timeout",
        "must be a number, not",
    ),
    (
        "idle-timeout-string",
        config_text(extra='[limits]\nidle_timeout = "600"'),
        "limits.idle_timeout",
        "must be a number, not",
    ),
    (
        "proxy-header-timeout-zero",
        config_text(extra="[limits]\nproxy_header_timeout = 0"),
        "limits.proxy_header_timeout",
        "must be a number of seconds greater than 0, not 0",
    ),
    (
        "proxy-header-timeout-negative",
        config_text(extra="[limits]\nproxy_header_timeout = -1.5"),
        "limits.proxy_header_timeout",
        "must be a number of seconds greater than 0, not -1.5",
    ),
    (
        "proxy-header-timeout-string",
        config_text(extra='[limits]\nproxy_header_timeout = "10"'),
        "limits.proxy_header_timeout",
        "must be a number, not string '10'",
    ),
    (
        "proxy-header-timeout-inf",
        config_text(extra="[limits]\nproxy_header_timeout = inf"),
        "limits.proxy_header_timeout",
        "greater than 0",
    ),
    (
        "message-cache-negative",
        config_text(extra="[limits]\nmessage_cache = -1"),
        "limits.message_cache",
        "must be a whole number of at least 1, not -1",
    ),
    (
        "message-cache-zero",
        config_text(extra="[limits]\nmessage_cache = 0"),
        "limits.message_cache",
        "must be a whole number of at least 1, not 0",
    ),
    (
        "message-cache-float",
        config_text(extra="[limits]\nmessage_cache = 1048576.0"),
        "limits.message_cache",
        "must be an integer, not float 1048576.0",
    ),
    (
        "message-cache-bool",
        config_text(extra="[limits]\nmessage_cache = true"),
        "limits.message_cache",
        "must be an integer, not boolean True",
    ),
    (
        "max-listing-negative",
        config_text(extra="[limits]\nmax_listing = -8388608"),
        "limits.max_listing",
        "must be a whole number of at least 1, not -8388608",
    ),
    (
        "max-listing-string",
        config_text(extra='[limits]\nmax_listing = "8 MiB"'),
        "limits.max_listing",
        "must be an integer, not string '8 MiB'",
    ),
    (
        "max-listing-typo",
        config_text(extra="[limits]\nmax_listings = 1"),
        "limits.max_listings",
        "did you mean 'max_listing'",
    ),
    # plaintext_from: named legacy devices on a listener that requires TLS, nothing wider
    (
        "plaintext-from-a-whole-site",
        config_text(listen={"plaintext_from": '["192.0.2.0/23"]'}),
        "listen[0].plaintext_from[0]",
        "192.0.2.0/23 is wider than a /24",
    ),
    (
        "plaintext-from-ipv6-too-wide",
        config_text(listen={"plaintext_from": '["192.0.2.7/32", "2001:db8::/48"]'}),
        "listen[0].plaintext_from[1]",
        "2001:db8::/48 is wider than a /56",
    ),
    (
        "plaintext-from-without-require-tls",
        config_text(listen={"require_tls": "false", "plaintext_from": '["192.0.2.7/32"]'}),
        "listen[0].plaintext_from",
        "require_tls = true",
    ),
    (
        "plaintext-from-host-bits",
        config_text(listen={"plaintext_from": '["192.0.2.7/24"]'}),
        "listen[0].plaintext_from[0]",
        "has host bits set",
    ),
    # syntax
    ("toml-syntax", config_text(extra="[limits\n"), "-", "TOML syntax error"),
    (
        "toml-duplicate-key",
        config_text(extra="[limits]\nlogin_timeout = 1\nlogin_timeout = 2"),
        "-",
        "TOML syntax error",
    ),
]


@pytest.mark.parametrize(("text", "key", "reason"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_invalid_configuration(text: str, key: str, reason: str, conf_dir: Path) -> None:
    error = config_error(text, conf_dir)

    assert (error.key, error.path) == (key, str(conf_dir / "popproxy.toml"))
    assert reason in error.reason
    assert str(error) == f"{conf_dir / 'popproxy.toml'}: {key}: {error.reason}"


def test_toml_syntax_error_gives_line_and_column(conf_dir: Path) -> None:
    error = config_error('[[listen]]\nendpoint = "tcp:110\n', conf_dir)
    assert error.key == "-"
    assert "line 2" in error.reason and "column" in error.reason


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.toml")
    assert caught.value.key == "-"
    assert caught.value.path == str(tmp_path / "missing.toml")
    assert "cannot read" in caught.value.reason


def test_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "popproxy.toml").write_bytes(b'# caf\xe9\n[[listen]]\nendpoint = "tcp:110"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "popproxy.toml")
    assert (caught.value.key, "not UTF-8" in caught.value.reason) == ("-", True)


# --- behaviour of the parsed objects -----------------------------------------------------------------


def routing(**kwargs: object) -> RoutingConfig:
    defaults: dict[str, object] = {"default": None, "users": {}, "domains": {}}
    return RoutingConfig(**{**defaults, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("alice@example.org", "exact"),  # the exact name beats its domain
        ("bob@example.org", "domain"),
        ("bob@EXAMPLE.Org", "domain"),  # domains are case-insensitive
        ("Alice@example.org", "domain"),  # user names are not
        ("x@y@example.org", "domain"),  # the domain is after the last "@"
        ("x@example.org@evil.test", "fallback"),
        ("carol@other.test", "fallback"),
        ("carol", "fallback"),
        ("example.org", "fallback"),
        ("", "fallback"),
    ],
)
def test_route_precedence(user: str, expected: str) -> None:
    config = routing(
        default="fallback", users={"alice@example.org": "exact"}, domains={"example.org": "domain"}
    )
    assert config.route(user) == expected


def test_route_without_default_is_none() -> None:
    config = routing(users={"alice": "a"}, domains={"example.org": "d"})
    assert config.route("alice") == "a"
    assert config.route("bob@other.test") is None
    assert config.route("bob") is None


def test_domain_keys_are_stored_lowercase_without_at(conf_dir: Path) -> None:
    config = parse(config_text(extra='[routing.users]\n"@Example.ORG" = "legacy"'), conf_dir)
    assert dict(config.routing.domains) == {"example.org": "legacy"}
    assert config.routing.route("x@example.org") == "legacy"


@pytest.mark.parametrize(
    ("user_case", "user", "expected"),
    [
        ("lower", "Alice@Example.ORG", "alice@example.org"),
        ("lower", "USER177", "user177"),
        ("lower", "Straße", "straße"),  # str.lower, not casefold ("strasse"), as Dovecot's %Lu
        ("lower", "\u0130", "\u0130".lower()),
        ("lower", "", ""),
        ("preserve", "Alice@Example.ORG", "Alice@example.org"),  # the domain is case-insensitive
        ("preserve", "A@B@C.Example", "A@B@c.example"),  # the domain is after the last "@"
        ("preserve", "Alice", "Alice"),
        ("preserve", "Alice@", "Alice@"),
        ("preserve", "@Example.ORG", "@example.org"),
        ("preserve", "", ""),
    ],
)
def test_normalise(user_case: str, user: str, expected: str) -> None:
    assert routing(user_case=user_case).normalise(user) == expected


def test_normalise_defaults_to_lower() -> None:
    assert routing().user_case == "lower"
    assert routing().normalise("Bob@Example.org") == "bob@example.org"


@given(st.sampled_from(["lower", "preserve"]), st.text())
def test_normalise_is_idempotent(user_case: str, user: str) -> None:
    config = routing(user_case=user_case)
    once = config.normalise(user)
    assert config.normalise(once) == once
    assert once.lower() == user.lower()


def test_routing_user_keys_are_normalised_lower(conf_dir: Path) -> None:
    config = parse(
        config_text(extra='[routing.users]\n"User177" = "legacy"\n"Boss@Example.ORG" = "legacy"'), conf_dir
    )
    assert dict(config.routing.users) == {"user177": "legacy", "boss@example.org": "legacy"}
    assert config.routing.route(config.routing.normalise("user177")) == "legacy"
    assert config.routing.route(config.routing.normalise("USER177")) == "legacy"
    assert config.routing.route(config.routing.normalise("BOSS@example.org")) == "legacy"


def test_routing_user_keys_under_preserve_keep_the_local_part(conf_dir: Path) -> None:
    text = config_text(
        upstream={"address": '"a:110"'},
        routing={"user_case": '"preserve"', "default": None},
        extra='[routing.users]\n"User177@Example.ORG" = "legacy"\n"user177" = "legacy"\n"User177" = "legacy"',
    )
    config = parse(text, conf_dir)
    assert dict(config.routing.users) == {
        "User177@example.org": "legacy",
        "user177": "legacy",
        "User177": "legacy",
    }
    assert config.routing.route(config.routing.normalise("User177@EXAMPLE.org")) == "legacy"
    assert config.routing.route(config.routing.normalise("USER177@example.org")) is None
    assert config.routing.route(config.routing.normalise("USER177")) is None


HOOK_USERS = '[[hook]]\nuse = "audit-log"\nusers = ["Alice", "@Example.ORG", "Bob@Example.NET", "carol@x@Y.org"]\n'


@pytest.mark.parametrize(
    ("user_case", "expected"),
    [
        ("lower", ("alice", "@example.org", "bob@example.net", "carol@x@y.org")),
        ("preserve", ("Alice", "@example.org", "Bob@example.net", "carol@x@y.org")),
    ],
)
def test_hook_users_are_normalised_by_user_case(conf_dir: Path, user_case: str, expected: tuple[str, ...]) -> None:
    config = parse(config_text(routing={"user_case": f'"{user_case}"'}, extra=HOOK_USERS), conf_dir)
    (hook,) = config.hooks
    assert hook.users == expected
    assert hook.options.user_case == user_case
    normalise = config.routing.normalise
    for sent in ("Alice", "someone@EXAMPLE.org", "Bob@EXAMPLE.net", "carol@x@Y.ORG"):
        assert hook.applies_to(normalise(sent)), sent
    assert not hook.applies_to(normalise("someone@example.net"))
    assert not hook.applies_to(normalise("alicE@elsewhere.org"))
    assert hook.applies_to(normalise("BOB@example.net")) is (user_case == "lower")
    assert hook.applies_to(normalise("ALICE")) is (user_case == "lower")


def test_hook_users_default_to_lower(conf_dir: Path) -> None:
    config = parse(config_text(extra=HOOK_USERS), conf_dir)  # [routing] without user_case
    assert config.hooks[0].users[0] == "alice"
    assert config.hooks[0].options.normalise_user("Dave@Example.ORG") == "dave@example.org"
    assert config.hooks[0].options.normalise_user("@Example.ORG") == "@example.org"


def upstream(login_as: str) -> UpstreamConfig:
    return UpstreamConfig("u", (Address("h", 110),), "none", 10.0, True, None, "h", login_as)


@pytest.mark.parametrize(
    ("login_as", "user", "expected"),
    [
        ("{user}", "alice@example.org", "alice@example.org"),
        ("{local}", "alice@example.org", "alice"),
        ("{domain}", "alice@example.org", "example.org"),
        ("{local}", "a@b@c", "a@b"),
        ("{domain}", "a@b@c", "c"),
        ("{local}", "alice", "alice"),
        ("{domain}", "alice", ""),
        ("{local}%{domain}", "alice@example.org", "alice%example.org"),
        ("pre-{user}-{{x}}", "alice", "pre-alice-{x}"),
        ("{user}", "{local}", "{local}"),  # the user's own braces are data, never a template
    ],
)
def test_login_name(login_as: str, user: str, expected: str) -> None:
    assert upstream(login_as).login_name(user) == expected


def test_login_as_accepts_every_placeholder_and_escaped_braces(conf_dir: Path) -> None:
    template = '"{{{user}}}/{local}/{domain}"'
    config = parse(config_text(upstream={"login_as": template}), conf_dir)
    assert config.upstreams["legacy"].login_name("a@b") == "{a@b}/a/b"


@given(st.text())
def test_login_name_split_round_trips(user: str) -> None:
    local = upstream("{local}").login_name(user)
    domain = upstream("{domain}").login_name(user)
    assert (f"{local}@{domain}" if "@" in user else local) == user
    assert "@" not in domain


@pytest.mark.parametrize(
    ("user_case", "login_as", "sent", "expected"),
    [
        ("lower", "{user}", "Alice@Example.ORG", "alice@example.org"),
        ("lower", "{local}", "Alice@Example.ORG", "alice"),
        ("preserve", "{local}", "Alice@Example.ORG", "Alice"),
        ("preserve", "{domain}", "Alice@Example.ORG", "example.org"),
    ],
)
def test_login_name_of_the_normalised_user(user_case: str, login_as: str, sent: str, expected: str) -> None:
    assert upstream(login_as).login_name(routing(user_case=user_case).normalise(sent)) == expected


@given(st.text())
def test_route_never_raises(user: str) -> None:
    config = routing(users={"a": "x"}, domains={"example.org": "y"})
    assert config.route(user) in ("x", "y", None)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("mail.internal", 110), "mail.internal:110"),
        (Address("192.0.2.1", 995), "192.0.2.1:995"),
        (Address("2001:db8::1", 110), "[2001:db8::1]:110"),
    ],
)
def test_address_str(address: Address, text: str) -> None:
    assert str(address) == text


def test_address_round_trips_through_the_config(conf_dir: Path) -> None:
    texts = ["mail.internal:110", "192.0.2.1:995", "[2001:db8::1]:110"]
    config = parse(config_text(upstream={"address": str(texts).replace("'", '"')}), conf_dir)
    assert [str(address) for address in config.upstreams["legacy"].addresses] == texts


def listener(proxy_from: list[str]) -> ListenerConfig:
    networks = tuple(ipaddress.ip_network(network) for network in proxy_from)
    return ListenerConfig("listen[0]", "haproxy:tcp:110", "none", (), "1.2", False, networks)


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped, as a dual-stack tcp6 listener reports it
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::2", False),
        ("not an ip", False),
        ("/run/haproxy.sock", False),
        ("", False),
    ],
)
def test_allows_proxy_peer(ip: str, allowed: bool) -> None:
    assert listener(["127.0.0.1/32", "::1/128", "10.0.0.0/8"]).allows_proxy_peer(ip) is allowed


def test_config_error_fields_and_message() -> None:
    error = ConfigError(Path("/etc/popproxy.toml"), "listen[0].tls", "must be one of ...")
    assert (error.path, error.key, error.reason) == (
        "/etc/popproxy.toml",
        "listen[0].tls",
        "must be one of ...",
    )
    assert str(error) == "/etc/popproxy.toml: listen[0].tls: must be one of ..."


def test_every_hook_example_in_conf_builds(tmp_path: Path) -> None:
    """The commented [[hook]] examples in conf/popproxy.toml, uncommented, are a valid configuration:
    the documentation cannot drift from what the hooks accept."""
    import re

    from popproxy.hooks.registry import build_hooks

    text = (Path(__file__).parent.parent / "conf" / "popproxy.toml").read_text()
    hooks_part = text[text.index("# Hooks: code that sees the traffic"):]
    lines = []
    for line in hooks_part.splitlines():
        # A commented setting looks like "#key = ..." or "#[[hook...]]"; prose is "# ..." or "##".
        if re.match(r"#(\[\[hook|[a-z_]+ = )", line):
            lines.append(line[1:])
    uncommented = "\n".join(lines)
    # One of each "address or socket" pair, and paths that exist here.
    uncommented = re.sub(r'^socket = .*$', "", uncommented, flags=re.MULTILINE)
    uncommented = uncommented.replace('"/var/log/popproxy/audit.jsonl"', f'"{tmp_path / "audit.jsonl"}"')
    uncommented = uncommented.replace('"/var/lib/popproxy/archive"', f'"{tmp_path / "archive"}"')
    uncommented = re.sub(r"^syslog = .*$", "", uncommented, flags=re.MULTILINE)
    config = tmp_path / "hooks.toml"
    config.write_text(
        '[[listen]]\nendpoint = "tcp:110"\ntls = "none"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n'
        '[routing]\ndefault = "a"\n' + uncommented + "\n"
    )
    built = build_hooks(load_config(config))
    assert [b.config.use for b in built] == ["audit-log", "spamassassin", "rspamd", "clamav", "rewrite", "archive"]
    for b in built:
        close = getattr(b.hook, "close", None)
        if close is not None:
            close()
