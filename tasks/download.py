"""Stage 1, download: bring one source to local JSONL.gz documents `{id, text, metadata}`.

Sources are local files (jsonl, jsonl.gz, txt, parquet; normalised in parallel on the spec's executor, a share of
the files per task), a Hugging Face dataset, or an http(s) URL. Records that
cannot be used (malformed JSON, non-UTF-8 bytes, missing or non-string text, empty or oversized text) go to
`quarantine.jsonl` with file, line and reason, and are counted in the summary: nothing is dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import IO, Iterator

import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from prefect import task
from pydantic import BaseModel

from tasks.lib.artifacts import STAGE_TASK_OPTIONS, ArtifactRef, build_artifact, sha256_file
from tasks.lib.blocks import in_process_if_small, run_pipeline
from tasks.lib.log import get_logger
from tasks.spec import ExecutorConfig, SourceSpec, resolve_path

PREVIEW_CHARS = 500


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing files, no network, wrong schema)."""


class ResolvedSource(BaseModel):
    """A source pinned to content: the files it matched and their checksums, so caching follows the data."""

    source: SourceSpec
    files: list[tuple[str, str]] = []  # (absolute path, sha256)


class Record(BaseModel):
    origin: str  # "file:line" of the raw record, for quarantine reports and lineage
    raw: object = None
    problem: str | None = None


# ---------------------------------------------------------------- resolving


def resolve_source(source: SourceSpec) -> ResolvedSource:
    """Expand globs and checksum local inputs; fail here, with the pattern, if anything is missing."""
    source = source.model_copy(update={"cleaning": {}})  # cleaning settings must not invalidate downloads
    if source.kind == "local":
        files = _expand(source.paths, source.name, "paths")
    elif source.kind == "hf" and source.data_files:
        files = _expand(source.data_files, source.name, "data_files")
    else:
        return ResolvedSource(source=source)
    return ResolvedSource(source=source, files=[(str(f), sha256_file(f)) for f in files])


def _expand(patterns: list[str], name: str, field: str) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        absolute = resolve_path(pattern)
        matched = sorted(Path(p) for p in glob.glob(str(absolute), recursive=True) if Path(p).is_file())
        if not matched:
            raise SourceError(f"source '{name}': {field} pattern {pattern!r} matches no file "
                              f"(looked for {absolute})")
        files.extend(matched)
    return files


# ---------------------------------------------------------------- reading raw records


def _file_format(path: Path, declared: str) -> str:
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
    """Yield raw records of one file; undecodable ones carry a `problem` instead of data."""
    if fmt == "jsonl":
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                origin = f"{path}:{lineno}"
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
            yield Record(origin=f"{path}:1", raw={text_field: data.decode("utf-8"), "id": path.stem})
        except UnicodeDecodeError as err:
            yield Record(origin=f"{path}:1", raw=data[:PREVIEW_CHARS].decode("utf-8", "replace"),
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
                yield Record(origin=f"{path}:row {row}", raw=rec)


def _hf_records(source: SourceSpec) -> Iterator[Record]:
    import datasets

    if not source.data_files:
        _require_network(f"the Hugging Face Hub for dataset {source.dataset!r}", "huggingface.co", source.name)
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision,
                                   data_files=source.data_files, streaming=True)
    except Exception as err:  # datasets raises many types; the message is what matters
        raise SourceError(f"source '{source.name}': could not load HF dataset {source.dataset!r} "
                          f"(config={source.config}, split={source.split}): {err}") from err
    for i, rec in enumerate(ds, start=1):
        yield Record(origin=f"hf://{source.dataset}/{source.split}:{i}", raw=rec)


def _require_network(what: str, host: str, name: str, port: int = 443) -> None:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        raise SourceError(f"source '{name}' needs the network to reach {what}, but {host}:{port} is unreachable "
                          f"({err}). Use a local copy (kind: local) or run where the network is available.") from None


