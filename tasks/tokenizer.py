"""Stage 4, tokenizer: train a sentencepiece model (Llama-style BPE) on a bounded sample of the deduplicated text,
picked by document id in parallel on the spec's executor; or, with `tokenizer: {pretrained: DIR}`, copy a pretrained
model's tokenizer (its key is the files' checksums, not the documents).

Outputs `tokenizer.model` (sentencepiece) and, converted from it, the Hugging Face files (`tokenizer.json`,
`tokenizer_config.json`, with the chat template of model/chat.py) so `transformers.AutoTokenizer.from_pretrained(<dir>)`
gives the same ids and renders chats the same way.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader

from model.chat import CHAT_TEMPLATE
from model.tokenizer import TOKENIZER_FILES, Tokenizer
from tasks.lib.artifacts import ArtifactRef, PinnedFiles, pin_files, sha256_file
from tasks.lib.blocks import in_process_if_small, keep_in_sample, run_pipeline
from tasks.lib.log import get_logger
from tasks.spec import DataSpec, ExecutorConfig, TokenizerConfig, resolve_path

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


class SampleLines(PipelineStep):
    """The tokenizer's training text: the lines of the documents `keep_in_sample` picks, each task writing its own
    `<out_dir>/<rank>.txt`. Lines longer than `max_chars` are cut at a space (`split_long_line`), since
    sentencepiece would skip them silently."""

    name = "🎲 sample lines"
    type = "🔢 - TOKENIZER"

    def __init__(self, out_dir: Path, fraction: float, seed: int, max_chars: int):
        super().__init__()
        self.out_dir, self.fraction, self.seed, self.max_chars = Path(out_dir), fraction, seed, max_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"{rank:05d}.txt", "w", encoding="utf-8", newline="\n") as out:
            for doc in data:
                if not keep_in_sample(doc.id, self.fraction, self.seed):
                    continue
                self.stat_update("sample docs")
                self.stat_update("sample bytes", value=len(doc.text.encode("utf-8")))
                lines = [piece for line in doc.text.split("\n") if line.strip()
                         for piece in split_long_line(line, self.max_chars)]
                self.stat_update("sample lines", value=len(lines))
                out.writelines(line + "\n" for line in lines)
        return iter(())


def split_long_line(line: str, max_chars: int) -> list[str]:
    """`line` in pieces of at most `max_chars` characters, cut at the last space before the limit where there is
    one; the pieces join back to the line."""
    pieces = []
    while len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars)
        cut = cut if cut > 0 else max_chars
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + [line]


def sample_lines(docs_dir: Path, config: TokenizerConfig, total_bytes: int, out_dir: Path,
                 executor: ExecutorConfig) -> dict:
    """Write the training sample's lines to `out_dir/_sample/<task>.txt`, one datatrove task per document file on
    `executor`: at 100 GB, reading every document to pick the sample is the stage's largest cost. Returns the
    sample's documents, bytes and lines."""
    for old in ("_sample", "_logs"):  # a direct call into a used folder: datatrove would skip "completed" tasks
        shutil.rmtree(out_dir / old, ignore_errors=True)
    fraction = min(1.0, config.sample_bytes / max(total_bytes, 1))
    limit = config.max_sentence_length // 4  # characters, so that even 4-byte UTF-8 stays under the byte limit
    stats = run_pipeline([JsonlReader(str(docs_dir), glob_pattern="*/*.jsonl.gz"),
                          SampleLines(out_dir / "_sample", fraction, config.seed, limit)],
                         in_process_if_small(executor, docs_dir), out_dir / "_logs",
                         tasks=max(1, len(list(docs_dir.glob("*/*.jsonl.gz")))))
    metric = stats.stats[1].stats
    return {k: int(metric[f"sample {k}"].total) if f"sample {k}" in metric else 0 for k in ("docs", "bytes", "lines")}


def read_lines(folder: Path) -> Iterator[str]:
    """The lines of `folder/*.txt` in file order (split on newlines only: a line may hold other line breaks)."""
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_bytes().split(b"\n")[:-1]:
            yield line.decode("utf-8")


def train_tokenizer(docs_dir: Path, config: TokenizerConfig, total_bytes: int, out_dir: Path,
                    executor: ExecutorConfig = ExecutorConfig()) -> dict:
    """Train `out_dir/tokenizer.model` on a sample of `docs_dir/<source>/*.jsonl.gz` and write the matching
    Hugging Face tokenizer files."""
    stats = sample_lines(docs_dir, config, total_bytes, out_dir, executor)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=read_lines(out_dir / "_sample"), model_writer=model,
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
    finally:
        shutil.rmtree(out_dir / "_sample", ignore_errors=True)  # as large as the sample; the model replaces it
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


def pin_pretrained(config: TokenizerConfig) -> PinnedFiles:
    """The pretrained tokenizer's files, checksummed: what the stage's key holds instead of the documents."""
    return pin_files(resolve_path(config.pretrained), list(TOKENIZER_FILES), "tokenizer.pretrained (data spec)")


def with_model_tokenizer(spec: DataSpec, hf_dir: str) -> DataSpec:
    """`spec` tokenizing with a model's own tokenizer (continued pretraining of an imported model). A spec that
    names another pretrained tokenizer is refused: the ids would mean other pieces to the model."""
    named = spec.tokenizer.pretrained
    if named is not None and resolve_path(named) != resolve_path(hf_dir):
        raise ValueError(f"the data spec's tokenizer.pretrained ({named}) is not the model's ({hf_dir}); remove "
                         f"it or name the model's folder")
    if named is None:
        get_logger().info(f"tokenizer: {hf_dir}'s own, instead of one trained on the corpus")
    return spec.model_copy(update={"tokenizer": spec.tokenizer.model_copy(update={"pretrained": str(hf_dir)})})


def copy_pretrained(pretrained: PinnedFiles, out_dir: Path) -> dict:
    """Copy a pretrained tokenizer's files, checking they are the bytes that were pinned."""
    for name, digest in pretrained.files.items():
        shutil.copy2(Path(pretrained.directory) / name, out_dir / name)
        if sha256_file(out_dir / name) != digest:
            raise RuntimeError(f"{Path(pretrained.directory) / name} changed while the data flow ran; run it again")
    tok = Tokenizer(out_dir)
    summary = {"vocab_size": tok.vocab_size, "model_type": f"pretrained ({tok.kind})",
               "pretrained": pretrained.directory, "adds_bos": tok.adds_bos, "eos": tok.eos_token,
               "chat_template": "own" if tok.chat_template else "none (SFT uses the project's)",
               "tokenizer_sha256": tok.sha256}
    get_logger().info(f"tokenizer: using {pretrained.directory}'s {tok.file.name} ({tok.kind}), vocab "
                      f"{tok.vocab_size}; documents get {'BOS and ' if tok.adds_bos else ''}EOS {tok.eos_token!r}")
    return summary


def build(out: Path, documents: ArtifactRef | None, config: TokenizerConfig, executor: ExecutorConfig,
          artifacts_dir: str, pretrained: PinnedFiles | None = None) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py): train a tokenizer on `documents`, or (`pretrained`, with
    no documents) copy a pretrained one."""
    if pretrained is not None:
        return copy_pretrained(pretrained, out)
    return train_tokenizer(documents.dir / "docs", config, documents.meta()["summary"]["bytes_out"], out, executor)
