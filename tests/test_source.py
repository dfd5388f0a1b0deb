"""The source as text: no control characters (a docstring's ``\\beta`` written through an unescaped string becomes a backspace)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(
    p
    for d in ("ppl_vae", "tests", "benchmarks", "docs")
    for p in (ROOT / d).rglob("*")
    if p.suffix in (".py", ".md")
)
CONTROL = {c for c in range(32) if chr(c) not in "\n\r"}  # tabs too: none is written on purpose


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_source_file_holds_a_control_character(path):
    text = path.read_bytes()
    found = [(text.count(b"\n", 0, i) + 1, hex(b)) for i, b in enumerate(text) if b in CONTROL]
    assert not found, f"{path.relative_to(ROOT)}: control characters at (line, byte) {found[:5]}"


#: the most lines of code a function of the package may hold (its docstring, blank lines and comments not counted)
MAX_LINES = 80


def _code_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    has_doc = (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )
    first = body[1] if has_doc and len(body) > 1 else body[0]
    if has_doc and len(body) == 1:
        return 0
    return sum(
        1
        for line in lines[first.lineno - 1 : node.end_lineno]
        if line.strip() and not line.strip().startswith("#")
    )


def test_code_lines_count_code_only():
    source = (
        'def f(x):\n    """Doc.\n\n    More doc."""\n    # a comment\n\n    y = x\n    return y\n'
    )
    (node,) = ast.parse(source).body
    assert _code_lines(source.splitlines(), node) == 2


PACKAGE_FILES = [p for p in FILES if p.suffix == ".py" and p.parts[len(ROOT.parts)] == "ppl_vae"]


@pytest.mark.parametrize(
    "path", PACKAGE_FILES, ids=[str(p.relative_to(ROOT)) for p in PACKAGE_FILES]
)
def test_no_function_is_longer_than_80_lines_of_code(path):
    text = path.read_text()
    lines = text.splitlines()
    long = [
        f"{node.name} ({n} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := _code_lines(lines, node)) > MAX_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: over {MAX_LINES} lines of code: {long}"
