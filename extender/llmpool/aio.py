"""Which asyncio event loop a long-running process serves on.

``uvloop`` (libuv under asyncio's API) spends less CPU per socket read and write than the
standard loop: behind Envoy the picker serves 8-21 % more requests per core on it, but adds
about 0.4 ms more at p50 when requests come one at a time (docs/benchmarks.md). ``auto`` uses
it when it is installed (it is a core dependency on Linux and macOS) and the standard loop
otherwise; ``asyncio`` forces the standard loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "loop_factory", "run"]

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
T = TypeVar("T")


def loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``kind`` (None: the standard loop). ``uvloop`` when it is not
    installed is an error naming the fix; ``auto`` then falls back quietly."""
    if kind not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("event loop 'uvloop' is not installed: pip install uvloop") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """``asyncio.run`` on the loop ``kind`` names."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
