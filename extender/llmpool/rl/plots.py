"""Learning-curve PNGs for ``llmpool rl train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """Episode return and E2E, and the held-out evaluation against round-robin and impact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["history"]
    evals = summary["evals"]
    ref = summary["reference"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [h["episode"] + 1 for h in hist]
    ax1.plot(ep, [h["ret"] for h in hist], lw=1, color="tab:blue", label="shaped return")
    ax1.set_xlabel("episode")
    ax1.set_ylabel("return (shaped, this episode's weights)")
    ax1b = ax1.twinx()
    ax1b.plot(
        ep, [h["guidance"] for h in hist], lw=1, ls="--", color="tab:gray", label="heuristic weight w_k"
    )
    ax1b.plot(ep, [h["epsilon"] for h in hist], lw=1, ls=":", color="tab:red", label="epsilon")
    ax1b.set_ylim(0, 1.05)
    ax1.set_title("training episodes (random workloads)")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    if evals:
        ax2.plot([e["episode"] for e in evals], [e["e2e_mean_s"] for e in evals], "o-", label="rl (greedy)")
    for name, style in (("round-robin", "--"), ("impact", ":")):
        if name in ref:
            ax2.axhline(ref[name], ls=style, color="k" if name == "round-robin" else "tab:green", label=name)
    ax2.set_xlabel("episode")
    ax2.set_ylabel("mean E2E (s), held-out seeds")
    cfg = summary["config"]
    ax2.set_title(f"evaluation: {cfg['scenario']}, {cfg['variant']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
