"""Scrape every endpoint's ``/metrics`` on a fixed interval into the datastore.

One task per endpoint, so a slow pod never delays the others. A failed scrape keeps
the last gauges and marks the endpoint stale once they are older than the
datastore's ``stale_after_s``; the first error of a run of failures is logged once,
as is the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from llmpool.serving.datastore import Datastore
from llmpool.serving.scrape import ScrapeError, parse_vllm_metrics

log = logging.getLogger("llmpool.collector")


class MetricsCollector:
    def __init__(
        self,
        datastore: Datastore,
        session: aiohttp.ClientSession,
        *,
        interval_s: float = 0.05,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"scrape interval must be > 0, got {interval_s}")
        self.ds = datastore
        self.session = session
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.clock = clock
        self.scrapes = 0
        self.failures = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def scrape_once(self, idx: int) -> bool:
        ep = self.ds.endpoints[idx]
        try:
            async with self.session.get(f"{ep.url}/metrics", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                text = await resp.text()
            metrics = parse_vllm_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ScrapeError, UnicodeDecodeError) as err:
            self.failures += 1
            msg = f"{type(err).__name__}: {err}".strip().rstrip(":")
            if not self.ds.last_error[idx]:
                log.warning("scrape of %s failed: %s", ep.name, msg)
            self.ds.scrape_failed(idx, msg, self.clock())
            return False
        if self.ds.last_error[idx]:
            log.info("scrape of %s recovered", ep.name)
        self.ds.scraped(idx, metrics, self.clock())
        self.scrapes += 1
        return True

    async def _loop(self, idx: int) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while True:
            await self.scrape_once(idx)
            nxt += self.interval_s
            delay = nxt - loop.time()
            if delay < 0:  # fell behind: don't burst to catch up
                nxt = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    async def start(self) -> None:
        """Scrape everything once (so the first decision has data), then keep going."""
        await asyncio.gather(*(self.scrape_once(i) for i in range(len(self.ds.endpoints))))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(i), name=f"scrape-{ep.name}")
            for i, ep in enumerate(self.ds.endpoints)
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
