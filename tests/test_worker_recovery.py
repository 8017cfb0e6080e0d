"""Crashes through a real Prefect server and a real process worker, with no hand on the run: a rank that dies
is restarted and the flow run completes by itself; a worker killed with its flow run (a lost machine) leaves a run
that the `make up` automation (scripts/automations.py) marks Crashed, and a re-run resumes the same training run
from its latest checkpoint.

The test starts its own server (the session's serves other tests), the project's prefect.toml applies (30 s
heartbeats), and the automation is the one `make up` creates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from model.distributed import free_port

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from automations import MISSED_HEARTBEATS_S, ensure_automations  # noqa: E402

POOL = "recovery-test"


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A `prefect server start` of its own (SQLite in a temporary PREFECT_HOME), with its services: the
    automation runs in them. Yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], cwd=ROOT, env=env, stdout=open(home / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, (home / "server.log").read_text()[-3000:]
            time.sleep(1)
    try:
        yield url, env
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                             "--name", log.stem], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it, as a lost machine would: the worker, its flow run, torchrun
    and the ranks (which torchrun starts in sessions of their own)."""
    tree = psutil.Process(proc.pid)
    victims = [tree, *tree.children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=10)
    proc.wait()


@pytest.mark.slow
def test_a_dead_rank_and_a_dead_worker_end_in_completed_and_crashed_runs_that_resume(own_server, tiny_manifest,
                                                                                     tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pretrain import pretrain_flow

    url, env = own_server
    runs = tmp_path / "runs"
    manifest = str(tiny_manifest / "manifest.json")
    train = {"steps": 12, "warmup_steps": 1, "global_batch": 8, "micro_batch": 4, "log_every": 1, "eval_every": 12,
             "save_every": 4}
    with temporary_settings({PREFECT_API_URL: url}):
        ensure_automations()
        ensure_automations()  # `make up` twice: still one automation
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name("crash-zombie-flow-runs")) == 1
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        pretrain_flow.from_source(source=str(ROOT), entrypoint="flows/pretrain.py:pretrain_flow").deploy(
            name="recovery", work_pool_name=POOL, build=False, push=False,
            parameters={"manifest": manifest, "runs_dir": str(runs)},
            job_variables={"env": {"OMP_NUM_THREADS": "1"}})

        def wait_for(run_id, states: set[str], timeout: float):
            deadline = time.monotonic() + timeout
            while True:
                with get_client(sync_client=True) as client:
                    run = client.read_flow_run(run_id)
                if run.state.type.value in states:
                    return run
                assert time.monotonic() < deadline, f"flow run still {run.state.name} after {timeout} s"
                time.sleep(2)

        def logs(run_id) -> list[str]:
            with get_client(sync_client=True) as client:
                return [log.message for log in client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[run_id])))]

        worker = start_worker(env, tmp_path / "worker-1.log")
        try:
            # 1. Rank 0 SIGKILLs itself after step 6: the launch restarts the group, the flow run completes.
            first = run_deployment("pretrain/recovery", parameters={"train": train}, timeout=0,
                                   job_variables={"env": {"TRAIN_FAULT": "kill:0:6", "OMP_NUM_THREADS": "1"}})
            done = wait_for(first.id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
            assert done.state.is_completed(), (done.state, logs(first.id)[-20:])
            (run_dir,) = runs.iterdir()
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert steps == list(range(1, 13))  # one continuous curve
            assert any("rank 0 died (exit code -9)" in m and "restarting the group" in m for m in logs(first.id))

            # 2. A longer run; once it has a checkpoint, the worker dies with everything it started.
            long = {**train, "steps": 150, "log_every": 10, "eval_every": 150, "save_every": 10}
            second = run_deployment("pretrain/recovery", parameters={"train": long}, timeout=0)
            wait_for(second.id, {"RUNNING"}, 120)
            deadline = time.monotonic() + 180
            while not (latest := [d for d in runs.iterdir() if d != run_dir and (d / "checkpoints" / "latest").is_file()]):
                assert time.monotonic() < deadline, "training did not checkpoint"
                time.sleep(1)
        finally:
            kill_tree(worker)
        killed = time.monotonic()
        (long_dir,) = latest
        crashed = wait_for(second.id, {"CRASHED", "COMPLETED", "FAILED"}, MISSED_HEARTBEATS_S + 120)
        print(f"flow run marked {crashed.state.name} {time.monotonic() - killed:.0f} s after the worker was killed")
        assert crashed.state.type.value == "CRASHED" and "no heartbeat" in crashed.state.message
        checkpoint = (long_dir / "checkpoints" / "latest").read_text().strip()

        # 3. A new worker, the deployment run again: the same run directory resumes from its checkpoint.
        worker = start_worker(env, tmp_path / "worker-2.log")
        try:
            third = run_deployment("pretrain/recovery", parameters={"train": long}, timeout=0)
            done = wait_for(third.id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
            assert done.state.is_completed(), (done.state, logs(third.id)[-20:])
        finally:
            kill_tree(worker)
        assert sorted(runs.iterdir()) == sorted([run_dir, long_dir])
        assert any(f"resumed from {long_dir}/checkpoints/{checkpoint}" in m for m in logs(third.id)), checkpoint
        steps = [json.loads(line)["step"] for line in (long_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 151))
