"""``python -m popproxy.manpage``: the man page popproxy.toml(5), generated from the commented example config.

The example configuration (``conf/popproxy.toml``, printed by ``popproxy example-config``) is the one
place where each key's default and meaning are written down. This module turns its comment blocks into
roff (man(7) macros): one section per ``# ----`` banner, one subsection per table, one tagged paragraph
per key with its default and its text. The generated page is committed (``popproxy/share/man/``) and a
test regenerates it and compares byte for byte, so the page and the example cannot drift: after
editing the example, run ``python -m popproxy.manpage`` and commit both. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

SOURCE = Path(__file__).resolve().parent.parent / "conf" / "popproxy.toml"
TARGET = Path(__file__).resolve().parent / "share" / "man" / "popproxy.toml.5"

_BANNER = re.compile(r"^# ?-{20,}\s*$")
_HEADER = re.compile(r"^(?:# ?)?(\[\[?[A-Za-z0-9_.-]+\]\]?)\s*(?:#\s?(.*))?$")
_KEY = re.compile(r'^(#{0,2} ?)("[^"]*"|[A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(.*)$')
_CONTINUED = re.compile(r"^#\s+#\s?(.*)$")  # the trailing comment of the key above, continued
_HOOK_TITLE = re.compile(r"^# --- ([a-z0-9-]+): (.*?)\s*-*\s*$")
_DOCUMENTED = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*) \(((?:[^()]|\([^()]*\))*)\)[:.]? ?(.*)$")  # "key (default 10): text"
_TERM = re.compile(r"^(\S+(?: \S+)*?)\s{2,}(\S.*)$")  # "term    text" in an indented table
_LABEL = re.compile(r"^([A-Za-z_](?:[^():]|\([^()]*\))*): (.*)$")  # "url (required): text" in an indented list


def _roff(text: str) -> str:
    """One line of text as roff: backslashes escaped, no line starting a request."""
    text = text.replace("\\", "\\e")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def _split_value(rest: str) -> tuple[str, str]:
    """``value   # comment`` → (value, comment); a ``#`` inside a string does not start a comment."""
    quote: str | None = None
    for index, char in enumerate(rest):
        if quote:
            if char == "\\" and quote == '"':
                continue
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or rest[index - 1].isspace()):
            return rest[:index].rstrip(), rest[index + 1 :].strip()
    return rest.rstrip(), ""


@dataclass
class _Page:
    lines: list[str] = field(default_factory=list)
    in_hook: bool = False  # under a "# --- name: ..." hook title, which stands for its [[hook]] header

    def emit(self, *lines: str) -> None:
        self.lines.extend(lines)

    def prose(self, texts: list[str], request: str = ".PP", first: str | None = None) -> None:
        """Comment text: plain lines fill one paragraph; indented runs become a tagged list or stay as drawn.

        ``request`` starts each paragraph (``.IP`` keeps the indent of the entry it is in); ``first``, if
        given, starts the first one instead (``""``: none, the text follows a ``.TP`` tag).
        """
        index = 0
        started = False
        while index < len(texts):
            text = texts[index]
            if text.startswith("  "):
                end = index
                while end < len(texts) and (texts[end].startswith("  ") or not texts[end].strip()):
                    end += 1
                self._indented(texts[index:end], request)
                index = end
                started = False
                first = None
                continue
            if not started:
                opening = request if first is None else first
                if opening:
                    self.emit(opening)
                started = True
                first = None
            self.emit(_roff(text.strip()) if text.strip() else request)
            index += 1

    def _indented(self, texts: list[str], request: str) -> None:
        base = min(len(t) - len(t.lstrip()) for t in texts if t.strip())
        items: list[list[str]] = []
        for text in texts:
            if len(text) - len(text.lstrip()) == base or not items:
                items.append([text.strip()])
            else:
                items[-1].append(text.strip())
        tagged = []
        for item in items:
            match = _TERM.match(item[0]) or _LABEL.match(item[0])
            if match is None or re.search(r"\S\s{3,}\S", match.group(2)):  # no term, or a table of columns
                break
            tagged.append((match.group(1), [match.group(2), *item[1:]]))
        else:
            self.emit(".RS")
            for term, body in tagged:
                self.emit(".TP", f"\\fB{_roff(term)}\\fR", *(_roff(b) for b in body))
            self.emit(".RE")
            return
        self.emit(request, ".RS", ".nf", *(_roff(t[base:]) for t in texts), ".fi", ".RE")

    def entry(self, tag: str, body: list[str], example: list[str]) -> None:
        self.emit(".TP", tag)
        if body:
            self.prose(body, request=".IP", first="")
        if example:
            self.emit(".IP", ".nf", *(_roff(e) for e in example), ".fi")
        self.emit(".PP")


