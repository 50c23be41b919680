"""Parse a vLLM ``/metrics`` exposition into the gauges a router needs.

The text goes through prometheus-client's own parser. A vLLM server exports about 70
metric families (hundreds of lines with histogram buckets); the router needs a
handful, so lines of other families are dropped before parsing (a prefix test per
line), which keeps a scrape of one pod near a millisecond of CPU.

Rules (model-server notes, section 1): running and waiting are summed over the
``engine`` label, KV usage is per engine (a data-parallel pod has one engine per
rank); counters are matched with their ``_total`` suffix; ``kv_cache_usage_perc`` is
read first and the pre-0.10 ``gpu_cache_usage_perc`` is the fallback;
``cache_config_info`` gives the block size and block count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"
PREEMPTIONS = "vllm:num_preemptions"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
PREFIX_HITS = "vllm:prefix_cache_hits"
PROMPT_TOKENS = "vllm:prompt_tokens"
GENERATION_TOKENS = "vllm:generation_tokens"
SLEEP_STATE = "vllm:engine_sleep_state"

_GAUGES = (RUNNING, WAITING, KV_USAGE, KV_USAGE_OLD, CACHE_INFO, SLEEP_STATE)
_COUNTERS = (PREEMPTIONS, PREFIX_QUERIES, PREFIX_HITS, PROMPT_TOKENS, GENERATION_TOKENS)
# Sample lines and their '# TYPE'/'# HELP' lines for the families above. A trailing
# '{' or ' ' keeps e.g. 'vllm:num_requests_waiting_by_reason' out.
_WANTED = tuple(
    [f"{n}{{" for n in _GAUGES]
    + [f"{n} " for n in _GAUGES]
    + [f"{n}_total{{" for n in _COUNTERS]
    + [f"{n}_total " for n in _COUNTERS]
    + [f"# TYPE {n} " for n in _GAUGES]
    + [f"# TYPE {n}_total " for n in _COUNTERS]
)


class ScrapeError(ValueError):
    """The exposition cannot be used; ``str()`` is one line naming what is wrong."""


@dataclass(slots=True)
class EngineMetrics:
    """One engine's (one ``engine`` label value's) gauges and counters."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    awake: bool = True

    @property
    def kv_capacity_tokens(self) -> int | None:
        if self.block_size is None or self.num_gpu_blocks is None:
            return None
        return self.block_size * self.num_gpu_blocks


@dataclass(slots=True)
class ServerMetrics:
    """A server's metrics: per engine, and summed the way a router reads them."""

    engines: dict[str, EngineMetrics] = field(default_factory=dict)
    model_names: set[str] = field(default_factory=set)

    @property
    def running(self) -> int:
        return sum(e.running for e in self.engines.values())

    @property
    def waiting(self) -> int:
        return sum(e.waiting for e in self.engines.values())

    @property
    def kv_usage(self) -> float:
        return max((e.kv_usage for e in self.engines.values()), default=0.0)

    def engine(self, label: str = "0") -> EngineMetrics:
        try:
            return self.engines[label]
        except KeyError:
            have = ", ".join(sorted(self.engines)) or "none"
            raise ScrapeError(f"no metrics for engine {label!r} (engines: {have})") from None


def _count(value: float, name: str) -> int:
    if value != value or value < 0:  # NaN or negative
        raise ScrapeError(f"{name} has an invalid value {value!r}")
    return int(value)


def parse_vllm_metrics(text: str) -> ServerMetrics:
    """Parse vLLM's exposition text. Raises :class:`ScrapeError` if the gauges a router
    needs (running, waiting, KV usage) are missing or the text does not parse."""
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED))
    out = ServerMetrics()
    seen: set[str] = set()
    try:
        families = list(text_string_to_metric_families(wanted + "\n"))
    except (ValueError, IndexError, TypeError) as err:
        raise ScrapeError(f"unparsable metrics exposition: {err}") from None
    for fam in families:
        for s in fam.samples:
            label = s.labels.get("engine", "0")
            e = out.engines.get(label)
            if e is None:
                e = out.engines[label] = EngineMetrics()
            if "model_name" in s.labels:
                out.model_names.add(s.labels["model_name"])
            name = s.name
            v = s.value
            if name == RUNNING:
                e.running = _count(v, name)
            elif name == WAITING:
                e.waiting = _count(v, name)
            elif name == KV_USAGE or (name == KV_USAGE_OLD and KV_USAGE not in seen):
                if not 0.0 <= v <= 1.0 + 1e-9:
                    raise ScrapeError(f"{name} must be a fraction in [0, 1], got {v!r}")
                e.kv_usage = min(v, 1.0)
            elif name == CACHE_INFO:
                try:
                    e.block_size = int(s.labels.get("block_size", ""))
                    e.num_gpu_blocks = int(s.labels.get("num_gpu_blocks", ""))
                except ValueError:
                    pass  # 'None' before the engine has profiled its memory
            elif name == SLEEP_STATE:
                if s.labels.get("sleep_state") == "awake":
                    e.awake = v >= 1
            elif name == PREEMPTIONS + "_total":
                e.preemptions = v
            elif name == PREFIX_QUERIES + "_total":
                e.prefix_queries = v
            elif name == PREFIX_HITS + "_total":
                e.prefix_hits = v
            elif name == PROMPT_TOKENS + "_total":
                e.prompt_tokens = v
            elif name == GENERATION_TOKENS + "_total":
                e.generation_tokens = v
            seen.add(name)
    missing = [n for n in (RUNNING, WAITING) if n not in seen]
    if KV_USAGE not in seen and KV_USAGE_OLD not in seen:
        missing.append(KV_USAGE)
    if missing:
        raise ScrapeError(f"not a vLLM metrics exposition: missing {', '.join(missing)}")
    return out
