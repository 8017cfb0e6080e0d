"""Quantization stage: a quantized copy of an exported model for each scheme asked for (model/quantize.py), kept
beside the export (`<run>/quantized/<step>-<scheme>`) and reused while the export's weights are the ones it was
made from. A plain function; the evaluate flow runs it as a Prefect task (tasks/prefect_tasks.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.lib.log import get_logger, progress


def check_schemes(schemes: list[str]) -> None:
    """An unknown scheme, or one this machine cannot run, fails the flow before any export."""
    from model.quantize import scheme_named

    for name in schemes:
        scheme_named(name, setting="quantize")


def schemes_for(checkpoint: str | Path, asked: list[str]) -> list[str]:
    """The schemes to quantize a checkpoint's export in: those asked for, and the one it was trained for with
    quantization-aware training (its deliverable)."""
    from model.checkpoint import read_train_state

    trained_for = read_train_state(Path(checkpoint)).get("qat")
    return asked + ([trained_for] if trained_for and trained_for not in asked else [])


def quantize_export(model_dir: str, scheme: str, label: str, manifest: str, held_out_rows: int) -> str:
    """A calibrated scheme calibrates on the validation rows of `manifest` (the pretraining manifest the evaluation
    scores perplexity on: an instruction-tuned export records its SFT manifest, whose validation rows are few),
    leaving out the `held_out_rows` that perplexity reads."""
    from model.quantize import INFO_NAME, model_checksum, quantize

    source = Path(model_dir)
    out = source.parent.parent / "quantized" / f"{source.name}-{scheme}"
    made = json.loads((out / INFO_NAME).read_text()) if (out / INFO_NAME).is_file() else {}
    calibration = made.get("calibration")
    same_rows = calibration is None or (calibration["manifest"], calibration["held_out_rows"]) == (
        str(Path(manifest).resolve()), held_out_rows)
    if made.get("source_sha256") == model_checksum(source) and same_rows:
        get_logger().info(f"quantize {label} {scheme}: reusing {out}")
        return str(out)
    report = quantize(source, out, scheme, manifest=Path(manifest), held_out_rows=held_out_rows)
    progress(f"quantize {label} {scheme}: {report['quantized_layers']} linear layers, weights "
             f"{report['bytes'] / 1e6:.1f} MB against {report['source_bytes'] / 1e6:.1f} MB; max |logit change| "
             f"{report['max_logit_change']:.3g}")
    return str(out)
