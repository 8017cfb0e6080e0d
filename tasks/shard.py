"""Stage 5, shard: tokenize documents and pack them into fixed-length Parquet rows for training.

A datatrove pipeline on the spec's executor (local processes, Ray or Slurm): its N tasks each read their share of
the document files and run `TokenizeAndPack` below: each document becomes its token ids followed
by EOS (and preceded by BOS where the model's tokenizer adds one), concatenated per source and split into rows of
`seq_len + 1` tokens (inputs and shifted targets of one sample), written to the task's own shards. Train/validation is decided per document, so no document is in both.
`manifest.json`, assembled from the tasks' records, lists every shard with rows, tokens and sha256, plus the
tokenizer hash and the fingerprints of everything upstream (lineage); for a given spec and task count it is the
same on every executor. Each task drops the tokens after its last full row of each (split, source): at most
`seq_len` per task, source and split, reported as `tail_tokens_dropped`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader

from model.tokenizer import Tokenizer
from tasks.lib.artifacts import ArtifactRef, sha256_file
from tasks.lib.blocks import in_process_if_small, keep_in_sample, run_pipeline
from tasks.lib.log import get_logger
from tasks.lib.manifest import DataLineage, ShardInfo, ShardManifest, mixture_weights
from tasks.spec import ExecutorConfig, ShardingConfig

# The train/validation split is drawn per document id with this seed: the same documents are held out on every
# run and machine.
SPLIT_SEED = 1234


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
                split = "valid" if keep_in_sample(doc.id, self.config.validation_fraction, SPLIT_SEED) else "train"
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



def shard_documents(docs_dir: Path, tokenizer_dir: Path, config: ShardingConfig, lineage: DataLineage, out_dir: Path,
                    increment: bool = False, executor: ExecutorConfig = ExecutorConfig()) -> dict:
    """Tokenize and pack `docs_dir/<source>/*.jsonl.gz` on `executor`. An `increment` (new documents to append to
    an existing manifest) may hold no full row; a full build must."""
    log = get_logger()
    tokenizer = Tokenizer(tokenizer_dir)
    row_len = config.seq_len + 1
    started = time.perf_counter()
    records = []
    if any(docs_dir.glob("*/*.jsonl.gz")):
        pipeline = [FolderJsonlReader(str(docs_dir), glob_pattern="*/*.jsonl.gz"),
                    TokenizeAndPack(tokenizer_dir, config, out_dir, threads=executor.cpus_per_task)]
        run_pipeline(pipeline, in_process_if_small(executor, docs_dir), out_dir / "_logs")
        records = [json.loads(p.read_text()) for p in sorted((out_dir / "_logs" / "packed").glob("*.json"))]
    shards = sorted((ShardInfo(**x, tokens=x["rows"] * row_len, row_group_rows=config.row_group_size)
                     for r in records for x in r["shards"]), key=lambda x: x.path)
    seconds = time.perf_counter() - started
    totals = {k: sum(r[k] for r in records) for k in ("docs_train", "docs_valid", "tokens")}
    totals.update({f"rows_{split}": sum(s.rows for s in shards if s.split == split) for split in ("train", "valid")},
                  tail_tokens_dropped=sum(r["tail_tokens_dropped"] for r in records))
    if totals["rows_train"] == 0 and not increment:
        raise ValueError(f"no training rows: {totals['tokens']} tokens do not fill one row of seq_len+1={row_len}; "
                         f"lower sharding.seq_len or add data")
    manifest = ShardManifest(seq_len=config.seq_len, row_len=row_len, vocab_size=tokenizer.vocab_size,
                             eos_id=tokenizer.eos_id, tokenizer_sha256=tokenizer.sha256,
                             mixture=mixture_weights(shards, config), shards=shards, totals=totals,
                             lineage=lineage)
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    tokens_per_s = totals["tokens"] / max(seconds, 1e-9)
    log.info(f"shard: {totals['tokens']:,} tokens in {len(shards)} shards from {len(records)} tasks, "
             f"{seconds:.1f} s ({tokens_per_s / 1e6:.2f} M tokens/s)")
    return {**totals, "shards": len(shards), "tasks": len(records), "tokens_per_s": round(tokens_per_s)}


def build(out: Path, documents: ArtifactRef, tokenizer: ArtifactRef, config: ShardingConfig, lineage: DataLineage,
          artifacts_dir: str, increment: bool = False, executor: ExecutorConfig = ExecutorConfig()) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py). `lineage` (spec, source files, upstream fingerprints) is
    recorded in the manifest but not keyed on: it is implied by the upstream fingerprints. `increment`: shards of
    new documents, to be appended (tasks/append.py)."""
    lineage = lineage.model_copy(update={"documents": documents.fingerprint, "tokenizer": tokenizer.fingerprint,
                                         "tokenizer_dir": str(tokenizer.dir)})
    return shard_documents(documents.dir / "docs", tokenizer.dir, config, lineage, out, increment, executor)
