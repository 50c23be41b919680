"""Scale benchmark: N LLMPools created at once, reconciled by the operator against kmock.

Usage::

    python tests/operator/scale_bench.py --pools 100 [--json OUT] [--drift-interval 30] [--after 15]

The StampingEmulator (``kmock_support.py``) serves as the API server in this process; the
operator runs as ``llmpool operator`` in a subprocess against a kubeconfig pointing at it,
so its RSS is read cleanly from ``/proc/<pid>/status``. N copies of
``manifests/samples/llmpool-cpu.yaml`` (distinct names) are POSTed concurrently, then:

* **converged**: wall time until every pool has its 9 children and a status whose
  ``observedGeneration`` equals its ``generation``;
* **idle**: wall time until the operator has sent no request for ``--quiet`` seconds;
* API requests of the operator per pool, by verb and resource (kmock records them; the
  benchmark's own POSTs are not counted), up to convergence and up to idle, plus the
  requests of the ``--after`` window that follows idle (the drift timer's first pass);
* operator RSS at start (watching, no pools), at convergence, at idle, at the end, and the
  peak (``VmHWM`` and the 0.1 s samples).

Not collected by pytest (no ``test_`` prefix); ``test_scale_bench.py`` smoke-runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import attrs
import kmock
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEMPLATE = REPO / "manifests" / "samples" / "llmpool-cpu.yaml"
NS = "default"
USER_AGENT = "llmpool-scale-bench"

#: (resource, name suffix) of the 9 children of a pool named P ("" → P itself).
CHILDREN = [
    ("v1/serviceaccounts", "-picker"),
    ("rbac.authorization.k8s.io/v1/roles", "-picker"),
    ("rbac.authorization.k8s.io/v1/rolebindings", "-picker"),
    ("v1/configmaps", "-picker"),
    ("apps/v1/deployments", "-picker"),
    ("v1/services", "-picker"),
    ("apps/v1/deployments", "-engine"),
    ("v1/services", "-engine"),
    ("inference.networking.k8s.io/v1/inferencepools", ""),
]


def _load_support() -> ModuleType:
    name = "llmpool_tests_operator_kmock_support"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "kmock_support.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- the fake API server ---------------------------------------------------------------------


def trimming_emulator(support: ModuleType, trim: bool) -> Any:
    """The StampingEmulator, with kmock's live request log holding only in-flight requests.

    kmock dispatches every request by looking it up, by identity, in its whole request log
    (``request in payload._source``, evaluating the filters on every logged request), so each
    request costs O(requests so far) and a run of thousands of requests slows down
    quadratically: the fake server, not the operator, would be measured. With ``trim``, a
    request leaves the live log once it is served; every request is kept, in arrival order,
    in ``seen`` for the counting (:func:`all_requests`).
    """

    @attrs.define(kw_only=True)
    class TrimmingEmulator(support.StampingEmulator):  # type: ignore[misc,name-defined]
        seen: list[Any] = attrs.field(factory=list)

        async def _handle(self, request: Any) -> Any:
            self.seen.append(request)
            try:
                return await super()._handle(request)
            finally:
                if trim:
                    log = self._requests
                    index = next((i for i in range(len(log) - 1, -1, -1) if log[i] is request), None)
                    if index is not None:
                        del log[index]

    return TrimmingEmulator()


def all_requests(k: Any) -> list[Any]:
    return list(k.seen)


# --- measuring ------------------------------------------------------------------------------


def read_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class RssSampler:
    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid = pid
        self.period = period
        self.peak = 0
        self.hwm = 0

    def now(self) -> int:
        rss, hwm = read_rss(self.pid)
        self.peak = max(self.peak, rss)
        self.hwm = max(self.hwm, hwm)
        return rss

    async def run(self) -> None:
        while True:
            self.now()
            await asyncio.sleep(self.period)


def verb_of(req: Any) -> str:
    action = getattr(req.action, "value", req.action)
    method = str(getattr(req.method, "value", req.method) or "").upper()
    if action == "WATCH":
        return "watch"
    if action == "LIST":
        return "list"
    if action == "FETCH":
        return "get"
    if method == "POST":
        return "create"
    if method == "PATCH":
        return "patch"
    if method == "PUT":
        return "update"
    if method == "DELETE":
        return "delete"
    return method.lower() or "other"


def resource_of(req: Any) -> str:
    res = req.resource
    if res is None:
        return "(non-resource)"
    plural = str(getattr(res, "plural", "") or "")
    return f"{plural}/{req.subresource}" if req.subresource else plural


def operator_requests(k: Any, since: int = 0, until: int | None = None) -> list[Any]:
    reqs = all_requests(k)[since:until]
    return [r for r in reqs if (r.headers or {}).get("User-Agent") != USER_AGENT]


def count_requests(reqs: Iterable[Any]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    by_verb: Counter[str] = Counter()
    by_both: Counter[tuple[str, str]] = Counter()
    for r in reqs:
        v = verb_of(r)
        by_verb[v] += 1
        by_both[(v, resource_of(r))] += 1
    return by_verb, by_both


# --- the pools ------------------------------------------------------------------------------


def pool_bodies(n: int) -> list[dict[str, Any]]:
    template = yaml.safe_load(TEMPLATE.read_text())
    out = []
    for i in range(n):
        body = copy.deepcopy(template)
        body["metadata"] = {"name": f"bench-{i:04d}", "namespace": NS}
        out.append(body)
    return out


class Progress:
    """Which pools are complete (9 children + an up-to-date status), read from kmock's store."""

    def __init__(self, k: Any, names: list[str]) -> None:
        self.k = k
        self.names = names
        self.child_keys = {
            name: [(kmock.resource(res), NS, name + suffix) for res, suffix in CHILDREN] for name in names
        }
        self.pool_res = kmock.resource(_load_support().LLMPOOLS)

    def _present(self, key: Any) -> Any:
        try:
            obj = self.k.objects[key]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def snapshot(self) -> tuple[int, int]:
        """(children present, pools converged)."""
        children = converged = 0
        for name in self.names:
            have = sum(1 for key in self.child_keys[name] if self._present(key) is not None)
            children += have
            pool = self._present((self.pool_res, NS, name))
            if pool is None or have < len(CHILDREN):
                continue
            gen = (pool.get("metadata") or {}).get("generation")
            if gen is not None and (pool.get("status") or {}).get("observedGeneration") == gen:
                converged += 1
        return children, converged


