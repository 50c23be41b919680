"""The picker's length prediction: blocking predictors run off the event loop (with a timeout
that falls back to an empirical prediction), policies' fallback status as metrics, and named
predictor models (``predictor_models``) reaching the ``learned`` predictor."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmpool.picker.config import PickerConfig, PredictionSettings, parse_config
from llmpool.picker.director import Director, Routed
from llmpool.picker.metrics import PickerMetrics
from llmpool.predict.runtime import builtin_path
from llmpool.routing.policy import ConfigError, PolicyConfig
from llmpool.routing.predictors import PerModelPredictor, SurvivalPredictor
from llmpool.routing.types import LengthPrediction, Request
from llmpool.serving.datastore import Datastore, Endpoint
from llmpool.serving.scrape import EngineMetrics, ServerMetrics

EPS = ("10.0.0.1:8000", "10.0.0.2:8000")
_MARK = object()


class SlowPredictor(SurvivalPredictor):
    """A blocking predictor whose model takes ``delay`` seconds (sleeping releases the GIL)."""

    blocking = True

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.prepared_in: list[str] = []

    def prepare(self, request: Request) -> object | None:
        self.prepared_in.append(threading.current_thread().name)
        time.sleep(self.delay)
        return _MARK

    def predict(self, request: Request) -> LengthPrediction:  # inline: would stall the loop
        time.sleep(self.delay)
        return LengthPrediction(1234.0, self.bucket_edges, (0.0, 1.0, 0.0), "slow-inline")

    def predict_prepared(self, request: Request, prepared: object | None) -> LengthPrediction:
        if prepared is _MARK:
            return LengthPrediction(1234.0, self.bucket_edges, (0.0, 1.0, 0.0), "slow")
        return super().predict(request)  # empirical: the survival distribution


def _director(policy: str = "impact", **cfg: Any) -> tuple[Director, PickerMetrics]:
    ds = Datastore([Endpoint.parse(e) for e in EPS])
    for i in range(len(EPS)):
        ds.scraped(i, ServerMetrics(engines={"0": EngineMetrics(0, 0, 0.1, 16, 1000)}), now=0.0)
    metrics = PickerMetrics()
    return Director(PickerConfig(policy=PolicyConfig(name=policy), **cfg), ds, metrics), metrics


HEADERS = {":path": "/v1/completions", ":method": "POST"}
BODY = orjson.dumps({"model": "m", "prompt": "Write a long essay about Rome.", "max_tokens": 4000})


async def _route_with_heartbeat(director: Director) -> tuple[Routed, float, float]:
    """Route one request while a heartbeat ticks every 5 ms; returns (routed, max gap, route time)."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    hb = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.02)  # the heartbeat is running
    t0 = time.perf_counter()
    routed = await director.route(dict(HEADERS), BODY, None)
    took = time.perf_counter() - t0
    await asyncio.sleep(0.02)
    stop.set()
    await hb
    assert isinstance(routed, Routed)
    return routed, max(gaps), took


@pytest.mark.asyncio
async def test_a_blocking_predictor_runs_off_the_loop_and_its_prediction_is_used() -> None:
    director, metrics = _director(prediction=PredictionSettings(timeout_s=2.0, threads=1))
    slow = SlowPredictor(0.3)
    director.policy.predictor = slow  # type: ignore[attr-defined]
    routed, gap, took = await _route_with_heartbeat(director)
    assert took >= 0.3  # the request waited for its prediction...
    assert gap < 0.15, f"the event loop stalled for {gap * 1000:.0f} ms"  # ...the loop did not
    assert slow.prepared_in and slow.prepared_in[0].startswith("llmpool-predict")
    assert routed.flight is not None
    req = routed.flight.request
    assert req.prediction is not None and req.prediction.source == "slow"
    # the policy decided with it: impact books the predicted length on the chosen endpoint
    assert director.policy._expected[req.id] == 1234.0  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value("llmpool_predictor_timeouts_total") == 0.0
    director.close()


@pytest.mark.asyncio
async def test_a_late_prediction_falls_back_to_the_empirical_one() -> None:
    director, metrics = _director(prediction=PredictionSettings(timeout_s=0.05, threads=1))
    slow = SlowPredictor(0.4)
    director.policy.predictor = slow  # type: ignore[attr-defined]
    routed, gap, took = await _route_with_heartbeat(director)
    assert took < 0.3 and gap < 0.15
    assert routed.flight is not None
    pred = routed.flight.request.prediction
    assert pred is not None and pred.source == "survival"
    assert metrics.registry.get_sample_value("llmpool_predictor_timeouts_total") == 1.0
    director.close()


@pytest.mark.asyncio
async def test_a_cheap_predictor_stays_inline() -> None:
    director, _ = _director(policy="impact")
    pred = director.policy.predictor  # type: ignore[attr-defined]
    assert isinstance(pred, PerModelPredictor) and not pred.blocking
    routed = await director.route(dict(HEADERS), BODY, None)
    assert isinstance(routed, Routed) and routed.flight is not None
    p = routed.flight.request.prediction
    assert p is not None and p.source == "survival"
    assert director._pool is None  # no worker pool was needed
    director.close()


