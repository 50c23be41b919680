"""The LLMPool spec model: same defaults as the CRD, and the rules the CRD states as CEL
(``x-kubernetes-validations``), which offline JSON-schema validators do not run -- so they
are tested here, on the Python model that mirrors them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpool_operator.spec import (
    DEFAULT_CPU_IMAGE,
    DEFAULT_GPU_IMAGE,
    DEFAULT_NPU_IMAGE,
    AcceleratorKind,
    SpecError,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "charts/llmpool/crds/llmpool.io_llmpools.yaml").read_text())
SPEC_SCHEMA: dict[str, Any] = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _minimal(**extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"name": "m", "source": {"huggingFace": "org/m"}}}
    spec.update(extra)
    return spec


def _defaults(schema: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf default of the CRD schema, by camelCase path."""
    out: dict[tuple[str, ...], Any] = {}
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub and sub["default"] != {}:
            out[(*path, key)] = sub["default"]
        out.update(_defaults(sub, (*path, key)))
    return out


def _lookup(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def test_defaults_match_the_crd() -> None:
    # Optional parents the minimal spec omits (their children default only when present).
    spec = parse_spec(_minimal(model={"name": "m", "source": {"path": "/x"}, "hfTokenSecret": {"name": "s"}}))
    dumped = spec.model_dump(by_alias=True, mode="json")
    defaults = _defaults(SPEC_SCHEMA)
    assert ("routing", "policy", "name") in defaults
    # defaults inside list items (env[].value) are checked separately
    for path, value in defaults.items():
        if "env" in path:
            continue
        assert _lookup(dumped, path) == value, path
    env = parse_spec(_minimal(engine={"env": [{"name": "A"}]})).engine.env
    assert env[0].value == ""


def test_minimal_spec_and_camel_or_snake_keys() -> None:
    spec = parse_spec(_minimal())
    assert spec.replicas == 1
    assert spec.accelerator.kind is AcceleratorKind.NVIDIA_GPU
    assert spec.engine_image() == DEFAULT_GPU_IMAGE
    assert spec.devices_per_pod() == 1
    assert spec.routing.policy.name == "impact"
    assert not spec.autoscaled
    snake = parse_spec(_minimal(engine={"tensor_parallel_size": 2}))
    camel = parse_spec(_minimal(engine={"tensorParallelSize": 2}))
    assert snake == camel


def test_default_images_per_kind() -> None:
    npu = parse_spec(_minimal(accelerator={"kind": "ascend-npu"}))
    assert npu.engine_image() == DEFAULT_NPU_IMAGE
    assert npu.accelerator.effective_resource_name() == "huawei.com/Ascend910"
    cpu = parse_spec(_minimal(accelerator={"kind": "none"}))
    assert cpu.engine_image() == DEFAULT_CPU_IMAGE
    assert cpu.devices_per_pod() == 0 and cpu.accelerator.effective_resource_name() is None
    for image in (DEFAULT_GPU_IMAGE, DEFAULT_NPU_IMAGE, DEFAULT_CPU_IMAGE):
        assert "." not in image.split("/")[0]  # no registry host


def test_devices_per_pod_and_ports() -> None:
    spec = parse_spec(_minimal(engine={"tensorParallelSize": 2, "dataParallelSize": 3, "port": 8100}))
    assert spec.devices_per_pod() == 6
    assert spec.engine.rank_ports() == [8100, 8101, 8102]
    assert parse_spec(_minimal(minReplicas=1, maxReplicas=3)).autoscaled


def _pm(*models: dict[str, Any], **routing: Any) -> dict[str, Any]:
    return _minimal(routing={"predictorModels": list(models), **routing})


def _cel_rules(schema: dict[str, Any]) -> list[str]:
    rules = [r["rule"] for r in schema.get("x-kubernetes-validations", [])]
    for sub in schema.get("properties", {}).values():
        rules += _cel_rules(sub)
    if "items" in schema:
        rules += _cel_rules(schema["items"])
    return rules


def test_every_cel_rule_has_a_python_mirror_below() -> None:
    # One entry of CEL_CASES per CEL rule of the LLMPool CRD (spec subtree).
    assert len(_cel_rules(SPEC_SCHEMA)) == len(CEL_CASES)


# (spec, fragment of the one-line message): each violates one CEL rule of the CRD.
CEL_CASES: list[tuple[dict[str, Any], str]] = [
    (_minimal(minReplicas=1), "spec.minReplicas: requires maxReplicas"),
    (_minimal(minReplicas=4, maxReplicas=2), "spec.minReplicas: 4 exceeds maxReplicas 2"),
    (
        _minimal(accelerator={"kind": "none"}, engine={"tensorParallelSize": 2}),
        "spec.engine.tensorParallelSize: must be 1 for a CPU pool",
    ),
    (
        _minimal(accelerator={"count": 3}, engine={"tensorParallelSize": 2}),
        "spec.accelerator.count: 3 devices per pod",
    ),
    (
        {"model": {"name": "m", "source": {"huggingFace": "a/b", "path": "/x"}}},
        "spec.model.source: exactly one of huggingFace, pvc, path must be set",
    ),
    (_minimal(accelerator={"kind": "none", "count": 1}), "spec.accelerator: kind none takes no count"),
    (
        _pm(
            {"name": "a", "configMap": "c", "key": "k", "volume": {"image": {"reference": "r"}}, "path": "x"}
        ),
        "spec.routing.predictorModels.0: exactly one of configMap, volume must be set",
    ),
    (
        _pm({"name": "a", "volume": {"persistentVolumeClaim": {"claimName": "c"}}}),
        "spec.routing.predictorModels.0: volume takes path",
    ),
    (_pm({"name": "fast", "configMap": "c", "key": "k"}), "'fast' is the built-in model's name"),
    (
        _pm({"name": "a", "volume": {}, "path": "m.onnx"}),
        "spec.routing.predictorModels.0.volume: exactly one of persistentVolumeClaim, image must be set",
    ),
]


# --- the CRD's CEL rules themselves, run by a CEL interpreter ---------------------------------
# No kube-apiserver here to compile them; cel-python (a CEL implementation) compiles and runs
# them on the defaulted object, as the API server does after defaulting. Kubernetes adds
# library functions (quantity, url, ...) that our rules do not use.


def _apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural-schema defaulting: a missing property with a default gets it, and defaults
    apply inside every object present (including ones just defaulted)."""
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                _apply_defaults(sub, obj[key])
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            _apply_defaults(schema["items"], item)
    return obj


def _cel_violations(schema: dict[str, Any], obj: Any, path: str = "spec") -> list[tuple[str, str]]:
    """(path, message) of every CEL rule that evaluates false at a node present in ``obj``."""
    import celpy

    env = celpy.Environment()
    out: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        prg = env.program(env.compile(rule["rule"]))
        result = prg.evaluate({"self": celpy.json_to_cel(obj)})
        if isinstance(result, Exception):
            raise AssertionError(f"{path}: rule {rule['rule']!r} failed to evaluate: {result}")
        if not bool(result):
            out.append((path, rule["message"]))
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                out += _cel_violations(sub, obj[key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += _cel_violations(schema["items"], item, f"{path}.{i}")
    return out


def test_every_cel_rule_compiles() -> None:
    import celpy

    env = celpy.Environment()
    for rule in _cel_rules(SPEC_SCHEMA):
        env.compile(rule)  # raises CELParseError on a syntax error


@pytest.mark.parametrize(("raw", "fragment"), CEL_CASES, ids=lambda x: str(x)[:40])
def test_each_cel_case_breaks_a_crd_rule(raw: dict[str, Any], fragment: str) -> None:
    """The CRD's CEL rules reject the spec its Python mirror rejects, at the same place."""
    violations = _cel_violations(SPEC_SCHEMA, _apply_defaults(SPEC_SCHEMA, copy.deepcopy(raw)))
    assert violations, "no CEL rule of the CRD rejects it"
    if fragment.startswith("spec"):
        assert all(fragment.startswith(where) for where, _ in violations), (violations, fragment)


def _valid_specs() -> list[dict[str, Any]]:
    samples = [
        yaml.safe_load(f.read_text())["spec"] for f in sorted((ROOT / "manifests/samples").glob("*.yaml"))
    ]
    return [
        *samples,
        _minimal(),
        _minimal(minReplicas=1, maxReplicas=4),
        _minimal(accelerator={"kind": "none"}),
        _minimal(accelerator={"count": 4}, engine={"tensorParallelSize": 2, "dataParallelSize": 2}),
        _minimal(engine={"port": 65527, "dataParallelSize": 8}, accelerator={"count": 8}),
        _pm({"name": "a", "configMap": "c", "key": "k"}),
        _pm({"name": "a", "volume": {"image": {"reference": "r"}}, "path": "m.onnx"}),
    ]


@pytest.mark.parametrize("raw", _valid_specs(), ids=lambda x: str(x)[:40])
def test_valid_specs_pass_every_crd_rule_and_the_python_model(raw: dict[str, Any]) -> None:
    assert _cel_violations(SPEC_SCHEMA, _apply_defaults(SPEC_SCHEMA, copy.deepcopy(raw))) == []
    parse_spec(raw)


@pytest.mark.parametrize(("raw", "fragment"), CEL_CASES, ids=lambda x: str(x)[:40])
def test_cel_rules_are_enforced_in_python(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


BAD: list[tuple[Any, str]] = [
    ({}, "spec.model: Field required"),
    (_minimal(engine={"tensorParallelSize": 0}), "spec.engine.tensorParallelSize:"),
    (_minimal(engine={"dataParallelSize": 9}), "spec.engine.dataParallelSize:"),
    (_minimal(engine={"port": 65528}), "spec.engine.port: Input should be less than or equal to 65527"),
    (_minimal(accelerator={"kind": "tpu"}), "spec.accelerator.kind:"),
    (_minimal(routing={"failureMode": "Maybe"}), "spec.routing.failureMode:"),
    (_minimal(routing={"policy": {"name": "nope"}}), "spec.routing.policy: unknown policy 'nope'"),
    (
        _minimal(routing={"policy": {"name": "impact-oracle"}}),
        "spec.routing.policy: policy 'impact-oracle' is lab-only",
    ),
    (_minimal(routing={"policy": {"name": "brh-oracle"}}), "is lab-only"),
    (
        _minimal(routing={"policy": {"name": "impact", "params": {"impactWeight": 1}}}),
        "spec.routing.policy: policy 'impact': impactWeight: Extra inputs are not permitted",
    ),
    (
        _minimal(routing={"policy": {"name": "br0", "params": {"window": -5}}}),
        "spec.routing.policy: policy 'br0'",
    ),
    (_minimal(routing={"scrapeIntervalSeconds": 0}), "spec.routing.scrapeIntervalSeconds:"),
    (_minimal(routing={"saturation": {"kvThreshold": 1.5}}), "spec.routing.saturation.kvThreshold:"),
    (_minimal(unknownField=1), "spec.unknownField: Extra inputs are not permitted"),
    (_minimal(engine={"extraArgs": "--x"}), "spec.engine.extraArgs:"),
    (
        _minimal(routing={"predictorModels": [{"name": "a", "configMap": "c", "key": "k"}] * 2}),
        "spec.routing.predictorModels: duplicate name a",
    ),
    ({"model": {"name": "m", "source": {"path": "relative"}}}, "spec.model.source.path:"),
    (
        _pm({"name": "enc", "volume": {"hostPath": {"path": "/models"}}, "path": "encoder.onnx"}),
        "spec.routing.predictorModels.0.volume: hostPath is not allowed; use persistentVolumeClaim or image",
    ),
    (
        _pm({"name": "enc", "volume": {"image": {"reference": "r"}}, "path": "../etc/passwd"}),
        "spec.routing.predictorModels.0.path: String should match pattern",
    ),
    (_pm({"name": "enc", "volume": {"image": {"reference": "r"}}, "path": "/abs.onnx"}), ".path: String"),
    (
        _pm({"name": "enc", "volume": {"image": {"reference": "r", "pullPolicy": "Sometimes"}}, "path": "m"}),
        "spec.routing.predictorModels.0.volume.image.pullPolicy:",
    ),
    (
        _pm(
            {"name": "enc", "volume": {"image": {"reference": "r"}}, "path": "m.onnx"},
            policy={"name": "brh", "params": {"predictor": {"name": "learned", "params": {"model": "encx"}}}},
        ),
        "spec.routing.policy: params.predictor.params.model: unknown predictor model 'encx' "
        "(named models in predictorModels: enc; built-in: fast; or the path of a .onnx file)",
    ),
    ("not a mapping", "spec: must be a mapping"),
]


@pytest.mark.parametrize(("raw", "fragment"), BAD, ids=lambda x: str(x)[:50])
def test_bad_specs_are_rejected_with_one_line(raw: Any, fragment: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    msg = str(err.value)
    assert fragment in msg, msg
    assert "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_named_predictor_models_are_accepted_by_the_policy_check() -> None:
    learned = {"name": "learned", "params": {"model": "enc", "on_error": "raise"}}
    spec = parse_spec(
        _pm(
            {
                "name": "enc",
                "volume": {"persistentVolumeClaim": {"claimName": "models"}},
                "path": "v1/encoder.onnx",
            },
            {"name": "small", "configMap": "cm", "key": "fast.onnx"},
            policy={"name": "brh", "params": {"predictor": learned}},
        )
    )
    enc, small = spec.routing.predictor_models
    assert enc.file() == "v1/encoder.onnx" and small.file() == "fast.onnx"
    assert spec.routing.policy.params["predictor"] == learned  # the name stays in the spec


def test_live_policies_with_params_are_accepted() -> None:
    for name, params in [
        ("impact", {"impact_weight": 2.0, "prefix_aware": True}),
        ("br0", {"window": 8}),
        ("brh", {"horizon": 4}),
        ("gie-default", {}),
        ("round-robin", {}),
    ]:
        spec = parse_spec(_minimal(routing={"policy": {"name": name, "params": params}}))
        assert spec.routing.policy.params == params
