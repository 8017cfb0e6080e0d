"""Scaling benchmark: the data flow on a synthetic corpus at two sizes, and with 1 and 2 workers.

The corpus is made here, deterministic by seed: unique documents sampled from a word-level bigram model of the
bundled State of the Union text, one paragraph per line, with a known share of planted exact duplicates, near
duplicates (a few percent of the words replaced) and web junk lines (navigation, cookie and JavaScript notices
that the C4 line rules remove). Each data stage's plain function (what its Prefect task wraps) runs in its own
process, one after another (its seconds exclude the process's start and imports), and the benchmark samples the
resident memory of that process and all its datatrove workers every 200 ms (at 50 ms the sampling itself took
about 12% of a core, which the 2-worker runs share).

The stages that run as datatrove tasks use 2 tasks on 2 workers; at the largest size the download and shard
stages (single-process before issue 12) run again alone, with 1 and with 2 workers, on the same inputs.

Printed per size and stage: seconds, MB/s (of generated corpus text) and peak memory; then the goals:
  linear      seconds per MB at the large size within 1.15x of the small size
  bounded     peak memory at the large size within 1.3x of the small size (the tokenizer trains on a sample of
              --tokenizer-sample-mb at both sizes)
  recall      near duplicates found at or above MinHash's theoretical rate for the pairs' measured Jaccard
              similarity, 1 - (1 - s^hashes_per_bucket)^num_buckets, less two standard deviations of that
              expected count (the pairs are a random sample); every exact duplicate found
  parallel    the download and shard stages at least 1.7x faster with 2 workers than with 1

    python bench/scale.py                                  # 50 and 400 MB; 1 worker at 400 MB (~25 min here)
    python bench/scale.py --sizes 5 20 --workers-at 5      # a quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("download", "clean", "dedup", "decontaminate", "tokenizer", "shard")
PARALLEL_STAGES = ("download", "clean", "dedup", "decontaminate", "shard")  # datatrove pipelines on the executor
GAINED_PARALLELISM = ("download", "shard")  # single-process before issue 12: the 1.7x goal is theirs
JUNK_LINES = (  # lines C4's line rules remove: no terminal punctuation, too few words, 'javascript', cookie notices
    "Share this article",
    "Home | News | Sport | Contact us",
    "Click here to read more",
    "This website uses cookies to improve your experience.",
    "Please enable JavaScript in your browser to view the comments.",
    "Posted by admin",
)
SENTENCE_END = (".", "?", "!")
SOURCE = "synthetic"


# ---------------------------------------------------------------- the synthetic corpus


class BigramText:
    """Sentences sampled word by word from the bigram counts of the bundled State of the Union addresses."""

    def __init__(self) -> None:
        with gzip.open(ROOT / "data/bundled/sotu.jsonl.gz", "rt", encoding="utf-8") as f:
            words = " ".join(json.loads(line)["text"] for line in f).split()
        successors = defaultdict(list)
        for a, b in zip(words, words[1:]):
            successors[a].append(b)
        self.successors = {w: tuple(nxt) for w, nxt in successors.items()}
        self.starts = tuple(b for a, b in zip(words, words[1:]) if a.endswith(SENTENCE_END) and b[:1].isupper())
        self.words = tuple(words)  # replacement words for near duplicates, drawn by frequency

    def sentence(self, rng: random.Random) -> str:
        out = [rng.choice(self.starts)]
        while not out[-1].endswith(SENTENCE_END) and len(out) < 40:
            nxt = self.successors.get(out[-1])
            if not nxt:
                break
            out.append(rng.choice(nxt))
        if not out[-1].endswith(SENTENCE_END):
            out[-1] += "."
        return " ".join(out)

    def document(self, rng: random.Random, junk_share: float) -> str:
        lines = [" ".join(self.sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(2, 12))]
        if rng.random() < junk_share:
            for _ in range(rng.randint(1, 3)):
                lines.insert(rng.randint(0, len(lines)), rng.choice(JUNK_LINES))
        return "\n".join(lines)

    def near_copy(self, text: str, rng: random.Random, edit: float) -> str:
        """`text` with each word replaced, with probability `edit`, by a random corpus word."""
        return "\n".join(" ".join(rng.choice(self.words) if rng.random() < edit else w for w in line.split(" "))
                         for line in text.split("\n"))


class CorpusPlan:
    """Which documents each file holds. Unique document i is a function of (seed, i) alone, so any file can
    regenerate the original of a duplicate it plants, and the files can be written in parallel."""

    def __init__(self, size_mb: float, seed: int, file_mb: float, exact_share: float, near_share: float,
                 junk_share: float, avg_doc_bytes: float):
        self.seed, self.exact_share, self.near_share, self.junk_share = seed, exact_share, near_share, junk_share
        self.files = max(4, round(size_mb / file_mb))  # at least 2 per task
        per_file_bytes = size_mb * 1e6 / self.files
        self.unique_per_file = max(1, round(per_file_bytes / (avg_doc_bytes * (1 + exact_share + near_share))))
        self.unique = self.files * self.unique_per_file

    def unique_text(self, model: BigramText, i: int) -> str:
        return model.document(random.Random(f"{self.seed}:{i}"), self.junk_share)


_MODEL: BigramText | None = None  # built once in the parent, inherited by the forked writers


def write_corpus_file(plan: CorpusPlan, index: int, folder: Path) -> int:
    """File `index`: its unique documents plus planted duplicates of any file's documents, shuffled; the planted
    pairs go to `planted-<index>.jsonl`. Returns the text bytes written."""
    rng = random.Random(f"{plan.seed}:file:{index}")
    first = index * plan.unique_per_file
    docs = [{"id": f"u{i}", "text": plan.unique_text(_MODEL, i)} for i in range(first, first + plan.unique_per_file)]
    planted = []
    for kind, share in (("exact", plan.exact_share), ("near", plan.near_share)):
        for k in range(round(plan.unique_per_file * share)):
            of = rng.randrange(plan.unique)
            text = plan.unique_text(_MODEL, of)
            edit = 0.0
            if kind == "near":
                edit = rng.uniform(0.005, 0.08)
                text = _MODEL.near_copy(text, rng, edit)
            doc_id = f"{kind}{index}-{k}"
            docs.append({"id": doc_id, "text": text})
            planted.append({"id": doc_id, "kind": kind, "of": f"u{of}", "edit": round(edit, 4)})
    rng.shuffle(docs)
    with gzip.open(folder / "docs" / f"part-{index:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    (folder / f"planted-{index:05d}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in planted))
    return sum(len(d["text"].encode()) for d in docs)


def generate_corpus(folder: Path, size_mb: float, seed: int, file_mb: float = 12.5, exact_share: float = 0.05,
                    near_share: float = 0.05, junk_share: float = 0.2) -> dict:
    """Write the corpus to `folder/docs/` (and its answer key beside it); returns its description."""
    global _MODEL
    if _MODEL is None:
        _MODEL = BigramText()
    probe = CorpusPlan(1, seed, 1, 0, 0, junk_share, 1)
    avg = sum(len(probe.unique_text(_MODEL, -1 - i).encode()) for i in range(300)) / 300
    plan = CorpusPlan(size_mb, seed, file_mb, exact_share, near_share, junk_share, avg)
    (folder / "docs").mkdir(parents=True)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        text_bytes = sum(pool.starmap(write_corpus_file, [(plan, i, folder) for i in range(plan.files)]))
    return {"mb": text_bytes / 1e6, "files": plan.files, "unique_docs": plan.unique,
            "exact_dups": plan.files * round(plan.unique_per_file * exact_share),
            "near_dups": plan.files * round(plan.unique_per_file * near_share), "junk_share": junk_share,
            "seed": seed}


# ---------------------------------------------------------------- running the stages


def bench_spec(corpus: Path, workers: int, tokenizer_sample_mb: float, source_kind: str):
    """The default data spec's settings on the corpus, as local files or as a Hugging Face `json` dataset."""
    from tasks.spec import DataSpec

    files = str(corpus / "docs/*.jsonl.gz")
    location = {"paths": [files]} if source_kind == "local" else {"dataset": "json", "data_files": [files]}
    return DataSpec.model_validate({
        "name": "scale",
        "executor": {"kind": "local", "tasks": 2, "workers": workers},
        "sources": [{"name": SOURCE, "kind": source_kind, **location, "license": "synthetic (bench/scale.py)"}],
        "tokenizer": {"sample_bytes": int(tokenizer_sample_mb * 1e6)},
    })


