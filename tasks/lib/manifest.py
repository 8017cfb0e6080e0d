"""The shard manifest: what training reads (model/data.py), and what the shard, append and sft_data stages write,
the benchmarks build and the lineage and gc commands follow. Typed, so that every reader sees the same fields."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from tasks.spec import ShardingConfig


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


def mixture_weights(shards: list[ShardInfo], config: ShardingConfig) -> dict[str, float]:
    """Normalised sampling weight per source: the spec's, else the source's share of training tokens."""
    sources = sorted({x.source for x in shards})
    train_tokens = {s: sum(x.tokens for x in shards if x.source == s and x.split == "train") for s in sources}
    weights = {s: config.mixture.get(s, train_tokens[s] / max(1, sum(train_tokens.values()))) for s in sources}
    norm = sum(weights.values()) or 1.0
    return {s: w / norm for s, w in weights.items()}
