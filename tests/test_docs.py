"""Every ```python block in README.md and docs/*.md runs as written.

Blocks in one file share a namespace, in order, so a page can build on earlier blocks. They
run in a scratch directory where ``data/`` points at the repository's fixtures.
A block whose first line is ``# not-run`` is skipped (used for GPU-only snippets).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if not b.startswith("# not-run")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_run(page: Path, tmp_path: Path) -> None:
    blocks = _blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no Python examples")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    # Examples run in a scratch directory that sees the repository's data/ (fixtures).
    (tmp_path / "data").symlink_to(ROOT / "data")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            code = compile(block, f"{page.name}[block {i}]", "exec")
            exec(code, namespace)  # our own documentation, not user input
    finally:
        os.chdir(cwd)
