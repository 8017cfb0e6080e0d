"""Training samples from the Parquet shards of a ShardManifest: deterministic, resumable, mixture-weighted.

The sample at global index i is a pure function of (seed, i), so a resumed run that knows how many samples were
consumed continues with exactly the next unseen one, whatever the data-parallel size:
  * samples come in blocks of BLOCK; each block holds a fixed number from each source (mixture weights, largest
    remainder), in an order shuffled by (seed, block);
  * a source's k-th draw walks its row groups in an order shuffled per epoch, rows shuffled within a row group,
    so consecutive draws hit the same decoded row group (Parquet random access costs a row-group decode).
Global batch g is samples [g*G, (g+1)*G); data-parallel rank r takes the r-th contiguous slice of it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.lib.manifest import ShardInfo, ShardManifest

BLOCK = 1024


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(k) for k in key])


# Pretraining shards have `tokens`; SFT shards add a per-token `loss_mask` and `segments` (tasks/sft_data.py).
COLUMNS = ("tokens", "loss_mask", "segments")


def token_rows(table, column: str = "tokens") -> np.ndarray:
    """One list column of a shard table (or row group) as a (rows, row_len) array."""
    values = table.column(column).combine_chunks()
    return values.flatten().to_numpy().reshape(len(values), -1)


def read_rows(table) -> dict[str, np.ndarray]:
    return {c: token_rows(table, c) for c in COLUMNS if c in table.column_names}


def to_batch(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into int64 tensors, one per column."""
    return {c: torch.from_numpy(np.stack([r[c] for r in rows]).astype(np.int64)) for c in rows[0]}


def row_group_sizes(shard: ShardInfo) -> np.ndarray:
    """Rows in each Parquet row group of one manifest shard, from the manifest's `row_group_rows` (every group full
    but the last), without opening the file."""
    full, rest = divmod(shard.rows, shard.row_group_rows)
    return np.concatenate([np.full(full, shard.row_group_rows, dtype=np.int64),
                           np.array([rest] if rest else [], np.int64)])


