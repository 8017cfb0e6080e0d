"""Stage 3, dedup: exact (full-text hash) then MinHash near-duplicate removal across all sources at once.

Input is every source's cleaned documents; output is `docs/<source>/NNNNN.jsonl.gz`, so later stages keep the
per-source split (mixture weights). Removed documents go to `removed/exact/` and `removed/minhash/`, with the
kept copy being the first one seen in source order.

The artifact also holds a persistent dedup index, `index/exact/` and `index/minhash/bucket_NNN/`: datatrove index
files of the signatures of every document this artifact and its `base` saw, one part per ingest. Given a `base`
(the dedup artifact of earlier data), only the new documents are read, and they are deduplicated against each
other and against that index; the new artifact's index is the base's parts (hard links) plus one new part.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from datatrove.pipeline.dedup.exact_dedup import ExactDedupBuildIndex
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                      MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader

from tasks.lib.artifacts import ArtifactRef
from tasks.lib.log import get_logger
from tasks.lib.blocks import (CountDocuments, RegexWordTokenizer, counted, in_process_if_small, per_source_writer,
                              run_pipeline)
from tasks.spec import DedupConfig, ExecutorConfig


def document_text(doc) -> str:
    """What exact dedup compares (datatrove pickles it by module into each worker process: this module imports no
    Prefect, which kept it cheap to import, 1.9 s less per exact-dedup step)."""
    return doc.text


def dedup_documents(inputs: dict[str, Path], config: DedupConfig, executor: ExecutorConfig, out_dir: Path,
                    base_index: Path | None = None) -> dict:
    """Deduplicate the documents under each `inputs[source]` folder into `out_dir/docs/<source>/`, also against
    the documents behind `base_index` (an earlier dedup artifact's `index/`), if given."""
    # Scratch space inside the build's temporary directory: a killed build leaves it where the store's sweep of
    # temporaries finds it, and a failed one keeps its datatrove logs with the failed build's evidence.
    work = out_dir / ".scratch"
    index = out_dir / "index"
    parts = 0
    if base_index is not None:
        for f in sorted(base_index.rglob("*")):
            if f.is_file():
                (index / f.relative_to(base_index)).parent.mkdir(parents=True, exist_ok=True)
                os.link(f, index / f.relative_to(base_index))
        parts = len(list((base_index / "parts").iterdir()))
    part = f"part-{parts + 1:04d}"  # this ingest's index files
    (index / "parts").mkdir(parents=True, exist_ok=True)
    summary = _dedup(inputs, config, executor, out_dir, work, index, part)
    shutil.rmtree(work)  # not part of the artifact
    (index / "parts" / part).write_text(json.dumps({"docs_in": summary["docs_in"], "sources": sorted(inputs)}))
    return {**summary, "index_parts": parts + 1}


def _dedup(inputs: dict[str, Path], config: DedupConfig, executor: ExecutorConfig, out_dir: Path, work: Path,
           index: Path, part: str) -> dict:
    # One reader over all sources: hard links put every cleaned file under one folder without copying bytes.
    merged = work / "input"
    for source, folder in inputs.items():
        (merged / source).mkdir(parents=True)
        for f in sorted(folder.glob("*.jsonl.gz")):
            os.link(f, merged / source / f.name)
    files = sorted(merged.glob("*/*.jsonl.gz"))
    if not files:  # cleaning kept no document (say, every new one failed a filter): nothing to deduplicate
        (out_dir / "docs").mkdir()
        return dedup_summary({})
    tasks = len(files)
    executor = in_process_if_small(executor, merged)
    counts = {}  # CountDocuments label -> (documents, bytes) per source, from the pipelines' stats

    def reader(folder: Path) -> JsonlReader:
        return JsonlReader(str(folder), glob_pattern="*/*.jsonl.gz")

    stage_in = merged
    if config.exact:
        # only_dedup_in_index=False: new documents are also deduplicated among themselves, not only vs the index.
        exact = ExactDedupConfig(content_getter=document_text, only_dedup_in_index=False)
        (index / "exact").mkdir(parents=True, exist_ok=True)
        stats = run_pipeline([reader(stage_in), CountDocuments("in"),
                              ExactDedupSignature(str(work / "exact_sigs"), config=exact)],
                             executor, work / "logs/exact1", tasks=tasks)
        counts["in"] = counted(stats, "in")
        run_pipeline([ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), config=exact,
                                      index_folder=str(index / "exact"))],
                     executor, work / "logs/exact2", tasks=1)
        for empty in (p for p in (work / "exact_sigs").rglob("*") if p.is_file() and p.stat().st_size == 0):
            empty.unlink()  # a task that read no documents; datatrove's index builder cannot read empty files
        run_pipeline([ExactDedupBuildIndex(str(work / "exact_sigs"), str(index / "exact"), index_name=part,
                                           config=exact)], executor, work / "logs/exact_index", tasks=1)
        removed = per_source_writer(out_dir / "removed/exact")
        stats = run_pipeline([reader(stage_in), ExactDedupFilter(str(work / "exact_dups"), config=exact,
                                                                 exclusion_writer=removed),
                              CountDocuments("after exact"), per_source_writer(work / "after_exact")],
                             executor, work / "logs/exact3", tasks=tasks)
        counts["after exact"] = counted(stats, "after exact")
        stage_in = work / "after_exact"

    if config.minhash.enabled:
        mh = config.minhash
        minhash = MinhashConfig(n_grams=mh.n_grams, num_buckets=mh.num_buckets,
                                hashes_per_bucket=mh.hashes_per_bucket, seed=mh.seed)
        files = sorted(stage_in.glob("*/*.jsonl.gz"))
        tasks = max(1, len(files))
        words = RegexWordTokenizer()
        count_in = [] if "in" in counts else [CountDocuments("in")]  # counted already when exact dedup ran
        stats = run_pipeline([reader(stage_in), *count_in,
                              MinhashDedupSignature(str(work / "mh_sigs"), config=minhash, language=words)],
                             executor, work / "logs/mh1", tasks=tasks)
        counts.setdefault("in", counted(stats, "in"))
        # Matches against the index remove the new document; signatures not in the index are added to it.
        (index / "minhash").mkdir(parents=True, exist_ok=True)
        run_pipeline([MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=minhash,
                                          index_folder=str(index / "minhash"), only_dedup_in_index=False,
                                          create_index_name=part)],
                     executor, work / "logs/mh2", tasks=mh.num_buckets)
        run_pipeline([MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=minhash)],
                     executor, work / "logs/mh3", tasks=1)
        # Must use the same reader and task count as the signature step: removals are indexed by (rank, doc).
        removed = per_source_writer(out_dir / "removed/minhash")
        stats = run_pipeline([reader(stage_in), MinhashDedupFilter(str(work / "mh_remove"), exclusion_writer=removed),
                              CountDocuments("out"), per_source_writer(out_dir / "docs")],
                             executor, work / "logs/mh4", tasks=tasks)
        counts["out"] = counted(stats, "out")
    else:
        stats = run_pipeline([reader(stage_in), CountDocuments("out"), per_source_writer(out_dir / "docs")],
                             executor, work / "logs/copy", tasks=len(list(stage_in.glob("*/*.jsonl.gz"))))
        counts["out"] = counted(stats, "out")
        counts.setdefault("in", counts["out"])
    return dedup_summary(counts)


