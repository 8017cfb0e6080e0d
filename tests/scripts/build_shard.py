"""Build the shard stage's artifact, as the data flow's shard task does (no Prefect server needed):

    python tests/scripts/build_shard.py <docs artifact dir> <tokenizer artifact dir> <artifacts dir>

The docs artifact dir holds docs/<source>/*.jsonl.gz. Prints the artifact's path last."""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.lib.artifacts import ArtifactRef  # noqa: E402
from tasks.shard import shard  # noqa: E402
from tasks.spec import ShardingConfig  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    documents, tokenizer, artifacts = sys.argv[1:4]
    ref = shard.fn(documents=ArtifactRef(stage="dedup", fingerprint="test", path=documents),
                   tokenizer=ArtifactRef(stage="tokenizer", fingerprint="test", path=tokenizer),
                   config=ShardingConfig(seq_len=64, rows_per_shard=256, validation_fraction=0.05), lineage={},
                   artifacts_dir=artifacts)
    print(ref.path, flush=True)