def stage_call(stage: str, run: Path) -> Callable[[], dict]:
    """One stage's plain function on the previous stage's output under `run/`, ready to call (in the stage
    process; the imports happen here, outside the timed call)."""
    from tasks.clean import clean_documents
    from tasks.decontaminate import decontaminate_documents, reference_sets
    from tasks.dedup import dedup_documents
    from tasks.download import normalise_source
    from tasks.lib.manifest import DataLineage
    from tasks.lib.sources import downloads_dir, resolve_source
    from tasks.shard import shard_documents
    from tasks.spec import DataSpec
    from tasks.tokenizer import train_tokenizer

    spec = DataSpec.model_validate_json((run / "spec.json").read_text())
    source, executor, out = spec.sources[0], spec.executor, run / stage
    out.mkdir()
    if stage == "download":
        return lambda: normalise_source(resolve_source(source), out, executor, downloads_dir(run))
    if stage == "clean":
        return lambda: clean_documents(run / "download/docs", spec.cleaning_for(source), executor, out)
    if stage == "dedup":
        return lambda: dedup_documents({source.name: run / "clean/docs"}, spec.dedup, executor, out)
    if stage == "decontaminate":
        return lambda: decontaminate_documents(run / "dedup/docs", reference_sets(spec.decontamination),
                                               spec.decontamination, executor, out, downloads_dir(run))
    if stage == "tokenizer":
        text_bytes = json.loads((run / "decontaminate.json").read_text())["summary"]["bytes_out"]
        return lambda: train_tokenizer(run / "decontaminate/docs", spec.tokenizer, text_bytes, out, executor)
    return lambda: shard_documents(run / "decontaminate/docs", run / "tokenizer", spec.sharding, DataLineage(), out,
                                   executor=executor)


