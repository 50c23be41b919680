"""Where the simulator and a live run disagree: a breakdown of ``llmpool replay --records``.

``python -m llmpool.serving.records records.jsonl [--policy NAME]`` prints, for one policy's
requests, live against simulated TTFT and decode time grouped by prompt length, and the
decode-time ratio grouped by how busy the *other* endpoints were while the request decoded
(from the live records: a request is in flight from arrival to its last token). On servers
that share CPU cores, the second table shows whether a step costs more while a neighbour is
busy, which a per-engine step-cost profile cannot express (docs/benchmarks.md, sim-to-real).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["Paired", "load_paired", "neighbour_busy", "report"]

F64 = npt.NDArray[np.float64]
_NUMBERS = ("arrival_s", "ttft_s", "e2e_s", "prompt", "output")


@dataclass(frozen=True, slots=True)
class Paired:
    """The requests present on both sides, in request-id order."""

    endpoint: npt.NDArray[np.int64]
    arrival: F64
    prompt: npt.NDArray[np.int64]
    output: npt.NDArray[np.int64]
    live_ttft: F64
    live_e2e: F64
    sim_ttft: F64
    sim_e2e: F64


def load_paired(path: str | Path, policy: str | None = None) -> Paired:
    """Read a records file; ``policy`` picks one policy (required when there are several)."""
    live: dict[int, dict[str, object]] = {}
    sim: dict[int, dict[str, object]] = {}
    policies: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pol, side, rid = str(row["policy"]), row["side"], int(row["rid"])
                for key in _NUMBERS:
                    float(row[key])
                if side == "live":
                    int(row["endpoint"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: not a replay record (bad or missing {err})") from None
            policies.add(pol)
            if policy is not None and pol != policy:
                continue
            if side not in ("live", "sim"):
                raise ValueError(f"{path}:{n}: side must be 'live' or 'sim', got {side!r}")
            (live if side == "live" else sim)[rid] = row
    if policy is None and len(policies) > 1:
        raise ValueError(
            f"{path}: records of several policies ({', '.join(sorted(policies))}): give --policy"
        )
    ids = sorted(i for i in live.keys() & sim.keys() if not live[i].get("error"))
    if not ids:
        raise ValueError(f"{path}: no request has both a live and a simulated record")

    def floats(d: dict[int, dict[str, object]], key: str) -> F64:
        return np.asarray([d[i][key] for i in ids], np.float64)

    def ints(d: dict[int, dict[str, object]], key: str) -> npt.NDArray[np.int64]:
        return np.asarray([d[i][key] for i in ids], np.int64)

    return Paired(
        endpoint=ints(live, "endpoint"),
        arrival=floats(live, "arrival_s"),
        prompt=ints(live, "prompt"),
        output=ints(live, "output"),
        live_ttft=floats(live, "ttft_s"),
        live_e2e=floats(live, "e2e_s"),
        sim_ttft=floats(sim, "ttft_s"),
        sim_e2e=floats(sim, "e2e_s"),
    )


def neighbour_busy(p: Paired, samples: int = 200) -> F64:
    """For each request, the fraction of its decode window (first token to last) during which
    at least one *other* endpoint had a request in flight (live timeline)."""
    start, end = p.arrival, p.arrival + p.live_e2e
    out = np.zeros(len(p.arrival))
    for i in range(len(p.arrival)):
        t0, t1 = p.arrival[i] + p.live_ttft[i], end[i]
        if t1 <= t0:
            continue
        ts = np.linspace(t0, t1, samples)
        other = p.endpoint != p.endpoint[i]
        live = (ts[:, None] >= start[other][None, :]) & (ts[:, None] < end[other][None, :])
        out[i] = float(live.any(axis=1).mean())
    return out


def report(p: Paired, out: Sequence[str] | None = None) -> list[str]:
    """The two tables as lines of text."""
    lines: list[str] = [] if out is None else list(out)
    dl, ds = p.live_e2e - p.live_ttft, p.sim_e2e - p.sim_ttft
    lines.append(
        f"{len(p.arrival)} requests: E2E mean live {p.live_e2e.mean():.2f} s, sim {p.sim_e2e.mean():.2f} s; "
        f"TTFT mean live {p.live_ttft.mean():.2f} s, sim {p.sim_ttft.mean():.2f} s"
    )
    lines.append(
        f"{'prompt tokens':<16}{'n':>5}{'TTFT live':>11}{'TTFT sim':>10}{'decode live':>13}{'decode sim':>12}"
    )
    for lo, hi in ((0, 200), (200, 500), (500, 1000), (1000, 1 << 30)):  # prompt tokens
        m = (p.prompt >= lo) & (p.prompt < hi)
        if m.any():
            label = f"{lo}-{hi}" if hi < 1 << 30 else f"{lo}+"
            lines.append(
                f"{label:<16}{int(m.sum()):>5}{p.live_ttft[m].mean():>10.2f}s{p.sim_ttft[m].mean():>9.2f}s"
                f"{dl[m].mean():>12.2f}s{ds[m].mean():>11.2f}s"
            )
    busy = neighbour_busy(p)
    lines.append(f"{'other endpoints busy':<24}{'n':>5}{'decode live/sim':>17}")
    for flo, fhi in ((0.0, 0.25), (0.25, 0.75), (0.75, 1.01)):
        m = (busy >= flo) & (busy < fhi) & (p.output > 4)
        if m.any():
            ratio = dl[m].sum() / max(ds[m].sum(), 1e-9)
            label = f"{flo:.0%}-{min(fhi, 1.0):.0%} of the decode"
            lines.append(f"{label:<24}{int(m.sum()):>5}{ratio:>17.2f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmpool.serving.records", description=__doc__.split("\n")[0])
    ap.add_argument("records", help="the file `llmpool replay --records` wrote")
    ap.add_argument("--policy", help="the policy to break down (required when the file has several)")
    a = ap.parse_args(argv)
    try:
        paired = load_paired(a.records, a.policy)
    except (OSError, ValueError) as err:
        print(f"llmpool.serving.records: {err}", file=sys.stderr)
        return 2
    print("\n".join(report(paired)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
