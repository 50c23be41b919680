"""Pure builders: an LLMPool's spec -> the Kubernetes manifests of its children.

No I/O and no kopf here; the runtime applies what :func:`build_children` returns, in
order, and adds ownerReferences itself. The split that matters for operators:

* routing fields (``spec.routing`` except ``failureMode``) reach only the picker's
  ConfigMap, which the picker hot-reloads -- no pod of either Deployment restarts;
* ``spec.routing.failureMode`` reaches only the InferencePool;
* engine, model and accelerator fields reach the vLLM Deployment's pod template and roll it;
* the engine's pod template never carries routing-derived data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from llmpool import __version__
from llmpool_operator.spec import AcceleratorKind, PoolSpec, PredictorModelRef

__all__ = [
    "CONFIG_DIR",
    "CONFIG_FILE",
    "DEFAULT_PICKER_IMAGE",
    "GRPC_PORT",
    "HEALTH_PORT",
    "INFERENCE_GROUP",
    "METRICS_PORT",
    "PREDICTOR_DIR",
    "Component",
    "PoolRef",
    "build_children",
    "child_name",
    "common_labels",
    "picker_config",
    "picker_config_yaml",
    "selector_labels",
    "spec_hash",
]

#: The picker image used when ``spec.picker.image`` is unset (the runtime may override it):
#: built from ``extender/Dockerfile`` (docs/images.md), tagged with the project's version.
DEFAULT_PICKER_IMAGE = f"llmpool/llmpool-picker:{__version__}"

GRPC_PORT = 9002
HEALTH_PORT = 9003
METRICS_PORT = 9090
CONFIG_DIR = "/etc/llmpool"
CONFIG_FILE = "config.yaml"
PREDICTOR_DIR = "/var/lib/llmpool/predictors"
INFERENCE_GROUP = "inference.networking.k8s.io"

_MODEL_DIR = "/models"
_HF_HOME = "/var/cache/huggingface"
# Host paths the vllm-ascend installation guide mounts into its container (read-only);
# the NPU devices themselves come from the Ascend device plugin.
_ASCEND_HOST_MOUNTS: tuple[tuple[str, str], ...] = (
    ("ascend-dcmi", "/usr/local/dcmi"),
    ("ascend-npu-smi", "/usr/local/bin/npu-smi"),
    ("ascend-driver-lib64", "/usr/local/Ascend/driver/lib64"),
    ("ascend-driver-version", "/usr/local/Ascend/driver/version.info"),
    ("ascend-install-info", "/etc/ascend_install.info"),
)
_CPU_DEFAULT_REQUESTS: dict[str, str] = {"cpu": "4", "memory": "16Gi"}
_CPU_KV_CACHE_GIB = "4"

Component = Literal["engine", "picker"]


@dataclass(frozen=True)
class PoolRef:
    """Which LLMPool the children belong to."""

    name: str
    namespace: str
    uid: str | None = None


# --- names and labels --------------------------------------------------------------


def child_name(pool: PoolRef, component: Component) -> str:
    """``<pool>-engine`` (vLLM Deployment and Service) or ``<pool>-picker`` (the picker's
    Deployment, Service, ServiceAccount, Role, RoleBinding and ConfigMap). The
    InferencePool has the pool's own name."""
    return f"{pool.name}-{component}"


def common_labels(pool: PoolRef, component: Component) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llmpool",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "llmpool-operator",
        "llmpool.io/pool": pool.name,
    }


def _selector(pool: PoolRef, component: Component) -> dict[str, str]:
    return {
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/component": component,
        "llmpool.io/pool": pool.name,
    }


def selector_labels(pool: PoolRef) -> dict[str, str]:
    """Labels every engine pod carries; the InferencePool's ``selector.matchLabels``
    and the engine Deployment's selector (and ``status.selector`` for the scale
    subresource, as a string: ``k=v,k=v``)."""
    return _selector(pool, "engine")


