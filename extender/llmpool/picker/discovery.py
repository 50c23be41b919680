"""Where the picker's endpoints come from: a static list, or the pods of a pool.

A *source* has one coroutine, ``run(on_change)``, that calls ``on_change`` with the
full list of routable endpoints whenever that list changes (the first call marks it
``synced``), and ``stop()``.

* :class:`StaticSource` -- a fixed list (``host:port,host:port``; see
  :func:`static_endpoints`), delivered once.
* :class:`PodSource` -- pods in one namespace that match a label selector, one endpoint
  per target port: ``podIP:port``. The selector and ports are given directly or read
  from an ``InferencePool`` (``inference.networking.k8s.io/v1``) that is watched as
  well. It uses the official ``kubernetes`` client (synchronous) with list-then-watch
  in worker threads and hands changes to the event loop thread-safely.

Endpoints sharing a pod are the data-parallel ranks of one engine: their group is
``<namespace>/<pod name>`` and their rank is the port's position in the target-port
list (:func:`endpoints_from_pods`, a pure function).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmpool.serving.datastore import Endpoint

log = logging.getLogger(__name__)

__all__ = [
    "POOL_GROUP",
    "POOL_PLURAL",
    "POOL_VERSION",
    "EndpointSource",
    "PodSource",
    "StaticSource",
    "endpoints_from_pods",
    "kube_api_client",
    "pod_is_routable",
    "static_endpoints",
]

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"

OnChange = Callable[[list[Endpoint]], None]


class EndpointSource(Protocol):
    """What the picker needs from a source of endpoints."""

    @property
    def synced(self) -> bool:
        """True once ``on_change`` has been called with the first complete list."""
        ...

    async def run(self, on_change: OnChange) -> None:
        """Deliver the endpoint list now and on every change, until :meth:`stop`."""
        ...

    def stop(self) -> None:
        """Make :meth:`run` return soon."""
        ...


# ------------------------------------------------------------------------ static


def static_endpoints(text: str) -> list[Endpoint]:
    """Endpoints from ``host:port,host:port`` (``http://host:port`` is accepted too).

    Blank entries are skipped; a malformed or repeated entry is a one-line ValueError
    naming it, and so is a list without any endpoint.
    """
    out: list[Endpoint] = []
    seen: set[str] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            ep = Endpoint.parse(entry)
        except ValueError:
            raise ValueError(f"bad endpoint {entry!r}: expected HOST:PORT (port 1-65535)") from None
        if ep.name.rsplit(":", 1)[1] == "0":
            raise ValueError(f"bad endpoint {entry!r}: expected HOST:PORT (port 1-65535)")
        if ep.name in seen:
            raise ValueError(f"duplicate endpoint {entry!r}")
        seen.add(ep.name)
        out.append(ep)
    if not out:
        raise ValueError(f"no endpoints in {text!r}: expected HOST:PORT,HOST:PORT")
    return out


class StaticSource:
    """A fixed list of endpoints: delivered once, then ``run`` waits for :meth:`stop`."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        names = [e.name for e in endpoints]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate endpoint {', '.join(dup)}")
        self.endpoints = list(endpoints)
        self._synced = False
        self._stopped = asyncio.Event()

    @classmethod
    def from_text(cls, text: str) -> StaticSource:
        return cls(static_endpoints(text))

    @property
    def synced(self) -> bool:
        return self._synced

    async def run(self, on_change: OnChange) -> None:
        self._synced = True
        on_change(list(self.endpoints))
        await self._stopped.wait()

    def stop(self) -> None:
        """Call from the event loop's thread."""
        self._stopped.set()


# ------------------------------------------------------------------------ pods


@dataclass(frozen=True, slots=True)
class _PodInfo:
    """What routing needs of a pod."""

    name: str
    labels: Mapping[str, str]
    ip: str
    ready: bool
    terminating: bool


