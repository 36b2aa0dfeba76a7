"""The repository's citations stay inside the repository (issue 14).

Comments and docs cite the facts they rely on as ``docs/facts.md#<anchor>``: every such anchor
must be a heading of docs/facts.md. Nothing may send a reader to notes outside the
repository. Every relative link in docs/*.md and README.md must reach a file that exists,
and a link to a heading of a Markdown file must name a heading that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FACTS = ROOT / "docs" / "facts.md"
SCANNED = ("src", "tests", "docs", "README.md", "Makefile", "scripts", "bench", "kernels")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", "build", ".venv"}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile(re.escape("SPECS" + ".md") + "|" + re.escape(".." + "/shared/"),
                     re.IGNORECASE)
FACTS_CITATION = re.compile(r"(?:docs/)?\bfacts\.md#([A-Za-z0-9_-]+)")
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def repository_files() -> list[Path]:
    """Every text file under the scanned places (binary files and build output left out)."""
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for candidate in candidates:
            if not candidate.is_file() or SKIPPED_DIRS & set(candidate.relative_to(ROOT).parts):
                continue
            data = candidate.read_bytes()
            if b"\0" not in data:
                files.append(candidate)
    return files


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: markup and punctuation dropped (hyphens and
    underscores kept), lowercase, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def without_code(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`\n]*`", "", line))
    return "\n".join(kept)


def anchors_of(markdown_file: Path) -> set[str]:
    """The heading anchors of a Markdown file, with GitHub's -1, -2 ... for repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown_file.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            anchor = github_anchor(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def test_github_anchor_matches_githubs_rule() -> None:
    assert github_anchor("This host's KVM") == "this-hosts-kvm"
    assert github_anchor("x86 firmware flash and CFI01") == "x86-firmware-flash-and-cfi01"
    assert github_anchor("fw_cfg") == "fw_cfg"
    assert github_anchor("The `dump` package (later)") == "the-dump-package-later"
    assert github_anchor("See [docs](facts.md)") == "see-docs"


def test_no_file_sends_the_reader_outside_the_repository() -> None:
    files = repository_files()
    assert ROOT / "README.md" in files and FACTS in files and Path(__file__).resolve() in files
    offending = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                      .splitlines(), 1):
            if OUTSIDE.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, ("cite docs/facts.md (or another docs/*.md page) instead of notes "
                           "outside the repository:\n" + "\n".join(offending))


def test_every_cited_facts_anchor_is_a_heading_of_docs_facts() -> None:
    headings = anchors_of(FACTS)
    assert {"this-hosts-kvm", "kvm-abi-facts-the-code-uses"} <= headings
    cited: dict[str, list[str]] = {}
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for anchor in FACTS_CITATION.findall(line):
                cited.setdefault(anchor, []).append(f"{path.relative_to(ROOT)}:{number}")
    assert cited, "no file cites docs/facts.md#...: the scan found nothing to check"
    missing = {anchor: places for anchor, places in cited.items() if anchor not in headings}
    assert not missing, (f"anchors cited but not headings of docs/facts.md: {missing}; "
                         f"its anchors are {sorted(headings)}")


def test_every_relative_link_in_the_docs_reaches_a_file() -> None:
    pages = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    checked, broken = 0, []
    for page in pages:
        text = without_code(page.read_text(encoding="utf-8"))
        targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
        for target in targets:
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            destination = (page.parent / path_part).resolve() if path_part else page
            checked += 1
            where = f"{page.relative_to(ROOT)}: ({target})"
            if ROOT not in destination.parents and destination != ROOT:
                broken.append(f"{where} leaves the repository")
            elif not destination.exists():
                broken.append(f"{where} names no file")
            elif fragment and destination.suffix == ".md" and \
                    fragment not in anchors_of(destination):
                broken.append(f"{where} names no heading of {destination.name}")
    assert checked > 10, f"only {checked} relative links found: the scan is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)
