"""Reading a source's raw records, wherever it lives: local files (jsonl, jsonl.gz, txt, parquet), a URL (fetched
into the store's downloads cache, resumable, sha256-checked) or a Hugging Face dataset. Shared by every stage
that reads a source: download (the corpus), sft_data (instruction sets), decontaminate (the sets it protects) and
the evaluation (benchmarks).

Records that cannot be used (malformed JSON, non-UTF-8 bytes, ...) carry a `problem` instead of data, and a
`Quarantine` writes them with file, line and reason and counts them: nothing is dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import IO, Iterator

import pyarrow.parquet as pq
from pydantic import BaseModel

from tasks.lib.artifacts import sha256_file
from tasks.lib.log import get_logger
from tasks.spec import SourceSpec, project_relative, resolve_path


PREVIEW_CHARS = 500


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing files, no network, wrong schema)."""


class Record(BaseModel):
    origin: str  # "file:line" of the raw record, for quarantine reports and lineage
    raw: object = None
    problem: str | None = None


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


class ResolvedSource(BaseModel):
    """A source pinned to content: the files it matched and their checksums, so caching follows the data."""

    source: SourceSpec
    files: list[tuple[str, str]] = []  # (absolute path, sha256)

    def fingerprint_payload(self) -> dict:
        """The files by content and by their path in the project, not by where the checkout lives."""
        return {"source": self.source, "files": {project_relative(p): digest for p, digest in self.files}}


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


def source_records(resolved: ResolvedSource, downloads_dir: Path) -> Iterator[Record]:
    """Every raw record of a source, wherever it lives (local files, a URL, a Hugging Face dataset)."""
    source = resolved.source
    if source.kind == "hf":
        return hf_records(source)
    paths = ([Path(p) for p, _ in resolved.files] if source.kind == "local"
             else [fetch_url(source.url, source.sha256, downloads_dir, source.name)])
    return (rec for p in paths for rec in read_records(p, file_format(p, source.format), source.record_field))


def downloads_dir(artifacts_dir: str | Path) -> Path:
    """The store's one cache of URL downloads (named by the URL's hash, verified on reuse), for every stage that
    reads a source: corpus, instruction sets, evaluation sets and decontamination references."""
    return Path(artifacts_dir) / "_downloads"
