"""Evaluation stage: export each checkpoint to Hugging Face format, score it with lm-evaluation-harness and the
held-out perplexities (model/evaluate.py), and write a report comparing them. Plain functions; the evaluate flow
runs them as Prefect tasks (tasks/prefect_tasks.py), which also publish the report in the UI.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from tasks.lib.items import multiple_choice_item
from tasks.lib.log import get_logger, progress
from tasks.lib.sources import SourceError, resolve_source, source_records
from tasks.spec import EvalSpec


def load_items(spec: EvalSpec, downloads_dir: Path) -> tuple[dict[str, list[dict]], dict]:
    """Each benchmark's scorable items, and per benchmark how many records were unusable and why."""
    items, problems = {}, {}
    for source in spec.multiple_choice:
        resolved = resolve_source(source)
        good, bad = [], Counter()
        for rec in source_records(resolved, downloads_dir):
            item, problem = multiple_choice_item(rec, source)
            if item:
                good.append(item)
            else:
                bad[problem] += 1
        if not good:
            raise SourceError(f"benchmark '{source.name}': no usable items ({dict(bad)})")
        items[source.name] = good[:source.limit]
        problems[source.name] = {"items": len(items[source.name]), "unusable": sum(bad.values()),
                                 "reasons": dict(bad), "license": source.license,
                                 "chance": sum(1 / len(i["choices"]) for i in items[source.name]) / len(items[source.name])}
        if bad:
            get_logger().warning(f"benchmark {source.name}: {sum(bad.values())} unusable records: {dict(bad)}")
    return items, problems


def prepare_lm_eval(spec: EvalSpec, items: dict[str, list[dict]], task_dir: str) -> list[str]:
    """Write each multiple-choice set as a local lm-eval task in `task_dir`, and load every task the spec names,
    so that a task that cannot run (unknown, or its dataset out of reach) fails now, before any export. Returns
    the task names to evaluate."""
    from model.evaluate import lm_eval_tasks, write_lm_eval_task

    names = [write_lm_eval_task(name, its, Path(task_dir)) for name, its in items.items()]
    names += [n for n in spec.lm_eval_tasks if n not in names]
    lm_eval_tasks(names, Path(task_dir))
    get_logger().info(f"lm-eval tasks: {', '.join(names)} (local ones in {task_dir})")
    return names


def export_hf(checkpoint: str, label: str) -> str:
    """`<run>/hf/<step>`: a transformers folder; reused when it already holds this checkpoint's export."""
    from model.export_hf import export

    checkpoint = Path(checkpoint)
    out = checkpoint.parent.parent / "hf" / checkpoint.name
    info = out / "export_info.json"
    if info.is_file() and json.loads(info.read_text())["checkpoint"] == str(checkpoint.resolve()):
        get_logger().info(f"export {label}: reusing {out}")
        return str(out)
    report = export(checkpoint, out)
    get_logger().info(f"export {label}: {out} (max |logit difference| vs Megatron {report['max_logit_diff']:.2g})")
    return str(out)


def evaluate_model(model_dir: str, label: str, manifest: str, sft_manifest: str | None, spec: EvalSpec,
                   task_names: list[str], task_dir: str) -> dict:
    from model.evaluate import score

    results = score(Path(model_dir), Path(manifest), task_names, Path(task_dir), spec.prompts,
                       spec.perplexity_rows, Path(sft_manifest) if sft_manifest else None, spec.max_new_tokens,
                       spec.temperature, spec.top_k, spec.seed, spec.lm_eval_limit)
    scores = results.get("lm_eval", {}).get("tasks", {})
    progress(f"evaluate {label}: perplexity {results['validation']['perplexity']:.2f}" + "".join(
        f", {name} " + ", ".join(f"{m} {v:.3f}" for m, v in r.items() if m in ("acc", "acc_norm"))
        for name, r in scores.items()))
    return results


def metric_values(result: dict) -> dict[str, float]:
    """The measures of one model that a quantized variant is compared on, by name."""
    values = {"validation perplexity": result["validation"]["perplexity"]}
    if "sft_validation" in result:
        values["reply perplexity"] = result["sft_validation"]["perplexity"]
    for task, scores in result.get("lm_eval", {}).get("tasks", {}).items():
        values.update({f"{task} {m}": v for m, v in scores.items()
                       if m in ("acc", "acc_norm", "exact_match") and isinstance(v, (int, float))})
    return values


