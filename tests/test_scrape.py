"""llmpool.serving.scrape against /metrics captured from real vLLM 0.32 and against bad input.

The captures (tests/fixtures/vllm-0.32/) come from one vLLM 0.32.0 CPU server: after a smoke
test, after a benchmark with a shared prompt prefix, with LoRA adapters, and with a 40-block
KV cache under pressure (model-server notes, section 7.6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmpool.serving.scrape import ScrapeError, parse_vllm_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "vllm-0.32"


def capture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("name", "blocks", "preemptions", "prompt", "generation", "hits"),
    [
        ("metrics_after_smoke.txt", 32768, 0, None, None, None),
        ("metrics_after_bench.txt", 32768, 0, 69841, 47650, 24192),
        ("metrics_lora.txt", 32768, 0, None, None, None),
        ("metrics_small_kv.txt", 40, 89, None, None, None),
    ],
)
def test_real_vllm_captures(
    name: str, blocks: int, preemptions: int, prompt: int | None, generation: int | None, hits: int | None
) -> None:
    m = parse_vllm_metrics(capture(name))
    assert m.model_names == {"tiny-llama"}
    assert list(m.engines) == ["0"]  # lora_requests_info (no engine label) makes no engine of its own
    e = m.engine("0")
    assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0.0)
    assert (e.block_size, e.num_gpu_blocks) == (128, blocks)  # CPU block size, read from cache_config_info
    assert e.kv_capacity_tokens == 128 * blocks
    assert e.preemptions == preemptions
    assert e.awake
    if prompt is not None:
        assert (e.prompt_tokens, e.generation_tokens) == (prompt, generation)
        assert e.prefix_queries == prompt
        assert e.prefix_hits == hits


def test_capture_with_the_gauges_changed() -> None:
    """Values are read, not assumed: a busy server's gauges come through."""
    text = capture("metrics_after_bench.txt")
    text = text.replace(
        'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0',
        'vllm:num_requests_running{engine="0",model_name="tiny-llama"} 7.0',
    )
    text = text.replace(
        'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 0.0',
        'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 3.0',
    )
    text = text.replace(
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.625',
    )
    text = text.replace(
        'sleep_state="awake"} 1.0',
        'sleep_state="awake"} 0.0',
    )
    m = parse_vllm_metrics(text)
    assert (m.running, m.waiting, m.kv_usage) == (7, 3, 0.625)
    assert not m.engine("0").awake


GAUGES_ONLY = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
"""


def test_pre_0_10_gpu_cache_usage_is_the_fallback() -> None:
    base = GAUGES_ONLY.format(running=2, waiting=1)
    old = '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.4\n'
    new = '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.7\n'
    assert parse_vllm_metrics(base + old).kv_usage == 0.4
    # With both (vLLM 0.10-0.11 with hidden metrics shown), the new name wins in either order.
    assert parse_vllm_metrics(base + old + new).kv_usage == 0.7
    assert parse_vllm_metrics(base + new + old).kv_usage == 0.7


def test_multi_engine_labels_are_summed() -> None:
    """A data-parallel pod: running and waiting are summed over engines, KV usage is the
    fullest engine's, and every engine keeps its own numbers."""
    text = ""
    for name, kind, values in (
        ("vllm:num_requests_running", "gauge", (3, 5)),
        ("vllm:num_requests_waiting", "gauge", (0, 2)),
        ("vllm:kv_cache_usage_perc", "gauge", (0.25, 0.5)),
        ("vllm:num_preemptions_total", "counter", (1, 4)),
    ):
        text += f"# TYPE {name} {kind}\n"
        for engine, v in enumerate(values):
            text += f'{name}{{engine="{engine}",model_name="m"}} {v}\n'
    m = parse_vllm_metrics(text)
    assert sorted(m.engines) == ["0", "1"]
    assert (m.running, m.waiting, m.kv_usage) == (8, 2, 0.5)
    assert (m.engine("0").running, m.engine("1").running) == (3, 5)
    assert (m.engine("0").preemptions, m.engine("1").preemptions) == (1, 4)
    with pytest.raises(ScrapeError, match=r"no metrics for engine '7' \(engines: 0, 1\)"):
        m.engine("7")