def progress_line(text: str, stream: Any = sys.stderr) -> None:
    if stream.isatty():
        stream.write("\r" + text.ljust(78))
    else:
        stream.write(text + "\n")
    stream.flush()


# --- the run --------------------------------------------------------------------------------


def start_operator(kubeconfig: Path, drift_interval: float, log: Any) -> subprocess.Popen[bytes]:
    flags = ["-n", NS, "--metrics-port", "0", "--liveness-port", "0", "--drift-interval", str(drift_interval)]
    proc: subprocess.Popen[bytes] = _load_support().start_operator_process(kubeconfig, flags, log)
    return proc


async def wait_until(
    cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    support = _load_support()
    bodies = pool_bodies(args.pools)
    names = [b["metadata"]["name"] for b in bodies]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmpool-scale-")))
        async with trimming_emulator(support, not args.no_trim) as k, kmock.Server(k) as server:
            support.register_crds(k)
            url = str(server.url).rstrip("/")
            kubeconfig = support.write_kubeconfig(tmp / "kubeconfig", url, NS)
            log = stack.enter_context(open(tmp / "operator.log", "wb"))
            proc = start_operator(kubeconfig, args.drift_interval, log)
            sampler = RssSampler(proc.pid)
            sampler_task = asyncio.create_task(sampler.run())
            try:
                return await _measure(args, k, url, bodies, names, proc, sampler)
            except BaseException:
                log.flush()
                sys.stderr.write((tmp / "operator.log").read_text(errors="replace")[-4000:])
                raise
            finally:
                sampler_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler_task
                await support.stop_operator_process(proc)


async def _measure(
    args: argparse.Namespace,
    k: Any,
    url: str,
    bodies: list[dict[str, Any]],
    names: list[str],
    proc: subprocess.Popen[bytes],
    sampler: RssSampler,
) -> dict[str, Any]:
    def watching(plural: str) -> bool:
        return any(verb_of(r) == "watch" and resource_of(r) == plural for r in all_requests(k))

    t_launch = time.monotonic()
    await wait_until(
        lambda: watching("llmpools") and watching("deployments"), 60, "the operator to watch", proc
    )
    startup_s = time.monotonic() - t_launch
    await asyncio.sleep(1.0)  # let the start-up settle before the baseline reading
    rss_start = sampler.now()
    progress = Progress(k, names)
    mark = len(all_requests(k))
    n = len(names)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:

        async def create(body: dict[str, Any]) -> None:
            path = f"{url}/apis/llmpool.io/v1alpha1/namespaces/{NS}/llmpools"
            async with session.post(path, json=body) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"POST {body['metadata']['name']}: {resp.status} {await resp.text()}")

        await asyncio.gather(*(create(b) for b in bodies))
    t_created = time.monotonic() - t0

    last_print = 0.0
    while True:
        children, converged = progress.snapshot()
        now = time.monotonic() - t0
        if now - last_print >= 0.5 or converged == n:
            progress_line(
                f"[{now:6.1f}s] pools converged {converged}/{n}  children {children}/{n * len(CHILDREN)}  "
                f"requests {len(operator_requests(k, mark))}  rss {sampler.now() / 1024:.0f} MiB"
            )
            last_print = now
        if converged == n:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}")
        if now > args.timeout:
            raise TimeoutError(f"only {converged}/{n} pools converged after {args.timeout:.0f} s")
        await asyncio.sleep(0.1)
    t_converged = time.monotonic() - t0
    n_converged = len(all_requests(k))
    rss_converged = sampler.now()

    # idle: no operator request for --quiet seconds
    last_count, last_change = len(all_requests(k)), time.monotonic()
    while time.monotonic() - last_change < args.quiet:
        await asyncio.sleep(0.05)
        count = len(all_requests(k))
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        if time.monotonic() - t0 > args.timeout:
            raise TimeoutError("the operator never went idle")
    t_idle = last_change - t0
    n_idle = last_count
    rss_idle = sampler.now()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    progress_line(
        f"[{time.monotonic() - t0:6.1f}s] idle since {t_idle:.1f} s; observing {args.after:.0f} s more"
    )

    await asyncio.sleep(args.after)
    if proc.poll() is not None:
        raise RuntimeError(f"the operator exited with {proc.returncode}")
    rss_end = sampler.now()

    conv_verbs, _ = count_requests(operator_requests(k, mark, n_converged))
    idle_verbs, idle_both = count_requests(operator_requests(k, mark, n_idle))
    after_verbs, _ = count_requests(operator_requests(k, n_idle))
    return {
        "pools": n,
        "drift_interval_s": args.drift_interval,
        "operator_startup_s": round(startup_s, 2),
        "create_posts_s": round(t_created, 3),
        "converged_s": round(t_converged, 2),
        "idle_s": round(t_idle, 2),
        "requests_to_converged": sum(conv_verbs.values()),
        "requests_to_idle": sum(idle_verbs.values()),
        "per_pool_to_converged": {v: round(c / n, 2) for v, c in sorted(conv_verbs.items())},
        "per_pool_to_idle": {v: round(c / n, 2) for v, c in sorted(idle_verbs.items())},
        "per_pool_by_resource_to_idle": {
            f"{v} {r}": round(c / n, 2) for (v, r), c in sorted(idle_both.items())
        },
        "after_window_s": args.after,
        "per_pool_after_idle": {v: round(c / n, 2) for v, c in sorted(after_verbs.items())},
        "rss_mib": {
            "start": round(rss_start / 1024, 1),
            "converged": round(rss_converged / 1024, 1),
            "idle": round(rss_idle / 1024, 1),
            "end": round(rss_end / 1024, 1),
            "peak": round(max(sampler.peak, sampler.hwm) / 1024, 1),
        },
    }


