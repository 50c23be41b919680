"""The picker's own Prometheus metrics (``llmpool_*``), in a registry per picker.

Counters and histograms are updated on the hot path (a dict lookup and an add);
per-endpoint gauges are read from the datastore only when Prometheus scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmpool.routing.predictors import PREDICTOR_COMPONENT
from llmpool.serving.datastore import Datastore

log = logging.getLogger("llmpool.picker")

_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PickerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "llmpool_decisions",
            "Requests routed, by policy and primary endpoint",
            ["policy", "endpoint"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "llmpool_decision_duration_seconds",
            "Time to route one request in the picker (parse + predict + policy), queue wait excluded",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.predictor_seconds = Histogram(
            "llmpool_predictor_duration_seconds",
            "Time of one output-length prediction",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.predictor_timeouts = Counter(
            "llmpool_predictor_timeouts",
            "Requests whose off-loop prediction (a blocking predictor such as the learned encoder tier) "
            "did not arrive within prediction.timeout_s or failed; they were predicted empirically",
            registry=r,
        )
        #: What ``llmpool_fallback_active`` reports, read at every scrape: component -> reason.
        #: The Director points it at its current policy's ``fallback_status``.
        self.fallback_source: Callable[[], Mapping[str, str]] = dict
        r.register(_FallbackCollector(self))
        self.queue_wait_seconds = Histogram(
            "llmpool_queue_wait_seconds",
            "Time a request was held at the router before it was routed",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "llmpool_responses", "Responses by HTTP status (the picker's own rejections included)", ["code"],
            registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "llmpool_rejections", "Requests the picker answered itself, by reason", ["reason"], registry=r
        )
        self.completion_tokens = Counter(
            "llmpool_completion_tokens", "Output tokens of finished responses (from usage)", registry=r
        )
        self.config_reloads = Counter(
            "llmpool_config_reloads",
            "Config file reloads by result (applied, invalid)",
            ["result"],
            registry=r,
        )
        self.config_valid = Gauge(
            "llmpool_config_valid", "1 when the config file on disk is the one in use, 0 when it is invalid",
            registry=r,
        )  # fmt: skip
        self.config_valid.set(1)
        self.stream_errors = Counter(
            "llmpool_stream_errors", "ext_proc streams that ended with an internal error", registry=r
        )

        # children of the labelled counters the hot path bumps, by label value: ``labels()``
        # costs a lock and a tuple per call (they grow as prometheus-client's own children do)
        self._responses: dict[int, Any] = {}
        self._decisions: dict[tuple[str, str], Any] = {}

    def count_response(self, code: int) -> None:
        child = self._responses.get(code)
        if child is None:
            child = self._responses[code] = self.responses.labels(str(code))
        child.inc()

    def count_decision(self, policy: str, endpoint: str) -> None:
        key = (policy, endpoint)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(policy, endpoint)
        child.inc()

    def attach(self, datastore: Datastore, queued: Callable[[], int]) -> None:
        """Export the datastore's per-endpoint state (read at scrape time)."""
        self.registry.register(_PoolCollector(datastore, queued))


class _FallbackCollector(Collector):
    """``llmpool_fallback_active{component}`` (1 per component on a fallback) and the older
    ``llmpool_predictor_fallback`` (1 while the ``predictor`` component is), from one source."""

    def __init__(self, metrics: PickerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = dict(self.metrics.fallback_source())
        except Exception:  # a scrape never fails because of a policy
            log.exception("reading the policy's fallback status failed")
            status = {}
        active = GaugeMetricFamily(
            "llmpool_fallback_active",
            "1 for each component of the routing policy that runs on a fallback (a model that could "
            "not load, ...); the warning log says why",
            labels=["component"],
        )
        for component in sorted(status):
            active.add_metric([component], 1.0)
        yield active
        yield GaugeMetricFamily(
            "llmpool_predictor_fallback",
            "1 while the policy's length predictor runs on its fallback (a learned model file could not "
            'load; survival answers); same as llmpool_fallback_active{component="predictor"}',
            value=1.0 if PREDICTOR_COMPONENT in status else 0.0,
        )


class _PoolCollector(Collector):
    def __init__(self, ds: Datastore, queued: Callable[[], int]) -> None:
        self.ds = ds
        self.queued = queued

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ds = self.ds
        inflight = GaugeMetricFamily(
            "llmpool_inflight_requests", "Requests in flight per endpoint", labels=["endpoint"]
        )
        tokens = GaugeMetricFamily(
            "llmpool_inflight_prompt_tokens", "Prompt tokens in flight per endpoint", labels=["endpoint"]
        )
        prefill = GaugeMetricFamily(
            "llmpool_prefill_pending_tokens",
            "Prompt tokens of in-flight streamed requests with no output token yet, per endpoint",
            labels=["endpoint"],
        )
        stale = 0
        down = 0
        for slot in ds.slots:
            st = slot.state
            inflight.add_metric([st.name], st.inflight)
            tokens.add_metric([st.name], st.inflight_prompt_tokens)
            prefill.add_metric([st.name], st.prefill_pending_tokens)
            stale += st.stale
            down += slot.down
        yield inflight
        yield tokens
        yield prefill
        yield GaugeMetricFamily("llmpool_endpoints", "Endpoints in the pool", value=len(ds.slots))
        yield GaugeMetricFamily("llmpool_stale_endpoints", "Endpoints whose metrics are stale", value=stale)
        yield GaugeMetricFamily(
            "llmpool_down_endpoints", "Endpoints whose /metrics refuses connections", value=down
        )
        yield GaugeMetricFamily("llmpool_queued_requests", "Requests held at the router", value=self.queued())
