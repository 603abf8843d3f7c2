"""The worked third-party hook (``examples/popproxy-subject-stamp``), installed by pip the way a user
installs one and enabled by entry point and by dotted path in front of the real Dovecot; a hook that
raises is contained; and the example's own tests pass, so what a hook author copies works."""

from __future__ import annotations

import os
import poplib
import shutil
import subprocess
import sys
from pathlib import Path

from support.dovecot import DovecotServer
from support.pop3client import retrieve
from support.proxyproc import ProxyProcess, free_port

TESTS = Path(__file__).parent
EXAMPLE = TESTS.parent / "examples" / "popproxy-subject-stamp"


def copy_of_example(tmp_path: Path) -> Path:
    """The example package copied out of the source tree: building it (pip, setuptools) writes
    ``build/`` and ``*.egg-info`` next to it, and those must not appear in ``examples/``."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")))


def test_entry_point_and_dotted_path_hooks(tmp_path: Path, dovecot: DovecotServer, monkeypatch) -> None:
    site = tmp_path / "site"
    # A real install by pip (into a folder of its own), so the entry point is what any user gets.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(copy_of_example(tmp_path))],
        check=True, capture_output=True, timeout=120,
    )
    assert list(site.glob("popproxy_subject_stamp-*.dist-info/entry_points.txt"))
    # The installed package, and tests/ for the failing hook of support.samplehooks.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    config = tmp_path / "popproxy.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "none"\n'
        f'[upstream.dovecot]\naddress = "127.0.0.1:{dovecot.plain_port}"\ntls = "none"\n'
        '[routing]\ndefault = "dovecot"\n'
        '[[hook]]\nuse = "subject-stamp"\nstamp = "[external]"\n'
        '[[hook]]\nuse = "support.samplehooks:tagger"\nname = "exploding"\nmode = "raise"\non_error = "pass"\n'
        '[[hook]]\nuse = "popproxy_subject_stamp:factory"\nname = "second-stamp"\nstamp = "[again]"\n'
    )
    proxy = ProxyProcess(config, [port], tmp_path)
    dave = dovecot.users["dave"]
    try:
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("dave")
        client.pass_(dave.password)
        _, listing, _ = client.list()
        for number, original in enumerate(dave.messages, start=1):
            message = retrieve(client, number)
            assert int(listing[number - 1].split()[1]) == len(message)
            subject = next(line for line in message.split(b"\r\n") if line.lower().startswith(b"subject:"))
            assert subject.startswith(b"Subject: [again] [external] ")
            assert message.endswith(original.partition(b"\r\n\r\n")[2])  # the body is untouched
        client.quit()
    finally:
        proxy.stop()
    log = proxy.log()
    assert "hook exploding failed on message 1" in log and "this hook always fails" in log


def test_the_examples_own_tests_pass(tmp_path: Path) -> None:
    copy = copy_of_example(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(copy)],
        cwd=copy, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