def _pod_info(pod: Any) -> _PodInfo:
    """From a pod as the API's JSON (a dict, camelCase) or as a ``kubernetes`` V1Pod."""
    if isinstance(pod, _PodInfo):
        return pod
    if isinstance(pod, Mapping):
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        conditions = [(c.get("type"), c.get("status")) for c in status.get("conditions") or ()]
        name, labels, ip = meta.get("name") or "", meta.get("labels") or {}, status.get("podIP") or ""
        deleting = meta.get("deletionTimestamp")
    else:
        meta, status = pod.metadata, pod.status
        conditions = [(c.type, c.status) for c in (status.conditions if status else None) or ()]
        name = (meta.name if meta else None) or ""
        labels = (meta.labels if meta else None) or {}
        ip = (status.pod_ip if status else None) or ""
        deleting = meta.deletion_timestamp if meta else None
    ready = ("Ready", "True") in conditions
    return _PodInfo(name=name, labels=dict(labels), ip=ip, ready=ready, terminating=deleting is not None)


def pod_is_routable(pod: Any) -> bool:
    """A pod takes traffic when it has an IP, is Ready and is not terminating."""
    info = _pod_info(pod)
    return bool(info.ip) and info.ready and not info.terminating


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def endpoints_from_pods(
    pods: Iterable[Any],
    ports: Sequence[int],
    namespace: str,
    *,
    selector: Mapping[str, str] | None = None,
) -> list[Endpoint]:
    """The routable endpoints of ``pods``: ``podIP:port`` for every port in ``ports``.

    ``pods`` are API JSON dicts or ``kubernetes`` V1Pod objects. A pod counts when it
    matches ``selector`` (``matchLabels`` semantics; ``None`` = every pod) and
    :func:`pod_is_routable`. Endpoints of one pod form the group
    ``<namespace>/<pod>``; rank is the port's index in ``ports`` and the engine label
    is the rank as a string when there are several ports, else ``"0"``. The result is
    sorted by pod name, then rank; an address seen twice (two pods reporting the same
    IP) is kept once, for the first pod in that order.
    """
    infos = [_pod_info(p) for p in pods]
    chosen = sorted(
        (i for i in infos if pod_is_routable(i) and (selector is None or _matches(i.labels, selector))),
        key=lambda i: i.name,
    )
    several = len(ports) > 1
    out: list[Endpoint] = []
    seen: set[str] = set()
    for info in chosen:
        host = f"[{info.ip}]" if ":" in info.ip else info.ip  # IPv6
        for rank, port in enumerate(ports):
            name = f"{host}:{port}"
            if name in seen:
                continue
            seen.add(name)
            out.append(
                Endpoint(
                    name=name,
                    url=f"http://{name}",
                    group=f"{namespace}/{info.name}",
                    rank=rank,
                    engine_label=str(rank) if several else "0",
                )
            )
    return out


