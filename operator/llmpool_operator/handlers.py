"""Kopf handlers for the ``LLMPool`` custom resource (``llmpool.io/v1alpha1``).

Everything is registered on an explicit :class:`kopf.OperatorRegistry` returned by
:func:`build_registry`; importing this module registers nothing. The handlers only
orchestrate: :func:`llmpool_operator.spec.parse_spec` validates, the pure builders in
:mod:`llmpool_operator.builders` render the children, and :class:`KubeAccess` applies
them with the official ``kubernetes`` client (blocking calls run in ``asyncio.to_thread``).

Reconciliation is level-based: one function serves create / resume / update, and a timer
re-runs it every ``drift_interval`` seconds so that a child deleted or edited by hand is
recreated or patched back. A child is patched only when a field we manage differs from the
live object, so a routing edit touches only the ConfigMap and an engine edit only the vLLM
Deployment. A bad spec never applies anything: it sets ``Degraded`` and posts one Event.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes
from prometheus_client import CollectorRegistry, Counter, Histogram

from llmpool_operator import builders
from llmpool_operator.spec import PoolSpec, SpecError, parse_spec

__all__ = [
    "GROUP",
    "PLURAL",
    "VERSION",
    "KubeAccess",
    "OperatorConfig",
    "OperatorMetrics",
    "build_registry",
    "compute_status",
    "configure_settings",
    "is_subset",
    "object_path",
]

GROUP = "llmpool.io"
VERSION = "v1alpha1"
PLURAL = "llmpools"

#: Kind → plural of every child kind the builders emit.
PLURALS: dict[str, str] = {
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "Service": "services",
    "InferencePool": "inferencepools",
}


CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "RoutingConfigured")

_log = logging.getLogger(__name__)


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorConfig:
    """What the handlers need besides the CR: the picker image and the drift timer."""

    picker_image: str | None = None  # None: the builders' default
    drift_interval: float = 30.0
    drift_idle: float = 10.0
    admission: bool = False  # register the validating admission handler (needs a webhook server)

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """``LLMPOOL_PICKER_IMAGE``, ``LLMPOOL_DRIFT_INTERVAL``, ``LLMPOOL_DRIFT_IDLE`` (for ``kopf run``)."""
        return cls(
            picker_image=os.environ.get("LLMPOOL_PICKER_IMAGE") or None,
            drift_interval=float(os.environ.get("LLMPOOL_DRIFT_INTERVAL", "30")),
            drift_idle=float(os.environ.get("LLMPOOL_DRIFT_IDLE", "10")),
        )


def configure_settings(
    settings: Any,
    *,
    persistence: str = "annotations",
    posting: bool = True,
    watch_timeout: float = 300.0,
) -> None:
    """Apply the operator's Kopf settings (``settings`` is a ``kopf.OperatorSettings``).

    ``persistence`` is ``annotations`` (default; works with any CRD schema) or ``status``
    (keeps progress and the diff base under ``status.kopf``; the CRD's status schema must
    preserve unknown fields there). Namespace scanning is off: we watch the namespaces we are
    told to (or all of them), and never need to list namespaces.
    """
    if persistence == "annotations":
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
    elif persistence == "status":
        settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diffBase")
    else:
        raise ValueError(f"persistence must be annotations or status, not {persistence!r}")
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    settings.posting.enabled = posting
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = watch_timeout
    settings.watching.client_timeout = watch_timeout + 30
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 4


# --- metrics ---------------------------------------------------------------------------


class OperatorMetrics:
    """The operator's Prometheus metrics, on their own registry (served by ``main``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconciles = Counter(
            "llmpool_operator_reconciles",
            "LLMPool reconciliations by trigger and result (ok, degraded, error).",
            ["trigger", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "llmpool_operator_reconcile_duration_seconds",
            "Wall time of one LLMPool reconciliation.",
            ["trigger"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.children = Counter(
            "llmpool_operator_children_applied",
            "Child objects applied, by kind and action (created, patched, unchanged).",
            ["kind", "action"],
            registry=self.registry,
        )
        self.admission = Counter(
            "llmpool_operator_admission_reviews",
            "LLMPool admission reviews answered by the validating webhook, by result (allowed, denied).",
            ["result"],
            registry=self.registry,
        )


# --- API access ------------------------------------------------------------------------


class KubeAccess:
    """One ``kubernetes`` client configuration shared with Kopf's login.

    :meth:`login` loads the in-cluster service account or the kubeconfig (``$KUBECONFIG`` is
    read at call time, not at import time) into a private ``Configuration`` and hands Kopf
    the same credentials, so the watcher and the child writes use one identity.
    """

    def __init__(self) -> None:
        self._api: Any = None

    def login(self) -> Any:
        cfg = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            try:
                kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path, client_configuration=cfg
                )
            except (kubernetes.config.ConfigException, OSError) as err:
                raise kopf.LoginError(
                    f"no in-cluster service account and no usable kubeconfig: {err}"
                ) from err
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        parts = header.split(" ", 1) if header else []
        scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else tuple(parts)
        old, self._api = self._api, kubernetes.client.ApiClient(configuration=cfg)
        if old is not None:
            old.close()
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            username=cfg.username or None,
            password=cfg.password or None,
            scheme=scheme,
            token=token,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
        )

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def request(
        self, method: str, path: str, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any] | None:
        """One blocking API call; returns the decoded object, or None on 404."""
        if self._api is None:
            self.login()
        api = self._api
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        params = api.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        resp = api.call_api(*params, _request_timeout=30)
        resp.read()
        text = resp.data.decode("utf-8") if resp.data else ""
        if resp.status == 404:
            return None
        if not 200 <= resp.status <= 299:
            raise kubernetes.client.ApiException.from_response(http_resp=resp, body=text, data=None)
        decoded = json.loads(text) if text else {}
        return decoded if isinstance(decoded, dict) else {}


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """REST path of a namespaced child (``/api/v1/...`` or ``/apis/<group>/<version>/...``)."""
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    path = f"{base}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


