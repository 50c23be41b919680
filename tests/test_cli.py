"""The ``llmpool`` command: bad input is one line and a non-zero exit; the quick bench works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def llmpool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmpool.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bench", "--scenario", "nope"], "unknown scenario 'nope'"),
        (["bench", "--scenario", "gie", "--policies", "round-robin,bogus"], "unknown policy 'bogus'"),
        (["bench", "--scenario", "gie", "--rate", "-3"], "--rate"),
        (["bench", "--scenario", "gie", "--rate", "abc"], "--rate"),
        (["bench", "--scenario", "gie", "--seeds", "0"], "--seeds"),
        (["bench", "--scenario", "gie", "--instances", "0"], "--instances"),
        (["bench", "--scenario", "gie", "--workload", "/no/such/trace.csv"], "no such file"),
        (["bench", "--scenario", "balanceroute", "--instances", "5"], "multiple"),
        (["bench"], "--scenario"),
        (["bench", "--scenario", "gie", "--policies", ","], "--policies is empty"),
        (["bench", "--scenario", "gie", "--policies", 'impact:{"predictor": {"name": "zzz"}}'], "zzz"),
        (["bench", "--scenario", "gie", "--json", "."], "is a directory"),
        (["frobnicate"], "invalid choice"),
        (["emulate", "--port", "70000"], "--port"),
        (["emulate", "--port", "0", "--profile", "nope"], "unknown profile 'nope'"),
        (["emulate", "--port", "0", "--time-scale", "0"], "--time-scale"),
        (["replay", "--endpoints", "nohost", "--workload", "small-mix"], "--endpoints"),
        (["replay", "--endpoints", "h:1", "--workload", "small-mix", "--policies", "bogus"], "bogus"),
        (["calibrate", "--endpoint", "http://127.0.0.1:9"], "cannot reach the server"),
        (["calibrate", "--endpoint", "http://h:1", "--neighbour-streams", "0"], "--neighbour-streams"),
        (
            ["calibrate", "--endpoint", "http://127.0.0.1:9", "--neighbour", "http://127.0.0.1:9"],
            "is the server",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str) -> None:
    r = llmpool(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("llmpool: error:")
    assert needle in err


def test_malformed_trace_names_file_and_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\nx,y,z\n")
    r = llmpool("bench", "--scenario", "paper-a", "--workload", str(trace), "--policies", "round-robin")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "bad.csv:3" in r.stderr


def test_quick_bench_prints_table_and_writes_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    plots = tmp_path / "plots"
    r = llmpool(
        "bench",
        "--scenario",
        "gie",
        "--quick",
        "--policies",
        "round-robin,least-requests,gie-default",
        "--requests",
        "300",
        "--seeds",
        "2",
        "--json",
        str(out),
        "--plot",
        str(plots),
    )
    assert r.returncode == 0, r.stderr
    assert "round-robin" in r.stdout and "gie-default" in r.stdout and "ΔE2E vs RR" in r.stdout
    data = json.loads(out.read_text())
    assert data["scenario"] == "gie"
    assert data["config"]["instances"] == 8
    rows = data["results"]
    assert len(rows) == 3 * 2
    for key in (
        "policy",
        "seed",
        "e2e_mean_s",
        "e2e_p50_s",
        "e2e_p99_s",
        "ttft_mean_s",
        "ttft_p99_s",
        "tpot_mean_s",
        "throughput_tok_s",
        "preemptions",
        "imbalance_gmax_mean",
        "imbalance_maxmin_mean",
    ):
        assert key in rows[0], key
    assert all(row["requests"] == 300 for row in rows)
    assert sorted(p.name for p in plots.iterdir()) == ["gie-cdf-120.png"]


def test_trace_replay_at_own_pace_and_rescaled(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [
        json.dumps({"timestamp": i * 100, "input_length": 600, "output_length": 20, "hash_ids": [0, i]})
        for i in range(50)
    ]
    trace.write_text("\n".join(lines) + "\n")
    for extra, rate in (([], 10.0), (["--rate", "40"], 40.0)):
        out = tmp_path / f"r{rate}.json"
        r = llmpool(
            "bench",
            "--scenario",
            "gie",
            "--workload",
            str(trace),
            "--policies",
            "round-robin",
            "--seeds",
            "1",
            "--json",
            str(out),
            *extra,
        )
        assert r.returncode == 0, r.stderr
        row = json.loads(out.read_text())["results"][0]
        assert row["requests"] == 50
        assert row["measured_rate"] == pytest.approx(rate, rel=1e-6)
        assert row["rate"] == (None if not extra else rate)


def test_policy_specs_with_json_params() -> None:
    from llmpool.lab.bench import policy_config, split_policies

    specs = split_policies('round-robin, br0:{"window": 8, "r_max": 2},impact:{"hold": false}')
    assert specs == ["round-robin", 'br0:{"window": 8, "r_max": 2}', 'impact:{"hold": false}']
    assert policy_config(specs[1]) == {"name": "br0", "params": {"window": 8, "r_max": 2}}
    assert policy_config("p2c") == {"name": "p2c"}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ('br0:{"window": 0}', "window"),
        ("br0:{nope", "not valid JSON"),
        ("br0:[1]", "JSON object"),
    ],
)
def test_bad_policy_params_on_the_command_line(spec: str, needle: str) -> None:
    r = llmpool("bench", "--scenario", "gie", "--policies", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_each_policy_keeps_one_distinct_look_in_every_plot() -> None:
    from llmpool.lab import bench

    names = [f'impact:{{"aging_s": {i + 1}}}' for i in range(12)]  # more than matplotlib's 10 colours
    plan = bench.make_plan("paper-a", policies=names, rate=None, seeds=1)
    looks = [bench.policy_style(plan, n) for n in names]
    assert len({tuple(look["color"]) for look in looks}) == 12
    assert bench.policy_style(plan, names[3]) == looks[3]


def test_barrier_group_sweep_plots_imbalance_with_and_without_the_drain(tmp_path: Path) -> None:
    from llmpool.lab import bench

    plan = bench.make_plan("balanceroute", policies=["jsq", "br0"], rate=None, seeds=2)
    rows = [
        {
            "policy": pol,
            "seed": seed,
            "rate": rate,
            "e2e_mean_s": 1.0 + rate,
            "e2e_p99_s": 2.0 + rate,
            "imbalance_gmax_mean": 1000.0 * rate * (2 if pol == "jsq" else 1),
            "imbalance_gmax_arrivals_mean": 500.0 * rate + seed,
        }
        for pol in ("jsq", "br0")
        for seed in (0, 1)
        for rate in (4.0, 8.0)
    ]
    written = bench.plot(plan, rows, tmp_path)
    names = sorted(p.name for p in written)
    assert "balanceroute-imbalance.png" in names and "balanceroute-sweep.png" in names
    assert not any("-cdf" in n for n in names)  # rows without per-request latencies: no empty CDF
    assert (tmp_path / "balanceroute-imbalance.png").stat().st_size > 10_000
    # independent replicas: no imbalance figure
    gie = bench.make_plan("gie", policies=["jsq"], rate=None, seeds=1)
    assert not any("imbalance" in p.name for p in bench.plot(gie, rows[:4], tmp_path / "gie"))
