"""The pretrain flow on a real Prefect server: data -> torchrun -> Megatron-Core, with artifacts and failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                            LogFilter, LogFilterFlowRunId)
from prefect.logging.handlers import APILogWorker

from flows.pretrain import pretrain_flow
from model.run_config import RunConfig, TrainJob
from tasks.lib.supervise import run_training

from conftest import FLOW_TRAIN

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.slow
def test_pretrain_flow_learns_and_publishes(pretrained_by_flow):
    state, spec_path, runs_dir = pretrained_by_flow.state, pretrained_by_flow.spec_path, pretrained_by_flow.runs_dir
    assert state.is_completed(), state
    run_dir = Path(state.result())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 80
    # Learning: clearly below the loss of the best context-free (unigram) model of the same tokens.
    assert summary["final_val_loss"] < summary["unigram_entropy"] - 0.3, summary
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-metrics", "pretrain-loss-curve",
                                                                       "pretrain-progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"pretrain-metrics", "pretrain-loss-curve", "pretrain-progress"}
    assert by_key["pretrain-progress"].data == 100.0  # followed rank 0's steps to the end

    # The terminal: `prefect deployment run ... --watch` streams the root flow run's logs, and the data stages
    # run in a child flow; their start and end lines and the training steps must be among the root's logs.
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        root_logs = [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))]
    assert any(m.startswith("plan: 8 of 8 stages to build\n") for m in root_logs)  # said before building
    for stage in ("download-sotu", "clean-kjv", "dedup", "tokenizer", "shard"):
        assert f"> {stage}: started" in root_logs, stage
        assert any(m.startswith(f"< {stage}: built; ") for m in root_logs), stage
    steps = [m for m in root_logs if m.startswith("step=")]
    assert steps[0].startswith("step=20/80 loss=") and " tokens_per_s=" in steps[0] and " eta=" in steps[0]
    assert steps[-1].startswith("step=80/80 ") and any(m.startswith(f"pretrain: {run_dir} finished") for m in root_logs)

    # Same inputs again: the finished run is found and nothing retrains (data cached, training at its last step).
    started = time.perf_counter()
    again = pretrain_flow(str(spec_path), RunConfig(train=FLOW_TRAIN), runs_dir=str(runs_dir))
    assert again == str(run_dir)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 80
    assert time.perf_counter() - started < 60


def test_a_finished_run_returns_at_once_without_launching(pretrained_by_flow, monkeypatch):
    """The pretrain task on a run that finished: its directory back in well under 5 s, nothing launched (any
    process start fails this test) and no file of the run rewritten."""
    import subprocess

    from model.checkpoint import read_train_state, resolve_checkpoint
    from tasks.prefect_tasks import pretrain

    run_dir = Path(pretrained_by_flow.state.result())
    manifest = Path(read_train_state(resolve_checkpoint(run_dir))["manifest"]) / "manifest.json"
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    def no_launch(*args, **kwargs):
        raise AssertionError(f"launched {args[0]}")

    monkeypatch.setattr(subprocess, "Popen", no_launch)
    started = time.perf_counter()
    returned = pretrain.fn(str(manifest), RunConfig(train=FLOW_TRAIN), str(pretrained_by_flow.runs_dir))
    seconds = time.perf_counter() - started
    print(f"a finished run returned in {seconds:.3f} s")
    assert returned == str(run_dir) and seconds < 5
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == files


def test_adam_betas_set_by_a_deployment_reach_the_optimizer(pretrained_by_flow, tmp_path):
    """Every TrainConfig field travels in the run's train_job.json, adam_betas included: a deployment's value is the
    one the Megatron optimizer steps with (its param groups, recorded in the checkpoint's train state)."""
    from model.checkpoint import read_train_state, resolve_checkpoint

    # As a deployment passes it: JSON, validated into RunConfig by Prefect when the flow starts.
    run = {"train": {**FLOW_TRAIN, "steps": 2, "warmup_steps": 1, "eval_every": 2, "save_every": 2,
                     "adam_betas": [0.8, 0.99]}}
    run_dir = Path(pretrain_flow(str(pretrained_by_flow.spec_path), run, runs_dir=str(tmp_path / "runs")))
    state = read_train_state(resolve_checkpoint(run_dir))
    assert state["optimizer"]["betas"] == [0.8, 0.99]
    job = json.loads((run_dir / "train_job.json").read_text())
    assert job["config"]["train"]["adam_betas"] == [0.8, 0.99]
    default = read_train_state(resolve_checkpoint(pretrained_by_flow.state.result()))
    assert default["optimizer"]["betas"] == [0.9, 0.95]


def test_server_streams_run_logs_for_watch():
    """`prefect deployment run ... --watch` subscribes to the run's logs over a websocket, which the server
    serves only with these settings (prefect.toml); without them the terminal shows events and no progress."""
    from prefect.settings import get_current_settings

    logs = get_current_settings().server.logs
    assert logs.stream_out_enabled and logs.stream_publishing_enabled


def test_7b_without_gpus_fails_fast_saying_what_it_needs(tmp_path):
    started = time.perf_counter()
    run = {"preset": "7b", "parallel": {"tensor_parallel": 2}, "launch": {"nproc": 8, "gpus_required": True}}
    state = pretrain_flow("data_specs/llama7b_smoke.yaml", run, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=r"8 GPUs \(TP 2 x PP 1 x DP 4\), but this machine has 0 CUDA"):
        state.result()
    assert time.perf_counter() - started < 30  # failed before any data work
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run,message", [
    ({"train": {"steps": 10, "warmup_steps": 50}}, r"warmup_steps \(50\) must be below steps \(10\)"),
    ({"train": {"stepz": 10}}, r"run\.train\.stepz: Extra inputs are not permitted"),
    ({"train": {"adam_betas": [0.9]}}, r"run\.train\.adam_betas\.1: Field required"),
    ({"parallel": {"tp": 2}}, r"run\.parallel\.tp: Unexpected keyword argument"),
    ({"model_overrides": {"layers": 4}}, r"model_overrides: .*unexpected keyword argument 'layers'"),
])
def test_bad_run_settings_fail_before_any_data_work(tmp_path, run, message):
    """A deployment's `run` is validated as RunConfig when the flow starts: the error names the field."""
    from prefect.exceptions import ParameterTypeError

    started = time.perf_counter()
    state = pretrain_flow("data_specs/default.yaml", run, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ParameterTypeError, match=message):
        state.result()
    assert time.perf_counter() - started < 30 and not (tmp_path / "runs").exists()


def test_rank_failure_reports_that_ranks_traceback(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text('{"vocab_size": 1000, "seq_len": 64}')
    with pytest.raises(RuntimeError, match=r"(?s)training failed on rank \d.*Traceback.*validation errors for "
                                           r"ShardManifest\nrow_len\n  Field required.*All ranks"):
        run_training(TrainJob(config=RunConfig(launch={"nproc": 2}, train={"steps": 2, "warmup_steps": 1}),
                              manifest=str(tmp_path / "shards")), tmp_path / "run")
    assert "training failed" in (tmp_path / "run" / "ranks.log").read_text()

