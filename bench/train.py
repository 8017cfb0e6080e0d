"""Training-throughput benchmark on CPU: Megatron-Core (model.train under torchrun) vs plain PyTorch.

Same model shape (the tiny preset), same batch (global batch x seq_len tokens per step), same data, same
machine, in one run. The plain model is the straightforward PyTorch Llama (RMSNorm, RoPE, SDPA attention,
SwiGLU, AdamW), so the ratio shows what Megatron-Core and its CPU compatibility layer cost.

    python bench/train.py --manifest artifacts/shard/<fp> [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.config import ModelConfig, tiny  # noqa: E402
from model.data import TrainSamples  # noqa: E402
from tasks.lib.manifest import ShardManifest  # noqa: E402
from model.run_config import RunConfig, TrainJob  # noqa: E402
from tasks.lib.commands import launch_command  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = m.num_attention_heads, m.hidden_size // m.num_attention_heads
        self.attn_norm, self.mlp_norm = RMSNorm(m.hidden_size, m.norm_epsilon), RMSNorm(m.hidden_size, m.norm_epsilon)
        self.qkv = nn.Linear(m.hidden_size, 3 * m.hidden_size, bias=False)
        self.proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
        self.gate_up = nn.Linear(m.hidden_size, 2 * m.ffn_hidden_size, bias=False)
        self.down = nn.Linear(m.ffn_hidden_size, m.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainLlama(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.out = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        half = m.hidden_size // m.num_attention_heads // 2
        freqs = m.rotary_base ** (-torch.arange(half) / half)
        angles = torch.outer(torch.arange(m.seq_len), freqs)
        self.register_buffer("cos", torch.cat([angles.cos()] * 1, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 1, -1), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.out(self.norm(x))


def plain_training(m: ModelConfig, samples: TrainSamples, steps: int, global_batch: int, micro: int,
                   device: str = "cpu", bf16: bool = False) -> dict:
    """Train the plain model: tokens/s over the steps after the first three, and (on GPU) peak memory.
    On GPU: fp32 weights under bf16 autocast with the fused AdamW, the usual plain-PyTorch recipe."""
    torch.manual_seed(0)
    gpu = torch.device(device).type == "cuda"
    model = PlainLlama(m).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu or None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    timed = 0.0
    for step in range(steps):
        batch = samples.batch(step * global_batch, global_batch)["tokens"].to(device)
        start = time.perf_counter()
        opt.zero_grad()
        for chunk in batch.split(micro):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten()) / (global_batch // micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if gpu:
            torch.cuda.synchronize()
        if step >= 3:  # skip warm-up steps, as the Megatron figure does (it averages later log windows)
            timed += time.perf_counter() - start
    return {"tokens_per_s": (steps - 3) * global_batch * m.seq_len / timed,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}


def model_train_records(manifest: str | Path, train: dict, preset: str = "tiny", model_overrides: dict | None = None,
                        threads: int = 2, parallel: dict | None = None, ranks: int = 1) -> list[dict]:
    """Run `model.train` (torchrun, as the training stages do) and return its metrics.jsonl records, one per step;
    no checkpoints. `parallel`: ParallelConfig's fields; the ranks beyond TP x PP are data parallel. Raises with the
    run's last output if it fails (out of memory, say)."""
    config = RunConfig(preset=preset, model_overrides=model_overrides or {}, parallel=parallel or {},
                       train={"warmup_steps": 1, "log_every": 1, "eval_every": 10**6, "save_every": 0, **train},
                       launch={"nproc": ranks})
    with tempfile.TemporaryDirectory() as run_dir:
        TrainJob(config=config, manifest=str(manifest)).write(Path(run_dir))
        cmd = launch_command(config, Path(run_dir))
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"model.train failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
        return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def steady(records: list[dict]) -> list[dict]:
    """The steps to time: after three warm-up steps, before the last (which also evaluates)."""
    return records[3:-1]


def mean_tokens_per_s(records: list[dict]) -> float:
    """Tokens/s over the steady steps (the harmonic mean of per-step rates: total tokens over total time)."""
    rates = [r["tokens_per_s"] for r in steady(records)]
    return len(rates) / sum(1 / t for t in rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="shard directory (holds manifest.json)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()
    manifest = ShardManifest.load(args.manifest)
    m = tiny(vocab_size=manifest.vocab_size, seq_len=manifest.seq_len)
    torch.set_num_threads(2)
    plain = plain_training(m, TrainSamples(args.manifest, seed=0), args.steps, args.global_batch,
                           args.micro_batch)["tokens_per_s"]
    train = {"steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro_batch}
    mega = {backend: mean_tokens_per_s(model_train_records(args.manifest, {**train, "attention_backend": backend}))
            for backend in ("local", "sdpa")}
    print(f"tiny preset ({m.num_parameters() / 1e6:.1f}M params), seq {m.seq_len}, global batch "
          f"{args.global_batch}, micro-batch {args.micro_batch}, CPU, 2 threads")
    print(f"  plain PyTorch (SDPA attention): {plain:,.0f} tokens/s (the baseline)")
    for backend, tps in mega.items():
        print(f"  Megatron-Core, {backend:>5} attention (model.train, 1 gloo rank): {tps:,.0f} tokens/s, "
              f"ratio to plain {tps / plain:.2f}")


if __name__ == "__main__":
    main()
