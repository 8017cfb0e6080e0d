"""Checkpoints: Megatron dist_checkpointing directories, step-stamped, published atomically.

Layout under a run directory:
    checkpoints/step-000100/      model + optimizer (sharded), train_state.json
    checkpoints/latest            name of the newest complete checkpoint (replaced atomically)
A save goes to `step-N.tmp/` and is renamed only after every rank finished writing, so a crash mid-save leaves
the previous checkpoint and `latest` untouched.

The model loads at any TP/PP. So does the optimizer state, except the distributed optimizer's: it is saved in its
own flat-buffer layout ("dp_reshardable", Megatron's default: every rank writes its shard, nothing is gathered),
which reshards across data-parallel sizes only. To change TP/PP with it, start a new run from the checkpoint's
weights (a `Start` of kind checkpoint, model/run_config.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from tasks.lib.manifest import ShardManifest

LATEST = "latest"
STATE_FILE = "train_state.json"
# How the distributed optimizer lays out its state in a checkpoint (ignored by the non-distributed optimizer).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def read_train_state(checkpoint: Path) -> dict:
    """What model/train.py recorded with a checkpoint: step, consumed samples, scheduler, and (since SFT) the
    preset, model config, manifest and the checkpoint it was initialised from."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def manifest_tokenizer(manifest_dir: str | Path) -> dict | None:
    """The tokenizer a manifest was tokenized with, as a checkpoint records it: {"dir", "sha256"}; None for a
    manifest that names none (the benchmarks' synthetic token rows)."""
    manifest = ShardManifest.load(manifest_dir)
    if manifest.lineage.tokenizer_dir is None:
        return None
    return {"dir": manifest.lineage.tokenizer_dir, "sha256": manifest.tokenizer_sha256}


def checkpoint_tokenizer(checkpoint: str | Path) -> dict:
    """The tokenizer a checkpoint's ids mean, {"dir", "sha256"}: recorded with it (training records its
    manifest's, an import its model's), else its manifest's."""
    state = read_train_state(checkpoint)
    recorded = state.get("tokenizer") or (manifest_tokenizer(state["manifest"]) if state.get("manifest") else None)
    if recorded is None:
        raise ValueError(f"{checkpoint} records no tokenizer (trained on token rows without one, or imported from "
                         f"a folder without tokenizer files)")
    return {**recorded, "dir": str(Path(checkpoint) / recorded["dir"])}  # an import's is inside it: relative


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given either it or a run directory (whose newest checkpoint is used)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a run directory with "
                                f"checkpoints/{LATEST}")
    return latest


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint; remove the pointer to "
                           f"restart from scratch, or point it at an earlier step-* directory")
    return path


def chunks_of(model) -> list:
    """A model as its list of chunks: one GPTModel, or this rank's virtual pipeline stages."""
    return model if isinstance(model, (list, tuple)) else [model]


def sharded_model_state(model) -> dict:
    """The model's sharded state dict: one chunk's own, or `model0`, `model1`... for virtual pipeline stages. The
    sharded tensors carry global keys and offsets (the layer numbers across all stages), so a checkpoint saved with
    any number of chunks loads into any other."""
    chunks = chunks_of(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_checkpoint(run_dir: Path, model, optimizer, train_state: dict) -> Path:
    """Collective: every rank calls it. `train_state` (step, consumed samples, scheduler...) is JSON."""
    from megatron.core import dist_checkpointing  # here, so reading train states does not import Megatron

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{train_state['step']:06d}"
    tmp = root / f"{final.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = sharded_model_state(model)
    optimizer_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    _collect_write_results_in_process()
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer_sd}, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / LATEST)
    dist.barrier()
    return final


def save_weights(directory: Path, model, train_state: dict, files: dict[str, Path] | None = None) -> Path:
    """A model-only checkpoint written by one process (model/import_hf.py): a run started from it loads it at any TP/PP.
    `files` are copied in ({name inside: source}). Written to `<directory>.tmp` and renamed when complete."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _collect_write_results_in_process()
    dist_checkpointing.save({"model": sharded_model_state(model)}, str(tmp))
    for name, source in (files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tmp / name)
    (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def _collect_write_results_in_process() -> None:
    """Megatron-Core 0.16's torch_dist writer forks writer processes and collects their results through a
    multiprocessing Manager queue, made once per rank with the "spawn" start method: a server process that
    re-imports `model.train` (about 2-3 s of a CPU launch), lives until the rank exits and, when the rank is
    killed, outlives it holding the launcher's output pipe open. Our saves are synchronous (`async_sharded_save`
    is off), so the rank that forks the writers is the one that reads their results: an in-process queue does.
    Megatron creates its queue only when none is set, so setting it first is all it takes."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def load_checkpoint(path: Path, model, optimizer=None) -> dict:
    """Load model (and optimizer) state saved at any TP/PP layout; returns the saved train_state."""
    import torch
    from megatron.core import dist_checkpointing

    if optimizer is None:
        load_weights(path, model)
        return read_train_state(path)
    model_sd = sharded_model_state(model)
    request = {"model": model_sd}
    if optimizer is not None:
        _give_adam_states(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    state = dist_checkpointing.load(request, str(path))
    with torch.no_grad():  # the fp32 distributed optimizer's main parameters are views of the model's
        chunks = chunks_of(model)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state["model"] if len(chunks) == 1 else state["model"][f"model{i}"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            _restore_adam_steps(optimizer)
    return read_train_state(path)


def load_weights(path: Path, model) -> None:
    """The weights alone (export, evaluation), read straight into the parameters. A tensor saved in parts (fc1's
    gate and up halves) is described by a factory whose parts are views of the parameter; dist_checkpointing
    would merge the loaded parts into a new copy, for every layer at once, and the state dict would be copied in
    again. Built into their parts first, every tensor loads in place: no copy of the model is ever made."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = sharded_model_state(model)
    apply_factories(sharded)
    dist_checkpointing.load(sharded, str(path))


def _give_adam_states(optimizer) -> None:
    """The distributed optimizer over torch's Adam (no Apex or Transformer Engine, so on CPU and on GPUs without
    them) describes its state by Adam's step count, which a fresh run lacks until its first step: Megatron-Core
    0.16 then fails an assertion. Give it placeholder states to load into, the way Megatron does for its FSDP
    path: one zero-gradient step (the checkpoint then overwrites parameters and states)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Megatron-Core 0.16's distributed optimizer over torch's Adam loads Adam's per-parameter step counts wrongly:
    the placeholder's count survives the load, and every parameter shares one step tensor, which Adam then
    increments once per parameter. Either gives wrong bias corrections from the first step after a resume. The
    count it saved in its parameter groups is right: give each parameter its own copy of it."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer):
            for group in inner.optimizer.param_groups:
                for param in group["params"]:
                    if "step" in group and "step" in inner.optimizer.state[param]:
                        inner.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))
