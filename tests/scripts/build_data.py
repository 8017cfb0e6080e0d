"""Build every data stage's artifact in order, from the data flow's own step list, as plain functions (no Prefect
server needed):

    python tests/scripts/build_data.py <folder of *.jsonl.gz documents> <artifacts dir> [--plan]

Prints each stage's artifact path, the shard artifact's last; with --plan, builds nothing and prints the plan
(tasks/lib/plan.py) instead."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.data_steps import full_build_steps  # noqa: E402
from tasks.lib.manifest import DataLineage  # noqa: E402
from tasks.lib.plan import format_plan, plan  # noqa: E402
from tasks.lib.sources import resolve_source  # noqa: E402
from tasks.lib.steps import build_step  # noqa: E402
from tasks.spec import DataSpec  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    documents, artifacts = sys.argv[1:3]
    spec = DataSpec.model_validate({
        "name": "store-test", "artifacts_dir": artifacts,
        "sources": [{"name": "mixed", "kind": "local", "paths": [f"{documents}/*.jsonl.gz"], "license": "test"}],
        "cleaning": {"c4": {"filter_no_terminal_punct": False}, "gopher_quality": {"max_non_alpha_words_ratio": 0.6}},
        "tokenizer": {"vocab_size": 1000},
        "sharding": {"seq_len": 64, "rows_per_shard": 256, "validation_fraction": 0.05}})
    steps = full_build_steps(spec, {s.name: resolve_source(s) for s in spec.sources}, lineage=DataLineage())
    if "--plan" in sys.argv:
        print(format_plan(plan(steps)))
    else:
        for step in steps:
            print(build_step(step).path, flush=True)