def _meta(pool: PoolRef, name: str, component: Component) -> dict[str, Any]:
    return {"name": name, "namespace": pool.namespace, "labels": common_labels(pool, component)}


def spec_hash(obj: Any) -> str:
    """A short stable digest of a JSON-able object (key order does not matter)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


# --- the picker's configuration ----------------------------------------------------


def picker_config(spec: PoolSpec) -> dict[str, Any]:
    """The ConfigMap's ``config.yaml`` as a dict in the picker's file format
    (:class:`llmpool.picker.config.PickerConfig`); derived from ``spec.routing`` only."""
    r = spec.routing
    return {
        "policy": {"name": r.policy.name, "params": dict(r.policy.params)},
        "profile": r.profile,
        "max_endpoints": r.max_endpoints,
        "scrape": {"interval_s": r.scrape_interval_seconds},
        "saturation": {
            "queue_threshold": r.saturation.queue_threshold,
            "kv_threshold": r.saturation.kv_threshold,
        },
        "objectives": dict(r.objectives),
        "max_queue_wait_s": r.max_queue_wait_seconds,
        "predictor_models": {m.name: f"{PREDICTOR_DIR}/{m.name}/{m.file()}" for m in r.predictor_models},
    }


def picker_config_yaml(spec: PoolSpec) -> str:
    return yaml.safe_dump(picker_config(spec), sort_keys=True, default_flow_style=False)


# --- the picker --------------------------------------------------------------------


def _service_account(pool: PoolRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(pool, child_name(pool, "picker"), "picker"),
    }


def _role(pool: PoolRef) -> dict[str, Any]:
    verbs = ["get", "list", "watch"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(pool, child_name(pool, "picker"), "picker"),
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": verbs},
            {"apiGroups": [INFERENCE_GROUP], "resources": ["inferencepools"], "verbs": verbs},
        ],
    }


def _role_binding(pool: PoolRef) -> dict[str, Any]:
    name = child_name(pool, "picker")
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(pool, name, "picker"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}],
    }


def _config_map(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(pool, child_name(pool, "picker"), "picker"),
        "data": {CONFIG_FILE: picker_config_yaml(spec)},
    }


def _resources(requests: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def _predictor_volume_source(m: PredictorModelRef) -> dict[str, Any]:
    """The (read-only) volume source of a predictor model: one ConfigMap key, a PVC or an image."""
    if m.config_map is not None:
        return {"configMap": {"name": m.config_map, "items": [{"key": m.key, "path": m.key}]}}
    v = m.volume
    assert v is not None
    if v.persistent_volume_claim is not None:
        return {
            "persistentVolumeClaim": {"claimName": v.persistent_volume_claim.claim_name, "readOnly": True}
        }
    assert v.image is not None
    image: dict[str, Any] = {"reference": v.image.reference}
    if v.image.pull_policy is not None:
        image["pullPolicy"] = v.image.pull_policy
    return {"image": image}  # image volumes are always read-only


def _picker_deployment(pool: PoolRef, spec: PoolSpec, picker_image: str) -> dict[str, Any]:
    name = child_name(pool, "picker")
    args = [
        "extender",
        "--config-file",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
        "--pool-name",
        pool.name,
        "--pool-namespace",
        pool.namespace,
        "--grpc-port",
        str(GRPC_PORT),
        "--health-port",
        str(HEALTH_PORT),
        "--metrics-port",
        str(METRICS_PORT),
    ]
    if spec.picker.plaintext:
        args.append("--plaintext")
    if spec.picker.transport != "h2":  # the picker's default
        args += ["--transport", spec.picker.transport]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": name}}]
    for m in spec.routing.predictor_models:
        vol = f"predictor-{m.name}"
        mounts.append({"name": vol, "mountPath": f"{PREDICTOR_DIR}/{m.name}", "readOnly": True})
        volumes.append({"name": vol, **_predictor_volume_source(m)})
    container: dict[str, Any] = {
        "name": "picker",
        "image": spec.picker.image or picker_image,
        "command": ["llmpool"],
        "args": args,
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "liveness"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "grpc": {"port": HEALTH_PORT, "service": "readiness"},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    res = _resources(spec.picker.resources.requests, spec.picker.resources.limits)
    if res:
        container["resources"] = res
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pool, name, "picker"),
        "spec": {
            "replicas": spec.picker.replicas,
            "selector": {"matchLabels": _selector(pool, "picker")},
            "template": {
                "metadata": {"labels": common_labels(pool, "picker")},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 40,  # the picker drains for 30 s
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _picker_service(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool, child_name(pool, "picker"), "picker"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(pool, "picker"),
            "ports": [
                {
                    "name": "grpc-ext-proc",
                    "port": GRPC_PORT,
                    "targetPort": GRPC_PORT,
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c" if spec.picker.plaintext else "http2",
                },
                {"name": "http-metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"},
            ],
        },
    }


# --- the engine --------------------------------------------------------------------


def _model_ref(spec: PoolSpec) -> str:
    src = spec.model.source
    if src.hugging_face:
        return src.hugging_face
    if src.pvc is not None and src.pvc.sub_path:
        return f"{_MODEL_DIR}/{src.pvc.sub_path.strip('/')}"
    return _MODEL_DIR


def _engine_args(spec: PoolSpec, rank: int) -> list[str]:
    e = spec.engine
    args = [
        _model_ref(spec),
        "--served-model-name",
        spec.model.name,
        "--host",
        "0.0.0.0",
        "--port",
        str(e.port + rank),
        "--tensor-parallel-size",
        str(e.tensor_parallel_size),
    ]
    if e.data_parallel_size > 1:
        # vLLM's external load-balancing DP mode: one API server per rank; co-located
        # ranks (one pod = one IP) use vLLM's default DP RPC port.
        args += ["--data-parallel-size", str(e.data_parallel_size), "--data-parallel-rank", str(rank)]
    if spec.model.tokenizer:
        args += ["--tokenizer", spec.model.tokenizer]
    if e.max_num_seqs is not None:
        args += ["--max-num-seqs", str(e.max_num_seqs)]
    if e.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    if e.enable_chunked_prefill is not None:
        args.append("--enable-chunked-prefill" if e.enable_chunked_prefill else "--no-enable-chunked-prefill")
    if e.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching")
    return args + list(e.extra_args)


def _engine_env(spec: PoolSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": _HF_HOME}]
    secret = spec.model.hf_token_secret
    if secret is not None:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}
        )
    user = {v.name for v in spec.engine.env}
    if spec.accelerator.kind is AcceleratorKind.NONE and "VLLM_CPU_KVCACHE_SPACE" not in user:
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": _CPU_KV_CACHE_GIB})
    env += [{"name": v.name, "value": v.value} for v in spec.engine.env]
    return env


def _engine_volumes(spec: PoolSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "hf-cache", "mountPath": _HF_HOME},
    ]
    cache: dict[str, Any] = {}
    if spec.model.cache_size_limit:
        cache["sizeLimit"] = spec.model.cache_size_limit
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.engine.shm_size_limit}},
        {"name": "hf-cache", "emptyDir": cache},
    ]
    src = spec.model.source
    if src.pvc is not None:
        mounts.append({"name": "model", "mountPath": _MODEL_DIR, "readOnly": True})
        volumes.append(
            {"name": "model", "persistentVolumeClaim": {"claimName": src.pvc.claim_name, "readOnly": True}}
        )
    elif src.path is not None:
        mounts.append({"name": "model", "mountPath": _MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "hostPath": {"path": src.path, "type": "Directory"}})
    if spec.accelerator.kind is AcceleratorKind.ASCEND_NPU:
        for name, path in _ASCEND_HOST_MOUNTS:
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
            volumes.append({"name": name, "hostPath": {"path": path}})
    return mounts, volumes


def _engine_container(spec: PoolSpec, rank: int, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    e = spec.engine
    dp = e.data_parallel_size
    port = e.port + rank
    requests: dict[str, Any] = dict(e.resources.requests)
    limits: dict[str, Any] = dict(e.resources.limits)
    resource = spec.accelerator.effective_resource_name()
    if resource is not None:
        per_container = spec.devices_per_pod() // dp
        requests[resource] = per_container
        limits[resource] = per_container
    elif not requests:
        requests = dict(_CPU_DEFAULT_REQUESTS)

    def http_probe(period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    return {
        "name": "vllm" if dp == 1 else f"vllm-rank-{rank}",
        "image": spec.engine_image(),
        "command": ["vllm", "serve"],
        "args": _engine_args(spec, rank),
        "env": _engine_env(spec),
        "ports": [{"name": "http" if dp == 1 else f"http-r{rank}", "containerPort": port, "protocol": "TCP"}],
        # /metrics is served on the API port: the picker scrapes every target port.
        "startupProbe": http_probe(10, 180),  # up to 30 minutes to download and load weights
        "readinessProbe": http_probe(5, 3),
        "livenessProbe": http_probe(10, 6),
        "resources": _resources(requests, limits),
        "volumeMounts": mounts,
    }


def _engine_deployment(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    mounts, volumes = _engine_volumes(spec)
    containers = [_engine_container(spec, r, mounts) for r in range(spec.engine.data_parallel_size)]
    acc = spec.accelerator
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": 60,
        "containers": containers,
        "volumes": volumes,
    }
    if acc.node_selector:
        pod["nodeSelector"] = dict(acc.node_selector)
    if acc.tolerations:
        pod["tolerations"] = [dict(t) for t in acc.tolerations]
    if acc.affinity:
        pod["affinity"] = dict(acc.affinity)
    if acc.runtime_class_name:
        pod["runtimeClassName"] = acc.runtime_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pool, child_name(pool, "engine"), "engine"),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(pool)},
            # Accelerators are rarely spare: replace pods one at a time without a surge.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": common_labels(pool, "engine")}, "spec": pod},
        },
    }


def _engine_service(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    dp = spec.engine.data_parallel_size
    ports = [
        {
            "name": "http" if dp == 1 else f"http-r{r}",
            "port": p,
            "targetPort": p,
            "protocol": "TCP",
            "appProtocol": "http",
        }
        for r, p in enumerate(spec.engine.rank_ports())
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(pool, child_name(pool, "engine"), "engine"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(pool), "ports": ports},
    }


def _inference_pool(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    return {
        "apiVersion": f"{INFERENCE_GROUP}/v1",
        "kind": "InferencePool",
        "metadata": _meta(pool, pool.name, "picker"),
        "spec": {
            "selector": {"matchLabels": selector_labels(pool)},
            "targetPorts": [{"number": p} for p in spec.engine.rank_ports()],
            "appProtocol": "http",
            "endpointPickerRef": {
                "group": "",
                "kind": "Service",
                "name": child_name(pool, "picker"),
                "port": {"number": GRPC_PORT},
                "failureMode": spec.routing.failure_mode,
            },
        },
    }


def build_children(
    pool: PoolRef, spec: PoolSpec, *, picker_image: str = DEFAULT_PICKER_IMAGE
) -> list[dict[str, Any]]:
    """Every child of the pool, in apply order: ServiceAccount, Role, RoleBinding,
    ConfigMap, picker Deployment, picker Service, vLLM Deployment, vLLM Service,
    InferencePool. No ownerReferences (the runtime adds them)."""
    return [
        _service_account(pool),
        _role(pool),
        _role_binding(pool),
        _config_map(pool, spec),
        _picker_deployment(pool, spec, picker_image),
        _picker_service(pool, spec),
        _engine_deployment(pool, spec),
        _engine_service(pool, spec),
        _inference_pool(pool, spec),
    ]
