"""The ``popproxy`` command (popproxy/cli.py) and ``twistd popproxy --version``."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import pytest

import twisted
from popproxy import __version__, cli
from popproxy.pki import CertificateAuthority, write_private

from support.proxyproc import twistd

ROOT = Path(__file__).resolve().parent.parent


def _config(folder: Path, certificate: str = "proxy.pem") -> Path:
    authority = CertificateAuthority.create("cli test CA")
    write_private(folder / "proxy.pem", authority.issue(["localhost"]).combined_pem)
    path = folder / "popproxy.toml"
    path.write_text(
        f'[[listen]]\nendpoint = "tcp:10110:interface=127.0.0.1"\ntls = "starttls"\ncertificate = "{certificate}"\n\n'
        '[upstream.u]\naddress = "127.0.0.1:11110"\ntls = "none"\n\n[routing]\ndefault = "u"\n'
    )
    return path


def test_version_names_popproxy_twisted_and_python(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line == f"popproxy {__version__} (Twisted {twisted.__version__}, {platform.python_implementation()} {platform.python_version()})"


def test_twistd_popproxy_version_prints_popproxys_version(tmp_path: Path) -> None:
    """Issue 12, finding 5: ``twistd popproxy --version`` printed only Twisted's version (in fact: a usage error)."""
    result = twistd("popproxy", "--version", cwd=tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.strip() == cli.version_line()


def test_example_config_prints_the_commented_example(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert cli.main(["example-config"]) == 0
    assert capsysbinary.readouterr().out == (ROOT / "conf" / "popproxy.toml").read_bytes()


def test_check_agrees_with_twistd_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``popproxy check FILE`` is ``twistd popproxy -c FILE --check``: same verdict, same words."""
    good = _config(tmp_path)
    assert cli.main(["check", str(good)]) == 0
    ours = capsys.readouterr()
    theirs = twistd("popproxy", "-c", str(good), "--check", cwd=tmp_path)
    assert theirs.returncode == 0 and ours.out.strip() in theirs.stdout, (ours, theirs)

    bad = _config(tmp_path, certificate="missing.pem")
    assert cli.main(["check", str(bad)]) == 1
    ours = capsys.readouterr()
    theirs = twistd("popproxy", "-c", str(bad), "--check", cwd=tmp_path)
    assert theirs.returncode == 1 and "missing.pem" in ours.err, (ours, theirs)
    assert ours.err.strip() in theirs.stderr, (ours, theirs)


def test_share_lists_and_prints_the_shipped_files(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert cli.main(["share"]) == 0
    names = capsysbinary.readouterr().out.decode().split()
    assert {"popproxy.toml", "popproxy.service", "haproxy.cfg", "man/popproxy.toml.5", "doc/README.md"} <= set(names)
    assert cli.main(["share", "haproxy.cfg"]) == 0
    assert capsysbinary.readouterr().out == (ROOT / "conf" / "haproxy.cfg").read_bytes()
    assert cli.main(["share", "../pyproject.toml"]) == 1
    assert b"no shared file" in capsysbinary.readouterr().err


def test_each_subcommand_is_listed_with_its_help() -> None:
    names = [command.name for command in cli.COMMANDS]
    assert {"check", "example-config", "share", "install-plugin-cache"} <= set(names) and len(names) == len(set(names))
    usage = cli.parser().format_help()
    for command in cli.COMMANDS:
        assert command.name in usage


def test_a_missing_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([cli.sys.executable, "-m", "popproxy.cli"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage: popproxy" in result.stderr


def test_the_readmes_configuration_examples_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's feature sections (SNI lists, PROXY protocol, systemd sockets, login_as, limits) show
    TOML an admin will paste: together, with files for their certificates, it must pass ``popproxy check``."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL)
    sections = [b for b in blocks if "[routing]" not in b]  # the overview block is a whole file of its own
    assert any("certificate = [" in b for b in sections) and any("systemd:" in b for b in sections)
    text = "\n".join(sections) + '\n[routing]\ndefault = "legacy"\n'
    authority = CertificateAuthority.create("readme CA")
    for name in set(re.findall(r"/etc/popproxy/([\w.-]+\.pem)", text)):
        write_private(tmp_path / name, authority.issue(["pop.example.org"]).combined_pem)
    (tmp_path / "readme.toml").write_text(text.replace("/etc/popproxy/", f"{tmp_path}/"))
    assert cli.main(["check", str(tmp_path / "readme.toml")]) == 0, capsys.readouterr().err
