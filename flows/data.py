"""Data flow: download -> clean -> dedup -> decontaminate -> tokenizer -> Parquet shards, every stage cached by
content.

    python -m flows.data --spec data_specs/default.yaml
"""

from __future__ import annotations

import argparse
import time

from prefect import flow, get_run_logger
from prefect.events import emit_event

from tasks.artifacts import run_stage
from tasks.clean import clean
from tasks.decontaminate import decontaminate, reference_sets
from tasks.dedup import dedup
from tasks.download import download, resolve
from tasks.report import report
from tasks.shard import shard
from tasks.spec import load_spec, resolve_path
from tasks.tokenizer import tokenizer


MANIFEST_EVENT = "llm-pipeline.manifest.created"


@flow(name="data")
def data_flow(spec_path: str = "data_specs/default.yaml", announce: bool = False) -> str:
    """Build training shards for a data spec; returns the path of the shard manifest.

    With `announce` (the data deployment sets it), a manifest built by this run, not reused, is announced as a
    Prefect event, `llm-pipeline.manifest.created`, for automations and deployment triggers. Flows that call
    this one as a step (pretrain, pipeline) leave it off, so they never trigger a second run of their own work."""
    started = time.time()
    spec = load_spec(spec_path)
    artifacts_dir = str(spec.artifacts_path())
    refs, cleaned, files = [], {}, {}
    for source in spec.sources:
        resolved = resolve(source)
        files[source.name] = resolved.files
        downloaded = run_stage(download, resolved=resolved, num_files=spec.executor.tasks,
                               artifacts_dir=artifacts_dir)
        cleaned[source.name] = run_stage(clean, downloaded=downloaded, source_name=source.name,
                                         cleaning=spec.cleaning_for(source), executor=spec.executor,
                                         artifacts_dir=artifacts_dir)
        refs += [(source.name, downloaded), (source.name, cleaned[source.name])]
    deduped = run_stage(dedup, cleaned=cleaned, config=spec.dedup, executor=spec.executor,
                        artifacts_dir=artifacts_dir)
    documents = deduped
    if spec.decontamination.enabled:
        documents = run_stage(decontaminate, documents=deduped, references=reference_sets(spec.decontamination),
                              config=spec.decontamination, executor=spec.executor, artifacts_dir=artifacts_dir)
        refs.append(("all sources", deduped))
    trained = run_stage(tokenizer, documents=documents, config=spec.tokenizer, artifacts_dir=artifacts_dir)
    lineage = {"spec_path": str(resolve_path(spec_path)), "spec": spec.model_dump(mode="json"),
               "source_files": files, "upstream": {f"{ref.stage}/{name}": ref.fingerprint for name, ref in refs}}
    shards = run_stage(shard, documents=documents, tokenizer=trained, config=spec.sharding, lineage=lineage,
                       artifacts_dir=artifacts_dir)
    manifest = str(shards.dir / "manifest.json")
    report(refs + [("all sources", documents), ("all sources", trained), ("all sources", shards)], manifest)
    if announce and shards.meta().get("built_at", 0) >= started:
        emit_event(event=MANIFEST_EVENT, resource={"prefect.resource.id": f"llm-pipeline.manifest.{shards.fingerprint}",
                                                   "prefect.resource.name": spec.name},
                   payload={"manifest": manifest, "spec_path": spec_path})
        get_run_logger().info(f"announced new manifest {manifest} ({MANIFEST_EVENT})")
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
    args = parser.parse_args()
    require_server()
    print(data_flow(args.spec))
