"""The README's Layout and docs/architecture.md name every module that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hsplitlora"
MODULES = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def layout_section() -> str:
    return ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("doc", ["README.md Layout", "docs/architecture.md"])
def test_every_module_is_named(doc):
    text = layout_section() if doc.startswith("README") else ROOT.joinpath(doc).read_text()
    # A module is named by its path, or by its file name in its folder's line ("evaluation/  perplexity.py").
    missing = [m for m in MODULES if m not in text and Path(m).name not in text]
    assert missing == []
    assert len(MODULES) > 40  # the walk found the package


def test_readme_layout_links_the_architecture():
    assert "(docs/architecture.md)" in layout_section()
