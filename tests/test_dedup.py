"""Near-duplicate removal measured on planted copies of real documents."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from tasks.dedup import dedup_documents
from tasks.spec import DedupConfig

from conftest import SERIAL, bundled_docs

BOILERPLATE = ("Subscribe to our newsletter for more historic speeches. All rights reserved. "
               "Share this page: Facebook | Twitter | Email. Cookie policy and privacy notice apply.")


def small_edits(text: str, rng: random.Random, rate: float = 0.01) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * rate))):
        words[i] = rng.choice(["the", "of", "and", "nation", "people"])
    return " ".join(words)


def reorder_paragraphs(text: str, rng: random.Random) -> str:
    paras = text.split("\n\n")
    if len(paras) > 2:
        i = rng.randrange(len(paras) - 1)
        paras[i], paras[i + 1] = paras[i + 1], paras[i]
    return "\n\n".join(paras)


def with_boilerplate(text: str, rng: random.Random) -> str:
    return f"{BOILERPLATE}\n\n{text}\n\n{BOILERPLATE}"


def read_ids(folder: Path) -> set[str]:
    ids = set()
    for p in folder.glob("*/*.jsonl.gz"):
        with gzip.open(p, "rt") as f:
            ids |= {json.loads(line)["id"] for line in f}
    return ids


@pytest.mark.slow
def test_minhash_recall_and_precision_on_planted_near_duplicates(tmp_path):
    rng = random.Random(0)
    originals = bundled_docs("sotu", 120) + bundled_docs("kjv", 300)[::3]  # real prose, no natural duplicates
    planted, original_of = [], {}
    for kind, make in (("edit", small_edits), ("reorder", reorder_paragraphs), ("boiler", with_boilerplate)):
        for i, doc in enumerate(rng.sample(originals, 20)):
            pid = f"planted-{kind}-{i}"
            planted.append({"id": pid, "text": make(doc["text"], rng)})
            original_of[pid] = doc["id"]
    for name, docs in (("corpus", originals), ("planted", planted)):
        folder = tmp_path / "in" / name
        folder.mkdir(parents=True)
        with gzip.open(folder / "00000.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({**d, "metadata": {"source": name}}) + "\n" for d in docs)
    out = tmp_path / "out"
    out.mkdir()
    # Exact dedup off: every planted copy differs from its original, so this measures MinHash alone.
    summary = dedup_documents({"corpus": tmp_path / "in/corpus", "planted": tmp_path / "in/planted"},
                              DedupConfig(exact=False), SERIAL, out)

    removed = read_ids(out / "removed/minhash")
    kept = read_ids(out / "docs")
    assert summary["removed_minhash"] == len(removed) and not removed & kept
    assert len(removed) + len(kept) == len(originals) + len(planted)  # nothing lost
    # A pair is caught when either member was removed (a cluster keeps exactly one of its members).
    caught = [pid for pid, oid in original_of.items() if pid in removed or oid in removed]
    recall = len(caught) / len(planted)
    in_planted_cluster = set(original_of) | set(original_of.values())
    precision = len(removed & in_planted_cluster) / max(1, len(removed))
    print(f"recall={recall:.3f} precision={precision:.3f} removed={len(removed)}")
    assert recall >= 0.9, sorted(set(original_of) - set(caught))
    assert precision >= 0.95, sorted(removed - in_planted_cluster)


def write_source(folder: Path, docs: list[dict], source: str) -> Path:
    folder.mkdir(parents=True)
    with gzip.open(folder / "00000.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({**d, "metadata": {"source": source}}) + "\n" for d in docs)
    return folder


def test_incremental_dedup_against_the_persistent_index(tmp_path):
    """A second ingest reads only the new documents and removes those that duplicate (exactly or nearly) the
    first ingest's, or each other; the index grows by one part and a third ingest still sees the first."""
    rng = random.Random(1)
    old = bundled_docs("sotu", 60)
    fresh = bundled_docs("kjv", 200)[::10]
    exact_copy = {**old[3], "id": "copy-of-old-3"}
    near_copy = {"id": "near-old-7", "text": small_edits(old[7]["text"], rng)}
    unseen = bundled_docs("kjv", 251)[-1]["text"]
    twin_a, twin_b = {"id": "twin-a", "text": unseen}, {"id": "twin-b", "text": unseen}
    config = DedupConfig()
    first = tmp_path / "first"
    first.mkdir()
    dedup_documents({"sotu": write_source(tmp_path / "in1/sotu", old, "sotu")}, config, SERIAL, first)
    assert read_ids(first / "docs") == {d["id"] for d in old}
    assert sorted(p.name for p in (first / "index/parts").iterdir()) == ["part-0001"]

    second = tmp_path / "second"
    second.mkdir()
    new_docs = fresh + [exact_copy, near_copy, twin_a, twin_b]
    summary = dedup_documents({"sotu": write_source(tmp_path / "in2/sotu", new_docs, "sotu")}, config, SERIAL,
                              second, base_index=first / "index")
    assert summary["docs_in"] == len(new_docs)  # only the new documents are read
    assert read_ids(second / "removed/exact") == {"copy-of-old-3", "twin-b"}
    assert read_ids(second / "removed/minhash") == {"near-old-7"}
    assert read_ids(second / "docs") == {d["id"] for d in fresh} | {"twin-a"}
    assert summary["index_parts"] == 2
    assert (first / "index/parts/part-0001").samefile(second / "index/parts/part-0001")  # hard links, no copies

    # A third ingest deduplicates against both earlier parts: an old document and one from the second ingest.
    third = tmp_path / "third"
    third.mkdir()
    repeats = [{**old[0], "id": "old-0-again"}, {**fresh[5], "id": "fresh-5-again"}, bundled_docs("kjv", 203)[-1]]
    dedup_documents({"sotu": write_source(tmp_path / "in3/sotu", repeats, "sotu")}, config, SERIAL, third,
                    base_index=second / "index")
    assert read_ids(third / "docs") == {repeats[2]["id"]}
