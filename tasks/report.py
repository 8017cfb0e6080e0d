"""One table for the whole data flow: what each stage took in and gave out, and whether it was reused."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.lib.artifacts import ArtifactRef, stage_row
from tasks.lib.log import get_logger


@task(name="report")
def report(refs: list[tuple[str, ArtifactRef]], manifest_path: str) -> list[dict]:
    rows = [stage_row(label, ref) for label, ref in refs]
    create_table_artifact(key="data-flow-stages", table=rows, description="Data flow: every stage's artifact")
    create_markdown_artifact(key="data-flow-manifest",
                             markdown=f"Training shards manifest: `{manifest_path}`\n\nA stage whose `built` time "
                                      f"is older than this run was reused from its verified artifact.")
    log = get_logger()
    for r in rows:
        log.info(" | ".join(f"{k}={v}" for k, v in r.items() if k != "artifact"))
    return rows
