"""The README's Python API block runs as written (on the embedded demo model)."""

import re
from pathlib import Path

from PIL import Image

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert "parameters ternary" in capsys.readouterr().out
    assert Image.open(tmp_path / "ternary.png").size == (64, 64)
