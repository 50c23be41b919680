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
        metrics_path: str = "/metrics",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"scrape interval must be > 0, got {interval_s}")
        self.ds = datastore
        self.session = session
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.metrics_path = metrics_path
        self.clock = clock
        self.scrapes = 0
        self.failures = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False

    async def scrape_once(self, key: int | str) -> bool:
        slot = self.ds.slot(key) if isinstance(key, str) else self.ds.slots[key]
        if slot is None:
            return False
        ep = slot.endpoint
        try:
            async with self.session.get(f"{ep.url}{self.metrics_path}", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                text = await resp.text()
            metrics = parse_vllm_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ScrapeError, UnicodeDecodeError) as err:
            self.failures += 1
            msg = f"{type(err).__name__}: {err}".strip().rstrip(":")
            if not slot.last_error:
                log.warning("scrape of %s failed: %s", ep.name, msg)
            unreachable = isinstance(err, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError)
            self.ds.scrape_failed(ep.name, msg, self.clock(), unreachable=unreachable)
            return False
        if slot.last_error:
            log.info("scrape of %s recovered", ep.name)
        self.ds.scraped(ep.name, metrics, self.clock())
        self.scrapes += 1
        return True

    async def _loop(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while self.ds.slot(name) is not None:
            await self.scrape_once(name)
            nxt += self.interval_s
            delay = nxt - loop.time()
            if delay < 0:  # fell behind: don't burst to catch up
                nxt = loop.time()
                delay = 0
            await asyncio.sleep(delay)

    def sync(self) -> None:
        """Start scraping new endpoints and stop scraping removed ones (after membership changes)."""
        if not self._running:
            return
        loop = asyncio.get_running_loop()
        current = {ep.name for ep in self.ds.endpoints}
        for name in list(self._tasks):
            if name not in current:
                self._tasks.pop(name).cancel()
        for name in current:
            if name not in self._tasks:
                self._tasks[name] = loop.create_task(self._loop(name), name=f"scrape-{name}")

    async def start(self) -> None:
        """Scrape everything once (so the first decision has data), then keep going."""
        await asyncio.gather(*(self.scrape_once(ep.name) for ep in self.ds.endpoints))
        self._running = True
        self.sync()

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks = {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
