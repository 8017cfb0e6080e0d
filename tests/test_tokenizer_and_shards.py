"""sentencepiece training, its Hugging Face twin, and packing into Parquet shards, on real text."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from tasks.lib.artifacts import sha256_file
from tasks.lib.manifest import DataLineage, ShardManifest
from tasks.shard import shard_documents
from tasks.spec import ExecutorConfig, ShardingConfig, TokenizerConfig
from tasks.decontaminate import iter_documents
from tasks.lib.blocks import keep_in_sample
from tasks.tokenizer import read_lines, sample_lines, train_tokenizer

from conftest import ROOT, bundled_docs

SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    """A dedup-shaped folder, docs/<source>/*.jsonl.gz, of real documents."""
    root = tmp_path_factory.mktemp("dedup") / "docs"
    for source, docs in (("sotu", bundled_docs("sotu", 30)), ("kjv", bundled_docs("kjv", 120))):
        (root / source).mkdir(parents=True)
        with gzip.open(root / source / "00000.jsonl.gz", "wt") as f:
            # As in the pipeline, documents carry the path of the first file a datatrove reader read them from.
            f.writelines(json.dumps({**d, "metadata": {"source": source, "file_path": "/download/docs/00000.jsonl.gz"}})
                         + "\n" for d in docs)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(docs_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(docs_dir, TokenizerConfig(vocab_size=2000), total_bytes=10**9, out_dir=out)
    return out


def test_tokenizer_special_tokens_digits_and_byte_fallback(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.vocab_size() == 2000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    for token in SPECIAL:
        assert sp.encode(f"x {token} y", out_type=str).count(token) == 1
    assert [p for p in sp.encode("1776", out_type=str) if p != "▁"] == ["1", "7", "7", "6"]
    snowman = sp.encode("☃", out_type=str)  # not in the training text: bytes, not <unk>
    assert "<unk>" not in snowman and "<0xE2>" in snowman
    assert sp.decode(sp.encode("Fellow-Citizens ☃ 1790")) == "Fellow-Citizens ☃ 1790"


def test_hf_tokenizer_gives_identical_ids(tokenizer_dir, docs_dir):
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = [d["text"][:4000] for d in iter_documents(docs_dir)][::3]
    edge = ["  two leading spaces", " one", "\n\nnewlines", "a  b", "<|user|>hi<|end|>", "tab\t☃ 中文 😀", "x" * 300]
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    mismatches = [t for t in texts + edge if auto.encode(t, add_special_tokens=False) != sp.encode(t)]
    assert not mismatches, mismatches[:3]
    assert auto.eos_token_id == sp.eos_id() and auto.bos_token_id == sp.bos_id()

    # transformers 5 rebuilds LlamaTokenizer from tokenizer.model with its own pre-tokenizer, which differs from
    # sentencepiece only on text that starts with whitespace; on document lines it must agree exactly.
    lines = [line for t in texts for line in t.split("\n") if line.strip() and not line[0].isspace()][:2000]
    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        llama = cls.from_pretrained(str(tokenizer_dir))
        bad = [s for s in lines if llama.encode(s, add_special_tokens=False) != sp.encode(s)]
        assert not bad, (cls.__name__, bad[:3])


def test_long_lines_are_split_not_skipped(tmp_path):
    folder = tmp_path / "docs" / "s"
    folder.mkdir(parents=True)
    long_line = " ".join(["abcdefgh"] * 3000)  # 27 KB, over the 16 KB sentencepiece default here
    with gzip.open(folder / "0.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "a", "text": long_line}) + "\n")
    stats = sample_lines(tmp_path / "docs", TokenizerConfig(), 10**6, tmp_path / "out", ExecutorConfig())
    pieces = list(read_lines(tmp_path / "out" / "_sample"))
    assert stats == {"docs": 1, "bytes": len(long_line), "lines": len(pieces)}
    assert len(pieces) > 1 and all(len(p.encode()) <= TokenizerConfig().max_sentence_length for p in pieces)
    assert "".join(pieces) == long_line


def test_sampling_is_deterministic_and_bounded():
    """The same documents in every process (nothing of Python's per-process string hashing), another seed another
    sample, and the asked fraction."""
    import subprocess
    import sys

    ids = [f"doc-{i}" for i in range(20000)]
    chosen = [i for i in ids if keep_in_sample(i, 0.1, seed=0)]
    elsewhere = subprocess.run(
        [sys.executable, "-c", "from tasks.lib.blocks import keep_in_sample\n"
                               "print(' '.join(f'doc-{i}' for i in range(20000) if keep_in_sample(f'doc-{i}', 0.1, 0)))"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert elsewhere.stdout.split() == chosen
    assert chosen != [i for i in ids if keep_in_sample(i, 0.1, seed=1)]
    assert 1800 < len(chosen) < 2200


def test_shards_pack_every_token_with_eos_between_documents(docs_dir, tokenizer_dir, tmp_path):
    config = ShardingConfig(seq_len=64, rows_per_shard=300, row_group_size=16, validation_fraction=0.1,
                            mixture={"kjv": 3.0, "sotu": 1.0})
    summary = shard_documents(docs_dir, tokenizer_dir, config, DataLineage(spec_path="test.yaml"), tmp_path)
    manifest = ShardManifest.load(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))

    assert manifest.row_len == 65 and manifest.eos_id == sp.eos_id() == 2
    assert manifest.tokenizer_sha256 == sha256_file(tokenizer_dir / "tokenizer.model")
    assert manifest.mixture == pytest.approx({"kjv": 0.75, "sotu": 0.25})
    assert manifest.lineage == DataLineage(spec_path="test.yaml")
    assert len([s for s in manifest.shards if s.split == "train" and s.source == "sotu"]) > 1  # rolled over

    streams: dict[tuple[str, str], list[np.ndarray]] = {}
    for shard in manifest.shards:
        path = tmp_path / shard.path
        assert sha256_file(path) == shard.sha256
        pf = pq.ParquetFile(path)
        tokens_type = pf.schema_arrow.field("tokens").type
        assert pa.types.is_fixed_size_list(tokens_type) and tokens_type.list_size == 65
        assert tokens_type.value_type == pa.int32()
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        assert pf.metadata.row_group(0).num_rows <= 16
        rows = pf.read().column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 65)
        assert len(rows) == shard.rows
        streams.setdefault((shard.split, shard.source), []).append(rows.reshape(-1))

    # Re-tokenize independently: every document's ids + EOS, in order, must be the packed stream's prefix.
    total_tail = 0
    for source in ("kjv", "sotu"):
        for split in ("train", "valid"):
            expected = []
            for d in iter_documents(docs_dir / source):
                if ("valid" if keep_in_sample(d["id"], 0.1, seed=1234) else "train") == split:
                    expected += sp.encode(d["text"]) + [2]
            packed = np.concatenate(streams.get((split, source), [np.zeros(0, np.int32)]))
            assert len(expected) - len(packed) < 65  # only the last partial row is left over
            assert packed.tolist() == expected[: len(packed)]
            total_tail += len(expected) - len(packed)
    assert summary["tail_tokens_dropped"] == total_tail
    assert summary["tokens"] == sum(s.tokens for s in manifest.shards) + total_tail
    assert summary["docs_valid"] > 0 and summary["docs_train"] > summary["docs_valid"]


def test_too_little_data_for_one_row_is_a_clear_error(docs_dir, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="lower sharding.seq_len"):
        shard_documents(docs_dir, tokenizer_dir, ShardingConfig(seq_len=10_000_000), DataLineage(), tmp_path)


def test_vocabulary_too_large_for_the_corpus_names_the_setting_and_what_fits(docs_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size 60000 .* Set tokenizer.vocab_size to (\d+) or less") \
            as raised:
        train_tokenizer(docs_dir, TokenizerConfig(vocab_size=60000), 10**9, tmp_path)
    largest = int(raised.value.args[0].split("Set tokenizer.vocab_size to ")[1].split()[0])
    assert train_tokenizer(docs_dir, TokenizerConfig(vocab_size=largest), 10**9, tmp_path)["vocab_size"] == largest
