"""Tests for llmpool.lab.workload: trace loaders, rescaling/windowing and the synthetic generator."""

from __future__ import annotations

import gzip
import itertools
import lzma
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from llmpool.lab.workload import (
    CONVERSATION,
    FIVE_TASK_MIX,
    FORMATS,
    PREFIX_SHARING,
    SYNTHETIC_SPECS,
    LengthDist,
    PrefixSpec,
    RequestClass,
    SyntheticSpec,
    Workload,
    WorkloadError,
    WorkloadItem,
    detect_format,
    load_trace,
    load_workload,
    synthetic,
)
from llmpool.routing.types import Request

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AZURE2023 = DATA / "traces" / "azure2023_conv.csv"
MOONCAKE = DATA / "traces" / "mooncake_conversation.jsonl.gz"
SHAREGPT = DATA / "lengths" / "sharegpt_llama2_lengths.csv"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (it lies beside the project at ../shared/data)")
    return path


# Small sample files for each format, as their public originals write them.
SAMPLES: dict[str, str] = {
    "azure2023": (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.0000000,879,20\n"
    ),
    "azure2024": (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 00:00:01+00:00,1048,311\n"
        "2024-05-10 00:00:01.5+00:00,330,76\n"
    ),
    "mooncake": (
        '{"timestamp": 0, "input_length": 1100, "output_length": 50, "hash_ids": [0, 1, 2]}\n'
        '{"timestamp": 1500, "input_length": 600, "output_length": 7, "hash_ids": [0, 3]}\n'
        '{"timestamp": 2750, "input_length": 10, "output_length": 3, "hash_ids": [4]}\n'
    ),
    "burstgpt": (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45.5,GPT-4,1087,230,1317,API log\n"
        "118,ChatGPT,417,276,693,Conversation log\n"
    ),
    "sharegpt": (
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
        "74,918,992,0.08\n"
        "290,905,1195,0.32\n"
        "12,40,52,0.3\n"
    ),
}


def write(tmp_path: Path, name: str, text: str, compress: str = "") -> Path:
    path = tmp_path / name
    data = text.encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "xz":
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def arrivals(w: Workload) -> list[float]:
    return [it.request.arrival for it in w.items]


