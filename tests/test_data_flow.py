"""The data flow on a real Prefect server: caching, selective recomputation, and rebuilding broken artifacts."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.data import data_flow
from tasks.lib.manifest import ShardManifest

from conftest import bundled_docs, small_spec, write_jsonl, write_spec

pytestmark = pytest.mark.usefixtures("prefect_server")


def run_flow(spec_path: Path, incremental: bool = True, verify: bool = False) -> tuple[str, dict[str, str]]:
    """Run the data flow; return the manifest path and {task run name prefix: final state name}."""
    state = data_flow(str(spec_path), incremental=incremental, verify=verify, return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0] if run.name.split("-")[0] in ("dedup", "tokenizer", "shard", "append",
                                                                          "report") else run.name
        names[name] = run.state.name
    return state.result(), names


def planned(spec_path: Path, incremental: bool = True) -> dict[str, str]:
    """The data flow's plan, which builds nothing: {"stage (what)": "reuse <fp>" | "build <fp>  <reason>"}. Also
    checks that the run wrote nothing to the store and published the plan as a table artifact."""
    store = Path(yaml.safe_load(spec_path.read_text())["artifacts_dir"])
    before = sorted(store.rglob("*"))
    state = data_flow(str(spec_path), incremental=incremental, plan=True, return_state=True)
    assert sorted(store.rglob("*")) == before
    with get_client(sync_client=True) as client:
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-plan"])),
                                            flow_run_filter=this_run)
    lines = dict(re.fullmatch(r"(\w+ \(.*?\))\s+(.*)", line).groups() for line in state.result().splitlines())
    assert [f"{r['stage']} ({r['what']})" for r in json.loads(artifact.data)] == list(lines)
    print("\n".join(f"{k}  {v}" for k, v in lines.items()))
    return lines


def run_flow_full(spec_path: Path) -> tuple[str, dict[str, str]]:
    return run_flow(spec_path, incremental=False)


STAGES = ["download-sotu", "download-kjv", "clean-sotu", "clean-kjv", "dedup", "tokenizer", "shard"]


@pytest.mark.slow
def test_caching_recomputes_exactly_what_changed(small_corpus, tmp_path):
    spec = small_spec(small_corpus, tmp_path / "artifacts")
    spec_path = write_spec(tmp_path / "spec.yaml", spec)

    manifest_path, states = run_flow(spec_path)
    assert {states[s] for s in STAGES} == {"Completed"}
    manifest = ShardManifest.load(Path(manifest_path).parent)
    assert manifest.totals["rows_train"] > 0
    assert set(manifest.lineage.source_files) == {"sotu", "kjv"}

    # 1. Nothing changed: the same manifest comes back and no stage runs.
    again, states = run_flow(spec_path)
    assert again == manifest_path
    assert not set(STAGES) & set(states)

    # 2. One cleaning threshold of one source: that source's cleaning and everything after it recompute. The
    # plan says so first, naming the setting and the upstream artifact that differ.
    spec["sources"][1]["cleaning"]["gopher_quality"]["min_doc_words"] = 200
    write_spec(spec_path, spec)
    plan = planned(spec_path)
    assert [k for k, v in plan.items() if v.startswith("reuse ")] == ["download (sotu)", "clean (sotu)",
                                                                       "download (kjv)"]
    assert plan["clean (kjv)"].endswith("cleaning.gopher_quality.min_doc_words: 50 -> 200")
    assert re.search(r"upstream clean \w{8} -> \w{8}$", plan["dedup (all sources)"])
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

    # 5. The same bytes flipped with the size and mtime kept: reuse trusts the stat (the accepted blind spot), the
    # `verify` run hashes every file and rebuilds the shards.
    good, stat = shard.read_bytes(), shard.stat()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _, states = run_flow(spec_path)
    assert "shard" not in states and shard.read_bytes() != good
    _, states = run_flow(spec_path, verify=True)
    assert states["shard"] == "Completed" and states["tokenizer"] == "Cached" and shard.read_bytes() == good

    # 6. A new input file: a full build would download that source again, naming the file; the default
    # (incremental) run ingests only it.
    added = write_jsonl(small_corpus.parent / f"{tmp_path.name}-extra" / "part-1.jsonl", bundled_docs("sotu", 45)[40:])
    spec["sources"][0]["paths"].append(str(added))
    write_spec(spec_path, spec)
    plan = planned(spec_path, incremental=False)
    assert plan["download (sotu)"].endswith(f"input files new {added}")
    assert plan["download (kjv)"].startswith("reuse ")
    assert planned(spec_path)["download (sotu)"].startswith("build ")


@pytest.mark.slow
def test_new_files_are_ingested_incrementally(small_corpus, tmp_path, capsys):
    """A file added to a source: only it is downloaded and cleaned, its documents are deduplicated against
    everything ingested before, tokenized with the existing tokenizer, and appended as manifest version 2."""
    from model.data import TrainSamples

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    spec_path = write_spec(tmp_path / "spec.yaml", small_spec(corpus, tmp_path / "artifacts"))
    first_path, _ = run_flow(spec_path)
    first = ShardManifest.load(Path(first_path).parent)

    old = [json.loads(line) for line in (corpus / "sotu" / "part-0.jsonl").read_text().splitlines()]
    new = bundled_docs("sotu", 46)[40:] + [{**old[2], "id": "reposted-speech"}]
    write_jsonl(corpus / "sotu" / "part-1.jsonl", new)
    second_path, states = run_flow(spec_path)
    assert states["download-sotu"] == states["clean-sotu"] == "Completed"
    assert states["dedup"] == states["shard"] == states["append"] == "Completed"
    assert not {"download-kjv", "clean-kjv", "tokenizer"} & set(states)  # untouched source, tokenizer reused

    second = ShardManifest.load(Path(second_path).parent)
    assert (second.data_version, second.parent) == (2, str(Path(first_path).parent))
    assert second.tokenizer_sha256 == first.tokenizer_sha256
    old_shards = [(Path(first_path).parent / s.path).resolve() for s in first.shards]
    assert [(Path(second_path).parent / s.path).resolve() for s in second.shards][:len(old_shards)] == old_shards
    assert all(p.resolve().is_file() for p in (Path(second_path).parent / s.path for s in second.shards))
    assert second.totals["rows_train"] > first.totals["rows_train"]
    assert second.totals["docs_train"] + second.totals["docs_valid"] == \
        first.totals["docs_train"] + first.totals["docs_valid"] + len(new) - 1
    assert second.lineage.source_files["sotu"][-1][0] == str(corpus / "sotu" / "part-1.jsonl")
    assert second.lineage.increments[0].new_files["sotu"][0][0] == str(corpus / "sotu" / "part-1.jsonl")

    dedup_dir = Path(second.lineage.dedup_dir)
    kept = sum(1 for p in (dedup_dir / "docs").rglob("*.jsonl.gz") for _ in gzip.open(p))
    assert kept == len(new) - 1  # only the new file was read
    removed = [json.loads(line)["id"] for p in (dedup_dir / "removed/exact").rglob("*.jsonl.gz")
               for line in gzip.open(p, "rt")]
    assert removed == ["sotu/reposted-speech"]  # a repeat of an already-ingested speech
    TrainSamples(Path(second_path).parent, seed=0).batch(0, 64)  # training reads old and new shards

    # A file whose every document fails cleaning: version 3 records the file, adds no rows, and does not fail.
    write_jsonl(corpus / "kjv" / "part-1.jsonl", [{"id": "junk", "text": "Click here. Click here now."}])
    third_path, states = run_flow(spec_path)
    third = ShardManifest.load(Path(third_path).parent)
    assert (third.data_version, third.totals, len(third.shards)) == (3, second.totals, len(second.shards))

    again, states = run_flow(spec_path)  # nothing new since version 3
    assert again == third_path and not {"dedup", "shard", "append"} & set(states)

    rebuilt, states = run_flow_full(spec_path)  # asked to: everything from all files, new tokenizer
    assert states["tokenizer"] == "Completed" and ShardManifest.load(Path(rebuilt).parent).data_version == 1

    # Garbage collection: the newest manifest and what it was built from are kept, and so is version 2, which a
    # training run used, with the earlier shards it lists; version 3 and what only it used go.
    from tasks.gc import collect, main as gc_main

    artifacts, runs = tmp_path / "artifacts", tmp_path / "runs"
    state = runs / "tiny-x" / "checkpoints" / "step-000001" / "train_state.json"
    state.parent.mkdir(parents=True)
    imports = [artifacts / "import_hf" / (str(i) * 20) for i in (1, 2)]  # an imported model a run started from
    for path in imports:
        (path / "checkpoint").mkdir(parents=True)
        (path / "_artifact.json").write_text(json.dumps({"stage": "import_hf", "built_at": 0, "files": {}}))
    ids = lambda path: f"{Path(path).parent.parent.name}/{Path(path).parent.name}"  # noqa: E731
    # What the trainer records (tasks/train.py store_inputs): the manifest's artifact and the import's.
    state.write_text(json.dumps({"step": 1, "manifest": str(Path(second_path).parent),
                                 "start": {"kind": "hf_import", "checkpoint": str(imports[0] / "checkpoint")},
                                 "inputs": [ids(second_path), "import_hf/" + "1" * 20]}))
    failed = artifacts / "clean" / "failed-0123456789abcdef0123"  # a failed build's files, however recent
    failed.mkdir()
    (failed / "quarantine.jsonl").write_text("{}\n")
    assert failed in [a.path for a in collect(artifacts, runs, keep=1, min_age_hours=24)[1]]
    kept, garbage = collect(artifacts, runs, keep=1, min_age_hours=0)
    assert {ids(rebuilt), ids(second_path), ids(first_path)} <= set(kept)
    assert kept["import_hf/" + "1" * 20] == kept[ids(second_path)] == "read by tiny-x"
    assert "import_hf/" + "2" * 20 in {a.id for a in garbage}
    assert ids(third_path) in {a.id for a in garbage} and not {ids(rebuilt), ids(second_path)} & {a.id for a in garbage}
    assert {a.id.split("/")[0] for a in garbage} >= {"append", "dedup", "shard"}  # v3, its dedup and its added shards
    gc_main(["--artifacts", str(artifacts), "--runs", str(runs), "--min-age-hours", "0"])  # a dry run
    assert all(a.path.is_dir() for a in garbage)
    gc_main(["--artifacts", str(artifacts), "--runs", str(runs), "--min-age-hours", "0", "--delete"])
    assert not any(a.path.exists() for a in garbage)
    assert collect(artifacts, runs, keep=1, min_age_hours=0)[1] == []
    again, states = run_flow(spec_path)  # what was kept is whole: nothing is rebuilt
    assert again == rebuilt and not {"download-sotu", "dedup", "tokenizer", "shard", "append"} & set(states)

    # `tasks.gc --verify` hashes every file: a kept shard flipped under its old size and mtime is found corrupt.
    shard = Path(rebuilt).parent / ShardManifest.load(Path(rebuilt).parent).shards[0].path
    stat, data = shard.stat(), bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    gc_main(["--artifacts", str(artifacts), "--runs", str(runs), "--verify"])
    assert f"corrupt {ids(rebuilt)}: {shard} fails its sha256 check" in capsys.readouterr().out


def deployment(name: str) -> dict:
    """A deployment of prefect.yaml, by its `flow/name`."""
    import yaml

    from tasks.spec import PROJECT_ROOT

    flow_of = {"data_flow": "data", "pretrain_flow": "pretrain"}
    for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]:
        if f"{flow_of.get(d['entrypoint'].split(':')[1])}/{d['name']}" == name:
            return d
    raise KeyError(name)


@pytest.mark.slow
def test_new_data_triggers_exactly_one_continued_pretraining(small_corpus, tmp_path):
    """prefect.yaml's pretrain/continue trigger, on a real server: adding a file and running the data deployment
    announces the new manifest version once, which schedules exactly one continued-pretraining run with it; that
    run starts from the latest checkpoint. Cached re-runs and the data flow as a step announce nothing."""
    import time

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.pretrain import pretrain_flow
    from model.checkpoint import read_train_state, resolve_checkpoint
    from tasks.lineage import lineage

    continued = deployment("pretrain/continue")
    (trigger,) = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                  for t in continued["triggers"]]
    deployment_id = pretrain_flow.to_deployment(name=f"continue-{tmp_path.name}", triggers=[trigger],
                                                parameters=continued["parameters"]).apply()
    announce = deployment("data/default")["parameters"]["announce"]

    def triggered_runs(expected: int) -> list:
        for _ in range(30):  # the trigger fires within about a second of the event
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))
            if len(runs) >= expected:
                break
            time.sleep(0.5)
        time.sleep(2)  # and no more arrive
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    spec = small_spec(corpus, tmp_path / "artifacts", sharding={"seq_len": 64, "validation_fraction": 0.05})
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    runs_dir = str(tmp_path / "runs")
    train = {"steps": 12, "global_batch": 8, "micro_batch": 4, "warmup_steps": 2, "eval_every": 6,
             "eval_batches": 2, "log_every": 6, "save_every": 6}
    first_run = pretrain_flow(str(spec_path), {"train": train}, runs_dir=runs_dir)  # data flow as a step: no event
    assert triggered_runs(0) == []

    write_jsonl(corpus / "sotu" / "part-1.jsonl", bundled_docs("sotu", 44)[40:])
    manifest = data_flow(str(spec_path), announce=announce)  # new data: manifest version 2, announced
    assert ShardManifest.load(Path(manifest).parent).data_version == 2
    (run,) = triggered_runs(1)
    assert run.parameters["manifest"] == manifest and run.parameters["continue_from"] == "latest"
    assert data_flow(str(spec_path), announce=announce) == manifest  # nothing new: not announced again
    assert len(triggered_runs(1)) == 1

    # What the worker would run: the deployment's parameters with the event's filled in.
    params = {**run.parameters, "run": {**run.parameters["run"], "train": train}, "runs_dir": runs_dir}
    second_run = pretrain_flow(**params)
    state = read_train_state(resolve_checkpoint(second_run))
    assert (state["step"], Path(state["manifest"])) == (12, Path(manifest).parent)
    assert state["start"] == {"kind": "checkpoint", "checkpoint": str(resolve_checkpoint(first_run))}
    info = lineage(second_run)
    assert info["start"] == "checkpoint" and info["initialised_from"]["checkpoint"] == state["start"]["checkpoint"]
    assert info["manifest"]["data_version"] == 2
    assert info["increments"][0]["new_files"]["sotu"][0][0] == str(corpus / "sotu" / "part-1.jsonl")
    assert pretrain_flow(**params) == second_run  # the same event again resumes that run, it does not chain


def test_continuing_across_tokenizers_is_refused(tmp_path, tiny_manifest):
    """A checkpoint cannot continue on a manifest tokenized differently; the error says why and what to do."""
    from tasks.lib.runs import continuation_checkpoint

    other = tmp_path / "other"
    other.mkdir()
    manifest = ShardManifest.load(tiny_manifest).model_copy(update={"tokenizer_sha256": "0" * 64})
    (other / "manifest.json").write_text(manifest.model_dump_json())
    checkpoint = tmp_path / "runs" / "tiny-x" / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps({"step": 1, "manifest": str(tiny_manifest)}))
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        continuation_checkpoint(str(checkpoint), str(other / "manifest.json"), str(tmp_path / "runs"))
    assert continuation_checkpoint(str(checkpoint), str(tiny_manifest / "manifest.json"), "") == str(checkpoint)
