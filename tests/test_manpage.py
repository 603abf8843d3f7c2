"""popproxy.toml(5) is generated from the commented example configuration and cannot drift from it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from popproxy import manpage

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "popproxy" / "share" / "man" / "popproxy.toml.5"
EXAMPLE = ROOT / "conf" / "popproxy.toml"


def test_the_committed_page_is_what_the_example_generates() -> None:
    generated = manpage.render(EXAMPLE.read_text(encoding="utf-8"))
    assert generated == PAGE.read_text(encoding="utf-8"), (
        "popproxy/share/man/popproxy.toml.5 is out of date with conf/popproxy.toml: run `python -m popproxy.manpage`"
    )


def test_every_key_of_the_example_is_on_the_page() -> None:
    page = PAGE.read_text(encoding="utf-8")
    keys = set(re.findall(r"^#{0,2} ?([a-z_]+) = ", EXAMPLE.read_text(encoding="utf-8"), flags=re.MULTILINE))
    assert len(keys) > 60
    missing = sorted(key for key in keys if not re.search(rf"(\\fB)?{key}(\\fR)? = ", page.replace("\\e", "\\")))
    assert not missing
    for table in ("[[listen]]", "[upstream.legacy]", "[routing]", "[routing.lookup]", "[limits]", "[process]", "[metrics]"):
        assert f".SS {table}" in page


def test_man_renders_the_page_without_warnings(tmp_path: Path) -> None:
    assert shutil.which("groff") and shutil.which("man"), "groff and man are needed: run scripts/setup"
    groff = subprocess.run(["groff", "-ww", "-man", "-z", str(PAGE)], capture_output=True, text=True, timeout=60)
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    man = subprocess.run(
        ["man", "--warnings", "-l", str(PAGE)], capture_output=True, text=True, timeout=60, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}
    )
    assert man.returncode == 0 and man.stderr == "", man.stderr
    assert "POPPROXY.TOML(5)" in man.stdout and "login_as" in man.stdout


def test_roff_requests_in_text_are_escaped() -> None:
    page = manpage.render('# A line that starts a sentence with\n# .dots and a \\backslash\nkey = 1\n')
    assert "\n\\&.dots and a \\ebackslash\n" in page
