"""The LLMPool operator under the real Kopf runtime against kmock (no kube-apiserver here).

Kopf runs in a task on the test's event loop (``kopf.operator`` with the registry from
``build_registry``); kmock serves on the same loop, and the operator's blocking
``kubernetes`` client calls run in threads. Assertions use kmock's stored objects and its
recorded requests (which child got a PATCH, which Event got POSTed).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import kopf
import kubernetes
import pytest
import yaml

from llmpool_operator.handlers import (
    LAST_APPLIED,
    OperatorConfig,
    OperatorMetrics,
    build_registry,
    compute_status,
    configure_settings,
    is_subset,
    removed_fields,
    with_last_applied,
)
from llmpool_operator.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def _load_support() -> ModuleType:
    name = "llmpool_tests_operator_kmock_support"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("kmock_support.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


support = _load_support()
StampingEmulator = support.StampingEmulator

NS = "default"
POOL = "demo"
POOL_PATH = f"/apis/llmpool.io/v1alpha1/namespaces/{NS}/llmpools/{POOL}"
CHILD_PATHS = {
    ("ServiceAccount", "demo-picker"): f"/api/v1/namespaces/{NS}/serviceaccounts/demo-picker",
    ("Role", "demo-picker"): f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles/demo-picker",
    (
        "RoleBinding",
        "demo-picker",
    ): f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/demo-picker",
    ("ConfigMap", "demo-picker"): f"/api/v1/namespaces/{NS}/configmaps/demo-picker",
    ("Deployment", "demo-picker"): f"/apis/apps/v1/namespaces/{NS}/deployments/demo-picker",
    ("Service", "demo-picker"): f"/api/v1/namespaces/{NS}/services/demo-picker",
    ("Deployment", "demo-engine"): f"/apis/apps/v1/namespaces/{NS}/deployments/demo-engine",
    ("Service", "demo-engine"): f"/api/v1/namespaces/{NS}/services/demo-engine",
    ("InferencePool", "demo"): f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/demo",
}
RESOURCES = {
    "ServiceAccount": "v1/serviceaccounts",
    "Role": "rbac.authorization.k8s.io/v1/roles",
    "RoleBinding": "rbac.authorization.k8s.io/v1/rolebindings",
    "ConfigMap": "v1/configmaps",
    "Deployment": "apps/v1/deployments",
    "Service": "v1/services",
    "InferencePool": "inference.networking.k8s.io/v1/inferencepools",
}


def pool_body(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "tiny", "source": {"huggingFace": "org/tiny"}},
        "accelerator": {"kind": "none"},
        "replicas": 2,
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "llmpool.io/v1alpha1",
        "kind": "LLMPool",
        "metadata": {"name": POOL, "namespace": NS},
        "spec": spec,
    }


# --- pure pieces -------------------------------------------------------------------------


def test_removed_fields_are_nulls_for_map_keys_only() -> None:
    last = {"spec": {"nodeSelector": {"a": "1", "b": "2"}, "args": ["x", "y"], "gone": 1}, "metadata": {}}
    want = {"spec": {"nodeSelector": {"a": "1"}, "args": ["x"]}, "metadata": {}}
    assert removed_fields(last, want) == {"spec": {"nodeSelector": {"b": None}, "gone": None}}
    assert removed_fields({}, want) == {} and removed_fields(want, want) == {}
    svc = {"kind": "Service", "metadata": {"name": "s", "labels": {"k": "v"}}, "spec": {"a": 1}}
    child = with_last_applied(svc)
    recorded = json.loads(child["metadata"]["annotations"][LAST_APPLIED])
    assert recorded == {"metadata": {"labels": {"k": "v"}}, "spec": {"a": 1}}


def test_is_subset_ignores_server_defaults_and_normalised_quantities() -> None:
    want = {"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1000m"}}, "env": []}]}}
    have = {
        "spec": {
            "containers": [
                {"name": "a", "resources": {"limits": {"cpu": "1"}}, "terminationMessagePath": "/x"}
            ]
        },
        "status": {},
    }
    assert is_subset(want, have)
    assert not is_subset({"spec": {"containers": [{"name": "b"}]}}, have)
    assert not is_subset({"spec": {"containers": []}}, have)


def test_compute_status_phases_and_conditions() -> None:
    spec = parse_spec(pool_body(engine={"dataParallelSize": 2})["spec"])
    engine = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 3, "readyReplicas": 2, "updatedReplicas": 2},
    }
    st = compute_status(old_status={}, generation=4, spec=spec, engine=engine, selector="a=b", error=None)
    assert st["phase"] == "Ready" and st["endpoints"] == 4 and st["readyReplicas"] == 2
    assert st["effectivePolicy"] == "impact" and st["selector"] == "a=b" and st["observedGeneration"] == 4
    conds = {c["type"]: c for c in st["conditions"]}
    assert set(conds) == {"Ready", "Progressing", "Degraded", "RoutingConfigured"}
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    assert all(
        {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= set(c)
        for c in conds.values()
    )
    # the transition time sticks while the status does not change
    again = compute_status(old_status=st, generation=4, spec=spec, engine=engine, selector="a=b", error=None)
    assert again["conditions"] == st["conditions"]
    pending = compute_status(old_status={}, generation=1, spec=spec, engine={}, selector=None, error=None)
    assert pending["phase"] == "Pending"
    rolling = dict(engine, status={"observedGeneration": 3, "readyReplicas": 1, "updatedReplicas": 1})
    assert (
        compute_status(old_status={}, generation=1, spec=spec, engine=rolling, selector=None, error=None)[
            "phase"
        ]
        == "Progressing"
    )
    bad = compute_status(
        old_status=st, generation=5, spec=None, engine=None, selector="a=b", error="spec.x: bad"
    )
    assert bad["phase"] == "Degraded" and bad["lastError"] == "spec.x: bad"
    assert {c["type"]: c["status"] for c in bad["conditions"]}["Degraded"] == "True"


# --- manifests and scripts ------------------------------------------------------------------


def _operator_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    # kubectl apply -f manifests/ (CRDs, namespace, RBAC, Deployment), then manifests/peering/.
    manifests = REPO / "manifests"
    paths = sorted(manifests.glob("*.yaml")) + sorted((manifests / "peering").glob("*.yaml"))
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_operator_manifests_are_valid() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _operator_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("kopf.dev/"):
            continue  # a custom object (KopfPeering); its CRD is validated here
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for need in [
        ("llmpool.io", "llmpools"),
        ("llmpool.io", "llmpools/status"),
        ("llmpool.io", "llmpools/scale"),
        ("apps", "deployments"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("", "configmaps"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("inference.networking.k8s.io", "inferencepools"),
        ("", "events"),
        ("", "pods"),  # the picker's Role grants it; RBAC escalation rule
    ]:
        assert need in granted, need
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert "--peering" in " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])


def test_kind_script_parses() -> None:
    script = REPO / "tests" / "e2e" / "kind" / "run.sh"
    assert script.exists()
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_main_parses_flags() -> None:
    from llmpool_operator.main import build_parser

    args = build_parser().parse_args(["-n", "llm", "--peering", "llmpool", "--metrics-port", "0"])
    assert args.namespace == ["llm"] and args.peering == "llmpool" and not args.standalone
    args = build_parser().parse_args(["--all-namespaces", "--log-format", "json"])
    assert args.all_namespaces and args.log_format == "json"


# --- the operator against kmock --------------------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kmock: Any) -> Path:
    path = Path(support.write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"), NS))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@contextlib.asynccontextmanager
async def running_operator(
    kmock: Any, *, drift_interval: float = 60.0, metrics: OperatorMetrics | None = None
) -> AsyncIterator[OperatorMetrics]:
    metrics = metrics or OperatorMetrics()
    settings = kopf.OperatorSettings()
    configure_settings(settings, posting=True, watch_timeout=10)
    registry = build_registry(
        OperatorConfig(picker_image="llmpool/llmpool:test", drift_interval=drift_interval, drift_idle=0.2),
        metrics,
    )
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            namespaces=[NS],
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        await wait_for(lambda: _watching(kmock) or task.done(), what="the operator to watch llmpools")
        if task.done():
            task.result()
        yield metrics
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def timer_runs(metrics: OperatorMetrics) -> float:
    """Reconciliations the drift timer has run, whatever their result."""
    return sum(
        metrics.registry.get_sample_value(
            "llmpool_operator_reconciles_total", {"trigger": "timer", "result": r}
        )
        or 0.0
        for r in ("ok", "degraded", "error")
    )


def _watching(kmock: Any) -> bool:
    return any(
        r.method is not None and "llmpools" in r.url.path and r.params.get("watch") for r in list(kmock)
    )


async def wait_for(cond: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if cond():
                return
        except (KeyError, LookupError, TypeError):
            pass
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def api(kmock: Any, method: str, path: str, body: Any = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, str(kmock.url).rstrip("/") + path, json=body, headers=headers) as resp,
    ):
        assert resp.status < 300, (method, path, resp.status, await resp.text())
        data = await resp.json(content_type=None)
        return data if isinstance(data, dict) else {}


def stored(kmock: Any, kind: str, name: str) -> dict[str, Any] | None:
    import kmock as kmock_lib

    key = (kmock_lib.resource(RESOURCES[kind]), NS, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return dict(kmock.objects[key].raw)


def pool_status(kmock: Any) -> dict[str, Any]:
    import kmock as kmock_lib

    return dict(kmock.objects[kmock_lib.resource(support.LLMPOOLS), NS, POOL].raw.get("status") or {})


def writes(kmock: Any, method: str, since: int = 0) -> list[str]:
    """Paths of recorded requests of one method to our children, after request #since."""
    child_paths = set(CHILD_PATHS.values())
    out = []
    for r in list(kmock)[since:]:
        if not str(r.method).upper().endswith(method):
            continue
        path = r.url.path
        if method == "POST" and isinstance(r.data, dict):  # creation goes to the collection
            path = f"{path}/{(r.data.get('metadata') or {}).get('name')}"
        if path in child_paths:
            out.append(path)
    return out


