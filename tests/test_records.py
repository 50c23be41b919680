"""llmpool.serving.records: the breakdown of `llmpool replay --records`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpool.serving.records import load_paired, main, neighbour_busy, report


def _row(policy: str, side: str, rid: int, ep: int | None, arrival: float, ttft: float, e2e: float) -> str:
    row = {"policy": policy, "side": side, "rid": rid, "endpoint": ep, "arrival_s": arrival, "ttft_s": ttft}
    row |= {"e2e_s": e2e, "prompt": 100 * (rid + 1), "output": 50, "error": ""}
    return json.dumps(row)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "records.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_neighbour_busy_and_the_report(tmp_path: Path) -> None:
    lines = [
        # endpoint 0: request 0 decodes over [1, 11] while endpoint 1 is busy over [0, 6): half the time
        _row("rr", "live", 0, 0, 0.0, 1.0, 11.0),
        _row("rr", "sim", 0, None, 0.0, 1.0, 9.0),
        _row("rr", "live", 1, 1, 0.0, 0.5, 6.0),
        _row("rr", "sim", 1, None, 0.0, 0.5, 6.0),
        # endpoint 1 again, far later: nobody else in flight
        _row("rr", "live", 2, 1, 100.0, 1.0, 5.0),
        _row("rr", "sim", 2, None, 100.0, 1.0, 5.0),
        _row("rr", "sim", 3, None, 200.0, 1.0, 5.0),  # no live twin: left out
    ]
    p = load_paired(_write(tmp_path, lines))
    assert list(p.prompt) == [100, 200, 300]
    busy = neighbour_busy(p, samples=1001)
    assert busy[0] == pytest.approx(0.5, abs=0.01)  # endpoint 1 busy until t=6 of [1, 11]
    assert busy[1] == pytest.approx(1.0)  # request 0 covers request 1's whole decode
    assert busy[2] == 0.0
    text = "\n".join(report(p))
    assert "3 requests: E2E mean live 7.33 s, sim 6.67 s" in text
    assert "25%-75% of the decode" in text and "0%-25% of the decode" in text


def test_bad_records_are_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path, [_row("rr", "live", 0, 0, 0.0, 1.0, 2.0), "{not json"])
    assert main([str(p)]) == 2
    assert f"{p}:2: not a replay record" in capsys.readouterr().err
    no_ttft = json.loads(_row("rr", "sim", 0, None, 0.0, 1.0, 2.0))
    del no_ttft["ttft_s"]
    p = _write(tmp_path, [_row("rr", "live", 0, 0, 0.0, 1.0, 2.0), json.dumps(no_ttft)])
    assert main([str(p)]) == 2
    assert f"{p}:2: not a replay record (bad or missing 'ttft_s')" in capsys.readouterr().err
    rr, imp = _row("rr", "live", 0, 0, 0.0, 1.0, 2.0), _row("impact", "live", 0, 0, 0.0, 1.0, 2.0)
    two = _write(tmp_path, [rr, imp])
    assert main([str(two)]) == 2
    assert "records of several policies (impact, rr): give --policy" in capsys.readouterr().err
    assert main([str(two), "--policy", "rr"]) == 2  # no sim side
    assert "no request has both a live and a simulated record" in capsys.readouterr().err
