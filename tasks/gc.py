"""Garbage collection of the artifact store (a command, not a stage):

    python -m tasks.gc                  # list what nothing refers to any more, and the bytes it holds
    python -m tasks.gc --delete         # remove it
    python -m tasks.gc --verify         # also hash every file of every artifact; a corrupt one is removed too

What is kept:
  * every artifact a training run under the runs directory read: each checkpoint's train_state.json lists them in
    `inputs` (its manifest's, and an imported model's), as `stage/fingerprint`;
  * for each data spec, its `--keep` most recently built manifests;
  * everything a kept artifact was built from, transitively: its `_artifact.json` lists its `inputs` (documents,
    tokenizer, cleaned sources, ...; an appended manifest's are the manifest it extends and the new shards);
  * anything built in the last `--min-age-hours` (a data flow may be on its way to a manifest that refers to
    it), and builds in progress.
A Prefect cache record names the artifact its stage built, so every artifact has one: the records decide nothing
here. They are removed with their artifacts (the stage task rebuilds anyway when a cached artifact is gone).
Also removed: failed builds' evidence (`<stage>/failed-<fingerprint>/`, whatever its age), temporary build
directories of processes that no longer run, and the locks of absent artifacts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.lib.artifacts import FAILED_PREFIX, RECORD_NAME, TMP_PREFIX, remove_stale_temporaries, verify
from tasks.lib.manifest import ShardManifest
from tasks.spec import resolve_path

@dataclass
class Artifact:
    id: str  # <stage>/<fingerprint>
    path: Path
    bytes: int
    built_at: float
    meta: dict | None  # its _artifact.json; None if incomplete

    @property
    def failed(self) -> bool:
        """The kept files of a failed build, not an artifact."""
        return self.path.name.startswith(FAILED_PREFIX)

    @property
    def inputs(self) -> list[str]:
        """The artifacts it was built from (its build record's `inputs`)."""
        return (self.meta or {}).get("inputs", [])


def scan(artifacts_dir: Path) -> dict[str, Artifact]:
    found = {}
    for stage_dir in sorted(p for p in artifacts_dir.iterdir() if p.is_dir()):
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            meta_file = path / RECORD_NAME
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            built = (meta or {}).get("built_at", path.stat().st_mtime)
            found[f"{stage_dir.name}/{path.name}"] = Artifact(f"{stage_dir.name}/{path.name}", path, size, built, meta)
    return found


def kept_roots(artifacts: dict[str, Artifact], runs_dir: Path, keep: int, min_age_hours: float) -> dict[str, str]:
    """{artifact id: why it is kept} for the artifacts kept for their own sake."""
    roots = {}
    for state in sorted(runs_dir.glob("*/checkpoints/*/train_state.json")) if runs_dir.is_dir() else []:
        run = state.parent.parent.parent.name
        for artifact_id in json.loads(state.read_text()).get("inputs", []):
            roots.setdefault(artifact_id, f"read by {run}")
    by_spec: dict[str, list[Artifact]] = {}
    for artifact in artifacts.values():
        manifest = artifact.path / "manifest.json"
        if artifact.meta is not None and manifest.is_file():
            lineage = ShardManifest.load(artifact.path).lineage
            spec = lineage.spec_path or f"sft spec {lineage.spec_name}"
            by_spec.setdefault(spec, []).append(artifact)
    for spec, manifests in by_spec.items():
        for artifact in sorted(manifests, key=lambda a: a.built_at, reverse=True)[:keep]:
            roots.setdefault(artifact.id, f"newest manifest of {spec}")
    recent = time.time() - min_age_hours * 3600
    for artifact in artifacts.values():
        if artifact.built_at >= recent and not artifact.failed:
            roots.setdefault(artifact.id, f"built in the last {min_age_hours:g} h")
    return roots


def collect(artifacts_dir: Path, runs_dir: Path, keep: int = 1, min_age_hours: float = 24.0
            ) -> tuple[dict[str, str], list[Artifact]]:
    """({kept artifact id: why}, the artifacts nothing keeps)."""
    artifacts = scan(artifacts_dir)
    kept = kept_roots(artifacts, runs_dir, keep, min_age_hours)
    frontier = list(kept)
    while frontier:
        current = artifacts.get(frontier.pop())
        if current is None:
            continue
        for referred in current.inputs:
            if referred in artifacts and referred not in kept:
                kept[referred] = f"used by {current.id}"
                frontier.append(referred)
    return kept, [a for a in artifacts.values() if a.id not in kept]


def delete(artifacts_dir: Path, garbage: list[Artifact], cache_dir: Path | None) -> None:
    for artifact in garbage:
        shutil.rmtree(artifact.path)
        stage, fingerprint = artifact.id.split("/")
        for record in cache_dir.glob(f"{stage}-{fingerprint}-*") if cache_dir and cache_dir.is_dir() else []:
            record.unlink()
    for stage_dir in (p for p in artifacts_dir.iterdir() if p.is_dir()):
        remove_stale_temporaries(stage_dir)
        for lock in stage_dir.glob(".lock-*"):
            if not (stage_dir / lock.name[len(".lock-"):]).exists() and \
                    not list(stage_dir.glob(f"{TMP_PREFIX}{lock.name[len('.lock-'):]}-*")):
                lock.unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts", help="the artifact store (a data spec's artifacts_dir)")
    p.add_argument("--runs", default="runs", help="training runs whose manifests are kept")
    p.add_argument("--keep", type=int, default=1, help="newest manifests kept per data spec")
    p.add_argument("--min-age-hours", type=float, default=24.0, help="artifacts younger than this are kept")
    p.add_argument("--delete", action="store_true", help="remove them (default: only list them)")
    p.add_argument("--verify", action="store_true", help="hash every file of every artifact and count corrupt "
                                                          "ones as garbage")
    args = p.parse_args(argv)
    artifacts_dir, runs_dir = resolve_path(args.artifacts), resolve_path(args.runs)
    if not artifacts_dir.is_dir():
        raise SystemExit(f"no artifact store at {artifacts_dir}; pass --artifacts (a data spec's artifacts_dir)")
    kept, garbage = collect(artifacts_dir, runs_dir, args.keep, args.min_age_hours)
    if args.verify:  # a corrupt artifact goes whatever refers to it: the next run that needs it rebuilds it
        unused = {a.id for a in garbage}
        for artifact in scan(artifacts_dir).values():
            if artifact.id not in unused and artifact.meta and (problem := verify(artifact.path, full=True)):
                print(f"corrupt {artifact.id}: {problem}")
                kept.pop(artifact.id)
                garbage.append(artifact)
    for artifact_id, why in sorted(kept.items()):
        print(f"keep    {artifact_id}  ({why})")
    for artifact in sorted(garbage, key=lambda a: a.id):
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(artifact.built_at))
        print(f"{'delete' if args.delete else 'unused'}  {artifact.id}  {artifact.bytes / 1e6:,.1f} MB, built {built}"
              + (", a failed build's files" if artifact.failed else "" if artifact.meta else ", incomplete"))
    total = sum(a.bytes for a in garbage)
    if args.delete:
        from tasks.prefect_tasks import prefect_cache_dir

        delete(artifacts_dir, garbage, prefect_cache_dir())
        print(f"deleted {len(garbage)} artifacts, {total / 1e6:,.1f} MB freed")
    else:
        print(f"{len(garbage)} artifacts nothing refers to: {total / 1e6:,.1f} MB would be freed by --delete")


if __name__ == "__main__":
    main()