async def create_pool_and_settle(kmock: Any, body: dict[str, Any]) -> dict[str, Any]:
    created = await api(kmock, "POST", f"/apis/llmpool.io/v1alpha1/namespaces/{NS}/llmpools", body)
    await wait_for(
        lambda: all(stored(kmock, k, n) for k, n in CHILD_PATHS) and pool_status(kmock).get("phase"),
        what="all children and a status",
    )
    return created


pytestmark_kmock = pytest.mark.kmock(cls=StampingEmulator)


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_create_makes_all_children_with_owner_references(kmock: Any, kubeconfig: Path) -> None:
    support.register_crds(kmock)
    metrics = OperatorMetrics()
    async with running_operator(kmock, metrics=metrics):
        created = await create_pool_and_settle(kmock, pool_body())
        uid = created["metadata"]["uid"]
        for kind, name in CHILD_PATHS:
            child = stored(kmock, kind, name)
            assert child is not None, (kind, name)
            refs = child["metadata"]["ownerReferences"]
            assert [r["uid"] for r in refs] == [uid], (kind, name)
            assert refs[0]["kind"] == "LLMPool" and refs[0]["apiVersion"] == "llmpool.io/v1alpha1"
            assert refs[0]["controller"] is (kind != "InferencePool"), kind
        ipool = stored(kmock, "InferencePool", "demo")
        assert ipool is not None and "status" not in ipool  # never writes status.parents
        engine = stored(kmock, "Deployment", "demo-engine")
        assert engine is not None and engine["spec"]["replicas"] == 2
        await wait_for(lambda: pool_status(kmock).get("selector"), what="status.selector")
        st = pool_status(kmock)
        assert st["phase"] == "Pending" and st["replicas"] == 2 and st["readyReplicas"] == 0
        assert st["effectivePolicy"] == "impact" and st["observedGeneration"] == 1
        assert "llmpool.io/pool=demo" in st["selector"]
        assert {c["type"] for c in st["conditions"]} == {
            "Ready",
            "Progressing",
            "Degraded",
            "RoutingConfigured",
        }
        # the Deployment reports ready → the timer (or the next reconcile) turns the pool Ready
        assert len(writes(kmock, "POST")) == 9
        created_total = sum(
            s.value
            for m in metrics.children.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels.get("action") == "created"
        )
        assert created_total == 9


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_routing_edit_patches_only_the_configmap_and_engine_edit_only_the_engine(
    kmock: Any, kubeconfig: Path
) -> None:
    support.register_crds(kmock)
    async with running_operator(kmock):
        await create_pool_and_settle(kmock, pool_body())
        await asyncio.sleep(0.3)
        assert writes(kmock, "PATCH") == []  # no no-op patches after creation

        mark = len(list(kmock))
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"routing": {"saturation": {"queueThreshold": 9}}}})
        await wait_for(lambda: writes(kmock, "PATCH", mark), what="a child patch")
        await wait_for(lambda: pool_status(kmock).get("observedGeneration") == 2, what="observedGeneration 2")
        assert writes(kmock, "PATCH", mark) == [CHILD_PATHS["ConfigMap", "demo-picker"]]
        cm = stored(kmock, "ConfigMap", "demo-picker")
        assert cm is not None and "9" in yaml.safe_dump(cm["data"])

        mark = len(list(kmock))
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"engine": {"maxNumSeqs": 7}}})
        await wait_for(lambda: writes(kmock, "PATCH", mark), what="a child patch")
        await wait_for(lambda: pool_status(kmock).get("observedGeneration") == 3, what="observedGeneration 3")
        assert writes(kmock, "PATCH", mark) == [CHILD_PATHS["Deployment", "demo-engine"]]
        engine = stored(kmock, "Deployment", "demo-engine")
        assert engine is not None and "7" in " ".join(
            engine["spec"]["template"]["spec"]["containers"][0]["args"]
        )

        # an autoscaler writing spec.replicas through the scale subresource: followed, not fought
        mark = len(list(kmock))
        await api(kmock, "PATCH", POOL_PATH + "/scale", {"spec": {"replicas": 3}})
        await wait_for(lambda: (stored(kmock, "Deployment", "demo-engine") or {})["spec"]["replicas"] == 3)
        assert writes(kmock, "PATCH", mark) == [CHILD_PATHS["Deployment", "demo-engine"]]


