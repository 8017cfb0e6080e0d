"""Data flow: download -> clean -> dedup -> decontaminate -> tokenizer -> Parquet shards, every stage cached by
content; files added to a source later are ingested incrementally and appended as a new manifest version.

    python -m flows.data --spec data_specs/default.yaml
    python -m flows.data --spec data_specs/default.yaml --full     # rebuild from all files, retrain the tokenizer
    python -m flows.data --spec data_specs/default.yaml --verify   # hash every reused file, not only stat it
    python -m flows.data --spec data_specs/default.yaml --plan     # build nothing: per stage, reuse or build, why
"""

from __future__ import annotations

import argparse
import time

from prefect import flow
from prefect.events import emit_event

from tasks.append import Base, append, find_base, settings_key
from tasks.lib.artifacts import ArtifactRef, full_verification, run_stage
from tasks.lib.log import progress
from tasks.lib.plan import PlanRow, collecting_plan, format_plan, publish_plan
from tasks.clean import clean
from tasks.decontaminate import decontaminate, reference_sets
from tasks.dedup import dedup
from tasks.download import ResolvedSource, download, resolve
from tasks.report import report
from tasks.shard import ShardManifest, shard
from tasks.spec import DataSpec, load_spec, resolve_path
from tasks.tokenizer import pin_pretrained, tokenizer, with_model_tokenizer


MANIFEST_EVENT = "llm-pipeline.manifest.created"


@flow(name="data")
def data_flow(spec_path: str = "data_specs/default.yaml", announce: bool = False, incremental: bool = True,
              verify: bool = False, plan: bool = False, tokenizer_from: str | None = None) -> str:
    """Build training shards for a data spec; returns the path of the shard manifest.

    Every run first plans: one line per stage, reuse or build and why (tasks/lib/plan.py), logged and published
    as the `data-plan` table artifact. `plan` stops there, builds nothing, and returns the plan's text.

    `incremental` (default): when the spec's sources have gained files since a manifest was built with the same
    settings, only the new files are processed, deduplicated against the persistent index, tokenized with the
    existing tokenizer, and appended as a new manifest version (tasks/append.py). False rebuilds everything from
    all files (and retrains the tokenizer).

    With `announce` (the data deployment sets it), a manifest built by this run, not reused, that holds new
    training rows is announced as a Prefect event, `llm-pipeline.manifest.created`, for automations and
    deployment triggers. Flows that call this one as a step (pretrain, pipeline) leave it off, so they never
    trigger a second run of their own work.

    A reused artifact is checked by stat (each file's size and build-time mtime); `verify` hashes every file of
    every artifact it reuses instead, and rebuilds any that fails.

    `tokenizer_from`: tokenize with this Hugging Face model folder's tokenizer (the pretrain flow's `init_from_hf`
    passes it), as `tokenizer: {pretrained: ...}` in the spec would."""
    token = full_verification.set(verify)
    try:
        return build_manifest(spec_path, announce, incremental, plan_only=plan, tokenizer_from=tokenizer_from)
    finally:
        full_verification.reset(token)


def build_manifest(spec_path: str, announce: bool, incremental: bool, plan_only: bool = False,
                   tokenizer_from: str | None = None) -> str:
    started = time.time()
    spec = with_model_tokenizer(load_spec(spec_path), tokenizer_from) if tokenizer_from else load_spec(spec_path)
    artifacts_dir = spec.artifacts_path()
    resolved = {source.name: resolve(source) for source in spec.sources}
    files = {name: r.files for name, r in resolved.items()}
    lineage = {"spec_path": str(resolve_path(spec_path)), "spec": spec.model_dump(mode="json"),
               "source_files": files, "settings": settings_key(spec)}
    base = find_base(artifacts_dir, lineage["settings"], files) if incremental else None
    if base is not None and not base.new_files:
        progress(f"no new files since manifest version {base.manifest.data_version} ({base.manifest_dir}): "
                 f"nothing to do")
        if plan_only:
            return format_plan([PlanRow(base.artifact.stage, "all sources", "reuse", base.artifact.fingerprint,
                                        f"no new files since manifest version {base.manifest.data_version}")])
        return str(base.manifest_dir / "manifest.json")
    if base is not None:
        new = ", ".join(f"{len(fs)} in {s}" for s, fs in base.new_files.items())
        progress(f"incremental: new files ({new}) on top of manifest version {base.manifest.data_version} "
                 f"({base.manifest_dir}); the tokenizer is reused")

    def run_stages() -> tuple[ArtifactRef, list]:
        return ingest_new_files(spec, resolved, base, lineage) if base else build_all(spec, resolved, lineage)

    with collecting_plan(hash_files=plan_only and full_verification.get()) as plan:
        run_stages()
    table = format_plan(plan)
    progress(f"plan: {sum(r.decision == 'build' for r in plan)} of {len(plan)} stages to build\n{table}")
    publish_plan(plan)
    if plan_only:
        return table
    shards, refs = run_stages()
    manifest = str(shards.dir / "manifest.json")
    report(refs, manifest)
    meta = shards.meta()
    if announce and meta.get("built_at", 0) >= started and meta["summary"].get("rows_added", 1) > 0:
        emit_event(event=MANIFEST_EVENT, resource={"prefect.resource.id": f"llm-pipeline.manifest.{shards.fingerprint}",
                                                   "prefect.resource.name": spec.name},
                   payload={"manifest": manifest, "spec_path": spec_path,
                            "data_version": ShardManifest.load(shards.dir).data_version})
        progress(f"announced new manifest {manifest} ({MANIFEST_EVENT})")
    return manifest


