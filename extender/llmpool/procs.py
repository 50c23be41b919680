"""Local child processes of LLMPool: emulated vLLM servers and the endpoint picker.

Used by ``llmpool demo`` and by the end-to-end tests. Every child runs in its own session
(process group) with its output in a log file, gets SIGTERM when the thread that spawned it
dies (Linux ``PR_SET_PDEATHSIG``, see :func:`llmpool.gateway.kill_with_parent`), and is
stopped by pid: ``stop()`` sends SIGTERM and SIGKILLs after a grace period, ``kill()`` is a
crash. Start-up errors carry the tail of the child's log.

Envoy has its own class, :class:`llmpool.gateway.EnvoyProcess`.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmpool.gateway import free_port, http_get, kill_with_parent

__all__ = ["LLMPOOL_COMMAND", "EmulatorProcess", "ManagedProcess", "PickerProcess", "StartError"]

HOST = "127.0.0.1"
#: How children run the ``llmpool`` CLI: the same interpreter as the parent.
LLMPOOL_COMMAND: tuple[str, ...] = (sys.executable, "-m", "llmpool.cli")
STOP_GRACE_S = 3.0


class StartError(RuntimeError):
    """A process did not become ready; the message has the reason and its log tail."""


class ManagedProcess:
    """One child with a fixed command line: launch / wait_ready / start / kill / stop / restart.

    Subclasses give ``command()`` and ``ready()``. ``env`` and ``cwd`` default to the parent's.
    """

    name = "process"

    def __init__(
        self,
        log_path: Path,
        ready_timeout_s: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
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
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=kill_with_parent,  # a killed parent leaves no child behind
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                rc = self.proc.returncode if self.proc is not None else None
                raise StartError(f"{self.name} exited with status {rc} at start-up{self._tail()}")
            with contextlib.suppress(Exception):
                if self.ready():
                    return
            time.sleep(0.05)
        raise StartError(f"{self.name} not ready after {self.ready_timeout_s:g}s{self._tail()}")

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
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM by pid, SIGKILL after ``grace_s``; always reaps."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)

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


class EmulatorProcess(ManagedProcess):
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

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

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
