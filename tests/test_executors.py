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

from tasks.clean import clean_documents
from tasks.dedup import dedup_documents
from tasks.spec import CleaningConfig, DedupConfig, ExecutorConfig

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


def clean_and_dedup(sources: dict[str, Path], executor: ExecutorConfig, root: Path) -> tuple[dict, list]:
    cleaned, summaries = {}, {}
    for name, folder in sources.items():
        out = root / "clean" / name
        out.mkdir(parents=True)
        summaries[name] = {k: v for k, v in clean_documents(folder, KJV_CLEANING, executor, out).items()}
        cleaned[name] = out / "docs"
    (root / "dedup").mkdir()
    summaries["dedup"] = dedup_documents(cleaned, DedupConfig(), executor, root / "dedup")
    return summaries, contents(root / "dedup" / "docs")


@pytest.fixture(scope="module")
def local_result(sources, tmp_path_factory):
    return clean_and_dedup(sources, ExecutorConfig(tasks=2, workers=2), tmp_path_factory.mktemp("local"))


@pytest.mark.slow
def test_ray_executor_gives_the_local_output(sources, local_result, tmp_path):
    import ray

    try:
        summaries, docs = clean_and_dedup(sources, ExecutorConfig(kind="ray", tasks=2, workers=2), tmp_path)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    assert docs == local_result[1] and summaries == local_result[0]
    assert summaries["dedup"]["removed_exact"] > 0  # planted copies (of documents that survive cleaning)


@pytest.mark.slow
def test_slurm_executor_submits_arrays_with_dependencies(sources, local_result, tmp_path, monkeypatch):
    jobs = tmp_path / "slurm"
    jobs.mkdir()
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    # the stand-ins first; then this venv, whose bin/ has datatrove's launch_pickled_pipeline and merge_stats
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    executor = ExecutorConfig(kind="slurm", tasks=2, workers=2, slurm_partition="cpu", slurm_time="01:00:00",
                              cpus_per_task=2, poll_seconds=0.1, slurm_sbatch_args={"account": "llm"})
    summaries, docs = clean_and_dedup(sources, executor, tmp_path / "out")
    assert docs == local_result[1] and summaries == local_result[0]

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
        assert f"--export=ALL,RUN_OFFSET=0" in args[f"job-{number - 1}"]
