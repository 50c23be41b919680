"""Smoke run of the scale benchmark (``scale_bench.py``) with 3 pools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("scale_bench.py")


@pytest.mark.slow
def test_scale_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--pools", "3", "--after", "0", "--timeout", "15", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "all pools converged" in r.stdout
    result = json.loads(out.read_text())
    assert result["pools"] == 3 and result["converged_s"] <= result["idle_s"] + 0.01
    per_pool = result["per_pool_to_converged"]
    assert per_pool["create"] == 9  # every child POSTed exactly once
    assert result["rss_mib"]["peak"] >= result["rss_mib"]["start"] > 0
