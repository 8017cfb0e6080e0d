"""End to end through the Prefect UI: a pipeline run on a real Prefect server (its own SQLite database, UI on),
then the UI in headless Chromium shows the run, every stage as a named task run, and the artifacts.

Opt-in, since it starts its own server and runs the whole pipeline (about 4 minutes on 2 cores):
    LLM_PIPELINE_UI_TEST=1 .venv/bin/python -m pytest tests/test_ui.py      # or: make test-ui
Screenshots are saved under the test's tmp_path (printed) and, if set, $UI_SCREENSHOT_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from model.distributed import free_port
from tasks.spec import PROJECT_ROOT

from conftest import small_spec, write_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(os.environ.get("LLM_PIPELINE_UI_TEST") != "1", reason="opt-in: set LLM_PIPELINE_UI_TEST=1"),
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`)"),
]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--virtual-time-budget=20000", "--window-size=1440,1000"]
PIPELINE = """
import json, sys
from flows.pipeline import pipeline_flow
spec, runs, reports = sys.argv[1:4]
pretrain = {"steps": 20, "global_batch": 8, "micro_batch": 4, "warmup_steps": 2, "eval_every": 10,
            "eval_batches": 2, "log_every": 5, "save_every": 10}
sft = {"steps": 10, "global_batch": 8, "micro_batch": 4, "warmup_steps": 1, "eval_every": 5, "save_every": 5,
       "eval_batches": 2}
print(pipeline_flow(spec, pretrain_train=pretrain, sft_train=sft, runs_dir=runs, reports_dir=reports))
"""


@pytest.fixture
def ui_server(tmp_path):
    """`prefect server start` with the UI, on a free loopback port, with its own home and SQLite database."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_KEY", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"Prefect server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}", env
    finally:
        os.killpg(server.pid, 2)
        server.wait(timeout=30)
        log.close()


def api(base: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{base}/api{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def chromium(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it, if asked)."""
    args = [CHROMIUM, *CHROMIUM_FLAGS, *([f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]), url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return result.stdout


def test_pipeline_run_and_artifacts_are_visible_in_the_ui(ui_server, small_corpus, tmp_path):
    base, env = ui_server
    spec = small_spec(small_corpus, tmp_path / "artifacts", sharding={"seq_len": 64, "validation_fraction": 0.05})
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    run = subprocess.run([sys.executable, "-c", PIPELINE, str(spec_path), str(tmp_path / "runs"),
                          str(tmp_path / "reports")], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]

    flows = {f["id"]: f["name"] for f in api(base, "/flows/filter", {})}
    flow_runs = api(base, "/flow_runs/filter", {})
    (pipeline,) = [r for r in flow_runs if flows[r["flow_id"]] == "pipeline"]
    children = {flows[r["flow_id"]]: r for r in flow_runs if r["id"] != pipeline["id"]}
    assert {"data", "pretrain", "sft", "evaluate"} <= set(children)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    # The pipeline run's page names the run and its subflow runs.
    dom = chromium(f"{base}/runs/flow-run/{pipeline['id']}")
    assert pipeline["name"] in dom
    chromium(f"{base}/runs/flow-run/{pipeline['id']}", shots / "pipeline-run.png")

    # The data run lists every stage as a named task run.
    dom = chromium(f"{base}/runs/flow-run/{children['data']['id']}?tab=Task+Runs")
    for stage in ("download-sotu", "clean-kjv", "dedup-", "decontaminate-", "tokenizer-", "shard-", "report-"):
        assert stage in dom, stage
    chromium(f"{base}/runs/flow-run/{children['data']['id']}?tab=Task+Runs", shots / "data-task-runs.png")

    # Training publishes a progress artifact, a metrics table and a loss-curve image; the UI renders them.
    artifacts = {a["key"]: a for a in api(base, "/artifacts/filter", {}) if a["key"]}
    assert {"data-flow-stages", "pretrain-progress", "pretrain-metrics", "pretrain-loss-curve",
            "sft-loss-curve", "evaluation-report"} <= set(artifacts)
    assert artifacts["pretrain-progress"]["data"] == 100.0
    pretrain_task = artifacts["pretrain-progress"]["task_run_id"]
    assert artifacts["pretrain-progress"]["flow_run_id"] == children["pretrain"]["id"]
    dom = chromium(f"{base}/runs/task-run/{pretrain_task}?tab=Artifacts")
    for key in ("pretrain-progress", "pretrain-metrics", "pretrain-loss-curve"):
        assert key in dom, key
    chromium(f"{base}/runs/task-run/{pretrain_task}?tab=Artifacts", shots / "pretrain-artifacts.png")
    assert "100%" in chromium(f"{base}/artifacts/artifact/{artifacts['pretrain-progress']['id']}")
    dom = chromium(f"{base}/artifacts/artifact/{artifacts['pretrain-loss-curve']['id']}")
    assert "data:image/png;base64" in dom
    chromium(f"{base}/artifacts/artifact/{artifacts['pretrain-loss-curve']['id']}", shots / "loss-curve.png")

    for png in shots.iterdir():
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000, png  # a rendered page
    if os.environ.get("UI_SCREENSHOT_DIR"):
        shutil.copytree(shots, os.environ["UI_SCREENSHOT_DIR"], dirs_exist_ok=True)
    print(f"screenshots: {shots}")
