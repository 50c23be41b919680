"""The ``LLMPool`` custom resource's spec as typed pydantic models (``llmpool.io/v1alpha1``).

These models mirror ``charts/llmpool/crds/llmpool.io_llmpools.yaml`` field for field, with the
same defaults (YAML keys are camelCase; Python attributes are snake_case, and either
spelling is accepted). :func:`parse_spec` is the one entry point: it also enforces the
cross-field rules that the CRD expresses as CEL ``x-kubernetes-validations`` (offline
JSON-schema validators do not run CEL, so the tests exercise those rules here) and the
ones no schema can express, such as the routing policy's parameters, which are checked
with :func:`llmpool.routing.builtin_registry` (unknown and lab-only policies are refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from llmpool.predict.names import resolve_model_names
from llmpool.routing import builtin_registry
from llmpool.routing.policy import ConfigError, PolicyConfig, PolicyRegistry

__all__ = [
    "DEFAULT_CPU_IMAGE",
    "DEFAULT_GPU_IMAGE",
    "DEFAULT_NPU_IMAGE",
    "DEFAULT_RESOURCE_NAMES",
    "MAX_TARGET_PORTS",
    "AcceleratorKind",
    "AcceleratorSpec",
    "EngineSpec",
    "EnvVar",
    "ImageVolume",
    "ModelSource",
    "ModelSpec",
    "PickerSpec",
    "PolicySpec",
    "PoolSpec",
    "PredictorModelRef",
    "PredictorVolume",
    "PvcSource",
    "PvcVolume",
    "ResourceRequirements",
    "RoutingSpec",
    "SaturationSpec",
    "SecretKeyRef",
    "SpecError",
    "parse_spec",
]

#: Engine images used when ``spec.engine.image`` is unset, per accelerator kind.
#: Plain names (no registry host); pin or mirror them with ``spec.engine.image``.
DEFAULT_GPU_IMAGE = "vllm/vllm-openai:v0.32.0"
DEFAULT_NPU_IMAGE = "ascend/vllm-ascend:v0.23.0"
DEFAULT_CPU_IMAGE = "vllm/vllm-openai-cpu:v0.32.0-x86_64"

#: An InferencePool lists at most this many target ports (one per data-parallel rank).
MAX_TARGET_PORTS = 8


class SpecError(ValueError):
    """An LLMPool spec is invalid; ``str(err)`` is one readable line naming the field."""


class AcceleratorKind(StrEnum):
    NVIDIA_GPU = "nvidia-gpu"
    ASCEND_NPU = "ascend-npu"
    NONE = "none"


#: Extended resource requested per pod when ``accelerator.resourceName`` is unset.
DEFAULT_RESOURCE_NAMES: dict[AcceleratorKind, str] = {
    AcceleratorKind.NVIDIA_GPU: "nvidia.com/gpu",
    AcceleratorKind.ASCEND_NPU: "huawei.com/Ascend910",
}


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False
    )


Quantity = str | int | float


# --- model -------------------------------------------------------------------------


class PvcSource(_Model):
    """A PersistentVolumeClaim holding the model's files (mounted read-only)."""

    claim_name: str = Field(min_length=1)
    sub_path: str | None = Field(default=None, description="Directory inside the claim holding the model.")


class ModelSource(_Model):
    """Where the weights come from: exactly one of a Hugging Face id, a PVC, or a path."""

    hugging_face: str | None = Field(default=None, min_length=1, description="A Hugging Face repo id.")
    pvc: PvcSource | None = None
    path: str | None = Field(
        default=None, pattern=r"^/", description="A path on the node (hostPath, read-only)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [
            n for n, v in (("huggingFace", self.hugging_face), ("pvc", self.pvc), ("path", self.path)) if v
        ]
        if len(given) != 1:
            raise ValueError(f"exactly one of huggingFace, pvc, path must be set, got {len(given)}")
        return self


class SecretKeyRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(default="token", min_length=1)


class ModelSpec(_Model):
    name: str = Field(min_length=1, description="The served model name clients send in `model`.")
    source: ModelSource
    tokenizer: str | None = Field(default=None, min_length=1, description="vLLM --tokenizer (id or path).")
    hf_token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret with a Hugging Face token (HF_TOKEN), for gated models."
    )
    cache_size_limit: str | None = Field(
        default=None, description="sizeLimit of the emptyDir cache the weights download into."
    )


# --- engine ------------------------------------------------------------------------


