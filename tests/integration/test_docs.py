"""The examples of docs/api.md run as written, in order, and print what their comments say they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API_DOC = REPO / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def promised_output(block: str) -> list[str]:
    """The text after ``# `` on every ``print(...)`` line that has one: what that print must show."""
    lines = re.finditer(r"^[ \t]*print\(.*\)[ \t]+#[ \t]*(.+)$", block, flags=re.M)
    return [m.group(1).strip() for m in lines]


def test_api_examples_run_and_print_what_they_promise(monkeypatch):
    if not (REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors").is_file():
        pytest.fail("demo/weights/deit_tiny_patch16_224.safetensors is part of the repository")
    monkeypatch.chdir(REPO)
    blocks = python_blocks(API_DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "docs/api.md lost its examples"
    namespace: dict = {"__name__": "docs_api"}
    for i, block in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
        printed = out.getvalue().splitlines()
        for want in promised_output(block):
            assert any(line.strip() == want for line in printed), (
                f"block {i + 1} promises to print {want!r}; it printed {printed}"
            )


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
