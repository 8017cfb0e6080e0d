"""Data-flow benchmark: what orchestration costs, and how fast each stage is.

In one run, on the bundled corpus (data_specs/default.yaml, ~29 MB):
  bare          the stages' plain functions (datatrove pipelines, sentencepiece) called one after another:
                no Prefect, no artifact store, no checksums, no cache.
  orchestrated  the Prefect data flow, cold (fresh artifacts directory, against a temporary local server).
  re-run        the same flow again with nothing changed (the newest manifest verified, no stage runs).
Prints per-stage docs/s and MB/s, the bare/orchestrated throughput ratio (goal >= 0.9), and tokenization
tokens/s (goal >= 1M on 2 cores).

    python bench/data.py [--spec data_specs/default.yaml]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm  # noqa: E402

from tasks.clean import clean_documents  # noqa: E402
from tasks.dedup import dedup_documents  # noqa: E402
from tasks.download import normalise_source  # noqa: E402
from tasks.lib.manifest import DataLineage  # noqa: E402
from tasks.lib.sources import resolve_source  # noqa: E402
from tasks.shard import shard_documents  # noqa: E402
from tasks.spec import load_spec  # noqa: E402
from tasks.decontaminate import iter_documents  # noqa: E402
from tasks.tokenizer import train_tokenizer  # noqa: E402


def prefect_server():
    """The Prefect server PREFECT_API_URL names (the test suite's), else a temporary local one."""
    from prefect.testing.utilities import prefect_test_harness

    return contextlib.nullcontext() if os.environ.get("PREFECT_API_URL") else \
        prefect_test_harness(server_startup_timeout=90)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_bare(spec, work: Path) -> dict[str, float]:
    """Every stage's plain function, in order, with no orchestration around it."""
    seconds = {"download": 0.0, "clean": 0.0}
    cleaned = {}
    for source in spec.sources:
        down, clean = work / f"download-{source.name}", work / f"clean-{source.name}"
        down.mkdir(parents=True)
        clean.mkdir(parents=True)
        _, s = timed(lambda: normalise_source(resolve_source(source), down, spec.executor, work / "dl"))
        seconds["download"] += s
        _, s = timed(lambda: clean_documents(down / "docs", spec.cleaning_for(source), spec.executor, clean))
        seconds["clean"] += s
        cleaned[source.name] = clean / "docs"
    for stage in ("dedup", "tokenizer", "shard"):
        (work / stage).mkdir()
    dedup_summary, seconds["dedup"] = timed(lambda: dedup_documents(cleaned, spec.dedup, spec.executor, work / "dedup"))
    _, seconds["tokenizer"] = timed(lambda: train_tokenizer(work / "dedup/docs", spec.tokenizer,
                                                            dedup_summary["bytes_out"], work / "tokenizer",
                                                            spec.executor))
    _, seconds["shard"] = timed(lambda: shard_documents(work / "dedup/docs", work / "tokenizer", spec.sharding, DataLineage(),
                                                        work / "shard", executor=spec.executor))
    return seconds


def stage_seconds_from_artifacts(manifest: Path) -> dict[str, float]:
    """Seconds each stage's build took, from the artifacts' own records."""
    import json

    root = manifest.parent.parent.parent
    seconds: dict[str, float] = {}
    for meta in root.glob("*/*/_artifact.json"):
        record = json.loads(meta.read_text())
        seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + record["summary"]["seconds"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        bare, bare_total = timed(lambda: run_bare(spec, work / "bare"))

        from flows.data import data_flow

        spec_file = work / "spec.yaml"
        spec_file.write_text(spec.model_copy(update={"artifacts_dir": str(work / "artifacts")}).model_dump_json())
        with prefect_server():
            manifest, flow_total = timed(lambda: data_flow(str(spec_file)))
            _, rerun_total = timed(lambda: data_flow(str(spec_file)))
        orchestrated = stage_seconds_from_artifacts(Path(manifest))

        docs = sum(1 for _ in iter_documents(work / "bare/dedup/docs"))
        docs_in = sum(1 for f in (work / "bare").glob("download-*/docs/*.jsonl.gz") for _ in gzip.open(f))
        texts = [d["text"] for d in iter_documents(work / "bare/dedup/docs")]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        sp = spm.SentencePieceProcessor(model_file=str(work / "bare/tokenizer/tokenizer.model"))
        ids, encode_s = timed(lambda: sp.encode(texts, num_threads=2))
        tokens = sum(map(len, ids))

        print(f"\nData benchmark on {args.spec}: {docs:,} documents after dedup, {mb:.1f} MB, {tokens:,} tokens\n")
        print(f"{'stage':<10} {'bare s':>8} {'flow s':>8} {'bare MB/s':>10} {'flow MB/s':>10} {'flow docs/s':>12}")
        for stage in ("download", "clean", "dedup", "tokenizer", "shard"):
            b, o = bare[stage], orchestrated.get(stage, float("nan"))
            print(f"{stage:<10} {b:8.1f} {o:8.1f} {mb / b:10.2f} {mb / o:10.2f} {docs_in / o:12.1f}")
        print(f"{'total':<10} {bare_total:8.1f} {flow_total:8.1f} {mb / bare_total:10.2f} {mb / flow_total:10.2f}"
              f" {docs_in / flow_total:12.1f}")
        print(f"(docs/s counts the {docs_in:,} input documents; MB counts text after dedup)")
        print(f"\nwhole flow: {docs_in / flow_total:.1f} docs/s, {mb / flow_total:.2f} MB/s (cold, orchestrated)")
        print(f"throughput ratio orchestrated/bare: {bare_total / flow_total:.3f}  (goal >= 0.9)")
        print(f"no-change re-run: {rerun_total:.1f} s  ({flow_total / rerun_total:.0f}x faster than cold)")
        print(f"sentencepiece encode: {tokens / encode_s / 1e6:.2f} M tokens/s on 2 threads  (goal >= 1M)")
        print(f"shard stage (encode + pack + Parquet): {tokens / bare['shard'] / 1e6:.2f} M tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
