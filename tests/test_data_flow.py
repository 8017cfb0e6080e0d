"""The data flow on a real Prefect server: caching, selective recomputation, and rebuilding broken artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.data import data_flow
from tasks.shard import ShardManifest

from conftest import small_spec, write_spec

pytestmark = pytest.mark.usefixtures("prefect_server")


def run_flow(spec_path: Path) -> tuple[str, dict[str, str]]:
    """Run the data flow; return the manifest path and {task run name prefix: final state name}."""
    state = data_flow(str(spec_path), return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0] if run.name.split("-")[0] in ("dedup", "tokenizer", "shard", "report") else run.name
        names[name] = run.state.name
    return state.result(), names


STAGES = ["download-sotu", "download-kjv", "clean-sotu", "clean-kjv", "dedup", "tokenizer", "shard"]


@pytest.mark.slow
def test_caching_recomputes_exactly_what_changed(small_corpus, tmp_path):
    spec = small_spec(small_corpus, tmp_path / "artifacts")
    spec_path = write_spec(tmp_path / "spec.yaml", spec)

    manifest_path, states = run_flow(spec_path)
    assert {states[s] for s in STAGES} == {"Completed"}
    manifest = ShardManifest.load(Path(manifest_path).parent)
    assert manifest.totals["rows_train"] > 0
    assert set(manifest.lineage["source_files"]) == {"sotu", "kjv"}

    # 1. Nothing changed: every stage is a cache hit and the same manifest comes back.
    again, states = run_flow(spec_path)
    assert again == manifest_path
    assert {s: states[s] for s in STAGES} == {s: "Cached" for s in STAGES}

    # 2. One cleaning threshold of one source: that source's cleaning and everything after it recompute.
    spec["sources"][1]["cleaning"]["gopher_quality"]["min_doc_words"] = 200
    write_spec(spec_path, spec)
    changed, states = run_flow(spec_path)
    assert changed != manifest_path
    assert [states[s] for s in ("download-sotu", "download-kjv", "clean-sotu")] == ["Cached"] * 3
    assert [states[s] for s in ("clean-kjv", "dedup", "tokenizer", "shard")] == ["Completed"] * 4

    # 3. A deleted artifact is rebuilt, not returned from the cache; downstream stays cached (same fingerprint).
    tokenizer_dir = Path(changed).parent.parent.parent / "tokenizer"
    (victim,) = [d for d in tokenizer_dir.iterdir() if d.name in Path(changed).read_text()]
    shutil.rmtree(victim)
    rebuilt, states = run_flow(spec_path)
    assert rebuilt == changed and states["tokenizer"] == "Completed" and states["shard"] == "Cached"
    assert (victim / "tokenizer.model").is_file()

    # 4. A corrupted shard fails its checksum and is rebuilt.
    shard = Path(changed).parent / ShardManifest.load(Path(changed).parent).shards[0].path
    shard.write_bytes(b"corrupted")
    _, states = run_flow(spec_path)
    assert states["shard"] == "Completed" and states["tokenizer"] == "Cached"
    assert shard.read_bytes()[:4] == b"PAR1"


@pytest.mark.slow
def test_new_file_in_a_source_recomputes_that_source(small_corpus, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    spec_path = write_spec(tmp_path / "spec.yaml", small_spec(corpus, tmp_path / "artifacts"))
    run_flow(spec_path)
    extra = json.loads((corpus / "sotu" / "part-0.jsonl").read_text().splitlines()[0])
    extra["id"] = "new-speech"
    extra["text"] = extra["text"].replace("Senate", "Congress")[: len(extra["text"]) // 2]
    (corpus / "sotu" / "part-1.jsonl").write_text(json.dumps(extra) + "\n")
    _, states = run_flow(spec_path)
    assert states["download-sotu"] == "Completed" and states["clean-sotu"] == "Completed"
    assert states["download-kjv"] == "Cached" and states["clean-kjv"] == "Cached"


@pytest.mark.slow
def test_new_manifest_is_announced_once_and_triggers_one_run(small_corpus, tmp_path):
    """The data deployment announces a newly built manifest; a deployment trigger on that event gets exactly one
    run per new manifest: none for a cached re-run, none when the flow runs as a step of another flow."""
    import time

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.data import MANIFEST_EVENT
    from flows.pretrain import pretrain_flow

    trigger = DeploymentEventTrigger(expect={MANIFEST_EVENT}, match={"prefect.resource.id": "llm-pipeline.manifest.*"},
                                     parameters={"spec_path": "{{ event.payload.spec_path }}"})
    deployment_id = pretrain_flow.to_deployment(name=f"on-new-data-{tmp_path.name}", triggers=[trigger]).apply()

    def triggered_runs(expected: int) -> list:
        for _ in range(30):  # the trigger fires within about a second of the event
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id={"any_": [deployment_id]}))
            if len(runs) >= expected:
                break
            time.sleep(0.5)
        time.sleep(2)  # and no more arrive
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    spec_path = write_spec(tmp_path / "spec.yaml", small_spec(corpus, tmp_path / "artifacts"))
    data_flow(str(spec_path))  # as a step of another flow: built, not announced
    assert triggered_runs(0) == []
    (corpus / "sotu" / "part-1.jsonl").write_text(json.dumps({"id": "new", "text": (corpus / "sotu" / "part-0.jsonl")
                                                              .read_text().splitlines()[3]}) + "\n")
    manifest = data_flow(str(spec_path), announce=True)  # new data: a new manifest, announced
    runs = triggered_runs(1)
    assert len(runs) == 1 and runs[0].parameters["spec_path"] == str(spec_path)
    assert data_flow(str(spec_path), announce=True) == manifest  # nothing new: cached, not announced
    assert len(triggered_runs(1)) == 1
