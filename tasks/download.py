"""Stage 1, download: bring one source to local JSONL.gz documents `{id, text, metadata}`.

Sources are local files (jsonl, jsonl.gz, txt, parquet), a Hugging Face dataset, or an http(s) URL. Local files
and datasets are normalised in parallel on the spec's executor, a share per task (tasks/lib/normalise.py). Records
that cannot be used go to `quarantine.jsonl` with file, line and reason, and are counted in the summary: nothing
is dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

from prefect import task
from pydantic import BaseModel

from tasks.lib.artifacts import STAGE_TASK_OPTIONS, ArtifactRef, build_artifact, sha256_file
from tasks.lib.blocks import in_process_if_small, run_pipeline
from tasks.lib.normalise import (NormaliseSource, Quarantine, Record, SourceError, file_format, hf_records,
                                 load_hf_dataset, read_records, write_documents)
from tasks.spec import ExecutorConfig, SourceSpec, project_relative, resolve_path

class ResolvedSource(BaseModel):
    """A source pinned to content: the files it matched and their checksums, so caching follows the data."""

    source: SourceSpec
    files: list[tuple[str, str]] = []  # (absolute path, sha256)

    def fingerprint_payload(self) -> dict:
        """The files by content and by their path in the project, not by where the checkout lives."""
        return {"source": self.source, "files": {project_relative(p): digest for p, digest in self.files}}


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


# ---------------------------------------------------------------- fetching


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
        return hf_records(source)
    paths = ([Path(p) for p, _ in resolved.files] if source.kind == "local"
             else [fetch_url(source.url, source.sha256, downloads_dir, source.name)])
    return (rec for p in paths for rec in read_records(p, file_format(p, source.format), source.record_field))


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


# ---------------------------------------------------------------- Prefect tasks


@task(name="resolve", task_run_name="resolve-{source.name}")
def resolve(source: SourceSpec) -> ResolvedSource:
    """Not cached on purpose: it is what notices that the files changed."""
    return resolve_source(source)


def downloads_dir(artifacts_dir: str | Path) -> Path:
    """The store's one cache of URL downloads (named by the URL's hash, verified on reuse), for every stage that
    reads a source: corpus, instruction sets, evaluation sets and decontamination references."""
    return Path(artifacts_dir) / "_downloads"


@task(name="download", task_run_name="download-{resolved.source.name}", **STAGE_TASK_OPTIONS)
def download(resolved: ResolvedSource, executor: ExecutorConfig, artifacts_dir: str) -> ArtifactRef:
    return build_artifact("download", dict(resolved=resolved, executor=executor, artifacts_dir=artifacts_dir),
                          lambda out: normalise_source(resolved, out, executor, downloads_dir(artifacts_dir)),
                          label=resolved.source.name)

