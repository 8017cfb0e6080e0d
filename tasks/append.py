"""Stage 6 (incremental ingests only), append: a new manifest version = an earlier manifest's shards + new shards.

When files are added to a spec's sources, the data flow does not rebuild: it finds the newest manifest built
with the same settings from a subset of today's files (`find_base`), runs download/clean on the new files only,
dedups them against the base's persistent index, tokenizes them with the base's tokenizer, shards them, and this
stage writes the manifest that lists the base's shards and the new ones (by relative path; nothing is copied).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


from model.tokenizer import identity_file
from tasks.lib.artifacts import RECORD_NAME, ArtifactRef, verify
from tasks.lib.code_version import stage_code_version
from tasks.lib.log import get_logger
from tasks.lib.manifest import DataLineage, ShardManifest, mixture_weights
from tasks.spec import DataSpec, ShardingConfig

# The stages whose code shapes a manifest's content: an edit to any of them makes earlier manifests unusable
# as a base (a full rebuild follows).
DATA_STAGES = ("download", "clean", "dedup", "decontaminate", "tokenizer", "shard", "append")


def settings_key(spec: DataSpec) -> str:
    """Hash of everything that decides how documents become shards, except which files there are (those are
    compared one by one) and where the work runs (the executor does not change the output)."""
    settings = spec.model_dump(mode="json", exclude={"executor", "artifacts_dir"})
    for source in settings["sources"]:
        source.pop("paths"), source.pop("data_files")
    settings["code"] = {stage: stage_code_version(stage) for stage in DATA_STAGES}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Base:
    """An earlier manifest that today's data extends, and what it lacks."""

    manifest_dir: Path
    manifest: ShardManifest
    new_files: dict[str, list[tuple[str, str]]]  # per source: (path, sha256) not in the base

    @property
    def tokenizer(self) -> ArtifactRef:
        lineage = self.manifest.lineage
        return ArtifactRef(stage="tokenizer", fingerprint=lineage.tokenizer, path=lineage.tokenizer_dir)

    @property
    def artifact(self) -> ArtifactRef:
        """The base manifest's own artifact (a `shard` or an `append` directory)."""
        return ArtifactRef(stage=self.manifest_dir.parent.name, fingerprint=self.manifest_dir.name,
                           path=str(self.manifest_dir))

    @property
    def dedup(self) -> ArtifactRef:
        path = Path(self.manifest.lineage.dedup_dir)
        return ArtifactRef(stage="dedup", fingerprint=path.name, path=str(path))


def find_base(artifacts_dir: Path, settings: str, files: dict[str, list[tuple[str, str]]],
              full: bool = False) -> Base | None:
    """The most complete intact manifest with these settings whose source files are all still present and
    unchanged; None (a full build) if there is none. `full`: hash every file it relies on, not only stat it."""
    log = get_logger()
    current = {source: {tuple(f) for f in fs} for source, fs in files.items()}
    candidates = []
    for path in [*artifacts_dir.glob("shard/*/manifest.json"), *artifacts_dir.glob("append/*/manifest.json")]:
        if path.parent.name.startswith(".") or not (path.parent / RECORD_NAME).is_file():
            continue  # a build in progress or abandoned
        manifest = ShardManifest.load(path.parent)
        lineage = manifest.lineage
        if lineage.settings != settings or lineage.source_files is None:
            continue  # other settings, or the shards of an increment (listed by the manifest that appends them)
        had = {source: {tuple(f) for f in fs} for source, fs in lineage.source_files.items()}
        if set(had) != set(current) or any(not had[s] <= current[s] for s in current):
            continue  # a file it was built from is gone or changed
        candidates.append((sum(map(len, had.values())), (path.parent / RECORD_NAME).stat().st_mtime,
                           path.parent, manifest, had))
    for _, _, manifest_dir, manifest, had in sorted(candidates, key=lambda c: c[:2], reverse=True):
        problem = check_intact(manifest_dir, manifest, full)
        if problem:
            log.warning(f"not extending {manifest_dir}: {problem}")
            continue
        new = {s: sorted(current[s] - had[s]) for s in current}
        return Base(manifest_dir, manifest, {s: fs for s, fs in new.items() if fs})
    return None


def check_intact(manifest_dir: Path, manifest: ShardManifest, full: bool = False) -> str | None:
    """None if every artifact a manifest relies on verifies (its own, those holding the shards it lists, its
    tokenizer and the dedup index) and the tokenizer is the one it was tokenized with; else what is wrong."""
    artifacts_dir = manifest_dir.parent.parent
    tokenizer_dir = Path(manifest.lineage.tokenizer_dir or "")
    relied_on = {manifest_dir, tokenizer_dir, Path(manifest.lineage.dedup_dir or "")}
    for shard in manifest.shards:  # an appended manifest lists earlier artifacts' shards: <stage>/<fp>/...
        relative = Path(os.path.normpath(manifest_dir / shard.path)).relative_to(artifacts_dir)
        relied_on.add(artifacts_dir.joinpath(*relative.parts[:2]))
    for artifact in sorted(relied_on):
        if problem := verify(artifact, full=full):
            return problem
    files = json.loads((tokenizer_dir / RECORD_NAME).read_text())["files"]
    recorded = files.get(identity_file(tokenizer_dir).name, [None, None])
    if recorded[1] != manifest.tokenizer_sha256:
        return f"tokenizer {tokenizer_dir} is not the one the manifest was tokenized with"
    return None


def append_shards(base_dir: Path, added_dir: Path, config: ShardingConfig, lineage: DataLineage, out_dir: Path) -> dict:
    """Write `out_dir/manifest.json`: the base's shards then the added ones, paths relative to the final artifact
    directory (a sibling of `out_dir`), totals summed and the mixture recomputed."""
    base, added = ShardManifest.load(base_dir), ShardManifest.load(added_dir)
    if added.tokenizer_sha256 != base.tokenizer_sha256 or added.row_len != base.row_len:
        raise ValueError(f"{added_dir} was not tokenized like {base_dir} (tokenizer or row length differ); "
                         f"appended shards must use the base manifest's tokenizer")
    shards = [s.model_copy(update={"path": os.path.relpath(d / s.path, out_dir)})
              for d, m in ((base_dir, base), (added_dir, added)) for s in m.shards]
    totals = {k: base.totals[k] + added.totals[k] for k in base.totals}
    manifest = base.model_copy(update={"data_version": base.data_version + 1, "parent": str(base_dir),
                                       "shards": shards, "totals": totals, "mixture": mixture_weights(shards, config),
                                       "lineage": lineage})
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    summary = {"data_version": manifest.data_version, "shards_base": len(base.shards),
               "shards_added": len(added.shards), "rows_added": added.totals["rows_train"] + added.totals["rows_valid"],
               "tokens_added": added.totals["tokens"], "docs_added": added.totals["docs_train"] + added.totals["docs_valid"],
               "rows_train": totals["rows_train"], "tokens": totals["tokens"]}
    get_logger().info(f"append: manifest version {manifest.data_version}: {len(base.shards)} shards + "
                      f"{len(added.shards)} new ({summary['rows_added']} rows, {summary['tokens_added']:,} tokens)")
    return summary


def build(out: Path, base: ArtifactRef, added: ArtifactRef, config: ShardingConfig, lineage: DataLineage,
          artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py)."""
    return append_shards(base.dir, added.dir, config, lineage, out)
