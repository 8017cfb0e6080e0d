"""What a run reports as it trains: rank 0's metrics (`metrics.jsonl`, TensorBoard, the progress line the
launcher follows), throughput and MFU, peak memory, and every rank's heartbeat for the launcher's stall watch."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from model.config import ModelConfig, TrainConfig

# bf16 dense peak of known GPUs (TFLOP/s), for MFU; override with train.peak_tflops. fp16 runs at the bf16 rate, fp8
# at twice it (Hopper), fp32 matmuls at the TF32 rate, half of it.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PEAK_BY_PRECISION = {"bf16": 1.0, "fp16": 1.0, "fp8": 2.0, "fp32": 0.5}


def flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: 6 x parameters plus attention scores (the usual PaLM-style estimate)."""
    return 6 * m.num_parameters() + 12 * m.num_layers * m.hidden_size * m.seq_len



def open_metrics(path: Path, after_step: int):
    """Append to the metrics log, first dropping lines a crashed run wrote after the checkpoint we resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return open(path, "a")



def open_tensorboard(run_dir: Path, first_step: int):
    """Rank 0's TensorBoard writer. A resumed run purges whatever the crashed run logged from `first_step` on
    (TensorBoard hides those events), so each curve has one point per step."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run_dir / "tensorboard"
    resumed = log_dir.is_dir() and any(log_dir.iterdir())
    return SummaryWriter(str(log_dir), purge_step=first_step if resumed else None, flush_secs=30)


# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "val_loss": "val/loss",
                    "loss_scale": "train/loss_scale", "skipped_steps": "train/skipped_steps",
                    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "peak_mem_gib": "perf/peak_mem_gib",
                    "data_wait": "perf/data_wait"}



def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"



def peak_memory_gib(rss_before_model: int) -> float:
    """Peak memory this rank's training has used: the CUDA allocator's peak on GPU; on CPU, the growth of the
    process's peak resident size since just before the model was built (libraries and
    the data loader excluded)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return max(0, peak_rss - rss_before_model) / 2**30


class MetricsLogger:
    """Rank 0's record of each step: `metrics.jsonl`, TensorBoard, and the progress line the launcher follows
    (written after the record, so a line seen means a step on disk). Other ranks log nothing."""

    def __init__(self, run_dir: Path, resumed_step: int, offset: int, steps: int, enabled: bool):
        self.steps, self.offset, self.enabled = steps, offset, enabled
        if enabled:
            self.metrics = open_metrics(run_dir / "metrics.jsonl", after_step=resumed_step)
            self.tensorboard = open_tensorboard(run_dir, first_step=offset + resumed_step + 1)

    def record(self, record: dict, logged: bool, eta: str | None) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, tag in TENSORBOARD_TAGS.items():
            if record.get(key) is not None:
                self.tensorboard.add_scalar(tag, record[key], global_step=self.offset + record["step"])
        if logged:
            self.tensorboard.flush()
            print(f"step={record['step']}/{self.steps} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                if v is not None and k != "step") + f" eta={eta}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.tensorboard.close()


class Heartbeat:
    """This rank's last sign of progress, `<run-dir>/heartbeats/rank-<N>.json`: which step it is in (or has
    finished) and since when. The launcher (tasks/lib/supervise.py) reads them to find a stalled step and the rank
    that holds it up; a write costs well under a millisecond a step."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "heartbeats" / f"rank-{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    def beat(self, step: int, done: bool) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "step": step, "done": done,
                                   "time": time.time()}))
        os.replace(tmp, self.path)


def mfu_peak(train: TrainConfig) -> float | None:
    """One accelerator's dense peak TFLOP/s at the run's precision, for MFU: `train.peak_tflops`, else a known
    GPU's; None where it is not known (CPU)."""
    if train.peak_tflops:
        return train.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * PEAK_BY_PRECISION[train.precision] for k, v in PEAK_TFLOPS.items() if k in name), None)


class StepClock:
    """The measurements of a log step, over the steps since the previous one: tokens/s, MFU, peak memory, the
    share of time spent waiting for input batches, and the ETA."""

    def __init__(self, train: TrainConfig, model_cfg: ModelConfig, peak_tflops: float | None, rss_before_model: int):
        self.train, self.model_cfg, self.peak, self.rss_before_model = train, model_cfg, peak_tflops, rss_before_model
        self.since, self.data_wait = time.perf_counter(), 0.0

    def tick(self, record: dict, waited: float, world_size: int) -> tuple[bool, str | None]:
        """After a step: add the measurements to `record` when it is a log step (every `log_every`, or one that
        evaluated). Returns (whether it is logged, its ETA)."""
        train, step = self.train, record["step"]
        self.data_wait += waited
        if step % train.log_every and "val_loss" not in record:
            return False, None
        elapsed = time.perf_counter() - self.since
        steps_done = step % train.log_every or train.log_every
        tps = train.global_batch * self.model_cfg.seq_len * steps_done / elapsed
        record["tokens_per_s"] = tps
        record["mfu"] = tps * flops_per_token(self.model_cfg) / (self.peak * 1e12 * world_size) if self.peak else None
        record["peak_mem_gib"] = peak_memory_gib(self.rss_before_model)
        record["data_wait"] = self.data_wait / elapsed  # share of step time spent waiting for the input batch
        self.since, self.data_wait = time.perf_counter(), 0.0
        return True, duration(elapsed / steps_done * (train.steps - step))
