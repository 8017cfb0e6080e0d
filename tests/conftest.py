"""Shared fixtures: small slices of the real bundled corpus, a real Prefect server for flow tests, and the
training runs that many tests read.

Work that several tests need is done once per session: the tiny shards, a TP-1 and a TP-2 training run, the
TP-1 checkpoint's evaluation at three layouts, and a pretrain flow run. Tests only read them; a test that changes
a run (resumes, kills or continues it) copies it or starts its own.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.distributed import free_port
from tasks.lib.manifest import DataLineage
from tasks.spec import PROJECT_ROOT, DataSpec, ExecutorConfig, SFTSpec

ROOT = PROJECT_ROOT
# Six steps of the tiny model: it learns visibly, checkpoints at steps 3 and 6, and evaluates at both.
FAST = {"steps": 6, "warmup_steps": 1, "global_batch": 8, "micro_batch": 2, "log_every": 1, "eval_every": 3,
        "eval_batches": 4, "save_every": 3, "lr": 3e-3}

BUNDLED = PROJECT_ROOT / "data" / "bundled"


def fault_drill_env(fault: str) -> dict[str, str]:
    """The environment that makes the ranks run tests/fault_drill (e.g. `kill:1:4`): on their PYTHONPATH, it
    wraps the trainer's heartbeat from outside."""
    path = [str(ROOT / "tests" / "fault_drill"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"TRAIN_FAULT": fault, "PYTHONPATH": os.pathsep.join(path)}
# One process per datatrove pipeline keeps small test runs fast; the multi-process path runs in the flow tests.
SERIAL = ExecutorConfig(tasks=1, workers=1)


def bundled_docs(source: str, limit: int | None = None) -> list[dict]:
    with gzip.open(BUNDLED / f"{source}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, limit)]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """40 speeches and 150 Bible chapters (~2.5 MB of real text) as two jsonl sources."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "sotu" / "part-0.jsonl", bundled_docs("sotu", 40))
    write_jsonl(root / "kjv" / "part-0.jsonl", bundled_docs("kjv", 150))
    return root


def small_spec(corpus: Path, artifacts: Path, **overrides) -> dict:
    spec = {
        "name": "test",
        "artifacts_dir": str(artifacts),
        "executor": {"tasks": 1, "workers": 1},
        "sources": [
            {"name": "sotu", "kind": "local", "paths": [str(corpus / "sotu" / "*.jsonl")], "license": "public domain"},
            {"name": "kjv", "kind": "local", "paths": [str(corpus / "kjv" / "*.jsonl")], "license": "public domain",
             "cleaning": {"c4": {"filter_no_terminal_punct": False},
                          "gopher_quality": {"max_non_alpha_words_ratio": 0.6}}},
        ],
        "tokenizer": {"vocab_size": 1000},
        "sharding": {"seq_len": 128, "rows_per_shard": 500, "validation_fraction": 0.05},
    }
    spec.update(overrides)
    DataSpec.model_validate(spec)  # fail early in the fixture, not deep in a flow
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# The pretraining of the flow tests: 80 steps of the tiny model on the small corpus.
FLOW_TRAIN = {"steps": 80, "global_batch": 8, "micro_batch": 4, "warmup_steps": 8, "lr": 0.005, "eval_every": 40,
              "eval_batches": 8, "log_every": 20, "save_every": 40}


@dataclasses.dataclass(frozen=True)
class FlowRun:
    state: object  # the pretrain flow run's final Prefect state
    spec_path: Path
    runs_dir: Path


@pytest.fixture(scope="session")
def pretrained_by_flow(prefect_server, small_corpus, tmp_path_factory) -> FlowRun:
    """The pretrain flow once, from cold, on the small corpus: its data flow builds every stage, then it trains
    FLOW_TRAIN. The pretrain-flow test checks this run; the pipeline test starts from it (same spec, training
    settings and runs folder: its data is cached and its pretraining found finished)."""
    from flows.pretrain import pretrain_flow

    root = tmp_path_factory.mktemp("flow")
    spec = small_spec(small_corpus, root / "artifacts", sharding={"seq_len": 64, "validation_fraction": 0.05})
    spec_path = write_spec(root / "spec.yaml", spec)
    state = pretrain_flow(str(spec_path), {"train": FLOW_TRAIN}, runs_dir=str(root / "runs"), return_state=True)
    return FlowRun(state, spec_path, root / "runs")


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Small Hugging Face Llama folders built offline (tests/hf_models.py): llama2-like (sentencepiece, tied
    embeddings, FFN 172) and llama3-like (tokenizer.json, FFN 160). Shared: read them, never change them."""
    from hf_models import llama2_like, llama3_like

    root = tmp_path_factory.mktemp("hf")
    lines = [line for doc in bundled_docs("sotu", 30) for line in doc["text"].split("\n") if line.strip()]
    return {"llama2": llama2_like(root / "llama2", lines), "llama3": llama3_like(root / "llama3", lines)}


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_manifest(small_corpus, tmp_path_factory) -> Path:
    """Real shards (vocab 1000, seq_len 64) from the small corpus, built with the stage functions directly."""
    from tasks.shard import shard_documents
    from tasks.spec import ShardingConfig, TokenizerConfig
    from tasks.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_manifest")
    docs = root / "docs"
    for source in ("sotu", "kjv"):
        (docs / source).mkdir(parents=True)
        lines = (small_corpus / source / "part-0.jsonl").read_text().splitlines()
        with gzip.open(docs / source / "00000.jsonl.gz", "wt") as f:
            f.writelines(line + "\n" for line in lines)
    (root / "tokenizer").mkdir()
    train_tokenizer(docs, TokenizerConfig(vocab_size=1000), 10**9, root / "tokenizer")
    (root / "shard").mkdir()
    shard_documents(docs, root / "tokenizer", ShardingConfig(seq_len=64, validation_fraction=0.05),
                    DataLineage(tokenizer_dir=str(root / "tokenizer")), root / "shard")
    return root / "shard"


# ---------------------------------------------------------------- training under torchrun

def write_job(run_dir: Path, manifest: Path, train: dict | None = None, start: str | None = None,
              **config) -> Path:
    """The run's train_job.json, as the launcher writes it: FAST with `train` on top, the RunConfig fields in
    `config` (parallel, preset, model_overrides), and the checkpoint it starts from (`start`)."""
    from model.run_config import RunConfig, Start, TrainJob

    job = TrainJob(config=RunConfig(**config, train={**FAST, **(train or {})}), manifest=str(manifest),
                   start=Start(kind="checkpoint", checkpoint=str(start)) if start else Start())
    return job.write(Path(run_dir))


def launch_cmd(nproc: int, *args: str, module: str = "model.train") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", module, *args]


def torchrun(nproc: int, *args: str, module: str = "model.train", timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = launch_cmd(nproc, *args, module=module)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def train(nproc: int, run_dir: Path, manifest: Path, **job) -> subprocess.CompletedProcess:
    """model.train on `nproc` gloo ranks, its job written first (`write_job`'s arguments)."""
    return torchrun(nproc, str(write_job(run_dir, manifest, **job)))


def eval_checkpoint(nproc: int, job: Path, checkpoint: Path, *args: str) -> subprocess.CompletedProcess:
    """model.eval_checkpoint on `nproc` gloo ranks with the layout and settings of the job file `job`."""
    return torchrun(nproc, str(job), str(checkpoint), *args, module="model.eval_checkpoint")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag as TensorBoard itself reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def gradient_reduction(stdout: str) -> tuple[float, str, float]:
    """(MiB in the buckets, their dtype, MiB one rank sends per step) from model.train's log at DP > 1."""
    import re

    found = re.search(r"gradient reduction: \d+ bucket\(s\), ([\d.]+) MiB in (\w+); "
                      r"each step sends ([\d.]+) MiB", stdout)
    assert found, "no gradient reduction line"
    return float(found[1]), found[2], float(found[3])


def eval_lines(stdout: str) -> list[dict]:
    """The `EVAL {json}` lines of an eval-only launch."""
    return [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("EVAL ")]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished FAST run of the tiny model on the tiny manifest. Shared: read it, never change it."""

    dir: Path
    stdout: str

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "step-000006"

    def metrics(self) -> list[dict]:
        return metrics(self.dir)


@pytest.fixture(scope="session")
def tp1_run(tiny_manifest, tmp_path_factory) -> TrainedRun:
    """One rank, fp32, the default attention backend (sdpa on CPU)."""
    run_dir = tmp_path_factory.mktemp("tp1_run")
    return TrainedRun(run_dir, train(1, run_dir, tiny_manifest).stdout)


@pytest.fixture(scope="session")
def tp2_run(tiny_manifest, tmp_path_factory) -> TrainedRun:
    """Two ranks at tensor-parallel 2."""
    run_dir = tmp_path_factory.mktemp("tp2_run")
    return TrainedRun(run_dir, train(2, run_dir, tiny_manifest, parallel={"tensor_parallel": 2}).stdout)


def sft_spec(path: Path, **overrides) -> SFTSpec:
    return SFTSpec.model_validate({"name": "t", "sources": [{"name": "chat", "kind": "local", "paths": [str(path)],
                                                            "license": "test"}], **overrides})


@pytest.fixture(scope="session")
def packed_sft_manifest(tiny_manifest, tmp_path_factory) -> tuple[Path, dict]:
    """SFT shards of short chats, several packed per row (validation rows too), with the tiny tokenizer:
    (manifest directory, build summary)."""
    from tasks.lib.sources import resolve_source
    from tasks.sft_data import build_sft_shards

    root = tmp_path_factory.mktemp("packed_sft")
    chats = [{"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                           {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]}
             for a in range(10) for b in range(10)]
    spec = sft_spec(write_jsonl(root / "sft.jsonl", chats), validation_fraction=0.3)
    (root / "shards").mkdir()
    summary = build_sft_shards([resolve_source(s) for s in spec.sources], spec, tiny_manifest.parent / "tokenizer",
                               64, root / "shards", root / "downloads")
    return root / "shards", summary


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). Tests that read the same
# session runs, or the same costly module fixture, go to the same worker, so each is still made once (the first
# group a test's fixtures name decides). A Prefect server alone is cheap: each worker starts its own when it needs one.
SHARED_GROUPS = {"training-runs": {"tp1_run", "tp2_run", "tp1_evaluations"},
                 "pretrained-by-flow": {"pretrained_by_flow"},
                 "hf-models": {"hf_models"},  # test_import_hf.py, test_quantize.py
                 "fp16-run": {"fp16_run"},  # test_precision.py
                 "qat-runs": {"qat_runs"},  # test_qat.py
                 "executors": {"tokenizer_dir", "local_result"}}  # test_executors.py


def pytest_itemcollected(item):  # as each test is collected, before xdist reads the groups off the marks
    for group, fixtures in SHARED_GROUPS.items():
        if fixtures & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group(group))
            break


EVAL_LAYOUTS = {"tp1": (1, {}), "tp2": (2, {"tensor_parallel": 2}), "pp2": (2, {"pipeline_parallel": 2})}


@pytest.fixture(scope="session")
def tp1_evaluations(tp1_run, tiny_manifest, packed_sft_manifest, tmp_path_factory) -> dict[tuple, dict]:
    """The TP-1 run's last checkpoint evaluated at TP 1, TP 2 and PP 2, with sdpa and local attention, on the
    pretraining and the packed SFT manifest: one eval-only launch per layout.
    {(layout, backend, "pretrain" | "sft"): its EVAL record}"""
    manifests = {str(tiny_manifest): "pretrain", str(packed_sft_manifest[0]): "sft"}
    results = {}
    for layout, (nproc, parallel) in EVAL_LAYOUTS.items():
        job = write_job(tmp_path_factory.mktemp("eval"), tiny_manifest, parallel=parallel)
        proc = eval_checkpoint(nproc, job, tp1_run.checkpoint, "--manifests", *manifests, "--backends", "sdpa",
                               "local")
        for record in eval_lines(proc.stdout):
            results[layout, record["attention_backend"], manifests[record["manifest"]]] = record
    return results
