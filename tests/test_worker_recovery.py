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

from conftest import ROOT, fault_drill_env

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


def start_worker(env: dict, pool: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
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
def test_dead_ranks_launchers_and_workers_end_in_completed_or_crashed_runs_that_resume(own_server, tiny_manifest,
                                                                                       tmp_path):
    """Three deployment runs at once, faults made by model/train.py's drill:
    1. rank 0 SIGKILLs itself after step 6: the launch restarts the group, the flow run completes;
    2. torchrun itself is SIGKILLed after step 6: the pretrain task fails, Prefect retries it, it resumes;
    3. on a second work pool's worker, a longer run; once it has a checkpoint, that worker is killed with all it
       started: the automation marks the flow run Crashed, and the deployment run again on a new worker resumes
       the same run directory from that checkpoint."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pretrain import pretrain_flow

    url, env = own_server
    runs = tmp_path / "runs"
    train = {"steps": 12, "warmup_steps": 1, "global_batch": 8, "micro_batch": 4, "log_every": 1, "eval_every": 12,
             "save_every": 4}
    long = {**train, "steps": 150, "log_every": 10, "eval_every": 150, "save_every": 10}
    with temporary_settings({PREFECT_API_URL: url}):
        ensure_automations()
        ensure_automations()  # `make up` twice: still one automation
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name("crash-zombie-flow-runs")) == 1
            for pool in (POOL, f"{POOL}-2"):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        source = pretrain_flow.from_source(source=str(ROOT), entrypoint="flows/pretrain.py:pretrain_flow")
        for name, pool in (("recovery", POOL), ("lost-worker", f"{POOL}-2")):
            source.deploy(name=name, work_pool_name=pool, build=False, push=False,
                          parameters={"manifest": str(tiny_manifest / "manifest.json"), "runs_dir": str(runs)},
                          job_variables={"env": {"OMP_NUM_THREADS": "1"}})

        def state_of(run_id):
            with get_client(sync_client=True) as client:
                return client.read_flow_run(run_id).state

        def wait_for(run_id, states: set[str], timeout: float):
            deadline = time.monotonic() + timeout
            while (state := state_of(run_id)).type.value not in states:
                assert time.monotonic() < deadline, f"flow run still {state.name} after {timeout} s"
                time.sleep(2)
            return state

        def logs(run_id) -> list[str]:
            with get_client(sync_client=True) as client:
                return [log.message for log in client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[run_id])))]

        def run_dir_of(run_id) -> Path:
            (job,) = {m.split("-m model.train ")[1].split()[0] for m in logs(run_id) if m.startswith("launching: ")}
            return Path(job).parent

        workers = [start_worker(env, POOL, tmp_path / "worker-1.log"),
                   start_worker(env, f"{POOL}-2", tmp_path / "worker-2.log")]
        try:
            faults = {fault: run_deployment("pretrain/recovery", parameters={"run": {"train": {**train, "lr": lr}}}, timeout=0,
                                            job_variables={"env": {**fault_drill_env(fault), "OMP_NUM_THREADS": "1"}})
                      for fault, lr in (("kill:0:6", 3e-3), ("kill-launcher:0:6", 2e-3))}
            lost = run_deployment("pretrain/lost-worker", parameters={"run": {"train": long}}, timeout=0)
            deadline = time.monotonic() + 240
            while not any((d / "checkpoints" / "latest").is_file() for d in runs.glob("*")
                          if state_of(lost.id).is_running() and d.name in str(logs(lost.id))):
                assert time.monotonic() < deadline, "the long run did not checkpoint"
                time.sleep(1)
            long_dir = run_dir_of(lost.id)
            kill_tree(workers.pop())
            killed = time.monotonic()
            checkpoint = (long_dir / "checkpoints" / "latest").read_text().strip()
            workers.append(start_worker(env, f"{POOL}-2", tmp_path / "worker-3.log"))
            again = run_deployment("pretrain/lost-worker", parameters={"run": {"train": long}}, timeout=0)

            for fault, run in faults.items():
                state = wait_for(run.id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
                assert state.is_completed(), (fault, state, logs(run.id)[-20:])
                run_dir = run_dir_of(run.id)
                steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                assert steps == list(range(1, 13))  # one continuous curve
                assert "resumed from" in " ".join(logs(run.id))
            assert any("rank 0 died (exit code -9)" in m and "restarting the group" in m
                       for m in logs(faults["kill:0:6"].id))
            with get_client(sync_client=True) as client:
                (task_run,) = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[faults["kill-launcher:0:6"].id])),
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="pretrain")))
            assert task_run.run_count == 2 and task_run.state.is_completed()  # one Prefect retry

            crashed = wait_for(lost.id, {"CRASHED", "COMPLETED", "FAILED"}, MISSED_HEARTBEATS_S + 120)
            print(f"flow run marked {crashed.name} {time.monotonic() - killed:.0f} s after its worker was killed")
            assert crashed.type.value == "CRASHED" and "no heartbeat" in crashed.message
            state = wait_for(again.id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
            assert state.is_completed(), (state, logs(again.id)[-20:])
        finally:
            for worker in workers:
                kill_tree(worker)
        assert run_dir_of(again.id) == long_dir
        assert any(f"resumed from {long_dir}/checkpoints/{checkpoint}" in m for m in logs(again.id)), checkpoint
        steps = [json.loads(line)["step"] for line in (long_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 151))
