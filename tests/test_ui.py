"""End to end through the Prefect UI: a pipeline run on a real Prefect server (its own SQLite database, UI on),
then the UI in headless Chromium (driven over its DevTools protocol, as a person clicks) shows the run, every stage
as a named task run, and the artifacts.

Opt-in, since it starts its own server and runs the whole pipeline (about 4 minutes on 2 cores):
    LLM_PIPELINE_UI_TEST=1 .venv/bin/python -m pytest tests/test_ui.py      # or: make test-ui
Screenshots are saved under the test's tmp_path (printed) and, if set, $UI_SCREENSHOT_DIR.
"""

from __future__ import annotations

import base64
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
                  "--window-size=1440,1000", "--no-first-run"]
PIPELINE = """
import json, sys
from flows.pipeline import pipeline_flow
spec, runs, reports = sys.argv[1:4]
pretrain = {"steps": 20, "global_batch": 8, "micro_batch": 4, "warmup_steps": 2, "eval_every": 10,
            "eval_batches": 2, "log_every": 5, "save_every": 10}
sft = {"steps": 10, "global_batch": 8, "micro_batch": 4, "warmup_steps": 1, "eval_every": 5, "save_every": 5,
       "eval_batches": 2}
print(pipeline_flow(spec, pretrain={"train": pretrain}, sft={"train": sft}, runs_dir=runs, reports_dir=reports))
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


class Browser:
    """Headless Chromium driven over the DevTools protocol: open a page, wait until its text shows something,
    click what a person would click, read the rendered text, take a screenshot."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        port = free_port()
        self.process = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                         f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(60):
            try:
                pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                time.sleep(0.5)
        else:
            self.process.kill()
            pytest.fail("Chromium did not open its DevTools port")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.ids = iter(range(1, 10**9))

    def send(self, method: str, **params) -> dict:
        call = next(self.ids)
        self.socket.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == call:
                assert "error" not in message, message
                return message["result"]

    def run(self, script: str):
        return self.send("Runtime.evaluate", expression=script, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.run("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, shows: str) -> str:
        """Go to `url` and wait until the rendered page text contains `shows`; returns that text."""
        self.send("Page.navigate", url=url)
        return self.wait_for(shows)

    def wait_for(self, shows: str) -> str:
        """Wait until the rendered text contains `shows`; returns that text."""
        self.wait_until(f"document.body && document.body.innerText.includes({json.dumps(shows)})", repr(shows))
        return self.text()

    def wait_until(self, script: str, what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not self.run(script):
            if time.monotonic() > deadline:
                pytest.fail(f"the page never showed {what}; it shows:\n{self.text()[:3000]}")
            time.sleep(0.5)

    def click(self, label: str) -> None:
        """Click the innermost element whose whole visible text is `label` (a tab, a button)."""
        clicked = self.run(f"""(() => {{
            const all = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]
                .filter(e => e.innerText && e.innerText.trim() === {json.dumps(label)} && e.offsetParent !== null);
            const inner = all.filter(e => !all.some(o => o !== e && e.contains(o)));
            if (!inner.length) return false;
            inner[0].click();
            return true;
        }})()""")
        assert clicked, f"nothing to click labelled {label!r}"

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.kill()
        self.process.wait(timeout=30)


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
    browser = Browser(tmp_path / "chromium-profile")
    try:
        # The pipeline run's page names the run and its subflow runs.
        browser.open(f"{base}/runs/flow-run/{pipeline['id']}", shows=pipeline["name"])
        browser.screenshot(shots / "pipeline-run.png")

        # The data run lists every stage as a named task run: its page opens on Logs; a click opens the list.
        browser.open(f"{base}/runs/flow-run/{children['data']['id']}", shows="Task Runs")
        browser.click("Task Runs")
        listed = browser.wait_for("shard-")
        for stage in ("download-sotu", "clean-kjv", "dedup-", "decontaminate-", "tokenizer-", "shard-", "report-"):
            assert stage in listed, stage
        browser.screenshot(shots / "data-task-runs.png")

        # Training publishes a progress artifact, a metrics table and a loss-curve image; the UI renders them.
        artifacts = {a["key"]: a for a in api(base, "/artifacts/filter", {}) if a["key"]}
        assert {"data-flow-stages", "pretrain-progress", "pretrain-metrics", "pretrain-loss-curve",
                "sft-loss-curve", "evaluation-report"} <= set(artifacts)
        assert artifacts["pretrain-progress"]["data"] == 100.0
        pretrain_task = artifacts["pretrain-progress"]["task_run_id"]
        assert artifacts["pretrain-progress"]["flow_run_id"] == children["pretrain"]["id"]
        browser.open(f"{base}/runs/task-run/{pretrain_task}", shows="Artifacts")
        browser.click("Artifacts")
        shown = browser.wait_for("pretrain-loss-curve")
        for key in ("pretrain-progress", "pretrain-metrics", "pretrain-loss-curve"):
            assert key in shown, key
        browser.screenshot(shots / "pretrain-artifacts.png")
        browser.open(f"{base}/artifacts/artifact/{artifacts['pretrain-progress']['id']}", shows="100%")
        browser.open(f"{base}/artifacts/artifact/{artifacts['pretrain-loss-curve']['id']}", shows="pretrain-loss-curve")
        browser.wait_until("[...document.images].some(i => i.src.startsWith('data:image/png;base64') && "
                           "i.naturalWidth > 100)", "the loss curve drawn")
        browser.screenshot(shots / "loss-curve.png")
    finally:
        browser.close()

    for png in shots.iterdir():
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000, png  # a rendered page
    if os.environ.get("UI_SCREENSHOT_DIR"):
        shutil.copytree(shots, os.environ["UI_SCREENSHOT_DIR"], dirs_exist_ok=True)
    print(f"screenshots: {shots}")
