"""The memory planner: its arithmetic, and the layout the pretrain/7b deployment ships with."""

from __future__ import annotations

import yaml

from model.config import llama2_7b
from model.plan import GIB, RUNTIME_OVERHEAD_GIB, Layout, estimate, main, recommend
from tasks.spec import PROJECT_ROOT


def deployment(name: str) -> dict:
    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)["parameters"]


def test_pretrain_7b_deployment_layout_fits_80gib_h100s():
    params = deployment("7b")
    train = params["train"]
    tp, pp, nproc = params["tp"], params["pp"], params["nproc"]
    layout = Layout(tp=tp, pp=pp, dp=nproc // (tp * pp), micro_batch=train["micro_batch"],
                    recompute=train["recompute_activations"], distributed_optimizer=True)
    e = estimate(llama2_7b(), layout, global_batch=train["global_batch"])
    assert e.total < (80 - RUNTIME_OVERHEAD_GIB) * GIB, e.total / GIB
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


def test_recommendation_fits_and_one_gpu_cannot_hold_7b(capsys):
    best, _ = recommend(llama2_7b(), gpus=8, gpu_mem_gib=80, global_batch=256)
    assert best is not None and best.total < 78 * GIB
    assert recommend(llama2_7b(), gpus=1, gpu_mem_gib=80, global_batch=256)[0] is None
    main(["--preset", "7b", "--gpus", "8", "--gpu-mem-gib", "80"])
    assert "recommended: TP" in capsys.readouterr().out