def kube_api_client(kubeconfig: str | None = None, *, context: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster credentials when running in a pod
    (and neither ``kubeconfig`` nor ``context`` is given), else a kubeconfig (``kubeconfig``,
    or ``$KUBECONFIG`` / ``~/.kube/config``). A one-line ValueError when there is none."""
    from kubernetes import client, config

    try:
        cfg = client.Configuration()
        cfg.retries = 0  # PodSource retries itself, with backoff and one log line per error
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return client.ApiClient(cfg)
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, persist_config=False, client_configuration=cfg
        )
    except (config.ConfigException, OSError) as err:
        raise ValueError(f"no Kubernetes credentials: {_one_line(err)}") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    status = getattr(err, "status", None)
    if isinstance(status, int) and status:  # kubernetes ApiException: its str() is several lines
        text = f"HTTP {status} {getattr(err, 'reason', '') or ''}".strip()
    else:
        cause = getattr(err, "reason", None)  # urllib3's MaxRetryError wraps the real error
        if isinstance(cause, BaseException):
            err = cause
        lines = str(err).strip().splitlines()
        text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Stopped(Exception):
    """The source was stopped while a request was on its way."""


def _check_ports(ports: Iterable[Any]) -> tuple[int, ...] | str:
    out: list[int] = []
    for p in ports:
        if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535:
            return f"bad port {p!r}"
        if p in out:
            return f"port {p} listed twice"
        out.append(p)
    return tuple(out) if out else "no target ports"


class PodSource:
    """Endpoints from the ready pods of a label selector, optionally via an InferencePool.

    Give either ``selector`` (``matchLabels``) and ``ports``, or ``pool``: the name of an
    ``InferencePool`` in ``namespace`` whose ``spec.selector.matchLabels`` and
    ``spec.targetPorts[].number`` are used and followed when they change (until the pool
    exists, or while it is invalid, there are no endpoints).

    With a selector the pods are listed and watched server-side filtered; with a pool
    all pods of the namespace are watched and filtered here, so a selector change
    needs no new watch. Each watched resource runs list-then-watch in its own thread:
    watches resume from the last resourceVersion (bookmarks requested), a 410 Gone
    starts over with a fresh list, and errors are logged (one line each) and retried
    with exponential backoff capped at ``backoff_max_s``. Changes reach ``on_change``
    on the event loop (``call_soon_threadsafe``) and only when the routable set changed.

    Credentials: ``api_client`` (a ``kubernetes.client.ApiClient``) when given, else
    :func:`kube_api_client` with ``kubeconfig`` / ``context``. RBAC needs ``list`` and
    ``watch`` on pods (and on ``inferencepools`` with ``pool``) in the namespace.
    """

    def __init__(
        self,
        namespace: str,
        *,
        selector: Mapping[str, str] | None = None,
        ports: Sequence[int] | None = None,
        pool: str | None = None,
        api_client: Any = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        watch_timeout_s: int = 5,
        request_timeout_s: float = 10.0,
        backoff_max_s: float = 5.0,
    ) -> None:
        if not namespace:
            raise ValueError("a namespace is required")
        if (pool is None) == (selector is None):
            raise ValueError("give either a pool name or a selector with ports")
        if pool is not None and ports is not None:
            raise ValueError("the pool names the target ports; do not give ports too")
        self.namespace = namespace
        self.pool = pool
        self._selector: dict[str, str] | None = None
        self._ports: tuple[int, ...] = ()
        if selector is not None:
            if not selector or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
            ):
                raise ValueError(
                    f"the selector must be a non-empty mapping of label to value, not {selector!r}"
                )
            checked = _check_ports(ports or ())
            if isinstance(checked, str):
                raise ValueError(f"ports: {checked}")
            self._selector, self._ports = dict(selector), checked
        if watch_timeout_s < 1:
            raise ValueError("watch_timeout_s must be at least 1")
        self.watch_timeout_s = int(watch_timeout_s)
        self.request_timeout_s = request_timeout_s
        self.backoff_max_s = backoff_max_s
        self._owns_client = api_client is None
        self._api = api_client if api_client is not None else kube_api_client(kubeconfig, context=context)

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watches: set[Any] = set()
        self._pods: dict[str, _PodInfo] = {}
        self._pods_listed = False
        self._pool_listed = pool is None
        self._pool_problem: str | None = None
        self._last: list[Endpoint] | None = None
        self._deliver: Callable[[list[Endpoint]], None] | None = None
        self._synced = False
        self._started = False

    # ------------------------------------------------------------------ public
    @property
    def synced(self) -> bool:
        """True once ``on_change`` got the first list (pods, and the pool if any, listed)."""
        return self._synced

    @property
    def endpoints(self) -> list[Endpoint]:
        """The last list handed to ``on_change`` (empty before that)."""
        with self._lock:
            return list(self._last or ())

    @property
    def selector(self) -> dict[str, str] | None:
        with self._lock:
            return dict(self._selector) if self._selector is not None else None

    @property
    def ports(self) -> tuple[int, ...]:
        with self._lock:
            return self._ports

    async def run(self, on_change: OnChange) -> None:
        """Start the watch threads; return once :meth:`stop` was called and they ended.

        Cancelling ``run`` stops the threads too (they end within about a second).
        """
        if self._started:
            raise RuntimeError("PodSource.run can be called once")
        self._started = True
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def on_loop(endpoints: list[Endpoint]) -> None:
            self._synced = True
            on_change(endpoints)

        def deliver(endpoints: list[Endpoint]) -> None:
            try:
                loop.call_soon_threadsafe(on_loop, endpoints)
            except RuntimeError:  # the loop is closed
                self._stopping.set()

        self._deliver = deliver
        workers: list[Callable[[], None]] = [self._pods_worker]
        if self.pool is not None:
            workers.append(self._pool_worker)
        remaining = len(workers)

        def one_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not finished.done():
                finished.set_result(None)

        def body(work: Callable[[], None]) -> None:
            try:
                work()
            except Exception:
                log.exception("pod discovery: worker failed")
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(one_done)

        for i, work in enumerate(workers):
            threading.Thread(target=body, args=(work,), name=f"llmpool-discovery-{i}", daemon=True).start()
        try:
            await finished
        finally:
            self.stop()
            if self._owns_client:
                self._api.close()

    def stop(self) -> None:
        """Stop the watch threads (thread-safe); an open watch is cut off at once."""
        self._stopping.set()
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.stop()  # shuts the socket down: a blocked read returns

    # ------------------------------------------------------------------ state
    def _recompute_locked(self) -> None:
        if not (self._pods_listed and self._pool_listed):
            return
        if self._selector is None or not self._ports:
            endpoints: list[Endpoint] = []
        else:
            endpoints = endpoints_from_pods(
                self._pods.values(), self._ports, self.namespace, selector=self._selector
            )
        if endpoints != self._last:
            self._last = endpoints
            if self._deliver is not None:
                self._deliver(list(endpoints))

    def _pods_listed_now(self, items: list[dict[str, Any]]) -> None:
        infos = (_pod_info(p) for p in items)
        with self._lock:
            self._pods = {i.name: i for i in infos}
            self._pods_listed = True
            self._recompute_locked()

    def _pod_event(self, kind: str, obj: dict[str, Any]) -> None:
        info = _pod_info(obj)
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(info.name, None)
            else:
                self._pods[info.name] = info
            self._recompute_locked()

    def _pool_seen(self, obj: dict[str, Any] | None) -> None:
        selector: dict[str, str] | None = None
        ports: tuple[int, ...] = ()
        problem: str | None = None
        if obj is None:
            problem = f"InferencePool {self.namespace}/{self.pool} does not exist"
        else:
            spec = obj.get("spec") or {}
            labels = (spec.get("selector") or {}).get("matchLabels") or {}
            checked = _check_ports(
                p.get("number") if isinstance(p, Mapping) else p for p in spec.get("targetPorts") or ()
            )
            if not isinstance(labels, Mapping) or not labels:
                problem = f"InferencePool {self.namespace}/{self.pool}: spec.selector.matchLabels is empty"
            elif isinstance(checked, str):
                problem = f"InferencePool {self.namespace}/{self.pool}: spec.targetPorts: {checked}"
            else:
                selector = {str(k): str(v) for k, v in labels.items()}
                ports = checked
        with self._lock:
            changed = (selector, ports) != (self._selector, self._ports) or problem != self._pool_problem
            self._selector, self._ports, self._pool_problem = selector, ports, problem
            self._pool_listed = True
            self._recompute_locked()
        if changed:
            if problem is not None:
                log.warning("pod discovery: %s; no endpoints", problem)
            else:
                labels_text = ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items()))
                log.info(
                    "pod discovery: InferencePool %s/%s selects %s on ports %s",
                    self.namespace,
                    self.pool,
                    labels_text,
                    ",".join(map(str, ports)),
                )

    def _pool_listed_now(self, items: list[dict[str, Any]]) -> None:
        mine = [i for i in items if (i.get("metadata") or {}).get("name") == self.pool]
        self._pool_seen(mine[0] if mine else None)

    def _pool_event(self, kind: str, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != self.pool:
            return
        self._pool_seen(None if kind == "DELETED" else obj)

    # ------------------------------------------------------------------ workers
    def _pods_worker(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self._api)
        kwargs: dict[str, Any] = {"namespace": self.namespace}
        if self.pool is None and self._selector:
            kwargs["label_selector"] = ",".join(f"{k}={v}" for k, v in sorted(self._selector.items()))
        self._list_watch("pods", core.list_namespaced_pod, kwargs, self._pods_listed_now, self._pod_event)

    def _pool_worker(self) -> None:
        from kubernetes import client

        custom = client.CustomObjectsApi(self._api)
        kwargs: dict[str, Any] = {
            "group": POOL_GROUP,
            "version": POOL_VERSION,
            "namespace": self.namespace,
            "plural": POOL_PLURAL,
            "field_selector": f"metadata.name={self.pool}",
        }
        self._list_watch(
            "inferencepools",
            custom.list_namespaced_custom_object,
            kwargs,
            self._pool_listed_now,
            self._pool_event,
        )

    def _list_watch(
        self,
        what: str,
        list_call: Callable[..., Any],
        kwargs: dict[str, Any],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        from kubernetes import watch

        def call(**kw: Any) -> Any:
            resp = list_call(**kw)
            if self._stopping.is_set():  # stop() came while this request was on its way
                resp.close()
                raise _Stopped
            return resp

        w = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]  # events: JSON dicts
        with self._lock:
            if self._stopping.is_set():
                return
            self._watches.add(w)
        try:
            self._list_watch_loop(what, call, w, kwargs, on_list, on_event)
        finally:
            with self._lock:
                self._watches.discard(w)

    def _list_watch_loop(
        self,
        what: str,
        call: Callable[..., Any],
        w: Any,
        kwargs: dict[str, Any],
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        delay = 0.0
        rv: str | None = None
        while not self._stopping.is_set():
            if delay and self._stopping.wait(delay):
                break
            try:
                if rv is None:
                    resp = call(**kwargs, _preload_content=False, _request_timeout=self.request_timeout_s)
                    body = json.loads(resp.data)
                    on_list(list(body.get("items") or ()))
                    rv = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
                    if rv is None:
                        raise ValueError("the list has no resourceVersion")
                stream = w.stream(
                    call,
                    **kwargs,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self.watch_timeout_s,
                    _request_timeout=(self.request_timeout_s, self.watch_timeout_s + self.request_timeout_s),
                )
                for event in stream:
                    if self._stopping.is_set():
                        break
                    kind, obj = event.get("type"), event.get("raw_object")
                    if not isinstance(obj, dict):
                        continue
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, obj)
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                delay = 0.0
            except _Stopped:
                break
            except ApiException as err:
                if self._stopping.is_set():
                    break
                if err.status == 410:
                    log.info("pod discovery: the %s watch expired (410 Gone); listing again", what)
                    rv, delay = None, 0.0
                    continue
                delay = self._next_delay(delay)
                log.warning("pod discovery: %s: %s; retrying in %.1fs", what, _one_line(err), delay)
            except Exception as err:
                if self._stopping.is_set():
                    break
                delay = self._next_delay(delay)
                log.warning("pod discovery: %s: %s; retrying in %.1fs", what, _one_line(err), delay)

    def _next_delay(self, delay: float) -> float:
        return min(self.backoff_max_s, max(0.2, delay * 2))
