"""What the data stages share of datatrove: English word splitting, deterministic sampling by document id,
counting documents per source, reading and writing documents per source, and running a pipeline on the spec's
executor (local, Ray or Slurm). A block that one stage uses lives in that stage's module.

No Prefect here or in any stage module: datatrove pickles blocks by module into every worker."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import regex
from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.stats import MetricStats, MetricStatsDict, PipelineStats
from datatrove.utils.word_tokenizers import WordTokenizer

from tasks.lib.log import get_logger
from tasks.lib.slurm import wait_for_job
from tasks.spec import ExecutorConfig

_WORD = regex.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]+")
_SENTENCE_END = regex.compile(r"(?<=[.!?…]['\"”’)\]]*)\s+|\n\s*\n")


class RegexWordTokenizer(WordTokenizer):
    """English word and sentence splitting with two regexes.

    datatrove's default for English is spaCy, which spends ~80% of filter time splitting words; this keeps the
    same keep/drop decision on almost all documents at ~5x the speed (measured in shared/FACTS.md).
    """

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    # datatrove caches split results keyed on the tokenizer; equal instances should share the cache.
    def __eq__(self, other):
        return isinstance(other, RegexWordTokenizer)

    def __hash__(self):
        return hash(RegexWordTokenizer)


def keep_in_sample(doc_id: str, fraction: float, seed: int) -> bool:
    """Deterministic document sampling: the same docs are chosen on every run and every machine."""
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class CountDocuments(PipelineStep):
    """Passes documents on unchanged, counting them and their UTF-8 text bytes per source in the pipeline's stats
    (`<label> docs <source>`, `<label> bytes <source>`; read back with `counted`). A stage's summary then comes from
    its workers instead of from reading everything again in one process, which at 100 GB would take longer than
    the stage's own work on a cluster."""

    name = "🔢 count"
    type = "📊 - STATS"

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            source = doc.metadata.get("source", "")
            self.stat_update(f"{self.label} docs {source}")
            self.stat_update(f"{self.label} bytes {source}", value=len(doc.text.encode("utf-8")))
            yield doc


def counted(stats: PipelineStats, label: str) -> tuple[Counter, Counter]:
    """(documents, text bytes) per source that the pipeline's `CountDocuments(label)` passed on."""
    docs: Counter = Counter()
    nbytes: Counter = Counter()
    for step in stats.stats:
        for key, metric in step.stats.items():
            parts = key.rsplit(" ", 2)  # source names have no spaces; labels may
            if len(parts) == 3 and parts[0] == label and parts[1] in ("docs", "bytes"):
                (docs if parts[1] == "docs" else nbytes)[parts[2]] += int(metric.total)
    return docs, nbytes


SMALL_INPUT_BYTES = 512 * 1024  # compressed JSONL


def in_process_if_small(executor: ExecutorConfig, inputs: Path | list[Path]) -> ExecutorConfig:
    """The local executor with one worker when the input (a folder, or a list of files) is small (an incremental
    ingest, a test): datatrove then runs the tasks one after another in this process, where starting worker
    processes would cost about a second per pipeline, more than the work. The same tasks run, so the output is
    the same."""
    if executor.kind != "local" or executor.workers == 1:
        return executor
    files = inputs if isinstance(inputs, list) else [f for f in Path(inputs).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return executor.model_copy(update={"workers": 1}) if size < SMALL_INPUT_BYTES else executor


def run_pipeline(pipeline: list, executor: ExecutorConfig, logging_dir: Path, tasks: int | None = None):
    """Run datatrove steps to completion with the configured executor; return the merged PipelineStats.

    Ray runs block until done. Slurm jobs are submitted with sbatch, then polled with squeue until they leave
    the queue, so a stage returns only once its output is complete, as with the other executors."""
    tasks = tasks or executor.tasks
    workers = min(executor.workers, tasks)
    started = time.perf_counter()
    if executor.kind == "local":
        runner = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                                       logging_dir=str(logging_dir), skip_completed=False)
        runner.run()
    elif executor.kind == "ray":
        import ray
        from datatrove.executor import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(address=executor.ray_address, include_dashboard=False, log_to_driver=False,
                     **({} if executor.ray_address else {"num_cpus": executor.workers * executor.cpus_per_task}))
        runner = RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                     skip_completed=False, cpus_per_task=executor.cpus_per_task,
                                     mem_per_cpu_gb=executor.mem_per_cpu_gb)
        runner.run()
    else:
        runner = slurm_executor(pipeline, executor, logging_dir, tasks, workers)
        runner.run()
        if runner.job_id not in (None, -1):  # -1: every task had completed already
            wait_for_job(runner.job_id, executor.slurm.poll_seconds)
    missing = runner.get_incomplete_ranks(range(tasks), skip_completed=True)
    if missing:
        raise RuntimeError(f"datatrove tasks {missing} of {tasks} did not complete; logs: {logging_dir}")
    get_logger().info(f"datatrove {' -> '.join(type(step).__name__ for step in pipeline)}: {tasks} tasks in "
                      f"{time.perf_counter() - started:.1f} s")
    return merged_stats(Path(logging_dir) / "stats")


def merged_stats(stats_dir: Path) -> PipelineStats:
    """Every task's stats file summed, as the local executor's own merge does."""
    merged = PipelineStats()
    for path in sorted(stats_dir.glob("*.json")):
        stats = PipelineStats.from_json(json.loads(path.read_text()))
        for step in stats.stats:  # from_json leaves metrics as saved (numbers, dicts); counting needs MetricStats
            step.stats = MetricStatsDict(init={k: v if isinstance(v, MetricStats) else MetricStats.from_dict(v)
                                               for k, v in step.stats.items()})
        merged = merged + stats
    return merged


DATA_JOB_TIME = "04:00:00"  # an array job's time limit unless executor.slurm.time says otherwise


def slurm_executor(pipeline: list, executor: ExecutorConfig, logging_dir: Path, tasks: int, workers: int):
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        pipeline=pipeline, tasks=tasks, workers=workers, time=executor.slurm.time or DATA_JOB_TIME,
        partition=executor.slurm.partition, cpus_per_task=executor.cpus_per_task,
        mem_per_cpu_gb=executor.mem_per_cpu_gb,
        job_name=f"llm-{Path(logging_dir).parent.name}-{Path(logging_dir).name}".replace("_", ""),
        env_command=executor.slurm.env_command, sbatch_args=executor.slurm.sbatch_args,
        logging_dir=str(logging_dir), skip_completed=False, requeue=False)


def per_source_writer(folder: Path) -> JsonlWriter:
    """Documents written per source, `<folder>/<source>/<rank>.jsonl.gz`, as later stages read them."""
    return JsonlWriter(str(folder), output_filename="${source}/${rank}.jsonl.gz", compression="gzip")
