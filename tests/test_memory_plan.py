"""The memory planner: its arithmetic, and the layout the pretrain/7b deployment ships with."""

from __future__ import annotations


import pytest
import yaml

from model.config import llama2_7b, tiny
from model.memory_plan import GIB, RUNTIME_OVERHEAD_GIB, Layout, estimate, main, recommend
from tasks.lib.manifest import ShardManifest
from tasks.spec import PROJECT_ROOT

from conftest import train


def deployment(name: str) -> dict:
    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)["parameters"]


def test_pretrain_7b_deployment_layout_fits_80gib_h100s():
    run = deployment("7b")["run"]
    settings, parallel = run["train"], run["parallel"]
    tp, pp = parallel["tensor_parallel"], parallel["pipeline_parallel"]
    layout = Layout(tp=tp, pp=pp, dp=run["launch"]["nproc"] // (tp * pp), micro_batch=settings["micro_batch"],
                    recompute=settings["recompute_activations"], distributed_optimizer=True)
    e = estimate(llama2_7b(), layout, global_batch=settings["global_batch"])
    assert e.total < (80 - RUNTIME_OVERHEAD_GIB["gpu"]) * GIB, e.total / GIB
    # Sanity of the pieces: bf16 weights of a TP-2 shard of 6.74B parameters are ~6.3 GiB.
    assert 6.0 < e.weights / GIB < 6.6


def test_estimate_responds_to_each_knob():
    m = llama2_7b()
    base = Layout(tp=1, pp=1, dp=8, micro_batch=1, recompute=False, distributed_optimizer=False)
    e = estimate(m, base, 256)
    assert estimate(m, Layout(2, 1, 4, 1, False, False), 256).weights == e.weights / 2
    assert estimate(m, Layout(1, 1, 8, 1, False, True), 256).optimizer == e.optimizer / 8
    assert estimate(m, Layout(1, 1, 8, 1, True, False), 256).activations < e.activations / 10
    assert estimate(m, Layout(1, 1, 8, 2, False, False), 256).activations == 2 * e.activations
    # The interleaved schedule keeps more micro-batches in flight on the first rank (a smaller bubble, not memory):
    # PP 4, 8 layers a stage = 1F1B's 4 in flight x 8 layers, against 2 chunks of 4 layers x 11 chunk forwards.
    plain = estimate(m, Layout(1, 4, 2, 1, False, False), 256).activations
    interleaved = estimate(m, Layout(1, 4, 2, 1, False, False, virtual_pipeline=2), 256).activations
    assert interleaved / plain == pytest.approx((4 * 11 + 1) / (8 * 4 + 1))


def test_recommendation_fits_and_one_gpu_cannot_hold_7b(capsys):
    best, _ = recommend(llama2_7b(), gpus=8, gpu_mem_gib=80, global_batch=256)
    assert best is not None and best.total < 78 * GIB
    assert recommend(llama2_7b(), gpus=1, gpu_mem_gib=80, global_batch=256)[0] is None
    main(["--preset", "7b", "--gpus", "8", "--gpu-mem-gib", "80"])
    assert "recommended: TP" in capsys.readouterr().out


def measured_peak_gib(manifest, run_dir, micro_batch: int, overrides: dict, attention: str) -> float:
    """Peak training memory of a one-process CPU run, as model.train reports it (peak RSS growth since the
    model was built), after a few steps and a validation pass."""
    out = train(1, run_dir, manifest, model_overrides=overrides,
                train={"steps": 3, "warmup_steps": 1, "global_batch": micro_batch, "micro_batch": micro_batch,
                       "log_every": 1, "eval_every": 3, "eval_batches": 1, "save_every": 100,
                       "attention_backend": attention})
    return max(float(word.split("=")[1]) for line in out.stdout.splitlines() for word in line.split()
               if word.startswith("peak_mem_gib="))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "local"])
def test_estimate_matches_measured_peak_memory_on_cpu(tiny_manifest, tmp_path, attention):
    """The planner's fp32 estimate plus its CPU runtime allowance is within 30% of the measured peak, at a
    micro-batch where model state dominates and at one where activations do, and so is the difference
    between the two (which isolates the activation model from the fixed terms)."""
    manifest = ShardManifest.load(tiny_manifest)
    # Wider than the tiny preset so that model state and activations dwarf the fixed runtime allowance.
    overrides = {"hidden_size": 512, "ffn_hidden_size": 1408, "num_attention_heads": 8}
    model = tiny(vocab_size=manifest.vocab_size, seq_len=manifest.seq_len, **overrides)
    rows = {}
    for micro_batch in (1, 32):
        layout = Layout(tp=1, pp=1, dp=1, micro_batch=micro_batch, recompute=False, distributed_optimizer=False)
        planned = (estimate(model, layout, micro_batch, precision="fp32", attention=attention).total / GIB
                   + RUNTIME_OVERHEAD_GIB["cpu"])
        rows[micro_batch] = planned, measured_peak_gib(tiny_manifest, tmp_path / str(micro_batch), micro_batch,
                                                       overrides, attention)
    print({mb: f"planned {p:.3f} GiB, measured {m:.3f} GiB" for mb, (p, m) in rows.items()})
    for planned, measured in rows.values():
        assert abs(planned - measured) <= 0.3 * measured
    planned_growth, measured_growth = rows[32][0] - rows[1][0], rows[32][1] - rows[1][1]
    assert abs(planned_growth - measured_growth) <= 0.3 * measured_growth
