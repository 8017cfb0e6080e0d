"""The whole pipeline on a real Prefect server: data -> pretrain -> SFT -> evaluation report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.pipeline import pipeline_flow
from tasks.lineage import lineage
from tasks.spec import EvalSpec, load_spec

from conftest import FLOW_TRAIN

pytestmark = pytest.mark.usefixtures("prefect_server")
SFT = {"steps": 30, "global_batch": 8, "micro_batch": 4, "warmup_steps": 3, "eval_every": 15, "save_every": 15}


@pytest.mark.slow
def test_pipeline_pretrains_tunes_and_reports(pretrained_by_flow, tmp_path):
    """The pipeline with the pretrain flow test's spec and training settings: its data and pretraining are that
    run's (cached, and found finished), then instruction tuning and evaluation run."""
    plan = pipeline_flow(str(pretrained_by_flow.spec_path), plan=True).splitlines()
    assert len(plan) == 1 and " reuse " in plan[0] and plan[0].endswith("no new files since manifest version 1")
    # SFT with quantization-aware training on the int4-g32 grid; both exports quantized in int4-g32 (the tuned
    # one's own QAT scheme, which it would get unasked: once).
    state = pipeline_flow(str(pretrained_by_flow.spec_path), pretrain={"train": FLOW_TRAIN},
                          sft={"train": {**SFT, "qat": "int4-g32"}}, runs_dir=str(pretrained_by_flow.runs_dir),
                          reports_dir=str(tmp_path / "reports"), quantize=["int4-g32"], return_state=True)
    assert state.is_completed(), state
    report = Path(state.result())
    results = json.loads((report / "results.json").read_text())
    assert Path(results["checkpoints"]["pretrained"]).parents[1] == Path(pretrained_by_flow.state.result())
    pre, tuned = results["results"]["pretrained"], results["results"]["instruction-tuned"]
    # The tuned checkpoint was initialised from the pretrained one.
    tuned_state = json.loads((Path(results["checkpoints"]["instruction-tuned"]) / "train_state.json").read_text())
    assert tuned_state["start"] == {"kind": "checkpoint", "checkpoint": results["checkpoints"]["pretrained"]}
    assert tuned_state["optimizer"]["betas"] == [0.9, 0.95] and tuned_state["step_offset"] == 80
    assert tuned_state["qat"] == "int4-g32"
    # Instruction tuning made held-out replies far more likely; both models still model the pretraining text.
    assert tuned["sft_validation"]["loss"] < pre["sft_validation"]["loss"] - 0.5
    assert math.isfinite(pre["validation"]["perplexity"]) and pre["validation"]["tokens"] > 1000
    # The civics set was scored by lm-evaluation-harness, as a local task written from the eval spec.
    civics = pre["lm_eval"]["tasks"]["civics"]
    # Scores of 84 items: a whole number of them right, with the standard error of that mean.
    assert civics["items"] == 84
    for metric in ("acc", "acc_norm"):
        p = civics[metric]
        assert p * 84 == pytest.approx(round(p * 84), abs=1e-6), (metric, p)
        assert civics[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 83), rel=1e-6)
    assert results["benchmarks"]["civics"]["chance"] == pytest.approx(0.2639, abs=1e-3)
    assert pre["lm_eval"]["version"].startswith("0.4.") and (tmp_path / "reports/lm_eval_tasks/eval_default/civics.yaml").is_file()
    # Both models answered the eval spec's prompts, in order; tuning changed what the model says.
    prompts = load_spec("data_specs/eval_default.yaml", EvalSpec).prompts
    assert [g["prompt"] for g in tuned["generations"]] == [g["prompt"] for g in pre["generations"]] == prompts
    assert any(t["greedy"] != p["greedy"] for t, p in zip(tuned["generations"], pre["generations"]))
    markdown = (report / "report.md").read_text()
    assert "| civics acc (84 items; chance 0.264) | " in markdown and " ± " in markdown
    assert "Scored by lm-evaluation-harness 0.4." in markdown and "instruction-tuned, greedy" in markdown
    # Lineage of the tuned checkpoint reaches back through the pretrained one to the corpus files.
    info = lineage(results["checkpoints"]["instruction-tuned"])
    assert info["manifest"]["mixture"] == {"sft": 1.0}
    pretrained = info["initialised_from"]
    assert pretrained["checkpoint"] == results["checkpoints"]["pretrained"]
    assert pretrained["start"] == "scratch" and "initialised_from" not in pretrained
    assert set(pretrained["source_files"]) == {"sotu", "kjv"} and pretrained["settings"]["decontamination"]["n_grams"] == 13
    # Each quantized variant was scored on the same items as its original, and compared with it.
    assert results["quantized"] == {f"{label} int4-g32": {"original": label, "scheme": "int4-g32"}
                                    for label in ("pretrained", "instruction-tuned")}
    for variant, about in results["quantized"].items():
        mine, original = results["results"][variant], results["results"][about["original"]]
        assert Path(mine["model"]).parent.name == "quantized" and mine["lm_eval"]["tasks"]["civics"]["items"] == 84
        assert mine["validation"]["tokens"] == original["validation"]["tokens"]
        assert [g["prompt"] for g in mine["generations"]] == prompts
        assert mine["footprint"]["weight_bytes"] < original["footprint"]["weight_bytes"]
        assert mine["footprint"]["load_peak_rss"] > 100e6 and mine["footprint"]["generation_tokens_per_s"] > 0
        # int4-g32 moves the held-out loss, by less than 0.5 nats.
        change = mine["validation"]["loss"] - original["validation"]["loss"]
        assert change != 0 and abs(change) < 0.5, (variant, change)
        assert f"**{variant}** ({about['scheme']}): validation perplexity" in markdown
    assert "int4-g32 stores int4 values (-8..7) kept one per byte in int8 storage" in markdown
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["evaluation-report", "evaluation-metrics", "sft-loss-curve", "quantization"])))}
    assert keys == {"evaluation-report", "evaluation-metrics", "sft-loss-curve", "quantization"}