# ------------------------------------------------------------------ fallback status


class _RLish:
    """What another policy (e.g. an RL router) reports through Policy.fallback_status."""

    def __init__(self, status: Mapping[str, str]) -> None:
        self.status = status

    def fallback_status(self) -> Mapping[str, str]:
        return self.status


def _corrupt_model(tmp_path: Path) -> Path:
    src = builtin_path("fast")
    shutil.copy(src, tmp_path / "m.onnx")
    shutil.copy(src.with_suffix(".json"), tmp_path / "m.json")
    with (tmp_path / "m.onnx").open("ab") as f:
        f.write(b"tampered")
    return tmp_path / "m.onnx"


def test_fallback_status_is_exported_per_component(tmp_path: Path) -> None:
    bad = _corrupt_model(tmp_path)
    for policy in ("impact", "brh"):
        learned = f"{{name: learned, params: {{model: '{bad}'}}}}"
        text = f"policy: {{name: {policy}, params: {{predictor: {learned}}}}}\n"
        metrics = PickerMetrics()
        d = Director(parse_config(text, "c.yaml"), Datastore(), metrics)
        status = d.policy.fallback_status()
        assert set(status) == {"predictor"} and "does not match its metadata" in status["predictor"]
        get = metrics.registry.get_sample_value
        assert get("llmpool_fallback_active", {"component": "predictor"}) == 1.0
        assert get("llmpool_predictor_fallback") == 1.0
        # a hot reload onto a good model clears both
        d.apply_config(parse_config("policy: {name: impact, params: {predictor: learned}}\n", "c.yaml"))
        assert d.policy.fallback_status() == {}
        assert get("llmpool_fallback_active", {"component": "predictor"}) is None
        assert get("llmpool_predictor_fallback") == 0.0
    # any component a policy reports is exported the same way
    metrics = PickerMetrics()
    d = Director(PickerConfig(policy=PolicyConfig(name="least-requests")), Datastore(), metrics)
    assert d.policy.fallback_status() == {}
    d.policy.fallback_status = _RLish({"rl-model": "no such file"}).fallback_status  # type: ignore[method-assign]
    get = metrics.registry.get_sample_value
    assert get("llmpool_fallback_active", {"component": "rl-model"}) == 1.0
    assert get("llmpool_predictor_fallback") == 0.0


# ------------------------------------------------------------------ named predictor models


def test_named_predictor_models_reach_the_learned_predictor(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    src = builtin_path("fast")
    shutil.copy(src, tmp_path / "models" / "small.onnx")
    shutil.copy(src.with_suffix(".json"), tmp_path / "models" / "small.json")
    text = (
        "predictor_models: {small: models/small.onnx}\n"
        "policy: {name: brh, params: {predictor: {name: learned, params: {model: small, on_error: raise}}}}\n"
    )
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    from llmpool.picker.config import load_config

    cfg = load_config(tmp_path / "c.yaml")
    want = str(tmp_path / "models" / "small.onnx")
    assert cfg.policy.params["predictor"]["params"]["model"] == want
    d = Director(cfg, Datastore(), PickerMetrics())
    pred = d.policy.predictor  # type: ignore[attr-defined]
    r = Request(id=1, arrival=0.0, prompt_tokens=5, model="m", prompt_text="hi")
    assert pred.predict(r).source == "learned-fast"
    assert str(pred.child("m").model.path) == want
    # built in code (no parse_config), a name still resolves
    d2 = Director(
        PickerConfig(
            predictor_models={"small": want},
            policy=PolicyConfig(
                name="impact", params={"predictor": {"name": "learned", "params": {"model": "small"}}}
            ),
        ),
        Datastore(),
        PickerMetrics(),
    )
    assert str(d2.policy.predictor.child("m").model.path) == want  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "policy: {name: impact, params: {predictor: {name: learned, params: {model: enc}}}}",
            "c.yaml: policy.params.predictor.params.model: unknown predictor model 'enc' "
            "(named models in predictor_models: none; built-in: fast; or the path of a .onnx file)",
        ),
        (
            "predictor_models: {fast: x.onnx}",
            "c.yaml: predictor_models: 'fast' is the built-in model's name; choose another",
        ),
        (
            "predictor_models: {a/b.onnx: x.onnx}",
            "c.yaml: predictor_models: name 'a/b.onnx' looks like a path",
        ),
    ],
)
def test_bad_predictor_model_names_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text + "\n", "c.yaml")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_unknown_model_name_in_the_lab_says_so() -> None:
    from llmpool.routing.predictors import build_predictor

    with pytest.raises(ConfigError, match="predictor model 'encoder': no such file, and not a built-in"):
        build_predictor({"name": "learned", "params": {"model": "encoder", "on_error": "raise"}})
