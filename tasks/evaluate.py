"""Evaluation stage: export each checkpoint to Hugging Face format, score it (model/evaluate.py), and publish a
report comparing them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from prefect import task

from tasks.artifacts import get_logger
from tasks.download import Record, SourceError, resolve_source, source_records
from tasks.spec import EvalSpec, MultipleChoiceSpec


def multiple_choice_item(rec: Record, source: MultipleChoiceSpec) -> tuple[dict | None, str]:
    """{question, choices, answer (index)} of a benchmark record, or None and why it cannot be scored."""
    if rec.problem:
        return None, rec.problem
    raw = rec.raw
    if not isinstance(raw, dict):
        return None, f"not a JSON object (got {type(raw).__name__})"
    question, choices, answer = (raw.get(source.question_field), raw.get(source.choices_field),
                                 raw.get(source.answer_field))
    if not isinstance(question, str) or not question.strip():
        return None, f"field {source.question_field!r} is missing or empty"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return None, f"field {source.choices_field!r} is not a list of at least two strings"
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return None, f"field {source.answer_field!r} is {answer!r}: not a choice index or a choice's text"
    return {"id": str(raw.get(source.id_field) or rec.origin), "question": question, "choices": choices,
            "answer": answer}, ""


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
                                 "reasons": dict(bad), "license": source.license}
        if bad:
            get_logger().warning(f"benchmark {source.name}: {sum(bad.values())} unusable records: {dict(bad)}")
    return items, problems


@task(name="export-hf", task_run_name="export-{label}")
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


@task(name="evaluate", task_run_name="evaluate-{label}")
def evaluate_model(model_dir: str, label: str, manifest: str, sft_manifest: str | None, spec: EvalSpec,
                   items: dict[str, list[dict]]) -> dict:
    from model.evaluate import evaluate

    results = evaluate(Path(model_dir), Path(manifest), items, spec.prompts, spec.perplexity_rows,
                       Path(sft_manifest) if sft_manifest else None, spec.max_new_tokens, spec.temperature,
                       spec.top_k, spec.seed)
    get_logger().info(f"evaluate {label}: perplexity {results['validation']['perplexity']:.2f}, " + ", ".join(
        f"{name} acc {r['acc']:.3f} (chance {r['chance']:.3f})" for name, r in results["multiple_choice"].items()))
    return results


def report_markdown(results: dict[str, dict], benchmarks: dict) -> str:
    labels = list(results)
    lines = ["# Evaluation", "", "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

    def row(name: str, get) -> None:
        lines.append(f"| {name} | " + " | ".join(get(results[label]) for label in labels) + " |")

    row("validation perplexity (pretraining held-out text)", lambda r: f"{r['validation']['perplexity']:.2f}")
    row("validation loss (nats/token)", lambda r: f"{r['validation']['loss']:.3f}")
    if all("sft_validation" in r for r in results.values()):
        row("reply perplexity (held-out SFT replies)", lambda r: f"{r['sft_validation']['perplexity']:.2f}")
    for name, info in benchmarks.items():
        row(f"{name} acc ({info['items']} items; chance "
            f"{next(iter(results.values()))['multiple_choice'][name]['chance']:.3f})",
            lambda r: f"{r['multiple_choice'][name]['acc']:.3f}")
        row(f"{name} acc_norm", lambda r: f"{r['multiple_choice'][name]['acc_norm']:.3f}")
    lines += ["", "## Generations", ""]
    for i, prompt_row in enumerate(next(iter(results.values()))["generations"]):
        lines.append(f"**{prompt_row['prompt']}**\n")
        for label in labels:
            gen = results[label]["generations"][i]
            lines.append(f"- {label}, greedy: {gen['greedy']!r}\n- {label}, sampled: {gen['sampled']!r}")
        lines.append("")
    return "\n".join(lines)


@task(name="eval-report")
def publish_report(results: dict[str, dict], benchmarks: dict, checkpoints: dict[str, str], reports_dir: str) -> str:
    """Write `results.json` and `report.md` (atomically) and publish them as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = hashlib.sha256(json.dumps(checkpoints, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(reports_dir) / f"eval-{key}"
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(results, benchmarks)
    for name, text in (("results.json", json.dumps({"checkpoints": checkpoints, "benchmarks": benchmarks,
                                                    "results": results}, indent=1)), ("report.md", markdown)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    create_markdown_artifact(key="evaluation-report", markdown=markdown + f"\n\nFiles: `{out}`")
    create_table_artifact(key="evaluation-metrics", table=[
        {"checkpoint": label, "perplexity": round(r["validation"]["perplexity"], 3),
         **{f"{n} acc": round(m["acc"], 3) for n, m in r["multiple_choice"].items()},
         **{f"{n} chance": round(m["chance"], 3) for n, m in r["multiple_choice"].items()}}
        for label, r in results.items()])
    get_logger().info(f"evaluation report: {out / 'report.md'}")
    return str(out)
