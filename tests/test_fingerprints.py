"""A stage's fingerprint follows the code it runs (tasks/lib/code_version.py): a semantic edit of anything the
stage reaches changes it, and that stage and those after it rebuild; an edit of comments or docstrings, or of code
the stage never reaches, changes nothing. Edits are made in a copy of the project, never in this checkout."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lib.code_version import stage_code_version

from conftest import ROOT, bundled_docs

STAGES = ("download", "clean", "dedup", "decontaminate", "tokenizer", "shard", "append", "sft_data")
# The train/validation split's seed: only the shard stage uses it.
SPLIT_SEED = "SPLIT_SEED = 1234"
# A semantic edit of a shared block (the same value, another syntax tree): what samples by document id reaches it.
SAMPLING = "return h / 2**64 < fraction"


def project_copy(where: Path) -> Path:
    """The code (tasks/, model/, the test scripts) copied, the data and specs linked."""
    root = where / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("tasks", "model", "tests/scripts"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    for folder in ("data", "data_specs"):
        (root / folder).symlink_to(ROOT / folder)
    return root


def versions(root: Path) -> dict[str, str]:
    return {stage: stage_code_version(stage, root) for stage in STAGES}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_code_version_covers_what_the_stage_reaches_and_nothing_else(tmp_path):
    root = project_copy(tmp_path)
    before = versions(root)
    assert before == versions(ROOT)  # where the checkout lives is not in a fingerprint
    blocks, shard = root / "tasks" / "lib" / "blocks.py", root / "tasks" / "shard.py"

    # Comments, docstrings, blank lines: nothing changes.
    edit(shard, "class TokenizeAndPack(PipelineStep):\n", "class TokenizeAndPack(PipelineStep):  # packs rows\n")
    edit(blocks, 'def keep_in_sample(doc_id: str, fraction: float, seed: int) -> bool:\n    """',
         'def keep_in_sample(doc_id: str, fraction: float, seed: int) -> bool:\n\n    """Reworded. ')
    assert versions(root) == before

    # The split's seed in the shard stage's module: the shard stage only (upstream stages never run it).
    edit(shard, SPLIT_SEED, SPLIT_SEED.replace("1234", "999"))
    after = versions(root)
    assert {s for s in STAGES if after[s] != before[s]} == {"shard"}

    # keep_in_sample itself: everything that samples by document id (the tokenizer's sample, the shard split,
    # the SFT split), and nothing that does not.
    edit(blocks, "def keep_in_sample(doc_id: str, fraction: float, seed: int) -> bool:",
         "def keep_in_sample(doc_id: str, fraction: float, seed: int = 0) -> bool:")
    again = versions(root)
    assert {s for s in STAGES if again[s] != after[s]} == {"tokenizer", "shard", "sft_data"}

    # A module the stage imports through another: the chat template reaches the tokenizer (written into its
    # files) and the SFT rows, through model/chat.py.
    edit(root / "model" / "chat.py", "CHAT_TEMPLATE = (", "CHAT_TEMPLATE = ('' + ")
    third = versions(root)
    assert {s for s in STAGES if third[s] != again[s]} >= {"tokenizer", "sft_data"}
    assert third["shard"] == again["shard"] and third["clean"] == again["clean"]


