"""Evaluation through lm-evaluation-harness: the bundled civics set, run as a local lm-eval task, scores as
log-likelihood multiple choice is defined, and a named task whose dataset cannot be had fails at once, naming it.

The reference below is the project's replaced scorer. Its log-likelihoods and `acc` agree with lm-eval's exactly.
Its `acc_norm` divided by the UTF-8 bytes of " <choice>"; lm-eval divides by the characters of "<choice>", one fewer
for ASCII text. That was the replaced scorer's deviation, and the reference now uses lm-eval's definition."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from model.evaluate import LMEvalTaskError, lm_eval_tasks, load, run_lm_eval, write_lm_eval_task
from tasks.evaluate import load_items
from tasks.spec import EvalSpec, load_spec

from conftest import ROOT


@pytest.fixture(scope="module")
def exported(tp1_run, tmp_path_factory):
    """A fixed checkpoint (6 seeded steps on the tiny manifest), exported to a transformers folder."""
    out = tmp_path_factory.mktemp("evaluate") / "hf"
    proc = subprocess.run([sys.executable, "-m", "model.export_hf", str(tp1_run.checkpoint), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@torch.no_grad()
def reference_loglikelihood(model, sp, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), the tokens being where encode(context + continuation) departs
    from encode(context): the definition the replaced scorer implemented."""
    ctx, full = sp.encode(context), sp.encode(context + continuation)
    shared = next((i for i, (a, b) in enumerate(zip(ctx, full)) if a != b), min(len(ctx), len(full)))
    ids = torch.tensor([full])
    logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
    return float(logprobs[shared - 1:].gather(-1, ids[0, shared:, None]).sum())


@pytest.mark.slow
def test_civics_through_lm_eval_scores_as_the_replaced_scorer(exported, tmp_path):
    from transformers import AutoTokenizer

    items, benchmarks = load_items(load_spec("data_specs/eval_default.yaml", EvalSpec), tmp_path / "downloads")
    civics = items["civics"]
    assert len(civics) == 84 and benchmarks["civics"]["chance"] == pytest.approx(0.2639, abs=1e-3)
    write_lm_eval_task("civics", civics, tmp_path / "tasks")
    model, sp = load(exported)
    # The first 28 of the 84 items (lm-eval's `limit`), each choice scored again by the reference.
    raw = run_lm_eval(model, AutoTokenizer.from_pretrained(exported), ["civics"],
                      lm_eval_tasks(["civics"], tmp_path / "tasks"), limit=28, log_samples=True)

    correct = correct_norm = 0
    samples = sorted(raw["samples"]["civics"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(28))
    for item, sample in zip(civics, samples):
        expected = [reference_loglikelihood(model, sp, f"Question: {item['question']}\nAnswer:", f" {c}")
                    for c in item["choices"]]
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-4), item["question"]
        normed = [s / len(c) for s, c in zip(expected, item["choices"])]
        correct += max(range(len(expected)), key=expected.__getitem__) == item["answer"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == item["answer"]
    scores = raw["results"]["civics"]
    assert scores["acc,none"] == pytest.approx(correct / 28) and scores["acc_norm,none"] == pytest.approx(correct_norm / 28)
    assert 0 < scores["acc_stderr,none"] < 0.15


def test_named_task_without_its_dataset_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without a network: nothing cached, nothing fetched
    started = time.perf_counter()
    with pytest.raises(LMEvalTaskError, match=r"lm-eval task 'arc_easy' needs its dataset from the Hugging Face Hub"):
        lm_eval_tasks(["arc_easy"], None)
    with pytest.raises(LMEvalTaskError, match=r"unknown lm-eval task\(s\): 'helaswag' \(did you mean hellaswag"):
        lm_eval_tasks(["helaswag"], None)
    assert time.perf_counter() - started < 120


def test_local_tasks_written_later_into_the_same_folder_are_found(tmp_path):
    """The task index is cached per process (indexing lm-eval's registry takes seconds): a task written after it,
    or rewritten with other items, is still found and read as it now is; local-only tasks skip the registry."""
    items = [{"id": str(i), "question": f"{i} + 1?", "choices": [str(i + 1), str(i + 2)], "answer": 0}
             for i in range(4)]
    write_lm_eval_task("first", items, tmp_path)
    manager = lm_eval_tasks(["first"], tmp_path)
    assert set(manager.all_tasks) == {"first"}  # the registry was not indexed
    write_lm_eval_task("second", items[:2], tmp_path)
    assert set(lm_eval_tasks(["second"], tmp_path).all_tasks) == {"first", "second"}
    time.sleep(0.01)  # a new mtime for the rewritten task file
    write_lm_eval_task("first", items[:3], tmp_path)
    loaded = lm_eval_tasks(["first"], tmp_path).load(["first"])["tasks"]
    (task,) = loaded.values()
    assert len(list(task.test_docs())) == 3