# --- comparing desired and live state ----------------------------------------------------


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {} or value is False or value == 0


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, bool) or isinstance(have, bool):
        return False
    if isinstance(want, str | int | float) and isinstance(have, str | int | float):
        try:  # the API server normalises quantities ("1000m" → "1", 2 → "2")
            from kubernetes.utils import parse_quantity

            return bool(parse_quantity(want) == parse_quantity(have))  # type: ignore[no-untyped-call]
        except (ValueError, TypeError, ArithmeticError):
            return False
    return False


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of ``want`` is present (and equal) in ``have``.

    Extra live fields (server defaults, status, clusterIP, ...) are ignored; a missing live
    field equals an empty desired value (the server drops ``""``, ``false``, ``[]``, ``0``);
    lists must have the same length and match element-wise.
    """
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return False
        for key, value in want.items():
            if key not in have:
                if not _empty(value):
                    return False
            elif not is_subset(value, have[key]):
                return False
        return True
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        return all(is_subset(w, h) for w, h in zip(want, have, strict=True))
    return _same_scalar(want, have)


_MANAGED_META = ("labels", "annotations")


def _managed(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The fields we own: everything but metadata (and status), plus labels/annotations."""
    out = {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
    meta = obj.get("metadata", {})
    out["metadata"] = {k: meta[k] for k in _MANAGED_META if k in meta}
    return out


#: Annotation holding the managed fields of the last apply (as kubectl's last-applied): a
#: field in it that the desired state no longer has was ours and is deleted from the child.
LAST_APPLIED = f"{GROUP}/last-applied"


def removed_fields(last: Any, want: Any) -> dict[str, Any]:
    """Map keys present in ``last`` but not in ``want``, as a merge-patch fragment of nulls
    (nested maps recursed; lists are replaced whole by a merge patch, so they never need it)."""
    out: dict[str, Any] = {}
    if not isinstance(last, Mapping) or not isinstance(want, Mapping):
        return out
    for key, value in last.items():
        if key not in want:
            out[key] = None
        elif isinstance(value, Mapping):
            sub = removed_fields(value, want[key])
            if sub:
                out[key] = sub
    return out


def _present(nulls: Mapping[str, Any], live: Any) -> bool:
    """Whether any field ``nulls`` deletes is still in ``live``."""
    if not isinstance(live, Mapping):
        return False
    return any(key in live and (value is None or _present(value, live[key])) for key, value in nulls.items())


def _merge_nulls(body: dict[str, Any], nulls: Mapping[str, Any]) -> None:
    for key, value in nulls.items():
        if value is None:
            body[key] = None
        else:
            _merge_nulls(body.setdefault(key, {}), value)


def with_last_applied(desired: Mapping[str, Any]) -> dict[str, Any]:
    """``desired`` plus the annotation recording its managed fields (pure)."""
    out = dict(desired)
    meta = dict(out.get("metadata", {}))
    annotations = dict(meta.get("annotations", {}) or {})
    annotations[LAST_APPLIED] = json.dumps(_managed(desired), sort_keys=True, separators=(",", ":"))
    meta["annotations"] = annotations
    out["metadata"] = meta
    return out


def _last_applied(live: Mapping[str, Any]) -> dict[str, Any]:
    raw = (live.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    if not raw:
        return {}
    try:
        last = json.loads(raw)
    except ValueError:  # edited by hand: nothing can be pruned safely
        return {}
    return last if isinstance(last, dict) else {}


def _owner_refs_ok(desired: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    have = {r.get("uid") for r in live.get("metadata", {}).get("ownerReferences", []) or []}
    want = {r.get("uid") for r in desired.get("metadata", {}).get("ownerReferences", []) or []}
    return want <= have


def _patch_body(
    desired: Mapping[str, Any], live: Mapping[str, Any], nulls: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    body = _managed(desired)
    if nulls:
        _merge_nulls(body, nulls)
    live_refs = list(live.get("metadata", {}).get("ownerReferences", []) or [])
    uids = {r.get("uid") for r in live_refs}
    refs = live_refs + [
        r for r in desired.get("metadata", {}).get("ownerReferences", []) or [] if r.get("uid") not in uids
    ]
    if refs != live_refs:
        body["metadata"]["ownerReferences"] = refs
    return body


def apply_child(kube: KubeAccess, desired: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Create ``desired`` if missing, merge-patch it if a managed field differs or a field we
    applied before is no longer desired (it is deleted); else nothing.

    Returns ``(action, live_object)`` with action ``created``, ``patched`` or ``unchanged``.
    """
    desired = with_last_applied(desired)
    meta = desired["metadata"]
    path = object_path(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
    live = kube.request("GET", path)
    if live is None:
        created = kube.request(
            "POST", object_path(desired["apiVersion"], desired["kind"], meta["namespace"]), body=desired
        )
        return "created", created or dict(desired)
    want, have = _managed(desired), _managed(live)
    nulls = removed_fields(_last_applied(live), want)
    if is_subset(want, have) and _owner_refs_ok(desired, live) and not _present(nulls, have):
        return "unchanged", live
    patched = kube.request(
        "PATCH", path, body=_patch_body(desired, live, nulls), content_type="application/merge-patch+json"
    )
    return "patched", patched or live


# --- status ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    old: Sequence[Mapping[str, Any]],
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> dict[str, Any]:
    value = "True" if status else "False"
    previous = next((c for c in old if c.get("type") == ctype), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    cond: dict[str, Any] = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or _now(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def compute_status(
    *,
    old_status: Mapping[str, Any],
    generation: int | None,
    spec: PoolSpec | None,
    engine: Mapping[str, Any] | None,
    selector: str | None,
    error: str | None,
    error_reason: str = "InvalidSpec",
    routing_applied: bool = False,
) -> dict[str, Any]:
    """The LLMPool's ``status`` from the parsed spec and the vLLM Deployment (pure)."""
    old_conds = list(old_status.get("conditions") or [])
    dep_status = (engine or {}).get("status") or {}
    replicas = spec.replicas if spec is not None else old_status.get("replicas", 0)
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    dep_gen = (engine or {}).get("metadata", {}).get("generation")
    synced = "observedGeneration" in dep_status and (
        dep_gen is None or dep_status["observedGeneration"] >= dep_gen
    )
    ranks = spec.engine.data_parallel_size if spec is not None else 1
    policy = spec.routing.policy.name if spec is not None else old_status.get("effectivePolicy")

    if error is not None:
        phase = "Degraded"
        conds = [
            _condition(old_conds, "Ready", False, error_reason, error, generation),
            _condition(old_conds, "Progressing", False, error_reason, error, generation),
            _condition(old_conds, "Degraded", True, error_reason, error, generation),
            _condition(
                old_conds,
                "RoutingConfigured",
                routing_applied,
                "ConfigApplied" if routing_applied else error_reason,
                f"policy {policy}" if routing_applied else error,
                generation,
            ),
        ]
    else:
        if replicas == 0:
            phase, reason, msg = "Ready", "ScaledToZero", "spec.replicas is 0"
        elif synced and ready >= replicas and updated >= replicas:
            phase, reason, msg = "Ready", "ReplicasReady", f"{ready}/{replicas} replicas ready"
        elif not synced and not dep_status:
            phase, reason, msg = "Pending", "WaitingForDeployment", "the vLLM Deployment has no status yet"
        else:
            phase, reason, msg = "Progressing", "RollingOut", f"{ready}/{replicas} replicas ready"
        conds = [
            _condition(old_conds, "Ready", phase == "Ready", reason, msg, generation),
            _condition(
                old_conds, "Progressing", phase in ("Pending", "Progressing"), reason, msg, generation
            ),
            _condition(old_conds, "Degraded", False, "AsExpected", "", generation),
            _condition(old_conds, "RoutingConfigured", True, "ConfigApplied", f"policy {policy}", generation),
        ]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conds,
        "replicas": replicas,
        "readyReplicas": ready,
        "endpoints": ready * ranks,
        "effectivePolicy": policy,
        "lastError": error,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if selector is not None:
        status["selector"] = selector
    return status


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Only the top-level status keys that changed (no-op reconciles write nothing)."""
    return {k: v for k, v in new.items() if old.get(k) != v}


# --- the reconcile -----------------------------------------------------------------------


class _Reconciler:
    def __init__(self, config: OperatorConfig, metrics: OperatorMetrics, kube: KubeAccess) -> None:
        self.config = config
        self.metrics = metrics
        self.kube = kube
        self._locks: dict[str, asyncio.Lock] = {}
        self._engine_seen: dict[str, tuple[Any, ...]] = {}

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        self._locks.pop(uid, None)

    def _render(self, body: Any) -> tuple[PoolSpec, list[dict[str, Any]], builders.PoolRef]:
        b = builders
        meta = body["metadata"]
        spec = parse_spec(body.get("spec") or {})
        pool = b.PoolRef(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid"))
        kwargs = {} if self.config.picker_image is None else {"picker_image": self.config.picker_image}
        children = [dict(c) for c in b.build_children(pool, spec, **kwargs)]
        for child in children:
            if child.get("kind") not in PLURALS:
                raise ValueError(f"builder emitted an unsupported kind {child.get('kind')!r}")
            child.setdefault("metadata", {}).setdefault("namespace", meta["namespace"])
            kopf.adopt(child, owner=body)
            if child["kind"] == "InferencePool":
                # GIE: no controller may claim exclusive ownership of an InferencePool; a plain
                # owner reference (garbage collection with the LLMPool) is all we keep.
                for ref in child["metadata"]["ownerReferences"]:
                    if ref.get("uid") == meta.get("uid"):
                        ref["controller"] = False
        return spec, children, pool

    async def reconcile(self, trigger: str, body: Any, patch: Any, logger: Any) -> None:
        uid = body.get("metadata", {}).get("uid") or body["metadata"]["name"]
        started = time.perf_counter()
        async with self._lock(uid):
            result = await self._reconcile(body, patch, logger)
        self.metrics.reconciles.labels(trigger, result).inc()
        self.metrics.duration.labels(trigger).observe(time.perf_counter() - started)

    async def _reconcile(self, body: Any, patch: Any, logger: Any) -> str:
        meta = body["metadata"]
        old_status = dict(body.get("status") or {})
        generation = meta.get("generation")
        try:
            spec, children, pool = self._render(body)
        except SpecError as err:
            self._degraded(body, patch, old_status, generation, None, str(err), "InvalidSpec", False, logger)
            return "degraded"
        except Exception as err:  # a builder bug must not crash-loop the handler
            msg = f"cannot render children: {type(err).__name__}: {err}"
            self._degraded(body, patch, old_status, generation, None, msg, "RenderFailed", False, logger)
            return "degraded"

        engine: dict[str, Any] | None = None
        engine_name = builders.child_name(pool, "engine")
        routing_applied = False
        for child in children:
            kind = child["kind"]
            try:
                action, live = await asyncio.to_thread(apply_child, self.kube, child)
            except kubernetes.client.ApiException as err:
                if err.status is not None and (err.status >= 500 or err.status in (409, 429)):
                    raise kopf.TemporaryError(
                        f"{kind} {child['metadata']['name']}: {err.reason}", delay=15
                    ) from err
                msg = f"{kind} {child['metadata']['name']}: HTTP {err.status} {err.reason}"
                self._degraded(
                    body, patch, old_status, generation, spec, msg, "ApplyFailed", routing_applied, logger
                )
                return "degraded"
            except (OSError, kubernetes.client.exceptions.OpenApiException) as err:
                raise kopf.TemporaryError(f"{kind} {child['metadata']['name']}: {err}", delay=15) from err
            self.metrics.children.labels(kind, action).inc()
            if action != "unchanged":
                logger.info(f"{kind} {child['metadata']['name']} {action}")
            if kind == "ConfigMap":
                routing_applied = True
            if kind == "Deployment" and child["metadata"]["name"] == engine_name:
                engine = live
        selector = ",".join(f"{k}={v}" for k, v in sorted(builders.selector_labels(pool).items()))
        new = compute_status(
            old_status=old_status,
            generation=generation,
            spec=spec,
            engine=engine,
            selector=selector,
            error=None,
        )
        for key, value in _status_patch(old_status, new).items():
            patch.status[key] = value
        return "ok"

    async def follow_engine(self, engine: Any, event_type: Any, logger: Any) -> None:
        """Copy a vLLM Deployment's readiness into its LLMPool's status (no full reconcile).

        Runs on every watch event of an engine Deployment we own. It only acts when the
        Deployment's readiness tuple changed since the last time it was applied, reads the
        owning pool (one GET), and merge-patches ``status`` only when ``readyReplicas``,
        ``endpoints``, ``phase`` or the conditions actually change. A pool that is degraded,
        or whose latest generation is not reconciled yet, is left to the reconcile (which
        reads the Deployment itself); any residual race is closed by the drift timer.
        """
        meta = engine.get("metadata") or {}
        uid = str(meta.get("uid") or meta.get("name"))
        if event_type == "DELETED":
            self._engine_seen.pop(uid, None)
            return
        owner = next(
            (
                r
                for r in meta.get("ownerReferences") or []
                if r.get("kind") == "LLMPool" and str(r.get("apiVersion", "")).startswith(f"{GROUP}/")
            ),
            None,
        )
        if owner is None:
            return
        st = engine.get("status") or {}
        seen = (
            meta.get("generation"),
            st.get("observedGeneration"),
            st.get("replicas"),
            st.get("readyReplicas"),
            st.get("updatedReplicas"),
        )
        if self._engine_seen.get(uid) == seen:
            return
        namespace = meta.get("namespace")
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{owner['name']}"
        async with self._lock(str(owner.get("uid") or owner["name"])):
            pool = await asyncio.to_thread(self.kube.request, "GET", path)
            if pool is None or (pool.get("metadata") or {}).get("uid") != owner.get("uid"):
                return
            old_status = dict(pool.get("status") or {})
            generation = (pool.get("metadata") or {}).get("generation")
            if (
                old_status.get("observedGeneration") != generation
                or old_status.get("lastError")
                or old_status.get("phase") == "Degraded"
            ):
                return  # a reconcile is due or in flight; it reads the Deployment itself
            try:
                spec = parse_spec(pool.get("spec") or {})
            except SpecError:
                return
            new = compute_status(
                old_status=old_status,
                generation=generation,
                spec=spec,
                engine=engine,
                selector=old_status.get("selector"),
                error=None,
            )
            changes = {
                k: v
                for k, v in _status_patch(old_status, new).items()
                if k in ("phase", "conditions", "readyReplicas", "endpoints")
            }
            if changes:
                await asyncio.to_thread(
                    self.kube.request,
                    "PATCH",
                    f"{path}/status",
                    body={"status": changes},
                    content_type="application/merge-patch+json",
                )
                logger.info(
                    f"LLMPool {owner['name']}: {new['phase']}, "
                    f"{new['readyReplicas']}/{new['replicas']} replicas ready (from {meta.get('name')})"
                )
            self._engine_seen[uid] = seen

    def _degraded(
        self,
        body: Any,
        patch: Any,
        old_status: Mapping[str, Any],
        generation: int | None,
        spec: PoolSpec | None,
        message: str,
        reason: str,
        routing_applied: bool,
        logger: Any,
    ) -> None:
        new = compute_status(
            old_status=old_status,
            generation=generation,
            spec=spec,
            engine=None,
            selector=old_status.get("selector"),
            error=message,
            error_reason=reason,
            routing_applied=routing_applied,
        )
        if "replicas" in old_status and spec is None:
            new["readyReplicas"] = old_status.get("readyReplicas", 0)
            new["endpoints"] = old_status.get("endpoints", 0)
        for key, value in _status_patch(old_status, new).items():
            patch.status[key] = value
        if old_status.get("lastError") != message or old_status.get("observedGeneration") != generation:
            logger.warning(f"{reason}: {message}")
            kopf.warn(body, reason=reason, message=message)


# --- registration -------------------------------------------------------------------------


def build_registry(
    config: OperatorConfig | None = None,
    metrics: OperatorMetrics | None = None,
    *,
    registry: Any = None,
    kube: KubeAccess | None = None,
) -> Any:
    """Register the LLMPool handlers on ``registry`` (a fresh ``kopf.OperatorRegistry`` by default)."""
    config = config or OperatorConfig()
    metrics = metrics or OperatorMetrics()
    kube = kube or KubeAccess()
    reg = registry if registry is not None else kopf.OperatorRegistry()
    rec = _Reconciler(config, metrics, kube)

    @kopf.on.login(id="login", registry=reg)
    def login(**_: Any) -> Any:
        return kube.login()

    @kopf.on.cleanup(id="close-client", registry=reg)
    def cleanup(**_: Any) -> None:
        kube.close()

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", registry=reg)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", registry=reg)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", registry=reg)
    async def reconcile(body: Any, patch: Any, logger: Any, reason: Any = None, **_: Any) -> None:
        await rec.reconcile(str(getattr(reason, "value", reason) or "change"), body, patch, logger)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        id="repair-drift",
        interval=config.drift_interval,
        idle=config.drift_idle,
        initial_delay=config.drift_idle,
        registry=reg,
    )
    async def repair_drift(body: Any, patch: Any, logger: Any, **_: Any) -> None:
        await rec.reconcile("timer", body, patch, logger)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        id="engine-readiness",
        labels={"app.kubernetes.io/managed-by": "llmpool-operator", "app.kubernetes.io/component": "engine"},
        registry=reg,
    )
    async def engine_readiness(body: Any, type: Any, logger: Any, **_: Any) -> None:
        # An event handler: no finalizer, no annotations, nothing written to the Deployment.
        await rec.follow_engine(body, type, logger)

    if config.admission:

        @kopf.on.validate(
            GROUP,
            VERSION,
            PLURAL,
            id="validate-spec",
            operations=["CREATE", "UPDATE"],
            side_effects=False,
            registry=reg,
        )
        def validate_spec(body: Any, **_: Any) -> None:
            # The same check the reconcile runs first: a spec refused here would only have
            # turned the pool Degraded after it was stored.
            result = "allowed"
            try:
                parse_spec(body.get("spec") or {})  # a non-mapping spec is a SpecError too
            except SpecError as err:
                result = "denied"
                raise kopf.AdmissionError(str(err), code=422) from None
            finally:
                metrics.admission.labels(result=result).inc()

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="forget", optional=True, registry=reg)
    def forget(body: Any, **_: Any) -> None:
        # Children go with the LLMPool through their owner references; just drop the lock.
        rec.forget(body.get("metadata", {}).get("uid") or body["metadata"]["name"])

    return reg
