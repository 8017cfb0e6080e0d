"""Build every data stage's artifact in order, calling the data flow's tasks as plain functions (no Prefect
server needed):

    python tests/scripts/build_data.py <folder of *.jsonl.gz documents> <artifacts dir> [--plan]

Prints each stage's artifact path, the shard artifact's last; with --plan, builds nothing and prints the plan
(tasks/lib/plan.py) instead."""

import contextlib
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.clean import clean  # noqa: E402
from tasks.decontaminate import decontaminate, reference_sets  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.download import download, resolve_source  # noqa: E402
from tasks.lib.artifacts import run_stage  # noqa: E402
from tasks.lib.plan import collecting_plan, format_plan  # noqa: E402
from tasks.shard import shard  # noqa: E402
from tasks.spec import DataSpec  # noqa: E402
from tasks.tokenizer import tokenizer  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    documents, artifacts = sys.argv[1:3]
    spec = DataSpec.model_validate({
        "name": "store-test", "artifacts_dir": artifacts,
        "sources": [{"name": "mixed", "kind": "local", "paths": [f"{documents}/*.jsonl.gz"], "license": "test"}],
        "cleaning": {"c4": {"filter_no_terminal_punct": False}, "gopher_quality": {"max_non_alpha_words_ratio": 0.6}},
        "tokenizer": {"vocab_size": 1000},
        "sharding": {"seq_len": 64, "rows_per_shard": 256, "validation_fraction": 0.05}})
    source, executor = spec.sources[0], spec.executor
    planning = "--plan" in sys.argv
    # Planning goes through run_stage, which decides without running a task; building calls the stage
    # functions themselves, so no Prefect server is needed either way.
    stage = (lambda task, **params: run_stage(task, **params)) if planning else \
        (lambda task, **params: task.fn(**params))
    with collecting_plan(hash_files=False) if planning else contextlib.nullcontext() as plan:
        downloaded = stage(download, resolved=resolve_source(source), executor=executor, artifacts_dir=artifacts)
        cleaned = stage(clean, downloaded=downloaded, source_name=source.name, cleaning=spec.cleaning_for(source),
                        executor=executor, artifacts_dir=artifacts)
        deduped = stage(dedup, cleaned={source.name: cleaned}, config=spec.dedup, executor=executor, base=None,
                        artifacts_dir=artifacts)
        kept = stage(decontaminate, documents=deduped, references=reference_sets(spec.decontamination),
                     config=spec.decontamination, executor=executor, artifacts_dir=artifacts)
        trained = stage(tokenizer, documents=kept, config=spec.tokenizer, executor=executor, artifacts_dir=artifacts)
        shards = stage(shard, documents=kept, tokenizer=trained, config=spec.sharding, lineage={},
                       executor=executor, artifacts_dir=artifacts)
    if planning:
        print(format_plan(plan))
    else:
        for ref in (downloaded, cleaned, deduped, kept, trained, shards):
            print(ref.path, flush=True)
