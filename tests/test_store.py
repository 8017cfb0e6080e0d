"""The artifact store under crashes and concurrency: a killed build leaves nothing behind once a stage runs
again, and two runs of the same stage at once build it once."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib.artifacts import TMP_PREFIX, remove_stale_temporaries, verify

from conftest import ROOT, bundled_docs

SCRIPT = ROOT / "tests" / "scripts" / "build_data.py"
STAGES = ("download", "clean", "dedup", "decontaminate", "tokenizer", "shard")


@pytest.fixture(scope="module")
def raw_documents(tmp_path_factory) -> Path:
    """A local source: two files of bundled documents, small enough (under 512 KB) for every stage to run its
    datatrove tasks in the stage's own process, as incremental ingests do."""
    root = tmp_path_factory.mktemp("raw")
    for source, count in (("sotu", 10), ("kjv", 150)):
        with gzip.open(root / f"{source}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in bundled_docs(source, count))
    return root


def build(documents: Path, artifacts: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(documents), str(artifacts)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen) -> tuple[Path, str]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return Path(out.strip().splitlines()[-1]), out


def shard_bytes(artifact: Path) -> dict[str, bytes]:
    return {str(p.relative_to(artifact)): p.read_bytes() for p in sorted(artifact.rglob("*.parquet"))}


def temporaries(folder: Path) -> list[Path]:
    """Every hidden folder in a stage directory (builds in progress and any scratch space beside them)."""
    return [p for p in folder.glob("*/.*") if p.is_dir()]


@pytest.mark.slow
def test_sigkill_in_each_stage_then_rerun_gives_the_same_bytes_and_no_leftovers(raw_documents, tmp_path):
    """The data stages run in order; the run is killed at a random point of each stage's build in turn. Each next
    run removes the killed build's temporary directory and builds that stage again, and the last one gives the
    shards of an uninterrupted run."""
    reference, _ = finish(build(raw_documents, tmp_path / "reference"))
    store = tmp_path / "crashed"
    for stage in STAGES:
        for attempt in range(3):
            before = tmp_path / "before"
            shutil.rmtree(before, ignore_errors=True)
            if store.exists():
                shutil.copytree(store, before, symlinks=True)
            proc = build(raw_documents, store, start_new_session=True)
            while not list((store / stage).glob(f"{TMP_PREFIX}*")):
                assert proc.poll() is None, f"the run ended before the {stage} stage began: {proc.stdout.read()}"
                time.sleep(0.002)
            time.sleep(random.uniform(0, 0.3) if attempt == 0 else 0)
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            if list((store / stage).glob(f"{TMP_PREFIX}*")):
                break  # killed inside this stage's build
            shutil.rmtree(store)  # it finished first: start again from the state before, and kill at once
            if before.exists():
                shutil.copytree(before, store, symlinks=True)
        else:
            pytest.fail(f"could not kill the run inside the {stage} stage")
        assert [t.parent.name for t in temporaries(store)] == [stage]
        if stage != STAGES[0]:  # this run first rebuilt the stage killed before, removing its leftovers
            assert "left by a run that no longer exists" in out
    built, out = finish(build(raw_documents, store))
    assert "left by a run that no longer exists" in out
    assert not temporaries(store)
    assert verify(built) is None and shard_bytes(built) == shard_bytes(reference)


@pytest.mark.slow
def test_two_concurrent_runs_build_each_stage_once(raw_documents, tmp_path):
    """Started together, the runs build each stage once between them: for each stage, one run builds it and the
    other waits on the fingerprint's lock, then reuses the output."""
    runs = [build(raw_documents, tmp_path / "store"), build(raw_documents, tmp_path / "store")]
    (one, one_log), (two, two_log) = (finish(run) for run in runs)
    assert one == two and verify(one) is None
    for stage in STAGES:
        built = [log for log in (one_log, two_log) if f"{stage}: built " in log]
        assert len(built) == 1, f"{stage} built {len(built)} times"
    assert "another run is building" in one_log + two_log and "built meanwhile by another run" in one_log + two_log


def test_only_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path):
    alive = tmp_path / f"{TMP_PREFIX}abc123-{os.uname().nodename}-{os.getpid()}"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f"{TMP_PREFIX}abc123-{os.uname().nodename}-{dead_pid}"
    elsewhere = tmp_path / f"{TMP_PREFIX}abc123-some-other-host-{dead_pid}"
    for d in (alive, dead, elsewhere):
        d.mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == [dead]
    assert alive.exists() and elsewhere.exists()


@pytest.mark.slow
def test_the_same_spec_under_two_stores_gives_the_same_fingerprints_and_shards(raw_documents, tmp_path):
    """Nothing in a key depends on where the store lives: upstream artifacts are keyed by fingerprint."""
    one, two = (finish(build(raw_documents, tmp_path / name))[0] for name in ("one", "two"))
    fingerprints = lambda store: sorted(p.relative_to(store) for p in store.glob("*/*") if p.is_dir())  # noqa: E731
    assert fingerprints(tmp_path / "one") == fingerprints(tmp_path / "two")
    assert one.relative_to(tmp_path / "one") == two.relative_to(tmp_path / "two")
    assert shard_bytes(one) == shard_bytes(two) and shard_bytes(one)
