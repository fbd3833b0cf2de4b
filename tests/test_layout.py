"""The repository's shape: docs/layout.md names every module of the package, and the package keeps its files and
functions short enough to read in one sitting (no file over 500 lines, no function over 80)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "softmoe"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def modules():
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")


def function_lengths(path):
    """{name: lines} of every function and method in ``path``, decorators included."""
    lengths = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([decorator.lineno for decorator in node.decorator_list] + [node.lineno])
            lengths[node.name] = max(lengths.get(node.name, 0), node.end_lineno - start + 1)
    return lengths


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_layout_page_names_every_module(path):
    layout = (ROOT / "docs" / "layout.md").read_text()
    relative = path.relative_to(PACKAGE)
    # a module is named by its file name in its folder's table (harness/data/ modules by name, the bench's too)
    assert f"`{relative.name}`" in layout or f"`{relative.stem}`" in layout or f"{relative}" in layout, relative


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_file_is_over_500_lines_and_no_function_over_80(path):
    relative = path.relative_to(ROOT)
    assert len(path.read_text().splitlines()) <= MAX_FILE_LINES
    too_long = {
        f"{relative}:{name}": lines
        for name, lines in function_lengths(path).items()
        if lines > MAX_FUNCTION_LINES
    }
    assert not too_long


def test_no_line_carries_a_formatter_marker():
    """No formatter runs on this tree (ruff check is the style gate), so a formatter-skip comment guards nothing."""
    marker = "fmt: " + "skip"  # spelled apart, so this file does not match itself
    files = [path for folder in ("softmoe", "tests") for path in (ROOT / folder).rglob("*.py")]
    marked = [f"{path.relative_to(ROOT)}:{number}" for path in files
              for number, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert not marked, marked
