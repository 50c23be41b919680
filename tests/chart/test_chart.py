"""The Helm chart ``charts/llmpool`` and the plain manifests generated from it.

Helm v4 comes from a PyPI wheel (``helm.py``, fixture ``helm``). Every rendered object is
validated offline: built-in kinds with ``kubernetes_validate`` (strict, Kubernetes 1.30 to
1.37), LLMPool / InferencePool instances with ``jsonschema`` against the openAPIV3Schema of
the chart's own CRDs, other custom kinds (Gateway API, Istio, prometheus-operator, Kopf)
by their apiVersion, kind and metadata.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llmpool"
MANIFESTS = REPO / "manifests"
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(30, 38)]
NS = "llmpool-system"

#: Custom kinds the chart renders whose schemas kubernetes_validate does not know.
CUSTOM_KINDS = {
    ("llmpool.io/v1alpha1", "LLMPool"): True,  # namespaced?
    ("inference.networking.k8s.io/v1", "InferencePool"): True,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): True,
    ("gateway.networking.k8s.io/v1", "Gateway"): True,
    ("networking.istio.io/v1", "DestinationRule"): True,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): True,
    ("kopf.dev/v1", "KopfPeering"): True,
    ("kopf.dev/v1", "ClusterKopfPeering"): False,
    ("cert-manager.io/v1", "Certificate"): True,
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

#: Non-default value sets: id -> values.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "sample-cpu": {"sample": {"enabled": True, "kind": "cpu"}},
    "sample-gpu": {"sample": {"enabled": True, "kind": "gpu", "namespace": "llm"}},
    "sample-npu": {"sample": {"enabled": True, "kind": "npu", "name": "ascend"}},
    "gateway-istio": {
        "sample": {"enabled": True, "kind": "gpu", "namespace": "llm"},
        "gateway": {"provider": "istio", "name": "shared-gw", "namespace": "istio-ingress"},
    },
    "gateway-istio-sample-cpu": {
        "sample": {"enabled": True, "kind": "cpu"},
        "gateway": {"provider": "istio", "create": True},
    },
    "gateway-kgateway-create": {
        "gateway": {
            "provider": "kgateway",
            "create": True,
            "route": {"pool": "my-pool", "namespace": "llm", "hostnames": ["llm.example.test"]},
        },
    },
    "standalone": {"peering": {"enabled": False}, "replicaCount": 1},
    "webhook": {"webhook": {"enabled": True}},
    "webhook-cert-manager-namespaced": {
        "webhook": {
            "enabled": True,
            "failurePolicy": "Fail",
            "certManager": {"enabled": True, "issuerKind": "ClusterIssuer", "issuerName": "internal-ca"},
        },
        "operator": {"scope": "namespaces", "watchNamespaces": ["llm"]},
    },
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "namespaced": {"operator": {"scope": "namespaces", "watchNamespaces": ["llm", "team-a"]}},
    "customized": {
        "fullnameOverride": "llmp",
        "image": {"repository": "mirror.internal/llmpool/llmpool-operator", "tag": "dev"},
        "metrics": {"enabled": False},
        "operator": {
            "logFormat": "text",
            "postEvents": False,
            "verbose": True,
            "extraArgs": ["--priority=5"],
        },
        "podAnnotations": {"example.test/scrape": "false"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "llmpool-operator"}},
                        },
                    }
                ]
            }
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "serviceAccount": {"annotations": {"example.test/role": "x"}},
    },
}

#: Bad values -> a fragment Helm's error must contain (the field's path or our message).
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "replicas-zero": ({"replicaCount": 0}, "/replicaCount"),
    "sample-kind": ({"sample": {"enabled": True, "kind": "tpu"}}, "/sample/kind"),
    "gateway-provider": ({"gateway": {"provider": "nginx"}}, "/gateway/provider"),
    "unknown-key": ({"replicas": 2}, "'replicas' not allowed"),
    "namespace-name": ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    "pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "timeout": ({"gateway": {"route": {"requestTimeout": "5 minutes"}}}, "/gateway/route/requestTimeout"),
    "standalone-replicas": ({"peering": {"enabled": False}}, "replicaCount > 1 needs peering.enabled"),
    "namespaced-empty": ({"operator": {"scope": "namespaces"}}, "operator.watchNamespaces"),
    "route-without-pool": ({"gateway": {"provider": "kgateway"}}, "gateway.route.pool is required"),
    "webhook-issuer": (
        {"webhook": {"enabled": True, "certManager": {"enabled": True}}},
        "webhook.certManager.issuerName must name",
    ),
    "webhook-policy": ({"webhook": {"failurePolicy": "Maybe"}}, "/webhook/failurePolicy"),
}


@cache
def _crd_schema(kind: str) -> dict[str, Any]:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "CustomResourceDefinition" and doc["spec"]["names"]["kind"] == kind:
                version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
                schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
                return schema
    raise KeyError(kind)


def _validate_custom(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    assert key in CUSTOM_KINDS, f"unexpected custom kind {key}"
    meta = obj["metadata"]
    assert DNS_SUBDOMAIN.match(meta["name"]), meta
    assert bool(meta.get("namespace")) == CUSTOM_KINDS[key], f"{key}: namespace {meta.get('namespace')!r}"
    if obj["kind"] in ("LLMPool", "InferencePool"):
        jsonschema.Draft4Validator(_crd_schema(obj["kind"])).validate(obj)


_validated: set[tuple[str, str]] = set()


def validate_objects(objs: list[dict[str, Any]]) -> None:
    """Every object against every Kubernetes version (each distinct object only once)."""
    for obj in objs:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            _validate_custom(obj)
            continue
        blob = json.dumps(obj, sort_keys=True)
        for version in K8S_VERSIONS:
            if (version, blob) in _validated:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {exc}"
                )
            _validated.add((version, blob))


def _by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = _by_kind(objs, "Deployment")
    container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


# --- lint and render ---------------------------------------------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["version"], chart["appVersion"]) == ("v2", "0.1.0", "0.1.0")
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint(helm: Any, strict: bool) -> None:
    for extra in ([], ["--set", "sample.enabled=true,gateway.provider=kgateway,gateway.create=true"]):
        out = helm.run(["lint", str(CHART), *(["--strict"] if strict else []), *extra]).stdout
        assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_template_validates(helm: Any, name: str) -> None:
    objs = helm.template(CHART, "llmpool", NS, VALUE_SETS[name], extra=["--include-crds"])
    assert _by_kind(objs, "CustomResourceDefinition")
    validate_objects(objs)
    kinds = {o["kind"] for o in objs}
    args = _container(objs)["args"]
    if name == "default":
        assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= kinds
        assert {"ClusterKopfPeering"} <= kinds and not kinds & {"LLMPool", "HTTPRoute", "ServiceMonitor"}
        assert "--all-namespaces" in args and args[args.index("--peering") + 1] == "llmpool-operator"
        assert args[args.index("--picker-image") + 1] == "llmpool/llmpool-picker:0.1.0"
        assert _container(objs)["image"] == "llmpool/llmpool-operator:0.1.0"
        sc = _container(objs)["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False
        assert _container(objs)["resources"]["limits"] and _container(objs)["resources"]["requests"]
        (dep,) = _by_kind(objs, "Deployment")
        assert (
            dep["spec"]["replicas"] == 2
            and dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
        )
        probe = _container(objs)["livenessProbe"]["httpGet"]
        assert (
            probe["path"] == "/healthz"
            and {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in (_container(objs)["ports"])
        )
    elif name.startswith("sample-"):
        (pool,) = _by_kind(objs, "LLMPool")
        expect = {
            "sample-cpu": ("tiny-cpu", NS),
            "sample-gpu": ("llama-gpu", "llm"),
            "sample-npu": ("ascend", NS),
        }
        assert (pool["metadata"]["name"], pool["metadata"]["namespace"]) == expect[name]
    elif name.startswith("gateway-"):
        (route,) = _by_kind(objs, "HTTPRoute")
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        assert backend["group"] == "inference.networking.k8s.io" and backend["kind"] == "InferencePool"
        parent = route["spec"]["parentRefs"][0]
        if name == "gateway-istio":
            assert backend["name"] == "llama-gpu" and route["metadata"]["namespace"] == "llm"
            assert (parent["name"], parent["namespace"]) == ("shared-gw", "istio-ingress")
            assert not _by_kind(objs, "Gateway")
            (dr,) = _by_kind(objs, "DestinationRule")  # TLS picker
            assert dr["spec"]["host"] == "llama-gpu-picker.llm.svc.cluster.local"
        elif name == "gateway-istio-sample-cpu":
            (gw,) = _by_kind(objs, "Gateway")
            assert gw["spec"]["gatewayClassName"] == "istio" and backend["name"] == "tiny-cpu"
            assert not _by_kind(objs, "DestinationRule")  # the CPU sample's picker is plaintext
        else:
            (gw,) = _by_kind(objs, "Gateway")
            assert gw["spec"]["gatewayClassName"] == "kgateway"
            assert (gw["metadata"]["namespace"], route["metadata"]["namespace"]) == ("llm", "llm")
            assert backend["name"] == "my-pool" and parent["name"] == gw["metadata"]["name"]
            assert route["spec"]["hostnames"] == ["llm.example.test"]
            assert gw["spec"]["listeners"][0]["allowedRoutes"]["namespaces"]["from"] == "Same"
    elif name == "standalone":
        assert "--standalone" in args and "--peering" not in args
        assert not kinds & {"ClusterKopfPeering", "KopfPeering"}
        (role,) = _by_kind(objs, "ClusterRole")
        assert all("kopf.dev" not in r["apiGroups"] for r in role["rules"])
    elif name.startswith("webhook"):
        _check_webhook(objs, args, cert_manager=name != "webhook")
    elif name == "servicemonitor":
        (sm,) = _by_kind(objs, "ServiceMonitor")
        assert (
            sm["metadata"]["labels"]["release"] == "prom" and sm["spec"]["endpoints"][0]["port"] == "metrics"
        )
    elif name == "namespaced":
        assert "--all-namespaces" not in args and args.count("--namespace") == 2
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
        assert sorted(r["metadata"]["namespace"] for r in _by_kind(objs, "Role")) == ["llm", "team-a"]
        assert sorted(r["metadata"]["namespace"] for r in _by_kind(objs, "KopfPeering")) == ["llm", "team-a"]
        for binding in _by_kind(objs, "RoleBinding"):
            assert binding["subjects"][0]["namespace"] == NS
    elif name == "customized":
        assert "--no-events" in args and "--verbose" in args and args[-1] == "--priority=5"
        assert args[args.index("--metrics-port") + 1] == "0" and "Service" not in kinds
        assert _container(objs)["image"] == "mirror.internal/llmpool/llmpool-operator:dev"
        assert all(
            o["metadata"]["name"].startswith("llmp") for o in objs if o["kind"] != "CustomResourceDefinition"
        )


def _check_webhook(objs: list[dict[str, Any]], args: list[str], *, cert_manager: bool) -> None:
    """The webhook's Service, configuration and certificate fit the operator's flags."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    from llmpool_operator.main import build_parser

    (cfg,) = _by_kind(objs, "ValidatingWebhookConfiguration")
    (hook,) = cfg["webhooks"]
    svc = next(o for o in _by_kind(objs, "Service") if o["metadata"]["name"].endswith("-webhook"))
    ref = hook["clientConfig"]["service"]
    assert (ref["name"], ref["namespace"], ref["port"]) == (svc["metadata"]["name"], NS, 443)
    assert ref["path"] == "/validate-spec"  # Kopf serves a handler at /<its id>
    assert hook["rules"][0]["resources"] == ["llmpools"] and hook["sideEffects"] == "None"
    flags = build_parser().parse_args(args)
    assert flags.webhook_port == 9443 and svc["spec"]["ports"][0]["targetPort"] == "webhook"
    container = _container(objs)
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    (mount,) = container["volumeMounts"]
    assert flags.webhook_cert == f"{mount['mountPath']}/tls.crt" and mount["readOnly"]
    (dep,) = _by_kind(objs, "Deployment")
    (vol,) = dep["spec"]["template"]["spec"]["volumes"]
    secret_name = vol["secret"]["secretName"]
    host = f"{svc['metadata']['name']}.{NS}.svc"
    if cert_manager:
        (cert,) = _by_kind(objs, "Certificate")
        assert cert["spec"]["secretName"] == secret_name and host in cert["spec"]["dnsNames"]
        inject = cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert inject == f"{NS}/{cert['metadata']['name']}"
        assert "caBundle" not in hook["clientConfig"] and hook["failurePolicy"] == "Fail"
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["llm"]
        return
    (secret,) = [o for o in _by_kind(objs, "Secret") if o["metadata"]["name"] == secret_name]
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    # the API server verifies the serving certificate with the caBundle, for the Service's name
    ca.public_key().verify(  # type: ignore[call-arg,union-attr]
        leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm
    )
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert host in sans.get_values_for_type(x509.DNSName)
    assert hook["failurePolicy"] == "Ignore" and "namespaceSelector" not in hook


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_bad_values_rejected(helm: Any, helm_mod: ModuleType, name: str) -> None:
    values, fragment = BAD_VALUES[name]
    with pytest.raises(helm_mod.HelmError) as info:
        helm.template(CHART, "llmpool", NS, values)
    assert fragment in info.value.stderr, info.value.stderr


