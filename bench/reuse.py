"""Reuse benchmark: what checking an unchanged artifact costs, by stat (every re-run) against sha256 (`--verify`).

Builds one synthetic `shard` artifact of `--files` files (10,000 by default, `--kb` each) through the artifact
store, then times, on the same files in the same run:
  stat check   `verify(path)`: each file's presence, size and build-time mtime (what every reuse does)
  full check   `verify(path, full=True)`: each file hashed (what `--verify` does, and what every reuse did before)
and extrapolates both to the 100 GB plan's ~205 GB of artifacts. The full check is timed after the stat check,
with the files in the page cache, so its figure is a lower bound of what a cold store costs.

    python bench/reuse.py [--files 10000] [--kb 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lib.artifacts import build_artifact, verify  # noqa: E402

PLAN_BYTES = 205e9  # artifacts of the 100 GB plan (docs/performance.md)


def synthetic_shards(out: Path, files: int, kb: int) -> dict:
    """`files` incompressible files under train/<source>/, as a shard stage lays them out."""
    for i in range(files):
        folder = out / "train" / f"source-{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"shard-{i:05d}.parquet").write_bytes(os.urandom(kb * 1024))
    return {"files": files}


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--kb", type=int, default=100, help="size of each file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        built, ref = timed(lambda: build_artifact("shard", {"files": args.files, "kb": args.kb,
                                                            "artifacts_dir": store},
                                                  lambda out: synthetic_shards(out, args.files, args.kb)))
        total = args.files * args.kb * 1024
        print(f"store: {args.files:,} files, {total / 1e9:.2f} GB, built in {built:.1f} s")
        stat_s, stat_problem = timed(lambda: verify(ref.dir))
        full_s, full_problem = timed(lambda: verify(ref.dir, full=True))
        assert stat_problem is None and full_problem is None, (stat_problem, full_problem)
    rate = total / full_s
    print(f"stat check  {stat_s:8.2f} s   ({stat_s / args.files * 1e6:.0f} us a file)")
    print(f"full check  {full_s:8.2f} s   ({rate / 1e6:.0f} MB/s of sha256)")
    print(f"ratio stat/full: {stat_s / full_s:.4f}")
    print(f"at the 100 GB plan's {PLAN_BYTES / 1e9:.0f} GB: full check ~{PLAN_BYTES / rate / 60:.1f} min on this "
          f"machine's cores; the stat check depends on the file count, not the bytes")


if __name__ == "__main__":
    main()