def quantization_rows(results: dict[str, dict], variants: dict[str, dict]) -> list[dict]:
    """Each quantized variant against its original, on the same items: every measure and its difference, and the
    size, load memory and generation speed as ratios."""
    rows = []
    for label, variant in variants.items():
        mine, theirs = results[label], results[variant["original"]]
        row = {"model": label, "scheme": variant["scheme"]}
        original = metric_values(theirs)
        for name, value in metric_values(mine).items():
            row[name] = round(value, 4)
            row[f"{name} change"] = round(value - original[name], 4)
        a, b = mine["footprint"], theirs["footprint"]
        row["weights MB"] = round(a["weight_bytes"] / 1e6, 2)
        row["size vs original"] = round(a["weight_bytes"] / b["weight_bytes"], 3)
        row["load peak MB"] = round(a["load_peak_rss"] / 1e6, 1)
        row["load memory vs original"] = round(a["load_peak_rss"] / b["load_peak_rss"], 3)
        if a["generation_tokens_per_s"] and b["generation_tokens_per_s"]:
            row["tokens/s"] = round(a["generation_tokens_per_s"], 1)
            row["speed vs original"] = round(a["generation_tokens_per_s"] / b["generation_tokens_per_s"], 3)
        rows.append(row)
    return rows


def report_markdown(results: dict[str, dict], benchmarks: dict, variants: dict[str, dict] | None = None) -> str:
    labels = list(results)
    lines = ["# Evaluation", "", "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

    def row(name: str, get) -> None:
        lines.append(f"| {name} | " + " | ".join(get(results[label]) for label in labels) + " |")

    row("validation perplexity (pretraining held-out text)", lambda r: f"{r['validation']['perplexity']:.2f}")
    row("validation loss (nats/token)", lambda r: f"{r['validation']['loss']:.3f}")
    if all("sft_validation" in r for r in results.values()):
        row("reply perplexity (held-out SFT replies)", lambda r: f"{r['sft_validation']['perplexity']:.2f}")
    first = next(iter(results.values()))
    for task, scores in first.get("lm_eval", {}).get("tasks", {}).items():
        about = (f"{benchmarks[task]['items']} items; chance {benchmarks[task]['chance']:.3f}" if task in benchmarks
                 else f"{scores.get('items', '?')} items")
        for metric in [m for m in scores if m != "items" and not m.endswith("_stderr")]:
            row(f"{task} {metric} ({about})" if metric == "acc" or task not in benchmarks else f"{task} {metric}",
                lambda r, t=task, m=metric: _with_stderr(r["lm_eval"]["tasks"][t], m))
    if all("footprint" in r for r in results.values()):
        row("weights on disk (MB)", lambda r: f"{r['footprint']['weight_bytes'] / 1e6:.2f}")
        row("peak memory loading it (MB, a fresh process)", lambda r: f"{r['footprint']['load_peak_rss'] / 1e6:.0f}")
        row("greedy generation (tokens/s, CPU)", lambda r: f"{r['footprint']['generation_tokens_per_s'] or 0:.1f}")
    if "lm_eval" in first:
        lines += ["", f"Scored by lm-evaluation-harness {first['lm_eval']['version']} (± its standard error)."]
    if variants:
        lines += ["", "## Quantized against the original", "",
                  "Each quantized model (python -m model.quantize) beside the model it was made from, on the same "
                  "items: the change of each measure, and size, load memory and speed as ratios.", ""]
        for q in quantization_rows(results, variants):
            lines.append(f"**{q['model']}** ({q['scheme']}): " + "; ".join(
                f"{name} {q[name]:.4g} ({q[name + ' change']:+.4g})" for name in q if name + " change" in q)
                + f"; weights {q['size vs original']:.2f} x, load memory {q['load memory vs original']:.2f} x"
                + (f", generation speed {q['speed vs original']:.2f} x" if "speed vs original" in q else "") + "\n")
        stores = {variant["scheme"]: json.loads((Path(results[label]["model"]) / "quantize_info.json").read_text())
                  ["stores"] for label, variant in variants.items()}
        lines += [f"- {scheme} stores {what}." for scheme, what in stores.items()]
    lines += ["", "## Generations", ""]
    for i, prompt_row in enumerate(first["generations"]):
        lines.append(f"**{prompt_row['prompt']}**\n")
        for label in labels:
            gen = results[label]["generations"][i]
            lines.append(f"- {label}, greedy: {gen['greedy']!r}\n- {label}, sampled: {gen['sampled']!r}")
        lines.append("")
    return "\n".join(lines)


def _with_stderr(scores: dict, metric: str) -> str:
    stderr = scores.get(f"{metric}_stderr")
    return f"{scores[metric]:.3f}" + (f" ± {stderr:.3f}" if isinstance(stderr, (int, float)) else "")


def write_report(results: dict[str, dict], benchmarks: dict, checkpoints: dict[str, str], reports_dir: str,
                 variants: dict[str, dict] | None = None) -> Path:
    """`<reports_dir>/eval-<key>/results.json` and `report.md`, each written atomically; returns the folder."""
    variants = variants or {}
    key = hashlib.sha256(json.dumps([checkpoints, sorted(variants)] if variants else checkpoints,
                                    sort_keys=True).encode()).hexdigest()[:12]
    out = Path(reports_dir) / f"eval-{key}"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps({"checkpoints": checkpoints, "benchmarks": benchmarks,
                                                    "results": results, "quantized": variants}, indent=1)),
                       ("report.md", report_markdown(results, benchmarks, variants))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    progress(f"evaluation report: {out / 'report.md'}")
    return out
