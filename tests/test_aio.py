"""llmpool.aio: the event loop a serving process runs on."""

from __future__ import annotations

import asyncio

import pytest

from llmpool.aio import EVENT_LOOPS, loop_factory, run


async def _loop_type() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_forces_the_standard_loop() -> None:
    assert loop_factory("asyncio") is None
    assert run(_loop_type(), "asyncio").startswith("asyncio")


def test_auto_and_uvloop_run_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert run(_loop_type(), "auto").startswith("uvloop")
    assert run(_loop_type(), "uvloop").startswith("uvloop")


def test_an_unknown_loop_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"event loop must be one of auto, uvloop, asyncio, got 'tokio'"):
        loop_factory("tokio")
    assert EVENT_LOOPS == ("auto", "uvloop", "asyncio")


def test_missing_uvloop_falls_back_under_auto_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ValueError, match="'uvloop' is not installed: pip install uvloop"):
        loop_factory("uvloop")