class TreeMemory(threading.Thread):
    """Peak resident memory of a process and all its descendants, sampled every `interval` seconds (RSS summed,
    so pages a forked worker shares with its parent count twice: an upper bound)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(self.interval)


def measure_stage(stage: str, run: Path) -> dict:
    """Run `stage` in a fresh process; (its own seconds, peak tree memory in MB, its summary)."""
    log = open(run / f"{stage}.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "--stage", stage, "--run", str(run)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    memory = TreeMemory(proc.pid)
    memory.start()
    code = proc.wait()
    memory.done.set()
    memory.join()
    log.close()
    if code != 0:
        raise SystemExit(f"stage {stage} failed (exit {code}); its log: {run / f'{stage}.log'}")
    result = json.loads((run / f"{stage}.json").read_text())
    return {"seconds": result["seconds"], "peak_mb": memory.peak / 2**20, "summary": result["summary"]}


def run_flow(corpus: Path, run: Path, args: argparse.Namespace, label: str) -> dict[str, dict]:
    """Every stage in order with 2 workers."""
    run.mkdir(parents=True)
    (run / "spec.json").write_text(bench_spec(corpus, 2, args.tokenizer_sample_mb, args.source).model_dump_json())
    results = {}
    for stage in STAGES[:STAGES.index(args.until) + 1]:
        results[stage] = measure_stage(stage, run)
        print(f"  [{label}] {stage:<14} {results[stage]['seconds']:8.1f} s  peak {results[stage]['peak_mb']:7.0f} MB",
              flush=True)
    return results


def run_alone(stage: str, workers: int, flow_run: Path, run: Path, corpus: Path, args: argparse.Namespace) -> dict:
    """`stage` again with `workers`, on the inputs the flow's run gave it (its folders linked, not copied)."""
    run.mkdir(parents=True)
    (run / "spec.json").write_text(bench_spec(corpus, workers, args.tokenizer_sample_mb, args.source)
                                   .model_dump_json())
    for entry in flow_run.iterdir():
        if entry.name != "spec.json" and entry.name.split(".")[0] != stage:
            (run / entry.name).symlink_to(entry)
    return measure_stage(stage, run)


