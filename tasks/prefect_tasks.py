"""Every Prefect task of the project, in one place: thin wrappers over plain functions that run and are tested
without Prefect. This is the only module under tasks/ that imports Prefect.

- The data stages run as steps (tasks/lib/steps.py): one cached task per stage, keyed by the step's fingerprint.
  A cache hit is trusted only while its artifact verifies; otherwise the task runs again and rebuilds it.
- Training (pretrain, sft) retries when the launcher itself was killed; a retry resumes the run directory.
- What people would rather look at than read is published as artifacts: each stage's summary, the plan, the
  data flow's table, training progress, metrics and loss curve, and the evaluation report.
- The pipeline's log lines (tasks/lib/log.py) go to the run's log in the UI, and progress lines to the root flow
  run too, which `prefect deployment run --watch` streams.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.settings import get_current_settings

from model.run_config import RunConfig, Start
from tasks import evaluate as evaluation
from tasks import quantize as quantization
from tasks.clean import dropped_samples_markdown
from tasks.lib.artifacts import RECORD_NAME, ArtifactRef, stage_row, verify
from tasks.lib.log import LOGGER, get_logger, progress, progress_sinks
from tasks.lib.plan import PlanRow
from tasks.lib.preflight import preflight as check_before_work
from tasks.lib.sources import ResolvedSource, resolve_source
from tasks.lib.steps import Step, build_step
from tasks.lib.supervise import LauncherDied
from tasks.lib.training_report import final_validation, loss_curve_png
from tasks.spec import SourceSpec
from tasks.train import train

# ---------------------------------------------------------------- logging


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for the pipeline's own logger, inside a flow or task run only (a stage called as a
    plain function logs where plain Python logging goes)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


_root_of: dict[str, str | None] = {}  # flow run id -> its root flow run's id, or None when it is the root


def to_root_flow_run(message: str) -> None:
    """Log `message` on the root flow run too, when this is a child flow run (to the API only: the console has
    printed it already)."""
    try:
        from prefect.runtime import flow_run

        current = flow_run.id
        if current and current not in _root_of:
            root = flow_run.root_flow_run_id  # walks up the parents through the API: once per flow run
            _root_of[current] = root if root != current else None
        root = _root_of.get(current) if current else None
    except Exception:  # no server, or not in a run: the line was logged where it could be
        return
    if root is not None:
        record = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 0, message, None, None)
        record.flow_run_id, record.task_run_id = root, None
        APILogHandler().emit(record)


def attach_logging() -> None:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if to_root_flow_run not in progress_sinks:
        progress_sinks.append(to_root_flow_run)


attach_logging()

# ---------------------------------------------------------------- artifacts


def in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def flatten(summary: dict, prefix: str = "") -> dict:
    """{"filters": {"c4": {"dropped": 3}}} -> {"filters.c4.dropped": 3}, so nested counts show in one table."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def publish_summary(key: str, summary: dict) -> None:
    """A stage's summary as a two-column table."""
    rows = [{"metric": k, "value": shown(v)} for k, v in flatten(summary).items()]
    key = re.sub(r"[^a-z0-9-]", "-", key.lower())  # Prefect artifact keys allow only these
    create_table_artifact(key=key, table=rows, description=f"**{key}** stage summary")


def publish_plan(rows: list[PlanRow], key: str = "data-plan") -> None:
    if in_run():
        create_table_artifact(key=key, table=[asdict(r) for r in rows],
                              description="Each stage of this run: reused, or built, and why (tasks/lib/plan.py)")


# ---------------------------------------------------------------- data stages, as steps


def prefect_cache_dir() -> Path | None:
    """Where Prefect keeps the stage tasks' cached results (`python -m tasks.gc --delete` removes a deleted
    artifact's records)."""
    try:
        return Path(get_current_settings().results.local_storage_path).expanduser()
    except Exception:
        return None


def step_cache_key(context, parameters: dict) -> str:
    """A stage task's cache key: its step's fingerprint and the store it lives in."""
    ref = parameters["step"].ref
    where = hashlib.sha256(str(Path(ref.path).parents[1]).encode()).hexdigest()[:8]
    return f"{ref.stage}-{ref.fingerprint}-{where}"


