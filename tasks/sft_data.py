"""SFT data: instruction sets -> chat-formatted, tokenized, packed Parquet rows with loss masks.

Each conversation is rendered with the chat template (model/chat.py) and tokenized with the pretraining
tokenizer. Rows hold `seq_len + 1` tokens like pretraining rows, plus two columns of the same length:
`loss_mask` (1 where the token is part of an assistant reply) and `segments` (which example of the row a token
belongs to, 1..k; 0 is padding). Training keeps attention inside a segment, so packed examples never see each
other. Records that cannot be used are quarantined with file:line and reason, and counted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.chat import encode_chat, template_of
from model.tokenizer import Tokenizer
from tasks.lib.artifacts import ArtifactRef, sha256_file
from tasks.lib.log import get_logger
from tasks.lib.blocks import keep_in_sample
from tasks.lib.items import conversation
from tasks.lib.manifest import DataLineage, ShardInfo, ShardManifest
from tasks.lib.sources import Quarantine, ResolvedSource, downloads_dir, source_records
from tasks.spec import SFTSpec

ROW_GROUP = 32


class ExamplePacker:
    """Greedy, order-preserving packing of examples into rows (or one example per row without packing)."""

    def __init__(self, row_len: int, packing: bool, pad_id: int):
        self.row_len, self.packing, self.pad_id = row_len, packing, pad_id
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._used = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if self._parts and (not self.packing or self._used + len(ids) > self.row_len):
            self._close_row()
        self._parts.append((ids, mask))
        self._used += len(ids)

    def _close_row(self) -> None:
        tokens = np.full(self.row_len, self.pad_id, np.int32)
        loss_mask = np.zeros(self.row_len, np.int8)
        segments = np.zeros(self.row_len, np.int16)
        at = 0
        for k, (ids, mask) in enumerate(self._parts, start=1):
            tokens[at:at + len(ids)], loss_mask[at:at + len(ids)], segments[at:at + len(ids)] = ids, mask, k
            at += len(ids)
        self.rows.append((tokens, loss_mask, segments))
        self._parts, self._used = [], 0

    def finish(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._parts:
            self._close_row()
        return self.rows


def write_rows(rows: list, path: Path, row_len: int) -> None:
    def column(i: int, arrow_type):
        flat = np.concatenate([r[i] for r in rows]) if rows else np.zeros(0)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=arrow_type), row_len)

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"tokens": column(0, pa.int32()), "loss_mask": column(1, pa.int8()),
                      "segments": column(2, pa.int16())})
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP)


def build_sft_shards(resolved: list[ResolvedSource], spec: SFTSpec, tokenizer_dir: Path, seq_len: int,
                     out_dir: Path, downloads: Path) -> dict:
    log = get_logger()
    tokenizer = Tokenizer(tokenizer_dir)
    log.info(f"sft data: chat template {template_of(tokenizer)[1]}")
    row_len = seq_len + 1
    packers = {split: ExamplePacker(row_len, spec.packing, pad_id=tokenizer.eos_id) for split in ("train", "valid")}
    reasons: Counter[str] = Counter()
    per_source: dict[str, dict] = {}
    stats = Counter()
    with open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as file:
        for res in resolved:
            source = res.source
            quarantine = Quarantine(file, source)
            seen = 0
            for rec in source_records(res, downloads):
                seen += 1
                messages, problem = conversation(rec, source, spec.system_prompt)
                if messages is not None:
                    ids, mask = encode_chat(tokenizer, messages)
                    ids, mask = np.append(ids, tokenizer.eos_id), np.append(mask, 0)
                    if len(ids) > row_len:
                        messages, problem = None, f"too long: {len(ids)} tokens > seq_len + 1 = {row_len}"
                if messages is None:
                    quarantine.add(rec, problem)
                    continue
                # Split by the record's id (else file name and line): the same wherever the files live.
                raw_id = rec.raw.get(source.id_field) if source.id_field else None
                key = f"{source.name}/{raw_id if raw_id not in (None, '') else Path(rec.origin).name}"
                split = "valid" if keep_in_sample(key, spec.validation_fraction, spec.seed) else "train"
                packers[split].add(ids, mask)
                stats[f"examples_{split}"] += 1
                stats["tokens"] += len(ids)
                stats["response_tokens"] += int(mask.sum())
            quarantine.check(seen, "instruction source", f"`layout` ({source.layout!r}) and its field names")
            reasons.update(quarantine.reasons)
            per_source[source.name] = {"records": seen, "quarantined": quarantine.count, "license": source.license}

    shards = []
    for split, packer in packers.items():
        rows = packer.finish()
        if not rows:
            continue
        path = out_dir / split / "sft" / "shard-00000.parquet"
        write_rows(rows, path, row_len)
        shards.append(ShardInfo(path=str(path.relative_to(out_dir)), split=split, source="sft", rows=len(rows),
                                tokens=len(rows) * row_len, sha256=sha256_file(path), row_group_rows=ROW_GROUP))
    rows_train = sum(s.rows for s in shards if s.split == "train")
    if rows_train == 0:
        raise ValueError("no usable instruction examples for training; see quarantine.jsonl")
    totals = {**{k: int(v) for k, v in stats.items()}, "rows_train": rows_train,
              "rows_valid": sum(s.rows for s in shards if s.split == "valid"), "quarantined": sum(reasons.values())}
    fill = round(totals["tokens"] / ((totals["rows_train"] + totals["rows_valid"]) * row_len), 3)
    manifest = ShardManifest(seq_len=seq_len, row_len=row_len, vocab_size=tokenizer.vocab_size,
                             eos_id=tokenizer.eos_id, tokenizer_sha256=tokenizer.sha256, mixture={"sft": 1.0},
                             shards=shards, totals=totals,
                             lineage=DataLineage(sft_spec=spec.model_dump(mode="json"), tokenizer_dir=str(tokenizer_dir),
                                                 source_files={r.source.name: r.files for r in resolved}))
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    log.info(f"sft data: {totals['examples_train']} train / {totals.get('examples_valid', 0)} valid examples in "
             f"{totals['rows_train']} + {totals['rows_valid']} rows (fill {fill:.0%}), "
             f"{totals['quarantined']} quarantined")
    return {**totals, "fill": fill, "quarantine_reasons": dict(reasons), "sources": per_source}


def build(out: Path, resolved: list[ResolvedSource], spec: SFTSpec, tokenizer: ArtifactRef, seq_len: int,
          artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py)."""
    return build_sft_shards(resolved, spec, tokenizer.dir, seq_len, out, downloads_dir(artifacts_dir))
