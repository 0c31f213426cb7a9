"""Loss curves as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def loss_plot(log: list[dict], stages: list[tuple[str, int]], path: str | Path, title: str | None = None) -> None:
    """Training loss (and validation loss where evaluated) against tokens seen, with stage starts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in log], [r["loss"] for r in log], lw=0.8, label="train")
    vals = [r for r in log if "val_loss" in r]
    if vals:
        ax.plot([r["tokens"] for r in vals], [r["val_loss"] for r in vals], "o-", ms=3, label="validation")
    by_step = {r["step"]: r["tokens"] for r in log}
    for name, first in stages[1:]:
        if first in by_step:
            ax.axvline(by_step[first], color="gray", ls=":", lw=0.8)
            ax.text(by_step[first], ax.get_ylim()[1], f" {name}", va="top", fontsize=7, color="gray")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "tierlm train")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_plot(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> None:
    """Validation loss curves of several runs: {label: [(tokens, val_loss), ...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in curves.items():
        ax.plot([t for t, _ in pts], [v for _, v in pts], "o-", ms=3, label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
