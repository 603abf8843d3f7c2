"""docs/hooks.md stays true: every ```toml block loads as it is and builds its hooks (a reader copies
them), the packaging excerpt is the example package's, and every part of the hook contract is named."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import popproxy.hooks.registry as registry
from popproxy.config import load_config
from popproxy.hooks.interfaces import IMessageHook, ISessionHook
from popproxy.hooks.registry import ENTRY_POINT_GROUP, build_hooks

from support.configs import PREAMBLE

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs" / "hooks.md"
EXAMPLE = ROOT / "examples" / "popproxy-subject-stamp"
_FENCE = re.compile(r"^```toml\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Absolute paths a reader would use on a server; here they go under the test's temporary folder.
_SERVER_PATH = re.compile(r'"(/(?:var|run|etc|srv)/[^"]*)"')


@dataclass(frozen=True)
class Block:
    line: int
    text: str


def toml_blocks() -> list[Block]:
    text = DOCS.read_text()
    return [Block(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in _FENCE.finditer(text)]


def example_pyproject() -> dict[str, object]:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())


def test_there_are_blocks_to_check() -> None:
    assert len(toml_blocks()) >= 10


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda block: f"line-{block.line}")
def test_every_toml_block_loads_and_builds(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tomllib.loads(block.text)  # as it is: not a line to fix first
    if "project" in data:
        # The packaging excerpt: what the example package declares.
        assert data["project"]["entry-points"] == example_pyproject()["project"]["entry-points"]  # type: ignore[index]
        return
    assert "hook" in data, "a block that configures no [[hook]]"
    # The example package, as if installed: its entry point, and its module on the path.
    entry = example_pyproject()["project"]["entry-points"][ENTRY_POINT_GROUP]  # type: ignore[index]
    installed = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in entry.items()]
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *installed])
    monkeypatch.syspath_prepend(str(EXAMPLE))

    def moved(match: re.Match[str]) -> str:
        path = tmp_path / match.group(1).lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        return f'"{path}"'

    config = tmp_path / "popproxy.toml"
    config.write_text(PREAMBLE + "\n" + _SERVER_PATH.sub(moved, block.text))
    built = build_hooks(load_config(config))
    try:
        assert len(built) == len(data["hook"])
    finally:
        for hook in built:
            hook.close()


def test_every_built_in_hook_has_a_section_and_an_example() -> None:
    text = DOCS.read_text()
    uses = {tomllib.loads(block.text).get("hook", [{}])[0].get("use") for block in toml_blocks()}
    for name in registry.BUILT_IN:
        assert f"\n### {name}\n" in text, name
        assert name in uses, name


@pytest.mark.parametrize("interface", [IMessageHook, ISessionHook], ids=lambda i: i.__name__)
def test_every_part_of_the_hook_interfaces_is_listed(interface: object) -> None:
    text = DOCS.read_text()
    for name in interface.names():  # type: ignore[attr-defined]
        assert re.search(rf"`{name}\b", text), f"{interface}.{name} is not in docs/hooks.md"
