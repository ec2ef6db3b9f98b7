"""The README's examples run as written and it stays short, CONTRIBUTING.md's layout is the package's, and the
project stands alone."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONTRIBUTING = (ROOT / "CONTRIBUTING.md").read_text()


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


def test_the_readme_stays_short_and_points_to_the_reference():
    """What it is, install, use, train, a first try: reference lives in docs/ and CONTRIBUTING.md."""
    assert len(README) <= 15_000
    for path in re.findall(r"^- ((?:docs|benchmarks)/[\w.]+\.md|CONTRIBUTING\.md)", README, re.M):
        assert (ROOT / path).is_file(), path


def test_layout_names_every_part_of_the_package():
    """CONTRIBUTING.md's layout is the map of the package: every module and folder in it, none that is gone."""
    layout = re.search(r"## Layout\s*```\n(.*?)```", CONTRIBUTING, re.S)[1]
    package = ROOT / "dualcoop_kernels"
    parts = {p.name for p in package.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    parts -= {"__init__.py"}
    missing = sorted(part for part in parts if part.removesuffix(".py") not in layout)
    assert not missing, f"CONTRIBUTING.md's layout leaves out {missing}"
    for folder in re.findall(r"^  (\w+)/", layout, re.M):
        assert (package / folder / "__init__.py").exists(), f"CONTRIBUTING.md's layout names {folder}/, which is gone"


def test_the_repository_refers_to_nothing_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    outside = ".." + "/shared"  # written apart so that this file does not match itself
    offenders = [
        name
        for name in tracked.stdout.split()
        if (ROOT / name).is_file() and outside in (ROOT / name).read_text(errors="ignore")
    ]
    assert not offenders
