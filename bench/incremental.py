"""Incremental-ingest benchmark: what adding 1% more data costs, against a cold run measured in the same run.

The bundled corpus is split per source: every 50th document (about 1% of the text) goes to a held-back file,
the rest to a base file.
Then, through the Prefect data flow (temporary local server, fresh artifacts directory):
  cold         the data flow on the base files (99%), from nothing
  incremental  the held-back files added (one per source): only they are downloaded, cleaned, deduplicated
               against the persistent index, tokenized with the existing tokenizer and appended (manifest v2)
  no change    the flow again with nothing new
  full         a rebuild from all files (what adding data cost before incremental ingest)
Prints seconds, the incremental/cold ratio (goal <= 0.10) and the incremental run's time per stage.

    python bench/incremental.py [--spec data_specs/default.yaml] [--every 50]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib.sources import resolve_source  # noqa: E402
from tasks.spec import load_spec  # noqa: E402


def split_corpus(spec, root: Path, every: int) -> tuple[dict, int, int]:
    """Write `<root>/<source>/base.jsonl.gz` and `held-back.later` (renamed to .jsonl.gz to add it); return the spec's sources pointed
    at them, and the bytes of each part."""
    sources, base_bytes, new_bytes = [], 0, 0
    for source in spec.sources:
        folder = root / source.name
        folder.mkdir(parents=True)
        with gzip.open(folder / "base.jsonl.gz", "wt") as base, gzip.open(folder / "held-back.later", "wt") as new:
            for path, _ in resolve_source(source).files:
                for i, line in enumerate(gzip.open(path, "rt") if path.endswith(".gz") else open(path)):
                    size = len(json.loads(line)[source.text_field].encode())
                    if i % every == every - 1:
                        new.write(line)
                        new_bytes += size
                    else:
                        base.write(line)
                        base_bytes += size
        if (folder / "held-back.later").stat().st_size < 100:  # nothing held back (a source under N documents)
            (folder / "held-back.later").unlink()
        sources.append(source.model_copy(update={"paths": [str(folder / "*.jsonl.gz")]}))
    return sources, base_bytes, new_bytes


def stage_seconds(artifacts: Path, since: float) -> dict[str, float]:
    """Build seconds per stage of the artifacts built after `since`."""
    seconds: dict[str, float] = {}
    for meta in artifacts.glob("*/*/_artifact.json"):
        record = json.loads(meta.read_text())
        if record.get("built_at", 0) >= since:
            seconds[record["stage"]] = seconds.get(record["stage"], 0.0) + record["summary"]["seconds"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml")
    parser.add_argument("--every", type=int, default=50,
                        help="hold back every N-th document (default: 1 in 50, about 1%% of the text)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        sources, base_bytes, new_bytes = split_corpus(spec, work / "corpus", args.every)
        spec_file = work / "spec.yaml"
        spec_file.write_text(spec.model_copy(update={"artifacts_dir": str(work / "artifacts"), "sources": sources})
                             .model_dump_json())

        from bench.data import prefect_server
        from flows.data import data_flow
        from tasks.lib.manifest import ShardManifest

        def timed(**kwargs) -> tuple[str, float, float]:
            started = time.time()
            manifest = data_flow(str(spec_file), **kwargs)
            return manifest, time.time() - started, started

        with prefect_server():
            cold_manifest, cold, _ = timed()
            for held in (work / "corpus").glob("*/held-back.later"):
                held.rename(held.with_name("held-back.jsonl.gz"))
            inc_manifest, incremental, inc_started = timed()
            per_stage = stage_seconds(work / "artifacts", inc_started)
            _, unchanged, _ = timed()
            full_manifest, full, _ = timed(incremental=False)

        before, after = ShardManifest.load(Path(cold_manifest).parent), ShardManifest.load(Path(inc_manifest).parent)
        full_m = ShardManifest.load(Path(full_manifest).parent)
        print(f"\nIncremental ingest on {args.spec}: base {base_bytes / 1e6:.2f} MB, added {new_bytes / 1e6:.3f} MB "
              f"({new_bytes / base_bytes:.2%} more), every {args.every}th document of each source\n")
        print(f"{'run':<34} {'seconds':>8} {'vs cold':>8}")
        for name, seconds in (("cold (99%, from nothing)", cold), ("incremental (+1%, manifest v2)", incremental),
                              ("no change", unchanged), ("full rebuild (100%, from nothing)", full)):
            print(f"{name:<34} {seconds:8.1f} {seconds / cold:8.3f}")
        print(f"\nincremental / cold: {incremental / cold:.3f}  (goal <= 0.10)")
        print(f"incremental / full rebuild: {incremental / full:.3f}")
        print("incremental run, build seconds per stage: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_stage.items())))
        print(f"training tokens: cold {before.totals['tokens']:,}, v2 {after.totals['tokens']:,} "
              f"(+{after.totals['tokens'] - before.totals['tokens']:,}), full rebuild {full_m.totals['tokens']:,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
