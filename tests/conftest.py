"""Shared fixtures: small slices of the real bundled corpus, and a real Prefect server for flow tests."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import yaml

from tasks.spec import PROJECT_ROOT, DataSpec, ExecutorConfig

BUNDLED = PROJECT_ROOT / "data" / "bundled"
# One process per datatrove pipeline keeps small test runs fast; the multi-process path runs in the flow tests.
SERIAL = ExecutorConfig(tasks=1, workers=1)


def bundled_docs(source: str, limit: int | None = None) -> list[dict]:
    with gzip.open(BUNDLED / f"{source}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, limit)]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """40 speeches and 150 Bible chapters (~2.5 MB of real text) as two jsonl sources."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "sotu" / "part-0.jsonl", bundled_docs("sotu", 40))
    write_jsonl(root / "kjv" / "part-0.jsonl", bundled_docs("kjv", 150))
    return root


def small_spec(corpus: Path, artifacts: Path, **overrides) -> dict:
    spec = {
        "name": "test",
        "artifacts_dir": str(artifacts),
        "executor": {"tasks": 1, "workers": 1},
        "sources": [
            {"name": "sotu", "kind": "local", "paths": [str(corpus / "sotu" / "*.jsonl")], "license": "public domain"},
            {"name": "kjv", "kind": "local", "paths": [str(corpus / "kjv" / "*.jsonl")], "license": "public domain",
             "cleaning": {"c4": {"filter_no_terminal_punct": False},
                          "gopher_quality": {"max_non_alpha_words_ratio": 0.6}}},
        ],
        "tokenizer": {"vocab_size": 1000},
        "sharding": {"seq_len": 128, "rows_per_shard": 500, "validation_fraction": 0.05},
    }
    spec.update(overrides)
    DataSpec.model_validate(spec)  # fail early in the fixture, not deep in a flow
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_manifest(small_corpus, tmp_path_factory) -> Path:
    """Real shards (vocab 1000, seq_len 64) from the small corpus, built with the stage functions directly."""
    from tasks.shard import shard_documents
    from tasks.spec import ShardingConfig, TokenizerConfig
    from tasks.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_manifest")
    docs = root / "docs"
    for source in ("sotu", "kjv"):
        (docs / source).mkdir(parents=True)
        lines = (small_corpus / source / "part-0.jsonl").read_text().splitlines()
        with gzip.open(docs / source / "00000.jsonl.gz", "wt") as f:
            f.writelines(line + "\n" for line in lines)
    (root / "tokenizer").mkdir()
    train_tokenizer(docs, TokenizerConfig(vocab_size=1000), 10**9, root / "tokenizer")
    (root / "shard").mkdir()
    shard_documents(docs, root / "tokenizer", ShardingConfig(seq_len=64, validation_fraction=0.05),
                    {"tokenizer_dir": str(root / "tokenizer")}, root / "shard")
    return root / "shard"
