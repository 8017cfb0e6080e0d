"""The artifact store under crashes and concurrency: a killed build leaves nothing behind once a stage runs
again, and two runs of the same stage at once build it once."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib.artifacts import TMP_PREFIX, remove_stale_temporaries, verify
from tasks.spec import TokenizerConfig
from tasks.tokenizer import train_tokenizer

from conftest import bundled_docs
from test_model import ROOT

SCRIPT = ROOT / "tests" / "scripts" / "build_shard.py"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[Path, Path]:
    """(a dedup-shaped documents artifact, a tokenizer artifact) made by the real stage functions."""
    root = tmp_path_factory.mktemp("upstream")
    for source, count in (("sotu", 40), ("kjv", 300)):
        (root / "docs" / "docs" / source).mkdir(parents=True)
        with gzip.open(root / "docs" / "docs" / source / "00000.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in bundled_docs(source, count))
    (root / "tokenizer").mkdir()
    train_tokenizer(root / "docs" / "docs", TokenizerConfig(vocab_size=1000), 10**9, root / "tokenizer")
    return root / "docs", root / "tokenizer"


def build(upstream, artifacts: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(upstream[0]), str(upstream[1]), str(artifacts)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen) -> tuple[Path, str]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return Path(out.strip().splitlines()[-1]), out


def shard_bytes(artifact: Path) -> dict[str, bytes]:
    return {str(p.relative_to(artifact)): p.read_bytes() for p in sorted(artifact.rglob("*.parquet"))}


@pytest.mark.slow
def test_sigkill_mid_build_then_rerun_gives_the_same_bytes_and_no_leftovers(upstream, tmp_path):
    reference, _ = finish(build(upstream, tmp_path / "reference"))
    stage_dir = tmp_path / "crashed" / "shard"
    for attempt in range(2):  # a random point of the build, twice
        proc = build(upstream, tmp_path / "crashed", start_new_session=True)
        while not list(stage_dir.glob(f"{TMP_PREFIX}*")):
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:  # it finished first; the next attempt must still pass
            continue
        assert list(stage_dir.glob(f"{TMP_PREFIX}*")), "a killed build leaves its temporary directory"
        built, out = finish(build(upstream, tmp_path / "crashed"))
        assert "left by a run that no longer exists" in out
        assert not list(stage_dir.glob(f"{TMP_PREFIX}*"))
        assert verify(built) is None and shard_bytes(built) == shard_bytes(reference)
        for path in built.parent.iterdir():  # the next attempt starts from nothing
            if path.is_dir():
                subprocess.run(["rm", "-rf", str(path)], check=True)


@pytest.mark.slow
def test_two_concurrent_runs_build_the_stage_once(upstream, tmp_path):
    """Started together, one run builds; the other waits on the fingerprint's lock, then reuses the output."""
    runs = [build(upstream, tmp_path / "store"), build(upstream, tmp_path / "store")]
    (one, one_log), (two, two_log) = (finish(run) for run in runs)
    assert one == two and verify(one) is None
    logs = sorted([one_log, two_log], key=lambda log: ": built " in log, reverse=True)
    assert ": built " in logs[0] and ": built " not in logs[1]
    assert "another run is building" in logs[1] and "built meanwhile by another run" in logs[1]


def test_only_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path):
    alive = tmp_path / f"{TMP_PREFIX}abc123-{os.uname().nodename}-{os.getpid()}"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f"{TMP_PREFIX}abc123-{os.uname().nodename}-{dead_pid}"
    old_style = tmp_path / f"{TMP_PREFIX}abc123-{dead_pid}"
    elsewhere = tmp_path / f"{TMP_PREFIX}abc123-some-other-host-{dead_pid}"
    for d in (alive, dead, old_style, elsewhere):
        d.mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, old_style])
    assert alive.exists() and elsewhere.exists()
