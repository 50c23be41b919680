"""The operator's pure builders: every child for GPU, NPU, CPU and data-parallel pools,
validated offline (kubernetes-validate, strict, Kubernetes 1.30 and 1.37; our CRDs'
schemas with jsonschema for LLMPool and InferencePool objects)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llmpool.picker.config import parse_config
from llmpool_operator.builders import (
    PoolRef,
    build_children,
    child_name,
    picker_config,
    picker_config_yaml,
    selector_labels,
    spec_hash,
)
from llmpool_operator.spec import DEFAULT_CPU_IMAGE, DEFAULT_NPU_IMAGE, PoolSpec, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "charts" / "llmpool" / "crds"
EXAMPLES = sorted((ROOT / "manifests" / "samples").glob("llmpool-*.yaml"))
K8S_VERSIONS = ("1.30.0", "1.37.0")
KINDS = [
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Deployment",
    "Service",
    "Deployment",
    "Service",
    "InferencePool",
]


def _crd_schema(filename: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / filename).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _validator(filename: str) -> jsonschema.protocols.Validator:
    # CRD schemas are OpenAPI v3.0 (boolean exclusiveMinimum): Draft 4 semantics.
    schema = _crd_schema(filename)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


LLMPOOL_SCHEMA = _validator("llmpool.io_llmpools.yaml")
INFPOOL_SCHEMA = _validator("inference.networking.k8s.io_inferencepools.yaml")


def _example(path: Path) -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(path.read_text())
    return obj


def _pool(obj: dict[str, Any]) -> PoolRef:
    return PoolRef(obj["metadata"]["name"], obj["metadata"]["namespace"], uid="uid-1")


def _minimal(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "m", "source": {"huggingFace": "org/m"}}}
    spec.update(extra)
    return spec


def _dp_spec() -> dict[str, Any]:
    return _minimal(engine={"dataParallelSize": 4, "tensorParallelSize": 2, "port": 9100})


def _all_specs() -> list[tuple[str, PoolRef, PoolSpec]]:
    out = [(p.stem, _pool(_example(p)), parse_spec(_example(p)["spec"])) for p in EXAMPLES]
    out.append(("gpu-dp4", PoolRef("dp", "llm"), parse_spec(_dp_spec())))
    out.append(("minimal", PoolRef("mini", "default"), parse_spec(_minimal())))
    return out


def _by_kind(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [c for c in children if c["kind"] == kind and c["metadata"]["name"] == name]
    return obj


def _engine(pool: PoolRef, spec: PoolSpec) -> dict[str, Any]:
    return _by_kind(build_children(pool, spec), "Deployment", child_name(pool, "engine"))


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} == {"llmpool-gpu", "llmpool-npu", "llmpool-cpu"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_against_the_crd_and_the_spec_model(path: Path) -> None:
    obj = _example(path)
    LLMPOOL_SCHEMA.validate(obj)
    assert (obj["apiVersion"], obj["kind"]) == ("llmpool.io/v1alpha1", "LLMPool")
    parse_spec(obj["spec"])


def test_crd_rejects_bad_objects() -> None:
    good = _example(ROOT / "manifests/samples/llmpool-gpu.yaml")
    for path, value in [
        (("accelerator", "kind"), "tpu"),
        (("engine", "dataParallelSize"), 9),
        (("routing", "failureMode"), "FailSometimes"),
        (("replicas",), -1),
        (("routing", "scrapeIntervalSeconds"), 0),
    ]:
        bad = copy.deepcopy(good)
        node = bad["spec"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        assert not LLMPOOL_SCHEMA.is_valid(bad), path


def test_crd_names_and_subresources() -> None:
    crd = yaml.safe_load((CRDS / "llmpool.io_llmpools.yaml").read_text())
    assert crd["metadata"]["name"] == "llmpools.llmpool.io"
    assert crd["spec"]["names"]["shortNames"] == ["llmp"]
    (v,) = crd["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert v["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    cols = [c["name"] for c in v["additionalPrinterColumns"]]
    assert cols == ["Model", "Ready", "Desired", "Policy", "Phase", "Age"]
    # --persistence status keeps Kopf's state there: the API server must not prune it
    kopf_status = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["kopf"]
    assert kopf_status["type"] == "object" and kopf_status["x-kubernetes-preserve-unknown-fields"] is True


@pytest.mark.parametrize("case", _all_specs(), ids=lambda c: c[0])
@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_every_child_validates(case: tuple[str, PoolRef, PoolSpec], k8s: str) -> None:
    _, pool, spec = case
    children = build_children(pool, spec)
    assert [c["kind"] for c in children] == KINDS
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == pool.namespace
        assert "ownerReferences" not in meta
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "llmpool-operator"
        assert meta["labels"]["llmpool.io/pool"] == pool.name
        if child["kind"] == "InferencePool":
            INFPOOL_SCHEMA.validate(child)
        else:
            kubernetes_validate.validate(child, k8s, strict=True)


def test_children_are_deterministic_and_pure() -> None:
    for _, pool, spec in _all_specs():
        assert build_children(pool, spec) == build_children(pool, spec)
        assert spec_hash(build_children(pool, spec)) == spec_hash(build_children(pool, spec))


def test_gpu_pool() -> None:
    obj = _example(ROOT / "manifests/samples/llmpool-gpu.yaml")
    pool, spec = _pool(obj), parse_spec(obj["spec"])
    dep = _engine(pool, spec)
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "vllm/vllm-openai:v0.32.0"
    assert c["command"] == ["vllm", "serve"]
    assert c["args"][:10] == [
        "meta-llama/Llama-3.1-8B-Instruct",
        "--served-model-name",
        "llama-3.1-8b",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "1",
        "--max-num-seqs",
    ]
    for flag in ("--enable-chunked-prefill", "--enable-prefix-caching", "--max-num-batched-tokens"):
        assert flag in c["args"]
    assert c["args"][-2:] == ["--gpu-memory-utilization", "0.9"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "hf-cache" in vols
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert dep["spec"]["selector"]["matchLabels"] == selector_labels(pool)
    assert selector_labels(pool).items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_npu_pool_uses_ascend_image_resource_and_driver_mounts() -> None:
    obj = _example(ROOT / "manifests/samples/llmpool-npu.yaml")
    pool, spec = _pool(obj), parse_spec(obj["spec"])
    children = build_children(pool, spec)
    dep = _by_kind(children, "Deployment", "qwen-npu-engine")
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vllm-rank-0", "vllm-rank-1"]
    for rank, c in enumerate(pod["containers"]):
        assert c["image"] == DEFAULT_NPU_IMAGE
        assert c["resources"]["limits"]["huawei.com/Ascend910"] == "1"
        assert c["args"][0] == "/models/Qwen3-8B"
        i = c["args"].index("--data-parallel-rank")
        assert c["args"][i + 1] == str(rank)
        assert c["args"][c["args"].index("--port") + 1] == str(8000 + rank)
        paths = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/usr/local/Ascend/driver/lib64", "/usr/local/dcmi", "/usr/local/bin/npu-smi"} <= paths
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert vols["ascend-driver-lib64"]["hostPath"]["path"] == "/usr/local/Ascend/driver/lib64"
    ip = _by_kind(children, "InferencePool", "qwen-npu")
    assert ip["spec"]["targetPorts"] == [{"number": 8000}, {"number": 8001}]


def test_cpu_pool_is_runnable_without_accelerators() -> None:
    obj = _example(ROOT / "manifests/samples/llmpool-cpu.yaml")
    pool, spec = _pool(obj), parse_spec(obj["spec"])
    pod = _engine(pool, spec)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "vllm/vllm-openai-cpu:v0.32.0-x86_64"
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "12Gi"}}
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # defaults for a bare CPU pool
    bare = parse_spec(_minimal(accelerator={"kind": "none"}))
    (c,) = _engine(pool, bare)["spec"]["template"]["spec"]["containers"]
    assert c["image"] == DEFAULT_CPU_IMAGE
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert "limits" not in c["resources"]
    assert any(e["name"] == "VLLM_CPU_KVCACHE_SPACE" for e in c["env"])


def test_data_parallel_pool_one_container_and_port_per_rank() -> None:
    pool, spec = PoolRef("dp", "llm"), parse_spec(_dp_spec())
    children = build_children(pool, spec)
    pod = _by_kind(children, "Deployment", "dp-engine")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 4
    ports = [c["ports"][0]["containerPort"] for c in pod["containers"]]
    assert ports == [9100, 9101, 9102, 9103]
    for c in pod["containers"]:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"  # TP per rank
        assert "--data-parallel-size" in c["args"]
    svc = _by_kind(children, "Service", "dp-engine")
    assert [p["port"] for p in svc["spec"]["ports"]] == ports
    ip = _by_kind(children, "InferencePool", "dp")
    assert [p["number"] for p in ip["spec"]["targetPorts"]] == ports


def test_inference_pool_points_at_the_picker() -> None:
    pool, spec = PoolRef("p", "ns"), parse_spec(_minimal(routing={"failureMode": "FailOpen"}))
    children = build_children(pool, spec)
    ip = _by_kind(children, "InferencePool", "p")
    assert ip["apiVersion"] == "inference.networking.k8s.io/v1"
    assert ip["spec"]["selector"]["matchLabels"] == selector_labels(pool)
    ref = ip["spec"]["endpointPickerRef"]
    assert ref == {
        "group": "",
        "kind": "Service",
        "name": "p-picker",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    svc = _by_kind(children, "Service", "p-picker")
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9090}


def test_picker_deployment_contract() -> None:
    pool, spec = PoolRef("p", "ns"), parse_spec(_minimal())
    children = build_children(pool, spec, picker_image="llmpool/llmpool:test")
    dep = _by_kind(children, "Deployment", "p-picker")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "p-picker"
    (c,) = pod["containers"]
    assert c["image"] == "llmpool/llmpool:test"
    assert c["command"] == ["llmpool"]
    args = c["args"]
    assert args[:7] == [
        "extender",
        "--config-file",
        "/etc/llmpool/config.yaml",
        "--pool-name",
        "p",
        "--pool-namespace",
        "ns",
    ]
    assert "--plaintext" not in args and "--transport" not in args  # h2: the picker's default
    assert {p["containerPort"] for p in c["ports"]} == {9002, 9003, 9090}
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert {"name": "config", "configMap": {"name": "p-picker"}} in pod["volumes"]
    role = _by_kind(children, "Role", "p-picker")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {
            "apiGroups": ["inference.networking.k8s.io"],
            "resources": ["inferencepools"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    rb = _by_kind(children, "RoleBinding", "p-picker")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "p-picker", "namespace": "ns"}]
    # the CLI accepts exactly these arguments
    from llmpool.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert (parsed.config, parsed.pool_name, parsed.pool_namespace) == ("/etc/llmpool/config.yaml", "p", "ns")


def test_routing_maps_into_the_picker_config_exactly() -> None:
    raw = _minimal(
        routing={
            "policy": {"name": "brh", "params": {"horizon": 4, "gamma": 0.5}},
            "profile": "h100-llama3-8b",
            "scrapeIntervalSeconds": 0.2,
            "maxEndpoints": 3,
            "saturation": {"queueThreshold": 7, "kvThreshold": 0.9},
            "objectives": {"batch": -1, "chat": 10},
            "maxQueueWaitSeconds": 12.5,
        }
    )
    spec = parse_spec(raw)
    expected = {
        "policy": {"name": "brh", "params": {"horizon": 4, "gamma": 0.5}},
        "profile": "h100-llama3-8b",
        "max_endpoints": 3,
        "scrape": {"interval_s": 0.2},
        "saturation": {"queue_threshold": 7, "kv_threshold": 0.9},
        "objectives": {"batch": -1, "chat": 10},
        "max_queue_wait_s": 12.5,
        "predictor_models": {},
    }
    assert picker_config(spec) == expected
    cm = _by_kind(build_children(PoolRef("p", "ns"), spec), "ConfigMap", "p-picker")
    text = cm["data"]["config.yaml"]
    assert text == picker_config_yaml(spec)
    assert yaml.safe_load(text) == expected
    cfg = parse_config(text, "configmap")
    assert cfg.policy.name == "brh" and cfg.policy.params == {"horizon": 4, "gamma": 0.5}
    assert cfg.profile == "h100-llama3-8b"
    assert cfg.step_profile is not None
    assert cfg.max_endpoints == 3
    assert cfg.scrape.interval_s == 0.2
    assert (cfg.saturation.queue_threshold, cfg.saturation.kv_threshold) == (7, 0.9)
    assert cfg.objectives == {"batch": -1, "chat": 10}
    assert cfg.max_queue_wait_s == 12.5


def test_default_routing_equals_the_pickers_defaults() -> None:
    text = picker_config_yaml(parse_spec(_minimal()))
    cfg = parse_config(text, "configmap")
    default = parse_config("", "empty")
    assert cfg.model_dump() == default.model_dump()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configmaps_parse(path: Path) -> None:
    obj = _example(path)
    spec = parse_spec(obj["spec"])
    cm = _by_kind(build_children(_pool(obj), spec), "ConfigMap", f"{obj['metadata']['name']}-picker")
    cfg = parse_config(cm["data"]["config.yaml"], "configmap")
    assert cfg.policy.name == spec.routing.policy.name


def test_predictor_models_are_mounted_and_named_in_the_config(tmp_path: Path) -> None:
    spec = parse_spec(
        _minimal(routing={"predictorModels": [{"name": "surv", "configMap": "pred-cm", "key": "model.json"}]})
    )
    children = build_children(PoolRef("p", "ns"), spec)
    assert picker_config(spec)["predictor_models"] == {"surv": "/var/lib/llmpool/predictors/surv/model.json"}
    pod = _by_kind(children, "Deployment", "p-picker")["spec"]["template"]["spec"]
    vol = {v["name"]: v for v in pod["volumes"]}["predictor-surv"]
    assert vol["configMap"] == {"name": "pred-cm", "items": [{"key": "model.json", "path": "model.json"}]}
    (c,) = pod["containers"]
    assert {"name": "predictor-surv", "mountPath": "/var/lib/llmpool/predictors/surv", "readOnly": True} in c[
        "volumeMounts"
    ]


@pytest.mark.parametrize(
    ("volume", "source", "k8s_versions"),
    [
        (
            {"persistentVolumeClaim": {"claimName": "models"}},
            {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
            K8S_VERSIONS,
        ),
        (
            {"image": {"reference": "registry.example/llmpool-encoder:v1", "pullPolicy": "IfNotPresent"}},
            {"image": {"reference": "registry.example/llmpool-encoder:v1", "pullPolicy": "IfNotPresent"}},
            ("1.37.0",),  # image volumes are Kubernetes 1.31+
        ),
    ],
    ids=["pvc", "image"],
)
def test_a_predictor_model_volume_is_mounted_read_only(
    volume: dict[str, Any], source: dict[str, Any], k8s_versions: tuple[str, ...]
) -> None:
    learned = {"name": "learned", "params": {"model": "encoder"}}
    raw = _minimal(
        routing={
            "policy": {"name": "impact", "params": {"predictor": learned}},
            "predictorModels": [{"name": "encoder", "volume": volume, "path": "v3/encoder.onnx"}],
        }
    )
    LLMPOOL_SCHEMA.validate({"apiVersion": "llmpool.io/v1alpha1", "kind": "LLMPool",
                             "metadata": {"name": "p", "namespace": "ns"}, "spec": raw})  # fmt: skip
    spec = parse_spec(raw)
    children = build_children(PoolRef("p", "ns"), spec)
    config = picker_config(spec)
    assert config["predictor_models"] == {"encoder": "/var/lib/llmpool/predictors/encoder/v3/encoder.onnx"}
    assert config["policy"]["params"]["predictor"] == learned  # the picker resolves the name
    dep = _by_kind(children, "Deployment", "p-picker")
    pod = dep["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["predictor-encoder"] == {
        "name": "predictor-encoder",
        **source,
    }
    (c,) = pod["containers"]
    assert {
        "name": "predictor-encoder",
        "mountPath": "/var/lib/llmpool/predictors/encoder",
        "readOnly": True,
    } in c["volumeMounts"]
    for k8s in k8s_versions:
        kubernetes_validate.validate(dep, k8s, strict=True)
    # the engine never carries it
    assert "predictor" not in str(_by_kind(children, "Deployment", "p-engine"))


def test_the_rendered_config_resolves_the_model_name_in_the_picker(tmp_path: Path) -> None:
    # The picker's view: the volume is mounted at the predictor dir; here a copy of the fast tier.
    from llmpool.predict.runtime import builtin_path

    spec = parse_spec(
        _minimal(
            routing={
                "policy": {
                    "name": "brh",
                    "params": {"predictor": {"name": "learned", "params": {"model": "enc"}}},
                },
                "predictorModels": [
                    {"name": "enc", "volume": {"image": {"reference": "r"}}, "path": "m/fast.onnx"}
                ],
            }
        )
    )
    text = picker_config_yaml(spec).replace("/var/lib/llmpool/predictors", str(tmp_path))
    (tmp_path / "enc" / "m").mkdir(parents=True)
    for suffix in (".onnx", ".json"):
        src = builtin_path("fast").with_suffix(suffix)
        (tmp_path / "enc" / "m" / src.name).write_bytes(src.read_bytes())
    cfg = parse_config(text, "configmap")
    assert cfg.policy.params["predictor"]["params"]["model"] == str(tmp_path / "enc" / "m" / "fast.onnx")


ROUTING_EDITS: list[dict[str, Any]] = [
    {"policy": {"name": "br0"}},
    {"policy": {"name": "impact", "params": {"impact_weight": 2.0}}},
    {"scrapeIntervalSeconds": 0.5},
    {"failureMode": "FailOpen"},
    {"maxEndpoints": 2, "objectives": {"x": -1}},
    {"profile": "h100-llama3-8b", "saturation": {"queueThreshold": 1}},
]


@pytest.mark.parametrize("edit", ROUTING_EDITS, ids=lambda e: ",".join(e))
def test_routing_edit_changes_neither_deployment(edit: dict[str, Any]) -> None:
    pool = PoolRef("p", "ns")
    for base in (_minimal(), _dp_spec(), _example(ROOT / "manifests/samples/llmpool-gpu.yaml")["spec"]):
        before = build_children(pool, parse_spec(base))
        edited = copy.deepcopy(base)
        edited.setdefault("routing", {}).update(edit)
        after = build_children(pool, parse_spec(edited))
        changed = {(a["kind"], a["metadata"]["name"]) for a, b in zip(before, after, strict=True) if a != b}
        assert changed, edit
        assert changed <= {("ConfigMap", "p-picker"), ("InferencePool", "p")}, changed


ENGINE_EDITS: list[dict[str, Any]] = [
    {"engine": {"maxNumSeqs": 64}},
    {"engine": {"image": "vllm/vllm-openai:v0.33.0"}},
    {"engine": {"extraArgs": ["--enforce-eager"]}},
    {"engine": {"tensorParallelSize": 2}},
    {"engine": {"enablePrefixCaching": False}},
    {"accelerator": {"runtimeClassName": "nvidia"}},
    {"model": {"name": "m", "source": {"huggingFace": "org/other"}}},
]


@pytest.mark.parametrize("edit", ENGINE_EDITS, ids=lambda e: str(e))
def test_engine_edit_rolls_only_the_engine(edit: dict[str, Any]) -> None:
    pool = PoolRef("p", "ns")
    before = build_children(pool, parse_spec(_minimal()))
    after = build_children(pool, parse_spec({**_minimal(), **edit}))
    changed = {(a["kind"], a["metadata"]["name"]) for a, b in zip(before, after, strict=True) if a != b}
    assert ("Deployment", "p-engine") in changed
    old = _by_kind(before, "Deployment", "p-engine")["spec"]["template"]
    new = _by_kind(after, "Deployment", "p-engine")["spec"]["template"]
    assert old != new  # the pod template changed: the Deployment rolls
    assert _by_kind(before, "ConfigMap", "p-picker") == _by_kind(after, "ConfigMap", "p-picker")
    assert _by_kind(before, "Deployment", "p-picker") == _by_kind(after, "Deployment", "p-picker")


def test_replica_change_does_not_touch_the_pod_template() -> None:
    pool = PoolRef("p", "ns")
    a = _by_kind(build_children(pool, parse_spec(_minimal(replicas=1))), "Deployment", "p-engine")
    b = _by_kind(build_children(pool, parse_spec(_minimal(replicas=5))), "Deployment", "p-engine")
    assert a["spec"]["template"] == b["spec"]["template"]
    assert (a["spec"]["replicas"], b["spec"]["replicas"]) == (1, 5)


def test_model_sources() -> None:
    pool = PoolRef("p", "ns")
    path_spec = parse_spec({"model": {"name": "m", "source": {"path": "/data/m"}, "tokenizer": "org/tok"}})
    pod = _engine(pool, path_spec)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "/models"
    assert c["args"][c["args"].index("--tokenizer") + 1] == "org/tok"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["model"]["hostPath"] == {"path": "/data/m", "type": "Directory"}


def test_picker_transport_is_passed_and_checked() -> None:
    spec = parse_spec(_minimal(picker={"transport": "grpcio"}))
    dep = _by_kind(build_children(PoolRef("p", "ns"), spec, picker_image="i"), "Deployment", "p-picker")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--transport") + 1] == "grpcio"
    with pytest.raises(SpecError, match="transport"):
        parse_spec(_minimal(picker={"transport": "h3"}))
