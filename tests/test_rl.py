"""The RL router: state encoding, rewards, model files, the ``rl`` policy and its training."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmpool.lab.sim import SimConfig, Simulator, make_rng
from llmpool.lab.workload import load_workload
from llmpool.rl.features import (
    FEATURES,
    I_HEUR_CHOICE,
    I_HEUR_DELTA,
    I_HOLD,
    N_FEATURES,
    N_REQ,
    Candidate,
    Encoder,
    Situation,
    three_buckets,
)
from llmpool.rl.model import NumpyQ, RLModelError, load_model, meta_path, write_model
from llmpool.rl.policy import RLParams, RLPolicy
from llmpool.rl.reward import base_rewards, heuristic_terms, shaped
from llmpool.routing import PolicyContext, builtin_registry
from llmpool.routing.profile import load_profile
from llmpool.routing.types import EndpointState, Hold, PoolView, Request, Route

A100 = load_profile("a100-llama3-8b")


def cand(i: int, score: float, **kw: float) -> Candidate:
    base: dict[str, object] = dict(
        endpoint=i,
        score=score,
        ttft=0.05,
        decode=2.0,
        stall=0.5,
        slowdown=0.2,
        kv_penalty=0.0,
        inflight=10,
        waiting=0,
        free_slots=246,
        kv_frac=0.1,
        remaining_tokens=1000.0,
        dec_buckets=(5, 4, 1),
        stale=False,
    )
    base.update(kw)
    return Candidate(**base)  # type: ignore[arg-type]


def situation(**kw: object) -> Situation:
    base: dict[str, object] = dict(
        prompt_tokens=300,
        expected_tokens=150.0,
        bucket_probs=(0.7, 0.25, 0.05),
        queue_len=3,
        waited_s=0.5,
        max_hold_s=30.0,
        max_seqs=256,
        n_endpoints=2,
        total_free=400,
        total_inflight=112,
        with_slot=2,
    )
    base.update(kw)
    return Situation(**base)  # type: ignore[arg-type]


def random_layers(seed: int, hidden: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    r = np.random.default_rng(seed)
    dims = [N_FEATURES, hidden, hidden, 1]
    return [
        (r.normal(0, 0.4, (a, b)).astype(np.float32), r.normal(0, 0.1, b).astype(np.float32))
        for a, b in itertools.pairwise(dims)
    ]


# ---------------------------------------------------------------------------- encoding
def test_encoder_rows_on_a_hand_case() -> None:
    enc = Encoder(max_endpoints=4)
    rows = enc.encode(situation(), [cand(0, 3.0, inflight=20), cand(1, 2.0, inflight=40)])
    assert rows.shape == (3, N_FEATURES) and len(FEATURES) == N_FEATURES
    # the request part is the same in every row
    assert np.all(rows[:, :N_REQ] == rows[0, :N_REQ])
    assert rows[0, 0] == pytest.approx(math.log1p(300) / 10)
    assert tuple(rows[0, 2:5]) == pytest.approx((0.7, 0.25, 0.05))
    assert rows[0, 5] == pytest.approx(3 / 512)
    # endpoint part: in-flight over max_seqs; endpoint 1 is the heuristic's choice
    assert rows[0, N_REQ] == pytest.approx(20 / 256) and rows[1, N_REQ] == pytest.approx(40 / 256)
    assert rows[1, I_HEUR_CHOICE] == 1.0 and rows[0, I_HEUR_CHOICE] == 0.0
    assert rows[1, I_HEUR_DELTA] == 0.0
    assert rows[0, I_HEUR_DELTA] == pytest.approx(min((3.0 - 2.0) / 2.0, 5) / 5)
    # the hold row: flagged, endpoint features are the mean, never "the heuristic's choice"
    assert rows[2, I_HOLD] == 1.0 and rows[0, I_HOLD] == 0.0 and rows[1, I_HOLD] == 0.0
    assert rows[2, N_REQ] == pytest.approx(30 / 256)
    assert rows[2, I_HEUR_CHOICE] == 0.0


def test_encoder_is_permutation_equivariant_and_refuses_too_many_endpoints() -> None:
    enc = Encoder(max_endpoints=3)
    a, b, c = cand(0, 3.0, inflight=5), cand(1, 2.0, inflight=50), cand(2, 4.0, waiting=7)
    q = NumpyQ(random_layers(1))
    s1 = q.scores(enc.encode(situation(n_endpoints=3), [a, b, c]).copy())
    s2 = q.scores(enc.encode(situation(n_endpoints=3), [c, a, b]).copy())
    assert s2 == pytest.approx(np.array([s1[2], s1[0], s1[1], s1[3]]), rel=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        enc.encode(situation(), [a, b, c, cand(3, 1.0)])


def test_three_buckets_maps_other_edges_to_a_point_mass() -> None:
    assert three_buckets((256, 2048), (0.2, 0.5, 0.3), 400) == (0.2, 0.5, 0.3)
    assert three_buckets((100,), (0.5, 0.5), 3000.0) == (0.0, 0.0, 1.0)
    assert three_buckets((100,), (0.5, 0.5), 10.0) == (1.0, 0.0, 0.0)


# ---------------------------------------------------------------------------- rewards
def test_base_reward_on_a_hand_case() -> None:
    # two requests arrive at 0 and finish at 1 and 2; decisions at 0 and 0.5
    r, dt = base_rewards([0.0, 0.5], [0.0, 0.0], [1.0, 2.0], tick_s=0.5, completion_reward=1.0, norm=1.0)
    # interval 0: 2 requests for 0.5 s = area 1 -> -2 ticks; interval 1: area 2*0.5 + 1*1 = 2 -> -4, +2 done
    assert r == pytest.approx([-2.0, -2.0])
    assert dt == pytest.approx([0.5, 1.5])


def test_base_reward_sums_to_minus_total_latency() -> None:
    """Little's law: the undiscounted base return is -sum(E2E)/tick + r_w * N (over norm)."""
    rng = np.random.default_rng(3)
    arr = np.sort(rng.uniform(0, 10, 200))
    fin = arr + rng.exponential(2.0, 200)
    times = np.sort(np.concatenate(([0.0], rng.uniform(0, 12, 50))))
    r, dt = base_rewards(times, arr, fin, tick_s=0.02, completion_reward=60.0, norm=8.0)
    want = (-(fin - arr).sum() / 0.02 + 60.0 * 200) / 8.0
    assert r.sum() == pytest.approx(want, rel=1e-9)
    assert dt.sum() == pytest.approx(fin.max())
    with pytest.raises(ValueError, match="non-decreasing"):
        base_rewards([1.0, 0.5], arr, fin, tick_s=0.02, completion_reward=1.0, norm=1.0)