class EnvVar(_Model):
    name: str = Field(min_length=1)
    value: str = ""


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class EngineSpec(_Model):
    image: str | None = Field(default=None, min_length=1, description="Default depends on accelerator.kind.")
    extra_args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    data_parallel_size: int = Field(default=1, ge=1, le=MAX_TARGET_PORTS)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None
    port: int = Field(default=8000, ge=1024, le=65535 - MAX_TARGET_PORTS)
    shm_size_limit: str = Field(default="8Gi", min_length=1)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)

    def rank_ports(self) -> list[int]:
        """One API port per data-parallel rank: ``port``, ``port + 1``, ..."""
        return [self.port + r for r in range(self.data_parallel_size)]


# --- accelerator -------------------------------------------------------------------


class AcceleratorSpec(_Model):
    kind: AcceleratorKind = AcceleratorKind.NVIDIA_GPU
    resource_name: str | None = Field(default=None, min_length=1)
    count: int | None = Field(
        default=None, ge=1, description="Devices per pod; default tensorParallelSize * dataParallelSize."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    runtime_class_name: str | None = Field(default=None, min_length=1)

    def effective_resource_name(self) -> str | None:
        if self.kind is AcceleratorKind.NONE:
            return None
        return self.resource_name or DEFAULT_RESOURCE_NAMES[self.kind]


# --- routing -----------------------------------------------------------------------


class PolicySpec(_Model):
    name: str = Field(default="impact", min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class SaturationSpec(_Model):
    queue_threshold: int = Field(default=5, ge=0)
    kv_threshold: float = Field(default=0.8, gt=0, le=1)


#: A relative path inside a volume: segments of letters, digits, ``_ - .`` that do not start
#: with a dot (so no ``..``, no hidden files, no leading ``/``). The CRD has the same pattern.
RELATIVE_PATH_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_.]*(/[A-Za-z0-9_][-A-Za-z0-9_.]*)*$"


class PvcVolume(_Model):
    """A PersistentVolumeClaim (mounted read-only)."""

    claim_name: str = Field(min_length=1, max_length=253)


class ImageVolume(_Model):
    """An OCI image or artifact as a read-only volume (Kubernetes image volumes: alpha in 1.31,
    beta and on by default since 1.33)."""

    reference: str = Field(min_length=1, max_length=1024)
    pull_policy: Literal["Always", "Never", "IfNotPresent"] | None = None


class PredictorVolume(_Model):
    """Where a large model's files live: exactly one of a PVC or an image volume.

    hostPath is deliberately not offered: the picker must not read the node's file system.
    """

    persistent_volume_claim: PvcVolume | None = None
    image: ImageVolume | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_host_path(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and ("hostPath" in data or "host_path" in data):
            raise ValueError("hostPath is not allowed; use persistentVolumeClaim or image")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictorVolume:
        if (self.persistent_volume_claim is None) == (self.image is None):
            raise ValueError("exactly one of persistentVolumeClaim, image must be set")
        return self


class PredictorModelRef(_Model):
    """A learned predictor's model, mounted read-only into the picker under ``name``.

    Either one ConfigMap key (``configMap`` + ``key``; small files such as a fast-tier copy:
    ConfigMaps hold at most 1 MiB) or a volume (``volume`` + ``path``: the model's ``.onnx``
    inside it; the encoder tier's ``encoder.json``, ``encoder.head.onnx`` and
    ``tokenizer.json`` sit beside it on the same volume).
    """

    name: str = Field(min_length=1, max_length=50, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    config_map: str | None = Field(default=None, min_length=1, max_length=253)
    key: str | None = Field(default=None, min_length=1, max_length=253)
    volume: PredictorVolume | None = None
    path: str | None = Field(default=None, max_length=1024, pattern=RELATIVE_PATH_PATTERN)

    @model_validator(mode="after")
    def _one_source(self) -> PredictorModelRef:
        if (self.config_map is None) == (self.volume is None):
            raise ValueError("exactly one of configMap, volume must be set")
        if self.config_map is not None and (self.key is None or self.path is not None):
            raise ValueError("configMap takes key (and no path)")
        if self.volume is not None and (self.path is None or self.key is not None):
            raise ValueError("volume takes path (and no key)")
        return self

    def file(self) -> str:
        """The model file relative to its mount directory."""
        f = self.key if self.config_map is not None else self.path
        assert f is not None
        return f


class RoutingSpec(_Model):
    policy: PolicySpec = Field(default_factory=PolicySpec)
    profile: str | None = Field(default="a100-llama3-8b", min_length=1)
    predictor_models: list[PredictorModelRef] = Field(default_factory=list)
    scrape_interval_seconds: float = Field(default=0.05, gt=0)
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose"
    max_endpoints: int = Field(default=1, ge=1, le=16)
    saturation: SaturationSpec = Field(default_factory=SaturationSpec)
    objectives: dict[str, int] = Field(default_factory=dict)
    max_queue_wait_seconds: float = Field(default=30.0, gt=0)


# --- picker ------------------------------------------------------------------------


class PickerSpec(_Model):
    replicas: int = Field(default=1, ge=0)
    image: str | None = Field(default=None, min_length=1, description="Default: the operator's picker image.")
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    plaintext: bool = Field(default=False, description="Serve ext_proc without TLS (--plaintext).")
    transport: Literal["h2", "grpclib", "grpcio"] = Field(
        default="h2", description="gRPC implementation serving ext_proc (--transport)."
    )


# --- the whole spec ----------------------------------------------------------------


class PoolSpec(_Model):
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    accelerator: AcceleratorSpec = Field(default_factory=AcceleratorSpec)
    replicas: int = Field(default=1, ge=0)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    picker: PickerSpec = Field(default_factory=PickerSpec)

    @property
    def autoscaled(self) -> bool:
        """True when min/max replicas are set: an autoscaler owns ``spec.replicas`` via the
        scale subresource, and the operator only follows it (never resets it)."""
        return self.max_replicas is not None

    def engine_image(self) -> str:
        if self.engine.image:
            return self.engine.image
        return {
            AcceleratorKind.NVIDIA_GPU: DEFAULT_GPU_IMAGE,
            AcceleratorKind.ASCEND_NPU: DEFAULT_NPU_IMAGE,
            AcceleratorKind.NONE: DEFAULT_CPU_IMAGE,
        }[self.accelerator.kind]

    def devices_per_pod(self) -> int:
        """Accelerator devices requested per pod (0 for CPU pools)."""
        if self.accelerator.kind is AcceleratorKind.NONE:
            return 0
        if self.accelerator.count is not None:
            return self.accelerator.count
        return self.engine.tensor_parallel_size * self.engine.data_parallel_size

    @model_validator(mode="after")
    def _cross_field(self) -> PoolSpec:
        # Mirrors of the CRD's CEL rules -------------------------------------------
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("minReplicas: requires maxReplicas")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError(f"minReplicas: {self.min_replicas} exceeds maxReplicas {self.max_replicas}")
        acc = self.accelerator
        if acc.kind is AcceleratorKind.NONE and (acc.count is not None or acc.resource_name is not None):
            raise ValueError("accelerator: kind none takes no count or resourceName")
        if acc.kind is AcceleratorKind.NONE and self.engine.tensor_parallel_size > 1:
            raise ValueError("engine.tensorParallelSize: must be 1 for a CPU pool (accelerator.kind none)")
        need = self.engine.tensor_parallel_size * self.engine.data_parallel_size
        if acc.count is not None and acc.count != need:
            raise ValueError(
                f"accelerator.count: {acc.count} devices per pod, but tensorParallelSize * "
                f"dataParallelSize = {need}"
            )
        # Beyond the schema ---------------------------------------------------------
        names = [m.name for m in self.routing.predictor_models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"routing.predictorModels: duplicate name {', '.join(dup)}")
        if "fast" in names:
            raise ValueError("routing.predictorModels: 'fast' is the built-in model's name; choose another")
        _check_policy(self.routing.policy, names)
        return self


@cache
def _registry() -> PolicyRegistry:
    return builtin_registry()


def _check_policy(policy: PolicySpec, model_names: list[str]) -> None:
    reg = _registry()
    try:
        spec = reg.spec(policy.name)
        if spec.lab_only:
            live = ", ".join(s.name for s in reg if not s.lab_only)
            raise ConfigError(f"policy {policy.name!r} is lab-only; live policies: {live}")
        # A learned predictor may name a model of predictorModels. The files are only in the
        # picker's pod: the parameters are checked with the packaged model in their place.
        params = resolve_model_names(
            dict(policy.params), dict.fromkeys(model_names, "fast"), where="params", source="predictorModels"
        )
        reg.validate(PolicyConfig(name=policy.name, params=params))
    except ConfigError as err:
        raise ValueError(f"routing.policy: {err}") from None


def _camel_loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(to_camel(p) if isinstance(p, str) else str(p) for p in loc)


def parse_spec(raw: Mapping[str, Any]) -> PoolSpec:
    """Validate an LLMPool's ``spec`` (the CR's mapping) into a :class:`PoolSpec`.

    Raises :class:`SpecError` with one line such as
    ``spec.engine.tensorParallelSize: Input should be greater than or equal to 1``.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(f"spec: must be a mapping, not {type(raw).__name__}")
    try:
        return PoolSpec.model_validate(dict(raw))
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = _camel_loc(tuple(e["loc"]))
            msg = e["msg"].removeprefix("Value error, ")
            if not loc and ":" in msg:  # a model-level rule already names its field
                parts.append(f"spec.{msg}")
            else:
                parts.append(f"spec.{loc}: {msg}" if loc else f"spec: {msg}")
        raise SpecError("; ".join(" ".join(p.split()) for p in parts)) from None