def _key(line: str) -> re.Match[str] | None:
    """``key = value`` or its commented-out form ``#key = value`` (or ``# key = value``)."""
    match = _KEY.match(line)
    if match is None or (line.startswith("#") and not match.group(1)):
        return None
    if match.group(1).endswith(" ") and f"{match.group(2)} = " not in line:
        return None  # "# word=..." is prose; a key commented out with a space is written "# key = value"
    return match


def _comment_text(line: str) -> str:
    text = line[1:]
    return text[1:] if text.startswith(" ") else text


def _blocks(source: str) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in source.splitlines():
        if line.strip():
            blocks[-1].append(line.rstrip())
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def _keys(block: list[str], start: int) -> tuple[list[tuple[str, str, str]], list[str], int]:
    """The key lines from ``start``: (key, value, trailing comment), the example lines, and the next index."""
    keys: list[tuple[str, str, str]] = []
    example: list[str] = []
    index = start
    while index < len(block):
        line = block[index]
        match = _key(line)
        continued = _CONTINUED.match(line)
        if match:
            value, comment = _split_value(match.group(3))
            keys.append((match.group(2), value, comment))
            example.append(f"{match.group(2)} = {value}")
        elif continued and keys:
            key, value, comment = keys[-1]
            keys[-1] = (key, value, f"{comment}\n{continued.group(1)}" if comment else continued.group(1))
        else:
            break
        index += 1
    return keys, example, index


