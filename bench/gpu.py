"""One-GPU benchmark of the 7B-width decoder: `model.train`'s real loop per attention backend vs plain PyTorch.

Shape: hidden 4096, 32 heads, FFN 11008, seq 4096, vocab 32000 (Llama-2-7B's width), with as many layers as the
memory planner (`model.memory_plan`) fits on this GPU alongside the Adam states, at TP 1 x PP 1 x DP 1, no recompute,
micro-batch chosen by the planner. `model.train` runs with the GPU defaults (bf16, distributed optimizer,
overlapped gradient reduction and parameter gather) on synthetic token rows (throughput does not depend on the
text). For each attention backend available (te with Transformer Engine, sdpa, local) it prints tokens/s, MFU,
peak memory against the planner's estimate and the data-wait share; then each other precision the device can run
with the first backend (fp16 with its loss scaler; bf16 on GPU; fp8 with Transformer Engine on an fp8 GPU, else
why not), MFU against that precision's peak. Given more than one GPU (`--ranks`, default all of them), it then
compares the layouts that only exist across GPUs, with the layer count rounded to a multiple of 4: TP 2 without and
with sequence parallelism, and PP 2 without and with the interleaved schedule (2 chunks per rank), the other ranks
data parallel. Last, a plain-PyTorch Llama of the same shape (SDPA attention, fp32 weights under bf16 autocast,
fused AdamW) in the same run, and the ratio. `--tiny` runs fp32 and fp16 on CPU (and, with `--ranks 2`, the
layout comparisons on gloo ranks).

    python bench/gpu.py                  # on a GPU (about 5 minutes on an H100)
    python bench/gpu.py --tiny           # the same code on CPU with a tiny width, in under a minute
    python bench/gpu.py --tiny --ranks 2 # and TP 2 / PP 2 with and without SP / VPP on 2 gloo ranks (--pairs)

Goals (docs/performance.md): MFU >= 45% (bf16 dense peak: 989 TFLOP/s on H100/H200), >= 1.0x the plain model,
data wait < 1%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench.train import mean_tokens_per_s, model_train_records, plain_training, steady  # noqa: E402
from model.config import ModelConfig, llama2_7b, tiny  # noqa: E402
from model.data import TrainSamples  # noqa: E402
from model.gpt import check_fp8_available, resolve_attention_backend  # noqa: E402
from model.memory_plan import GIB, RUNTIME_OVERHEAD_GIB, Layout, estimate  # noqa: E402
from model.metrics import PEAK_BY_PRECISION, PEAK_TFLOPS, flops_per_token  # noqa: E402
from tasks.lib.artifacts import sha256_file  # noqa: E402
from tasks.lib.manifest import DataLineage, ShardInfo, ShardManifest  # noqa: E402


def synthetic_manifest(out: Path, m: ModelConfig, rows: int) -> Path:
    """A shard directory of uniformly random token rows (seq_len + 1 tokens each): Parquet shards and their
    ShardManifest, with no tokenizer (the ids are random)."""
    row_len = m.seq_len + 1
    rng = np.random.default_rng(0)
    shards = []
    for split, count in (("train", rows), ("valid", 16)):
        path = out / split / "synthetic" / "shard-00000.parquet"
        path.parent.mkdir(parents=True)
        tokens = rng.integers(3, m.vocab_size, size=count * row_len, dtype=np.int32)
        pq.write_table(pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), row_len)}), path,
                       row_group_size=64)
        shards.append(ShardInfo(path=str(path.relative_to(out)), split=split, source="synthetic", rows=count,
                                tokens=count * row_len, sha256=sha256_file(path), row_group_rows=64))
    manifest = ShardManifest(seq_len=m.seq_len, row_len=row_len, vocab_size=m.vocab_size, eos_id=2,
                             tokenizer_sha256="none: random ids", mixture={"synthetic": 1.0}, shards=shards,
                             totals={"rows_train": rows, "rows_valid": 16}, lineage=DataLineage())
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    return out


def fit_layers(width: ModelConfig, budget_gib: float, max_layers: int, accumulation: int, bf16: bool,
         attention: str) -> tuple[ModelConfig, int, float] | None:
    """(model with the most layers that fit at micro-batch 1, the largest micro-batch that then fits, its
    estimate in GiB including the runtime allowance), or None if not even one layer fits."""
    fitting = [n for n in range(1, max_layers + 1)
               if planned_gib(dataclasses.replace(width, num_layers=n), 1, accumulation, bf16, attention) <= budget_gib]
    if not fitting:
        return None
    m = dataclasses.replace(width, num_layers=max(fitting))
    micro = max(b for b in (1, 2, 4, 8) if b == 1 or planned_gib(m, b, accumulation, bf16, attention) <= budget_gib)
    return m, micro, planned_gib(m, micro, accumulation, bf16, attention)


# The layouts compared on more than one rank, in pairs: without and with a feature, each as (name, ParallelConfig
# fields); the ranks beyond TP x PP are data parallel.
# Each feature beside the same layout without it, by the name --pairs takes.
PARALLEL_PAIRS = {"sp": (("TP 2", {"tensor_parallel": 2, "sequence_parallel": False}),
                         ("TP 2, sequence parallel", {"tensor_parallel": 2, "sequence_parallel": True})),
                  "vpp": (("PP 2", {"pipeline_parallel": 2}),
                          ("PP 2, interleaved x 2", {"pipeline_parallel": 2, "virtual_pipeline": 2}))}


def planned_gib(m: ModelConfig, micro: int, accumulation: int, bf16: bool, attention: str,
                precision: str | None = None, layout: Layout | None = None) -> float:
    """The planner's per-device estimate (GiB, runtime allowance included) of one run, at TP 1 x PP 1 x DP 1 unless
    `layout` is given, with `accumulation` micro-batches per data-parallel rank; `precision` defaults to bf16 when
    `bf16` (the GPU default), else fp32."""
    runtime = RUNTIME_OVERHEAD_GIB["gpu" if torch.cuda.is_available() else "cpu"]
    layout = layout or Layout(tp=1, pp=1, dp=1, micro_batch=micro, recompute=False, distributed_optimizer=bf16)
    return estimate(m, layout, micro * accumulation * layout.dp, precision=precision or ("bf16" if bf16 else "fp32"),
                    attention=attention).total / GIB + runtime


def planner_layout(fields: dict, ranks: int, micro: int, distributed_optimizer: bool) -> Layout:
    """The planner's Layout for one of PARALLEL_PAIRS' layouts on `ranks` ranks."""
    tp, pp = fields.get("tensor_parallel", 1), fields.get("pipeline_parallel", 1)
    return Layout(tp=tp, pp=pp, dp=ranks // (tp * pp), micro_batch=micro, recompute=False,
                  distributed_optimizer=distributed_optimizer,
                  sequence_parallel=fields.get("sequence_parallel", tp > 1),
                  virtual_pipeline=fields.get("virtual_pipeline"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny width (hidden 128, seq 128, vocab 1000), e.g. on CPU")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 12; tiny 6)")
    p.add_argument("--accumulation", type=int, default=None, help="micro-batches per optimizer step (default 8; "
                                                                    "tiny 2)")
    p.add_argument("--memory-fraction", type=float, default=0.85,
                   help="share of the device's memory the planner may fill (the rest is headroom for its error)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="device memory to plan for (default: the GPU's; on CPU: 0.2)")
    p.add_argument("--max-layers", type=int, default=None, help="default: the 7B preset's 32 (tiny: 2)")
    p.add_argument("--backends", default=None, help="comma-separated attention backends (default: all available)")
    p.add_argument("--ranks", type=int, default=None,
                   help="ranks for the TP 2 / PP 2 layout comparisons, an even number (default: the GPUs present, "
                        "so none on one GPU or on CPU; on CPU they are gloo ranks)")
    p.add_argument("--pairs", default=",".join(PARALLEL_PAIRS),
                   help="with --ranks: the layout pairs to compare, comma-separated: sp (TP 2 without and with "
                        "sequence parallelism), vpp (PP 2 without and with the interleaved schedule)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="this device's dense bf16 peak, for MFU (default: a known GPU's; none on CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    width = tiny(num_layers=1, seq_len=128, vocab_size=1000) if args.tiny else llama2_7b(num_layers=1)
    steps = args.steps or (6 if args.tiny else 12)
    accumulation = args.accumulation or (2 if args.tiny else 8)
    max_layers = args.max_layers or (2 if args.tiny else 32)
    device_name = torch.cuda.get_device_name() if gpu else "CPU"
    memory = args.memory_gib or (torch.cuda.get_device_properties(0).total_memory / GIB if gpu else 0.2)
    budget = memory * args.memory_fraction
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    te = resolve_attention_backend("auto") == "te"  # Transformer Engine imports and CUDA is present
    ranks = args.ranks if args.ranks is not None else torch.cuda.device_count()
    if ranks >= 2 and ranks % 2:
        raise SystemExit(f"--ranks {ranks}: the layout comparisons (TP 2, PP 2) need an even number of ranks")
    backends = args.backends.split(",") if args.backends else ["te"] * te + ["sdpa", "local"]
    if unknown := set(args.pairs.split(",")) - set(PARALLEL_PAIRS):
        raise SystemExit(f"--pairs {args.pairs}: unknown {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(PARALLEL_PAIRS)}")
    pairs = [PARALLEL_PAIRS[name] for name in args.pairs.split(",")]

    chosen = fit_layers(width, budget, max_layers, accumulation, bf16=gpu, attention=backends[0])
    if chosen is None:
        raise SystemExit(f"not even one layer of this width fits {budget:.1f} GiB; raise --memory-fraction")
    m, micro, _ = chosen
    global_batch = micro * accumulation
    print(f"{'tiny' if args.tiny else '7B'}-width decoder on {device_name} ({memory:.1f} GiB, planning for "
          f"{budget:.1f}): hidden {m.hidden_size}, {m.num_attention_heads} heads, FFN {m.ffn_hidden_size}, "
          f"seq {m.seq_len}, vocab {m.vocab_size}")
    print(f"planner ({backends[0]}): {m.num_layers} layers ({m.num_parameters() / 1e6:,.1f}M parameters) at "
          f"micro-batch {micro}, TP 1 x PP 1 x DP 1, no recompute; global batch {global_batch} "
          f"({accumulation} micro-batches) x {m.seq_len} tokens, {steps} steps "
          f"(steps 4 to {steps - 1} timed); {'bf16' if gpu else 'fp32 (CPU)'}", flush=True)

    results = {"device": device_name, "memory_gib": memory, "model": dataclasses.asdict(m), "micro_batch": micro,
               "global_batch": global_batch, "steps": steps, "peak_tflops": peak, "megatron": {}}
    overrides = {k: getattr(m, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")}
    with tempfile.TemporaryDirectory() as work:
        manifest = synthetic_manifest(Path(work) / "shard", m, rows=max(64, global_batch * 4))
        default = "bf16" if gpu else "fp32"

        def measure(backend: str, precision: str, model: ModelConfig = m, fields: dict | None = None,
                    label: str | None = None) -> dict | None:
            """One model.train run, on one rank or in a layout of PARALLEL_PAIRS (`fields`) on `ranks` ranks; its
            figures, or None when it did not run (printed either way)."""
            label = label or f"{backend}, {precision}"
            world = ranks if fields else 1
            layout = planner_layout(fields, world, micro, gpu) if fields else None
            planned = planned_gib(model, micro, accumulation, gpu, backend, precision, layout)
            if planned > budget:
                print(f"  {label:>12}: skipped, the planner needs {planned:.1f} GiB for it (budget {budget:.1f})",
                      flush=True)
                return None
            started = time.perf_counter()
            dp = layout.dp if layout else 1
            try:
                records = model_train_records(
                    manifest, {"steps": steps, "global_batch": micro * accumulation * dp, "micro_batch": micro,
                               # the interleaved schedule evaluates a multiple of PP micro-batches too
                               "eval_batches": 2 if fields else 1,
                               "attention_backend": backend, "precision": precision,
                               # fp16: a scale that fits at once, not 2^32 halved 20 times
                               **({"initial_loss_scale": 1024} if precision == "fp16" else {})},
                    preset="7b" if not args.tiny else "tiny",
                    model_overrides={**overrides, "num_layers": model.num_layers},
                    threads=2 if gpu else max(1, (os.cpu_count() or 2) // world),
                    parallel=fields or {}, ranks=world)
            except RuntimeError as failure:
                print(f"  {label:>12}: failed: {str(failure).strip().splitlines()[-1]}", flush=True)
                return {"failed": str(failure)[-2000:]}
            tps = mean_tokens_per_s(records)
            timed = steady(records)
            rate = peak * PEAK_BY_PRECISION[precision] * world if peak else None
            result = {"tokens_per_s": tps, "mfu": tps * flops_per_token(model) / (rate * 1e12) if rate else None,
                      "peak_mem_gib": max(r["peak_mem_gib"] for r in records), "planned_gib": planned,
                      "data_wait": sum(r["data_wait"] for r in timed) / len(timed),
                      "skipped_steps": records[-1].get("skipped_steps"), "wall_s": time.perf_counter() - started}
            print(f"  {label:>12}: {line(result)}", flush=True)
            return result

        rows = []
        for backend in backends:  # every attention backend at the device's default precision
            result = measure(backend, default)
            if result is not None:
                results["megatron"][backend] = result
                if "failed" not in result:
                    rows.append((f"Megatron-Core, {backend} attention", result))
        # every other precision this device can run, with the first backend: fp16 everywhere (CPU included, which
        # has no bf16 matmul speed), bf16 on GPU, fp8 where Transformer Engine and an fp8 GPU are present
        results["precisions"] = {}
        for precision in [p for p in ("bf16", "fp16", "fp8") if p != default]:
            if precision == "bf16" and not gpu:
                continue
            if precision == "fp8":
                try:
                    check_fp8_available()
                except ValueError as why:
                    print(f"  {'fp8':>12}: not run: {why}", flush=True)
                    results["precisions"]["fp8"] = {"not_run": str(why)}
                    continue
            result = measure(backends[0], precision)
            if result is not None:
                results["precisions"][precision] = result
                if "failed" not in result:
                    rows.append((f"Megatron-Core, {backends[0]}, {precision}", result))

        # Layouts across ranks, each pair at the same model (layers a multiple of PP x VPP = 4) and the same
        # micro-batches per data-parallel rank; peak memory is rank 0's (PP: the first stage, the planner's).
        results["parallel"] = {}
        if ranks >= 2:
            mp = dataclasses.replace(m, num_layers=max(4, m.num_layers // 4 * 4))
            print(f"layouts on {ranks} ranks: {mp.num_layers} layers, micro-batch {micro}, {accumulation} "
                  f"micro-batches per data-parallel rank, {backends[0]} attention, {default}", flush=True)
            for name, fields in [layout for pair in pairs for layout in pair]:
                dp = ranks // (fields.get("tensor_parallel", 1) * fields.get("pipeline_parallel", 1))
                result = measure(backends[0], default, mp, fields, label=f"{name}{f' x DP {dp}' if dp > 1 else ''}")
                if result is not None:
                    results["parallel"][name] = {**result, "layout": fields, "dp": dp}

        recipe = "SDPA, bf16 autocast, fused AdamW" if gpu else "SDPA, fp32, AdamW"
        try:
            plain = plain_training(m, TrainSamples(manifest, seed=0), steps, global_batch, micro,
                                   device="cuda" if gpu else "cpu", bf16=gpu)
        except torch.cuda.OutOfMemoryError as oom:  # its fp32 weights and Adam states take 16 B/param
            raise SystemExit(f"plain PyTorch ({recipe}) ran out of memory at this size ({oom}); "
                             f"lower --memory-fraction so both fit")
        plain["mfu"] = plain["tokens_per_s"] * flops_per_token(m) / (peak * 1e12) if peak else None
        results["plain"] = plain
        print(f"  plain PyTorch ({recipe}): {line(plain)}")

    print(f"\n{'':<34} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'planned':>8} {'data wait':>9} {'vs plain':>8}")
    for name, r in rows + [("plain PyTorch", plain)]:
        print(f"{name:<34} {r['tokens_per_s']:>10,.0f} {pct(r['mfu']):>6} {gib(r['peak_mem_gib']):>9} "
              f"{gib(r.get('planned_gib')):>8} {pct(r.get('data_wait')):>9} "
              f"{r['tokens_per_s'] / plain['tokens_per_s']:>7.2f}x")
    ran = {name: r for name, r in results["parallel"].items() if "failed" not in r}
    if ran:  # each feature against the same layout without it, when both ran
        print(f"\n{f'{ranks} ranks':<34} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'planned':>8} {'data wait':>9} "
              f"{'vs without':>10}")
        for (base, _), (name, _) in pairs:
            for row in (base, name):
                if row in ran:
                    r = ran[row]
                    ratio = (f"{r['tokens_per_s'] / ran[base]['tokens_per_s']:.2f}x" if row == name and base in ran
                             else "")
                    print(f"{row:<34} {r['tokens_per_s']:>10,.0f} {pct(r['mfu']):>6} {gib(r['peak_mem_gib']):>9} "
                          f"{gib(r['planned_gib']):>8} {pct(r['data_wait']):>9} {ratio:>10}")
    print(f"goals: MFU >= 45% of {peak or 'n/a'} TFLOP/s, >= 1.00x plain, data wait < 1%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def line(r: dict) -> str:
    return (f"{r['tokens_per_s']:,.0f} tokens/s, MFU {pct(r['mfu'])}, peak {gib(r['peak_mem_gib'])} GiB"
            + (f" (planned {gib(r['planned_gib'])})" if r.get("planned_gib") is not None else "")
            + (f", data wait {pct(r['data_wait'])}" if r.get("data_wait") is not None else ""))


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
