"""The documentation points at things that exist: README.md, every docs/*.md and benchmarks/README.md.

- Every relative Markdown link `[text](target)` names a file or directory of the repository, and a `#anchor` names
  a heading of its target (GitHub's slug); http(s) links are not fetched.
- Every backticked repository path with a slash and an extension (`rlhf_ray/algos.py`, `configs/tiny_ppo.yaml`,
  also inside a backticked command) exists. In a table row, the bare names that follow such a path in the same
  cell (`rlhf_ray/sft.py`, `prefs.py`) are that path's neighbours, and a row whose first cell is a directory
  (`benchmarks/`) lists that directory's files: both are checked too.
- README.md is a front door: at most 250 lines, linking to benchmarks/README.md and to every page under docs/;
  every docs page links back to it.
Pure text, no Ray: well under a second.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BENCHMARKS = REPO / "benchmarks" / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS, BENCHMARKS]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"\[([^\]\n]*)\]\(([^)\s]+)\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SPAN = re.compile(r"`([^`]+)`")                   # inline code may wrap onto the next line, as Markdown allows
EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")
PATH_CHARS = re.compile(r"^[\w./-]+$")
# Made by running things, never committed: a run's outputs (runs/...), the tiny world's models (assets/tiny/...),
# W&B's files (wandb/...). Paths there are what a run writes, not files of the repository.
OUTPUT_DIRS = ("runs/", "assets/", "wandb/")


def prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a fenced block's `# comment` is no heading, its text no link)."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lowercase, every character that is not a
    word character (letters, digits, underscore), a hyphen or a space dropped, spaces to hyphens."""
    text = LINK.sub(r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")          # GitHub numbers a repeated heading's anchor
    return out


@functools.cache
def top_dirs() -> frozenset[str]:
    return frozenset({p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")})


def repo_path(token: str) -> str | None:
    """The token as a repository path to check, or None when it is not one."""
    token = token.lstrip("(['\"").rstrip(".,;:)]'\"").split("::")[0]   # punctuation around it; a test's name
    if token.startswith("./"):
        token = token[2:]
    if "/" not in token or not EXTENSION.search(token):
        return None                                       # a metric (`policy/clipfrac`), a directory, a module
    if token.startswith(("/", "~", ".")) or "://" in token:
        return None                                       # absolute (/tmp, /proc), the home (~/.ray), a venv, a URL
    if not PATH_CHARS.match(token):
        return None                                       # <out>/policy placeholders, globs (*, {a,b}), $VARS
    if token.startswith(OUTPUT_DIRS):
        return None
    if token.split("/")[0] not in top_dirs():
        return None                                       # another project's file (bitsandbytes' nn/modules.py)
    return token


def spans(page: Path) -> list[str]:
    return [m.group(1) for m in SPAN.finditer("\n".join(prose(page)))]


def table_neighbours(page: Path) -> list[str]:
    """Bare file names a table row places in a directory (see the module docstring), as repository paths."""
    out = []
    for line in prose(page):
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        first = SPAN.findall(cells[0])
        if len(first) == 1 and first[0].endswith("/") and first[0].rstrip("/") in top_dirs():
            base, names = first[0], [n for cell in cells[1:] for n in SPAN.findall(cell)]
        elif first and repo_path(first[0]):
            base, names = first[0].rsplit("/", 1)[0] + "/", first[1:]
        else:
            continue
        out += [base + n for n in names if "/" not in n and " " not in n and EXTENSION.search(n)
                and PATH_CHARS.match(n)]
    return out


def links(page: Path) -> list[str]:
    return [m.group(2) for line in prose(page) for m in LINK.finditer(line)]


def resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return (page.parent / path).resolve() if path else page, anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings(page):
    assert page.exists(), page
    bad = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue                                      # http(s), mailto: not fetched
        path, anchor = resolve(page, target)
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            bad.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_backticked_paths_exist(page):
    paths = {p for span in spans(page) for token in re.split(r"[\s=]+", span) if (p := repo_path(token))}
    paths |= set(table_neighbours(page))
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


def test_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, over {README_MAX_LINES}: the manual belongs in docs/"
    linked = {resolve(README, t)[0] for t in links(README) if not re.match(r"^[a-z]+:", t)}
    unlinked = [p.relative_to(REPO) for p in [*DOCS, BENCHMARKS] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_pages_link_back_to_the_readme(page):
    head = "\n".join(page.read_text().splitlines()[:5])
    assert "(../README.md)" in head, f"docs/{page.name}: no link back to the README in its first lines"