def test_kube_versions(helm: Any, helm_mod: ModuleType) -> None:
    for version in K8S_VERSIONS:
        assert helm.template(CHART, extra=["--kube-version", version])
    with pytest.raises(helm_mod.HelmError):
        helm.template(CHART, extra=["--kube-version", "1.29.0"])


def test_notes(helm: Any) -> None:
    notes = helm.run(["install", "llmpool", str(CHART), "--dry-run=client", "-n", NS]).stdout
    assert "kubectl get llmpools" in notes and "manifests/samples/llmpool-cpu.yaml" in notes
    notes = helm.run(
        ["install", "llmpool", str(CHART), "--dry-run=client", "-n", NS, "--set",
         "sample.enabled=true,gateway.provider=kgateway,gateway.create=true"]
    ).stdout  # fmt: skip
    assert "HTTPRoute llmpool-system/tiny-cpu" in notes and "port-forward" in notes


# --- generated manifests -----------------------------------------------------------------------


def test_manifests_are_current(helm: Any, generate_mod: ModuleType) -> None:
    stale = generate_mod.stale_files(generate_mod.render(helm))
    assert not stale, f"stale generated manifests (run `python manifests/generate.py`): {stale}"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_manifests_layout_and_validity() -> None:
    top = sorted(MANIFESTS.glob("*.yaml"))
    assert [p.name for p in top] == ["00-crds.yaml", "10-operator.yaml"]
    crds = _docs(top[0])
    assert {d["kind"] for d in crds} == {"CustomResourceDefinition"}
    assert {d["metadata"]["name"] for d in crds} == {
        "llmpools.llmpool.io",
        "inferencepools.inference.networking.k8s.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    operator = _docs(top[1])
    # Only built-in kinds in `kubectl apply -f manifests/` besides the CRDs: no "no matches for kind".
    assert all((d["apiVersion"], d["kind"]) not in CUSTOM_KINDS for d in operator)
    assert operator[0]["kind"] == "Namespace" and operator[0]["metadata"]["name"] == NS
    peering = [d for p in sorted((MANIFESTS / "peering").glob("*.yaml")) for d in _docs(p)]
    assert [(d["kind"], d["metadata"]["name"]) for d in peering] == [
        ("ClusterKopfPeering", "llmpool-operator")
    ]
    samples = {p.stem: _docs(p) for p in sorted((MANIFESTS / "samples").glob("*.yaml"))}
    assert set(samples) == {"llmpool-cpu", "llmpool-gpu", "llmpool-npu"}
    kinds = {stem: docs[0]["spec"]["accelerator"]["kind"] for stem, docs in samples.items()}
    assert kinds == {"llmpool-cpu": "none", "llmpool-gpu": "nvidia-gpu", "llmpool-npu": "ascend-npu"}
    validate_objects(crds + operator + peering + [d for docs in samples.values() for d in docs])
    text = "".join(p.read_text() for p in MANIFESTS.rglob("*.yaml"))
    assert "helm.sh/chart" not in text and "managed-by: Helm" not in text


# --- hygiene -----------------------------------------------------------------------------------

REGISTRY_HOSTS = re.compile(
    r"\b(ghcr\.io|docker\.io|quay\.io|gcr\.io|registry\.k8s\.io|k8s\.gcr\.io|public\.ecr\.aws|"
    r"[a-z0-9.-]*\.dkr\.ecr\.[a-z0-9.-]*amazonaws\.com|[a-z0-9-]+\.azurecr\.io|nvcr\.io|mcr\.microsoft\.com|"
    r"registry\.gitlab\.com|[a-z0-9-]+-docker\.pkg\.dev|docker\.pkg\.github\.com|swr\.[a-z0-9-]+\.myhuaweicloud\.com)",
    re.IGNORECASE,
)
# Paths of the machine running the tests (home, the checkout's parent, the interpreter's
# environment), derived here rather than written down, so this file names no machine's paths.
_MACHINE_DIRS = {Path.home(), REPO.parent, Path(sys.prefix)} - {Path("/")}
LOCAL_PATHS = re.compile("|".join(re.escape(str(p) + "/") for p in _MACHINE_DIRS))


def _chart_and_manifest_files() -> list[Path]:
    files = [p for base in (CHART.parent, MANIFESTS) for p in sorted(base.rglob("*")) if p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts and p.name != "generate.py"]


def test_no_registry_hosts_or_local_paths() -> None:
    offenders = []
    for path in _chart_and_manifest_files():
        text = path.read_text()
        for pattern in (REGISTRY_HOSTS, LOCAL_PATHS):
            offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders
    # Every image reference in the manifests is host-less (first path component has no dot).
    for path in MANIFESTS.rglob("*.yaml"):
        for image in re.findall(r"^\s*(?:- )?image: *(\S+)", path.read_text(), flags=re.MULTILINE):
            assert "." not in image.split("/")[0], f"{path.name}: {image}"
