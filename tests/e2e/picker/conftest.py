"""Fixtures for the endpoint picker's end-to-end tests: emulated vLLM servers, the picker, Envoy.

Everything runs as subprocesses on 127.0.0.1 with free ports, in its own session (process group), and
is stopped by pid when the test ends. Factories::

    def test_x(emulators, picker, envoy):
        emus = emulators(2, time_scale=20)              # `llmpool emulate` x2, /health answered
        p = picker(emus, config={...})                  # `llmpool extender`, gRPC `readiness` SERVING
        gw = envoy(picker=p, failure_mode_allow=True)   # EnvoyProcess, LIVE; gw.url is the gateway
        emus[0].kill(); p.restart(); p.metrics_text()

Logs of every process stay under the test's tmp dir (``<proc>.log``) and their tails are in every
start-up error. The whole directory is skipped while ``llmpool.picker.server`` does not import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

try:
    _PICKER_IMPORTABLE = importlib.util.find_spec("llmpool.picker.server") is not None
except ImportError:  # llmpool.picker itself missing
    _PICKER_IMPORTABLE = False
if not _PICKER_IMPORTABLE:
    pytest.skip("llmpool.picker.server is not importable yet", allow_module_level=True)

from llmpool.gateway import EnvoyProcess, EnvoySpec, free_port, http_get, kill_with_parent

ROOT = Path(__file__).resolve().parents[3]
HOST = "127.0.0.1"
LLMPOOL = [sys.executable, "-m", "llmpool.cli"]
PICKER_COMMAND = [*LLMPOOL, "extender"]  # the picker's CLI
STOP_GRACE_S = 3.0


class StartError(RuntimeError):
    """A process did not become ready; the message has the reason and its log tail."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "extender")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class _Process:
    """One subprocess with a fixed command line: start / wait ready / kill / stop / restart."""

    name = "process"

    def __init__(self, log_path: Path, ready_timeout_s: float) -> None:
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    # -- life cycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start without waiting (use ``wait_ready``); several can start in parallel."""
        if self.alive():
            raise StartError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                preexec_fn=kill_with_parent,  # a killed test run leaves no server behind
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

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after a grace period."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
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


class Emulator(_Process):
    """``llmpool emulate --port P --time-scale K`` (an emulated vLLM server)."""

    def __init__(
        self, port: int, time_scale: float, extra_args: Sequence[str], log_path: Path, ready_timeout_s: float
    ) -> None:
        super().__init__(log_path, ready_timeout_s)
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
        return [*LLMPOOL, "emulate", "--host", HOST, "--port", str(self.port),
                "--time-scale", f"{self.time_scale:g}", *self.extra_args]  # fmt: skip

    def ready(self) -> bool:
        return http_get(self.url + "/health", timeout=1.0)[0] == 200

    def metrics_text(self) -> str:
        return http_get(self.url + "/metrics")[1]


class Picker(_Process):
    """``llmpool extender`` (the endpoint picker): ext_proc on ``grpc_port``, gRPC health on
    ``health_port`` (ready = service ``readiness`` SERVING), Prometheus on ``metrics_port``."""

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
    ) -> None:
        super().__init__(log_path, ready_timeout_s)
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

    def command(self) -> list[str]:
        cmd = [*PICKER_COMMAND]
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


class _HasEndpoint(Protocol):
    @property
    def endpoint(self) -> str: ...


EndpointLike = str | _HasEndpoint


def _endpoint(e: EndpointLike) -> str:
    return e if isinstance(e, str) else e.endpoint


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def emulators(tmp_path: Path) -> Iterator[Callable[..., list[Emulator]]]:
    """``emulators(n, time_scale=20.0, extra_args=(), ready_timeout_s=30)`` -> n running emulators."""
    started: list[Emulator] = []

    def make(
        n: int, *, time_scale: float = 20.0, extra_args: Sequence[str] = (), ready_timeout_s: float = 30.0
    ) -> list[Emulator]:
        emus = []
        for _ in range(n):
            port = free_port()
            emu = Emulator(port, time_scale, extra_args, tmp_path / f"emulator-{port}.log", ready_timeout_s)
            started.append(emu)
            emus.append(emu)
            emu.launch()  # start all, then wait: they boot in parallel
        for emu in emus:
            emu.wait_ready()
        return emus

    try:
        yield make
    finally:
        for emu in reversed(started):
            emu.stop()


@pytest.fixture
def picker(tmp_path: Path) -> Iterator[Callable[..., Picker]]:
    """``picker(endpoints, config=None, *, plaintext=True, extra_args=(), ready_timeout_s=30, ...)``.

    ``endpoints``: ``host:port`` strings or objects with ``.endpoint`` (e.g. :class:`Emulator`).
    ``config``: a path, or a mapping written as YAML to the test's tmp dir, or None (no ``--config``).
    The picker listens on 127.0.0.1 and drains ``drain_seconds`` (default 1) on SIGTERM.
    """
    started: list[Picker] = []

    def make(
        endpoints: Sequence[EndpointLike],
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        plaintext: bool = True,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 30.0,
        drain_seconds: float = 1.0,
    ) -> Picker:
        n = len(started)
        config_path = Path(config) if isinstance(config, str | os.PathLike) else None
        if isinstance(config, Mapping):
            config_path = tmp_path / f"picker-{n}.yaml"
            config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        p = Picker(
            [_endpoint(e) for e in endpoints],
            config_path,
            plaintext=plaintext,
            extra_args=extra_args,
            log_path=tmp_path / f"picker-{n}.log",
            ready_timeout_s=ready_timeout_s,
            drain_seconds=drain_seconds,
        )
        started.append(p)
        p.start()
        return p

    try:
        yield make
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[Callable[..., EnvoyProcess]]:
    """``envoy(spec=None, *, picker=None, **spec_fields)`` -> a LIVE :class:`EnvoyProcess`.

    Without ``spec`` one is built with free ports; ``picker`` fills ``epp_port``, ``epp_health_port``
    (gRPC health check of the picker, which must then serve ``envoy.service.ext_proc.v3.ExternalProcessor``
    on its health port) and ``epp_tls``. ``fallback_endpoints`` may also be given as emulators.
    Example: ``envoy(picker=p, failure_mode_allow=True, fallback_endpoints=emus)``; after
    ``p.restart()`` call ``gw.wait_epp_healthy()`` before expecting picked routes again.
    """
    started: list[EnvoyProcess] = []

    def make(spec: EnvoySpec | None = None, *, picker: Picker | None = None, **fields: Any) -> EnvoyProcess:
        if spec is None:
            if "fallback_endpoints" in fields:
                fields["fallback_endpoints"] = tuple(_endpoint(e) for e in fields["fallback_endpoints"])
            base: dict[str, Any] = {
                "listen_port": free_port(),
                "admin_port": free_port(),
                "epp_port": None,
                # Notice a dead or restarted picker quickly (the EnvoySpec defaults are 1 s).
                "health_check_interval_s": 0.25,
                "ejection_s": 0.5,
            }
            if picker is not None:
                base.update(epp_port=picker.grpc_port, epp_health_port=picker.health_port, epp_tls=picker.tls)
            spec = EnvoySpec(**(base | fields))
        elif picker is not None or fields:
            raise TypeError("give either a spec or picker/fields, not both")
        gw = EnvoyProcess(spec, workdir=tmp_path / f"envoy-{len(started)}")
        started.append(gw)
        gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in reversed(started):
            gw.stop()
