"""bench/gpu.py: its planning on the 7B width, and its --tiny mode run end to end on CPU. bench/scale.py: its
synthetic corpus."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys

import pytest

from bench.gpu import plan, planned_gib
from bench.scale import generate_corpus
from model.config import llama2_7b
from conftest import ROOT


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
def test_tiny_mode_runs_each_precision_layout_and_the_plain_baseline(tmp_path):
    """--tiny on CPU: the sdpa backend (tests/test_attention.py checks the local one against it), fp16, fp8's
    refusal, and with --ranks 2 the TP 2 and PP 2 layouts without and with sequence parallelism and the interleaved
    schedule on gloo ranks, each against the planner."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--ranks", "2", "--backends", "sdpa",
                           "--steps", "5", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["model"]["hidden_size"] == 128 and results["model"]["num_layers"] == 2
    r = results["megatron"]["sdpa"]
    assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["planned_gib"] > 0
    assert 0 <= r["data_wait"] < 0.5 and "Megatron-Core, sdpa attention" in proc.stdout
    parallel = results["parallel"]
    assert set(parallel) == {"TP 2", "TP 2, sequence parallel", "PP 2", "PP 2, interleaved x 2"}
    for name, r in parallel.items():
        assert r["tokens_per_s"] > 0 and r["dp"] == 1, name
        # the planner within 50% of rank 0's measured peak on these 0.1 GiB runs (tests/test_plan.py is tighter)
        assert 0.5 < r["planned_gib"] / r["peak_mem_gib"] < 1.5, (name, r)
    assert parallel["PP 2, interleaved x 2"]["layout"] == {"pipeline_parallel": 2, "virtual_pipeline": 2}
    assert "layouts on 2 ranks: 4 layers" in proc.stdout and "vs without" in proc.stdout
    fp16 = results["precisions"]["fp16"]  # the fp16 path (loss scaler) on CPU, its MFU against fp16's peak
    assert fp16["tokens_per_s"] > 0 and fp16["skipped_steps"] == 0 and "sdpa, fp16" in proc.stdout
    assert "fp8: not run: precision fp8 needs a GPU" in " ".join(proc.stdout.split())
    assert results["plain"]["tokens_per_s"] > 0
    assert "plain PyTorch" in proc.stdout and "vs plain" in proc.stdout


def test_scale_corpus_is_deterministic_with_the_planted_duplicates_it_reports(tmp_path):
    def corpus(name: str, seed: int) -> tuple[dict, dict[str, str], list[dict]]:
        info = generate_corpus(tmp_path / name, 1, seed)
        docs = {d["id"]: d["text"] for f in sorted((tmp_path / name / "docs").glob("*.jsonl.gz"))
                for d in map(json.loads, gzip.open(f, "rt"))}
        planted = [json.loads(line) for f in sorted((tmp_path / name).glob("planted-*.jsonl"))
                   for line in f.read_text().splitlines()]
        return info, docs, planted

    info, docs, planted = corpus("a", seed=3)
    assert corpus("b", seed=3)[1] == docs and corpus("c", seed=4)[1] != docs
    assert len(docs) == info["unique_docs"] + info["exact_dups"] + info["near_dups"]
    assert abs(sum(len(t.encode()) for t in docs.values()) / 1e6 - 1) < 0.2 and info["exact_dups"] > 5
    for p in planted:
        words, original = docs[p["id"]].split(), docs[p["of"]].split()
        if p["kind"] == "exact":
            assert docs[p["id"]] == docs[p["of"]]
        else:
            changed = sum(a != b for a, b in zip(words, original)) / len(original)
            assert len(words) == len(original) and changed <= 0.15
