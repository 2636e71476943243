"""The README opens with exactly two commands (demo, tests), and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_demo_then_tests() -> None:
    first, second = readme_commands()[:2]
    assert "pip install torch==2.13.0" in first and "edm2 demo" in first
    assert "pip install torch==2.13.0" in second and "pytest" in second


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
