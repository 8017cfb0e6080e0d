"""Where a checkpoint came from: its run, the manifest it trained on (data version, shards, tokenizer, mixture),
the cleaning, dedup and decontamination settings, and the source files with their checksums (and, for an
incrementally grown manifest, which files each version appended). An instruction-tuned checkpoint
also shows the pretraining checkpoint it started from, and that one's lineage.

    python -m tasks.lineage runs/tiny-<hash>            # a run directory (its latest checkpoint) or a checkpoint
    python -m tasks.lineage runs/tiny-<hash> --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.lib.manifest import ShardManifest
from model.checkpoint import read_train_state, resolve_checkpoint
from model.run_config import Start


def lineage(path: str | Path) -> dict:
    """What a checkpoint came from: a trained one's manifest, settings and sources, and where its weights started
    (recursively); an imported one's Hugging Face folder."""
    checkpoint = resolve_checkpoint(Path(path))
    state = read_train_state(checkpoint)
    if state.get("imported_from"):  # model/import_hf.py: no data, no start
        return {"checkpoint": str(checkpoint), "imported_from": state["imported_from"], "dtype": state.get("dtype"),
                "model": state["model"], "tokenizer": state.get("tokenizer"),
                "hf_model_type": state.get("hf_config", {}).get("model_type")}
    manifest_dir = Path(state["manifest"])
    manifest = ShardManifest.load(manifest_dir)
    meta = manifest.lineage
    spec = meta.spec or meta.sft_spec or {}
    out = {
        "checkpoint": str(checkpoint), "step": state["step"], "consumed_samples": state["consumed_samples"],
        "preset": state["preset"], "model": state["model"],
        "manifest": {"path": str(manifest_dir / "manifest.json"), "version": manifest.version,
                     "data_version": manifest.data_version, "parent": manifest.parent,
                     "seq_len": manifest.seq_len, "vocab_size": manifest.vocab_size,
                     "mixture": manifest.mixture, "totals": manifest.totals,
                     "shards": [f"{s.split}/{s.source}: {s.path} ({s.rows} rows, sha256 {s.sha256[:12]})"
                                for s in manifest.shards]},
        "tokenizer": {"dir": meta.tokenizer_dir, "fingerprint": meta.tokenizer, "sha256": manifest.tokenizer_sha256},
        "spec": {"path": meta.spec_path, "name": meta.spec_name},
        "settings": {k: spec[k] for k in ("cleaning", "dedup", "decontamination", "tokenizer", "sharding")
                     if k in spec},
        "per_source_cleaning": {s["name"]: s.get("cleaning") for s in spec.get("sources", []) if s.get("cleaning")},
        "source_files": meta.source_files or {},
        "increments": [{"data_version": i.data_version, "new_files": i.new_files} for i in meta.increments],
        "upstream_artifacts": meta.upstream,
    }
    start = Start.model_validate(state["start"])
    out["start"] = start.kind
    if start.checkpoint:
        out["initialised_from"] = lineage(start.checkpoint)
    return out


def print_lineage(info: dict, indent: str = "") -> None:
    p = lambda text: print(indent + text)  # noqa: E731
    if "imported_from" in info:
        tokenizer = info["tokenizer"]
        p(f"checkpoint  {info['checkpoint']} (imported, {info['dtype']})")
        p(f"imported    from the Hugging Face folder {info['imported_from']} (model_type {info['hf_model_type']}, "
          f"{info['model']['num_layers']} layers, hidden {info['model']['hidden_size']})")
        p("tokenizer   " + (f"the folder's own (sha256 {tokenizer['sha256'][:12]})" if tokenizer else "none"))
        return
    p(f"checkpoint  {info['checkpoint']} (step {info['step']}, {info['consumed_samples']:,} samples, "
      f"preset {info['preset']})")
    m = info["manifest"]
    p(f"manifest    {m['path']} (data version {m['data_version']}, seq {m['seq_len']}, vocab {m['vocab_size']})")
    p("mixture     " + ", ".join(f"{k} {v:.3f}" for k, v in m["mixture"].items()))
    p(f"tokenizer   {info['tokenizer']['dir']} (sha256 {info['tokenizer']['sha256'][:12]})")
    p(f"spec        {info['spec']['path']} ({info['spec']['name']})")
    for shard in m["shards"]:
        p(f"  shard     {shard}")
    for name, value in info["settings"].items():
        p(f"{name:<11} {json.dumps(value, sort_keys=True)}")
    for source, overrides in info["per_source_cleaning"].items():
        p(f"cleaning[{source}] overrides {json.dumps(overrides, sort_keys=True)}")
    for source, files in info["source_files"].items():
        for file, digest in files:
            p(f"source      {source}: {file} (sha256 {digest[:12]})")
    for increment in info["increments"]:
        for source, files in increment["new_files"].items():
            for file, digest in files:
                p(f"appended    v{increment['data_version']} {source}: {file} (sha256 {digest[:12]})")
    if "initialised_from" in info:
        p(f"initialised from ({info['start'].replace('_', ' ')}):")
        print_lineage(info["initialised_from"], indent + "    ")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory or a checkpoints/step-N directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    info = lineage(args.path)
    print(json.dumps(info, indent=1)) if args.json else print_lineage(info)


if __name__ == "__main__":
    main()
