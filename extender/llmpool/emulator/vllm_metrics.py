"""vLLM V1's Prometheus exposition, reproduced family for family.

Names, types, label sets and histogram buckets follow vLLM 0.32.0
(``vllm/v1/metrics/loggers.py``); a captured ``/metrics`` from a real server is the
test fixture they are checked against. Gauges and engine counters are read from the
engine when scraped (vLLM refreshes them every step, so a scrape is at most one step
stale there and never stale here); per-request histograms are observed as requests
progress. Families the emulator has nothing to report for (multimodal cache, KV
connectors, FLOP estimates) are exported at zero so that a parser sees the same
families as on a real server.

Every registry is owned by one emulated server: no process-global state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmpool.lab.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


def one_two_five(limit: int) -> list[int]:
    """vLLM's 1-2-5 buckets up to ``limit`` (``build_1_2_5_buckets(max_model_len)``)."""
    out: list[int] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > limit:
                return out
            out.append(v)
        exp += 1


class VllmMetrics:
    """The ``/metrics`` of one emulated vLLM server (one engine, ``engine="0"``)."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str,
        max_model_len: int,
        engine_label: str = "0",
        cache_info: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.engine_label = engine_label
        self.cache_info = dict(cache_info or {})
        self.created = clock()
        self.finished = dict.fromkeys(FINISHED_REASONS, 0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(self))
        lab = ["model_name", "engine"]
        reg = self.registry
        lengths = one_two_five(max_model_len)

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, doc, lab, buckets=buckets, registry=reg)

        self.prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self.generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self.iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )  # fmt: skip
        self.max_num_generation_tokens = hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            lengths,
        )
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", lengths
        )
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)  # fmt: skip
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.inference_time = hist(
            "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.decode_time = hist(
            "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.num_preemptions = hist(
            "vllm:request_num_preemptions", "Number of preemptions per request.", PREEMPTION_BUCKETS
        )
        self.prefill_kv_computed = hist(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            lengths,
        )
        # Bound children: observing through them skips the label lookup on the hot path.
        labels = (model_name, engine_label)
        self.c_ttft = self.ttft.labels(*labels)
        self.c_itl = self.itl.labels(*labels)
        self.c_iter = self.iteration_tokens.labels(*labels)
        for h in (
            self.prompt_tokens, self.generation_tokens, self.max_num_generation_tokens, self.params_n,
            self.params_max_tokens, self.tpot, self.e2e, self.queue_time, self.inference_time,
            self.prefill_time, self.decode_time, self.num_preemptions, self.prefill_kv_computed,
        ):  # fmt: skip
            h.labels(*labels)

    def observe_request(
        self,
        *,
        prompt: int,
        generated: int,
        max_tokens: int,
        n: int,
        arrival: float,
        scheduled: float,
        first: float,
        finish: float,
        preemptions: int,
        computed_prefill: int,
        reason: str,
    ) -> None:
        """Record one finished request (times in the server's seconds)."""
        lab = (self.model_name, self.engine_label)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens.labels(*lab).observe(prompt)
        self.generation_tokens.labels(*lab).observe(generated)
        self.max_num_generation_tokens.labels(*lab).observe(max_tokens)
        self.params_n.labels(*lab).observe(n)
        self.params_max_tokens.labels(*lab).observe(max_tokens)
        self.e2e.labels(*lab).observe(finish - arrival)
        self.queue_time.labels(*lab).observe(max(0.0, scheduled - arrival))
        self.inference_time.labels(*lab).observe(max(0.0, finish - scheduled))
        self.prefill_time.labels(*lab).observe(max(0.0, first - scheduled))
        self.decode_time.labels(*lab).observe(max(0.0, finish - first))
        if generated > 1:
            self.tpot.labels(*lab).observe((finish - first) / (generated - 1))
        self.num_preemptions.labels(*lab).observe(preemptions)
        self.prefill_kv_computed.labels(*lab).observe(computed_prefill)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, m: VllmMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        e = m.engine
        st = e.stats()
        lab = [m.model_name, m.engine_label]
        names = ["model_name", "engine"]
        created = m.created

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(lab, value, created=created)
            return c

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(lab, value)
            return g

        for kind in ("flops", "read_bytes", "write_bytes"):
            yield counter(f"vllm:estimated_{kind}_per_gpu", f"Estimated {kind} per GPU (not modelled).", 0)
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", st.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", st.waiting)
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.",
            labels=[*names, "reason"],
        )  # fmt: skip
        by_reason.add_metric([*lab, "capacity"], st.waiting)
        by_reason.add_metric([*lab, "deferred"], 0)
        yield by_reason
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state", "Engine sleep state.", labels=[*names, "sleep_state"]
        )
        for state, v in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.add_metric([*lab, state], v)
        yield sleep
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st.kv_usage)
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            e.prefix_queries,
        )  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      e.prefix_hits)  # fmt: skip
        yield counter("vllm:external_prefix_cache_queries", "External prefix cache queries.", 0)
        yield counter("vllm:external_prefix_cache_hits", "External prefix cache hits.", 0)
        yield counter("vllm:mm_cache_queries", "Multi-modal cache queries.", 0)
        yield counter("vllm:mm_cache_hits", "Multi-modal cache hits.", 0)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      e.num_preemptions)  # fmt: skip
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total)
        src = CounterMetricFamily(
            "vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", labels=[*names, "source"]
        )
        cached = e.prompt_tokens_cached_total
        for source, v in (
            ("local_compute", e.prompt_tokens_total - cached),
            ("local_cache_hit", cached),
            ("external_kv_transfer", 0),
        ):
            src.add_metric([*lab, source], v, created=created)
        yield src
        yield counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens.", cached)
        csrc = CounterMetricFamily(
            "vllm:prompt_tokens_cached_by_source", "Number of cached prompt tokens by source.",
            labels=[*names, "source"],
        )  # fmt: skip
        for source in ("device", "host", "p2p", "disk", "external_unspecified"):
            csrc.add_metric([*lab, source], cached if source == "device" else 0, created=created)
        yield csrc
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      e.generation_tokens_total)  # fmt: skip
        ok = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )  # fmt: skip
        for reason in FINISHED_REASONS:
            ok.add_metric([*lab, reason], m.finished.get(reason, 0), created=created)
        yield ok
        rej = CounterMetricFamily(
            "vllm:admission_rejections", "Requests rejected at admission.", labels=["model_name", "reason"]
        )
        for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
            rej.add_metric([m.model_name, reason], 0, created=created)
        yield rej
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
            labels=[*sorted(m.cache_info), "engine"],
        )  # fmt: skip
        info.add_metric([*(m.cache_info[k] for k in sorted(m.cache_info)), m.engine_label], 1.0)
        yield info