@pytest.fixture(scope="module")
def raw_documents(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    with gzip.open(root / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in bundled_docs("sotu", 6) + bundled_docs("kjv", 100))
    return root


def build(root: Path, documents: Path, artifacts: Path, *options: str) -> subprocess.CompletedProcess:
    """Run the data chain from the project copy; {stage: "built" | "reused"}."""
    out = subprocess.run([sys.executable, str(root / "tests/scripts/build_data.py"), str(documents), str(artifacts),
                          *options], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def build_states(root: Path, documents: Path, artifacts: Path) -> dict[str, str]:
    """Run the data chain from the project copy; {stage: "built" | "reused"}."""
    out = build(root, documents, artifacts)
    states = {}
    for stage in ("download", "clean", "dedup", "decontaminate", "tokenizer", "shard"):
        if f"{stage}: built " in out.stdout:
            states[stage] = "built"
        elif f"{stage}: reusing verified artifact" in out.stdout:
            states[stage] = "reused"
    return states


def plan(root: Path, documents: Path, artifacts: Path) -> dict[str, str]:
    """{stage: its plan line after the stage name} from `build_data.py --plan`, which builds nothing."""
    lines = build(root, documents, artifacts, "--plan").stdout.strip().splitlines()[-6:]
    return {stage: rest for stage, rest in (re.fullmatch(r"(\w+) \(.*?\)\s+(.*)", line).groups() for line in lines)}


@pytest.mark.slow
def test_a_library_edit_rebuilds_the_stage_that_runs_it_and_after(raw_documents, tmp_path):
    root, artifacts = project_copy(tmp_path), tmp_path / "artifacts"
    assert all(p.startswith("build ") and p.endswith("no earlier build of this stage")
               for p in plan(root, raw_documents, artifacts).values())
    assert not artifacts.exists()  # planning built nothing
    assert set(build_states(root, raw_documents, artifacts).values()) == {"built"}

    blocks = root / "tasks" / "lib" / "blocks.py"
    edit(blocks, "def keep_in_sample(", "# Sampled by a hash of the id.\ndef keep_in_sample(")
    assert all(p.startswith("reuse ") for p in plan(root, raw_documents, artifacts).values())
    assert set(build_states(root, raw_documents, artifacts).values()) == {"reused"}  # a comment: nothing rebuilds

    edit(blocks, SAMPLING, SAMPLING.replace("2**64", "2.0**64"))
    planned = plan(root, raw_documents, artifacts)
    print("\n".join(f"{stage} {line}" for stage, line in planned.items()))
    assert [s for s, p in planned.items() if p.startswith("build ")] == ["tokenizer", "shard"]
    assert planned["tokenizer"].endswith("code tasks/lib/blocks.py (keep_in_sample)")
    assert "code tasks/lib/blocks.py (keep_in_sample)" in planned["shard"] and "upstream tokenizer" in planned["shard"]
    assert build_states(root, raw_documents, artifacts) == {
        "download": "reused", "clean": "reused", "dedup": "reused", "decontaminate": "reused",
        "tokenizer": "built", "shard": "built"}


def test_only_fields_that_change_the_output_are_in_a_key():
    """Where and how a stage or a training run is executed leaves its key alone; the task count (which moves
    shard boundaries) and the model's layout do not."""
    from tasks.lib.artifacts import ArtifactRef, stage_fingerprint
    from model.run_config import RunConfig
    from tasks.lib.runs import run_key
    from tasks.spec import ExecutorConfig

    upstream = ArtifactRef(stage="download", fingerprint="0" * 20, path="/store/one/download/" + "0" * 20)
    key = lambda executor, path=upstream.path: stage_fingerprint("clean", {  # noqa: E731
        "downloaded": upstream.model_copy(update={"path": path}), "executor": executor, "artifacts_dir": "x"})
    local = key(ExecutorConfig())
    assert key(ExecutorConfig(kind="slurm", slurm={"partition": "gpu", "time": "99:00:00", "sbatch_args": {
        "account": "llm"}}, workers=64, mem_per_cpu_gb=8)) == local
    assert key(ExecutorConfig(kind="ray", ray_address="auto", cpus_per_task=4)) == local
    assert key(ExecutorConfig(), path="/elsewhere/download/" + "0" * 20) == local
    assert key(ExecutorConfig(tasks=8)) != local

    config = RunConfig(train={"steps": 30})
    run = run_key(manifest="m", config=config)
    assert run_key(manifest="m", config=config.replace(launch={
        "launcher": "slurm", "slurm": {"partition": "big", "time": "96:00:00", "sbatch_args": {"account": "x"}},
        "max_restarts": 5, "step_timeout_s": 60, "gpus_required": True})) == run
    assert run_key(manifest="m", config=config.replace(parallel={"tensor_parallel": 2})) != run
    assert run_key(manifest="m", config=config.replace(launch={"nproc": 2})) != run  # data parallel 2
    assert run_key(manifest="m", config=config.replace(train={"steps": 40})) != run
    # The same settings however they were given: explicitly, or left at their defaults.
    assert run_key(manifest="m", config=RunConfig(train={"steps": 30, "lr": 3e-3})) == run