def test_heuristic_terms_and_variants() -> None:
    cands = [cand(0, 2.0, stall=1.0, slowdown=0.0), cand(1, 3.0, stall=0.0, slowdown=2.0)]
    h, mix = heuristic_terms(cands, alpha=0.5, hold_cost=0.5, mix_scale=10.0)
    assert h == pytest.approx([0.0, -0.5, -0.5])  # least-impact endpoint: 0; (3-2)/2 worse; hold
    assert mix == pytest.approx([-0.05, -0.1, 0.0])
    base = np.array([-1.0, -2.0])
    hh = np.array([-0.5, 0.0])
    mm = np.array([-0.1, -0.2])
    dt = np.array([0.02, 0.0])
    kw = dict(gamma=0.9, beta_d=0.5, tick_s=0.02)
    r, d = shaped("baseline", base, hh, mm, dt, episode=0, **kw)  # type: ignore[arg-type]
    assert r == pytest.approx(base) and d == pytest.approx([0.9, 1.0])
    r, d = shaped("aware", base, hh, mm, dt, episode=7, **kw)  # type: ignore[arg-type]
    assert r == pytest.approx(base + mm) and d == pytest.approx([0.9, 1.0])
    # guided, episode 0: full heuristic weight, discount 0 (HuRL's short horizon)
    r, d = shaped("guided", base, hh, mm, dt, episode=0, **kw)  # type: ignore[arg-type]
    assert r == pytest.approx(base + hh) and d == pytest.approx([0.0, 0.0])
    r, d = shaped("guided", base, hh, mm, dt, episode=4, **kw)  # type: ignore[arg-type]
    w = math.exp(-2.0)
    assert r == pytest.approx(base + w * hh) and d == pytest.approx([(1 - w) * 0.9, 1.0])


