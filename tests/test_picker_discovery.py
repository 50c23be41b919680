"""llmpool.picker.discovery: static endpoints, the pod -> endpoint rules, and the real
``kubernetes`` client's list-then-watch against a small fake API server (aiohttp) that
serves lists and chunked JSON-lines watches of pods and InferencePools."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from llmpool.picker.discovery import (
    POOL_GROUP,
    POOL_PLURAL,
    POOL_VERSION,
    EndpointSource,
    PodSource,
    StaticSource,
    endpoints_from_pods,
    pod_is_routable,
    static_endpoints,
)
from llmpool.serving.datastore import Endpoint

NS = "llm"


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    terminating: bool = False,
    labels: dict[str, str] | None = None,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NS,
        "labels": {"app": "vllm"} if labels is None else labels,
    }
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": "Running"}
    if ip is not None:
        status["podIP"] = ip
    if conditions is None:
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
    status["conditions"] = conditions
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


def pool(name: str, selector: dict[str, str], ports: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": f"{POOL_GROUP}/{POOL_VERSION}",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": selector},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


# ---------------------------------------------------------------------------- static


def test_static_endpoints() -> None:
    eps = static_endpoints(" a:8000, 10.0.0.2:8001 ,http://b:9000,")
    assert [e.name for e in eps] == ["a:8000", "10.0.0.2:8001", "b:9000"]
    assert eps[0] == Endpoint(name="a:8000", url="http://a:8000", group="a:8000", rank=0, engine_label="0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:8000,b", "bad endpoint 'b': expected HOST:PORT"),
        ("a:8000,b:http", "bad endpoint 'b:http': expected HOST:PORT"),
        ("a:99999", "bad endpoint 'a:99999': expected HOST:PORT"),
        ("a:0", "bad endpoint 'a:0': expected HOST:PORT"),
        ("ftp://a:1", "bad endpoint 'ftp://a:1': expected HOST:PORT"),
        ("a:8000,b:1,a:8000", "duplicate endpoint 'a:8000'"),
        ("a:8000,http://a:8000", "duplicate endpoint 'http://a:8000'"),
        ("", "no endpoints in ''"),
        (" , ", "no endpoints in ' , '"),
    ],
)
def test_static_endpoints_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        static_endpoints(text)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_static_source_delivers_once_then_waits() -> None:
    src = StaticSource.from_text("a:1,b:2")
    seen: list[list[Endpoint]] = []

    async def main() -> None:
        assert not src.synced
        task = asyncio.create_task(src.run(seen.append))
        await asyncio.sleep(0.01)
        assert src.synced and [[e.name for e in s] for s in seen] == [["a:1", "b:2"]]
        assert not task.done()
        src.stop()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    with pytest.raises(ValueError, match="duplicate endpoint a:1"):
        StaticSource([Endpoint.parse("a:1"), Endpoint.parse("a:1")])
    _: EndpointSource = src  # both sources satisfy the protocol


# ---------------------------------------------------------------------------- pure rules


def test_routable_pods() -> None:
    assert pod_is_routable(pod("a"))
    assert not pod_is_routable(pod("a", ready=False))
    assert not pod_is_routable(pod("a", terminating=True))
    assert not pod_is_routable(pod("a", ip=None))
    assert not pod_is_routable(pod("a", ip=""))
    assert not pod_is_routable(pod("a", conditions=[]))  # no Ready condition yet
    assert not pod_is_routable(pod("a", conditions=[{"type": "ContainersReady", "status": "True"}]))
    assert not pod_is_routable(pod("a", conditions=[{"type": "Ready", "status": "Unknown"}]))
    assert not pod_is_routable({"metadata": {"name": "bare"}})
    assert not pod_is_routable({})


def test_endpoints_single_port() -> None:
    pods = [
        pod("vllm-b", "10.0.0.2"),
        pod("vllm-a", "10.0.0.1"),
        pod("vllm-c", "10.0.0.3", ready=False),
        pod("vllm-d", "10.0.0.4", terminating=True),
        pod("vllm-e", None),
    ]
    eps = endpoints_from_pods(pods, [8000], NS)
    assert eps == [
        Endpoint("10.0.0.1:8000", "http://10.0.0.1:8000", group=f"{NS}/vllm-a", rank=0, engine_label="0"),
        Endpoint("10.0.0.2:8000", "http://10.0.0.2:8000", group=f"{NS}/vllm-b", rank=0, engine_label="0"),
    ]


def test_endpoints_multi_port_ranks_and_order() -> None:
    pods = [pod("p-2", "10.0.0.2"), pod("p-10", "10.0.0.10"), pod("p-1", "10.0.0.1")]
    eps = endpoints_from_pods(pods, [8001, 8000, 8002], NS)
    # Sorted by pod name (as strings), then by rank = index in the target-port list.
    assert [(e.group, e.rank, e.engine_label, e.name) for e in eps] == [
        (f"{NS}/p-1", 0, "0", "10.0.0.1:8001"),
        (f"{NS}/p-1", 1, "1", "10.0.0.1:8000"),
        (f"{NS}/p-1", 2, "2", "10.0.0.1:8002"),
        (f"{NS}/p-10", 0, "0", "10.0.0.10:8001"),
        (f"{NS}/p-10", 1, "1", "10.0.0.10:8000"),
        (f"{NS}/p-10", 2, "2", "10.0.0.10:8002"),
        (f"{NS}/p-2", 0, "0", "10.0.0.2:8001"),
        (f"{NS}/p-2", 1, "1", "10.0.0.2:8000"),
        (f"{NS}/p-2", 2, "2", "10.0.0.2:8002"),
    ]
    assert all(e.url == f"http://{e.name}" for e in eps)
    # Deterministic whatever the input order.
    assert endpoints_from_pods(reversed(pods), [8001, 8000, 8002], NS) == eps


def test_endpoints_selector_ipv6_duplicates_and_empty() -> None:
    pods = [
        pod("a", "10.0.0.1", labels={"app": "vllm", "tier": "x"}),
        pod("b", "10.0.0.2", labels={"app": "other"}),
        pod("c", "fd00::5"),
        pod("d", "10.0.0.1"),  # the same IP as "a" (host network): kept once
        pod("e", "10.0.0.9", labels={}),
    ]
    eps = endpoints_from_pods(pods, [8000], NS, selector={"app": "vllm"})
    assert [(e.name, e.url, e.group) for e in eps] == [
        ("10.0.0.1:8000", "http://10.0.0.1:8000", f"{NS}/a"),
        ("[fd00::5]:8000", "http://[fd00::5]:8000", f"{NS}/c"),
    ]
    assert [e.name for e in endpoints_from_pods(pods, [8000], NS, selector={"app": "vllm", "tier": "x"})] == [
        "10.0.0.1:8000"
    ]
    assert len(endpoints_from_pods(pods, [8000], NS)) == 4  # no selector: every routable pod
    assert endpoints_from_pods(pods, [], NS) == []
    assert endpoints_from_pods([], [8000], NS) == []


def test_endpoints_from_v1pod_objects() -> None:
    from kubernetes import client

    def v1pod(name: str, ip: str | None, ready: str, deleting: bool = False) -> Any:
        return client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name,
                labels={"app": "vllm"},
                deletion_timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) if deleting else None,
            ),
            status=client.V1PodStatus(
                pod_ip=ip, conditions=[client.V1PodCondition(type="Ready", status=ready)]
            ),
        )

    pods = [
        v1pod("b", "10.0.0.2", "True"),
        v1pod("a", "10.0.0.1", "True"),
        v1pod("c", "10.0.0.3", "False"),
        v1pod("d", "10.0.0.4", "True", deleting=True),
        v1pod("e", None, "True"),
        client.V1Pod(),
    ]
    eps = endpoints_from_pods(pods, [8000, 8001], NS, selector={"app": "vllm"})
    assert [(e.name, e.group, e.rank) for e in eps] == [
        ("10.0.0.1:8000", f"{NS}/a", 0),
        ("10.0.0.1:8001", f"{NS}/a", 1),
        ("10.0.0.2:8000", f"{NS}/b", 0),
        ("10.0.0.2:8001", f"{NS}/b", 1),
    ]


def test_pod_source_arguments() -> None:
    api = object()  # never used: no thread is started
    with pytest.raises(ValueError, match="either a pool name or a selector"):
        PodSource(NS, api_client=api)
    with pytest.raises(ValueError, match="either a pool name or a selector"):
        PodSource(NS, pool="p", selector={"a": "b"}, ports=[1], api_client=api)
    with pytest.raises(ValueError, match="do not give ports"):
        PodSource(NS, pool="p", ports=[1], api_client=api)
    with pytest.raises(ValueError, match="ports: no target ports"):
        PodSource(NS, selector={"a": "b"}, api_client=api)
    with pytest.raises(ValueError, match="ports: port 1 listed twice"):
        PodSource(NS, selector={"a": "b"}, ports=[1, 1], api_client=api)
    with pytest.raises(ValueError, match="ports: bad port 0"):
        PodSource(NS, selector={"a": "b"}, ports=[0], api_client=api)
    with pytest.raises(ValueError, match="non-empty mapping"):
        PodSource(NS, selector={}, ports=[1], api_client=api)
    with pytest.raises(ValueError, match="namespace"):
        PodSource("", pool="p", api_client=api)
    src = PodSource(NS, selector={"app": "vllm"}, ports=[8000, 8001], api_client=api)
    assert (src.selector, src.ports, src.synced, src.endpoints) == ({"app": "vllm"}, (8000, 8001), False, [])


def test_kubeconfig_problems_are_one_line(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmpool.picker.discovery import kube_api_client

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match=r"^no Kubernetes credentials: ") as info:
        kube_api_client(str(tmp_path / "missing-kubeconfig"))
    assert "\n" not in str(info.value)
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
                "current-context": "x",
            }
        ),
        encoding="utf-8",
    )
    api = kube_api_client(str(cfg))
    assert api.configuration.host == "http://127.0.0.1:1"
    api.close()


# ---------------------------------------------------------------------------- fake API server

PODS = "pods"
POOLS = "inferencepools"


@dataclass
class FakeKube:
    """Pods and InferencePools of one namespace over HTTP: list, and watch as chunked JSON lines.

    Every change bumps a global resourceVersion and appends an event; a watch from
    ``resourceVersion=N`` streams the events after N (bookmark first), then waits for
    new ones until ``timeoutSeconds``. ``gone[kind]`` answers that many next watches
    with a 410 Gone ERROR event; ``fail[kind]`` answers that many next requests with a
    500; ``silent_put`` changes an object without an event (as if compacted away);
    ``kick()`` ends the open watches.
    """

    rv: int = 100
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {PODS: {}, POOLS: {}})
    events: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)
    gone: dict[str, int] = field(default_factory=lambda: {PODS: 0, POOLS: 0})
    fail: dict[str, int] = field(default_factory=lambda: {PODS: 0, POOLS: 0})
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    open_watches: int = 0
    _epoch: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: bool = False
    _runner: web.AppRunner | None = None

    def _bump(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        obj["metadata"].setdefault("namespace", NS)
        return obj

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        typ = "MODIFIED" if name in self.objects[kind] else "ADDED"
        obj = self._bump(kind, obj)
        self.objects[kind][name] = obj
        self.events.append((self.rv, kind, typ, obj))
        self._notify()

    def delete(self, kind: str, name: str) -> None:
        obj = self._bump(kind, self.objects[kind].pop(name))
        self.events.append((self.rv, kind, "DELETED", obj))
        self._notify()

    def silent_put(self, kind: str, obj: dict[str, Any]) -> None:
        obj = self._bump(kind, obj)
        self.objects[kind][obj["metadata"]["name"]] = obj

    def kick(self) -> None:
        self._epoch += 1
        self._notify()

    def count(self, kind: str, verb: str) -> int:
        return sum(1 for k, v, _ in self.requests if (k, v) == (kind, verb))

    @staticmethod
    def _selected(obj: dict[str, Any], query: Any) -> bool:
        labels = obj["metadata"].get("labels") or {}
        for term in filter(None, query.get("labelSelector", "").split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            key, _, value = term.partition("=")
            assert key == "metadata.name", key
            if obj["metadata"]["name"] != value:
                return False
        return True

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        assert request.match_info["ns"] == NS
        q = request.query
        watching = q.get("watch") in ("true", "True", "1")
        self.requests.append((kind, "watch" if watching else "list", dict(q)))
        if self.fail[kind]:
            self.fail[kind] -= 1
            return web.json_response({"kind": "Status", "code": 500, "message": "boom"}, status=500)
        if not watching:
            items = [o for o in self.objects[kind].values() if self._selected(o, q)]
            return web.json_response(
                {
                    "kind": "List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(event: dict[str, Any]) -> None:
            await resp.write(json.dumps(event).encode() + b"\n")

        if self.gone[kind]:
            self.gone[kind] -= 1
            status = {
                "kind": "Status",
                "status": "Failure",
                "reason": "Expired",
                "code": 410,
                "message": "too old",
            }
            await send({"type": "ERROR", "object": status})
            return resp
        since = int(q["resourceVersion"])
        deadline = time.monotonic() + float(q.get("timeoutSeconds", "30"))
        epoch = self._epoch
        self.open_watches += 1
        try:
            if q.get("allowWatchBookmarks") in ("true", "True"):
                await send(
                    {"type": "BOOKMARK", "object": {"kind": "X", "metadata": {"resourceVersion": str(since)}}}
                )
            while not self._closing and epoch == self._epoch:
                if request.transport is None or request.transport.is_closing():
                    break  # the client hung up
                for rv, k, typ, obj in self.events:
                    if rv > since and k == kind and self._selected(obj, q):
                        await send({"type": typ, "object": obj})
                    since = max(since, rv) if k == kind else since
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(left, 0.2))
        except (ConnectionResetError, RuntimeError):  # the client went away
            pass
        finally:
            self.open_watches -= 1
        return resp

    async def start(self) -> str:
        app = web.Application()

        async def pods(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, PODS)

        async def pools(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, POOLS)

        app.router.add_get("/api/v1/namespaces/{ns}/pods", pods)
        app.router.add_get(f"/apis/{POOL_GROUP}/{POOL_VERSION}/namespaces/{{ns}}/{POOL_PLURAL}", pools)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()


def api_client(url: str) -> Any:
    from kubernetes import client

    cfg = client.Configuration(host=url)
    cfg.retries = 0
    return client.ApiClient(cfg)


class Changes:
    """Collects on_change calls and lets the test wait for the next one."""

    def __init__(self) -> None:
        self.calls: list[list[Endpoint]] = []
        self._event = asyncio.Event()

    def __call__(self, endpoints: list[Endpoint]) -> None:
        self.calls.append(endpoints)
        self._event.set()

    @property
    def names(self) -> list[list[str]]:
        return [[e.name for e in c] for c in self.calls]

    async def wait(self, n: int, timeout: float = 1.5) -> list[str]:
        """Wait until ``n`` calls were seen; returns the names of the n-th one."""
        end = time.monotonic() + timeout
        while len(self.calls) < n:
            self._event.clear()
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"expected {n} on_change calls, got {self.names}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)
        return [e.name for e in self.calls[n - 1]]


async def until(cond: Callable[[], bool], timeout: float = 1.5) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def discovery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llmpool-discovery")]


async def stop_cleanly(src: PodSource, task: asyncio.Task[None]) -> float:
    t0 = time.monotonic()
    src.stop()
    await asyncio.wait_for(task, 1.5)
    elapsed = time.monotonic() - t0
    await until(lambda: not discovery_threads(), 1.0)
    return elapsed


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    assert not discovery_threads()


def test_selector_source_list_watch_and_gone() -> None:
    async def main() -> None:
        fake = FakeKube()
        fake.put(PODS, pod("vllm-a", "10.0.0.1"))
        fake.put(PODS, pod("vllm-b", "10.0.0.2", ready=False))
        fake.put(PODS, pod("other", "10.0.0.9", labels={"app": "other"}))
        url = await fake.start()
        src = PodSource(
            NS, selector={"app": "vllm"}, ports=[8000], api_client=api_client(url), watch_timeout_s=1
        )
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        try:
            assert await changes.wait(1) == ["10.0.0.1:8000"]  # the initial list
            assert src.synced and src.endpoints == changes.calls[0]
            lists = [q for k, v, q in fake.requests if (k, v) == (PODS, "list")]
            assert lists[0]["labelSelector"] == "app=vllm"
            await until(lambda: fake.open_watches == 1)
            watch_q = next(q for k, v, q in fake.requests if (k, v) == (PODS, "watch"))
            assert watch_q["allowWatchBookmarks"] == "true" and watch_q["timeoutSeconds"] == "1"
            assert watch_q["resourceVersion"] == str(fake.rv)

            fake.put(PODS, pod("vllm-b", "10.0.0.2"))  # becomes ready: added
            assert await changes.wait(2) == ["10.0.0.1:8000", "10.0.0.2:8000"]

            fake.put(PODS, pod("vllm-c", None, ready=False))  # pending pod: no change
            fake.put(PODS, pod("vllm-a", "10.0.0.1", terminating=True))  # terminating: removed
            assert await changes.wait(3) == ["10.0.0.2:8000"]
            fake.delete(PODS, "vllm-a")  # already gone from the set: no call
            fake.put(PODS, pod("vllm-c", "10.0.0.3"))
            assert await changes.wait(4) == ["10.0.0.2:8000", "10.0.0.3:8000"]
            assert len(changes.calls) == 4

            # A watch that expired (410 Gone) -> a fresh list, which sees a change whose
            # event the server no longer has.
            n_lists = fake.count(PODS, "list")
            fake.gone[PODS] = 1
            fake.silent_put(PODS, pod("vllm-d", "10.0.0.4"))
            fake.kick()
            assert await changes.wait(5) == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
            assert fake.count(PODS, "list") == n_lists + 1
            fake.put(PODS, pod("vllm-e", "10.0.0.5"))  # and watching goes on
            assert (await changes.wait(6))[-1] == "10.0.0.5:8000"
        finally:
            elapsed = await stop_cleanly(src, task)
            await fake.close()
        assert elapsed < 1.0

    asyncio.run(main())


def test_pool_source_follows_the_pool() -> None:
    async def main() -> None:
        fake = FakeKube()
        fake.put(POOLS, pool("llama", {"app": "a"}, [8000, 8001]))
        fake.put(POOLS, pool("another-pool", {"app": "b"}, [9000]))
        fake.put(PODS, pod("a-1", "10.0.1.1", labels={"app": "a"}))
        fake.put(PODS, pod("b-1", "10.0.2.1", labels={"app": "b"}))
        url = await fake.start()
        src = PodSource(NS, pool="llama", api_client=api_client(url), watch_timeout_s=1)
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        try:
            await changes.wait(1)
            assert [(e.name, e.group, e.rank, e.engine_label) for e in changes.calls[0]] == [
                ("10.0.1.1:8000", f"{NS}/a-1", 0, "0"),
                ("10.0.1.1:8001", f"{NS}/a-1", 1, "1"),
            ]
            assert src.selector == {"app": "a"} and src.ports == (8000, 8001)
            pool_q = next(q for k, v, q in fake.requests if (k, v) == (POOLS, "list"))
            assert pool_q["fieldSelector"] == "metadata.name=llama"
            pods_q = next(q for k, v, q in fake.requests if (k, v) == (PODS, "list"))
            assert "labelSelector" not in pods_q  # the whole namespace, filtered here
            await until(lambda: fake.open_watches == 2)

            fake.put(POOLS, pool("another-pool", {"app": "a"}, [1234]))  # not ours
            fake.put(POOLS, pool("llama", {"app": "b"}, [8000, 8001]))  # selector change
            assert await changes.wait(2) == ["10.0.2.1:8000", "10.0.2.1:8001"]
            fake.put(POOLS, pool("llama", {"app": "b"}, [7000]))  # ports change
            assert await changes.wait(3) == ["10.0.2.1:7000"]
            assert changes.calls[2][0].engine_label == "0"
            fake.put(PODS, pod("b-2", "10.0.2.2", labels={"app": "b"}))
            assert await changes.wait(4) == ["10.0.2.1:7000", "10.0.2.2:7000"]

            fake.put(POOLS, pool("llama", {}, [7000]))  # invalid pool: no endpoints
            assert await changes.wait(5) == []
            fake.delete(POOLS, "llama")  # still none: no call
            fake.put(POOLS, pool("llama", {"app": "a"}, [8000]))  # re-created
            assert await changes.wait(6) == ["10.0.1.1:8000"]

            n_lists = fake.count(POOLS, "list")  # 410 on the pool watch -> relist the pool
            fake.gone[POOLS] = 1
            fake.silent_put(POOLS, pool("llama", {"app": "b"}, [8000]))
            fake.kick()
            assert await changes.wait(7) == ["10.0.2.1:8000", "10.0.2.2:8000"]
            assert fake.count(POOLS, "list") == n_lists + 1
            assert len(changes.calls) == 7
        finally:
            assert await stop_cleanly(src, task) < 1.0
            await fake.close()

    asyncio.run(main())


def test_pool_missing_at_start_gives_an_empty_synced_list() -> None:
    async def main() -> None:
        fake = FakeKube()
        fake.put(PODS, pod("a-1", "10.0.1.1", labels={"app": "a"}))
        url = await fake.start()
        src = PodSource(NS, pool="llama", api_client=api_client(url), watch_timeout_s=1)
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        try:
            assert await changes.wait(1) == []
            assert src.synced
            fake.put(POOLS, pool("llama", {"app": "a"}, [8000]))
            assert await changes.wait(2) == ["10.0.1.1:8000"]
        finally:
            await stop_cleanly(src, task)
            await fake.close()

    asyncio.run(main())


def test_errors_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmpool.picker.discovery")

    async def main() -> None:
        fake = FakeKube()
        fake.put(PODS, pod("a", "10.0.0.1"))
        fake.fail[PODS] = 2  # the first list and its first retry fail
        url = await fake.start()
        src = PodSource(
            NS, selector={"app": "vllm"}, ports=[8000], api_client=api_client(url), watch_timeout_s=1
        )
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        try:
            assert not src.synced
            assert await changes.wait(1) == ["10.0.0.1:8000"]
            assert fake.count(PODS, "list") == 3
            await until(lambda: fake.open_watches == 1)
            fake.fail[PODS] = 1  # a failing watch: watched again from the same version, no relist
            fake.kick()
            fake.put(PODS, pod("b", "10.0.0.2"))
            assert await changes.wait(2) == ["10.0.0.1:8000", "10.0.0.2:8000"]
            assert fake.count(PODS, "list") == 3
        finally:
            await stop_cleanly(src, task)
            await fake.close()

    asyncio.run(main())
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "llmpool.picker.discovery"
    ]
    assert warnings[:2] == [
        "pod discovery: pods: HTTP 500 Internal Server Error; retrying in 0.2s",
        "pod discovery: pods: HTTP 500 Internal Server Error; retrying in 0.4s",
    ]
    assert warnings[2] == "pod discovery: pods: HTTP 500 Internal Server Error; retrying in 0.2s"
    assert all("\n" not in w for w in warnings)


def test_unreachable_server_backs_off_and_stops_quickly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llmpool.picker.discovery")

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def main() -> None:
        src = PodSource(
            NS,
            pool="llama",
            api_client=api_client(url),
            watch_timeout_s=1,
            backoff_max_s=0.4,
        )
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        await asyncio.sleep(0.8)
        assert not src.synced and changes.calls == []
        assert await stop_cleanly(src, task) < 1.0

    asyncio.run(main())
    mine = [r.getMessage() for r in caplog.records if r.name == "llmpool.picker.discovery"]
    assert all("Connection refused" in m and "\n" not in m for m in mine), mine
    delays = [m.rsplit(" ", 1)[-1] for m in mine]
    assert delays and set(delays) <= {"0.2s", "0.4s"}  # capped at backoff_max_s


def test_cancelling_run_stops_the_threads() -> None:
    async def main() -> None:
        fake = FakeKube()
        fake.put(PODS, pod("a", "10.0.0.1"))
        url = await fake.start()
        src = PodSource(
            NS, selector={"app": "vllm"}, ports=[8000], api_client=api_client(url), watch_timeout_s=1
        )
        changes = Changes()
        task = asyncio.create_task(src.run(changes))
        await changes.wait(1)
        await until(lambda: fake.open_watches == 1)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not discovery_threads(), 1.0)
        assert time.monotonic() - t0 < 1.0
        await fake.close()

    asyncio.run(main())