def fetch_url(url: str, sha256: str | None, cache_dir: Path, name: str) -> Path:
    """Download `url` into cache_dir: streamed to a .part file, resumed with a Range request, verified, renamed."""
    final = cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(urllib.parse.urlparse(url).path).name)
    if final.exists() and (sha256 is None or sha256_file(final) == sha256):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resumed = have and resp.status == 206
            with open(part, "ab" if resumed else "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
    except (urllib.error.URLError, OSError) as err:
        raise SourceError(f"source '{name}': cannot download {url}: {err}. Check the URL and the network; "
                          f"a partial download is kept in {part} and resumed next time.") from None
    if sha256 is not None and (actual := sha256_file(part)) != sha256:
        part.unlink()
        raise SourceError(f"source '{name}': {url} has sha256 {actual}, the spec expects {sha256}")
    part.replace(final)
    return final


# ---------------------------------------------------------------- normalising


def source_records(resolved: ResolvedSource, downloads_dir: Path) -> Iterator[Record]:
    """Every raw record of a source, wherever it lives (local files, a URL, a Hugging Face dataset)."""
    source = resolved.source
    if source.kind == "hf":
        return _hf_records(source)
    paths = ([Path(p) for p, _ in resolved.files] if source.kind == "local"
             else [fetch_url(source.url, source.sha256, downloads_dir, source.name)])
    return (rec for p in paths for rec in read_records(p, _file_format(p, source.format), source.record_field))


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


def normalise_source(resolved: ResolvedSource, out_dir: Path, executor: ExecutorConfig, downloads_dir: Path) -> dict:
    """Write `docs/NNNNN.jsonl.gz` and `quarantine.jsonl`; return the summary. The files of a local source are
    normalised in parallel, one datatrove task per share of them (`NormaliseFiles`) on the executor; a URL or a
    Hugging Face dataset is one stream, normalised here round-robin into `executor.tasks` files."""
    source = resolved.source
    docs_dir = out_dir / "docs"
    docs_dir.mkdir()
    if source.kind == "local":
        (out_dir / "quarantine").mkdir()
        run_pipeline([NormaliseFiles(resolved, out_dir)],
                     in_process_if_small(executor, [Path(p) for p, _ in resolved.files]), out_dir / "_logs")
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


def write_documents(records: Iterator[Record], source: SourceSpec, outs: list, quarantine: Quarantine
                    ) -> tuple[int, int, int]:
    """Documents of `records` round-robin into the open `outs`, the unusable ones to `quarantine`; returns
    (records seen, documents kept, their text bytes)."""
    log = get_logger()
    seen = kept = kept_bytes = 0
    for rec in records:
        seen += 1
        doc, problem = _to_document(rec, source)
        if problem:
            quarantine.add(rec, problem)
            continue
        outs[kept % len(outs)].write(json.dumps(doc, ensure_ascii=False) + "\n")
        kept += 1
        kept_bytes += len(doc["text"].encode("utf-8"))
        if kept % 50_000 == 0:
            log.info(f"download {source.name}: {kept:,} documents so far")
    return seen, kept, kept_bytes


class NormaliseFiles(PipelineStep):
    """datatrove step: task `rank` of N normalises every N-th file of a local source (files[rank::N]) into
    `docs/<rank>.jsonl.gz` and `quarantine/<rank>.jsonl`, and records its counts in
    `_logs/normalised/<rank>.json`."""

    name = "📥 normalise files"
    type = "📖 - READER"

    def __init__(self, resolved: ResolvedSource, out_dir: Path):
        super().__init__()
        self.resolved, self.out_dir = resolved, Path(out_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        source = self.resolved.source
        paths = [Path(p) for p, _ in self.resolved.files][rank::world_size]
        records = (rec for p in paths for rec in read_records(p, _file_format(p, source.format), source.record_field))
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


def _to_document(rec: Record, source: SourceSpec) -> tuple[dict | None, str | None]:
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


# ---------------------------------------------------------------- Prefect tasks


@task(name="resolve", task_run_name="resolve-{source.name}")
def resolve(source: SourceSpec) -> ResolvedSource:
    """Not cached on purpose: it is what notices that the files changed."""
    return resolve_source(source)


@task(name="download", task_run_name="download-{resolved.source.name}", **STAGE_TASK_OPTIONS)
def download(resolved: ResolvedSource, executor: ExecutorConfig, artifacts_dir: str) -> ArtifactRef:
    downloads_dir = Path(artifacts_dir) / "_downloads"
    return build_artifact("download", dict(resolved=resolved, executor=executor, artifacts_dir=artifacts_dir),
                          lambda out: normalise_source(resolved, out, executor, downloads_dir),
                          label=resolved.source.name)

