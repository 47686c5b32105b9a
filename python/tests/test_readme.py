"""The README's example is examples/quickstart.py, word for word."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_contains_the_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert "```python\n" + example + "```\n" in readme


def test_quickstart_compiles() -> None:
    source = (ROOT / "examples" / "quickstart.py").read_text()
    compile(source, "quickstart.py", "exec")
