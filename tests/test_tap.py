"""``twistd popproxy``: the plugin, the options, --check, and a real twistd process."""

from __future__ import annotations

import poplib
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import getPlugins

from popproxy import tap
from popproxy.service import ProxyService

from support.configs import proxy_config, write_certificate
from support.proxyproc import ProxyProcess, free_port, twistd


def test_plugin_is_discovered() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "popproxy" in makers
    assert makers["popproxy"].options is tap.Options


def test_options_load_and_validate_the_config(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, listeners=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "starttls"}])
    options = tap.Options()
    options.parseOptions(["-c", str(config.path)])
    assert options["config"] == str(config.path)
    assert options["check"] == 0
    assert options.config == config


@pytest_twisted.ensureDeferred
async def test_make_service_builds_one_listener_per_table(tmp_path: Path) -> None:
    config = proxy_config(
        tmp_path,
        listeners=[
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "starttls"},
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "implicit"},
            {"endpoint": "haproxy:tcp:0:interface=127.0.0.1", "tls": "none"},
        ],
        extra=f'[process]\nadmin_socket = "{tmp_path / "admin.sock"}"',
    )
    options = tap.Options()
    options.parseOptions(["--config", str(config.path)])
    service = tap.makeService(options)  # which binds the listeners (issue 12, finding 3): closed below
    assert isinstance(service, ProxyService) and isinstance(service, MultiService)
    await service.unbind()
    await service.getServiceNamed("admin socket").stopService()  # bound by makeService too (popproxy.admin)
    assert [child.name for child in service] == ["listen[0]", "listen[1]", "listen[2]", "certificate expiry", "session ticket keys",
                                                 "admin socket"]


def test_bad_config_exits_with_file_key_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[listen]]\nendpoint = "tcp:110"\ntls = "sometimes"\n')
    with pytest.raises(SystemExit) as exit_info:
        tap.Options().parseOptions(["-c", str(path)])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert str(path) in message and "listen[0].tls" in message and "sometimes" in message


def test_twistd_help_lists_every_option(tmp_path: Path) -> None:
    result = twistd("popproxy", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--config=", "-c", "--check", "--help"):
        assert option in result.stdout
    general = twistd("--help", cwd=tmp_path)
    assert "popproxy" in general.stdout
    for option in ("--nodaemon", "--pidfile", "--logfile", "--uid", "--gid"):
        assert option in general.stdout


def test_twistd_check_good_config(tmp_path: Path) -> None:
    config = proxy_config(tmp_path, listeners=[{"endpoint": "tcp:110", "tls": "implicit"}])
    result = twistd("--pidfile", str(tmp_path / "p.pid"), "popproxy", "-c", str(config.path), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration OK" in result.stdout
    assert not (tmp_path / "p.pid").exists()


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ('[[listen]]\nendpoint = "ssl:995"\ntls = "none"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n', "listen[0].endpoint", "ssl"),
        ('[[listen]]\nendpoint = "tcp:110"\ntls = "none"\ncolour = "blue"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n', "listen[0]", "colour"),  # noqa: E501
        ('[[listen]]\nendpoint = "tcp:110"\ntls = "none"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n[routing]\ndefault = "b"\n', "routing.default", "b"),  # noqa: E501
        ('[[listen]]\nendpoint = "tcp:110"\ntls = "starttls"\ncertificate = "missing.pem"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n', "listen[0].certificate", "missing.pem"),  # noqa: E501
        ('[[listen]]\nendpoint = "tcp:bogus"\ntls = "none"\n[upstream.a]\naddress = "h:1"\ntls = "none"\n[routing]\ndefault = "a"\n', "listen[0].endpoint", "endpoint"),  # noqa: E501
    ],
)
def test_twistd_check_bad_configs(tmp_path: Path, body: str, key: str, reason: str) -> None:
    path = tmp_path / "popproxy.toml"
    path.write_text(body)
    result = twistd("--pidfile", str(tmp_path / "p.pid"), "popproxy", "-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 1
    assert str(path) in result.stderr and key in result.stderr and reason in result.stderr
    assert "Usage:" not in result.stdout + result.stderr
    assert not (tmp_path / "p.pid").exists()


def test_twistd_check_certificate_key_mismatch(tmp_path: Path) -> None:
    good = write_certificate(tmp_path, "a.pem")
    other = write_certificate(tmp_path, "b.pem")
    # The key of one certificate with the chain of another.
    a, b = good.read_text(), other.read_text()
    key_a = a[: a.index("-----BEGIN CERTIFICATE-----")]
    chain_b = b[b.index("-----BEGIN CERTIFICATE-----") :]
    mixed = tmp_path / "mixed.pem"
    mixed.write_text(key_a + chain_b)
    config = proxy_config(tmp_path, listeners=[{"endpoint": "tcp:995", "tls": "implicit", "certificate": str(mixed)}])
    result = twistd("popproxy", "-c", str(config.path), "--check", cwd=tmp_path)
    assert result.returncode == 1
    assert "mixed.pem" in result.stderr and "listen[0].certificate" in result.stderr


def test_twistd_serves_poplib_and_stops_on_sigterm(tmp_path: Path, dovecot) -> None:
    port = free_port()
    config = proxy_config(
        tmp_path,
        listeners=[{"endpoint": f"tcp:{port}:interface=127.0.0.1", "tls": "none"}],
        upstreams={"main": {"address": f"127.0.0.1:{dovecot.plain_port}", "tls": "none"}},
    )
    proxy = ProxyProcess(config.path, [port], tmp_path)
    try:
        user = dovecot.users["dave"]
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("dave")
        client.pass_(user.password)
        count, size = client.stat()
        assert (count, size) == (len(user.messages), sum(map(len, user.messages)))
        client.quit()
        assert proxy.pidfile.exists()
    finally:
        status = proxy.stop(signal.SIGTERM)
    # twistd re-raises the signal after a clean shutdown, so the process ends by SIGTERM itself:
    # systemd counts that as a clean stop (SuccessExitStatus covers SIGTERM by default).
    assert status in (0, -signal.SIGTERM), proxy.log()
    log = proxy.log()
    assert "dave logged in to main" in log and "ended (quit): user dave" in log
    assert user.password not in log
    assert not proxy.pidfile.exists()
