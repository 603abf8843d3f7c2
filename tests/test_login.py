"""The upstream login machine by event sequences: bytes in, lines out, one verdict at the end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.protocol.login import (
    XCLIENT_TTL,
    BeginTLS,
    Failed,
    LoginEffect,
    Misconfigured,
    SendLine,
    Succeeded,
    UpstreamLogin,
    Warn,
    xclient_command,
)

GREETING = b"+OK ready\r\n"
CAPA = b"+OK\r\nUSER\r\nSTLS\r\n.\r\n"  # no PIPELINING: one request at a time
CAPA_PIPELINING = b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n"
CAPA_TLS = b"+OK\r\nUSER\r\nAUTH-RESP-CODE\r\n.\r\n"


class Recorder:
    def __init__(self, starttls: bool = False, listing_limit: int | None = None, xclient: bytes | None = None) -> None:
        self.effects: list[LoginEffect] = []
        self.login = UpstreamLogin(b"alice", b"s3cret", self.effects.append, starttls=starttls,
                                   listing_limit=listing_limit, xclient=xclient)

    def take(self) -> list[LoginEffect]:
        effects = list(self.effects)
        self.effects.clear()
        return effects


def sent(effects: list[LoginEffect]) -> list[bytes]:
    return [effect.line for effect in effects if isinstance(effect, SendLine)]


def test_plain_login_one_request_at_a_time() -> None:
    r = Recorder()
    r.login.data(GREETING)
    assert r.take() == [SendLine(b"CAPA\r\n")]
    r.login.data(CAPA)
    assert r.take() == [SendLine(b"USER alice\r\n")]
    r.login.data(b"+OK\r\n")
    assert r.take() == [SendLine(b"PASS s3cret\r\n")]
    r.login.data(b"+OK Logged in.\r\n")
    assert r.take() == [Succeeded([b"USER", b"STLS"], None)]
    assert r.login.finished


def test_with_pipelining_user_pass_list_and_uidl_go_in_one_write() -> None:
    """RFC 2449 §6.6: where the upstream pipelines, the login's last four requests share one write
    (two round trips fewer on every login); the answers are still taken in order."""
    r = Recorder(listing_limit=1000)
    r.login.data(GREETING)
    r.login.data(CAPA_PIPELINING)
    assert r.take() == [SendLine(b"CAPA\r\n"), SendLine(b"USER alice\r\nPASS s3cret\r\nLIST\r\nUIDL\r\n")]
    r.login.data(b"+OK\r\n+OK Logged in.\r\n+OK\r\n1 5\r\n.\r\n+OK\r\n1 x\r\n.\r\n")
    assert r.take() == [Succeeded([b"USER", b"PIPELINING"], ({1: 5}, {1: "x"}))]


def test_pipelined_refusal_at_user_ends_the_login_and_ignores_the_rest() -> None:
    r = Recorder()
    r.login.data(GREETING)
    r.login.data(CAPA_PIPELINING)
    r.take()
    r.login.data(b"-ERR [AUTH] no such user\r\n-ERR no USER\r\n")
    assert r.take() == [Failed(True, "AUTH", "upstream said AUTH")]


def test_no_credential_before_the_tls_handshake_and_injection_discarded() -> None:
    r = Recorder(starttls=True)
    r.login.data(GREETING[:5])
    r.login.data(GREETING[5:])
    assert sent(r.take()) == [b"STLS\r\n"]  # no CAPA before TLS: RFC 2595 §4 would discard it anyway
    r.login.data(b"+OK Begin TLS\r\n+OK injected\r\n")
    effects = r.take()
    assert effects[-1] == BeginTLS() and isinstance(effects[0], Warn)
    assert sent(effects) == []
    r.login.data(b"+OK surprise\r\n")  # before the handshake is done: nobody asked
    assert isinstance(r.take()[-1], Failed)
    assert r.login.finished


def test_after_the_handshake_capa_again_then_credentials() -> None:
    r = Recorder(starttls=True)
    r.login.data(GREETING)
    r.login.data(b"+OK\r\n")
    r.take()
    r.login.tls_ready()
    assert r.take() == [SendLine(b"CAPA\r\n")]
    r.login.data(CAPA_TLS)
    assert r.take() == [SendLine(b"USER alice\r\n")]
    r.login.data(b"+OK\r\n")
    assert r.take() == [SendLine(b"PASS s3cret\r\n")]
    r.login.data(b"-ERR [AUTH] no\r\n")
    assert r.take() == [Failed(True, "AUTH", "upstream said AUTH")]


def test_stls_stripped_or_refused_fails_without_credentials() -> None:
    # Not offered (a plain RFC 1939 server: "-ERR unknown command") or refused: the same answer.
    for answer in (b"-ERR Unknown command\r\n", b"-ERR no TLS today\r\n"):
        r = Recorder(starttls=True)
        r.login.data(GREETING)
        r.login.data(answer)
        effects = r.take()
        assert effects[-1] == Failed(False, None, "upstream refused STLS (does it offer it?)")
        assert sent(effects) == [b"STLS\r\n"]  # nothing else, no credential


def test_unsolicited_line_after_an_answer_fails_the_login() -> None:
    r = Recorder()
    r.login.data(GREETING + b"+OK and another\r\n")
    effects = r.take()
    assert sent(effects) == [] and effects[-1] == Failed(False, None, "unsolicited line during login")


def test_bad_greeting_and_refusal_without_auth_code() -> None:
    r = Recorder()
    r.login.data(b"* OK IMAP here\r\n")
    assert r.take() == [Failed(False, None, "greeting was not +OK")]
    r = Recorder()
    r.login.data(GREETING)
    r.login.data(CAPA_TLS)
    r.login.data(b"+OK\r\n")
    r.login.data(b"-ERR Shutting down\r\n")
    assert r.take()[-1] == Failed(False, None, "login refused without [AUTH] by an AUTH-RESP-CODE upstream")


def test_listing_after_login_and_its_bound() -> None:
    r = Recorder(listing_limit=100)
    for answer in (GREETING, CAPA, b"+OK\r\n", b"+OK\r\n"):
        r.login.data(answer)
    assert sent(r.take())[-1] == b"LIST\r\n"
    r.login.data(b"+OK 2 messages\r\n1 120\r\n2 300\r\n.\r\n")
    assert r.take() == [SendLine(b"UIDL\r\n")]
    r.login.data(b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n")
    assert r.take() == [Succeeded([b"USER", b"STLS"], ({1: 120, 2: 300}, {1: "aaa", 2: "bbb"}))]
    r = Recorder(listing_limit=100)
    for answer in (GREETING, CAPA, b"+OK\r\n", b"+OK\r\n"):
        r.login.data(answer)
    r.take()
    r.login.data(b"+OK\r\n" + b"".join(b"%d 1000\r\n" % n for n in range(1, 50)))
    assert r.take() == [Failed(False, None, "LIST answer larger than 100 bytes")]


def test_connection_lost_during_the_handshake_is_named() -> None:
    r = Recorder(starttls=True)
    r.login.data(GREETING)
    r.login.data(b"+OK\r\n")
    r.take()
    r.login.lost("SSL.Error: certificate verify failed")
    assert r.take() == [Failed(False, None, "TLS handshake failed: SSL.Error: certificate verify failed")]
    r.login.lost("again")
    assert r.take() == []  # one verdict only


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), max_size=30))
def test_any_chunking_of_a_conversation_gives_the_same_result(cuts: list[int]) -> None:
    """The upstream's bytes, cut anywhere, give the same requests and the same verdict: each answer
    is fed only once its request was sent (a real upstream answers what it was asked)."""
    answers = [GREETING, CAPA, b"+OK\r\n", b"+OK\r\n", b"+OK\r\n1 5\r\n.\r\n", b"+OK\r\n1 x\r\n.\r\n"]
    r = Recorder(listing_limit=1000)
    for answer in answers:
        position = 0
        for cut in [*cuts, len(answer)]:
            r.login.data(answer[position : position + cut])
            position += cut
            if position >= len(answer):
                break
    effects = r.take()
    assert sent(effects) == [b"CAPA\r\n", b"USER alice\r\n", b"PASS s3cret\r\n", b"LIST\r\n", b"UIDL\r\n"]
    assert effects[-1] == Succeeded([b"USER", b"STLS"], ({1: 5}, {1: "x"}))


# -- forward_client = "xclient" ------------------------------------------------------------------------

XCLIENT = b"XCLIENT ADDR=192.0.2.7 PORT=40000 SESSION=abc123 TTL=4"
TRUSTED_GREETING = b"+OK [XCLIENT] Dovecot ready.\r\n"  # Dovecot 2.3 to a login_trusted_networks peer


def test_xclient_command_parameters_as_dovecot_reads_them() -> None:
    assert xclient_command("192.0.2.7", 40000, "abc123") == XCLIENT
    assert XCLIENT_TTL == 4
    # An IPv4 client on a dual-stack listener is named as IPv4, as it would be seen directly.
    assert xclient_command("::ffff:192.0.2.7", 1, "s") == b"XCLIENT ADDR=192.0.2.7 PORT=1 SESSION=s TTL=4"
    assert xclient_command("2001:db8::1", 995, "s") == b"XCLIENT ADDR=2001:db8::1 PORT=995 SESSION=s TTL=4"
    # Unknown address (a UNIX socket): no made-up ADDR, and no PORT without it.
    assert xclient_command("", 0, "s") == b"XCLIENT SESSION=s TTL=4"
    assert xclient_command("not an address", 5, "s") == b"XCLIENT SESSION=s TTL=4"
    # Dovecot splits at spaces without escaping and ignores a SESSION over 64 octets: left out.
    for session in ("a b", "x\r\nUSER evil", "s" * 65, "", "\u00e9"):
        assert xclient_command("192.0.2.7", 1, session) == b"XCLIENT ADDR=192.0.2.7 PORT=1 TTL=4"
    assert xclient_command("192.0.2.7", 0, "s", ttl=2) == b"XCLIENT ADDR=192.0.2.7 SESSION=s TTL=2"


def test_xclient_from_the_greeting_goes_alone_after_capa_and_before_user() -> None:
    r = Recorder(xclient=XCLIENT)
    r.login.data(TRUSTED_GREETING)
    assert r.take() == [SendLine(b"CAPA\r\n")]
    r.login.data(CAPA_PIPELINING)
    # Alone: USER (and the pipelined PASS) only once its answer is known.
    assert r.take() == [SendLine(XCLIENT + b"\r\n")]
    r.login.data(b"+OK Updated\r\n")
    assert r.take() == [SendLine(b"USER alice\r\nPASS s3cret\r\n")]
    r.login.data(b"+OK\r\n+OK Logged in.\r\n")
    assert r.take() == [Succeeded([b"USER", b"PIPELINING"], None)]


def test_xclient_offered_in_capa_is_accepted_too() -> None:
    r = Recorder(xclient=XCLIENT)
    r.login.data(GREETING)
    r.login.data(b"+OK\r\nUSER\r\nXCLIENT\r\n.\r\n")
    assert sent(r.take()) == [b"CAPA\r\n", XCLIENT + b"\r\n"]


def test_xclient_after_stls_the_handshake_and_capa_and_never_before_tls() -> None:
    r = Recorder(starttls=True, xclient=XCLIENT)
    r.login.data(TRUSTED_GREETING)
    assert sent(r.take()) == [b"STLS\r\n"]
    r.login.data(b"+OK Begin TLS negotiation now.\r\n")
    assert r.take() == [BeginTLS()]
    r.login.tls_ready()
    assert r.take() == [SendLine(b"CAPA\r\n")]
    r.login.data(CAPA_TLS)
    assert r.take() == [SendLine(XCLIENT + b"\r\n")]
    r.login.data(b"+OK Updated\r\n")
    assert r.take() == [SendLine(b"USER alice\r\n")]


def test_upstream_without_xclient_fails_unavailable_with_an_error_and_no_credential() -> None:
    r = Recorder(xclient=XCLIENT)
    r.login.data(GREETING)  # an untrusted proxy gets Dovecot's greeting without [XCLIENT]
    r.login.data(CAPA)
    effects = r.take()
    assert sent(effects) == [b"CAPA\r\n"]  # no XCLIENT, no USER: never a silent fallback
    problem = [e for e in effects if isinstance(e, Misconfigured)]
    assert len(problem) == 1 and "login_trusted_networks" in problem[0].text
    assert effects[-1] == Failed(False, None, 'upstream does not offer XCLIENT (forward_client = "xclient")')


def test_xclient_ignored_as_untrusted_or_refused_fails_before_user() -> None:
    for answer, reason in (
        # Dovecot 2.3's exact answer (cmd_xclient, src/pop3-login/client.c) to an untrusted peer
        (b"+OK You are not from trusted IP - ignoring\r\n", "upstream ignored XCLIENT, it does not trust the proxy"),
        (b"-ERR Invalid parameters\r\n", 'upstream refused XCLIENT (forward_client = "xclient")'),
    ):
        r = Recorder(xclient=XCLIENT)
        r.login.data(TRUSTED_GREETING)
        r.login.data(CAPA)
        r.take()
        r.login.data(answer)
        effects = r.take()
        assert sent(effects) == []
        problem = [e for e in effects if isinstance(e, Misconfigured)]
        assert len(problem) == 1 and problem[0].fields == {"answer": answer.decode().strip()}
        assert effects[-1] == Failed(False, None, reason)


def test_an_answer_to_user_arriving_with_the_xclient_answer_is_unsolicited() -> None:
    """XCLIENT goes alone: anything after its answer was sent before USER was even asked."""
    r = Recorder(xclient=XCLIENT)
    r.login.data(TRUSTED_GREETING)
    r.login.data(CAPA)
    r.take()
    r.login.data(b"+OK Updated\r\n+OK\r\n")
    effects = r.take()
    assert sent(effects) == [] and effects[-1] == Failed(False, None, "unsolicited line during login")


def test_without_xclient_configured_a_trusted_greeting_changes_nothing() -> None:
    r = Recorder()
    r.login.data(TRUSTED_GREETING)
    r.login.data(CAPA)
    assert sent(r.take()) == [b"CAPA\r\n", b"USER alice\r\n"]
