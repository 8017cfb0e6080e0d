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

from tasks.append import find_base, settings_key
from tasks.data_steps import full_build_steps, increment_steps
from tasks.lib.log import progress
from tasks.lib.manifest import DataLineage, ShardManifest
from tasks.lib.plan import PlanRow, format_plan, plan as plan_steps
from tasks.prefect_tasks import publish_plan, report, resolve, run_steps
from tasks.spec import load_spec, resolve_path
from tasks.tokenizer import with_model_tokenizer


MANIFEST_EVENT = "llm-pipeline.manifest.created"


@flow(name="data")
def data_flow(spec_path: str = "data_specs/default.yaml", announce: bool = False, incremental: bool = True,
              verify: bool = False, plan: bool = False, tokenizer_from: str | None = None) -> str:
    """Build training shards for a data spec; returns the path of the shard manifest.

    The flow first makes its steps (one per stage and source, with their settings and input steps), then plans
    over them: one line per stage, reuse or build and why (tasks/lib/plan.py), logged and published as the
    `data-plan` table artifact. `plan` stops there, builds nothing, and returns the plan's text. Otherwise it runs
    the same steps.

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
    started = time.time()
    spec = with_model_tokenizer(load_spec(spec_path), tokenizer_from) if tokenizer_from else load_spec(spec_path)
    resolved = {source.name: resolve(source) for source in spec.sources}
    files = {name: r.files for name, r in resolved.items()}
    lineage = DataLineage(spec_path=str(resolve_path(spec_path)), spec=spec.model_dump(mode="json"),
                          source_files=files, settings=settings_key(spec))
    base = find_base(spec.artifacts_path(), lineage.settings, files, full=verify) if incremental else None
    if base is not None and not base.new_files:
        progress(f"no new files since manifest version {base.manifest.data_version} ({base.manifest_dir}): "
                 f"nothing to do")
        if plan:
            return format_plan([PlanRow(base.artifact.stage, "all sources", "reuse", base.artifact.fingerprint,
                                        f"no new files since manifest version {base.manifest.data_version}")])
        return str(base.manifest_dir / "manifest.json")
    if base is not None:
        new = ", ".join(f"{len(fs)} in {s}" for s, fs in base.new_files.items())
        progress(f"incremental: new files ({new}) on top of manifest version {base.manifest.data_version} "
                 f"({base.manifest_dir}); the tokenizer is reused")

    steps = increment_steps(spec, resolved, base, lineage) if base else full_build_steps(spec, resolved, lineage)
    # The plan that starts a run checks reused artifacts by stat; with `verify` each step hashes as it is reached.
    rows = plan_steps(steps, full=plan and verify)
    table = format_plan(rows)
    progress(f"plan: {sum(r.decision == 'build' for r in rows)} of {len(rows)} stages to build\n{table}")
    publish_plan(rows)
    if plan:
        return table
    refs = run_steps(steps, verify)
    shards = refs[-1]
    manifest = str(shards.dir / "manifest.json")
    report(steps, refs, manifest)
    meta = shards.meta()
    if announce and meta.get("built_at", 0) >= started and meta["summary"].get("rows_added", 1) > 0:
        emit_event(event=MANIFEST_EVENT, resource={"prefect.resource.id": f"llm-pipeline.manifest.{shards.fingerprint}",
                                                   "prefect.resource.name": spec.name},
                   payload={"manifest": manifest, "spec_path": spec_path,
                            "data_version": ShardManifest.load(shards.dir).data_version})
        progress(f"announced new manifest {manifest} ({MANIFEST_EVENT})")
    return manifest


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
