"""A finished training run's report: its final validation record and its loss curve as an image (the Prefect
tasks publish both, with a metrics table: tasks/prefect_tasks.py)."""

from __future__ import annotations

from pathlib import Path


def loss_curve_png(records: list[dict], path: Path, baseline: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", lw=1)
    val = [r for r in records if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def final_validation(records: list[dict]) -> dict:
    """The last record that has a validation loss (the final step always evaluates)."""
    return next((r for r in reversed(records) if r.get("val_loss") is not None), records[-1])


