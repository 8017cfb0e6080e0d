"""Evaluate an exported Hugging Face model folder (model/export_hf.py): validation perplexity, multiple-choice
accuracy by log-likelihood, and generations for fixed prompts. Plain PyTorch + transformers, one process.

    python -m model.evaluate exports/tiny --manifest artifacts/shard/<fp> --items civics.jsonl --prompt "Hi"

Multiple choice is scored as lm-evaluation-harness scores its log-likelihood tasks: for each choice, the sum of
the log-probabilities of " <choice>" after "Question: <q>\\nAnswer:"; `acc` takes the highest sum, `acc_norm`
the highest sum per byte of the choice.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from model.chat import encode_chat
from model.data import validation_rows


def load(model_dir: Path):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(Path(model_dir) / "tokenizer.model"))
    return model, sp


@torch.no_grad()
def heldout_loss(model, manifest_dir: Path, rows: int, batch: int = 8) -> dict:
    """Mean next-token loss over held-out rows; on SFT shards only response tokens count (their loss mask)."""
    data = validation_rows(manifest_dir, rows)
    total, count = 0.0, 0
    for i in range(0, len(data["tokens"]), batch):
        tokens = data["tokens"][i:i + batch]
        logits = model(tokens[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        weights = data["loss_mask"][i:i + batch, 1:].flatten().float() if "loss_mask" in data else torch.ones_like(nll)
        total += float((nll * weights).sum())
        count += int(weights.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "rows": len(data["tokens"])}


@torch.no_grad()
def continuation_logprob(model, sp, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context); the tokens are those where encode(context + continuation)
    departs from encode(context)."""
    ctx, full = sp.encode(context), sp.encode(context + continuation)
    shared = next((i for i, (a, b) in enumerate(zip(ctx, full)) if a != b), min(len(ctx), len(full)))
    ids = torch.tensor([full])
    logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
    return float(logprobs[shared - 1:].gather(-1, ids[0, shared:, None]).sum())


def multiple_choice(model, sp, items: list[dict]) -> dict:
    correct = correct_norm = 0
    chance = 0.0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = [continuation_logprob(model, sp, context, f" {c}") for c in item["choices"]]
        normed = [s / len(f" {c}".encode()) for s, c in zip(scores, item["choices"])]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == item["answer"]
        chance += 1 / len(item["choices"])
    n = max(len(items), 1)
    return {"items": len(items), "acc": correct / n, "acc_norm": correct_norm / n, "chance": chance / n}


@torch.no_grad()
def generate(model, sp, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
             seed: int) -> list[dict]:
    """Greedy and sampled replies to each prompt, formatted as a chat turn."""
    out = []
    for prompt in prompts:
        ids, _ = encode_chat(sp, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        inputs = torch.tensor([ids.tolist()], dtype=torch.long)
        row = {"prompt": prompt}
        for mode, kwargs in (("greedy", {"do_sample": False}),
                             ("sampled", {"do_sample": True, "temperature": temperature, "top_k": top_k})):
            torch.manual_seed(seed)
            result = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                    **kwargs)
            new = [t for t in result[0, inputs.shape[1]:].tolist() if t not in model.generation_config.eos_token_id]
            row[mode] = sp.decode(new).strip()
        out.append(row)
    return out


def evaluate(model_dir: Path, manifest_dir: Path, items: dict[str, list[dict]], prompts: list[str],
             perplexity_rows: int = 64, sft_manifest_dir: Path | None = None, max_new_tokens: int = 40,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> dict:
    model, sp = load(model_dir)
    results = {"model": str(model_dir), "validation": heldout_loss(model, manifest_dir, perplexity_rows),
               "multiple_choice": {name: multiple_choice(model, sp, its) for name, its in items.items()},
               "generations": generate(model, sp, prompts, max_new_tokens, temperature, top_k, seed)}
    if sft_manifest_dir is not None:
        results["sft_validation"] = heldout_loss(model, sft_manifest_dir, perplexity_rows)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--manifest", type=Path, required=True, help="shard manifest directory (validation rows)")
    p.add_argument("--items", type=Path, action="append", default=[],
                   help="multiple-choice jsonl with question, choices, answer (index)")
    p.add_argument("--prompt", action="append", default=[])
    args = p.parse_args(argv)
    items = {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
             for path in args.items}
    print(json.dumps(evaluate(args.model_dir, args.manifest, items, args.prompt), indent=1))


if __name__ == "__main__":
    main()