# ---------------------------------------------------------------- dedup recall


def dedup_recall(corpus: Path, run: Path) -> dict:
    """Planted pairs found by the dedup stage, among pairs whose documents both survived cleaning. A near pair is
    found unless the near copy and some copy of its original's text are both kept. Also: the pairs' Jaccard
    similarity of the MinHash shingles (datatrove's own), and MinHash's theoretical detection rate for it."""
    import numpy as np
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupSignature

    from tasks.lib.blocks import RegexWordTokenizer
    from tasks.spec import DataSpec
    from tasks.decontaminate import iter_documents

    planted = [json.loads(line) for f in sorted(corpus.glob("planted-*.jsonl")) for line in open(f)]
    copies = defaultdict(set)  # original id -> ids with the same text (itself and its exact copies)
    for p in planted:
        if p["kind"] == "exact":
            copies[p["of"]].add(p["id"])
    wanted = {p["id"] for p in planted} | {p["of"] for p in planted}
    cleaned, texts, junk_left = set(), {}, 0
    for doc in iter_documents(run / "clean/docs"):
        doc_id = doc["id"].removeprefix(SOURCE + "/")  # the download stage prefixes ids with the source name
        cleaned.add(doc_id)
        if doc_id in wanted:
            texts[doc_id] = doc["text"]
        junk_left += sum(1 for line in doc["text"].split("\n") if line in JUNK_LINES)
    kept = {doc["id"].removeprefix(SOURCE + "/") for doc in iter_documents(run / "dedup/docs")}

    mh = DataSpec.model_validate_json((run / "spec.json").read_text()).dedup.minhash
    signer = MinhashDedupSignature(str(run / "_unused"), config=MinhashConfig(
        n_grams=mh.n_grams, num_buckets=mh.num_buckets, hashes_per_bucket=mh.hashes_per_bucket, seed=mh.seed),
                                   language=RegexWordTokenizer())

    def jaccard(a: str, b: str) -> float:
        x, y = np.unique(signer.get_shingles(a)), np.unique(signer.get_shingles(b))
        return len(np.intersect1d(x, y)) / max(1, len(np.union1d(x, y)))

    exact = [p for p in planted if p["kind"] == "exact" and {p["id"], p["of"]} <= cleaned]
    exact_found = sum(1 for p in exact if not {p["id"], p["of"]} <= kept)
    near = []
    for p in planted:
        group = {p["of"]} | copies[p["of"]]
        if p["kind"] != "near" or p["id"] not in cleaned or not group & cleaned:
            continue
        s = jaccard(texts[p["id"]], texts[min(group & cleaned)])
        found = not (p["id"] in kept and group & kept)
        near.append((s, found, 1 - (1 - s ** mh.hashes_per_bucket) ** mh.num_buckets))
    # The theory gives each pair's chance of being found; the count found varies around their sum by this much.
    spread = sum(t * (1 - t) for _, _, t in near) ** 0.5
    originals = {p["of"] for p in planted}
    unplanted_removed = sum(1 for i in cleaned - kept if i.startswith("u") and i not in originals)
    bins = []
    for lo, hi in ((0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)):
        inside = [x for x in near if lo <= x[0] < hi]
        if inside:
            bins.append({"jaccard": f"{lo:.1f}-{min(hi, 1.0):.1f}", "pairs": len(inside),
                         "found": sum(f for _, f, _ in inside) / len(inside),
                         "theory": sum(t for _, _, t in inside) / len(inside)})
    return {"exact_pairs": len(exact), "exact_found": exact_found, "near_pairs": len(near),
            "near_found": sum(f for _, f, _ in near), "near_theory": sum(t for _, _, t in near),
            "near_theory_sd": spread,
            "bins": bins, "unplanted_removed": unplanted_removed, "junk_lines_left": junk_left,
            "docs_after_clean": len(cleaned)}