def dedup_summary(counts: dict[str, tuple[Counter, Counter]]) -> dict:
    """The stage's summary from the documents and bytes per source counted at its steps ("in", "after exact",
    "out"; a step that did not run passes everything on)."""
    docs_in, bytes_in = counts.get("in", (Counter(), Counter()))
    docs_exact = counts.get("after exact", (docs_in, bytes_in))[0]
    docs_out, bytes_out = counts.get("out", (docs_exact, Counter()))
    summary = {"docs_in": sum(docs_in.values()), "docs_out": sum(docs_out.values()),
               "bytes_in": sum(bytes_in.values()), "bytes_out": sum(bytes_out.values()),
               "removed_exact": sum(docs_in.values()) - sum(docs_exact.values()),
               "removed_minhash": sum(docs_exact.values()) - sum(docs_out.values()),
               "docs_per_source": dict(docs_out), "bytes_per_source": dict(bytes_out)}
    get_logger().info(f"dedup: {summary['docs_in']} -> {summary['docs_out']} documents "
                      f"({summary['removed_exact']} exact, {summary['removed_minhash']} near duplicates)")
    return summary


def build(out: Path, cleaned: dict[str, ArtifactRef], config: DedupConfig, executor: ExecutorConfig,
          artifacts_dir: str, base: ArtifactRef | None = None) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py). `base`: the dedup artifact of the data ingested before
    `cleaned` (incremental runs), or None."""
    return dedup_documents({s: r.dir / "docs" for s, r in cleaned.items()}, config, executor, out,
                           base.dir / "index" if base else None)
