"""The source as text: no control characters (a docstring's ``\\beta`` written through an unescaped string becomes a backspace)."""

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
