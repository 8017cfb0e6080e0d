"""Stage 5, shard: tokenize documents and pack them into fixed-length Parquet rows for training.

A datatrove pipeline on the spec's executor (local processes, Ray or Slurm): its N tasks each read their share of
the document files and run `TokenizeAndPack` (tasks/lib/blocks.py): each document becomes its token ids followed
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

from prefect import task
from pydantic import BaseModel

from model.tokenizer import Tokenizer
from tasks.lib.artifacts import STAGE_TASK_OPTIONS, ArtifactRef, build_artifact
from tasks.lib.blocks import FolderJsonlReader, TokenizeAndPack, in_process_if_small, run_pipeline
from tasks.lib.log import get_logger
from tasks.spec import ExecutorConfig, ShardingConfig

MANIFEST_VERSION = 1


class ShardInfo(BaseModel):
    path: str  # relative to the manifest
    split: str  # "train" or "valid"
    source: str
    rows: int
    tokens: int
    sha256: str
    row_group_rows: int | None = None  # rows per Parquet row group, the last may hold fewer (None: read the footer)


class ShardManifest(BaseModel):
    """What training reads: the shards, their shapes, and where they came from."""

    version: int = MANIFEST_VERSION  # of this file's format
    data_version: int = 1  # 1 for a full build; each incremental ingest appends shards and adds one
    parent: str | None = None  # the manifest directory this one appended to
    seq_len: int
    row_len: int
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    mixture: dict[str, float]  # normalised training sampling weights per source
    shards: list[ShardInfo]
    totals: dict[str, int]
    lineage: dict

    @classmethod
    def load(cls, directory: Path) -> "ShardManifest":
        return cls.model_validate_json((Path(directory) / "manifest.json").read_text())


def shard_documents(docs_dir: Path, tokenizer_dir: Path, config: ShardingConfig, lineage: dict, out_dir: Path,
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


def mixture_weights(shards: list[ShardInfo], config: ShardingConfig) -> dict[str, float]:
    """Normalised sampling weight per source: the spec's, else the source's share of training tokens."""
    sources = sorted({x.source for x in shards})
    train_tokens = {s: sum(x.tokens for x in shards if x.source == s and x.split == "train") for s in sources}
    weights = {s: config.mixture.get(s, train_tokens[s] / max(1, sum(train_tokens.values()))) for s in sources}
    norm = sum(weights.values()) or 1.0
    return {s: w / norm for s, w in weights.items()}


@task(name="shard", **STAGE_TASK_OPTIONS)
def shard(documents: ArtifactRef, tokenizer: ArtifactRef, config: ShardingConfig, lineage: dict,
          artifacts_dir: str, increment: bool = False, executor: ExecutorConfig = ExecutorConfig()) -> ArtifactRef:
    """`lineage` (spec, source files, upstream fingerprints) is recorded in the manifest but not keyed on: it is
    implied by the upstream fingerprints. `increment`: shards of new documents, to be appended (tasks/append.py)."""
    lineage = {**lineage, "documents": documents.fingerprint, "tokenizer": tokenizer.fingerprint,
               "tokenizer_dir": str(tokenizer.dir)}
    return build_artifact("shard", dict(documents=documents, tokenizer=tokenizer, config=config, lineage=lineage,
                                        increment=increment, executor=executor, artifacts_dir=artifacts_dir),
                          lambda out: shard_documents(documents.dir / "docs", tokenizer.dir, config, lineage, out,
                                                      increment, executor))
