"""Per-run metrics: per-request latency columns and the summary the bench reports."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass

import numpy as np

from llmpool.routing.profile import PS_PER_S


class RequestLog:
    """Compact per-request columns (integer picoseconds), appended on completion."""

    __slots__ = ("arrival", "dispatch", "finish", "first", "output", "preempted", "prompt", "rid")

    def __init__(self) -> None:
        self.rid = array("q")
        self.arrival = array("q")
        self.dispatch = array("q")
        self.first = array("q")
        self.finish = array("q")
        self.prompt = array("q")
        self.output = array("q")
        self.preempted = array("q")

    def add(
        self,
        rid: int,
        arrival: int,
        dispatch: int,
        first: int,
        finish: int,
        prompt: int,
        output: int,
        preempted: int,
    ) -> None:
        self.rid.append(rid)
        self.arrival.append(arrival)
        self.dispatch.append(dispatch)
        self.first.append(first)
        self.finish.append(finish)
        self.prompt.append(prompt)
        self.output.append(output)
        self.preempted.append(preempted)

    def __len__(self) -> int:
        return len(self.rid)

    def e2e_s(self) -> np.ndarray:
        return (np.frombuffer(self.finish, np.int64) - np.frombuffer(self.arrival, np.int64)) / PS_PER_S

    def ttft_s(self) -> np.ndarray:
        return (np.frombuffer(self.first, np.int64) - np.frombuffer(self.arrival, np.int64)) / PS_PER_S

    def tpot_s(self) -> np.ndarray:
        out = np.frombuffer(self.output, np.int64)
        dec = np.frombuffer(self.finish, np.int64) - np.frombuffer(self.first, np.int64)
        mask = out > 1
        return dec[mask] / (out[mask] - 1) / PS_PER_S

    def wait_s(self) -> np.ndarray:
        return (np.frombuffer(self.dispatch, np.int64) - np.frombuffer(self.arrival, np.int64)) / PS_PER_S


@dataclass(slots=True)
class RunSummary:
    """One simulated run. Field names are the bench JSON contract."""

    requests: int
    rejected: int
    e2e_mean_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    router_wait_mean_s: float
    router_wait_p99_s: float
    throughput_tok_s: float
    throughput_window_tok_s: float
    requests_per_s: float
    makespan_s: float
    output_tokens: int
    preemptions: int
    imbalance_gmax_mean: float
    imbalance_maxmin_mean: float
    imbalance_samples: int
    # the same over the steps (samples) while arrivals last: no drain tail; NaN when not measured
    imbalance_gmax_arrivals_mean: float = float("nan")
    imbalance_maxmin_arrivals_mean: float = float("nan")
    imbalance_arrivals_samples: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _stats(x: np.ndarray) -> tuple[float, float, float, float]:
    if x.size == 0:
        return (float("nan"),) * 4
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return float(x.mean()), float(p50), float(p90), float(p99)


def _window_throughput(log: RequestLog) -> float:
    """Output tokens per second while arrivals last (first to last arrival): the pool's
    throughput under the offered load, without the drain tail of a finite workload. Each
    request's tokens are spread evenly between its first and last token."""
    if len(log) < 2:
        return 0.0
    arr = np.frombuffer(log.arrival, np.int64)
    t0, t1 = int(arr.min()), int(arr.max())
    if t1 <= t0:
        return 0.0
    first = np.frombuffer(log.first, np.int64).astype(np.float64)
    fin = np.frombuffer(log.finish, np.int64).astype(np.float64)
    out = np.frombuffer(log.output, np.int64).astype(np.float64)
    span = np.maximum(fin - first, 1.0)
    lo = np.clip((t0 - first) / span, 0.0, 1.0)
    hi = np.clip((t1 - first) / span, 0.0, 1.0)
    tokens = (hi - lo) * (out - 1.0)
    tokens += ((first >= t0) & (first <= t1)).astype(np.float64)  # the first token itself
    return float(tokens.sum() / ((t1 - t0) / PS_PER_S))


def summarize(
    log: RequestLog,
    *,
    rejected: int,
    preemptions: int,
    imbalance_gmax_sum: float,
    imbalance_maxmin_sum: float,
    imbalance_samples: int,
    arrivals_imbalance_gmax_sum: float = 0.0,
    arrivals_imbalance_maxmin_sum: float = 0.0,
    arrivals_imbalance_samples: int = 0,
) -> RunSummary:
    e2e = _stats(log.e2e_s())
    ttft = _stats(log.ttft_s())
    tpot = _stats(log.tpot_s())
    wait = log.wait_s()
    n = len(log)
    out_tokens = int(np.frombuffer(log.output, np.int64).sum()) if n else 0
    if n:
        t0 = int(np.frombuffer(log.arrival, np.int64).min())
        t1 = int(np.frombuffer(log.finish, np.int64).max())
        span = (t1 - t0) / PS_PER_S
    else:
        span = 0.0
    k = max(imbalance_samples, 1)
    window_tput = _window_throughput(log)
    return RunSummary(
        requests=n,
        rejected=rejected,
        e2e_mean_s=e2e[0],
        e2e_p50_s=e2e[1],
        e2e_p90_s=e2e[2],
        e2e_p99_s=e2e[3],
        ttft_mean_s=ttft[0],
        ttft_p50_s=ttft[1],
        ttft_p90_s=ttft[2],
        ttft_p99_s=ttft[3],
        tpot_mean_s=tpot[0],
        tpot_p50_s=tpot[1],
        tpot_p90_s=tpot[2],
        tpot_p99_s=tpot[3],
        router_wait_mean_s=float(wait.mean()) if n else float("nan"),
        router_wait_p99_s=float(np.percentile(wait, 99)) if n else float("nan"),
        throughput_tok_s=out_tokens / span if span > 0 else 0.0,
        throughput_window_tok_s=window_tput,
        requests_per_s=n / span if span > 0 else 0.0,
        makespan_s=span,
        output_tokens=out_tokens,
        preemptions=preemptions,
        imbalance_gmax_mean=imbalance_gmax_sum / k,
        imbalance_maxmin_mean=imbalance_maxmin_sum / k,
        imbalance_samples=imbalance_samples,
        imbalance_gmax_arrivals_mean=(
            arrivals_imbalance_gmax_sum / arrivals_imbalance_samples
            if arrivals_imbalance_samples
            else float("nan")
        ),
        imbalance_maxmin_arrivals_mean=(
            arrivals_imbalance_maxmin_sum / arrivals_imbalance_samples
            if arrivals_imbalance_samples
            else float("nan")
        ),
        imbalance_arrivals_samples=arrivals_imbalance_samples,
    )
