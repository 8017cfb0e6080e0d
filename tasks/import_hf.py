"""Import stage: a Hugging Face Llama folder as a Megatron-Core checkpoint (model/import_hf.py), cached like every
stage. Its key is the folder's files by checksum (config, weights, tokenizer) and the target layout and dtype, so a
re-run reuses the checkpoint and a changed file re-imports it.

Output: `<artifacts>/import_hf/<fingerprint>/checkpoint/` (with the model's tokenizer in `checkpoint/tokenizer/`).
"""

from __future__ import annotations

from pathlib import Path


from model.config import ParallelConfig
from model.import_hf import import_hf as convert
from model.import_hf import read_hf_config, weight_files
from model.tokenizer import TOKENIZER_FILES
from tasks.lib.artifacts import ArtifactRef, PinnedFiles, pin_files
from tasks.spec import resolve_path


def pin_hf_model(hf_dir: str, setting: str = "init_from_hf") -> PinnedFiles:
    """The folder's config, weights and tokenizer files by checksum; fails fast on a folder that is not a Llama
    model this project can import (`setting` names the parameter to change)."""
    directory = resolve_path(hf_dir)
    read_hf_config(directory)
    names = ["config.json", *(p.name for p in set(weight_files(directory).values())), *TOKENIZER_FILES]
    if (directory / "model.safetensors.index.json").is_file():
        names.append("model.safetensors.index.json")
    return pin_files(directory, sorted(set(names)), setting)


def checkpoint_of(imported: ArtifactRef) -> str:
    return str(imported.dir / "checkpoint")


def build(out: Path, model: PinnedFiles, tp: int, pp: int, dtype: str | None, artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py): the checkpoint in `out/checkpoint`."""
    return convert(Path(model.directory), out / "checkpoint", ParallelConfig(tp, pp), dtype)
