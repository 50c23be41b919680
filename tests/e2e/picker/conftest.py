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

import importlib.util
import os
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

from llmpool.children import free_port
from llmpool.gateway import EnvoyProcess, EnvoySpec
from llmpool.procs import EmulatorProcess, PickerProcess, StartError

__all__ = ["Emulator", "Picker", "StartError"]

ROOT = Path(__file__).resolve().parents[3]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "extender")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Emulator(EmulatorProcess):
    """An emulator run from this checkout (``PYTHONPATH`` = ``extender/``, cwd = the repository)."""

    def __init__(
        self, port: int, time_scale: float, extra_args: Sequence[str], log_path: Path, ready_timeout_s: float
    ) -> None:
        super().__init__(port, time_scale, extra_args, log_path, ready_timeout_s, env=_env(), cwd=ROOT)


class Picker(PickerProcess):
    """The picker run from this checkout (see :class:`Emulator`)."""

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
        super().__init__(endpoints, config_path, plaintext=plaintext, extra_args=extra_args,
                         log_path=log_path, ready_timeout_s=ready_timeout_s, drain_seconds=drain_seconds,
                         env=_env(), cwd=ROOT)  # fmt: skip


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
