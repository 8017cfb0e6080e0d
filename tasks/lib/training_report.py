"""What a training run shows in Prefect: a progress artifact that follows rank 0's step lines while it trains,
then a metrics table and a loss-curve image."""

from __future__ import annotations

import base64
import re
from pathlib import Path

class TrainingProgress:
    """A Prefect progress artifact (`<stage>-progress`, percent of steps done) that follows rank 0's `step=N`
    lines; a no-op outside a Prefect run."""

    STEP = re.compile(r"^step=(\d+)/")

    def __init__(self, stage: str, total_steps: int):
        self.total, self.id = total_steps, None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import get_run_context

            get_run_context()
        except Exception:
            return
        self.id = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                           description=f"{stage}: percent of {total_steps} steps done")

    def line(self, text: str) -> None:
        match = self.STEP.match(text)
        if self.id and match:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(100.0, 100.0 * int(match.group(1)) / self.total))


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


def publish_training(records: list[dict], run_dir: Path, baseline: float | None, stage: str = "pretrain") -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    shown = [r for r in records if "tokens_per_s" in r or r.get("val_loss") is not None]
    create_table_artifact(key=f"{stage}-metrics", description=f"{stage} metrics at each log step",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in shown])
    png = loss_curve_png(records, run_dir / "loss_curve.png", baseline)
    final = final_validation(records)
    reference = f" (unigram-entropy baseline {baseline:.3f})" if baseline is not None else ""
    create_markdown_artifact(key=f"{stage}-loss-curve", markdown=(
        f"# {stage}: {run_dir.name}\n\nFinal validation loss **{final.get('val_loss', float('nan')):.3f}** at "
        f"step {final['step']}{reference}.\n\n"
        f"![loss curve](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})\n\n"
        f"Run directory: `{run_dir}`"))
