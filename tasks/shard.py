"""Stage 5, shard: tokenize documents and pack them into fixed-length Parquet rows for training.

Each document becomes its token ids followed by EOS; documents are concatenated per source and split into rows of
`seq_len + 1` tokens (inputs and shifted targets of one sample). Train/validation is decided per document, so no
document is in both. `manifest.json` lists every shard with rows, tokens and sha256, plus the tokenizer hash and
the fingerprints of everything upstream (lineage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from prefect import task
from pydantic import BaseModel

from tasks.lib.artifacts import STAGE_TASK_OPTIONS, ArtifactRef, build_artifact, sha256_file
from tasks.lib.log import get_logger
from tasks.spec import ShardingConfig
from tasks.tokenizer import iter_documents, keep_in_sample

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


class RowPacker:
    """Accumulates token streams and writes full `row_len` rows into numbered Parquet shards."""

    def __init__(self, folder: Path, row_len: int, config: ShardingConfig):
        self.folder, self.row_len, self.config = folder, row_len, config
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
        path = self.folder / f"shard-{len(self.shards):05d}.parquet"
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


def shard_documents(docs_dir: Path, tokenizer_dir: Path, config: ShardingConfig, lineage: dict, out_dir: Path,
                    increment: bool = False) -> dict:
    """Tokenize and pack `docs_dir/<source>/*.jsonl.gz`. An `increment` (new documents to append to an existing
    manifest) may hold no full row; a full build must."""
    log = get_logger()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    eos = sp.eos_id()
    row_len = config.seq_len + 1
    dtype = np.int32
    sources = sorted(p.name for p in docs_dir.iterdir() if p.is_dir()) if docs_dir.is_dir() else []
    shards: list[ShardInfo] = []
    docs = {"train": 0, "valid": 0}
    tail_tokens = 0
    started = time.perf_counter()
    total_tokens = 0
    for source in sources:
        packers = {split: RowPacker(out_dir / split / source, row_len, config) for split in ("train", "valid")}
        batch: list[dict] = []

        def encode_batch() -> None:
            nonlocal total_tokens
            ids = sp.encode([d["text"] for d in batch], num_threads=2)
            for doc, tokens in zip(batch, ids):
                split = "valid" if keep_in_sample(doc["id"], config.validation_fraction, seed=1234) else "train"
                docs[split] += 1
                arr = np.empty(len(tokens) + 1, dtype)
                arr[:-1] = tokens
                arr[-1] = eos
                total_tokens += len(arr)
                packers[split].add(arr)
            batch.clear()

        for doc in iter_documents(docs_dir / source):
            batch.append(doc)
            if len(batch) >= config.encode_batch_docs:
                encode_batch()
        if batch:
            encode_batch()
        for split, packer in packers.items():
            tail_tokens += packer.close()
            for path, rows in packer.shards:
                shards.append(ShardInfo(path=str(path.relative_to(out_dir)), split=split, source=source, rows=rows,
                                        tokens=rows * row_len, sha256=sha256_file(path),
                                        row_group_rows=config.row_group_size))
        log.info(f"shard {source}: {sum(s.rows for s in shards if s.source == source)} rows")
    seconds = time.perf_counter() - started

    totals = {"docs_train": docs["train"], "docs_valid": docs["valid"], "tokens": total_tokens,
              "rows_train": sum(s.rows for s in shards if s.split == "train"),
              "rows_valid": sum(s.rows for s in shards if s.split == "valid"), "tail_tokens_dropped": tail_tokens}
    if totals["rows_train"] == 0 and not increment:
        raise ValueError(f"no training rows: {total_tokens} tokens do not fill one row of seq_len+1={row_len}; "
                         f"lower sharding.seq_len or add data")
    manifest = ShardManifest(seq_len=config.seq_len, row_len=row_len, vocab_size=sp.vocab_size(), eos_id=eos,
                             tokenizer_sha256=sha256_file(tokenizer_dir / "tokenizer.model"),
                             mixture=mixture_weights(shards, config), shards=shards, totals=totals,
                             lineage=lineage)
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    log.info(f"shard: {total_tokens:,} tokens in {seconds:.1f} s ({total_tokens / max(seconds, 1e-9) / 1e6:.2f} M "
             f"tokens/s)")
    return {**totals, "shards": len(shards), "tokens_per_s": round(total_tokens / max(seconds, 1e-9))}


def mixture_weights(shards: list[ShardInfo], config: ShardingConfig) -> dict[str, float]:
    """Normalised sampling weight per source: the spec's, else the source's share of training tokens."""
    sources = sorted({x.source for x in shards})
    train_tokens = {s: sum(x.tokens for x in shards if x.source == s and x.split == "train") for s in sources}
    weights = {s: config.mixture.get(s, train_tokens[s] / max(1, sum(train_tokens.values()))) for s in sources}
    norm = sum(weights.values()) or 1.0
    return {s: w / norm for s, w in weights.items()}


@task(name="shard", **STAGE_TASK_OPTIONS)
def shard(documents: ArtifactRef, tokenizer: ArtifactRef, config: ShardingConfig, lineage: dict,
          artifacts_dir: str, increment: bool = False) -> ArtifactRef:
    """`lineage` (spec, source files, upstream fingerprints) is recorded in the manifest but not keyed on: it is
    implied by the upstream fingerprints. `increment`: shards of new documents, to be appended (tasks/append.py)."""
    lineage = {**lineage, "documents": documents.fingerprint, "tokenizer": tokenizer.fingerprint,
               "tokenizer_dir": str(tokenizer.dir)}
    return build_artifact("shard", dict(documents=documents, tokenizer=tokenizer, config=config, lineage=lineage,
                                        increment=increment, artifacts_dir=artifacts_dir),
                          lambda out: shard_documents(documents.dir / "docs", tokenizer.dir, config, lineage, out,
                                                      increment))
