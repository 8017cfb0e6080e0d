"""Build every data stage's artifact in order, calling the data flow's tasks as plain functions (no Prefect
server needed):

    python tests/scripts/build_data.py <folder of *.jsonl.gz documents> <artifacts dir>

Prints each stage's artifact path, the shard artifact's last."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.clean import clean  # noqa: E402
from tasks.decontaminate import decontaminate, reference_sets  # noqa: E402
from tasks.dedup import dedup  # noqa: E402
from tasks.download import download, resolve_source  # noqa: E402
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
    downloaded = download.fn(resolved=resolve_source(source), executor=executor, artifacts_dir=artifacts)
    cleaned = clean.fn(downloaded=downloaded, source_name=source.name, cleaning=spec.cleaning_for(source),
                       executor=executor, artifacts_dir=artifacts)
    deduped = dedup.fn(cleaned={source.name: cleaned}, config=spec.dedup, executor=executor, artifacts_dir=artifacts)
    kept = decontaminate.fn(documents=deduped, references=reference_sets(spec.decontamination),
                            config=spec.decontamination, executor=executor, artifacts_dir=artifacts)
    trained = tokenizer.fn(documents=kept, config=spec.tokenizer, executor=executor, artifacts_dir=artifacts)
    shards = shard.fn(documents=kept, tokenizer=trained, config=spec.sharding, lineage={}, executor=executor,
                      artifacts_dir=artifacts)
    for ref in (downloaded, cleaned, deduped, kept, trained, shards):
        print(ref.path, flush=True)