# ---------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(corpora: dict, flows: dict, recall: dict, one_worker: dict, workers_at: float) -> bool:
    sizes = sorted(corpora)
    print()
    for size in sizes:
        c = corpora[size]
        print(f"corpus {size:g} MB: {c['mb']:.1f} MB of text in {c['files']} files, {c['unique_docs']:,} unique "
              f"documents + {c['exact_dups']:,} exact and {c['near_dups']:,} near duplicates; "
              f"{c['junk_share']:.0%} of documents carry junk lines (seed {c['seed']})")
    print(f"\n{'stage':<14}" + "".join(f"{f'{s:g} MB: s':>12} {'MB/s':>7} {'peak MB':>8}" for s in sizes))
    totals = {s: sum(r["seconds"] for r in flows[s].values()) for s in sizes}
    stages = [stage for stage in STAGES if stage in flows[sizes[0]]]
    for stage in stages:
        row = f"{stage:<14}"
        for s in sizes:
            r = flows[s][stage]
            row += f"{r['seconds']:12.1f} {corpora[s]['mb'] / r['seconds']:7.2f} {r['peak_mb']:8.0f}"
        print(row)
    print(f"{'total':<14}" + "".join(f"{totals[s]:12.1f} {corpora[s]['mb'] / totals[s]:7.2f} {'':>8}" for s in sizes))

    ok = True
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        print(f"\nlinear and bounded, {big:g} MB against {small:g} MB:")
        print(f"{'stage':<14} {'s/MB ratio':>10} {'goal 1.15':>9} {'memory ratio':>12} {'goal 1.3':>9}")
        for stage in (*stages, "total"):
            if stage == "total":
                t_small, t_big = totals[small], totals[big]
            else:
                t_small, t_big = flows[small][stage]["seconds"], flows[big][stage]["seconds"]
            time_ratio = (t_big / corpora[big]["mb"]) / (t_small / corpora[small]["mb"])
            line = f"{stage:<14} {time_ratio:10.2f} {verdict(time_ratio <= 1.15):>9}"
            ok &= time_ratio <= 1.15
            if stage != "total":
                mem_ratio = flows[big][stage]["peak_mb"] / flows[small][stage]["peak_mb"]
                exempt = stage == "tokenizer"
                line += f" {mem_ratio:12.2f} {'(sample)' if exempt else verdict(mem_ratio <= 1.3):>9}"
                ok &= exempt or mem_ratio <= 1.3
            print(line)

    for size in (s for s in sizes if s in recall):
        r = recall[size]
        recall_ok = r["exact_found"] == r["exact_pairs"] and r["near_found"] >= r["near_theory"] - 2 * r["near_theory_sd"]
        print(f"\ndedup recall at {size:g} MB: exact {r['exact_found']}/{r['exact_pairs']} pairs; near "
              f"{r['near_found']}/{r['near_pairs']} = {r['near_found'] / max(1, r['near_pairs']):.3f}, MinHash theory "
              f"{r['near_theory'] / max(1, r['near_pairs']):.3f} +- {r['near_theory_sd'] / max(1, r['near_pairs']):.3f} "
              f"({verdict(recall_ok)}); "
              f"unplanted documents removed: {r['unplanted_removed']}; junk lines left after cleaning: "
              f"{r['junk_lines_left']}")
        print(f"  {'Jaccard':<9} {'pairs':>6} {'found':>6} {'theory':>6}")
        for b in r["bins"]:
            print(f"  {b['jaccard']:<9} {b['pairs']:6d} {b['found']:6.3f} {b['theory']:6.3f}")
        ok &= recall_ok

    if one_worker:
        print(f"\n2 workers against 1 at {workers_at:g} MB (2 datatrove tasks either way, the same inputs; the "
              f"faster of two runs each):")
        print(f"{'stage':<14} {'1 worker s':>10} {'2 workers s':>11} {'speed-up':>8}")
        for stage, by_workers in one_worker.items():
            one, two = by_workers[1]["seconds"], by_workers[2]["seconds"]
            goal = verdict(one / two >= 1.7) if stage in GAINED_PARALLELISM else ""
            ok &= stage not in GAINED_PARALLELISM or one / two >= 1.7
            print(f"{stage:<14} {one:10.1f} {two:11.1f} {one / two:8.2f} {goal}")
    print(f"\nall goals met: {ok}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 400], help="corpus sizes in MB of text")
    parser.add_argument("--workers-at", type=float, help="size at which the --one-worker stages run again with 1 "
                                                         "worker (default: the largest size)")
    parser.add_argument("--one-worker", nargs="*", choices=PARALLEL_STAGES, default=list(GAINED_PARALLELISM),
                        help="stages to time alone with 1 and 2 workers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=32,
                        help="tokenizer.sample_bytes, in MB, at every size (default: %(default)s)")
    parser.add_argument("--source", choices=("local", "hf"), default="local",
                        help="read the corpus files as a local source, or through `datasets` as a Hugging Face "
                             "'json' dataset (streamed, as a Hub dataset would be)")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    parser.add_argument("--work", help="keep the corpora and outputs here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        call = stage_call(args.stage, Path(args.run))
        started = time.perf_counter()
        summary = call()
        (Path(args.run) / f"{args.stage}.json").write_text(
            json.dumps({"seconds": time.perf_counter() - started, "summary": summary}))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    workers_at = args.workers_at if args.workers_at is not None else max(args.sizes)
    if workers_at not in args.sizes:
        raise SystemExit(f"--workers-at {workers_at:g} must be one of --sizes {args.sizes}")
    corpora, flows, recall, one_worker = {}, {}, {}, {}
    try:
        for size in args.sizes:
            corpus, run = work / f"corpus-{size:g}mb-seed{args.seed}", work / f"run-{size:g}mb-{args.source}"
            started = time.perf_counter()
            shutil.rmtree(corpus, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            corpora[size] = generate_corpus(corpus, size, args.seed)
            print(f"generated {corpus} ({corpora[size]['mb']:.1f} MB) in {time.perf_counter() - started:.0f} s",
                  flush=True)
            flows[size] = run_flow(corpus, run, args, f"{size:g} MB")
            if "dedup" in flows[size]:
                recall[size] = dedup_recall(corpus, run)
            if size == workers_at:
                # 1 and 2 workers back to back, twice, keeping the faster of each: this machine's speed drifts by
                # 10-20% over minutes, more than a comparison of single runs far apart can bear.
                for stage in (s for s in args.one_worker if s in flows[size]):
                    for repeat in range(2):
                        for workers in (1, 2):
                            alone = work / f"run-{size:g}mb-{stage}-{workers}w-{repeat}"
                            shutil.rmtree(alone, ignore_errors=True)
                            result = run_alone(stage, workers, run, alone, corpus, args)
                            print(f"  [{size:g} MB, {stage} alone, {workers} worker{'s' if workers > 1 else ''}] "
                                  f"{result['seconds']:8.1f} s", flush=True)
                            best = one_worker.setdefault(stage, {}).get(workers)
                            if best is None or result["seconds"] < best["seconds"]:
                                one_worker[stage][workers] = result
        ok = report(corpora, flows, recall, one_worker, workers_at)
        if args.json:
            alone = {stage: {f"{w} workers": r for w, r in by.items()} for stage, by in one_worker.items()}
            Path(args.json).write_text(json.dumps({"corpora": corpora, "recall": recall, "alone": alone,
                                                   "flows": {f"{s:g}": r for s, r in flows.items()}}, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
