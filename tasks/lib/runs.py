"""Training runs on disk: how a run directory is keyed, which finished runs exist, and which checkpoint a
continued or fine-tuned run starts from. Shared by the pretrain and sft stages."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from tasks.lib.artifacts import canonical
from tasks.lib.log import get_logger
from tasks.lib.manifest import ShardManifest
from model.run_config import RunConfig, Start
from tasks.spec import resolve_path


SUMMARY = "summary.json"  # written once, when a run has finished: its presence marks a finished run


def write_summary(run_dir: Path, summary: dict) -> None:
    """Record that the run finished (with when), atomically: a crash leaves no half-written summary."""
    tmp = run_dir / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps({**summary, "finished_at": time.time()}, indent=1))
    os.replace(tmp, run_dir / SUMMARY)


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a finished run, or None while it has not finished (or never started)."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def finished_runs(runs_dir: str | Path, kind: str) -> list[Path]:
    """The finished runs of a kind ("pretrain" or "sft") under runs_dir, newest first by recorded finish time."""
    summaries = {p.parent: json.loads(p.read_text()) for p in Path(runs_dir).glob(f"*/{SUMMARY}")}
    runs = [run for run, s in summaries.items() if s.get("stage") == kind]
    return sorted(runs, key=lambda run: summaries[run].get("finished_at", 0.0), reverse=True)


def newest_run(runs_dir: str | Path, kind: str) -> Path:
    """The most recently finished run of a kind under runs_dir, for flows given no run."""
    runs = finished_runs(runs_dir, kind)
    if not runs:
        raise FileNotFoundError(f"no finished {kind} run under {runs_dir}: run `prefect deployment run "
                                f"{'pretrain/tiny' if kind == 'pretrain' else 'sft/default'}` (or pipeline/default) "
                                f"first, or pass the run directory explicitly")
    return runs[0]


def checkpoint_architecture(config: RunConfig, checkpoint: str | Path) -> RunConfig:
    """`config` with the checkpoint's own preset and model, so a run started from it cannot drift from it."""
    from model.checkpoint import read_train_state

    state = read_train_state(Path(checkpoint))
    # Not seq_len: the data sets the context (RoPE has no learned positions, so any length loads).
    model = {k: v for k, v in state["model"].items() if k != "seq_len"}
    return config.replace(preset=state["preset"], model_overrides=model)


def starting_architecture(config: RunConfig, start: str | Path | None,
                          hf_setting: str | None = None) -> RunConfig:
    """`config` with the architecture of the weights a run will start from, for the checks made before any work
    (a layout is checked against the model's real layer count, not the preset's): the config.json of a Hugging
    Face folder (the one the setting `hf_setting` names), or a checkpoint's (or run directory's) train state.
    `config` as it is when the start is not known yet (None, or "latest", which the data decides); the training
    task checks again once it is."""
    import dataclasses

    from model.checkpoint import resolve_checkpoint
    from model.import_hf import model_config_from_hf, read_hf_config

    if start is None or start == "latest":
        return config
    if hf_setting:
        folder = resolve_path(start)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{hf_setting}: {folder} is not a Hugging Face model folder (no config.json)")
        model = dataclasses.asdict(model_config_from_hf(read_hf_config(folder), f"{folder}/config.json"))
        return config.replace(preset="hf", model_overrides=model)
    return checkpoint_architecture(config, resolve_checkpoint(resolve_path(start)))


def decide_start(weights: str | None, manifest_path: str | None, runs_dir: str | Path,
                 import_hf: Callable[[str], str]) -> Start:
    """Where a run's weights come from, decided here and only here:

        None                    scratch
        a Hugging Face folder   hf_import: `import_hf(folder)` (the cached import stage) gives its checkpoint
        "latest"                the newest finished pretraining run on another manifest with the same tokenizer
                                (scratch when there is none)
        a run dir or checkpoint checkpoint; its tokenizer must be the one of `manifest_path`, when given (SFT data
                                is tokenized with the checkpoint's own, so it passes none)
    """
    from model.checkpoint import resolve_checkpoint
    from model.import_hf import is_hf_folder

    if weights is None:
        return Start()
    if is_hf_folder(resolve_path(weights)):
        return Start(kind="hf_import", checkpoint=import_hf(weights))
    if manifest_path is None:
        return Start(kind="checkpoint", checkpoint=str(resolve_checkpoint(resolve_path(weights))))
    checkpoint = continuation_checkpoint(weights, manifest_path, runs_dir)
    return Start(kind="checkpoint", checkpoint=checkpoint) if checkpoint else Start()


def run_key(**parts) -> str:
    """A run directory's key: the hash of what decides its result (manifest, config, starting checkpoint), so
    the same request finds (and resumes or returns) the same run."""
    return hashlib.sha256(json.dumps(canonical(parts), sort_keys=True).encode()).hexdigest()[:16]


def continuation_checkpoint(continue_from: str, manifest_path: str, runs_dir: str) -> str | None:
    """The checkpoint continued pretraining on `manifest_path` starts from: `continue_from` (a run directory or
    checkpoint), or for "latest" the newest finished pretraining run on another manifest with the same tokenizer
    (None when there is none: the run trains from scratch). Fails when the tokenizers differ: the ids would mean
    other pieces."""
    from model.checkpoint import checkpoint_tokenizer, read_train_state, resolve_checkpoint

    log = get_logger()
    manifest_dir = Path(manifest_path).parent.resolve()
    tokenizer = ShardManifest.load(manifest_dir).tokenizer_sha256

    if continue_from != "latest":
        checkpoint = resolve_checkpoint(resolve_path(continue_from))
        state = read_train_state(checkpoint)
        if state.get("manifest") is None and state.get("tokenizer") is None:
            raise ValueError(f"{checkpoint} was imported from {state.get('imported_from')} without a tokenizer "
                             f"(no tokenizer.model or tokenizer.json there): add the model's tokenizer files to "
                             f"that folder and import again")
        if checkpoint_tokenizer(checkpoint)["sha256"] != tokenizer:
            raise ValueError(
                f"cannot continue {checkpoint} on {manifest_path}: it was trained with another tokenizer "
                f"({checkpoint_tokenizer(checkpoint)['dir']}) than the one the manifest was tokenized with. "
                + ("Set tokenizer: {pretrained: " + state["imported_from"] + "} in the data spec."
                   if state.get("imported_from") else
                   f"Continue on a manifest that extends the one it trained on ({state['manifest']}), or pretrain "
                   f"from scratch (a rebuilt manifest retrains the tokenizer)."))
        return str(checkpoint)
    for run in finished_runs(runs_dir, "pretrain"):
        checkpoint = resolve_checkpoint(run)
        source = Path(read_train_state(checkpoint)["manifest"]).resolve()
        # Not a run on this very manifest: a repeated trigger must resume the same continuation, not chain one.
        if source != manifest_dir and source.is_dir() and checkpoint_tokenizer(checkpoint)["sha256"] == tokenizer:
            log.info(f"continued pretraining from {checkpoint}")
            return str(checkpoint)
    log.warning(f"continue_from=latest: no finished pretraining run under {runs_dir} used this manifest's "
                f"tokenizer; training from scratch")
    return None