def render(source: str, version: str = __version__) -> str:
    """The roff text of popproxy.toml(5) for the example configuration ``source``."""
    page = _Page()
    page.emit(
        f'.TH POPPROXY.TOML 5 "" "popproxy {version}" "File Formats"',
        '.\\" Generated by "python -m popproxy.manpage" from conf/popproxy.toml: edit that file, not this one.',
        ".SH NAME",
        "popproxy.toml \\- configuration file of the popproxy POP3 proxy",
        ".SH SYNOPSIS",
        "\\fI/etc/popproxy/popproxy.toml\\fR",
        ".PP",
        "\\fBtwistd popproxy \\-c\\fR \\fIFILE\\fR [\\fB\\-\\-check\\fR]",
        ".br",
        "\\fBpopproxy check\\fR \\fIFILE\\fR",
        ".br",
        "\\fBpopproxy example\\-config\\fR",
        ".SH DESCRIPTION",
        "popproxy reads one TOML file at start and again on each SIGHUP.",
        "This page is the commented example configuration, which \\fBpopproxy example\\-config\\fR prints,",
        "set as a manual page: each key with its default and what it does.",
    )
    for block in _blocks(source):
        index = 0
        while index < len(block):
            line = block[index]
            if _BANNER.match(line):
                texts = []
                index += 1
                while index < len(block) and block[index].startswith("#") and not _HEADER.match(block[index]):
                    texts.append(_comment_text(block[index]))
                    index += 1
                title = re.split(r"[:.(]", texts[0], maxsplit=1)[0].strip() if texts else "More"
                page.in_hook = False
                page.emit(f".SH {_roff(title.upper())}")
                page.prose(texts)
                continue
            hook = _HOOK_TITLE.match(line)
            if hook:
                page.emit(f".SS [[hook]] use = \\(dq{_roff(hook.group(1))}\\(dq", _roff(hook.group(2)))
                page.in_hook = True
                index += 1
                continue
            header = _HEADER.match(line)
            if header:
                name = header.group(1)
                if not (page.in_hook and name == "[[hook]]"):
                    if not name.startswith("[[hook"):
                        page.in_hook = False
                    page.emit(f".SS {_roff(name)}")
                    if header.group(2):
                        page.emit(_roff(header.group(2)))
                index += 1
                continue
            if line.startswith("#") and not _key(line):
                texts = []
                while index < len(block):
                    current = block[index]
                    if _BANNER.match(current) or _HEADER.match(current) or _HOOK_TITLE.match(current):
                        break
                    if _key(current) or not current.startswith("#"):
                        break
                    text = _comment_text(current)
                    texts.append(text[1:].lstrip() if text.startswith("#") else text)
                    index += 1
                keys, example, after = _keys(block, index)
                documented = _DOCUMENTED.match(texts[0]) if texts else None
                if keys and documented and documented.group(1) in {k for k, _, _ in keys}:
                    others = "".join(f", \\fB{_roff(k)}\\fR" for k, _, _ in keys if k != documented.group(1))
                    tag = f"\\fB{_roff(documented.group(1))}\\fR ({_roff(documented.group(2))}){others}"
                    page.entry(tag, [documented.group(3), *texts[1:]], example)
                    index = after
                else:
                    page.prose(texts)
                continue
            keys, example, after = _keys(block, index)
            if not keys:  # not TOML this page understands: keep it as it is
                page.emit(".PP", ".nf", _roff(line), ".fi")
                index += 1
                continue
            plain: list[str] = []  # keys without a comment, shown together as they are written
            for (key, value, comment), written in zip(keys, example, strict=True):
                if not comment:
                    plain.append(written)
                    continue
                if plain:
                    page.emit(".PP", ".RS", ".nf", *(_roff(e) for e in plain), ".fi", ".RE")
                    plain = []
                page.entry(f"\\fB{_roff(key)}\\fR = {_roff(value)}", comment.splitlines(), [])
            if plain:
                page.emit(".PP", ".RS", ".nf", *(_roff(e) for e in plain), ".fi", ".RE")
            index = after
    page.emit(
        ".SH FILES",
        ".TP",
        "\\fI/etc/popproxy/popproxy.toml\\fR",
        "the configuration \\fBtwistd popproxy\\fR reads unless \\fB\\-c\\fR names another.",
        ".SH SEE ALSO",
        "\\fBtwistd\\fR(1), \\fBpopproxy check\\fR, \\fBpopproxy example\\-config\\fR;",
        "RFC 1939 (POP3), RFC 2449 (POP3 extensions), RFC 2595 (STLS), RFC 8314 (implicit TLS).",
    )
    return "\n".join(_tidy(page.lines)) + "\n"


def _tidy(lines: list[str]) -> list[str]:
    """Drop paragraph requests that would make empty paragraphs (groff warns about none, but they add space)."""
    paragraph = {".PP", ".br"}
    out: list[str] = []
    for line in lines:
        if line in paragraph and out and out[-1] in paragraph | {".PP"}:
            out[-1] = ".PP" if ".PP" in (line, out[-1]) else ".br"
            continue
        if line in paragraph and out and (out[-1].startswith((".SH", ".SS", ".TP")) and out[-1] != ".TP"):
            continue
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popproxy.manpage", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=SOURCE, help="the commented example (default %(default)s)")
    parser.add_argument("--output", type=Path, default=TARGET, help="where to write the page; - for stdout (default %(default)s)")
    args = parser.parse_args(argv)
    text = render(args.source.read_text(encoding="utf-8"))
    if str(args.output) == "-":
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