def row_group_index(shards: list[ShardInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row group of `shards`, in order, as three arrays: its rows, its shard (position in `shards`) and its
    index within that shard."""
    sizes = [row_group_sizes(x) for x in shards]
    group_rows = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    group_shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(x) for x in sizes])
    first_group = np.concatenate([[0], np.cumsum([len(x) for x in sizes])])[:-1].astype(np.int64)
    group_index = (np.arange(len(group_rows)) - first_group[group_shard]).astype(np.int32)
    return group_rows, group_shard, group_index


class SourceRows:
    """Row access for one source's shards of one split, with a small cache of decoded row groups. Its index is three
    arrays over row groups (a few bytes each): start-up opens no file."""

    def __init__(self, manifest_dir: Path, shards: list[ShardInfo], source_id: int, seed: int, cache_groups: int = 8):
        self.manifest_dir = Path(manifest_dir)
        self.paths = [x.path for x in shards]  # the manifest's own strings: no copy per shard
        self.group_rows, self.group_shard, self.group_index = row_group_index(shards)
        self.total = int(self.group_rows.sum())
        self.source_id, self.seed = source_id, seed
        self._epoch_order: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_groups = cache_groups

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epoch_order:
            perm = _rng(self.seed, self.source_id, epoch).permutation(len(self.group_rows))
            starts = np.concatenate([[0], np.cumsum(self.group_rows[perm])])
            self._epoch_order = {epoch: (perm, starts)}  # keep one epoch: draws move forward
        return self._epoch_order[epoch]

    def _decode(self, group: int) -> dict[str, np.ndarray]:
        if group not in self._cache:
            path = self.manifest_dir / self.paths[self.group_shard[group]]
            self._cache[group] = read_rows(pq.ParquetFile(path).read_row_group(int(self.group_index[group])))
            if len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        return self._cache[group]

    def draw(self, k: int) -> dict[str, np.ndarray]:
        """The k-th row drawn from this source (epochs re-shuffle once every row has been seen)."""
        epoch, offset = divmod(k, self.total)
        perm, starts = self._order(epoch)
        pos = int(np.searchsorted(starts, offset, side="right")) - 1
        group = int(perm[pos])
        within = _rng(self.seed, self.source_id, epoch, group).permutation(int(self.group_rows[group]))
        row = within[offset - starts[pos]]
        return {c: values[row] for c, values in self._decode(group).items()}


class TrainSamples:
    """Deterministic sample stream over the training shards of a manifest."""

    def __init__(self, manifest_dir: str | Path, seed: int):
        manifest_dir = Path(manifest_dir)
        manifest = ShardManifest.load(manifest_dir)
        self.row_len = manifest.row_len
        train = manifest.split("train")
        weights = {s: w for s, w in manifest.mixture.items() if w > 0}
        self.sources = sorted(s for s in weights if any(x.source == s for x in train))
        if not self.sources:
            raise ValueError(f"{manifest_dir}: no training shards for any source with a positive mixture weight")
        self.rows = [SourceRows(manifest_dir, [x for x in train if x.source == s], i, seed)
                     for i, s in enumerate(self.sources)]
        self.seed = seed
        w = np.array([weights[s] for s in self.sources], dtype=np.float64)
        quota = w / w.sum() * BLOCK
        counts = np.floor(quota).astype(int)
        counts[np.argsort(-(quota - counts))[: BLOCK - counts.sum()]] += 1  # largest remainder
        self.per_block = counts
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, index of that draw within its source's draws in this block)."""
        if b not in self._block_cache:
            slots = np.repeat(np.arange(len(self.sources)), self.per_block)
            slots = slots[_rng(self.seed, 7919, b).permutation(BLOCK)]
            nth = np.zeros(BLOCK, dtype=np.int64)
            for s in range(len(self.sources)):
                mask = slots == s
                nth[mask] = np.arange(mask.sum())
            self._block_cache = {b: (slots, nth)}
        return self._block_cache[b]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        b, j = divmod(i, BLOCK)
        slots, nth = self._block(b)
        s = slots[j]
        return self.rows[s].draw(b * int(self.per_block[s]) + int(nth[j]))

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        return to_batch([self[i] for i in range(start, start + size)])


class BatchPrefetcher:
    """Reads the next step's batch in a background thread while the current step computes.

    `get(start, count, next_start)` returns `samples.batch(start, count)` (from the read started by the previous
    call when it asked for these samples) and the seconds the caller waited for it, then starts reading
    `next_start`. Only its one thread touches `samples`, whose caches are not thread-safe. With `pin`, batches are
    in pinned host memory, so copies to the GPU can be non-blocking."""

    def __init__(self, samples: TrainSamples, pin: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.samples, self.pin = samples, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self.pending: tuple[tuple[int, int], object] | None = None

    def _read(self, start: int, count: int) -> dict[str, torch.Tensor]:
        batch = self.samples.batch(start, count)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def get(self, start: int, count: int, next_start: int | None) -> tuple[dict[str, torch.Tensor], float]:
        began = time.perf_counter()
        ahead = self.pending
        self.pending = None
        if ahead is not None and ahead[0] == (start, count):
            batch = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # let the stale read finish before this thread uses the caches
            batch = self.pool.submit(self._read, start, count).result()
        waited = time.perf_counter() - began
        if next_start is not None:
            self.pending = ((next_start, count), self.pool.submit(self._read, next_start, count))
        return batch, waited

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def rank_slice(consumed: int, global_batch: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """(first sample, count) of this data-parallel rank's share of the global batch starting at `consumed`."""
    per_rank = global_batch // dp_size
    return consumed + dp_rank * per_rank, per_rank


def validation_picks(total: int, limit: int, avoid: int = 0) -> np.ndarray:
    """Which of `total` validation rows `validation_rows` reads for `limit`: evenly spaced, always the same.
    `avoid`: spread them over the rows that a read of `avoid` rows does not take (GPTQ calibrates beside the
    evaluation's perplexity rows, never on them)."""
    candidates = np.arange(total)
    if avoid:
        candidates = np.setdiff1d(candidates, validation_picks(total, avoid))
    return candidates[np.linspace(0, len(candidates) - 1, num=min(limit, len(candidates))).astype(int)]


def validation_rows(manifest_dir: str | Path, limit: int, avoid: int = 0) -> dict[str, torch.Tensor]:
    """`limit` validation rows spread evenly over all of them (sources interleaved rather than the first source
    only), always the same ones, for comparable eval losses; `avoid` as in `validation_picks`. Reads only the row
    groups that hold them."""
    manifest_dir = Path(manifest_dir)
    shards = sorted(ShardManifest.load(manifest_dir).split("valid"), key=lambda x: x.path)
    if not shards:
        raise ValueError(f"{manifest_dir}: no validation shards; set sharding.validation_fraction > 0")
    group_rows, group_shard, group_index = row_group_index(shards)
    group_starts = np.concatenate([[0], np.cumsum(group_rows)])
    picks = validation_picks(int(group_starts[-1]), limit, avoid)
    decoded: dict[int, dict[str, np.ndarray]] = {}
    rows = []
    for pick in picks:
        group = int(np.searchsorted(group_starts, pick, side="right")) - 1
        if group not in decoded:
            decoded[group] = read_rows(pq.ParquetFile(manifest_dir / shards[group_shard[group]].path)
                                       .read_row_group(int(group_index[group])))
        rows.append({c: v[pick - group_starts[group]] for c, v in decoded[group].items()})
    return to_batch(rows)


UNIGRAM_SAMPLE_TOKENS = 10_000_000


def unigram_entropy(manifest_dir: str | Path, sample_tokens: int = UNIGRAM_SAMPLE_TOKENS) -> tuple[float, int]:
    """Entropy (nats/token) of the training tokens' unigram distribution: the loss of the best model that
    ignores context, which a language model that learned anything must go below. Counted on about
    `sample_tokens` tokens (all of them if there are fewer): whole row groups evenly spaced over the training
    shards, the same ones every time. Returns (entropy, tokens counted)."""
    manifest_dir = Path(manifest_dir)
    manifest = ShardManifest.load(manifest_dir)
    shards = manifest.split("train")
    group_rows, group_shard, group_index = row_group_index(shards)
    groups, total = len(group_rows), int(group_rows.sum()) * manifest.row_len
    wanted = groups if total <= sample_tokens else min(groups, math.ceil(groups * sample_tokens / total))
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    counted = 0
    for group in np.unique(np.linspace(0, groups - 1, num=wanted).astype(int)):
        tokens = token_rows(pq.ParquetFile(manifest_dir / shards[group_shard[group]].path)
                            .read_row_group(int(group_index[group]), columns=["tokens"]))
        counts += np.bincount(tokens.ravel(), minlength=len(counts))
        counted += tokens.size
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), counted
