"""The live serving layer: datastore accounting, the dispatch loop, replay and
calibration against the emulator."""

from __future__ import annotations

import asyncio

import pytest

from llmpool.emulator.server import EmulatorConfig, running
from llmpool.lab.workload import LengthDist, RequestClass, SyntheticSpec, synthetic
from llmpool.routing.policy import Policy
from llmpool.routing.profile import load_profile
from llmpool.routing.types import HOLD, Decision, PoolView, Request, Route
from llmpool.serving.calibrate import calibrate
from llmpool.serving.compare import build_policy, request_rows, simulate_run
from llmpool.serving.datastore import Datastore, Endpoint
from llmpool.serving.dispatch import Dispatcher, DispatchError
from llmpool.serving.replay import LiveResult, prompt_ids, replay
from llmpool.serving.scrape import EngineMetrics, ServerMetrics


def _metrics(running: int = 0, waiting: int = 0, kv: float = 0.0) -> ServerMetrics:
    return ServerMetrics(
        engines={"0": EngineMetrics(running, waiting, kv, block_size=16, num_gpu_blocks=100)}
    )


def _req(i: int, prompt: int = 10) -> Request:
    return Request(id=i, arrival=0.0, prompt_tokens=prompt)


def test_endpoint_parse() -> None:
    ep = Endpoint.parse("10.0.0.1:8000")
    assert (ep.name, ep.url) == ("10.0.0.1:8000", "http://10.0.0.1:8000")
    assert Endpoint.parse("http://h:1/").name == "h:1"
    for bad in ("nohost", "http://h", "ftp://h:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            Endpoint.parse(bad)


def test_datastore_pending_follows_scrape_epochs() -> None:
    ds = Datastore([Endpoint.parse("a:1"), Endpoint.parse("b:2")])
    st = ds.states[0]
    f1 = ds.assign(0, _req(1, 100), now=1.0)
    assert (st.inflight, st.pending_since_scrape, st.pending_tokens_since_scrape) == (1, 1, 100)
    ds.scraped(0, _metrics(running=1, kv=0.5), now=1.05)
    assert (st.running, st.kv_usage, st.kv_capacity_tokens) == (1, 0.5, 1600)
    assert st.pending_since_scrape == 0  # the gauges show it now
    f2 = ds.assign(0, _req(2, 30), now=1.06)
    ds.complete(f1)  # assigned in an older epoch: pending untouched
    assert (st.inflight, st.pending_since_scrape, st.pending_tokens_since_scrape) == (1, 1, 30)
    ds.progress(f2, 5, now=1.07)
    assert st.inflight_output_tokens == 5 and f2.active.first_token_at == 1.07
    assert [a.generated_tokens for a in st.active()] == [5]
    ds.complete(f2)  # same epoch: no longer pending
    ds.complete(f2)  # idempotent
    assert (st.inflight, st.pending_since_scrape, st.inflight_output_tokens) == (0, 0, 0)
    assert ds.states[1].inflight == 0


def test_datastore_prefill_pending_until_the_first_streamed_token() -> None:
    ds = Datastore([Endpoint.parse("a:1"), Endpoint.parse("b:2")])
    a, b = ds.states
    f1 = ds.assign(0, _req(1, 100), now=1.0)
    f2 = ds.assign(0, _req(2, 30), now=1.0)
    quiet = Request(id=3, arrival=0.0, prompt_tokens=500, stream=False)
    f3 = ds.assign(0, quiet, now=1.0)  # not streamed: its first token is seen only at the end
    assert a.prefill_pending_tokens == 130
    ds.progress(f1, 1, now=1.1)
    ds.progress(f1, 4, now=1.2)  # only the first token counts
    assert a.prefill_pending_tokens == 30
    ds.move(f2, ds.slots[1])  # the gateway retried it on b: its pending prompt moves along
    assert (a.prefill_pending_tokens, b.prefill_pending_tokens) == (0, 30)
    ds.complete(f2)  # failed before any token
    ds.complete(f3)
    ds.complete(f1)
    assert (a.prefill_pending_tokens, b.prefill_pending_tokens) == (0, 0)


def test_datastore_stale_after_failures() -> None:
    ds = Datastore([Endpoint.parse("a:1")], stale_after_s=2.0)
    ds.scraped(0, _metrics(), now=10.0)
    ds.scrape_failed(0, "boom", now=11.0)
    assert not ds.states[0].stale and ds.last_error[0] == "boom"
    ds.scrape_failed(0, "boom", now=12.5)
    assert ds.states[0].stale
    ds.scraped(0, _metrics(), now=13.0)
    assert not ds.states[0].stale and ds.last_error[0] == ""


class _HoldN(Policy):
    name = "hold-n"

    def __init__(self, holds: int) -> None:
        self.holds = holds
        self.completed: list[int] = []
        self.nows: list[float] = []

    def decide(self, request: Request, view: PoolView) -> Decision:
        self.nows.append(view.now)
        if request.id < 0:
            raise RuntimeError("bad request")
        if self.holds > 0:
            self.holds -= 1
            return HOLD
        return Route((request.id % len(view.endpoints),))

    def on_completed(self, request: Request, endpoint: int, output_tokens: int, now: float) -> None:
        self.completed.append(request.id)


def test_dispatcher_holds_ticks_and_survives_policy_errors() -> None:
    async def main() -> None:
        ds = Datastore([Endpoint.parse("a:1"), Endpoint.parse("b:2")])
        for i in (0, 1):
            ds.scraped(i, _metrics(), now=0.0)
        pol = _HoldN(holds=3)
        d = Dispatcher(pol, ds, tick_s=0.001)
        fl = await asyncio.wait_for(d.route(_req(1)), 1.0)
        assert fl.endpoint == 1 and ds.states[1].inflight == 1 and d.holds == 3
        with pytest.raises(DispatchError, match="bad request"):
            await d.route(_req(-1))
        assert d.queued == 0
        d.finish(fl, 7)
        assert pol.completed == [1] and ds.states[1].inflight == 0
        # a caller cancelled while held leaves the queue
        pol.holds = 10**9
        task = asyncio.create_task(d.route(_req(2)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert d.queued == 0
        d.close()

    asyncio.run(main())


def test_datastore_membership_changes_keep_state_and_flights() -> None:
    ds = Datastore([Endpoint.parse("a:1"), Endpoint.parse("b:2")])
    assert all(st.stale for st in ds.states)  # no metrics yet
    ds.scraped("b:2", _metrics(running=3), now=1.0)
    fl = ds.assign(1, _req(1, 50), now=1.0)
    added, removed = ds.set_endpoints([Endpoint.parse("c:3"), Endpoint.parse("b:2")])
    assert (added, removed) == (["c:3"], ["a:1"])
    assert [st.name for st in ds.view.endpoints] == ["c:3", "b:2"]
    assert [st.index for st in ds.states] == [0, 1]
    b = ds.states[1]
    assert b.running == 3 and b.inflight == 1 and fl.endpoint == 1 and not b.stale
    ds.set_endpoints([Endpoint.parse("c:3")])
    assert fl.endpoint == -1  # left the pool; its request still finishes cleanly
    assert ds.complete(fl) and not ds.complete(fl)
    assert b.inflight == 0
    with pytest.raises(ValueError, match="duplicate endpoints: c:3"):
        ds.set_endpoints([Endpoint.parse("c:3"), Endpoint.parse("c:3")])


class _Fixed(Policy):
    name = "fixed"

    def __init__(self, order: tuple[int, ...]) -> None:
        self.order = order
        self.assigned: list[int] = []

    def decide(self, request: Request, view: PoolView) -> Decision:
        return Route(self.order)

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:
        self.assigned.append(endpoint)


def test_dispatcher_subset_down_and_stale_bypass() -> None:
    async def main() -> None:
        eps = [Endpoint.parse(f"10.0.0.{i}:8000") for i in range(3)]
        ds = Datastore(eps)
        for i in range(3):
            ds.scraped(i, _metrics(), now=0.0)
        pol = _Fixed((0, 1, 2))
        d = Dispatcher(pol, ds, max_endpoints=2)
        fl = await d.route(_req(1))
        assert fl.route == ("10.0.0.0:8000", "10.0.0.1:8000")
        # subset hint: the policy's order narrowed to the eligible endpoints
        fl = await d.route(_req(2), eligible=lambda st: st.name != "10.0.0.0:8000")
        assert fl.route == ("10.0.0.1:8000", "10.0.0.2:8000") and pol.assigned[-1] == 1
        # an endpoint whose /metrics refuses connections is never chosen
        ds.scrape_failed(1, "refused", now=0.1, unreachable=True)
        fl = await d.route(_req(3), eligible=lambda st: st.name != "10.0.0.0:8000")
        assert fl.route == ("10.0.0.2:8000",)
        # the policy named none of the eligible endpoints: least in-flight among them
        pol.order = (0,)
        ds.scraped(1, _metrics(), now=0.2)
        ds.assign(2, _req(40), now=0.2)
        fl = await d.route(_req(4), eligible=lambda st: st.index in (1, 2))
        assert fl.endpoint == 1  # endpoint 2 has two requests in flight, endpoint 1 one
        with pytest.raises(DispatchError, match="no eligible endpoint"):
            await d.route(_req(5), eligible=lambda st: False)
        # every candidate stale: the policy is bypassed, least in-flight wins
        for st in ds.states:
            st.stale = True
        before = d.bypassed
        fl = await d.route(_req(6))
        assert d.bypassed == before + 1 and fl.endpoint == 0 and pol.assigned[-1] == 0
        d.close()

    asyncio.run(main())


def _spec() -> SyntheticSpec:
    return SyntheticSpec(
        name="mix",
        classes=(
            RequestClass("short", 0.5, LengthDist("lognormal", mean=64, cv=0.5, low=8, high=256),
                         LengthDist("lognormal", mean=24, cv=0.5, low=4, high=64)),
            RequestClass("long", 0.5, LengthDist("lognormal", mean=700, cv=0.3, low=200, high=1500),
                         LengthDist("lognormal", mean=48, cv=0.5, low=8, high=96)),
        ),
    )  # fmt: skip


def test_prompt_ids_share_prefix_blocks() -> None:
    w = synthetic(_spec(), n=4, rate=10.0, seed=1)
    a, b = w.items[0], w.items[1]
    a.request.prefix_hashes, b.request.prefix_hashes = (11, 22), (11, 33)
    a.request.hash_block_tokens = b.request.hash_block_tokens = 8
    a.request.prompt_tokens = b.request.prompt_tokens = 20
    ia, ib = prompt_ids(a, 0), prompt_ids(b, 0)
    assert len(ia) == len(ib) == 20
    assert ia[:8] == ib[:8] and ia[8:16] != ib[8:16]


def test_replay_through_emulators_matches_the_simulator() -> None:
    """Two emulators at real time: client-measured E2E agrees with the lab's engine model."""
    profile = load_profile("a100-llama3-8b")
    w = synthetic(_spec(), n=40, rate=20.0, seed=3)

    async def main() -> LiveResult:
        cfg = EmulatorConfig(profile=profile)
        async with running(cfg) as a, running(cfg) as b:
            eps = [Endpoint.parse(a.url), Endpoint.parse(b.url)]
            return await replay(w, eps, build_policy("round-robin", profile, 0))

    res = asyncio.run(main())
    run = simulate_run(w, "round-robin", profile, 2, 0)
    sim = run.summary
    assert sim == simulate_run(w, "round-robin", profile, 2, 0).summary  # deterministic
    assert res.errors == 0 and res.per_endpoint == [20, 20]
    assert res.summary.e2e_mean_s == pytest.approx(sim.e2e_mean_s, rel=0.15)
    assert res.summary.ttft_mean_s < sim.ttft_mean_s + 0.05
    # --records: one row per request and side, the same requests on both sides
    rows = request_rows("round-robin", res, run)
    live_rows = [r for r in rows if r["side"] == "live"]
    sim_rows = [r for r in rows if r["side"] == "sim"]
    assert len(live_rows) == len(sim_rows) == 40
    assert {r["rid"] for r in live_rows} == {r["rid"] for r in sim_rows}
    assert sorted(r["endpoint"] for r in live_rows) == [0] * 20 + [1] * 20
    for r in rows:
        assert 0.0 < r["ttft_s"] <= r["e2e_s"] and r["output"] >= 1 and not r["error"]
    assert sum(r["e2e_s"] for r in sim_rows) / 40 == pytest.approx(sim.e2e_mean_s, rel=1e-4)


def test_calibrate_recovers_the_emulators_profile() -> None:
    profile = load_profile("a100-llama3-8b")

    async def main() -> tuple[float, float, float]:
        async with running(EmulatorConfig(profile=profile)) as srv:
            cal = await calibrate(srv.url, repeats=2, max_batch=8, max_num_seqs=256)
            lin = cal.profile.step.linear
            return lin.c0_ms, lin.c2_us_per_token, cal.profile.frontend_latency_ms

    c0, c2, frontend = asyncio.run(main())
    truth = profile.step
    assert c0 == pytest.approx(truth.linear.c0_ms + truth.overhead_ms, rel=0.15)
    assert c2 == pytest.approx(truth.linear.c2_us_per_token, rel=0.15)
    assert frontend < 10.0


def test_step_ratios_pair_the_decode_steps_of_both_sweeps() -> None:
    from llmpool.serving.calibrate import Probe, step_ratios

    idle = [
        Probe("prefill", 64, 0.1, 0.02, 64.0),  # one step: too noisy to count
        Probe("decode", 4, step_s=0.03),
        Probe("decode", 8, step_s=0.05),  # not measured busy: no ratio
        Probe("decode", 16, step_s=0.08),
    ]
    busy = [
        Probe("prefill", 64, 0.2, 0.03, 64.0),
        Probe("decode", 4, step_s=0.036),
        Probe("decode", 16, step_s=0.06),
    ]
    want = [("decodeB", 4, pytest.approx(1.2)), ("decodeB", 16, pytest.approx(0.75))]
    assert step_ratios(idle, busy) == want


def test_calibrate_with_a_busy_neighbour_fits_the_host_contention() -> None:
    import aiohttp

    from llmpool.serving.calibrate import CalibrationError
    from llmpool.serving.scrape import parse_vllm_metrics

    profile = load_profile("a100-llama3-8b")

    async def generated(url: str) -> float:
        async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
            return parse_vllm_metrics(await r.text()).engine("0").generation_tokens

    async def main() -> None:
        cfg = EmulatorConfig(profile=profile)
        async with running(cfg) as a, running(cfg) as b:
            with pytest.raises(CalibrationError, match="is the server being calibrated"):
                await calibrate(a.url, neighbour=a.url)
            before = await generated(b.url)
            cal = await calibrate(
                a.url, name="pair-a", repeats=2, max_batch=4, neighbour=b.url, neighbour_streams=2
            )
            assert cal.profile.name == "pair-a"
            # the neighbour really worked: 2 streams at a time, decoding then prefilling
            assert await generated(b.url) - before >= 2 * 256
            host = cal.profile.host
            assert host.servers_per_host == 2
            assert [(k, n) for k, n, _ in cal.ratios] == [
                (load, n) for load in ("decoding", "prefilling") for n in (1, 2, 4)
            ]
            assert set(cal.contended) == {"decoding", "prefilling"}
            assert all(p.kind == "decode" for sweep in cal.contended.values() for p in sweep)
            for load, got in (
                ("decoding", host.slowdown_per_busy_neighbour),
                ("prefilling", host.slowdown_per_prefilling_neighbour),
            ):
                rs = sorted(r for k, _, r in cal.ratios if k == load)
                want = max(0.0, rs[1] - 1.0)
                assert got == pytest.approx(want, abs=1e-4)
            assert "kept busy" in cal.profile.provenance.source
            assert "slowdown per busy neighbour" in cal.table()

    asyncio.run(main())


def test_calibrate_names_an_unreachable_neighbour() -> None:
    from llmpool.serving.calibrate import CalibrationError

    async def main() -> None:
        async with running(EmulatorConfig(profile=load_profile("a100-llama3-8b"))) as a:
            with pytest.raises(CalibrationError, match=r"127\.0\.0\.1:9: cannot reach the server"):
                await calibrate(a.url, neighbour="http://127.0.0.1:9")

    asyncio.run(main())


def test_a_server_lost_mid_calibration_is_a_one_line_error() -> None:
    import aiohttp

    from llmpool.serving.calibrate import CalibrationError, _Client

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            client = _Client(session, "http://127.0.0.1:9", "m", 0)
            with pytest.raises(CalibrationError, match=r"^http://127\.0\.0\.1:9: request failed: \S"):
                await client.stream(4, 2)

    asyncio.run(main())
