"""Stage 1, download: bring one source to local JSONL.gz documents `{id, text, metadata}`.

Sources are local files (jsonl, jsonl.gz, txt, parquet), a Hugging Face dataset, or an http(s) URL
(tasks/lib/sources.py reads them). Local files and datasets are normalised in parallel on the spec's executor, a
share per datatrove task (`NormaliseSource`). Records that cannot be used go to `quarantine.jsonl` with file, line
and reason, and are counted in the summary: nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

from datatrove.pipeline.base import PipelineStep

from tasks.lib.blocks import in_process_if_small, run_pipeline
from tasks.lib.log import get_logger
from tasks.lib.sources import (Quarantine, Record, ResolvedSource, downloads_dir, file_format, hf_records,
                               load_hf_dataset, read_records, source_records)
from tasks.spec import ExecutorConfig, SourceSpec


def write_documents(records: Iterator[Record], source: SourceSpec, outs: list, quarantine: Quarantine
                    ) -> tuple[int, int, int]:
    """Documents of `records` round-robin into the open `outs`, the unusable ones to `quarantine`; returns
    (records seen, documents kept, their text bytes)."""
    log = get_logger()
    seen = kept = kept_bytes = 0
    for rec in records:
        seen += 1
        doc, problem = to_document(rec, source)
        if problem:
            quarantine.add(rec, problem)
            continue
        outs[kept % len(outs)].write(json.dumps(doc, ensure_ascii=False) + "\n")
        kept += 1
        kept_bytes += len(doc["text"].encode("utf-8"))
        if kept % 50_000 == 0:
            log.info(f"download {source.name}: {kept:,} documents so far")
    return seen, kept, kept_bytes


class NormaliseSource(PipelineStep):
    """datatrove step: task `rank` of N normalises its share of a source, every N-th file of a local source
    (files[rank::N]) or its part of a Hugging Face dataset (`hf_records`), into `docs/<rank>.jsonl.gz` and
    `quarantine/<rank>.jsonl`, and records its counts in `_logs/normalised/<rank>.json`."""

    name = "📥 normalise source"
    type = "📖 - READER"

    def __init__(self, source: SourceSpec, files: list[str], out_dir: Path):
        super().__init__()
        self.source, self.files, self.out_dir = source, files, Path(out_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        source = self.source
        if source.kind == "hf":
            records = hf_records(source, rank, world_size)
        else:
            paths = [Path(p) for p in self.files][rank::world_size]
            records = (rec for p in paths
                       for rec in read_records(p, file_format(p, source.format), source.record_field))
        with gzip.open(self.out_dir / "docs" / f"{rank:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=3) as out, \
                open(self.out_dir / "quarantine" / f"{rank:05d}.jsonl", "w", encoding="utf-8") as file:
            quarantine = Quarantine(file, source)
            seen, kept, kept_bytes = write_documents(records, source, [out], quarantine)
        self.stat_update("documents", value=kept)
        record = self.out_dir / "_logs" / "normalised" / f"{rank:05d}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"records": seen, "docs": kept, "bytes": kept_bytes,
                                      "quarantine_reasons": dict(quarantine.reasons)}))
        return iter(())


def to_document(rec: Record, source: SourceSpec) -> tuple[dict | None, str | None]:
    if rec.problem:
        return None, rec.problem
    if not isinstance(rec.raw, dict):
        return None, f"not a JSON object (got {type(rec.raw).__name__})"
    if source.text_field not in rec.raw:
        return None, f"missing field {source.text_field!r} (fields: {sorted(rec.raw)[:10]})"
    text = rec.raw[source.text_field]
    if not isinstance(text, str):
        return None, f"field {source.text_field!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty text"
    size = len(text.encode("utf-8"))
    if size > source.max_doc_bytes:
        return None, f"document too large ({size:,} bytes > max_doc_bytes {source.max_doc_bytes:,})"
    raw_id = rec.raw.get(source.id_field) if source.id_field else None
    doc_id = f"{source.name}/{raw_id}" if raw_id not in (None, "") else f"{source.name}/{rec.origin}"
    metadata = rec.raw.get("metadata") if isinstance(rec.raw.get("metadata"), dict) else {
        k: v for k, v in rec.raw.items() if k not in (source.text_field, source.id_field)
        and isinstance(v, (str, int, float, bool))}
    return {"id": doc_id, "text": text, "metadata": {**metadata, "source": source.name, "origin": rec.origin}}, None


# ---------------------------------------------------------------- normalising


def normalise_source(resolved: ResolvedSource, out_dir: Path, executor: ExecutorConfig, downloads_dir: Path) -> dict:
    """Write `docs/NNNNN.jsonl.gz` and `quarantine.jsonl`; return the summary. Local files and Hugging Face
    datasets are normalised in parallel, one datatrove task per share of them (`NormaliseSource`) on the
    executor; a URL is one file, normalised here round-robin into `executor.tasks` files."""
    source = resolved.source
    docs_dir = out_dir / "docs"
    docs_dir.mkdir()
    if source.kind in ("local", "hf"):
        (out_dir / "quarantine").mkdir()
        files = [p for p, _ in resolved.files]  # none for a dataset on the Hub: never "small"
        run_pipeline([NormaliseSource(source, files, out_dir)],
                     in_process_if_small(executor, [Path(p) for p in files]) if files else executor,
                     out_dir / "_logs", tasks=normalise_tasks(source, files, executor.tasks))
        records = [json.loads(p.read_text()) for p in sorted((out_dir / "_logs" / "normalised").glob("*.json"))]
        seen, kept, kept_bytes = (sum(r[k] for r in records) for k in ("records", "docs", "bytes"))
        with open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as merged:  # in task order: deterministic
            for part in sorted((out_dir / "quarantine").glob("*.jsonl")):
                merged.write(part.read_text(encoding="utf-8"))
            quarantine = Quarantine(merged, source, sum((Counter(r["quarantine_reasons"]) for r in records),
                                                        Counter()))
        shutil.rmtree(out_dir / "quarantine")
    else:
        outs = [gzip.open(docs_dir / f"{i:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=3)
                for i in range(executor.tasks)]
        with open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as file:
            quarantine = Quarantine(file, source)
            seen, kept, kept_bytes = write_documents(source_records(resolved, downloads_dir), source, outs, quarantine)
        for f in outs:
            f.close()
    quarantine.check(seen, "source", f"`text_field` ({source.text_field!r})")
    return {"source": source.name, "records": seen, "docs": kept, "bytes": kept_bytes,
            "quarantined": quarantine.count, "quarantine_reasons": dict(quarantine.reasons),
            "license": source.license}


def normalise_tasks(source: SourceSpec, files: list[str], most: int) -> int:
    """How many tasks normalise a source: at most `most` and no more than it has files; for a Hugging Face
    dataset, a divisor of its number of files, so that each task streams whole files of its own."""
    if source.kind == "local":
        return max(1, min(most, len(files)))
    shards = load_hf_dataset(source).n_shards
    return max(t for t in range(1, min(most, shards) + 1) if shards % t == 0)


def build(out: Path, resolved: ResolvedSource, executor: ExecutorConfig, artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py): `resolved`'s documents into `out`."""
    return normalise_source(resolved, out, executor, downloads_dir(artifacts_dir))