@task(name="stage", cache_key_fn=step_cache_key, persist_result=True, retries=0)
def stage_task(step: Step, upstream: list[ArtifactRef]) -> ArtifactRef:
    """Build (or reuse) a step's artifact; `upstream` (the input steps' results) only draws the UI's graph."""
    started = time.time()
    ref = build_step(step)
    meta = ref.meta()
    if meta.get("built_at", 0) >= started:
        publish_summary(f"{step.stage}-{step.what}", meta["summary"])
        if step.stage == "clean":
            create_markdown_artifact(key=f"clean-dropped-{step.what}".replace("_", "-").lower(),
                                     markdown=dropped_samples_markdown(step.what, ref.dir))
    return ref


def run_step(step: Step, verify_files: bool = False, upstream: list[ArtifactRef] = ()) -> ArtifactRef:
    """Run one step as a task named after it, trusting Prefect's cached result only if the artifact still verifies
    (`verify_files`: by sha256, else by stat); its start and its summary are progress lines."""
    path = step.ref.dir
    runner = stage_task.with_options(name=step.stage, task_run_name=step.name)
    problem = verify(path, full=verify_files)
    if problem is not None:
        runner = runner.with_options(refresh_cache=True)
        if (path / RECORD_NAME).is_file():  # complete but corrupt: mark it incomplete, so the task rebuilds it
            get_logger().warning(f"{step.stage}: rebuilding {path} because {problem}")
            (path / RECORD_NAME).unlink()
    progress(f"> {step.name}: started")
    started = time.time()
    ref = runner(step, list(upstream))
    row = stage_row(step.name, ref)
    done = "reused" if ref.meta().get("built_at", 0) < started else "built"
    progress(f"< {step.name}: {done}; " + ", ".join(
        f"{k} {v}" for k, v in row.items() if v not in ("", None) and k not in ("stage", "what", "built", "artifact")))
    return ref


def run_steps(steps: list[Step], verify_files: bool = False) -> list[ArtifactRef]:
    """Run a step list in order; each step gets its input steps' results, so the UI shows the graph."""
    returned: dict[str, ArtifactRef] = {}
    for s in steps:
        returned[s.ref.id] = run_step(s, verify_files, [returned[r.id] for r in s.inputs if r.id in returned])
    return [returned[s.ref.id] for s in steps]


@task(name="resolve", task_run_name="resolve-{source.name}")
def resolve(source: SourceSpec) -> ResolvedSource:
    """Not cached on purpose: it is what notices that the files changed."""
    return resolve_source(source)


@task(name="report")
def report(steps: list[Step], refs: list[ArtifactRef], manifest_path: str) -> list[dict]:
    """One table for the whole data flow: what each stage took in and gave out, and whether it was reused."""
    rows = [stage_row(s.what, ref) for s, ref in zip(steps, refs)]
    create_table_artifact(key="data-flow-stages", table=rows, description="Data flow: every stage's artifact")
    create_markdown_artifact(key="data-flow-manifest",
                             markdown=f"Training shards manifest: `{manifest_path}`\n\nA stage whose `built` time "
                                      f"is older than this run was reused from its verified artifact.")
    for r in rows:
        get_logger().info(" | ".join(f"{k}={v}" for k, v in r.items() if k != "artifact"))
    return rows


# ---------------------------------------------------------------- training


@task(name="preflight")
def preflight(config: RunConfig, start: str | None = None, hf_setting: str | None = None) -> None:
    """Runs before the data flow: the GPUs, the layout against the starting model, fp8 (tasks/lib/preflight.py)."""
    check_before_work(config, start, hf_setting)


def launcher_died(task, task_run, state) -> bool:
    """The training tasks' retry condition: retry (and so resume) when the launcher was killed, not when training
    failed on its own (that has had its restarts) or a setting is wrong."""
    try:
        state.result()
    except LauncherDied:
        return True
    except Exception:
        return False
    return False


TRAINING_TASK_OPTIONS = dict(retries=2, retry_delay_seconds=5, retry_condition_fn=launcher_died)
STEP_LINE = re.compile(r"^step=(\d+)/")