def check_invariants(w: Workload) -> None:
    assert [it.request.id for it in w.items] == list(range(len(w.items)))
    times = arrivals(w)
    if times:
        assert times[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert all(it.output_tokens >= 1 and it.request.prompt_tokens >= 1 for it in w.items)


def one_line_error(exc: pytest.ExceptionInfo[WorkloadError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ----------------------------------------------------------------------------- format detection


@pytest.mark.parametrize("compress", ["", "gz", "xz"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_from_content(tmp_path: Path, fmt: str, compress: str) -> None:
    # The file name says nothing (and even lies): detection must read the content.
    path = write(tmp_path, "trace.jsonl" if fmt != "mooncake" else "trace.csv", SAMPLES[fmt], compress)
    assert detect_format(path) == fmt
    assert detect_format(str(path)) == fmt
    w = load_trace(path)
    assert len(w) == 3
    check_invariants(w)
    assert w.source == str(path)


def test_detect_format_unknown_lists_known_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(WorkloadError) as exc:
        detect_format(path)
    msg = one_line_error(exc)
    assert f"{path}:1:" in msg
    for fmt in FORMATS:
        assert fmt in msg
    with pytest.raises(WorkloadError, match="known formats"):
        load_trace(path)
    path = write(tmp_path, "y.jsonl", '{"prompt": "hi"}\n')
    with pytest.raises(WorkloadError, match="known formats"):
        detect_format(path)


def test_unknown_fmt_argument(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", SAMPLES["azure2023"])
    with pytest.raises(WorkloadError) as exc:
        load_trace(path, fmt="splitwise")
    msg = one_line_error(exc)
    assert all(fmt in msg for fmt in FORMATS)


def test_explicit_fmt_with_wrong_header(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", SAMPLES["sharegpt"])
    with pytest.raises(WorkloadError) as exc:
        load_trace(path, fmt="azure2023")
    msg = one_line_error(exc)
    assert f"{path}:1:" in msg and "TIMESTAMP" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(WorkloadError) as exc:
        load_trace(path)
    assert one_line_error(exc) == f"{path}: no such file"
    with pytest.raises(WorkloadError, match="no such file"):
        detect_format(path)
    with pytest.raises(WorkloadError, match="directory"):
        load_trace(tmp_path)


@pytest.mark.parametrize("compress", ["", "gz"])
def test_empty_file(tmp_path: Path, compress: str) -> None:
    path = write(tmp_path, "empty.csv", "", compress)
    with pytest.raises(WorkloadError, match="no requests") as exc:
        load_trace(path)
    assert str(path) in one_line_error(exc)
    blank = write(tmp_path, "blank.csv", "\n\n  \n", compress)
    with pytest.raises(WorkloadError, match="no requests"):
        load_trace(blank)


@pytest.mark.parametrize("fmt", ["azure2023", "azure2024", "burstgpt", "sharegpt"])
def test_header_only(tmp_path: Path, fmt: str) -> None:
    header = SAMPLES[fmt].splitlines()[0] + "\n"
    path = write(tmp_path, "h.csv", header)
    with pytest.raises(WorkloadError) as exc:
        load_trace(path)
    assert one_line_error(exc) == f"{path}: no requests"
    with pytest.raises(WorkloadError, match="no requests"):
        load_trace(path, fmt=fmt)


def test_mooncake_blank_lines_only_after_records_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, "m.jsonl", SAMPLES["mooncake"] + "\n\n")
    assert len(load_trace(path)) == 3


# ----------------------------------------------------------------------------- malformed rows

MALFORMED = [
    # (format, file text, line, words the message must contain)
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.0000000,374,x\n",
        3,
        ["GeneratedTokens is not an integer", "'x'"],
    ),
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374\n",
        2,
        ["missing field", "GeneratedTokens"],
    ),
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,-5,44\n",
        2,
        ["ContextTokens is negative"],
    ),
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,5,44\n\nyesterday,5,4\n",
        4,
        ["TIMESTAMP is not a timestamp"],
    ),
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-02-30 18:15:46.68,5,44\n",
        2,
        ["TIMESTAMP has an invalid date"],
    ),
    (
        "azure2023",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,5,44,9\n",
        2,
        ["expected 3 fields, got 4"],
    ),
    (
        "azure2024",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 00:00:01,1048,311\n",
        3,
        ["mixes time-zone-aware and naive"],
    ),
    (
        "azure2024",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.009930+00:00,,5\n",
        2,
        ["ContextTokens is empty"],
    ),
    (
        "burstgpt",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\nsoon,ChatGPT,472,18,490,Conversation log\n",
        3,
        ["Timestamp is not a number"],
    ),
    (
        "burstgpt",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18.5,490,Conversation log\n",
        2,
        ["Response tokens is not an integer"],
    ),
    (
        "burstgpt",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "nan,ChatGPT,472,18,490,Conversation log\n",
        2,
        ["Timestamp is not finite"],
    ),
    (
        "burstgpt",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,,472,18,490,API log\n",
        2,
        ["Model is empty"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": 10, "output_length": 5}\n{"timestamp": 1, "input_length": 10,\n',
        2,
        ["invalid JSON"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": 10, "output_length": 5}\n\n{"timestamp": 1, "input_length": 10}\n',
        3,
        ["missing field", "output_length"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": "10", "output_length": 5}\n',
        1,
        ["input_length is not an integer"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": 10, "output_length": -1}\n',
        1,
        ["output_length is negative"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, "a"]}\n',
        1,
        ["hash_ids"],
    ),
    (
        "mooncake",
        '{"timestamp": 0, "input_length": 10, "output_length": 1}\n[1, 2]\n',
        2,
        ["not a JSON object"],
    ),
    (
        "sharegpt",
        "num_prefill_tokens,num_decode_tokens\n12,40\n13,4O\n",
        3,
        ["num_decode_tokens is not an integer", "'4O'"],
    ),
]


@pytest.mark.parametrize("compress", ["", "gz"])
@pytest.mark.parametrize(("fmt", "text", "line", "words"), MALFORMED)
def test_malformed_rows_name_file_line_and_field(
    tmp_path: Path, fmt: str, text: str, line: int, words: list[str], compress: str
) -> None:
    path = write(tmp_path, "bad.txt", text, compress)
    for explicit in (None, fmt):
        with pytest.raises(WorkloadError) as exc:
            load_trace(path, fmt=explicit)
        msg = one_line_error(exc)
        assert msg.startswith(f"{path}:{line}: "), msg
        for word in words:
            assert word in msg, msg


def test_error_is_a_value_error() -> None:
    assert issubclass(WorkloadError, ValueError)


def test_corrupt_gzip(tmp_path: Path) -> None:
    data = gzip.compress(SAMPLES["azure2023"].encode() * 50)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkloadError) as exc:
        load_trace(path)
    assert str(path) in one_line_error(exc)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n\xff\xfe,1,2\n")
    with pytest.raises(WorkloadError) as exc:
        load_trace(path)
    assert f"{path}:2:" in one_line_error(exc)


# ----------------------------------------------------------------------------- row semantics


def test_azure2023_timestamps_with_seven_fractional_digits(tmp_path: Path) -> None:
    w = load_trace(write(tmp_path, "a.csv", SAMPLES["azure2023"]))
    assert w.name == "a"
    assert arrivals(w) == pytest.approx([0.0, 4.314579, 4.319410], abs=1e-9)
    assert [it.request.prompt_tokens for it in w.items] == [374, 396, 879]
    assert [it.output_tokens for it in w.items] == [44, 109, 20]
    assert all(it.request.model == "default" for it in w.items)
    assert w.notes == []


def test_azure2024_time_zones_and_mixed_precision(tmp_path: Path) -> None:
    w = load_trace(write(tmp_path, "a.csv", SAMPLES["azure2024"]), model="llama")
    assert arrivals(w) == pytest.approx([0.0, 0.99007, 1.49007], abs=1e-9)
    assert all(it.request.model == "llama" for it in w.items)
    # Offsets are honoured: 02:00:02+02:00 is one second after 00:00:01Z; days roll over.
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:01Z,1,1\n"
        "2024-05-10T02:00:02+02:00,1,1\n"
        "2024-05-11 00:00:01.25+0000,1,1\n"
    )
    w = load_trace(write(tmp_path, "b.csv", text))
    assert detect_format(tmp_path / "b.csv") == "azure2024"
    assert arrivals(w) == pytest.approx([0.0, 1.0, 86400.25], abs=1e-9)


def test_azure_zero_tokens_are_kept_and_noted(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,0\n"
        "2023-11-16 18:15:47.6805900,0,10\n"
        "2023-11-16 18:15:48.6805900,10,0\n"
    )
    w = load_trace(write(tmp_path, "z.csv", text))
    assert len(w) == 3
    assert [it.output_tokens for it in w.items] == [1, 10, 1]
    assert [it.request.prompt_tokens for it in w.items] == [374, 1, 10]
    assert any("2 rows had 0 GeneratedTokens" in note for note in w.notes)
    assert any("1 rows had 0 ContextTokens" in note for note in w.notes)


def test_burstgpt_failed_requests_kept_as_one_token(tmp_path: Path) -> None:
    text = (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "1106,ChatGPT,0,0,0,Conversation log\n"
        "4525,GPT-4,0,0,0,Conversation log\n"
        "4574,ChatGPT,1306,267,1573,API log\n"
    )
    w = load_trace(write(tmp_path, "b.csv", text))
    assert len(w) == 4  # rows in == requests out
    check_invariants(w)
    assert arrivals(w) == [0.0, 1101.0, 4520.0, 4569.0]
    assert [it.output_tokens for it in w.items] == [18, 1, 1, 267]
    assert [it.request.model for it in w.items] == ["ChatGPT", "ChatGPT", "GPT-4", "ChatGPT"]
    assert w.items[3].request.task == "API log"
    assert "2 rows had 0 Response tokens; replayed as 1-token responses" in w.notes
    assert "2 rows had 0 Request tokens; replayed as 1-token prompts" in w.notes


def test_burstgpt_extra_columns_in_any_order(tmp_path: Path) -> None:
    # Release v2 adds Session ID and Elapsed time; columns are found by name.
    text = (
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "0.5,17,2.0,GPT-4,100,20,120,Conversation log\n"
        "1.5,17,3.0,GPT-4,200,30,230,Conversation log\n"
    )
    w = load_trace(write(tmp_path, "v2.csv", text))
    assert [(it.request.prompt_tokens, it.output_tokens) for it in w.items] == [(100, 20), (200, 30)]
    assert arrivals(w) == [0.0, 1.0]


def test_out_of_order_rows_sorted_stably_with_note(tmp_path: Path) -> None:
    text = (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "10,a,1,1,2,x\n"
        "12,b,2,2,4,x\n"
        "3,c,3,3,6,x\n"
        "12,d,4,4,8,x\n"
        "11.5,e,5,5,10,x\n"
    )
    w = load_trace(write(tmp_path, "o.csv", text))
    assert len(w) == 5
    check_invariants(w)
    assert [it.request.model for it in w.items] == ["c", "a", "e", "b", "d"]  # ties keep file order
    assert arrivals(w) == [0.0, 7.0, 8.5, 9.0, 9.0]
    assert any("2 rows arrived before the row above them" in note and "sorted" in note for note in w.notes)


def test_mooncake_hash_ids_and_millisecond_timestamps(tmp_path: Path) -> None:
    w = load_trace(write(tmp_path, "m.jsonl", SAMPLES["mooncake"], "gz"))
    assert arrivals(w) == [0.0, 1.5, 2.75]
    assert [it.request.prefix_hashes for it in w.items] == [(0, 1, 2), (0, 3), (4,)]
    assert all(it.request.hash_block_tokens == 512 for it in w.items)
    assert [it.request.prompt_tokens for it in w.items] == [1100, 600, 10]
    assert [it.output_tokens for it in w.items] == [50, 7, 3]


def test_sharegpt_poisson_arrivals(tmp_path: Path) -> None:
    rows = "".join(f"{10 + i % 7},{1 + i % 5},0,0\n" for i in range(4000))
    path = write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n" + rows)
    a = load_trace(path, seed=3, rate_if_untimed=4.0)
    b = load_trace(path, seed=3, rate_if_untimed=4.0)
    c = load_trace(path, seed=4, rate_if_untimed=4.0)
    assert len(a) == 4000
    check_invariants(a)
    assert arrivals(a) == arrivals(b)
    assert arrivals(a) != arrivals(c)
    assert a.mean_rate() == pytest.approx(4.0, rel=0.06)
    gaps = np.diff(arrivals(a))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.08)
    assert [it.request.prompt_tokens for it in a.items[:3]] == [10, 11, 12]  # file order kept
    assert any("Poisson" in note for note in a.notes)
    with pytest.raises(WorkloadError, match="rate_if_untimed"):
        load_trace(path, rate_if_untimed=0.0)


def test_crlf_and_bom(tmp_path: Path) -> None:
    text = "\ufeff" + SAMPLES["azure2024"].replace("\n", "\r\n")
    path = write(tmp_path, "w.csv", text)
    assert detect_format(path) == "azure2024"
    assert len(load_trace(path)) == 3


# ----------------------------------------------------------------------------- real traces


@pytest.mark.data
def test_real_azure2023() -> None:
    path = need(AZURE2023)
    assert detect_format(path) == "azure2023"
    t = time.perf_counter()
    w = load_trace(path)
    elapsed = time.perf_counter() - t
    assert len(w) == 19_366
    check_invariants(w)
    assert w.mean_rate() == pytest.approx(5.53, abs=0.01)
    assert w.duration() == pytest.approx(3502, abs=1)
    assert np.mean([it.request.prompt_tokens for it in w.items]) == pytest.approx(1155, rel=0.01)
    assert np.mean([it.output_tokens for it in w.items]) == pytest.approx(211, rel=0.01)
    assert elapsed < 1.0, f"loading took {elapsed:.2f} s"


@pytest.mark.data
def test_real_mooncake() -> None:
    path = need(MOONCAKE)
    assert detect_format(path) == "mooncake"
    t = time.perf_counter()
    w = load_trace(path)
    elapsed = time.perf_counter() - t
    assert len(w) == 12_031
    check_invariants(w)
    assert w.mean_rate() == pytest.approx(3.4, abs=0.02)
    assert all(it.request.prefix_hashes for it in w.items)
    assert w.items[0].request.prefix_hashes == tuple(range(14))
    for it in w.items[:500]:
        assert len(it.request.prefix_hashes) == math.ceil(it.request.prompt_tokens / 512)
    assert elapsed < 2.0, f"loading took {elapsed:.2f} s"


@pytest.mark.data
def test_real_sharegpt_lengths() -> None:
    path = need(SHAREGPT)
    assert detect_format(path) == "sharegpt"
    w = load_trace(path, rate_if_untimed=8.0, seed=1)
    assert len(w) == 30_731
    check_invariants(w)
    assert np.mean([it.request.prompt_tokens for it in w.items]) == pytest.approx(2340, rel=0.01)
    assert w.mean_rate() == pytest.approx(8.0, rel=0.03)


@pytest.mark.data
def test_load_workload_on_real_trace() -> None:
    path = need(AZURE2023)
    w = load_workload(str(path), n=1000, rate=20.0, seed=0)
    assert len(w) == 1000
    check_invariants(w)
    assert w.mean_rate() == pytest.approx(20.0, rel=1e-12)


# ----------------------------------------------------------------------------- with_rate / window


def make_workload(times: list[float]) -> Workload:
    items = [WorkloadItem(Request(id=i, arrival=t, prompt_tokens=10 + i), 5 + i) for i, t in enumerate(times)]
    return Workload("w", items, "test")


def test_mean_rate() -> None:
    assert make_workload([]).mean_rate() == 0.0
    assert make_workload([0.0]).mean_rate() == 0.0
    assert make_workload([0.0, 2.0, 4.0]).mean_rate() == 0.5
    assert make_workload([0.0, 0.0]).mean_rate() == math.inf


@pytest.mark.parametrize("rate", [0.37, 1.0, 12.5, 1234.0])
def test_with_rate_exact_and_keeps_burst_pattern(rate: float) -> None:
    times = [0.0, 0.1, 0.15, 3.0, 3.01, 7.5, 20.0]
    w = make_workload(times)
    r = w.with_rate(rate)
    assert r.mean_rate() == pytest.approx(rate, rel=1e-12)
    check_invariants(r)
    old_gaps = np.diff(times)
    new_gaps = np.diff(arrivals(r))
    np.testing.assert_allclose(new_gaps / new_gaps.sum(), old_gaps / old_gaps.sum(), rtol=1e-12)
    # New objects; the original is untouched.
    assert arrivals(w) == times
    assert all(a.request is not b.request for a, b in zip(w.items, r.items, strict=True))
    assert [it.output_tokens for it in r.items] == [it.output_tokens for it in w.items]
    assert w.notes == [] and len(r.notes) == 1


def test_with_rate_edge_cases() -> None:
    single = make_workload([0.0]).with_rate(3.0)
    assert len(single) == 1 and single.items[0].request.arrival == 0.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(WorkloadError):
            make_workload([0.0, 1.0]).with_rate(bad)
    with pytest.raises(WorkloadError, match="share one timestamp"):
        make_workload([0.0, 0.0, 0.0]).with_rate(1.0)


def test_window() -> None:
    w = make_workload([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    a = w.window(start=1.5, end=4.0)
    assert arrivals(a) == [0.0, 1.0]
    assert [it.request.prompt_tokens for it in a.items] == [12, 13]
    check_invariants(a)
    b = w.window(start=1.0, limit=3)
    assert arrivals(b) == [0.0, 1.0, 2.0] and [it.output_tokens for it in b.items] == [6, 7, 8]
    assert len(w.window(limit=0)) == 0
    assert len(w.window(end=0.0)) == 0
    assert len(w.window()) == 6 and w.window().notes == []
    assert len(w.window(limit=100)) == 6
    assert "kept 3 of 6" in b.notes[-1]
    assert arrivals(w) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # untouched
    assert w.items[1].request.id == 1
    with pytest.raises(WorkloadError):
        w.window(limit=-1)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seed_dependent() -> None:
    for spec in SYNTHETIC_SPECS.values():
        a = synthetic(spec, n=2000, rate=5.0, seed=11)
        b = synthetic(spec, n=2000, rate=5.0, seed=11)
        c = synthetic(spec, n=2000, rate=5.0, seed=12)
        assert a == b
        assert a != c
        assert arrivals(a) != arrivals(c)
        check_invariants(a)
        assert a.source == f"synthetic:{spec.name}" and a.name == spec.name


def test_synthetic_specs_registry() -> None:
    assert set(SYNTHETIC_SPECS) == {"five-task", "conversation", "prefix-sharing", "small-mix"}
    assert SYNTHETIC_SPECS["five-task"] is FIVE_TASK_MIX
    assert SYNTHETIC_SPECS["conversation"] is CONVERSATION
    assert SYNTHETIC_SPECS["prefix-sharing"] is PREFIX_SHARING


def test_five_task_mix_proportions_and_means() -> None:
    n = 50_000
    w = synthetic(FIVE_TASK_MIX, n=n, rate=10.0, seed=0)
    assert len(w) == n
    by_task: dict[str, list[WorkloadItem]] = defaultdict(list)
    for it in w.items:
        by_task[it.request.task].append(it)
    total_weight = sum(c.weight for c in FIVE_TASK_MIX.classes)
    expected = {  # paper (a) Table 1
        "books": (7351, 29.09, 61.76),
        "eli5": (6988, 29.83, 334.40),
        "imdb": (6564, 211.54, 142.53),
        "squad": (7122, 125.16, 220.02),
        "wnut": (3304, 26.41, 64.10),
    }
    assert set(by_task) == set(expected)
    for task, (samples, prompt_mean, decode_mean) in expected.items():
        items = by_task[task]
        assert len(items) / n == pytest.approx(samples / total_weight, abs=0.006)
        assert np.mean([it.request.prompt_tokens for it in items]) == pytest.approx(prompt_mean, rel=0.03)
        assert np.mean([it.output_tokens for it in items]) == pytest.approx(decode_mean, rel=0.04)
        assert max(it.request.prompt_tokens for it in items) <= 1000
    assert np.mean([it.request.prompt_tokens for it in w.items]) == pytest.approx(89.03, rel=0.03)
    assert np.mean([it.output_tokens for it in w.items]) == pytest.approx(175.71, rel=0.03)
    assert w.mean_rate() == pytest.approx(10.0, rel=0.03)


def test_conversation_lengths() -> None:
    w = synthetic(CONVERSATION, n=50_000, rate=2.0, seed=5)
    prompts = np.array([it.request.prompt_tokens for it in w.items])
    outputs = np.array([it.output_tokens for it in w.items])
    assert prompts.mean() == pytest.approx(4652, rel=0.03)
    assert outputs.mean() == pytest.approx(1052, rel=0.03)
    assert prompts.max() <= 16384 and outputs.max() <= 4096 and prompts.min() >= 1
    assert {it.request.task for it in w.items} == {"conversation"}


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_arrivals_honour_cv(cv: float) -> None:
    cls = RequestClass("x", 1.0, LengthDist("fixed", 10), LengthDist("fixed", 5))
    spec = SyntheticSpec("g", (cls,), arrival="gamma", arrival_cv=cv)
    w = synthetic(spec, n=40_000, rate=3.0, seed=2)
    gaps = np.diff(arrivals(w))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert w.mean_rate() == pytest.approx(3.0, rel=0.05)


def test_poisson_arrivals() -> None:
    w = synthetic(FIVE_TASK_MIX, n=40_000, rate=7.0, seed=9)
    gaps = np.diff(arrivals(w))
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert 1.0 / gaps.mean() == pytest.approx(7.0, rel=0.03)


def test_prefix_hash_semantics() -> None:
    px = PREFIX_SHARING.prefix
    assert px is not None
    shared_tokens = px.shared_blocks * px.block_tokens
    w = synthetic(PREFIX_SHARING, n=20_000, rate=5.0, seed=4)
    positions: dict[int, set[int]] = defaultdict(set)
    owners: Counter[int] = Counter()
    heads: dict[int, tuple[int, ...]] = {}
    for it in w.items:
        req = it.request
        hashes = req.prefix_hashes
        assert req.hash_block_tokens == px.block_tokens
        assert req.prompt_tokens > shared_tokens
        assert len(hashes) == math.ceil(req.prompt_tokens / px.block_tokens)
        for pos, h in enumerate(hashes):
            positions[h].add(pos)
        for h in hashes[px.shared_blocks :]:
            owners[h] += 1
        head = hashes[: px.shared_blocks]
        # Requests whose first hash agrees (same group) share the whole shared prefix.
        assert heads.setdefault(head[0], head) == head
    # A hash id lives at exactly one position; unique blocks belong to exactly one request.
    assert all(len(p) == 1 for p in positions.values())
    assert max(owners.values()) == 1
    # Different groups never share a hash.
    flat = [h for head in heads.values() for h in head]
    assert len(flat) == len(set(flat))
    assert len(heads) == px.groups
    # Zipf popularity: the first group is the most popular, about 1/H_16 of requests.
    counts = Counter(it.request.prefix_hashes[0] for it in w.items)
    top, top_count = counts.most_common(1)[0]
    assert top == 0
    harmonic = sum(1.0 / k for k in range(1, px.groups + 1))
    assert top_count / len(w) == pytest.approx(1.0 / harmonic, rel=0.05)
    # Suffix mean about 600 tokens on top of the shared part.
    suffix = np.mean([it.request.prompt_tokens - shared_tokens for it in w.items])
    assert suffix == pytest.approx(600, rel=0.04)
    assert np.mean([it.output_tokens for it in w.items]) == pytest.approx(250, rel=0.04)


def test_no_prefix_spec_means_no_hashes() -> None:
    w = synthetic(FIVE_TASK_MIX, n=100, rate=1.0, seed=0)
    assert all(it.request.prefix_hashes == () for it in w.items)


def test_prefix_with_zero_shared_blocks() -> None:
    cls = RequestClass("x", 1.0, LengthDist("fixed", 1000), LengthDist("fixed", 5))
    spec = SyntheticSpec("p", (cls,), prefix=PrefixSpec(groups=3, shared_blocks=0, block_tokens=256))
    w = synthetic(spec, n=50, rate=1.0, seed=0)
    hashes = [h for it in w.items for h in it.request.prefix_hashes]
    assert len(hashes) == 50 * 4 and len(set(hashes)) == len(hashes)


def test_length_dist_kinds() -> None:
    rng = np.random.default_rng(0)
    fixed = LengthDist("fixed", 42.4).sample(rng, 10)
    assert fixed.tolist() == [42] * 10
    uni = LengthDist("uniform", 100, 0.2).sample(rng, 50_000)
    assert uni.mean() == pytest.approx(100, rel=0.01)
    assert uni.std() / uni.mean() == pytest.approx(0.2, rel=0.03)
    assert uni.min() >= 65 and uni.max() <= 135
    capped = LengthDist("lognormal", 300, 1.5, low=1, high=600).sample(rng, 100_000)
    assert capped.max() <= 600 and capped.min() >= 1
    assert capped.mean() == pytest.approx(300, rel=0.02)  # the cap does not drag the mean down


@pytest.mark.parametrize(
    "make",
    [
        lambda: LengthDist("gaussian", 10),  # type: ignore[arg-type]
        lambda: LengthDist("lognormal", 10, -1.0),
        lambda: LengthDist("lognormal", 0.5, 1.0),
        lambda: LengthDist("lognormal", 100, 1.0, high=50),
        lambda: LengthDist("uniform", 10, 0.9),
        lambda: LengthDist("fixed", 10, low=0),
        lambda: RequestClass("x", 0.0, LengthDist("fixed", 1), LengthDist("fixed", 1)),
        lambda: SyntheticSpec("s", ()),
        lambda: SyntheticSpec(
            "s", (RequestClass("x", 1, LengthDist("fixed", 1), LengthDist("fixed", 1)),), arrival_cv=0.0
        ),
        lambda: PrefixSpec(groups=0, shared_blocks=1),
    ],
)
def test_invalid_specs(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_synthetic_rejects_bad_arguments() -> None:
    for n, rate in ((0, 1.0), (-3, 1.0), (10, 0.0), (10, -2.0), (10, math.nan)):
        with pytest.raises(WorkloadError) as exc:
            synthetic(FIVE_TASK_MIX, n=n, rate=rate, seed=0)
        assert one_line_error(exc).startswith("synthetic:five-task: ")
    assert len(synthetic(FIVE_TASK_MIX, n=1, rate=1.0, seed=0)) == 1


def test_synthetic_large_is_fast() -> None:
    t = time.perf_counter()
    w = synthetic(PREFIX_SHARING, n=200_000, rate=50.0, seed=0)
    elapsed = time.perf_counter() - t
    assert len(w) == 200_000
    assert elapsed < 5.0, f"200k synthetic requests took {elapsed:.2f} s"


# ----------------------------------------------------------------------------- load_workload


def test_load_workload_synthetic() -> None:
    w = load_workload("five-task", n=500, rate=4.0, seed=1)
    assert len(w) == 500 and w.source == "synthetic:five-task"
    assert w == load_workload("synthetic:five-task", n=500, rate=4.0, seed=1)
    assert load_workload("conversation", n=10, rate=None, seed=0) == synthetic(
        CONVERSATION, n=10, rate=1.0, seed=0
    )


def test_load_workload_trace(tmp_path: Path) -> None:
    path = write(tmp_path, "b.csv", SAMPLES["burstgpt"])
    full = load_workload(str(path), n=None, rate=None, seed=0)
    assert arrivals(full) == [0.0, 40.5, 113.0]
    w = load_workload(str(path), n=2, rate=10.0, seed=0)
    assert len(w) == 2 and arrivals(w) == pytest.approx([0.0, 0.1])
    assert w.mean_rate() == pytest.approx(10.0, rel=1e-12)
    s = load_workload(str(write(tmp_path, "s.csv", SAMPLES["sharegpt"])), n=None, rate=2.0, seed=0)
    assert s.mean_rate() == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    ("spec", "n", "rate", "words"),
    [
        ("five-task", 0, 1.0, "n must be"),
        ("five-task", -5, 1.0, "n must be"),
        ("five-task", 10, 0.0, "rate must be"),
        ("five-task", 10, -1.0, "rate must be"),
        ("five-task", None, 1.0, "needs n"),
        ("synthetic:nope", 10, 1.0, "unknown synthetic workload"),
        ("/no/such/trace.csv", 10, 1.0, "no such file"),
    ],
)
def test_load_workload_errors(spec: str, n: int | None, rate: float, words: str) -> None:
    with pytest.raises(WorkloadError) as exc:
        load_workload(spec, n=n, rate=rate, seed=0)
    msg = one_line_error(exc)
    assert msg.startswith(spec) and words in msg
