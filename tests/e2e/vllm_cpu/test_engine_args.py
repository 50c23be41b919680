"""The operator's `vllm serve` command lines, parsed by the real vLLM 0.32 CLI parser.

The operator renders each engine container as `vllm serve <model> <flags>`
(``llmpool_operator.builders``). No GPU or cluster is needed to check that vLLM accepts those
flags and reads them as meant: the tier's venv has vLLM's own argument parser, so every
container's argv goes through it and the parsed values are compared with the spec.
Opt-in like the rest of the tier (tests/e2e/vllm_cpu/setup.sh).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from llmpool import vllmcpu
from llmpool_operator.builders import PoolRef, build_children, child_name
from llmpool_operator.spec import PoolSpec, parse_spec

pytestmark = pytest.mark.vllm

# Runs in the tier's venv: vLLM's `serve` subcommand parser, one argv per input line.
PROBE = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

keys = json.loads(sys.argv[1])
for line in sys.stdin:
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    try:
        ns = parser.parse_args(json.loads(line))
    except SystemExit as exc:
        print(json.dumps({"error": f"vllm rejected the arguments (exit {exc.code})"}), flush=True)
        continue
    print(json.dumps({k: getattr(ns, k, "<missing>") for k in keys}), flush=True)
"""

KEYS = [
    "model_tag",
    "served_model_name",
    "host",
    "port",
    "tensor_parallel_size",
    "data_parallel_size",
    "data_parallel_rank",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "enable_prefix_caching",
    "tokenizer",
]


def _spec(**engine: Any) -> dict[str, Any]:
    return {
        "model": {"name": "served", "source": {"huggingFace": "org/m"}, "tokenizer": "org/tok"},
        "engine": engine,
    }


SPECS: dict[str, PoolSpec] = {
    "gpu-dp4-all-fields": parse_spec(
        _spec(
            dataParallelSize=4,
            tensorParallelSize=2,
            port=9100,
            maxNumSeqs=64,
            maxNumBatchedTokens=4096,
            enableChunkedPrefill=True,
            enablePrefixCaching=True,
        )
    ),
    "features-off": parse_spec(_spec(enableChunkedPrefill=False, enablePrefixCaching=False)),
    "cpu-defaults": parse_spec(
        {"model": {"name": "tiny", "source": {"path": "/models/tiny"}}, "accelerator": {"kind": "none"}}
    ),
}


def _parse_with_vllm(argvs: list[list[str]], extra: list[str] | None = None) -> list[dict[str, Any]]:
    reason = vllmcpu.ready_reason()
    if reason is not None:
        pytest.skip(reason)
    lines = "".join(json.dumps(a) + "\n" for a in argvs + ([extra] if extra else []))
    out = subprocess.run(
        [str(vllmcpu.venv_python()), "-c", PROBE, json.dumps(KEYS)],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _containers(spec: PoolSpec) -> list[dict[str, Any]]:
    pool = PoolRef("p", "ns")
    (engine,) = [
        c
        for c in build_children(pool, spec)
        if c["kind"] == "Deployment" and c["metadata"]["name"] == child_name(pool, "engine")
    ]
    return list(engine["spec"]["template"]["spec"]["containers"])


def test_vllm_parses_every_engine_container_as_the_spec_means() -> None:
    cases: list[tuple[str, PoolSpec, int, list[str]]] = []
    for name, spec in SPECS.items():
        for rank, c in enumerate(_containers(spec)):
            assert c["command"] == ["vllm", "serve"]
            cases.append((name, spec, rank, ["serve", *c["args"]]))
    # a flag vLLM does not know must be refused, or this test could not fail
    results = _parse_with_vllm([argv for *_, argv in cases], extra=["serve", "org/m", "--no-such-flag"])
    assert len(results) == len(cases) + 1
    assert "error" in results[-1]
    for (name, spec, rank, argv), got in zip(cases, results, strict=False):
        e = spec.engine
        assert "error" not in got, (name, argv, got)
        assert got["model_tag"] == argv[1], name
        assert got["served_model_name"] == [spec.model.name], name
        assert got["host"] == "0.0.0.0" and got["port"] == e.port + rank, name
        assert got["tensor_parallel_size"] == e.tensor_parallel_size, name
        if e.data_parallel_size > 1:
            assert (got["data_parallel_size"], got["data_parallel_rank"]) == (e.data_parallel_size, rank)
        assert got["max_num_seqs"] == e.max_num_seqs and got["max_num_batched_tokens"] == (
            e.max_num_batched_tokens
        ), name
        assert got["enable_chunked_prefill"] == e.enable_chunked_prefill, name
        assert got["enable_prefix_caching"] == e.enable_prefix_caching, name
        assert got["tokenizer"] == spec.model.tokenizer, name
    assert [r["data_parallel_rank"] for r in results[:4]] == [0, 1, 2, 3]
