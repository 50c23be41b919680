"""kmock helpers for the operator tests (see docs/toolchain.md §4).

* :class:`StampingEmulator` fills the gaps of kmock 0.8 that Kopf trips over: it stamps
  ``uid`` / ``creationTimestamp`` / ``generation`` / ``resourceVersion`` on writes, bumps
  ``generation`` on spec changes, adds ``kind`` / ``apiVersion`` / ``resourceVersion`` to
  lists, and makes a watch with ``?resourceVersion=`` stream only changes after that
  version instead of replaying every object.
* :func:`register_crds` registers the LLMPool and InferencePool resources.
* :func:`write_kubeconfig` points both the ``kubernetes`` client and Kopf at kmock.
* :func:`start_operator_process` runs ``llmpool operator`` against such a kubeconfig.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import kmock
import yaml

LLMPOOLS = "llmpool.io/v1alpha1/llmpools"
INFERENCEPOOLS = "inference.networking.k8s.io/v1/inferencepools"
EVENTS = "v1/events"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(obj: Any) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


@attrs.define(kw_only=True)
class StampingEmulator(kmock.KubernetesEmulator):
    rv: int = 1

    async def _handle(self, request: Any) -> Any:
        body = request.data
        if (
            request.resource is not None
            and isinstance(body, dict)
            and request.action in (kmock.action.CREATE, kmock.action.UPDATE)
        ):
            self.rv += 1
            meta = body.setdefault("metadata", {})
            if not isinstance(meta, dict):
                meta = body["metadata"] = {}
            meta["resourceVersion"] = str(self.rv)
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", _now())
            elif request.subresource is None and "spec" in body and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                try:
                    current = self.objects[key]
                    gen = int((current.get("metadata") or {}).get("generation") or 1)
                except (KeyError, TypeError, ValueError):
                    gen = 1
                meta["generation"] = gen + 1
        return await super()._handle(request)

    def _kind(self, request: Any) -> str | None:
        res = request.resource
        for key in (f"{res.group}/{res.version}/{res.plural}", f"{res.version}/{res.plural}"):
            try:
                info = self.resources[key]
            except (KeyError, ValueError, TypeError):
                continue
            kind = getattr(info, "kind", None)
            if kind:
                return str(kind)
        return None

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        if isinstance(result, dict):
            result.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            res = request.resource
            result["apiVersion"] = f"{res.group}/{res.version}" if res.group else res.version
            kind = self._kind(request)
            if kind:
                result["kind"] = f"{kind}List"
        return result

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion") if request.params else None
        if not since:
            async for item in super()._serve_watch(request):
                yield item
            return
        yield b""
        since_rv = int(since) if str(since).isdigit() else 0
        bus = self._buses[request.resource]
        marker = await bus.mark()
        try:
            # Close the list→watch gap: whatever changed after the listed version.
            for (res, ns, name), obj in list(self.objects.items()):
                if res != request.resource or obj.deleted or not self._matches(request, ns, name):
                    continue
                if _rv(obj.raw) > since_rv:
                    yield {"type": "MODIFIED", "object": obj.raw}
            async for event in bus.stream(since=marker):
                meta = (event.get("object") or {}).get("metadata") or {}
                if _rv(event.get("object") or {}) <= since_rv and event.get("type") != "DELETED":
                    continue
                if self._matches(request, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _matches(request: Any, namespace: str | None, name: str | None) -> bool:
        return (request.namespace is None or namespace == request.namespace) and (
            request.name is None or name == request.name
        )


def register_crds(k: Any) -> None:
    """Built-in resources plus the LLMPool (status + scale) and InferencePool (status)."""
    k.resources.load_bundled()
    k.resources[LLMPOOLS] = kmock.ResourceInfo(
        kind="LLMPool",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "update", "patch", "delete"},
        subresources={"status", "scale"},
    )
    k.resources[INFERENCEPOOLS] = kmock.ResourceInfo(
        kind="InferencePool",
        namespaced=True,
        verbs={"list", "watch", "get", "create", "update", "patch", "delete"},
        subresources={"status"},
    )


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig with one cluster/user/context pointing at ``server`` (any token)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "kmock-token"}}],
        "contexts": [
            {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}
        ],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def start_operator_process(kubeconfig: Path, flags: list[str], log: Any) -> subprocess.Popen[bytes]:
    """``llmpool operator <flags>`` in a child process talking to the API server of
    ``kubeconfig``; its output goes to ``log`` (a binary file object)."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from llmpool.cli import main; sys.exit(main(sys.argv[1:]))",
        "operator",
        *flags,
    ]
    repo = Path(__file__).resolve().parents[2]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo)


async def stop_operator_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM (Kopf's clean exit: it leaves the peering), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait)
