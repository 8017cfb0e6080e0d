"""Stage 3b, decontaminate: drop pretraining documents that share an n-gram with the instruction or evaluation
sets, so evaluation does not measure memorisation.

The reference n-grams are hashed with datatrove's own text normalisation, word splitting and hash function, into
its index format (`<set>.index.hashes`); datatrove's `NGramsDecontFilter` then scans the documents. (datatrove's
index builder reads references only through lighteval's task registry, which downloads them; ours come from the
specs.) As in datatrove, reference n-grams are those of the answer, and those straddling question and answer;
we also index the question's own n-grams, since a training document quoting a benchmark question is contaminated.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from pydantic import BaseModel

from tasks.lib.artifacts import ArtifactRef
from tasks.lib.log import get_logger
from tasks.lib.blocks import (CountDocuments, RegexWordTokenizer, counted, in_process_if_small, per_source_writer,
                              run_pipeline)
from tasks.lib.items import conversation, multiple_choice_item
from tasks.lib.sources import ResolvedSource, downloads_dir, resolve_source, source_records
from tasks.spec import DecontaminationConfig, EvalSpec, ExecutorConfig, SFTSpec, load_spec, resolve_path


def iter_documents(folder: Path) -> Iterator[dict]:
    """Documents of all `*.jsonl.gz` files under `folder` (e.g. a dedup artifact's docs/), in a stable order."""
    for path in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


class ReferenceSet(BaseModel):
    """One instruction or evaluation set, pinned to its content like a corpus source."""

    name: str
    kind: str  # "sft", "multiple_choice" or "prompts"
    resolved: ResolvedSource | None = None
    prompts: list[str] = []


def reference_sets(config: DecontaminationConfig) -> list[ReferenceSet]:
    """Every set named by the specs in `config.against` (an SFT spec has `sources`, an eval spec does not)."""
    import yaml

    sets = []
    for path in config.against:
        raw = yaml.safe_load(resolve_path(path).read_text()) if resolve_path(path).is_file() else {}
        spec = load_spec(path, SFTSpec if "sources" in (raw or {}) else EvalSpec)
        if isinstance(spec, SFTSpec):
            sets += [ReferenceSet(name=f"sft/{s.name}", kind="sft", resolved=resolve_source(s)) for s in spec.sources]
        else:
            sets += [ReferenceSet(name=f"eval/{s.name}", kind="multiple_choice", resolved=resolve_source(s))
                     for s in spec.multiple_choice]
            if spec.prompts:
                sets.append(ReferenceSet(name=f"eval/{spec.name}-prompts", kind="prompts", prompts=spec.prompts))
    return sets


def reference_pairs(ref: ReferenceSet, downloads_dir: Path) -> Iterator[tuple[str, str]]:
    """(question, answer) texts of a set; unusable records are skipped here (the SFT and eval stages report
    them)."""
    if ref.kind == "prompts":
        yield from (("", p) for p in ref.prompts)
        return
    source = ref.resolved.source
    for rec in source_records(ref.resolved, downloads_dir):
        if ref.kind == "sft":
            messages, _ = conversation(rec, source, None)
            for prev, msg in zip([None, *(messages or [])], messages or []):
                if msg["role"] == "assistant":
                    yield (prev["content"] if prev else ""), msg["content"]
        else:
            item, _ = multiple_choice_item(rec, source)
            if item:
                yield item["question"], item["choices"][item["answer"]]


def build_index(refs: list[ReferenceSet], config: NGramsDecontConfig, index_dir: Path, downloads_dir: Path) -> dict:
    words, hash_func = RegexWordTokenizer(), create_hash_func(config.hash_config)

    def tokens(text: str) -> list[str]:
        return words.word_tokenize(simplify_text(text, config.norm_config))

    n = config.n_grams
    sizes = {}
    index_dir.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        hashes = set()
        for question, answer in reference_pairs(ref, downloads_dir):
            q, a = tokens(question), tokens(answer)
            grams = list(ngrams(a, n)) + list(ngrams(q, n))
            grams += [q[len(q) - n + 1 + i:] + a[:i + 1] for i in range(n - 1) if len(q) >= n - 1 - i and len(a) > i]
            hashes.update(hash_func(" ".join(g)) for g in grams)
        sizes[ref.name] = len(hashes)
        np.array(sorted(hashes), dtype=config.hash_config.np_descr).tofile(
            index_dir / f"{ref.name.replace('/', '__')}.index.hashes")
    return sizes


def decontaminate_documents(docs_dir: Path, refs: list[ReferenceSet], config: DecontaminationConfig,
                            executor: ExecutorConfig, out_dir: Path, downloads: Path) -> dict:
    decont = NGramsDecontConfig(n_grams=config.n_grams, find_query_ngrams=True)
    index_sizes = build_index(refs, decont, out_dir / "index", downloads)
    tasks = len(list(docs_dir.glob("*/*.jsonl.gz")))
    docs_in = docs_out = bytes_out = Counter()
    if tasks == 0:  # no documents reached this stage (an increment that dedup or cleaning emptied)
        (out_dir / "docs").mkdir()
    else:
        stats = run_pipeline([JsonlReader(str(docs_dir), glob_pattern="*/*.jsonl.gz"), CountDocuments("in"),
                              NGramsDecontFilter(str(out_dir / "index"), config=decont, language=RegexWordTokenizer(),
                                                 exclusion_writer=per_source_writer(out_dir / "removed")),
                              CountDocuments("out"), per_source_writer(out_dir / "docs")],
                             in_process_if_small(executor, docs_dir), out_dir / "_logs", tasks=tasks)
        (docs_in, _), (docs_out, bytes_out) = counted(stats, "in"), counted(stats, "out")
    removed = docs_in - docs_out
    by_set: dict[str, int] = {}
    for doc in iter_documents(out_dir / "removed"):
        name = doc["metadata"].get("contaminated_task", "?").replace("__", "/")
        by_set[name] = by_set.get(name, 0) + 1
    summary = {"docs_in": sum(docs_in.values()), "docs_out": sum(docs_out.values()),
               "bytes_out": sum(bytes_out.values()), "removed": sum(removed.values()),
               "removed_per_source": dict(removed), "removed_per_set": by_set, "n_grams": config.n_grams,
               "index_ngrams": index_sizes}
    get_logger().info(f"decontaminate: removed {summary['removed']} of {summary['docs_in']} documents sharing a "
                      f"{config.n_grams}-gram with {len(refs)} reference sets {by_set or ''}")
    return summary


def build(out: Path, documents: ArtifactRef, references: list[ReferenceSet], config: DecontaminationConfig,
          executor: ExecutorConfig, artifacts_dir: str) -> dict:
    """The stage, as a step runs it (tasks/lib/steps.py)."""
    return decontaminate_documents(documents.dir / "docs", references, config, executor, out,
                                   downloads_dir(artifacts_dir))
