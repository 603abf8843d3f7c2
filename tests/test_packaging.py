"""The package an admin installs: the wheel, in a fresh virtual environment outside the checkout.

The wheel is built from a copy of the checkout (so that the build leaves nothing in it) and installed
into a new virtualenv in a temporary folder. Its dependencies are not downloaded: a ``.pth`` file in the
new environment points at the test run's own site-packages, where they are installed already, so the
test needs no network (here or in CI) and takes seconds. popproxy itself, its console script and its
twistd plugin come from the wheel only: every command runs from a folder outside the checkout, without
PYTHONPATH, and the test checks where ``popproxy`` was imported from.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popproxy import __version__
from popproxy.pki import CertificateAuthority, write_private

from support.proxyproc import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARE = ROOT / "popproxy" / "share"

#: what the wheel ships under popproxy/share/, and the one source in the repository each copy comes from
SHIPPED = {
    "popproxy.toml": "conf/popproxy.toml",
    "popproxy.service": "conf/popproxy.service",
    "popproxy.socket": "conf/popproxy.socket",
    "haproxy.cfg": "conf/haproxy.cfg",
    "grafana-dashboard.json": "conf/grafana-dashboard.json",
    "popproxy.logrotate": "conf/popproxy.logrotate",
    "doc/README.md": "README.md",
    "doc/deployment.md": "docs/deployment.md",
    "doc/hooks.md": "docs/hooks.md",
    "man/popproxy.toml.5": "popproxy/share/man/popproxy.toml.5",
}

#: twistd as the fresh environment runs it (Twisted's own console scripts are not in that environment)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


@dataclass
class Installed:
    """A virtualenv with the wheel installed, in a folder every user may read."""

    folder: Path  # outside the checkout: the commands run here
    source: Path  # the copy of the checkout the wheel was built from
    wheel: Path
    python: Path
    popproxy: Path
    site: Path  # the environment's site-packages

    def run(self, *argv: str | Path, user: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        extra = {}
        if user is not None:
            account = pwd.getpwnam(user)
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(a) for a in argv], cwd=self.folder, env=env, capture_output=True, text=True, timeout=timeout, **extra
        )

    def twistd(self, *argv: str | Path, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", TWISTD, *argv, user=user)


def _copy_source(target: Path) -> Path:
    """What the wheel is built from: the files the build reads, symbolic links kept as links."""
    source = target / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in ("popproxy", "twisted", "conf", "docs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    return source


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # Not pytest's tmp_path: that folder is private to root, and one test starts popproxy as nobody.
    folder = Path(tempfile.mkdtemp(prefix="popproxy-wheel-"))
    try:
        folder.chmod(0o755)
        wheels = folder / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(_copy_source(folder))],
            check=True, capture_output=True, timeout=120,
        )
        (wheel,) = wheels.glob("popproxy-*.whl")
        source = folder / "src"
        environment = folder / "venv"
        venv.EnvBuilder(with_pip=False).create(environment)
        python = environment / "bin" / "python"
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True, capture_output=True, text=True
        ).stdout.strip()
        # The dependencies: this run's site-packages, where they are installed (added after the new
        # environment's own site-packages, so the wheel's popproxy comes first).
        Path(site, "popproxy-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
            check=True, capture_output=True, timeout=120,
        )
        yield Installed(folder, source, wheel, python, environment / "bin" / "popproxy", Path(site))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_wheel_ships_the_files_an_admin_needs_equal_to_the_repositorys(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        for shipped, source in SHIPPED.items():
            assert wheel.read(f"popproxy/share/{shipped}") == (installed.source / source).read_bytes(), shipped
        license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(license_files) == 1 and b"MIT License" in wheel.read(license_files[0])
        entry_points = next(wheel.read(n) for n in names if n.endswith(".dist-info/entry_points.txt")).decode()
        assert "popproxy = popproxy.cli:main" in entry_points
        assert "twisted/plugins/popproxy_plugin.py" in names
    # One source each: the package's copies in the checkout are links to conf/, docs/ and README.md.
    for shipped, source in SHIPPED.items():
        if not source.startswith("popproxy/"):
            assert (SHARE / shipped).is_symlink() and (SHARE / shipped).resolve() == (ROOT / source).resolve(), shipped


def test_installed_wheel_version_example_config_and_check(installed: Installed) -> None:
    where = installed.run(installed.python, "-c", "import popproxy; print(popproxy.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed.folder / "venv"), where  # not the checkout

    version = installed.run(installed.popproxy, "--version")
    assert version.returncode == 0 and version.stdout.startswith(f"popproxy {__version__} (Twisted "), version
    twistd_version = installed.twistd("popproxy", "--version")
    assert twistd_version.returncode == 0 and twistd_version.stdout.startswith(f"popproxy {__version__} ("), twistd_version

    example = installed.run(installed.popproxy, "example-config")
    assert example.returncode == 0 and example.stdout == (installed.source / "conf" / "popproxy.toml").read_text()
    # An admin's edit: the example's certificate and CA file names, pointed at real files.
    certs = installed.folder / "certs"
    certs.mkdir()
    authority = CertificateAuthority.create("packaging test CA")
    write_private(certs / "pop.pem", authority.issue(["pop.example.org"]).combined_pem)
    write_private(certs / "pop-example-net.pem", authority.issue(["pop.example.net"]).combined_pem)
    (certs / "internal-ca.pem").write_bytes(authority.cert_pem)
    config = example.stdout
    for name, path in [("tls.pem", "pop.pem"), ("tls-example-net.pem", "pop-example-net.pem"), ("upstream-ca.pem", "internal-ca.pem")]:
        assert f'"{name}"' in config
        config = config.replace(f'"{name}"', f'"{certs / path}"')
    (installed.folder / "x.toml").write_text(config)

    checked = installed.twistd("popproxy", "-c", "x.toml", "--check")
    assert checked.returncode == 0 and "configuration OK" in checked.stdout, checked
    assert installed.run(installed.popproxy, "check", "x.toml").returncode == 0
    (installed.folder / "broken.toml").write_text(config.replace(str(certs / "pop.pem"), str(certs / "missing.pem")))
    broken = installed.run(installed.popproxy, "check", "broken.toml")
    assert broken.returncode == 1 and "missing.pem" in broken.stderr, broken

    listed = installed.run(installed.popproxy, "share")
    assert listed.returncode == 0 and listed.stdout.split() == sorted(SHIPPED), listed
    unit = installed.run(installed.popproxy, "share", "popproxy.service")
    assert unit.returncode == 0 and unit.stdout == (installed.source / "conf" / "popproxy.service").read_text(), unit
    # The man page also where man(1) looks, beside the environment's bin/ (MANPATH from PATH).
    page = installed.folder / "venv" / "share" / "man" / "man5" / "popproxy.toml.5"
    assert page.read_bytes() == (installed.source / "popproxy" / "share" / "man" / "popproxy.toml.5").read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="starts popproxy as another user (nobody): needs root")
def test_plugin_cache_step_spares_the_service_user_the_cache_warning(installed: Installed) -> None:
    """Issue 12, finding 5: the first start as a non-root user logged "Unable to write to plugin cache".
    ``popproxy install-plugin-cache``, run by the installing user, builds the cache so it does not."""
    port = free_port()
    config = installed.folder / "serve.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n\n'
        '[upstream.u]\naddress = "127.0.0.1:9"\ntls = "none"\n\n[routing]\ndefault = "u"\n'
    )
    config.chmod(0o644)
    plugins = installed.site / "twisted" / "plugins"
    assert (plugins / "popproxy_plugin.py").exists()

    def start_as_nobody() -> str:
        """Start ``twistd -n popproxy`` as nobody, wait until it serves, stop it; return its log."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        account = pwd.getpwnam("nobody")
        process = subprocess.Popen(
            [str(installed.python), "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", "popproxy", "-c", str(config)],
            cwd=installed.folder, env=env, user=account.pw_uid, group=account.pw_gid, extra_groups=[],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert process.stdout is not None
        log = ""
        try:
            deadline = time.monotonic() + 30
            while "popproxy serving" not in log:
                line = process.stdout.readline()
                assert line, f"twistd ended before serving:\n{log}"
                log += line
                assert time.monotonic() < deadline, log
        finally:
            process.send_signal(signal.SIGTERM)
            log += process.communicate(timeout=30)[0]
        return log

    (plugins / "dropin.cache").unlink(missing_ok=True)  # as pip leaves it: not there
    assert "Unable to write to plugin cache" in start_as_nobody()  # the problem, as the issue saw it

    step = installed.run(installed.popproxy, "install-plugin-cache")
    assert step.returncode == 0, step
    assert (plugins / "dropin.cache").stat().st_mtime >= (plugins / "popproxy_plugin.py").stat().st_mtime
    assert "Unable to write to plugin cache" not in start_as_nobody()

    # Run by a user who cannot write there, the step says so (rather than leaving a stale cache).
    os.utime(plugins / "popproxy_plugin.py")  # as an upgrade does: the plugin is newer than its cache
    refused = installed.run(installed.popproxy, "install-plugin-cache", user="nobody")
    assert refused.returncode == 1 and str(plugins / "dropin.cache") in refused.stderr, refused
