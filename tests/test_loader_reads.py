"""The training loader, validation rows and the unigram baseline read in proportion to what they use."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tasks.lib.manifest import DataLineage, ShardInfo, ShardManifest
from model.data import TrainSamples, read_rows, row_group_sizes, unigram_entropy, validation_rows


def synthetic_manifest(root: Path, shards: int, rows: int, row_group_rows: int = 32) -> Path:
    """A manifest listing `shards` training shards whose files do not exist: anything that opens one fails."""
    root.mkdir(parents=True)
    entries = [ShardInfo(path=f"train/s{i % 3}/shard-{i:05d}.parquet", split="train", source=f"s{i % 3}",
                         rows=rows, tokens=rows * 65, sha256="-", row_group_rows=row_group_rows)
               for i in range(shards)]
    manifest = ShardManifest(seq_len=64, row_len=65, vocab_size=1000, eos_id=2, tokenizer_sha256="-",
                             mixture={"s0": 0.5, "s1": 0.3, "s2": 0.2}, shards=entries, totals={},
                             lineage=DataLineage())
    (root / "manifest.json").write_text(manifest.model_dump_json())
    return root


def traced_peak(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_loader_starts_on_10000_shards_without_opening_one(tmp_path):
    many = synthetic_manifest(tmp_path / "many", shards=10_000, rows=4096)
    began = time.perf_counter()
    TrainSamples(many, seed=1)
    assert time.perf_counter() - began < 5
    assert traced_peak(lambda: TrainSamples(many, seed=1)) < 64 * 2**20  # ~17 bytes per row group (1.28 M here)

    # Beyond the manifest itself (a list of shards), the loader's memory follows the rows, not the shard count:
    # the same rows cut into ten times more shards cost no more.
    def beyond_manifest(manifest: Path) -> int:
        return traced_peak(lambda: TrainSamples(manifest, seed=1)) - \
            traced_peak(lambda: ShardManifest.load(manifest))

    fewer = beyond_manifest(synthetic_manifest(tmp_path / "fewer", shards=1_000, rows=4096))
    more = beyond_manifest(synthetic_manifest(tmp_path / "more", shards=10_000, rows=416))  # 13 groups, not 128
    assert more < 1.2 * fewer, (more / 2**20, fewer / 2**20)


def test_manifest_row_groups_are_the_files(tiny_manifest):
    for shard in ShardManifest.load(tiny_manifest).shards:
        footer = pq.ParquetFile(tiny_manifest / shard.path).metadata
        assert shard.row_group_rows and list(row_group_sizes(shard)) == \
            [footer.row_group(i).num_rows for i in range(footer.num_row_groups)]


def test_validation_reads_only_the_row_groups_it_evaluates(tiny_manifest, monkeypatch):
    valid = sorted(ShardManifest.load(tiny_manifest).split("valid"), key=lambda x: x.path)
    whole = {c: np.concatenate([read_rows(pq.read_table(tiny_manifest / x.path))[c] for x in valid])
             for c in ("tokens",)}
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: read.append(i) or original(self, i, *a, **k))
    got = validation_rows(tiny_manifest, 4)
    picks = np.linspace(0, len(whole["tokens"]) - 1, num=4).astype(int)  # evenly spread, as before
    assert torch.equal(got["tokens"], torch.from_numpy(whole["tokens"][picks].astype(np.int64)))
    groups = sum(len(row_group_sizes(x)) for x in valid)
    assert len(read) <= 4 < groups


def test_unigram_baseline_counts_a_bounded_deterministic_sample(tiny_manifest):
    manifest = ShardManifest.load(tiny_manifest)
    train = manifest.split("train")
    everything, counted_all = unigram_entropy(tiny_manifest, sample_tokens=10**12)
    assert counted_all == sum(x.tokens for x in train)
    tokens = np.concatenate([pq.read_table(tiny_manifest / x.path)["tokens"].combine_chunks().flatten()
                             .to_numpy() for x in train])
    p = np.bincount(tokens)[np.bincount(tokens) > 0] / len(tokens)
    assert everything == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)

    sample = 20 * 32 * manifest.row_len  # about 20 row groups
    entropy, counted = unigram_entropy(tiny_manifest, sample_tokens=sample)
    assert sample * 0.9 <= counted <= sample * 1.1 and counted < counted_all
    assert (entropy, counted) == unigram_entropy(tiny_manifest, sample_tokens=sample)
    assert entropy == pytest.approx(everything, abs=0.15)
