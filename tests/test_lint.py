"""The code base stays ruff- and mypy-clean (the project's own configuration)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check() -> None:
    r = _run("ruff", "check", "extender", "operator", "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = _run("ruff", "format", "--check", "extender", "operator", "tests")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    r = _run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_operator_folder_does_not_shadow_stdlib() -> None:
    # Run from the repository root, where a package named `operator` would win.
    r = subprocess.run(
        [sys.executable, "-c", "import operator, llmpool_operator; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert str(ROOT / "operator") not in r.stdout
