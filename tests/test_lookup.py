"""popproxy.lookup: routing from an nginx ``auth_http`` service, and its ``[routing.lookup]`` config.

The pure parts (escaping, request headers, answer parsing, the allowed-upstream and own-listener
checks, the cache) are tested by tables and event sequences; ``HTTPRouteLookup`` against the real
test service process in ``tests/support/authhttp.py``, over HTTP and HTTPS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from popproxy.build import listener_addresses
from popproxy.config import (
    AllowedUpstream,
    ConfigError,
    LookupConfig,
    ProxyConfig,
    UpstreamConfig,
    parse_config,
)
from popproxy.lookup import (
    MAX_ANSWER_OCTETS,
    MAX_AUTH_WAIT,
    MAX_WAIT_ROUNDS,
    AuthOK,
    AuthWait,
    Denied,
    HTTPRouteLookup,
    IRouteLookup,
    LookupCache,
    LookupFailed,
    LookupQuery,
    Routed,
    escape_auth,
    is_local_address,
    parse_answer,
    request_headers,
    route_answer,
)
from popproxy.pki import CertificateAuthority

from support.authhttp import AuthHTTPService

# --- a configuration with a lookup -----------------------------------------------------------------------

BASE = """
[[listen]]
endpoint = "tcp:1110:interface=127.0.0.1"
tls = "none"

[[listen]]
endpoint = "haproxy:tcp6:port=1995"
tls = "none"

[upstream.pinned]
address = "10.1.1.1:110"
tls = "none"

[upstream.dynamic]
address = "10.0.0.1:995"
tls = "implicit"
server_name = "pop.internal"
login_as = "{local}"

[routing]
[routing.users]
"boss@example.org" = "pinned"
"@static.example" = "pinned"
"""

LOOKUP = """
[routing.lookup]
url = "{url}"
template = "dynamic"
allowed_upstreams = [{ network = "10.0.0.0/8", ports = [110, 995] }, { network = "127.0.0.0/8", ports = [1110, 1111] }]
"""


def config_with(conf_dir: Path, lookup: str = LOOKUP, url: str = "http://auth.internal/pop3", base: str = BASE) -> ProxyConfig:
    return parse_config(base + lookup.replace("{url}", url), conf_dir / "popproxy.toml")


def lookup_error(conf_dir: Path, lookup: str, base: str = BASE) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_with(conf_dir, lookup, base=base)
    assert caught.value.path == str(conf_dir / "popproxy.toml")
    return caught.value


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    (tmp_path / "auth-ca.pem").write_text("PEM\n")
    return tmp_path


@pytest.fixture
def lookup_config(conf_dir: Path) -> LookupConfig:
    config = config_with(conf_dir).routing.lookup
    assert config is not None
    return config


@pytest.fixture
def template(conf_dir: Path) -> UpstreamConfig:
    return config_with(conf_dir).upstreams["dynamic"]


QUERY = LookupQuery(user="alice@example.org", password=b"s3cret pw%", client_host="192.0.2.42", attempt=1)


# --- configuration ---------------------------------------------------------------------------------------


def test_lookup_config_parses_with_its_defaults(conf_dir: Path) -> None:
    config = config_with(conf_dir)
    assert config.routing.default is None
    assert config.routing.lookup == LookupConfig(
        url="http://auth.internal/pop3",
        template="dynamic",
        allowed_upstreams=(
            AllowedUpstream(ipaddress.ip_network("10.0.0.0/8"), (110, 995)),
            AllowedUpstream(ipaddress.ip_network("127.0.0.0/8"), (1110, 1111)),
        ),
        timeout=10.0,
        connect_timeout=5.0,
        cache_ttl=60.0,
        cache_size=10000,
        headers=(),
        send_password=True,
        ca=None,
    )


def test_lookup_config_takes_every_key(conf_dir: Path) -> None:
    text = """
