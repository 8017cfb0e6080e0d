"""Stage 4, tokenizer: train a sentencepiece model (Llama-style BPE) on a bounded sample of the deduplicated text.

Outputs `tokenizer.model` (sentencepiece) and, converted from it, the Hugging Face files (`tokenizer.json`,
`tokenizer_config.json`, with the chat template of model/chat.py) so `transformers.AutoTokenizer.from_pretrained(<dir>)`
gives the same ids and renders chats the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
from prefect import task

from model.chat import CHAT_TEMPLATE
from tasks.lib.artifacts import STAGE_TASK_OPTIONS, ArtifactRef, build_artifact
from tasks.lib.blocks import keep_in_sample
from tasks.lib.log import get_logger
from tasks.spec import TokenizerConfig

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CODE_DEPENDENCIES = ("model.chat",)  # the chat template is written into the tokenizer files


def iter_documents(folder: Path) -> Iterator[dict]:
    """Documents of all `*.jsonl.gz` files under `folder` (e.g. a dedup artifact's docs/), in a stable order."""
    for path in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def training_lines(docs_dir: Path, config: TokenizerConfig, total_bytes: int, stats: dict) -> Iterator[str]:
    """Non-empty lines of sampled documents; lines over max_sentence_length are split, since sentencepiece
    would otherwise skip them silently."""
    fraction = min(1.0, config.sample_bytes / max(total_bytes, 1))
    limit = config.max_sentence_length // 4  # characters, so that even 4-byte UTF-8 stays under the byte limit
    for doc in iter_documents(docs_dir):
        if not keep_in_sample(doc["id"], fraction, config.seed):
            continue
        stats["docs"] += 1
        stats["bytes"] += len(doc["text"].encode("utf-8"))
        for line in doc["text"].split("\n"):
            if not line.strip():
                continue
            while len(line) > limit:
                cut = line.rfind(" ", 0, limit)
                cut = cut if cut > 0 else limit
                yield line[:cut]
                line = line[cut:]
            stats["lines"] += 1
            yield line


def train_tokenizer(docs_dir: Path, config: TokenizerConfig, total_bytes: int, out_dir: Path) -> dict:
    """Train `out_dir/tokenizer.model` and write the matching Hugging Face tokenizer files."""
    stats = {"docs": 0, "bytes": 0, "lines": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_lines(docs_dir, config, total_bytes, stats), model_writer=model,
            vocab_size=config.vocab_size, model_type=config.model_type, byte_fallback=config.byte_fallback,
            split_digits=config.split_digits, character_coverage=config.character_coverage,
            user_defined_symbols=config.special_tokens, max_sentence_length=config.max_sentence_length,
            input_sentence_size=5_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            # Llama-2 conventions: <unk>=0, <s>=1, </s>=2, no pad; text kept as is (cleaning already normalised it).
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=2, minloglevel=2)
    except RuntimeError as err:  # sentencepiece's own words name neither the setting nor the spec
        too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(err))
        if too_high is None:
            raise
        raise ValueError(f"tokenizer.vocab_size {too_high[1]} (data spec) is more than this corpus supports: its "
                         f"tokenizer sample ({stats['docs']} documents, {stats['bytes'] / 1e6:.1f} MB) yields at "
                         f"most {too_high[2]} pieces. Set tokenizer.vocab_size to {too_high[2]} or less in the "
                         f"spec, or add data") from None
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    write_hf_tokenizer(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    summary = {"vocab_size": sp.vocab_size(), "model_type": config.model_type, "sample_docs": stats["docs"],
               "sample_bytes": stats["bytes"], "sample_lines": stats["lines"],
               "tokenizer_sha256": hashlib.sha256(model.getvalue()).hexdigest()}
    get_logger().info(f"tokenizer: trained vocab {summary['vocab_size']} on {stats['docs']} docs "
                      f"({stats['bytes'] / 1e6:.1f} MB)")
    return summary


def write_hf_tokenizer(out_dir: Path) -> None:
    """Convert tokenizer.model to a `tokenizers` pipeline that follows the model's own normaliser settings."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((out_dir / "tokenizer.model").read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                 chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(str(out_dir))


@task(name="tokenizer", **STAGE_TASK_OPTIONS)
def tokenizer(documents: ArtifactRef, config: TokenizerConfig, artifacts_dir: str) -> ArtifactRef:
    total_bytes = documents.meta()["summary"]["bytes_out"]
    return build_artifact("tokenizer", dict(documents=documents, config=config, artifacts_dir=artifacts_dir),
                          lambda out: train_tokenizer(documents.dir / "docs", config, total_bytes, out))
