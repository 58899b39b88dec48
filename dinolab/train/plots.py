"""The picture of a run: loss terms against iterations, and the k-NN curve when evaluated."""

from __future__ import annotations

from pathlib import Path

LOSS_TERMS = ("total", "dino", "ibot", "koleo")


def plot_run(records: list[dict], path: str | Path) -> None:
    """``metrics.jsonl`` records -> a PNG with the loss curves (left) and k-NN top-1 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinolab.io import atomic_path

    knn = [(r["iteration"], r["knn_top1"]) for r in records if "knn_top1" in r]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(11 if knn else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for term in LOSS_TERMS:
        pts = [(r["iteration"], r[term]) for r in records if term in r]
        if pts:
            ax.plot(*zip(*pts), label=term)
    ax.set(xlabel="iteration", ylabel="loss", title="training losses")
    ax.legend()
    ax.grid(alpha=0.3)
    if knn:
        ax = axes[0, 1]
        ax.plot(*zip(*knn), marker="o", color="tab:green")
        ax.set(xlabel="iteration", ylabel="k-NN top-1 (%)", title="teacher k-NN accuracy (held-out)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
