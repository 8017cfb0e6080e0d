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
    row_group_rows: int  # rows per Parquet row group; the last may hold fewer


SourceFiles = dict[str, list[tuple[str, str]]]  # per source: (absolute path, sha256) of each file


class Increment(BaseModel):
    """One incremental ingest that an appended manifest adds (tasks/append.py)."""

    data_version: int
    new_files: SourceFiles
    shards: str  # the new shards' artifact directory
    upstream: dict[str, str]  # "stage/what" -> fingerprint of the steps that built them


class DataLineage(BaseModel):
    """Where a manifest's data came from. Recorded, not keyed on: the upstream fingerprints imply it. A full build
    has the spec and its source files; the shards of one increment have only `new_files` (the manifest that appends
    them lists them); an SFT manifest has its SFT spec."""

    spec_path: str | None = None
    spec: dict | None = None  # the data spec as built (tasks/spec.py: DataSpec)
    sft_spec: dict | None = None  # or the SFT spec (tasks/spec.py: SFTSpec)
    settings: str | None = None  # tasks/append.py: settings_key, what a later ingest must match to extend this one
    source_files: SourceFiles | None = None
    new_files: SourceFiles | None = None
    documents: str | None = None  # fingerprint of the documents tokenized
    tokenizer: str | None = None  # fingerprint of the tokenizer artifact
    tokenizer_dir: str | None = None
    dedup_dir: str | None = None  # the dedup index a later ingest dedups against
    upstream: dict[str, str] = {}
    increments: list[Increment] = []

    @property
    def spec_name(self) -> str | None:
        return (self.spec or self.sft_spec or {}).get("name")


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
    lineage: DataLineage

    @classmethod
    def load(cls, directory: Path) -> "ShardManifest":
        return cls.model_validate_json((Path(directory) / "manifest.json").read_text())

    def split(self, split: str) -> list[ShardInfo]:
        return [x for x in self.shards if x.split == split]


def mixture_weights(shards: list[ShardInfo], config: ShardingConfig) -> dict[str, float]:
    """Normalised sampling weight per source: the spec's, else the source's share of training tokens."""
    sources = sorted({x.source for x in shards})
    train_tokens = {s: sum(x.tokens for x in shards if x.source == s and x.split == "train") for s in sources}
    weights = {s: config.mixture.get(s, train_tokens[s] / max(1, sum(train_tokens.values()))) for s in sources}
    norm = sum(weights.values()) or 1.0
    return {s: w / norm for s, w in weights.items()}
