"""Every document the code, config or docs cite must be in this repository.

Design notes that lived outside the repository were restated in docs/model.md and
docs/runtime-notes.md. These tests fail when a text file in the checkout (tracked, or new and not
ignored) still names one of those outside files, when a markdown link points at a file that does
not exist, or when a `docs/model.md §N` citation names a section that docs/model.md does not have.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_DOC = ROOT / "docs" / "model.md"

# Names of files that are not in the repository. The patterns are written so that this file does
# not match them itself.
OUTSIDE_REFERENCES: list[tuple[re.Pattern[str], str]] = [
    (re.compile("RUNTIME" + "_NOTES"), "docs/runtime-notes.md"),
    (re.compile(r"\bspec/(?:model|api)\.md"), "docs/model.md or docs/api.md"),
    (re.compile(r"\bspec[ ]model\.md"), "docs/model.md"),
    (re.compile(r"\bspec[ ]§"), "docs/model.md §N"),
    (re.compile("ARCHITECTURE" + r"\.md"), "README.md or docs/"),
    (re.compile(r"\.\./share[d]\b"), "a file inside the repository"),
    (re.compile(r"/work/share[d]\b"), "a file inside the repository"),
    (re.compile(r"\bshare[d]/(?:spec|design)/"), "a file inside the repository"),
]

# `docs/model.md §4.8`, `docs/model.md §4 and §6`, `docs/model.md §3.1–3.2`, `[model.md](model.md) §4.11/§6.5`,
# `[model.md §7](model.md)`: the `§` list right after a mention of model.md.
_SEC = r"§\s*\d+(?:\.\d+)*(?:\s*[–-]\s*\d+(?:\.\d+)*)?"
MODEL_CITATION = re.compile(r"model\.md\)?((?:(?:\s*[,/;]\s*|\s+and\s+|\s*)" + _SEC + r")+)")
SECTION_NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[–-]\s*(\d+(?:\.\d+)*))?")
HEADING_NUMBER = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)

MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


@cache
def checkout_files() -> tuple[Path, ...]:
    """Tracked files plus new files that git does not ignore (so a reference is caught before commit)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot list the repository's files")
    names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    return tuple(ROOT / n for n in names if (ROOT / n).is_file())


def read_text(path: Path) -> str | None:
    """The file as text, or None for binary files (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def text_files() -> list[tuple[Path, str]]:
    return [(p, t) for p in checkout_files() if (t := read_text(p)) is not None]


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@cache
def model_doc_sections() -> frozenset[str]:
    return frozenset(HEADING_NUMBER.findall(MODEL_DOC.read_text(encoding="utf-8")))


def test_no_file_cites_a_document_outside_the_repo() -> None:
    bad = []
    for path, text in text_files():
        for pattern, instead in OUTSIDE_REFERENCES:
            for m in pattern.finditer(text):
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: cites '{m.group(0)}', which is not in "
                           f"this repository; cite {instead} instead")
    assert not bad, "\n".join(bad)


def markdown_files() -> list[Path]:
    return [p for p in checkout_files() if p.suffix.lower() == ".md"]


def test_markdown_links_point_at_existing_files() -> None:
    checked = {rel(p) for p in markdown_files()}
    assert "README.md" in checked and any(n.startswith("docs/") for n in checked)
    bad = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)),
                                FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text))
        for m in MD_LINK.finditer(prose):
            target = m.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:, …) or an anchor in the same page
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (path.parent / file_part).resolve()
            if not resolved.exists():
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: link target '{target}' does not exist")
            elif not resolved.is_relative_to(ROOT):
                bad.append(f"{rel(path)}:{line_of(text, m.start())}: link target '{target}' is outside the "
                           f"repository")
    assert not bad, "\n".join(bad)


def test_model_doc_sections_are_numbered_once() -> None:
    numbers = HEADING_NUMBER.findall(MODEL_DOC.read_text(encoding="utf-8"))
    dupes = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not dupes, f"docs/model.md numbers these sections more than once: {dupes}"
    for n in numbers:  # every subsection has its chapter
        assert n.split(".")[0] in numbers, f"docs/model.md §{n} has no chapter heading §{n.split('.')[0]}"


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(position, section number) for every `§N` cited next to a mention of model.md."""
    found = []
    for m in MODEL_CITATION.finditer(text):
        for s in SECTION_NUMBER.finditer(m.group(1)):
            for n in s.groups():
                if n is not None:
                    found.append((m.start(1) + s.start(), n))
    return found


def test_cited_model_doc_sections_exist() -> None:
    sections = model_doc_sections()
    assert {"0", "1", "2", "3", "4", "5", "6", "7", "8", "4.8"} <= sections
    bad, seen = [], 0
    for path, text in text_files():
        cites = cited_sections(text)
        if path == MODEL_DOC:  # its own cross-references: every `§N` in the page
            cites = [(s.start(), n) for s in SECTION_NUMBER.finditer(text) for n in s.groups() if n]
        seen += len(cites)
        for pos, n in cites:
            if n not in sections:
                bad.append(f"{rel(path)}:{line_of(text, pos)}: cites docs/model.md §{n}, which has no heading "
                           f"'{n}' in docs/model.md")
    assert seen > 20, "found almost no docs/model.md citations: is the citation pattern still right?"
    assert not bad, "\n".join(bad)


def test_citation_pattern() -> None:
    text = ("see docs/model.md §4.8 and §4.9; (docs/model.md §1, §4, §6) docs/model.md §3.1–3.2 "
            "[model.md](model.md) §4.11/§6.5 [model.md §7](model.md) docs/api.md §9")
    assert [n for _, n in cited_sections(text)] == ["4.8", "4.9", "1", "4", "6", "3.1", "3.2",
                                                   "4.11", "6.5", "7"]