def train_and_publish(stage: str, manifest_path: str, config: RunConfig, runs_dir: str, start: Start) -> str:
    """Train with a progress artifact that follows rank 0's `step=N` lines, then publish the metrics table and the
    loss curve."""
    steps = config.train.steps
    bar = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                   description=f"{stage}: percent of {steps} steps done") if in_run() else None

    def on_line(line: str) -> None:
        if bar is not None and (match := STEP_LINE.match(line)):
            update_progress_artifact(bar, progress=min(100.0, 100.0 * int(match.group(1)) / steps))

    trained = train(stage, manifest_path, config, runs_dir, start, on_line)
    if trained.records is not None and in_run():
        publish_training(trained.records, trained.run_dir, trained.baseline, stage)
    return str(trained.run_dir)


def publish_training(records: list[dict], run_dir: Path, baseline: float | None, stage: str) -> None:
    logged = [r for r in records if "tokens_per_s" in r or r.get("val_loss") is not None]
    create_table_artifact(key=f"{stage}-metrics", description=f"{stage} metrics at each log step",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in logged])
    png = loss_curve_png(records, run_dir / "loss_curve.png", baseline)
    final = final_validation(records)
    reference = f" (unigram-entropy baseline {baseline:.3f})" if baseline is not None else ""
    create_markdown_artifact(key=f"{stage}-loss-curve", markdown=(
        f"# {stage}: {run_dir.name}\n\nFinal validation loss **{final.get('val_loss', float('nan')):.3f}** at "
        f"step {final['step']}{reference}.\n\n"
        f"![loss curve](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})\n\n"
        f"Run directory: `{run_dir}`"))


@task(name="pretrain", **TRAINING_TASK_OPTIONS)
def pretrain(manifest_path: str, config: RunConfig, runs_dir: str, start: Start = Start()) -> str:
    return train_and_publish("pretrain", manifest_path, config, runs_dir, start)


@task(name="sft", **TRAINING_TASK_OPTIONS)
def sft(manifest_path: str, config: RunConfig, runs_dir: str, start: Start) -> str:
    return train_and_publish("sft", manifest_path, config, runs_dir, start)


# ---------------------------------------------------------------- evaluation


@task(name="prepare-lm-eval")
def prepare_lm_eval(spec, items: dict[str, list[dict]], task_dir: str) -> list[str]:
    return evaluation.prepare_lm_eval(spec, items, task_dir)


@task(name="export-hf", task_run_name="export-{label}")
def export_hf(checkpoint: str, label: str) -> str:
    return evaluation.export_hf(checkpoint, label)


@task(name="quantize", task_run_name="quantize-{label}-{scheme}")
def quantize_export(model_dir: str, scheme: str, label: str, manifest: str, held_out_rows: int) -> str:
    return quantization.quantize_export(model_dir, scheme, label, manifest, held_out_rows)


@task(name="evaluate", task_run_name="evaluate-{label}")
def evaluate_model(model_dir: str, label: str, manifest: str, sft_manifest: str | None, spec,
                   task_names: list[str], task_dir: str) -> dict:
    return evaluation.evaluate_model(model_dir, label, manifest, sft_manifest, spec, task_names, task_dir)


@task(name="eval-report")
def publish_report(results: dict[str, dict], benchmarks: dict, checkpoints: dict[str, str], reports_dir: str,
                   variants: dict[str, dict] | None = None) -> str:
    """Write `results.json` and `report.md` (atomically) and publish them as Prefect artifacts."""
    out = evaluation.write_report(results, benchmarks, checkpoints, reports_dir, variants)
    if variants:
        create_table_artifact(key="quantization", table=evaluation.quantization_rows(results, variants),
                              description="Each quantized model against its original, on the same items")
    create_markdown_artifact(key="evaluation-report",
                             markdown=(out / "report.md").read_text() + f"\n\nFiles: `{out}`")
    create_table_artifact(key="evaluation-metrics", table=[
        {"checkpoint": label, "perplexity": round(r["validation"]["perplexity"], 3),
         **{f"{task} {m}": round(v, 4) for task, scores in r.get("lm_eval", {}).get("tasks", {}).items()
            for m, v in scores.items() if m != "items"},
         **{f"{n} chance": round(b["chance"], 3) for n, b in benchmarks.items()}}
        for label, r in results.items()])
    return str(out)
