"""One table for the whole data flow: what each stage took in and gave out, and whether it was reused."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.artifacts import ArtifactRef, get_logger


def stage_rows(refs: list[tuple[str, ArtifactRef]]) -> list[dict]:
    rows = []
    for label, ref in refs:
        meta = ref.meta()
        s = meta["summary"]
        rows.append({"stage": ref.stage, "what": label,
                     "docs in": s.get("docs_in", s.get("records", "")),
                     "docs out": s.get("docs_out", s.get("docs", s.get("docs_train", ""))),
                     "MB in": _mb(s.get("bytes_in")), "MB out": _mb(s.get("bytes_out", s.get("bytes"))),
                     "quarantined/dropped": s.get("quarantined", s.get("dropped", s.get("removed", ""))),
                     "tokens": s.get("tokens", ""), "seconds": s.get("seconds", ""),
                     "built": meta["created"], "artifact": ref.fingerprint})
    return rows


def _mb(value) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, (int, float)) else ""


@task(name="report")
def report(refs: list[tuple[str, ArtifactRef]], manifest_path: str) -> list[dict]:
    rows = stage_rows(refs)
    create_table_artifact(key="data-flow-stages", table=rows, description="Data flow: every stage's artifact")
    create_markdown_artifact(key="data-flow-manifest",
                             markdown=f"Training shards manifest: `{manifest_path}`\n\nA stage whose `built` time "
                                      f"is older than this run was reused from its verified artifact.")
    log = get_logger()
    for r in rows:
        log.info(" | ".join(f"{k}={v}" for k, v in r.items() if k != "artifact"))
    return rows
