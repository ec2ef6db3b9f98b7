"""The README's examples run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block(after: str) -> str:
    return re.search(re.escape(after) + r"\s*```python\n(.*?)```", README, re.S)[1]


def test_usage_example():
    exec(compile(python_block("## Use"), "README.md (Use)", "exec"), {})


@pytest.mark.slow
def test_model_example(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.chdir(tmp_path)  # it saves prompts.pt
    exec(compile(python_block("<!-- example:model -->"), "README.md (model)", "exec"), {})
    assert (tmp_path / "prompts.pt").stat().st_size < 20e6