def render(result: dict[str, Any]) -> str:
    n = result["pools"]
    after = f"+{result['after_window_s']:g} s"
    lines = [
        f"LLMPool operator scale bench: {n} pools created at once (kmock, drift interval "
        f"{result['drift_interval_s']:g} s)",
        f"  operator start-up (to watching)   {result['operator_startup_s']:8.2f} s",
        f"  {n} POSTs (concurrent)             {result['create_posts_s']:8.2f} s",
        f"  all pools converged               {result['converged_s']:8.2f} s",
        f"  operator idle (last request)      {result['idle_s']:8.2f} s",
        "",
        f"  {'API requests per pool':34}{'to converged':>14}{'to idle':>10}{after:>10}",
    ]
    verbs = sorted(
        set(result["per_pool_to_converged"])
        | set(result["per_pool_to_idle"])
        | set(result["per_pool_after_idle"])
    )
    for v in verbs:
        lines.append(
            f"    {v:32}{result['per_pool_to_converged'].get(v, 0):14.2f}"
            f"{result['per_pool_to_idle'].get(v, 0):10.2f}{result['per_pool_after_idle'].get(v, 0):10.2f}"
        )
    lines.append(
        f"    {'total':32}{result['requests_to_converged'] / n:14.2f}{result['requests_to_idle'] / n:10.2f}"
        f"{sum(result['per_pool_after_idle'].values()):10.2f}"
    )
    lines += ["", "  to idle, by verb and resource (per pool)"]
    for key, value in result["per_pool_by_resource_to_idle"].items():
        lines.append(f"    {key:40}{value:8.2f}")
    rss = result["rss_mib"]
    lines += [
        "",
        f"  operator RSS, MiB: start {rss['start']}  converged {rss['converged']}  idle {rss['idle']}"
        f"  end {rss['end']}  peak {rss['peak']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--pools", type=int, default=100)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--drift-interval", type=float, default=30.0, help="the operator's timer interval (s)")
    p.add_argument("--quiet", type=float, default=2.0, help="seconds without requests that count as idle")
    p.add_argument("--after", type=float, default=15.0, help="seconds to keep counting after idle")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument(
        "--no-trim",
        action="store_true",
        help="keep kmock's whole request log live (its per-request cost then grows with the run)",
    )
    args = p.parse_args(argv)
    result = asyncio.run(bench(args))
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