[routing.lookup]
url = "https://auth.internal:8443/pop3?realm=mail"
template = "dynamic"
allowed_upstreams = [{ network = "2001:db8::/32", ports = [995] }]
timeout = 3
connect_timeout = 1.5
cache_ttl = 30
cache_size = 0
send_password = false
ca = "auth-ca.pem"
headers = { "X-Auth-Key" = "secret string" }
"""
    lookup = config_with(conf_dir, text).routing.lookup
    assert lookup is not None
    assert (lookup.url, lookup.timeout, lookup.connect_timeout, lookup.cache_ttl, lookup.cache_size) == (
        "https://auth.internal:8443/pop3?realm=mail", 3.0, 1.5, 30.0, 0)
    assert (lookup.send_password, lookup.ca, lookup.headers) == (
        False, conf_dir / "auth-ca.pem", (("X-Auth-Key", "secret string"),))
    assert lookup.allows("2001:db8::5", 995)
    assert not lookup.allows("2001:db8::5", 110)
    assert not lookup.allows("2001:db9::5", 995)


def test_the_example_configuration_documents_a_lookup_that_loads(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / "conf" / "popproxy.toml").read_text()
    start = example.index("# [routing.lookup]\n")
    block = example[start:example.index("\n\n", start)]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines() if line.startswith("# "))
    # The commented example, made live in place of the static default.
    (tmp_path / "auth-ca.pem").write_text("PEM\n")
    text = BASE + uncommented.replace('template = "legacy"', 'template = "dynamic"')
    lookup = parse_config(text, tmp_path / "popproxy.toml").routing.lookup
    assert lookup is not None and lookup.allowed_upstreams


def test_static_entries_win_and_none_means_ask_the_lookup(conf_dir: Path) -> None:
    routing = config_with(conf_dir).routing
    assert routing.route("boss@example.org") == "pinned"
    assert routing.route("anyone@static.example") == "pinned"
    assert routing.route("alice@example.org") is None  # -> the lookup


def test_a_lookup_alone_is_enough_routing(conf_dir: Path) -> None:
    base = BASE.split("[routing]")[0] + "[routing]\n"
    assert config_with(conf_dir, base=base).routing.lookup is not None


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ('default = "pinned"', "routing.default", "cannot be combined with routing.lookup"),
        ('template = "nowhere"', "routing.lookup.template", "unknown upstream 'nowhere'"),
        ('url = "ftp://auth.internal/"', "routing.lookup.url", "expected"),
        ('url = "http:///pop3"', "routing.lookup.url", "expected"),
        ('url = "http://user:pw@auth.internal/"', "routing.lookup.url", "no user name"),
        ('url = "http://auth.internal:99999/"', "routing.lookup.url", "out of range"),
        ('url = "http://auth internal/"', "routing.lookup.url", "without spaces"),
        ("allowed_upstreams = []", "routing.lookup.allowed_upstreams", "at least one"),
        ('allowed_upstreams = "10.0.0.0/8"', "routing.lookup.allowed_upstreams", "must be an array"),
        ('allowed_upstreams = [{ network = "10.0.0.1/8", ports = [110] }]',
         "routing.lookup.allowed_upstreams[0].network", "host bits set"),
        ('allowed_upstreams = [{ network = "mail.internal", ports = [110] }]',
         "routing.lookup.allowed_upstreams[0].network", "does not appear to be"),
        ('allowed_upstreams = [{ network = "10.0.0.0/8" }]', "routing.lookup.allowed_upstreams[0].ports", "required"),
        ('allowed_upstreams = [{ network = "10.0.0.0/8", ports = [] }]',
         "routing.lookup.allowed_upstreams[0].ports", "at least one port"),
        ('allowed_upstreams = [{ network = "10.0.0.0/8", ports = [110, 0] }]',
         "routing.lookup.allowed_upstreams[0].ports[1]", "from 1 to 65535"),
        ('allowed_upstreams = [{ network = "10.0.0.0/8", ports = [true] }]',
         "routing.lookup.allowed_upstreams[0].ports[0]", "from 1 to 65535"),
        ('allowed_upstreams = [{ network = "10.0.0.0/8", port = [110] }]',
         "routing.lookup.allowed_upstreams[0].port", "did you mean 'ports'"),
        ("timeout = 0", "routing.lookup.timeout", "greater than 0"),
        ("timeout = 2\nconnect_timeout = 3", "routing.lookup.connect_timeout", "must not exceed timeout"),
        ("cache_ttl = -1", "routing.lookup.cache_ttl", "greater than 0"),
        ("cache_size = -1", "routing.lookup.cache_size", "0 or more"),
        ('send_password = "yes"', "routing.lookup.send_password", "boolean"),
        ('ca = "auth-ca.pem"', "routing.lookup.ca", "only applies to an https"),
        ('headers = { "Auth-User" = "x" }', "routing.lookup.headers.Auth-User", "popproxy sends this header itself"),
        ('headers = { "Bad Name" = "x" }', "routing.lookup.headers.Bad Name", "not a valid HTTP header name"),
        ('headers = { "X-Key" = 5 }', "routing.lookup.headers.X-Key", "must be a string"),
        ('headers = { "X-Key" = "a\\nb" }', "routing.lookup.headers.X-Key", "printable ASCII"),
        ("cache = 5", "routing.lookup.cache", "unknown key"),
    ],
)
def test_bad_lookup_settings_name_key_and_reason(conf_dir: Path, change: str, key: str, reason: str) -> None:
    name = change.split(" =")[0]
    if name == "default":
        text = LOOKUP
        base = BASE.replace("[routing]\n", '[routing]\ndefault = "pinned"\n')
    else:
        kept = [line for line in LOOKUP.splitlines() if not line.startswith(f"{name} =")]
        text, base = "\n".join(kept) + "\n" + change + "\n", BASE
    error = lookup_error(conf_dir, text, base)
    assert error.key == key
    assert reason in error.reason


def test_a_missing_ca_file_is_named(conf_dir: Path) -> None:
    text = LOOKUP + 'ca = "missing.pem"\n'
    error = lookup_error(conf_dir, text.replace("{url}", "https://auth.internal/"))
    assert (error.key, "no such file" in error.reason) == ("routing.lookup.ca", True)


# --- the request -----------------------------------------------------------------------------------------

# nginx's NGX_ESCAPE_MAIL_AUTH table (src/core/ngx_string.c, "mail_auth is the same as memcached"):
# bit N of word W set = octet 32*W+N is escaped.
NGINX_MAIL_AUTH = (0xFFFFFFFF, 0x00000021, 0, 0, 0, 0, 0, 0)


def test_escaping_matches_nginx_table_for_every_octet() -> None:
    for octet in range(256):
        escaped = NGINX_MAIL_AUTH[octet >> 5] & (1 << (octet & 0x1F))
        expected = b"%%%02X" % octet if escaped else bytes((octet,))
        assert escape_auth(bytes((octet,))) == expected, octet


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        (b"alice", b"alice"),
        (b"pass word%", b"pass%20word%25"),
        (b"a\r\nDELE 1\x00", b"a%0D%0ADELE%201%00"),
        (b"+=&?#/:@~\x7f", b"+=&?#/:@~\x7f"),  # nginx leaves these (and DEL) alone
        ("pässwörd".encode(), "pässwörd".encode()),  # octets >= 0x80 go as they are
        (b"%41", b"%2541"),
        (b"", b""),
    ],
)
def test_escaping_examples(raw: bytes, sent: bytes) -> None:
    assert escape_auth(raw) == sent


def test_request_headers_are_nginx_pop3_set_in_order(lookup_config: LookupConfig) -> None:
    assert request_headers(lookup_config, QUERY) == [
        (b"Auth-Method", b"plain"),
        (b"Auth-User", b"alice@example.org"),
        (b"Auth-Pass", b"s3cret%20pw%25"),
        (b"Auth-Protocol", b"pop3"),
        (b"Auth-Login-Attempt", b"1"),
        (b"Client-IP", b"192.0.2.42"),
    ]


def test_request_headers_without_password_client_address_and_with_extras(lookup_config: LookupConfig) -> None:
    config = dataclasses.replace(lookup_config, send_password=False, headers=(("X-Auth-Key", "k1"), ("X-Site", "a")))
    query = dataclasses.replace(QUERY, user="jörg smith", client_host="", attempt=3)
    assert request_headers(config, query) == [
        (b"Auth-Method", b"plain"),
        (b"Auth-User", "jörg%20smith".encode()),
        (b"Auth-Protocol", b"pop3"),
        (b"Auth-Login-Attempt", b"3"),
        (b"X-Auth-Key", b"k1"),
        (b"X-Site", b"a"),
    ]


# --- the answer ------------------------------------------------------------------------------------------


def answer(code: int = 200, **headers: str | bytes | list[bytes]) -> Any:
    """parse_answer over headers given as Auth_Status="OK" and so on."""
    pairs = []
    for name, value in headers.items():
        values = value if isinstance(value, list) else [value if isinstance(value, bytes) else value.encode()]
        pairs.append((name.replace("_", "-").encode(), values))
    return parse_answer(code, pairs)


def test_ok_answer_with_every_header() -> None:
    assert answer(Auth_Status="OK", Auth_Server="10.0.0.7", Auth_Port="995", Auth_User="alice@backend",
                  Auth_Pass=b"n3w pass", Auth_Wait="7", X_Other="ignored") == AuthOK(
        "10.0.0.7", 995, "alice@backend", b"n3w pass")


def test_ok_answer_minimal_and_case_insensitive_names() -> None:
    parsed = parse_answer(200, [(b"auth-status", [b"OK"]), (b"AUTH-SERVER", [b"2001:db8::7"]), (b"Auth-port", [b"110"])])
    assert parsed == AuthOK("2001:db8::7", 110, None, None)


def test_rewrites_are_taken_as_sent_not_url_decoded() -> None:
    parsed = answer(Auth_Status="OK", Auth_Server="10.0.0.7", Auth_Port="110", Auth_User="a%40b", Auth_Pass="p%20w")
    assert parsed == AuthOK("10.0.0.7", 110, "a%40b", b"p%20w")


def test_a_204_answer_works_as_with_nginx() -> None:
    assert isinstance(answer(204, Auth_Status="OK", Auth_Server="10.0.0.7", Auth_Port="110"), AuthOK)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Auth_Status": "Invalid login or password", "Auth_Wait": "3"}, 3.0),
        ({"Auth_Status": "Invalid login or password"}, None),
        ({"Auth_Status": "Invalid login or password", "Auth_Wait": "0"}, None),  # nginx: 0 closes too
        ({"Auth_Status": "ok", "Auth_Server": "10.0.0.7", "Auth_Port": "110"}, None),  # OK is case-sensitive
        ({"Auth_Status": "Temporary error", "Auth_Wait": str(MAX_AUTH_WAIT)}, float(MAX_AUTH_WAIT)),
    ],
)
def test_denied_answers(headers: dict[str, str], wait: float | None) -> None:
    parsed = answer(**headers)
    assert parsed == Denied(headers["Auth_Status"], wait, cached=False)


def test_wait_status_asks_again() -> None:
    assert answer(Auth_Status="WAIT", Auth_Wait="2") == AuthWait(2.0)
    assert answer(Auth_Status="WAIT") == AuthWait(0.0)


@pytest.mark.parametrize(
    ("code", "headers", "reason"),
    [
        (401, {"Auth_Status": "Invalid login"}, "HTTP 401"),
        (500, {}, "HTTP 500"),
        (302, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "110"}, "HTTP 302"),
        (200, {}, "no Auth-Status"),
        (200, {"Auth_Status": ""}, "no Auth-Status"),
        (200, {"Auth_Status": [b"OK", b"OK"]}, "more than once"),
        (200, {"Auth_Status": "OK"}, "without Auth-Server and Auth-Port"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7"}, "without Auth-Server and Auth-Port"),
        (200, {"Auth_Status": "OK", "Auth_Port": "110"}, "without Auth-Server and Auth-Port"),
        (200, {"Auth_Status": "OK", "Auth_Server": "mail.internal", "Auth_Port": "110"}, "not an IP address"),
        (200, {"Auth_Status": "OK", "Auth_Server": "[2001:db8::7]", "Auth_Port": "110"}, "not an IP address"),
        (200, {"Auth_Status": "OK", "Auth_Server": "fe80::1%eth0", "Auth_Port": "110"}, "not an IP address"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7:110", "Auth_Port": "110"}, "not an IP address"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "0"}, "not 1-65535"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "65536"}, "not 1-65535"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "+110"}, "not 1-65535"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "11O"}, "not 1-65535"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "110", "Auth_User": ""}, "empty Auth-User"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "110", "Auth_User": b"\xff"}, "not UTF-8"),
        (200, {"Auth_Status": "OK", "Auth_Server": "10.0.0.7", "Auth_Port": "110", "Auth_Pass": b"a\x00b"},
         "control characters"),
        (200, {"Auth_Status": "Invalid", "Auth_Wait": "3s"}, "Auth-Wait"),
        (200, {"Auth_Status": "Invalid", "Auth_Wait": "-1"}, "Auth-Wait"),
        (200, {"Auth_Status": "Invalid", "Auth_Wait": str(MAX_AUTH_WAIT + 1)}, "Auth-Wait"),
        (200, {"Auth_Status": "WAIT", "Auth_Wait": "soon"}, "Auth-Wait"),
    ],
)
def test_malformed_answers_fail(code: int, headers: dict[str, Any], reason: str) -> None:
    parsed = answer(code, **headers)
    assert isinstance(parsed, LookupFailed)
    assert reason in parsed.reason


def test_auth_wait_is_ignored_with_ok_as_nginx_does() -> None:
    assert isinstance(answer(Auth_Status="OK", Auth_Server="10.0.0.7", Auth_Port="110", Auth_Wait="x"), AuthOK)


# --- where an answer may lead ----------------------------------------------------------------------------


def never_local(host: str) -> bool:
    return False


def always_local(host: str) -> bool:
    return True


def test_routed_upstream_is_the_template_at_the_answered_address(lookup_config: LookupConfig,
                                                                 template: UpstreamConfig) -> None:
    routed = route_answer(AuthOK("10.0.0.7", 995, "alice", b"pw"), lookup_config, template, is_local=never_local)
    assert isinstance(routed, Routed)
    assert routed.upstream == dataclasses.replace(template, addresses=(routed.upstream.addresses[0],))
    assert [str(a) for a in routed.upstream.addresses] == ["10.0.0.7:995"]
    assert (routed.upstream.tls, routed.upstream.server_name, routed.upstream.name) == ("implicit", "pop.internal", "dynamic")
    assert (routed.login_user, routed.password, routed.cached) == ("alice", b"pw", False)


@pytest.mark.parametrize(
    ("server", "port", "reason"),
    [
        ("192.168.1.7", 110, "outside allowed_upstreams"),
        ("10.0.0.7", 25, "outside allowed_upstreams"),  # SMTP-port smuggling
        ("11.0.0.1", 110, "outside allowed_upstreams"),
        ("2001:db8::7", 110, "outside allowed_upstreams"),
        ("0.0.0.0", 110, "not a unicast address"),
        ("::", 110, "not a unicast address"),
        ("224.0.0.1", 110, "not a unicast address"),
        ("255.255.255.255", 110, "not a unicast address"),
    ],
)
def test_answers_outside_allowed_upstreams_are_refused(lookup_config: LookupConfig, template: UpstreamConfig,
                                                       server: str, port: int, reason: str) -> None:
    refused = route_answer(AuthOK(server, port, None, None), lookup_config, template, is_local=never_local)
    assert isinstance(refused, LookupFailed)
    assert reason in refused.reason


def test_ipv4_mapped_addresses_count_as_ipv4(lookup_config: LookupConfig, template: UpstreamConfig) -> None:
    assert isinstance(route_answer(AuthOK("::ffff:10.0.0.7", 110, None, None), lookup_config, template,
                                   is_local=never_local), Routed)
    assert isinstance(route_answer(AuthOK("::ffff:192.168.0.7", 110, None, None), lookup_config, template,
                                   is_local=never_local), LookupFailed)


def test_own_listeners_are_refused(lookup_config: LookupConfig, template: UpstreamConfig) -> None:
    own = [("127.0.0.1", 1110), ("", 995)]

    def route(server: str, port: int, is_local: Any = never_local) -> Routed | LookupFailed:
        return route_answer(AuthOK(server, port, None, None), lookup_config, template, own, is_local)

    assert "where popproxy itself listens" in getattr(route("127.0.0.1", 1110), "reason", "")
    assert "where popproxy itself listens" in getattr(route("::ffff:127.0.0.1", 1110), "reason", "")
    assert isinstance(route("127.0.0.2", 1110), Routed)  # another address, same port: not us
    assert isinstance(route("127.0.0.1", 1111), Routed)  # same address, another port: not us
    # "" listens on every address of this machine: refused only where the address is local.
    assert "itself listens" in getattr(route("10.0.0.7", 995, always_local), "reason", "")
    assert isinstance(route("10.0.0.7", 995, never_local), Routed)


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1")
    assert is_local_address("127.3.4.5")
    assert is_local_address("::ffff:127.0.0.1")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1 (RFC 5737): on no machine
    assert not is_local_address("mail.internal")


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("tcp:110", ("0.0.0.0", 110)),
        ("tcp:port=110:interface=127.0.0.1", ("127.0.0.1", 110)),
        ("tcp:995:backlog=10:interface=10.0.0.2", ("10.0.0.2", 995)),
        ("tcp6:110", ("::", 110)),
        ("tcp6:110:interface=\\:\\:1", ("::1", 110)),
        ("haproxy:tcp:110:interface=192.0.2.5", ("192.0.2.5", 110)),
        ("haproxy:tcp6:port=995", ("::", 995)),
        ("unix:/run/popproxy.sock", None),
        ("systemd:domain=INET:index=0", None),
        ("tcp:0:interface=127.0.0.1", None),
    ],
)
def test_own_listener_addresses(endpoint: str, address: tuple[str, int] | None, conf_dir: Path) -> None:
    """What a lookup may never route to: the one normal form of ``build`` (the same as reloads use)."""
    config = config_with(conf_dir)
    listener = dataclasses.replace(config.listeners[0], endpoint=endpoint)
    found = listener_addresses(dataclasses.replace(config, listeners=(listener,)))
    assert found == ([address] if address else [])


def test_listener_addresses_of_a_configuration(conf_dir: Path) -> None:
    assert listener_addresses(config_with(conf_dir)) == [("127.0.0.1", 1110), ("::", 1995)]


# --- the cache -------------------------------------------------------------------------------------------


def routed(template: UpstreamConfig, password: bytes | None = b"rewritten") -> Routed:
    return Routed(template, "alice@backend", password, cached=False)


def test_cache_keys_on_the_password(template: UpstreamConfig) -> None:
    cache = LookupCache(size=10, ttl=60)
    cache.put(cache.key(QUERY), routed(template), now=0)
    assert cache.get(cache.key(QUERY), now=1) == dataclasses.replace(routed(template), cached=True)
    # Another password for the same user: not this answer, and never its Auth-Pass rewrite.
    assert cache.get(cache.key(dataclasses.replace(QUERY, password=b"guess")), now=1) is None
    # Another client address: the service may answer differently by Client-IP.
    assert cache.get(cache.key(dataclasses.replace(QUERY, client_host="198.51.100.9")), now=1) is None
    assert cache.get(cache.key(dataclasses.replace(QUERY, user="bob@example.org")), now=1) is None


def test_cache_keys_hold_no_password_and_differ_per_process(template: UpstreamConfig) -> None:
    one, two = LookupCache(10, 60), LookupCache(10, 60)
    assert one.key(QUERY) != two.key(QUERY)  # a random HMAC key each
    assert QUERY.password not in repr(one.key(QUERY)).encode()
    assert LookupCache(10, 60, secret=b"k").key(QUERY) == LookupCache(10, 60, secret=b"k").key(QUERY)


def test_routed_answers_expire_after_the_ttl(template: UpstreamConfig) -> None:
    clock = Clock()
    cache = LookupCache(size=10, ttl=60)
    key = cache.key(QUERY)
    cache.put(key, routed(template), clock.seconds())
    clock.advance(59.9)
    assert cache.get(key, clock.seconds()) is not None
    clock.advance(0.1)
    assert cache.get(key, clock.seconds()) is None
    assert len(cache) == 0


def test_denied_answers_live_no_longer_than_their_auth_wait() -> None:
    clock = Clock()
    cache = LookupCache(size=10, ttl=60)
    key = cache.key(QUERY)
    cache.put(key, Denied("Invalid login", 3.0, cached=False), clock.seconds())
    clock.advance(2.9)
    assert cache.get(key, clock.seconds()) == Denied("Invalid login", 3.0, cached=True)
    clock.advance(0.1)
    assert cache.get(key, clock.seconds()) is None
    # A long Auth-Wait is still bounded by cache_ttl.
    cache.put(key, Denied("Invalid login", 600.0, cached=False), clock.seconds())
    clock.advance(60)
    assert cache.get(key, clock.seconds()) is None


def test_denied_without_wait_and_failures_are_never_cached(template: UpstreamConfig) -> None:
    cache = LookupCache(size=10, ttl=60)
    key = cache.key(QUERY)
    cache.put(key, Denied("Invalid login", None, cached=False), 0)
    cache.put(cache.key(dataclasses.replace(QUERY, user="x")), LookupFailed("down"), 0)
    assert len(cache) == 0
    # A failure replaces a stale answer for the key rather than leaving it.
    cache.put(key, routed(template), 0)
    cache.put(key, LookupFailed("down"), 1)
    assert cache.get(key, 2) is None


def test_cache_is_an_lru_of_cache_size_entries(template: UpstreamConfig) -> None:
    cache = LookupCache(size=3, ttl=60)
    keys = [cache.key(dataclasses.replace(QUERY, user=f"user{n}")) for n in range(5)]
    for key in keys[:3]:
        cache.put(key, routed(template), 0)
    assert cache.get(keys[0], 1) is not None  # used: now the most recent
    cache.put(keys[3], routed(template), 1)  # evicts keys[1], the least recently used
    assert len(cache) == 3
    assert [cache.get(key, 2) is not None for key in keys[:4]] == [True, False, True, True]
    for key in keys:
        cache.put(key, routed(template), 3)
    assert len(cache) == 3


def test_cache_size_zero_keeps_nothing(template: UpstreamConfig) -> None:
    cache = LookupCache(size=0, ttl=60)
    cache.put(cache.key(QUERY), routed(template), 0)
    assert len(cache) == 0


# --- HTTPRouteLookup against the real test service -------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[AuthHTTPService]:
    running = AuthHTTPService(tmp_path / "authhttp", {"users": {}}).start()
    yield running
    running.close()


def make_lookup(conf_dir: Path, url: str, clock: Clock | None = None, own: list[tuple[str, int]] | None = None,
                **changes: Any) -> HTTPRouteLookup:
    config = config_with(conf_dir, url=url)
    assert config.routing.lookup is not None
    lookup_config = dataclasses.replace(config.routing.lookup, **changes)
    return HTTPRouteLookup(lookup_config, config.upstreams, reactor, own_listeners=own or [], clock=clock,
                           is_local=never_local)


OK_ALICE = {"status": "OK", "server": "10.0.0.7", "port": 110, "password": "s3cret pw%"}


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_http_route_lookup_provides_the_interface(conf_dir: Path) -> None:
    assert verifyObject(IRouteLookup, make_lookup(conf_dir, "http://127.0.0.1:9/"))


@pytest_twisted.ensureDeferred
async def test_ok_answer_routes_and_the_request_is_nginx_s(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": {**OK_ALICE, "user": "alice", "pass": "backend-pw"}}})
    lookup = make_lookup(conf_dir, service.url, headers=(("X-Auth-Key", "shared secret"),))
    got = await lookup.lookup(QUERY)
    assert isinstance(got, Routed)
    assert [str(a) for a in got.upstream.addresses] == ["10.0.0.7:110"]
    assert (got.login_user, got.password, got.cached) == ("alice", b"backend-pw", False)
    [request] = service.requests()
    # Header names are case-insensitive (RFC 9110 §5.1); Twisted writes "Client-Ip" for nginx's "Client-IP".
    headers = {name.lower(): value for name, value in request["headers"]}
    assert request["path"] == "/auth"
    assert headers.pop("host") == f"127.0.0.1:{service.port}"
    headers.pop("connection", None)  # Twisted's HTTP/1.1 client says "close"; nginx speaks HTTP/1.0
    headers.pop("user-agent", None)
    assert headers == {
        "auth-method": "plain", "auth-user": "alice@example.org", "auth-pass": "s3cret%20pw%25",
        "auth-protocol": "pop3", "auth-login-attempt": "1", "client-ip": "192.0.2.42", "x-auth-key": "shared secret",
    }


@pytest_twisted.ensureDeferred
async def test_octets_outside_ascii_reach_the_service_as_sent(service: AuthHTTPService, conf_dir: Path) -> None:
    query = dataclasses.replace(QUERY, user="jörg", password="pässwort\t1".encode())
    service.set_table({"users": {"jörg": {**OK_ALICE, "password": "pässwort\t1"}}})
    got = await make_lookup(conf_dir, service.url).lookup(query)
    assert isinstance(got, Routed)  # the service decoded what nginx's escaping sent
    headers = {name.lower(): value for name, value in service.requests()[0]["headers"]}
    assert headers["auth-pass"].encode("latin-1") == "pässwort%091".encode()


@pytest_twisted.ensureDeferred
async def test_cached_answer_is_reused_only_for_the_same_password(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": {**OK_ALICE, "pass": "backend-pw"}}})
    clock = Clock()
    lookup = make_lookup(conf_dir, service.url, clock=clock, cache_ttl=30.0)
    first = await lookup.lookup(QUERY)
    again = await lookup.lookup(dataclasses.replace(QUERY, attempt=2))
    assert isinstance(first, Routed) and isinstance(again, Routed)
    assert (first.cached, again.cached, again.password) == (False, True, b"backend-pw")
    assert len(service.requests()) == 1
    # A second password for the cached user asks the service, which refuses it.
    other = await lookup.lookup(dataclasses.replace(QUERY, password=b"guess"))
    assert other == Denied("Invalid login or password", 3.0, cached=False)
    assert len(service.requests()) == 2
    # After the TTL the service is asked again.
    clock.advance(30)
    assert (await lookup.lookup(QUERY)).cached is False  # type: ignore[union-attr]
    assert len(service.requests()) == 3
    lookup.clear_cache()
    await lookup.lookup(QUERY)
    assert len(service.requests()) == 4


@pytest_twisted.ensureDeferred
async def test_denied_is_cached_within_auth_wait_only(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": {"status": "Account locked", "wait": 5},
                                 "bob": {"status": "No such user"}}})
    clock = Clock()
    lookup = make_lookup(conf_dir, service.url, clock=clock)
    assert await lookup.lookup(QUERY) == Denied("Account locked", 5.0, cached=False)
    assert await lookup.lookup(QUERY) == Denied("Account locked", 5.0, cached=True)
    clock.advance(5)
    assert await lookup.lookup(QUERY) == Denied("Account locked", 5.0, cached=False)
    bob = dataclasses.replace(QUERY, user="bob")
    assert await lookup.lookup(bob) == Denied("No such user", None, cached=False)
    assert await lookup.lookup(bob) == Denied("No such user", None, cached=False)
    assert len(service.requests()) == 4


@pytest_twisted.ensureDeferred
async def test_answers_outside_allowed_upstreams_fail_and_are_logged(service: AuthHTTPService, conf_dir: Path,
                                                                     log_events: list[LogEvent]) -> None:
    service.set_table({"users": {"alice@example.org": {"status": "OK", "server": "192.168.7.7", "port": 110}}})
    lookup = make_lookup(conf_dir, service.url)
    got = await lookup.lookup(QUERY)
    assert isinstance(got, LookupFailed) and "outside allowed_upstreams" in got.reason
    [event] = [e for e in log_events if e.get("event") == "lookup"]
    assert (event["user"], event["result"], event["reason"]) == ("alice@example.org", "failed", got.reason)
    assert "s3cret" not in repr(event)
    # Never cached: the next login asks again.
    await lookup.lookup(QUERY)
    assert len(service.requests()) == 2


@pytest_twisted.ensureDeferred
async def test_an_answer_naming_popproxy_itself_fails(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": {"status": "OK", "server": "127.0.0.1", "port": 1110}}})
    got = await make_lookup(conf_dir, service.url, own=[("127.0.0.1", 1110)]).lookup(QUERY)
    assert isinstance(got, LookupFailed) and "itself listens" in got.reason


@pytest_twisted.ensureDeferred
async def test_non_2xx_and_malformed_answers_fail(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {
        "a": {"status": "Invalid login", "http_status": 403},
        "b": {"status": "OK", "server": "mail.internal", "port": 110},
        "c": {"status": "OK", "server": "10.0.0.7", "port": 110, "headers": [["Auth-Server", "10.0.0.8"]]},
        "d": {"status": "OK", "server": "10.0.0.7", "port": 110, "body": 4000},
    }})
    lookup = make_lookup(conf_dir, service.url)
    reasons = [await lookup.lookup(dataclasses.replace(QUERY, user=user)) for user in "abcd"]
    assert [getattr(r, "reason", None) for r in reasons[:3]] == [
        "the lookup service answered HTTP 403",
        "malformed answer: Auth-Server 'mail.internal' is not an IP address",
        "malformed answer: Auth-Server sent more than once",
    ]
    assert isinstance(reasons[3], Routed)  # a body is read no further and does not matter


@pytest_twisted.ensureDeferred
async def test_an_oversized_answer_is_cut_off(service: AuthHTTPService, conf_dir: Path) -> None:
    big = [["X-Padding", "p" * 4000] for _ in range(MAX_ANSWER_OCTETS // 4000 + 1)]
    service.set_table({"users": {"alice@example.org": {**OK_ALICE, "headers": big}}})
    got = await make_lookup(conf_dir, service.url).lookup(QUERY)
    assert isinstance(got, LookupFailed)
    assert "AnswerTooLarge" in got.reason


@pytest_twisted.ensureDeferred
async def test_auth_status_wait_is_followed_a_bounded_number_of_times(service: AuthHTTPService,
                                                                       conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": {"status": "WAIT", "wait": 0}}})
    got = await make_lookup(conf_dir, service.url).lookup(QUERY)
    assert isinstance(got, LookupFailed) and "WAIT" in got.reason
    assert len(service.requests()) == MAX_WAIT_ROUNDS + 1


@pytest_twisted.ensureDeferred
async def test_a_slow_service_fails_at_the_timeout(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": OK_ALICE}, "delay": 5})
    got = await make_lookup(conf_dir, service.url, timeout=0.5, connect_timeout=0.5).lookup(QUERY)
    assert got == LookupFailed("no answer from the lookup service within 0.5 s")


@pytest_twisted.ensureDeferred
async def test_a_service_that_is_down_fails(conf_dir: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    got = await make_lookup(conf_dir, f"http://127.0.0.1:{port}/auth").lookup(QUERY)
    assert isinstance(got, LookupFailed) and "ConnectionRefusedError" in got.reason


@pytest.fixture
def https_service(tmp_path: Path, ca: CertificateAuthority) -> Iterator[AuthHTTPService]:
    leaf = ca.issue(["127.0.0.1"])
    running = AuthHTTPService(tmp_path / "authhttps", {"users": {"alice@example.org": OK_ALICE}},
                              certificate_pem=leaf.combined_pem).start()
    yield running
    running.close()


@pytest_twisted.ensureDeferred
async def test_https_with_the_right_ca_routes(https_service: AuthHTTPService, conf_dir: Path,
                                              ca: CertificateAuthority) -> None:
    (conf_dir / "run-ca.pem").write_bytes(ca.cert_pem)
    got = await make_lookup(conf_dir, https_service.url, ca=conf_dir / "run-ca.pem").lookup(QUERY)
    assert isinstance(got, Routed)
    assert len(https_service.requests()) == 1


@pytest_twisted.ensureDeferred
async def test_https_with_a_wrong_ca_fails_before_anything_is_sent(https_service: AuthHTTPService,
                                                                   conf_dir: Path) -> None:
    (conf_dir / "other-ca.pem").write_bytes(CertificateAuthority.create("some other CA").cert_pem)
    got = await make_lookup(conf_dir, https_service.url, ca=conf_dir / "other-ca.pem").lookup(QUERY)
    assert isinstance(got, LookupFailed)
    assert "certificate verify failed" in got.reason
    assert https_service.requests() == []  # the password never left popproxy


@pytest_twisted.ensureDeferred
async def test_https_without_a_ca_uses_the_system_roots_and_fails_on_a_private_ca(
    https_service: AuthHTTPService, conf_dir: Path
) -> None:
    got = await make_lookup(conf_dir, https_service.url).lookup(QUERY)
    assert isinstance(got, LookupFailed)
    assert https_service.requests() == []


def test_an_unreadable_ca_is_a_config_error(conf_dir: Path) -> None:
    (conf_dir / "empty.pem").write_text("")
    with pytest.raises(ConfigError) as caught:
        make_lookup(conf_dir, "https://127.0.0.1:9/auth", ca=conf_dir / "empty.pem")
    assert (caught.value.key, caught.value.reason) == ("routing.lookup.ca", "no PEM certificates found")


@pytest_twisted.ensureDeferred
async def test_cancelling_a_lookup_aborts_it(service: AuthHTTPService, conf_dir: Path) -> None:
    service.set_table({"users": {"alice@example.org": OK_ALICE}, "delay": 2})
    pending = make_lookup(conf_dir, service.url).lookup(QUERY)
    results: list[Any] = []
    pending.addBoth(results.append)
    pending.cancel()  # fires at once, without waiting for the service
    assert len(results) == 1 and "CancelledError" in repr(results[0])
    results[0].trap(CancelledError)
