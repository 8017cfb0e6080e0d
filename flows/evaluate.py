"""Evaluation flow: export the pretrained and the instruction-tuned checkpoints to Hugging Face format, score
both (lm-evaluation-harness tasks, validation perplexity, generations, size and speed) and publish a comparison;
with `quantize`, each export is also quantized in those schemes (model/quantize.py) and scored beside it.

    python -m flows.evaluate                      # default: the newest pretraining and SFT runs
    python -m flows.evaluate --quantize int8 --quantize int4-g32
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.data import require_server
from tasks.evaluate import load_items
from tasks.lib.artifacts import store_of
from tasks.lib.sources import downloads_dir
from tasks.prefect_tasks import evaluate_model, export_hf, prepare_lm_eval, publish_report, quantize_export
from tasks.quantize import check_schemes, schemes_for
from model.checkpoint import read_train_state, resolve_checkpoint
from tasks.lib.runs import newest_run
from tasks.spec import EvalSpec, load_spec, resolve_path


@flow(name="evaluate")
def evaluate_flow(pretrained: str | None = None, tuned: str | None = None,
                  eval_spec_path: str = "data_specs/eval_default.yaml", runs_dir: str = "runs",
                  reports_dir: str = "reports", quantize: list[str] = []) -> str:
    """Compare two checkpoints (run directories or checkpoint folders); returns the report directory.

    `quantize`: schemes of model/quantize.py (int8, int4-g32, int4-g64, int4-g128, ...); each checkpoint's export
    is quantized in each and scored on the same items. A run trained with `qat` is also quantized in its scheme."""
    check_schemes(quantize)
    runs = resolve_path(runs_dir)
    checkpoints = {
        "pretrained": resolve_checkpoint(resolve_path(pretrained) if pretrained else newest_run(runs, "pretrain")),
        "instruction-tuned": resolve_checkpoint(resolve_path(tuned) if tuned else newest_run(runs, "sft"))}
    spec = load_spec(eval_spec_path, EvalSpec)
    manifest = read_train_state(checkpoints["pretrained"])["manifest"]
    sft_manifest = read_train_state(checkpoints["instruction-tuned"])["manifest"]
    items, benchmarks = load_items(spec, downloads_dir(store_of(manifest)))
    task_dir = str(resolve_path(reports_dir) / "lm_eval_tasks" / spec.name)
    task_names = prepare_lm_eval(spec, items, task_dir)
    results, variants = {}, {}
    for label, checkpoint in checkpoints.items():
        model_dir = export_hf(str(checkpoint), label)
        results[label] = evaluate_model(model_dir, label, manifest, sft_manifest, spec, task_names, task_dir)
        for scheme in schemes_for(checkpoint, quantize):  # and a QAT run's own scheme
            variant = f"{label} {scheme}"
            variants[variant] = {"original": label, "scheme": scheme}
            quantized = quantize_export(model_dir, scheme, label, manifest, spec.perplexity_rows)
            results[variant] = evaluate_model(quantized, variant, manifest, sft_manifest, spec, task_names, task_dir)
    return publish_report(results, benchmarks, {k: str(v) for k, v in checkpoints.items()},
                          str(resolve_path(reports_dir)), variants)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--tuned", default=None)
    parser.add_argument("--spec", default="data_specs/eval_default.yaml")
    parser.add_argument("--quantize", action="append", default=[], help="a scheme of model/quantize.py")
    args = parser.parse_args()
    require_server()
    print(evaluate_flow(args.pretrained, args.tuned, args.spec, quantize=args.quantize))
