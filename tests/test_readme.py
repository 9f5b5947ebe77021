"""The README's Python examples run as written, and its two commands are the ones CI uses."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_python_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write runs/... write them here
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_commands_match_ci():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README.read_text())
    assert len(commands) == 2, "the README opens with exactly two commands"
    ci = (README.parent / ".ci" / "run").read_text()
    for step in ("pip install --quiet torch==2.13.0", 'pip install --quiet -e ".[test]"', "python -m pytest -q"):
        assert step in ci
    assert "pytest -q" in commands[1] and '".[test]"' in commands[1] and "torch==2.13.0" in commands[1]
