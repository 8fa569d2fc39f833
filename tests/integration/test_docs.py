"""The Python blocks of README.md and docs/*.md run as written, in order per page, and print what their
comments say they print; a block preceded by ``<!-- not-run: reason -->`` is skipped (README, Development)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API_DOC = REPO / "docs" / "api.md"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# An optional "<!-- not-run: reason -->" line, then a fence tagged python, its code, the closing fence.
BLOCK = re.compile(
    r"^(?:<!--\s*not-run:(?P<reason>.*?)-->[ \t]*\n)?```python[ \t]*\n(?P<code>.*?)^```", re.S | re.M
)


def python_blocks(text: str) -> list[str]:
    """The code of every python block of a page, in order, the ones marked not-run included."""
    return [m.group("code") for m in BLOCK.finditer(text)]


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(1-based block number, code) of the blocks to run; a not-run mark must give its reason."""
    out = []
    for i, m in enumerate(BLOCK.finditer(text), start=1):
        if m.group("reason") is None:
            out.append((i, m.group("code")))
        elif not m.group("reason").strip():
            raise ValueError(f"python block {i} is marked not-run without a reason")
    return out


def promised_output(block: str) -> list[str]:
    """The text after ``# `` on every ``print(...)`` line that has one: what that print must show."""
    lines = re.finditer(r"^[ \t]*print\(.*\)[ \t]+#[ \t]*(.+)$", block, flags=re.M)
    return [m.group(1).strip() for m in lines]


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


WITH_BLOCKS = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("page", WITH_BLOCKS, ids=_name)
def test_python_blocks_run_and_print_what_they_promise(page, tmp_path, monkeypatch):
    """The page's blocks, in order and in one namespace, in a fresh folder holding the repository's demo/
    (weights and images): relative paths read as from the repository root, and whatever a block writes
    stays out of the repository."""
    if not (REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors").is_file():
        pytest.fail("demo/weights/deit_tiny_patch16_224.safetensors is part of the repository")
    (tmp_path / "demo").symlink_to(REPO / "demo", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    blocks = runnable_blocks(page.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{_name(page)} block {i}", "exec"), namespace)
        printed = out.getvalue().splitlines()
        for want in promised_output(block):
            assert any(line.strip() == want for line in printed), (
                f"{_name(page)} block {i} promises to print {want!r}; it printed {printed}"
            )


def test_every_page_with_examples_is_found():
    """The block pattern finds the examples (a changed fence would otherwise run nothing)."""
    assert len(python_blocks(API_DOC.read_text(encoding="utf-8"))) >= 5, "docs/api.md lost its examples"
    assert len(python_blocks((REPO / "README.md").read_text(encoding="utf-8"))) >= 1
    marked = [p.name for p in PAGES if re.search(r"<!--\s*not-run:", p.read_text(encoding="utf-8"))]
    assert len(marked) <= 1, f"not-run blocks are to stay rare: {marked}"


def test_not_run_marks_skip_a_block_and_need_a_reason():
    page = ("```python\na = 1\n```\n\n<!-- not-run: needs a GPU -->\n```python\nb = 2\n```\n"
            "```python\nc = 3\n```\n")
    assert python_blocks(page) == ["a = 1\n", "b = 2\n", "c = 3\n"]
    assert runnable_blocks(page) == [(1, "a = 1\n"), (3, "c = 3\n")]
    with pytest.raises(ValueError, match="without a reason"):
        runnable_blocks("<!-- not-run: -->\n```python\nx = 1\n```\n")


def test_promised_output_is_read_from_print_comments():
    block = 'x = 1  # not a print\nprint(x)  # 1\nprint("a")\n\n# a comment on the next line\nprint(2)\n'
    assert promised_output(block) == ["1"]


PLACEHOLDER = re.compile(r"^\s*[A-Z][A-Z0-9]*_[A-Z0-9_]+\b(?![(\[`=])|\bTODO\b|\bTBD\b|\bXXX\b", re.M)


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in (REPO / "docs").glob("*.md"))])
def test_user_pages_hold_no_unfilled_placeholders(page):
    """A page a user reads has no stand-in left for text that was to be filled in (a line starting with
    a bare NAME_LIKE_THIS token, TODO, TBD, XXX)."""
    path = REPO / page if page == "README.md" else REPO / "docs" / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code may use constants
    found = [m.group(0).strip() for m in PLACEHOLDER.finditer(text)]
    assert not found, f"{page}: {found}"


def test_the_placeholder_check_catches_a_stand_in():
    assert PLACEHOLDER.search("Some text.\nCARS_ROWS\nMore text.")
    assert PLACEHOLDER.search("speed: TODO")
    assert not PLACEHOLDER.search("set `RENYIPRUNE_DIST_TIMEOUT` to change it; DEFAULT_CHUNK_BYTES is 4 MiB")
