"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_has_two_commands():
    text = README.read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S).group(1)
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(commands) == 2
    assert commands[0].split("#")[0].split() == ["bash", "scripts/demo.sh"]
    assert commands[1].split("#")[0].split() == ["bash", "scripts/test.sh"]


def test_readme_executed_example():
    text = README.read_text()
    marker = text.index("executed by the test suite")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
