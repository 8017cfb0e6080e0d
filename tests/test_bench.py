"""bench/gpu.py: its planning on the 7B width, and its --tiny mode run end to end on CPU."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from bench.gpu import plan, planned_gib
from model.config import llama2_7b
from test_model import ROOT


def test_benchmark_fits_the_most_7b_width_layers_the_planner_allows():
    """On an 80 GiB GPU planned to 85%: the layer count fits with Adam states and one more layer would not; the
    unfused local attention (s x s scores) fits fewer."""
    budget = 80 * 0.85
    m, micro, planned = plan(llama2_7b(num_layers=1), budget, 32, 8, bf16=True, attention="sdpa")
    one_more = dataclasses.replace(m, num_layers=m.num_layers + 1)
    assert planned <= budget < planned_gib(one_more, 1, 8, bf16=True, attention="sdpa")
    assert 8 <= m.num_layers < 32 and micro >= 1
    local, _, _ = plan(llama2_7b(num_layers=1), budget, 32, 8, bf16=True, attention="local")
    assert local.num_layers < m.num_layers


@pytest.mark.slow
def test_tiny_mode_runs_every_backend_and_the_plain_baseline(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["model"]["hidden_size"] == 128 and results["model"]["num_layers"] == 2
    for backend in ("sdpa", "local"):
        r = results["megatron"][backend]
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["planned_gib"] > 0, backend
        assert 0 <= r["data_wait"] < 0.5
        assert f"Megatron-Core, {backend} attention" in proc.stdout
    assert results["plain"]["tokens_per_s"] > 0
    assert "plain PyTorch" in proc.stdout and "vs plain" in proc.stdout