def clean_sources(spec: DataSpec, resolved: dict[str, ResolvedSource]) -> tuple[dict[str, ArtifactRef], list]:
    """Download and clean each given source; returns the cleaned artifacts and (label, artifact) report rows."""
    artifacts_dir = str(spec.artifacts_path())
    cleaned, refs = {}, []
    for source in spec.sources:
        if source.name not in resolved:
            continue
        downloaded = run_stage(download, resolved=resolved[source.name], executor=spec.executor,
                               artifacts_dir=artifacts_dir)
        cleaned[source.name] = run_stage(clean, downloaded=downloaded, source_name=source.name,
                                         cleaning=spec.cleaning_for(source), executor=spec.executor,
                                         artifacts_dir=artifacts_dir)
        refs += [(source.name, downloaded), (source.name, cleaned[source.name])]
    return cleaned, refs


def dedup_and_decontaminate(spec: DataSpec, cleaned: dict[str, ArtifactRef],
                            base: ArtifactRef | None) -> tuple[ArtifactRef, ArtifactRef, list]:
    """(dedup artifact, the documents to tokenize, report rows)."""
    artifacts_dir = str(spec.artifacts_path())
    deduped = run_stage(dedup, cleaned=cleaned, config=spec.dedup, executor=spec.executor, base=base,
                        artifacts_dir=artifacts_dir)
    if not spec.decontamination.enabled:
        return deduped, deduped, [("all sources", deduped)]
    documents = run_stage(decontaminate, documents=deduped, references=reference_sets(spec.decontamination),
                          config=spec.decontamination, executor=spec.executor, artifacts_dir=artifacts_dir)
    return deduped, documents, [("all sources", deduped), ("all sources", documents)]


def build_all(spec: DataSpec, resolved: dict[str, ResolvedSource], lineage: dict) -> tuple[ArtifactRef, list]:
    """A full build from every file: download -> clean -> dedup -> decontaminate -> tokenizer -> shard."""
    artifacts_dir = str(spec.artifacts_path())
    cleaned, refs = clean_sources(spec, resolved)
    deduped, documents, more = dedup_and_decontaminate(spec, cleaned, base=None)
    refs += more
    if spec.tokenizer.pretrained:
        trained = run_stage(tokenizer, documents=None, config=spec.tokenizer, executor=spec.executor,
                            artifacts_dir=artifacts_dir, pretrained=pin_pretrained(spec.tokenizer))
    else:
        trained = run_stage(tokenizer, documents=documents, config=spec.tokenizer, executor=spec.executor,
                            artifacts_dir=artifacts_dir)
    lineage = {**lineage, "dedup_dir": str(deduped.dir),
               "upstream": {f"{ref.stage}/{name}": ref.fingerprint for name, ref in refs}}
    shards = run_stage(shard, documents=documents, tokenizer=trained, config=spec.sharding, lineage=lineage,
                       executor=spec.executor, artifacts_dir=artifacts_dir)
    return shards, refs + [("all sources", trained), ("all sources", shards)]


def ingest_new_files(spec: DataSpec, resolved: dict[str, ResolvedSource], base: Base,
                     lineage: dict) -> tuple[ArtifactRef, list]:
    """Only the new files: download -> clean -> dedup against the base's index -> decontaminate -> shard with
    the base's tokenizer -> append to the base's manifest."""
    artifacts_dir = str(spec.artifacts_path())
    new = {name: r.model_copy(update={"files": base.new_files[name]})
           for name, r in resolved.items() if name in base.new_files}
    cleaned, refs = clean_sources(spec, new)
    deduped, documents, more = dedup_and_decontaminate(spec, cleaned, base=base.dedup)
    refs += more
    upstream = {f"{ref.stage}/{name}": ref.fingerprint for name, ref in refs}
    added = run_stage(shard, documents=documents, tokenizer=base.tokenizer, config=spec.sharding, increment=True,
                      lineage={"spec_path": lineage["spec_path"], "new_files": base.new_files, "upstream": upstream},
                      executor=spec.executor, artifacts_dir=artifacts_dir)
    increments = base.manifest.lineage.get("increments", []) + [
        {"data_version": base.manifest.data_version + 1, "new_files": base.new_files, "shards": str(added.dir),
         "upstream": upstream}]
    lineage = {**base.manifest.lineage, **lineage, "dedup_dir": str(deduped.dir), "increments": increments}
    appended = run_stage(append, base=base.artifact, added=added, config=spec.sharding, lineage=lineage,
                         artifacts_dir=artifacts_dir)
    return appended, refs + [("new documents", added), ("all sources", appended)]


def require_server() -> None:
    """Fail with the fix, not a connection traceback, when the configured Prefect server is down."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # no server configured: Prefect runs a temporary one for this process
    try:
        urllib.request.urlopen(f"{url}/health", timeout=3)
    except OSError:
        raise SystemExit(f"The Prefect server at {url} is not running. Start it with `make up`, or run without "
                         f"one: PREFECT_API_URL= python -m flows.data ...") from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="data_specs/default.yaml", help="data spec YAML (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="rebuild from all files instead of appending new ones")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of every reused artifact (default: check size and mtime)")
    parser.add_argument("--plan", action="store_true",
                        help="build nothing: print, per stage, reuse or build and why")
    args = parser.parse_args()
    require_server()
    print(data_flow(args.spec, incremental=not args.full, verify=args.verify, plan=args.plan))
