"""Reading a source's raw records and normalising them to documents `{id, text, metadata}`: the download stage's
work, done in datatrove tasks (`NormaliseSource`) on the spec's executor.

Records that cannot be used (malformed JSON, non-UTF-8 bytes, missing or non-string text, empty or oversized
text) go to a quarantine file with file, line and reason, and are counted: nothing is dropped silently.

Cheap to import (no Prefect), like tasks/lib/blocks.py: datatrove pickles `NormaliseSource` by module into every
worker, which then imports this module.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections import Counter
from pathlib import Path
from typing import IO, Iterator

import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from pydantic import BaseModel

from tasks.lib.log import get_logger
from tasks.spec import SourceSpec, project_relative

PREVIEW_CHARS = 500


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing files, no network, wrong schema)."""


class Record(BaseModel):
    origin: str  # "file:line" of the raw record, for quarantine reports and lineage
    raw: object = None
    problem: str | None = None


# ---------------------------------------------------------------- reading raw records


def file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".json.gz", "jsonl"), (".ndjson", "jsonl"),
                        (".parquet", "parquet"), (".txt", "txt"), (".txt.gz", "txt")):
        if name.endswith(suffix):
            return fmt
    raise SourceError(f"cannot tell the format of {path}; set `format:` (jsonl, txt or parquet) on the source")


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_records(path: Path, fmt: str, text_field: str) -> Iterator[Record]:
    """Yield raw records of one file; undecodable ones carry a `problem` instead of data. Their origin names the
    file relative to the project when inside it: it becomes the id of a record that has none."""
    name = project_relative(path)
    if fmt == "jsonl":
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                origin = f"{name}:{lineno}"
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield Record(origin=origin, raw=line[:PREVIEW_CHARS].decode("utf-8", "replace"),
                                 problem=f"not UTF-8 (byte {err.start}: {line[err.start:err.start + 1]!r})")
                    continue
                try:
                    yield Record(origin=origin, raw=json.loads(text))
                except json.JSONDecodeError as err:
                    yield Record(origin=origin, raw=text[:PREVIEW_CHARS], problem=f"malformed JSON: {err.msg} "
                                 f"at column {err.colno}")
    elif fmt == "txt":
        data = _open(path).read()
        try:
            yield Record(origin=f"{name}:1", raw={text_field: data.decode("utf-8"), "id": path.stem})
        except UnicodeDecodeError as err:
            yield Record(origin=f"{name}:1", raw=data[:PREVIEW_CHARS].decode("utf-8", "replace"),
                         problem=f"not UTF-8 (byte {err.start})")
    elif fmt == "parquet":
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                              f"set `text_field` on the source")
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield Record(origin=f"{name}:row {row}", raw=rec)


def load_hf_dataset(source: SourceSpec):
    """The source's dataset as a `datasets` stream: its files are listed, none is read yet."""
    import datasets

    if not source.data_files:
        require_network(f"the Hugging Face Hub for dataset {source.dataset!r}", "huggingface.co", source.name)
    try:
        return datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision,
                                     data_files=source.data_files, streaming=True)
    except Exception as err:  # datasets raises many types; the message is what matters
        raise SourceError(f"source '{source.name}': could not load HF dataset {source.dataset!r} "
                          f"(config={source.config}, split={source.split}): {err}") from err


def hf_records(source: SourceSpec, rank: int = 0, world_size: int = 1) -> Iterator[Record]:
    """The records of task `rank` of `world_size`. When `world_size` divides the number of the dataset's files
    (the download stage picks such a task count), each task streams whole files of its own; otherwise every task
    would stream all of them and keep every `world_size`-th record."""
    from datasets.distributed import split_dataset_by_node

    ds = load_hf_dataset(source)
    where = f"hf://{source.dataset}/{source.split}"
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        where += f"[task {rank} of {world_size}]"
    for i, rec in enumerate(ds, start=1):
        yield Record(origin=f"{where}:{i}", raw=rec)


def require_network(what: str, host: str, name: str, port: int = 443) -> None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise SourceError(f"source '{name}' needs the network to reach {what}, but {host}:{port} is unreachable "
                          f"({err}). Use a local copy (kind: local) or run where the network is available.") from None


class Quarantine:
    """One source's unusable records: each is written to an open quarantine.jsonl with its origin, reason and a
    preview, and counted by reason (the reason's text before any detail)."""

    def __init__(self, file: IO[str], source: SourceSpec, reasons: Counter | None = None):
        self.file, self.source = file, source
        self.reasons: Counter[str] = reasons if reasons is not None else Counter()

    def add(self, rec: Record, problem: str) -> None:
        self.reasons[problem.split(":")[0].split(" (")[0]] += 1
        preview = rec.raw if isinstance(rec.raw, str) else json.dumps(rec.raw, ensure_ascii=False, default=str)
        self.file.write(json.dumps({"origin": rec.origin, "reason": problem, "preview": preview[:PREVIEW_CHARS]},
                                   ensure_ascii=False) + "\n")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def check(self, seen: int, what: str, fields: str) -> None:
        """Fail the source if it held no records or more than max_bad_fraction unusable ones; else warn."""
        name = self.source.name
        if seen == 0:
            raise SourceError(f"{what} '{name}': its inputs hold no records")
        if self.count / seen > self.source.max_bad_fraction:
            top = ", ".join(f"{r} x{n}" for r, n in self.reasons.most_common(3))
            raise SourceError(f"{what} '{name}': {self.count} of {seen} records are unusable ({top}); this exceeds "
                              f"max_bad_fraction={self.source.max_bad_fraction}. Check {fields} and the input "
                              f"files; examples are in {self.file.name}")
        if self.count:
            get_logger().warning(f"{what} {name}: quarantined {self.count} of {seen} records: {dict(self.reasons)}")


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
