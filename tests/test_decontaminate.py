"""Decontamination: pretraining documents that quote the instruction or evaluation sets are removed and counted."""

from __future__ import annotations

import gzip
import json

import yaml

from tasks.decontaminate import decontaminate_documents, reference_sets
from tasks.spec import DecontaminationConfig

from conftest import SERIAL, bundled_docs, write_jsonl
from test_dedup import read_ids

REPLY = ("Artificial Intelligence is the branch of engineering and science devoted to constructing machines "
         "that think.")  # a chatterbot reply in the bundled SFT set (15 words)


def test_documents_quoting_sft_replies_or_benchmark_items_are_removed(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": REPLY}]}])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": "q1", "question": "Which river did Washington cross on the night "
                                              "before the battle of Trenton in 1776?", "choices": ["Hudson",
                                              "Delaware", "Potomac"], "answer": "Delaware"}])
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({"name": "s", "sources": [
        {"name": "chat", "kind": "local", "paths": [str(sft)], "license": "test"}]}))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"name": "e", "prompts": ["Tell me a joke."],
        "multiple_choice": [{"name": "hist", "kind": "local", "paths": [str(mc)], "license": "test"}]}))
    config = DecontaminationConfig(against=[str(tmp_path / "sft.yaml"), str(tmp_path / "eval.yaml")])

    clean = bundled_docs("sotu", 30)
    planted = [
        {"id": "quotes-reply", "text": clean[0]["text"][:2000] + "\n\nAs the saying goes, " + REPLY.lower()},
        # Punctuation and case differ from the benchmark: normalisation still matches the question's 13-grams.
        {"id": "quotes-question", "text": "QUIZ. which river did washington cross on the night before the "
                                          "battle of trenton in 1776 -- the Delaware, of course."},
        {"id": "near-miss", "text": "Artificial Intelligence is the branch of engineering and science devoted to "
                                    "building machines that think."},  # 10-word overlap only: kept
    ]
    docs = tmp_path / "docs"
    for name, records in (("sotu", clean), ("planted", planted)):
        with gzip.open(write_jsonl(docs / name / "tmp.jsonl", []).with_name("00000.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps({**d, "metadata": {"source": name}}) + "\n" for d in records)
        (docs / name / "tmp.jsonl").unlink()
    out = tmp_path / "out"
    out.mkdir()
    refs = reference_sets(config)
    assert [r.name for r in refs] == ["sft/chat", "eval/hist", "eval/e-prompts"]
    summary = decontaminate_documents(docs, refs, config, SERIAL, out, tmp_path / "downloads")

    assert read_ids(out / "removed") == {"quotes-reply", "quotes-question"}
    assert summary["removed"] == 2 and summary["removed_per_set"] == {"sft/chat": 1, "eval/hist": 1}
    assert summary["docs_out"] == len(clean) + 1 == summary["docs_in"] - 2
    assert {d["id"] for d in clean} | {"near-miss"} == read_ids(out / "docs")