@pytest.mark.asyncio
@pytestmark_kmock
async def test_a_field_dropped_from_the_spec_is_deleted_from_the_child(kmock: Any, kubeconfig: Path) -> None:
    support.register_crds(kmock)
    async with running_operator(kmock):
        await create_pool_and_settle(kmock, pool_body())

        def pod_spec() -> dict[str, Any]:
            dep = stored(kmock, "Deployment", "demo-engine") or {}
            return dict(dep["spec"]["template"]["spec"])

        await api(
            kmock, "PATCH", POOL_PATH, {"spec": {"accelerator": {"nodeSelector": {"pool": "a", "zone": "z"}}}}
        )
        await wait_for(
            lambda: pod_spec().get("nodeSelector") == {"pool": "a", "zone": "z"}, what="nodeSelector"
        )
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"accelerator": {"nodeSelector": {"zone": None}}}})
        await wait_for(lambda: pod_spec().get("nodeSelector") == {"pool": "a"}, what="one key dropped")
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"accelerator": {"nodeSelector": None}}})
        await wait_for(lambda: "nodeSelector" not in pod_spec(), what="nodeSelector dropped")
        mark = len(list(kmock))
        await wait_for(lambda: pool_status(kmock).get("observedGeneration") == 4, what="observedGeneration 4")
        await asyncio.sleep(0.3)
        assert writes(kmock, "PATCH", mark) == []  # converged: no patch loop on the pruned field


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_timer_recreates_a_deleted_child_and_reverts_a_hand_edit(kmock: Any, kubeconfig: Path) -> None:
    support.register_crds(kmock)
    async with running_operator(kmock, drift_interval=0.5):
        await create_pool_and_settle(kmock, pool_body())
        svc = CHILD_PATHS["Service", "demo-picker"]
        await api(kmock, "DELETE", svc)
        assert stored(kmock, "Service", "demo-picker") is None
        await wait_for(lambda: stored(kmock, "Service", "demo-picker"), what="the Service to come back")

        picker = CHILD_PATHS["Deployment", "demo-picker"]
        hand_edit = {"spec": {"template": {"spec": {"containers": [{"name": "picker", "image": "evil:1"}]}}}}
        await api(kmock, "PATCH", picker, hand_edit)

        def picker_image() -> str:
            dep = stored(kmock, "Deployment", "demo-picker") or {}
            return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])

        await wait_for(lambda: picker_image() == "llmpool/llmpool:test", what="the hand edit to be reverted")
        dep = stored(kmock, "Deployment", "demo-picker")
        assert dep is not None and len(dep["spec"]["template"]["spec"]["containers"][0]["args"]) > 3

        # the vLLM Deployment reports ready replicas → the pool turns Ready with endpoints
        engine = CHILD_PATHS["Deployment", "demo-engine"]
        await api(
            kmock,
            "PATCH",
            engine,
            {"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}},
        )
        await wait_for(lambda: pool_status(kmock).get("phase") == "Ready", what="phase Ready")
        assert pool_status(kmock)["endpoints"] == 2


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_invalid_spec_degrades_without_applying_anything(kmock: Any, kubeconfig: Path) -> None:
    support.register_crds(kmock)
    async with running_operator(kmock):
        bad = pool_body(engine={"tensorParallelSize": 0})
        await api(kmock, "POST", f"/apis/llmpool.io/v1alpha1/namespaces/{NS}/llmpools", bad)
        await wait_for(lambda: pool_status(kmock).get("phase") == "Degraded", what="phase Degraded")
        st = pool_status(kmock)
        assert "tensorParallelSize" in st["lastError"]
        cond = {c["type"]: c for c in st["conditions"]}["Degraded"]
        assert cond["status"] == "True" and cond["reason"] == "InvalidSpec"
        await wait_for(
            lambda: any(
                str(r.method).upper().endswith("POST")
                and r.url.path.endswith("/events")
                and "InvalidSpec" in r.text
                for r in list(kmock)
            ),
            what="a warning Event",
        )
        assert writes(kmock, "POST") == [] and writes(kmock, "PATCH") == []

        # fixing the spec recovers
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"engine": {"tensorParallelSize": 1}}})
        await wait_for(lambda: pool_status(kmock).get("phase") == "Pending", what="recovery")
        assert pool_status(kmock).get("lastError") is None
        assert len(writes(kmock, "POST")) == 9


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_engine_readiness_reaches_the_pool_without_the_timer(kmock: Any, kubeconfig: Path) -> None:
    support.register_crds(kmock)
    async with running_operator(kmock, drift_interval=300.0) as metrics:
        await create_pool_and_settle(kmock, pool_body())
        await wait_for(lambda: pool_status(kmock).get("observedGeneration") == 1, what="observedGeneration 1")
        assert pool_status(kmock)["phase"] == "Pending"
        # let the timer's first run (initial delay 0.2 s) pass; the next is 300 s away
        await wait_for(lambda: timer_runs(metrics) == 1, what="the drift timer's first run")
        engine = CHILD_PATHS["Deployment", "demo-engine"]
        mark = len(list(kmock))

        await api(
            kmock,
            "PATCH",
            engine,
            {"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}},
        )
        await wait_for(lambda: pool_status(kmock).get("readyReplicas") == 1, timeout=3, what="1 ready")
        assert pool_status(kmock)["phase"] == "Progressing"

        await api(
            kmock,
            "PATCH",
            engine,
            {"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}},
        )
        await wait_for(lambda: pool_status(kmock).get("phase") == "Ready", timeout=3, what="phase Ready")
        st = pool_status(kmock)
        assert st["readyReplicas"] == 2 and st["endpoints"] == 2 and st["observedGeneration"] == 1
        ready = {c["type"]: c for c in st["conditions"]}["Ready"]
        assert ready["status"] == "True" and ready["reason"] == "ReplicasReady"
        # no child was touched, and the Deployment itself was never written by the operator
        assert writes(kmock, "PATCH", mark) == [engine, engine]  # the test's own two status patches

        # the same readiness again (e.g. a label edit on the Deployment): no status write
        await asyncio.sleep(0.3)
        mark = len(list(kmock))
        await api(kmock, "PATCH", engine, {"metadata": {"annotations": {"x": "y"}}})
        await asyncio.sleep(0.5)
        status_writes = [
            r
            for r in list(kmock)[mark:]
            if str(r.method).upper().endswith("PATCH") and r.url.path == POOL_PATH + "/status"
        ]
        assert status_writes == []
        assert timer_runs(metrics) == 1  # every readiness change above came through the watch


# --- the operator as a process: peering, liveness, metrics ---------------------------------

PEERING = "llmpool-operator"
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"


def _start_operator_process(
    kubeconfig: Path, *, priority: int, metrics_port: int, liveness_port: int, log: Path
) -> subprocess.Popen[bytes]:
    """``llmpool operator`` exactly as the chart runs it (cluster-wide, peering), in a process."""
    flags = ["--all-namespaces", "--peering", PEERING, "--priority", str(priority)]
    flags += ["--picker-image", "llmpool/llmpool:test"]
    flags += ["--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port)]
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc: subprocess.Popen[bytes] = support.start_operator_process(kubeconfig, flags, out)
    return proc


async def _http_get(url: str) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return 0, ""


def _reconciles(exposition: str) -> float:
    """``llmpool_operator_reconciles_total`` summed over its labels, from a metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(exposition)
        for s in fam.samples
        if s.name == "llmpool_operator_reconciles_total"
    )


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_peering_one_active_replica_and_failover_with_liveness_and_metrics(
    kmock: Any, kubeconfig: Path, tmp_path: Path
) -> None:
    """Two ``llmpool operator`` processes peer through the ClusterKopfPeering, as the chart
    deploys them: only the higher priority reconciles; when it exits, the other takes over.
    Both serve /healthz and their Prometheus metrics while they run."""
    import signal

    from llmpool.children import free_port

    support.register_crds(kmock)
    kmock.resources[PEERINGS] = support.kmock.ResourceInfo(
        kind="ClusterKopfPeering",
        namespaced=False,
        verbs={"list", "watch", "get", "create", "update", "patch", "delete"},
    )
    await api(
        kmock,
        "POST",
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}},
    )

    def peers() -> dict[str, Any]:
        obj = kmock.objects[support.kmock.resource(PEERINGS), None, PEERING]
        return dict(obj.raw.get("status") or {})

    ports = {name: (free_port(), free_port()) for name in ("high", "low")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, prio in (("high", 200), ("low", 100)):
            procs[name] = _start_operator_process(
                kubeconfig,
                priority=prio,
                metrics_port=ports[name][0],
                liveness_port=ports[name][1],
                log=tmp_path / f"{name}.log",
            )

        async def status(name: str, what: str) -> tuple[int, str]:
            port = ports[name][0] if what == "metrics" else ports[name][1]
            return await _http_get(f"http://127.0.0.1:{port}/{'metrics' if what == 'metrics' else 'healthz'}")

        async def both_up() -> bool:
            for name, proc in procs.items():
                log = (tmp_path / f"{name}.log").read_text()
                assert proc.poll() is None, f"operator {name} exited: {log}"
                if (await status(name, "healthz"))[0] != 200:
                    return False
            return len(peers()) == 2

        deadline = asyncio.get_running_loop().time() + 60
        while not await both_up():
            assert asyncio.get_running_loop().time() < deadline, "operators did not come up and peer"
            await asyncio.sleep(0.2)
        assert sorted(p["priority"] for p in peers().values()) == [100, 200]
        await asyncio.sleep(1.0)  # the low-priority one has seen the high one and paused

        await create_pool_and_settle(kmock, pool_body())
        await wait_for(lambda: pool_status(kmock).get("observedGeneration") == 1, what="observedGeneration 1")
        high = _reconciles((await status("high", "metrics"))[1])
        low = _reconciles((await status("low", "metrics"))[1])
        assert high >= 1 and low == 0, (high, low)

        # the active replica leaves (a rolling update, a node drain): the standby takes over
        procs["high"].send_signal(signal.SIGTERM)
        await asyncio.to_thread(procs["high"].wait, 30)
        await wait_for(lambda: len(peers()) == 1, timeout=15, what="the leaver to drop out of the peering")
        assert (await status("low", "healthz"))[0] == 200
        await api(kmock, "PATCH", POOL_PATH, {"spec": {"routing": {"saturation": {"queueThreshold": 9}}}})
        await wait_for(
            lambda: pool_status(kmock).get("observedGeneration") == 2,
            timeout=20,
            what="the standby's reconcile",
        )
        cm = stored(kmock, "ConfigMap", "demo-picker")
        assert cm is not None and "9" in yaml.safe_dump(cm["data"])
        assert _reconciles((await status("low", "metrics"))[1]) >= 1
    finally:
        for proc in procs.values():
            await support.stop_operator_process(proc)


def _admission_review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    gvk = {"group": "llmpool.io", "version": "v1alpha1", "kind": "LLMPool"}
    gvr = {"group": "llmpool.io", "version": "v1alpha1", "resource": "llmpools"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d5e8a42-7b1c-4f55-9d1e-1c9f6f0c2a11",
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


@pytest.mark.asyncio
@pytest.mark.slow
@pytestmark_kmock
async def test_validating_webhook_over_https_refuses_a_bad_spec_with_the_reconcile_message(
    kmock: Any, kubeconfig: Path, tmp_path: Path
) -> None:
    """``llmpool operator --webhook-port``: the API server's AdmissionReview over HTTPS gets
    the spec model's one-line error for a bad spec, and an allow for a good one."""
    import ssl

    from llmpool.children import free_port
    from llmpool.picker.server import self_signed_credentials

    support.register_crds(kmock)
    cert, key = self_signed_credentials()  # SAN localhost
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    port, metrics_port = free_port(), free_port()
    flags = ["-n", NS, "--liveness-port", "0", "--metrics-port", str(metrics_port)]
    flags += ["--webhook-port", str(port)]
    flags += ["--webhook-cert", str(tmp_path / "tls.crt"), "--webhook-key", str(tmp_path / "tls.key")]
    with open(tmp_path / "operator.log", "wb") as log:
        proc = support.start_operator_process(kubeconfig, flags, log)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    url = f"https://localhost:{port}/validate-spec"

    async def review(obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=_admission_review(obj), ssl=ctx) as resp,
        ):
            return resp.status, dict(await resp.json())

    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            try:
                status, good = await review(pool_body())
                break
            except aiohttp.ClientConnectorError:
                assert asyncio.get_running_loop().time() < deadline, "the webhook never listened"
                await asyncio.sleep(0.2)
        assert status == 200 and good["response"]["allowed"] is True
        assert good["response"]["uid"] == _admission_review(pool_body())["request"]["uid"]

        status, bad = await review(pool_body(engine={"tensorParallelSize": 0}))
        assert status == 200 and bad["response"]["allowed"] is False
        assert bad["response"]["status"]["code"] == 422
        message = bad["response"]["status"]["message"]
        assert message.startswith("spec.engine.tensorParallelSize:") and "\n" not in message

        # plain HTTP is refused: the webhook speaks TLS only
        with pytest.raises(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://localhost:{port}/validate-spec", json={}) as resp,
            ):
                await resp.read()

        _, page = await _http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        from prometheus_client.parser import text_string_to_metric_families

        counts = {
            s.labels["result"]: s.value
            for fam in text_string_to_metric_families(page)
            for s in fam.samples
            if s.name == "llmpool_operator_admission_reviews_total"
        }
        assert counts == {"allowed": 1.0, "denied": 1.0}
    finally:
        await support.stop_operator_process(proc)


def test_webhook_port_needs_certificate_files() -> None:
    from llmpool_operator.main import run

    with pytest.raises(SystemExit) as exc:
        run(["--webhook-port", "9443"])
    assert exc.value.code == 2
