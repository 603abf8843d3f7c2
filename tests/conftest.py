"""Shared pytest fixtures for popproxy's tests.

Sections (add new fixtures to the section they belong to, or start a new one):

1. Certificates: one throwaway CA per test run; every server certificate in the run comes from it.
2. Real servers: Dovecot POP3 with a generated mail corpus (``tests/support/dovecot.py``).
3. Clients: raw connections closed after each test.
4. Real spam scanners: SpamAssassin's spamd and rspamd (``tests/support/spamd.py``, ``rspamd.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popproxy.pki import CertificateAuthority, IssuedCertificate

from support.dovecot import DOVECOT, DovecotServer, MailUser
from support.mailbox import corpus

# --- 1. Certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """The run's trust root: clients get ``ca.cert_pem``, servers get leaves it issued."""
    return CertificateAuthority.create()


@pytest.fixture(scope="session")
def leaf(ca: CertificateAuthority) -> IssuedCertificate:
    """A server certificate for ``localhost`` and ``127.0.0.1``, issued by :func:`ca`."""
    return ca.issue(["localhost", "127.0.0.1"])


# --- 2. Real servers: Dovecot ----------------------------------------------------------------------

#: The fixture's accounts: name -> (password, message count, corpus seed, with the large message).
#: ``bob`` is for tests that ``DELE`` (through the ``bob`` fixture, which puts his mail back
#: afterwards); the others are never modified.
DOVECOT_USERS: dict[str, tuple[str, int, int, bool]] = {
    "alice": ("alice-pw", 250, 1, True),  # message 126 is the ~7 MB one
    "bob": ("bob-pw", 20, 2, False),
    "carol@example.org": ("carol-pw", 10, 3, False),
    "dave": ("dave-pw", 5, 4, False),
}


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[DovecotServer]:
    """One real Dovecot POP3 server for the whole run, on 127.0.0.1.

    ``dovecot.plain_port`` (plain, STLS offered), ``dovecot.tls_port`` (implicit TLS),
    ``dovecot.ca_pem`` / ``dovecot.ca_path`` (its CA: the run's :func:`ca`), and
    ``dovecot.users[name]`` (:class:`MailUser`: password and the exact bytes each ``RETR`` returns).
    """
    if DOVECOT is None:
        pytest.fail(
            "Dovecot is not installed, but these tests need a real POP3 server: run scripts/test "
            "(its scripts/setup installs dovecot-core and dovecot-pop3d), or install them yourself.",
            pytrace=False,
        )
    server = DovecotServer(tmp_path_factory.mktemp("dovecot"), leaf=ca.issue(["localhost", "127.0.0.1"]))
    for name, (password, count, seed, large) in DOVECOT_USERS.items():
        server.add_user(name, password, corpus(count, seed=seed, large=large))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def bob(dovecot: DovecotServer) -> Iterator[MailUser]:
    """Dovecot's ``bob``, whose mailbox is restored after the test, so the test may ``DELE``."""
    yield dovecot.users["bob"]
    dovecot.reset_user("bob")


# --- 3. Clients ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def close_raw_connections() -> Iterator[None]:
    """Close every ``RawPOP3`` connection a test opened, passed or failed (no ResourceWarning)."""
    from support.pop3client import RawPOP3

    yield
    RawPOP3.close_all()


# --- 4. Real servers: spamd and rspamd, for the spam hooks ------------------------------------------


@pytest.fixture(scope="session")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real SpamAssassin spamd for the whole run (``tests/support/spamd.py``): on
    ``spamd.address`` (127.0.0.1, a free port) and ``spamd.socket_path`` (a Unix socket), from a
    temporary site configuration: no DNS, no Bayes, ``report_safe 1``, ``required_score 5.0``."""
    from support.spamd import SPAMD, SpamdServer

    if SPAMD is None:
        pytest.fail(
            "spamd is not installed, but the spam hook tests need a real one: run scripts/test "
            "(its scripts/setup installs spamassassin, spamd and spamc), or install them yourself.",
            pytrace=False,
        )
    server = SpamdServer(tmp_path_factory.mktemp("spamd"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real rspamd for the whole run (``tests/support/rspamd.py``): its normal worker on
    ``rspamd.address`` (127.0.0.1, a free port) and ``rspamd.socket_path``, from a minimal temporary
    configuration: no modules, no Redis, no DNS, GTUBE test patterns on."""
    from support.rspamd import RSPAMD, RspamdServer

    if RSPAMD is None:
        pytest.fail(
            "rspamd is not installed, but the spam hook tests need a real one: run scripts/test "
            "(its scripts/setup installs rspamd), or install it yourself.",
            pytrace=False,
        )
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"))
    server.start()
    try:
        yield server
    finally:
        server.close()
