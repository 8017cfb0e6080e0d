"""The data stages give the same output on every datatrove executor: local processes, a Ray cluster (started
here, 2 workers), and Slurm (sbatch/srun/squeue stand-ins that run each job at once, so the generated scripts,
job arrays and dependencies are real)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from model.data import TrainSamples
from tasks.clean import clean_documents
from tasks.dedup import dedup_documents
from tasks.lib.artifacts import sha256_file
from tasks.lib.blocks import keep_in_sample
from tasks.lib.manifest import DataLineage, ShardInfo, ShardManifest
from tasks.shard import shard_documents
from tasks.spec import CleaningConfig, DedupConfig, ExecutorConfig, ShardingConfig, TokenizerConfig
from tasks.tokenizer import train_tokenizer

from conftest import bundled_docs

FAKE_SLURM = Path(__file__).parent / "scripts" / "fake_slurm"
KJV_CLEANING = CleaningConfig.model_validate({"c4": {"filter_no_terminal_punct": False},
                                              "gopher_quality": {"max_non_alpha_words_ratio": 0.6}})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two sources of real text, each in two files so that two tasks share the work."""
    root = tmp_path_factory.mktemp("sources")
    docs = {"sotu": bundled_docs("sotu", 30), "kjv": bundled_docs("kjv", 120)}
    docs["kjv"] += docs["kjv"][:10]  # exact duplicates for dedup to find
    for name, records in docs.items():
        (root / name).mkdir()
        for part in range(2):
            with gzip.open(root / name / f"{part:05d}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps({**r, "metadata": {"source": name}}) + "\n" for r in records[part::2])
    return {name: root / name for name in docs}


def contents(folder: Path) -> list[tuple[str, str]]:
    out = []
    for path in folder.rglob("*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            out += [(path.relative_to(folder).parent.as_posix(), json.loads(line)["id"]) for line in f]
    return sorted(out)


@pytest.fixture(scope="module")
def tokenizer_dir(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(next(iter(sources.values())).parent, TokenizerConfig(vocab_size=1000), 10**9, out)
    return out


SHARDING = ShardingConfig(seq_len=64, rows_per_shard=64, row_group_size=16, validation_fraction=0.1)


def shard_outputs(folder: Path) -> tuple[list[ShardInfo], dict[str, bytes]]:
    """(the manifest's shard entries, every shard's bytes)."""
    shards = ShardManifest.load(folder).shards
    return shards, {x.path: (folder / x.path).read_bytes() for x in shards}


def clean_dedup_shard(sources: dict[str, Path], executor: ExecutorConfig, root: Path,
                      tokenizer_dir: Path) -> tuple[dict, list, tuple]:
    cleaned, summaries = {}, {}
    for name, folder in sources.items():
        out = root / "clean" / name
        out.mkdir(parents=True)
        summaries[name] = {k: v for k, v in clean_documents(folder, KJV_CLEANING, executor, out).items()}
        cleaned[name] = out / "docs"
    (root / "dedup").mkdir()
    summaries["dedup"] = dedup_documents(cleaned, DedupConfig(), executor, root / "dedup")
    (root / "shard").mkdir()
    shard_documents(root / "dedup" / "docs", tokenizer_dir, SHARDING, DataLineage(), root / "shard", executor=executor)
    return summaries, contents(root / "dedup" / "docs"), shard_outputs(root / "shard")


def test_shard_stage_on_1_and_4_tasks(sources, tokenizer_dir, tmp_path):
    """Each task packs its own files into its own shards: every task count gives a valid manifest, the same
    documents on each side of the train/validation split, and every document's tokens once (less what each task
    leaves after its last full row)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    docs = [json.loads(line) for folder in sources.values() for f in sorted(folder.glob("*.jsonl.gz"))
            for line in gzip.open(f, "rt")]
    valid_tokens = sum(len(sp.encode(d["text"])) + 1 for d in docs if keep_in_sample(d["id"], 0.1, seed=1234))
    for tasks in (1, 4):
        out = tmp_path / f"tasks-{tasks}"
        out.mkdir()
        summary = shard_documents(next(iter(sources.values())).parent, tokenizer_dir, SHARDING, DataLineage(), out,
                                  executor=ExecutorConfig(tasks=tasks, workers=2))
        manifest = ShardManifest.load(out)
        assert summary["tasks"] == tasks
        assert {Path(x.path).name.split("-")[1] for x in manifest.shards} == {f"{t:05d}" for t in range(tasks)}
        assert all(sha256_file(out / x.path) == x.sha256 for x in manifest.shards)
        assert summary["docs_valid"] == sum(keep_in_sample(d["id"], 0.1, seed=1234) for d in docs)
        assert summary["docs_train"] + summary["docs_valid"] == len(docs)
        packed_valid = sum(x.tokens for x in manifest.shards if x.split == "valid")
        assert valid_tokens - tasks * len(sources) * 65 < packed_valid <= valid_tokens
        assert len(TrainSamples(out, seed=0).batch(0, 32)["tokens"]) == 32


@pytest.fixture(scope="module")
def local_result(sources, tokenizer_dir, tmp_path_factory):
    return clean_dedup_shard(sources, ExecutorConfig(tasks=2, workers=2), tmp_path_factory.mktemp("local"),
                             tokenizer_dir)


@pytest.mark.slow
def test_ray_executor_gives_the_local_output(sources, tokenizer_dir, local_result, tmp_path):
    """The same documents after cleaning and dedup, and byte-identical shards, on 2 Ray workers."""
    import ray

    try:
        summaries, docs, shards = clean_dedup_shard(sources, ExecutorConfig(kind="ray", tasks=2, workers=2),
                                                    tmp_path, tokenizer_dir)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    assert docs == local_result[1] and summaries == local_result[0]
    assert shards == local_result[2] and len(shards[0]) > 2
    assert summaries["dedup"]["removed_exact"] > 0  # planted copies (of documents that survive cleaning)


@pytest.mark.slow
def test_slurm_executor_submits_arrays_with_dependencies(sources, tokenizer_dir, local_result, tmp_path,
                                                         monkeypatch):
    jobs = tmp_path / "slurm"
    jobs.mkdir()
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    # the stand-ins first; then this venv, whose bin/ has datatrove's launch_pickled_pipeline and merge_stats
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    executor = ExecutorConfig(kind="slurm", tasks=2, workers=2, cpus_per_task=2, slurm={
        "partition": "cpu", "time": "01:00:00", "poll_seconds": 0.1, "sbatch_args": {"account": "llm"}})
    summaries, docs, shards = clean_dedup_shard(sources, executor, tmp_path / "out", tokenizer_dir)
    assert docs == local_result[1] and summaries == local_result[0] and shards == local_result[2]

    scripts = {p.stem: p.read_text() for p in jobs.glob("job-*.sh")}
    args = {p.stem: p.read_text().split() for p in jobs.glob("job-*.args")}
    arrays = [job for job, text in scripts.items() if "launch_pickled_pipeline" in text]
    merges = [job for job, text in scripts.items() if "merge_stats" in text]
    assert arrays and len(merges) == len(arrays)  # every pipeline's stats merge is its own job
    (first,) = [scripts[job] for job in arrays if "/clean/sotu/" in scripts[job]]
    for directive in ("--partition=cpu", "--time=01:00:00", "--cpus-per-task=2", "--account=llm", "--array=0-1%2"):
        assert f"#SBATCH {directive}" in first, directive
    # Each stats merge runs only after its array job succeeded.
    for job in merges:
        number = int(job.split("-")[1])
        assert f"#SBATCH --dependency=afterok:{number - 1}" in scripts[job]
        assert "--export=ALL,RUN_OFFSET=0" in args[f"job-{number - 1}"]


def test_a_failing_squeue_is_an_error_not_a_finished_job(tmp_path, monkeypatch):
    """Only squeue's "Invalid job id" (a job purged after it ended) means finished; any other failure stops the
    wait with squeue's own words."""
    from tasks.lib.slurm import wait_for_job

    squeue = tmp_path / "squeue"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
    squeue.chmod(0o755)
    with pytest.raises(RuntimeError, match="squeue failed .* Unable to contact slurm controller"):
        wait_for_job("42", poll_seconds=0.01)
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    wait_for_job("42", poll_seconds=0.01)  # returns: the job is long gone