def one_line_error(text: str) -> str:
    with pytest.raises(ScrapeError) as info:
        parse_vllm_metrics(text)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "text",
    [
        "",
        "this is not prometheus text at all\n<html><body>502 Bad Gateway</body></html>\n",
        '{"error": "not found"}',
        "\x00\xff garbage \n\n\n",
    ],
    ids=["empty", "html", "json", "binary"],
)
def test_garbage_is_a_one_line_scrape_error(text: str) -> None:
    msg = one_line_error(text)
    assert "not a vLLM metrics exposition" in msg


def test_broken_sample_line_is_a_one_line_scrape_error() -> None:
    text = GAUGES_ONLY.format(running="two", waiting=0)
    assert "unparsable metrics exposition" in one_line_error(text)
    text = GAUGES_ONLY.format(running=1, waiting=0) + 'vllm:kv_cache_usage_perc{engine="0" 0.5\n'
    assert "unparsable metrics exposition" in one_line_error(text)


def test_missing_gauges_are_named() -> None:
    full = capture("metrics_after_bench.txt")
    no_waiting = "\n".join(line for line in full.splitlines() if "vllm:num_requests_waiting{" not in line)
    # The waiting_by_reason family must not stand in for waiting.
    assert "vllm:num_requests_waiting_by_reason{" in no_waiting
    assert one_line_error(no_waiting) == "not a vLLM metrics exposition: missing vllm:num_requests_waiting"
    no_kv = "\n".join(line for line in full.splitlines() if "kv_cache_usage_perc{" not in line)
    assert one_line_error(no_kv).endswith("missing vllm:kv_cache_usage_perc")
    only_running = GAUGES_ONLY.format(running=1, waiting=0).splitlines()[:2]
    msg = one_line_error("\n".join(only_running))
    assert msg.endswith("missing vllm:num_requests_waiting, vllm:kv_cache_usage_perc")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('vllm:num_requests_running{engine="0",model_name="m"} -1', "invalid value"),
        ('vllm:num_requests_running{engine="0",model_name="m"} NaN', "invalid value"),
        ('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 1.5', r"fraction in \[0, 1\]"),
    ],
)
def test_impossible_values_are_rejected(line: str, match: str) -> None:
    text = GAUGES_ONLY.format(running=1, waiting=0) + "# TYPE vllm:kv_cache_usage_perc gauge\n"
    text += 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1\n'
    name = line.split("{")[0]
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(name + "{")) + "\n" + line + "\n"
    with pytest.raises(ScrapeError, match=match):
        parse_vllm_metrics(text)


def test_cache_config_info_before_profiling() -> None:
    """Before the engine has profiled its memory, num_gpu_blocks is the string 'None'."""
    text = capture("metrics_after_smoke.txt").replace('num_gpu_blocks="32768"', 'num_gpu_blocks="None"')
    e = parse_vllm_metrics(text).engine("0")
    assert e.num_gpu_blocks is None
    assert e.kv_capacity_tokens is None


def test_counters_are_matched_with_their_total_suffix() -> None:
    """vLLM exposes counters as <name>_total (and <name>_created): only _total is the count."""
    text = GAUGES_ONLY.format(running=0, waiting=0)
    text += '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0\n'
    text += "# TYPE vllm:generation_tokens_total counter\n"
    text += 'vllm:generation_tokens_total{engine="0",model_name="m"} 42\n'
    text += "# TYPE vllm:generation_tokens_created gauge\n"
    text += 'vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9\n'
    e = parse_vllm_metrics(text).engine("0")
    assert e.generation_tokens == 42
    assert not math.isnan(e.generation_tokens)
