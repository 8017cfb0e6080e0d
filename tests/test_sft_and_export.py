"""Instruction tuning (chat template, loss mask, packing without cross-attention, bad records), Hugging Face
export with logits matching Megatron, and evaluation scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.chat import encode_chat
from model.data import read_rows
from model.tokenizer import Tokenizer
from tasks.lib.sources import resolve_source
from tasks.sft_data import build_sft_shards

from conftest import ROOT, metrics, sft_spec, tensorboard_scalars, train, write_jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A field of science."}, {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_manifest):
    return Tokenizer(tiny_manifest.parent / "tokenizer")


def test_loss_mask_covers_exactly_the_assistant_replies(tokenizer, tiny_manifest):
    ids, mask = encode_chat(tokenizer, CHAT)
    end = tokenizer.token_id("<|end|>")
    # The masked tokens decode to the replies, each closed by <|end|> (which the model must learn to emit).
    spans, current = [], []
    for token, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(token)
            if token == end:
                spans.append(tokenizer.decode(current[:-1]).strip())
                current = []
    assert spans == ["A field of science.", "You're welcome!"]
    assert not mask[: list(ids).index(tokenizer.token_id("<|assistant|>")) + 1].any()  # system/user/role tokens
    # The template stored with the tokenizer renders and tokenizes the same ids through transformers.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_manifest.parent / "tokenizer")
    assert list(hf.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == ids.tolist()


def megatron_logits(checkpoint: Path, inputs: list[dict], work: Path) -> list[torch.Tensor]:
    """Logits of the checkpoint's Megatron model for each {"tokens", "segments"} input, from one process."""
    torch.save(inputs, work / "inputs.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/megatron_logits.py"), str(checkpoint),
                           str(work / "inputs.pt"), str(work / "logits.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / "logits.pt")


def test_sft_rows_pack_examples_and_quarantine_bad_records(tokenizer, tiny_manifest, tmp_path):
    good = [{"id": i, "messages": [{"role": "user", "content": f"Question number {i}?"},
                                  {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(30)]
    bad = ['{"id": "x", "messages": [', {"id": "no-messages"},
           {"messages": [{"role": "robot", "content": "beep"}]},
           {"messages": [{"role": "user", "content": "only a question"}]},
           {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "word " * 200}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", good[:10] + bad + good[10:])
    out = tmp_path / "packed"
    out.mkdir()
    spec = sft_spec(path, validation_fraction=0.0)
    summary = build_sft_shards([resolve_source(s) for s in spec.sources], spec, tiny_manifest.parent / "tokenizer",
                               64, out, tmp_path / "downloads")
    quarantined = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [q["origin"].rsplit(":", 1)[1] for q in quarantined] == ["11", "12", "13", "14", "15"]
    assert summary["quarantined"] == 5 and summary["examples_train"] == 30
    assert any("too long" in q["reason"] for q in quarantined) and any("malformed JSON" in q["reason"]
                                                                       for q in quarantined)

    rows = read_rows(pq.read_table(out / "train/sft/shard-00000.parquet"))
    assert summary["rows_train"] == len(rows["tokens"]) < 30  # packed: several examples per row
    examples = 0
    for tokens, mask, segments in zip(rows["tokens"], rows["loss_mask"], rows["segments"]):
        for k in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == k)
            assert (np.diff(where) == 1).all()  # an example is contiguous and never split across rows
            text = tokenizer.decode(tokens[where][mask[where] == 1].tolist())
            assert text.startswith("Answer number")  # the loss falls on the reply only
            examples += 1
        assert not mask[segments == 0].any()  # padding never counts
    assert examples == 30

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    spec = sft_spec(path, validation_fraction=0.0, packing=False)
    summary = build_sft_shards([resolve_source(s) for s in spec.sources], spec, tiny_manifest.parent / "tokenizer",
                               64, unpacked, tmp_path / "downloads")
    assert summary["rows_train"] == 30


def test_packed_examples_do_not_attend_to_each_other(tp1_run, tmp_path, tokenizer):
    """In a packed row, the second example's logits equal its logits alone; without the mask they differ."""
    first, _ = encode_chat(tokenizer, CHAT)
    second, _ = encode_chat(tokenizer, [{"role": "user", "content": "Tell me a joke."},
                                 {"role": "assistant", "content": "Why did the chicken cross the road?"}])
    packed = torch.tensor([np.concatenate([first, second]).tolist()])
    segments = torch.tensor([[1] * len(first) + [2] * len(second)])
    alone = torch.tensor([second.tolist()])

    alone_logits, packed_logits, unmasked_logits = megatron_logits(tp1_run.checkpoint, [
        {"tokens": alone}, {"tokens": packed, "segments": segments}, {"tokens": packed}], tmp_path)
    reference = alone_logits[0]
    assert torch.allclose(packed_logits[0, len(first):], reference, atol=1e-5)
    assert not torch.allclose(unmasked_logits[0, len(first):], reference, atol=1e-3)


@pytest.mark.slow
def test_export_from_tp2_checkpoint_matches_megatron_logits(tiny_manifest, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    train(2, tmp_path / "run", tiny_manifest, parallel={"tensor_parallel": 2}, model_overrides={"num_query_groups": 2})
    checkpoint = tmp_path / "run/checkpoints/step-000006"
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "model.export_hf", str(checkpoint), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_logit_diff"] < 1e-4
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}

    # Independently of the export's own check: load the folder with transformers, compare with Megatron.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    tokens = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    (megatron,) = megatron_logits(checkpoint, [{"tokens": tokens}], tmp_path)
    with torch.no_grad():
        hf_logits = model(tokens).logits
    assert (hf_logits - megatron).abs().max() < 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.convert_tokens_to_ids("<|end|>") in GenerationConfig.from_pretrained(out).eos_token_id


def test_a_failed_export_check_says_which_side_moved():
    """The export's logit check (model/export_hf.py) on a small Llama: its own logits pass at 0; logits off by
    1e-3 (issue 30's failure) fail it, and the error says the Llama forward repeats itself, so the difference is
    on Megatron's side or in the layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.config import tiny
    from model.export_hf import check_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaForCausalLM(config).eval()
    weights = reference.state_dict()
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        logits = reference(tokens).logits.float()
    m, info = tiny(tie_embeddings=False), {"dtype": "fp32"}
    assert check_logits(dict(weights), config, m, info, tokens, logits) == 0
    off = logits.clone()
    off[1, 7, 3] += 1.12e-3
    with pytest.raises(RuntimeError, match=r"max \|logit difference\| 0\.00112 > 0\.0001 .*repeats its logits "
                                           r"exactly: the difference is in Megatron's forward"):
        check_logits(dict(weights), config, m, info, tokens, off)


@pytest.mark.slow
def test_sft_from_a_tp2_checkpoint_trains_at_pp2_on_replies(tiny_manifest, tp2_run, tmp_path, tokenizer):
    """Instruction tuning starts from a pretraining checkpoint saved at another layout and learns the replies."""
    replies = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
               for a in range(12) for b in range(12)]
    path = write_jsonl(tmp_path / "sft.jsonl", replies)
    spec = sft_spec(path, validation_fraction=0.1)
    (tmp_path / "sft").mkdir()
    build_sft_shards([resolve_source(s) for s in spec.sources], spec, tiny_manifest.parent / "tokenizer", 64,
                     tmp_path / "sft", tmp_path / "downloads")
    train(2, tmp_path / "tuned", tmp_path / "sft", parallel={"pipeline_parallel": 2}, start=tp2_run.checkpoint,
          train={"steps": 12})
    m = metrics(tmp_path / "tuned")
    assert m[0]["loss"] < tp2_run.metrics()[0]["loss"]  # it started from the pretrained weights
    assert m[-1]["val_loss"] < m[2]["val_loss"] - 0.3  # and learned the reply format
    state = json.loads((tmp_path / "tuned/checkpoints/step-000012/train_state.json").read_text())
    assert state["start"]["checkpoint"].endswith("step-000006") and state["model"]["vocab_size"] == 1000
    # TensorBoard draws the tuned run's curve after the 6 steps of the run it started from.
    assert state["step_offset"] == 6
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tuned", "train/loss")] == list(range(7, 19))