# ---------------------------------------------------------------------------- model files
def test_model_file_round_trip_and_errors(tmp_path: Path) -> None:
    layers = random_layers(2)
    p = write_model(tmp_path / "m.onnx", layers, {"max_endpoints": 8})
    m = load_model(p)
    rows = np.random.default_rng(0).uniform(0, 1, (5, N_FEATURES)).astype(np.float32)
    assert m.scores(rows) == pytest.approx(NumpyQ(layers).scores(rows), rel=1e-5, abs=1e-6)
    assert m.max_endpoints == 8
    # same weights, same bytes
    q = write_model(tmp_path / "n.onnx", layers, {"max_endpoints": 8})
    assert q.read_bytes() == p.read_bytes()
    with pytest.raises(RLModelError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    meta = json.loads(meta_path(p).read_text())
    meta["features"] = meta["features"][:-1]
    meta_path(p).write_text(json.dumps(meta))
    with pytest.raises(RLModelError, match="different state encoding"):
        load_model(p)
    bad = tmp_path / "bad.onnx"
    shutil.copy(q, bad)
    shutil.copy(meta_path(q), meta_path(bad))
    bad.write_bytes(b"garbage")
    with pytest.raises(RLModelError, match="hash differs"):
        load_model(bad)


def test_packaged_model_loads() -> None:
    m = load_model("paper-a")
    assert m.meta["variant"] in ("baseline", "aware", "guided")
    assert m.max_endpoints >= 8


# ---------------------------------------------------------------------------- the policy
def run_sim(policy_spec: dict[str, object], n: int = 600, rate: float = 200.0, seed: int = 0) -> float:
    wl = load_workload("five-task", n=n, rate=rate, seed=seed)
    ctx = PolicyContext(rng=make_rng(seed, "policy"), truth=None, profile=A100)
    pol = builtin_registry().build(policy_spec, ctx)
    return Simulator(A100, pol, SimConfig(instances=4)).run(wl.items).summary.e2e_mean_s


def test_missing_model_falls_back_to_the_impact_heuristic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = {"name": "rl", "params": {"model": str(tmp_path / "none.onnx")}}
    ctx = PolicyContext(rng=random.Random(0), truth=None, profile=A100)
    with caplog.at_level("WARNING", logger="llmpool.rl"):
        pol = builtin_registry().build(spec, ctx)
    assert "no such file" in caplog.text
    status = pol.fallback_status()  # type: ignore[attr-defined]
    assert "rl-model" in status and "none.onnx" in status["rl-model"]
    # it routes exactly as impact does
    assert run_sim(spec) == run_sim({"name": "impact"})


def test_pool_larger_than_the_model_uses_the_heuristic(tmp_path: Path) -> None:
    p = write_model(tmp_path / "m.onnx", random_layers(4), {"max_endpoints": 2})
    pol = RLPolicy(RLParams(model=str(p)), PolicyContext(rng=random.Random(0), profile=A100))
    eps = [EndpointState(index=i, name=f"e{i}", kv_capacity_tokens=400_000) for i in range(3)]
    r1 = Request(id=1, arrival=0.0, prompt_tokens=100)
    d = pol.decide(r1, PoolView(now=0.0, endpoints=eps, queue=[r1]))
    assert isinstance(d, Route)
    assert (
        pol.fallback_decisions == 1
        and "exceeds the model's max_endpoints 2" in pol.fallback_status()["rl-model"]
    )
    r2 = Request(id=2, arrival=0.0, prompt_tokens=100)
    d = pol.decide(r2, PoolView(now=0.1, endpoints=eps[:2], queue=[r2]))
    assert pol.fallback_status() == {} and pol.decisions == 1
    assert isinstance(d, Route | Hold)


def test_rl_policy_runs_the_packaged_model_in_the_simulator() -> None:
    e2e = run_sim({"name": "rl"}, n=400)
    assert math.isfinite(e2e) and e2e > 0


def test_rl_policy_decides_with_the_network() -> None:
    """A network that always prefers hold holds; one that prefers endpoint rows routes there."""

    class Prefer:
        def __init__(self, feature: int) -> None:
            self.feature = feature

        def scores(self, rows: np.ndarray) -> np.ndarray:
            return rows[:, self.feature].astype(np.float32)

    eps = [EndpointState(index=i, name=f"e{i}", kv_capacity_tokens=400_000) for i in range(3)]
    eps[2].inflight = 100
    ctx = PolicyContext(rng=random.Random(0), profile=A100)
    hold = RLPolicy(RLParams(), ctx, scorer=Prefer(I_HOLD))
    req = Request(id=1, arrival=0.0, prompt_tokens=100)
    assert isinstance(hold.decide(req, PoolView(now=0.0, endpoints=eps, queue=[req])), Hold)
    busiest = RLPolicy(RLParams(), ctx, scorer=Prefer(N_REQ))  # ep_inflight: the busiest endpoint
    d = busiest.decide(req, PoolView(now=0.0, endpoints=eps, queue=[req]))
    assert isinstance(d, Route) and d.endpoints[0] == 2 and sorted(d.endpoints) == [0, 1, 2]
    # the starvation bound: a request held max_hold_s is routed whatever the network says
    old = Request(id=2, arrival=-30.0, prompt_tokens=100)
    assert isinstance(hold.decide(old, PoolView(now=1.0, endpoints=eps, queue=[old])), Route)


def test_a_model_failing_at_inference_falls_back_without_failing_the_request() -> None:
    class Broken:
        def scores(self, rows: np.ndarray) -> np.ndarray:
            raise RuntimeError("onnxruntime: bad input")

    eps = [EndpointState(index=i, name=f"e{i}", kv_capacity_tokens=400_000) for i in range(2)]
    pol = RLPolicy(RLParams(), PolicyContext(rng=random.Random(0), profile=A100), scorer=Broken())
    req = Request(id=1, arrival=0.0, prompt_tokens=100)
    d = pol.decide(req, PoolView(now=0.0, endpoints=eps, queue=[req]))
    assert isinstance(d, Route) and sorted(d.endpoints) == [0, 1]
    assert "failed at inference: RuntimeError" in pol.fallback_status()["rl-model"]
    req2 = Request(id=2, arrival=0.0, prompt_tokens=100)
    assert isinstance(pol.decide(req2, PoolView(now=0.1, endpoints=eps, queue=[req2])), Route)
    assert pol.fallback_decisions == 1


def test_rl_params_are_validated() -> None:
    ctx = PolicyContext(rng=random.Random(0), profile=A100)
    from llmpool.routing import ConfigError

    with pytest.raises(ConfigError, match="heuristic"):
        builtin_registry().build({"name": "rl", "params": {"heuristic": {"impact_weight": -1}}}, ctx)
    with pytest.raises(ConfigError, match="max_endpoints"):
        builtin_registry().build({"name": "rl", "params": {"max_endpoints": 0}}, ctx)


# ---------------------------------------------------------------------------- training
torch = pytest.importorskip("torch", reason="training needs torch (the train and dev extras)")


def tiny(**kw: object) -> object:
    from llmpool.rl.train import TrainConfig

    base: dict[str, object] = dict(
        instances=(2,),
        requests=(100, 150),
        load=(0.3, 0.5),
        eval_requests=120,
        eval_seeds=(1001,),
        eval_every=3,
        batch=64,
        replay=20_000,
        updates_per_decision=0.5,
        target_update=20,
        hidden=(16, 16),
        checkpoint_every=2,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_onnx_export_matches_the_torch_network(tmp_path: Path) -> None:
    from llmpool.rl.dqn import QNet

    torch.manual_seed(0)
    net = QNet((32, 16))
    p = write_model(tmp_path / "q.onnx", net.layers(), {"max_endpoints": 4})
    rows = np.random.default_rng(1).uniform(0, 1, (9, N_FEATURES)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(rows)).numpy()
    assert load_model(p).scores(rows) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert NumpyQ(net.layers()).scores(rows) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_training_is_deterministic_resumable_and_learns(tmp_path: Path) -> None:
    from llmpool.rl.train import Trainer, evaluate_policy, train

    quiet = {"progress": False, "log": lambda m: None}
    cfg = tiny(episodes=3, variant="guided", demo_episodes=1)
    s1 = train(cfg, tmp_path / "a", **quiet)  # type: ignore[arg-type]
    w1 = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["online"]
    # the same seed twice: the same weights; 2 episodes then a resume to 3: the same weights
    train(tiny(episodes=2, variant="guided", demo_episodes=1), tmp_path / "b", **quiet)  # type: ignore[arg-type]
    s2 = train(cfg, tmp_path / "b", resume=True, **quiet)  # type: ignore[arg-type]
    w2 = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["online"]
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    assert [h["e2e_mean_s"] for h in s1["history"]] == [h["e2e_mean_s"] for h in s2["history"]]
    for f in ("model.onnx", "last.onnx", "learning-curve.png", "summary.json"):
        assert (tmp_path / "a" / f).is_file()
    # it learns: on a held-out seed the trained greedy policy beats the untrained network
    untrained = Trainer(cfg, tmp_path / "c", log=lambda m: None)  # type: ignore[arg-type]
    ctx = PolicyContext(rng=random.Random(0), profile=A100)
    before = evaluate_policy(cfg, untrained._policy(ctx, None), seeds=(1001,))  # type: ignore[arg-type]
    trained = RLPolicy(RLParams(model=str(tmp_path / "a" / "last.onnx")), ctx)
    after = evaluate_policy(cfg, trained, seeds=(1001,))  # type: ignore[arg-type]
    assert after[0] < before[0]


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    from llmpool.rl.train import TrainError, train

    train(tiny(episodes=1), tmp_path, progress=False, log=lambda m: None)
    with pytest.raises(TrainError, match="different settings: lr"):
        train(tiny(episodes=2, lr=1e-2), tmp_path, resume=True, progress=False, log=lambda m: None)
